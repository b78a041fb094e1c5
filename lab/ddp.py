"""One arm data-parallel over `devices_per_arm` processes: Lightning DDP, gloo on the CPU, NCCL on GPUs.

Rank 0 is the arm process the launcher started (`python -m lab.arm ...`). It owns the child run and starts
ranks 1..N-1 itself, as the same command with a torchrun-style environment (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, LOCAL_RANK), so Lightning joins them instead of re-launching the script. That keeps the ranks
children of the arm (gone with it, under a Ray task too) and lets rank 0 watch them: a rank that fails ends
the run FAILED with its one line. Ranks > 0 read the run id from `AB_ARM_RUN_ID` and never create a run.

The test set is split by whole batches (rank r takes batches r, r+N, ... of the one-process order), without
DistributedSampler's padding, so every sample is scored once, in the very batch a one-process run puts it in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import DataLoader

from lab import lifecycle, runs
from lab.config import Config
from lab.data import ABDataModule

RUN_ENV = "AB_ARM_RUN_ID"  # the child run, for ranks > 0
RANK_ENV = "AB_ARM_RANK"
ERROR_DIR_ENV = "AB_ARM_RANK_ERRORS"  # where a failing rank > 0 leaves its one line
POLL_S = 0.5


def rank() -> int:
    """This process's rank within its arm (0 for an arm that is not data-parallel)."""
    return int(os.environ.get(RANK_ENV, "0"))


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The test batches of one rank: batches rank, rank + world, ... of the one-process order, each whole.

    With fewer batches than ranks the samples are dealt out in near-equal contiguous slices instead, so that no
    rank is left without any (an empty rank would skip the gather the others wait in).
    """
    if not 0 <= rank < world or n < world:
        raise ValueError(f"cannot split {n} test images over {world} ranks (rank {rank}); use fewer devices_per_arm")
    starts = list(range(0, n, batch_size))
    if len(starts) >= world:
        return [list(range(s, min(s + batch_size, n))) for s in starts[rank::world]]
    lo, hi = rank * n // world, (rank + 1) * n // world
    return [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]


class ShardedTestData(ABDataModule):
    """The shared data module; under DDP each rank's test loader holds its whole batches (`batch_shard`)."""

    def test_dataloader(self) -> DataLoader:
        loader = super().test_dataloader()
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return loader
        dataset = loader.dataset
        batches = batch_shard(len(dataset), self.cfg.batch_size, self.trainer.global_rank, world)
        return DataLoader(dataset, batch_sampler=batches, num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def tags(cfg: Config) -> dict[str, str]:
    """How a data-parallel arm ran. `batch_size` is per device (Lightning's convention), so a fit's effective
    batch, and with it the recipe, changes with devices_per_arm; the test's predictions do not."""
    if cfg.devices_per_arm == 1:
        return {}
    return {"ab.devices_per_arm": str(cfg.devices_per_arm), "ab.batch_size_convention": "per_device",
            "ab.effective_batch_size": str(cfg.batch_size * cfg.devices_per_arm),
            "ab.test_shard": "whole batches, strided over ranks, no padding"}


def threads_per_rank(threads: int, world: int) -> int:
    """Torch threads of each of an arm's `world` processes on the CPU, so that they do not oversubscribe it."""
    return max(1, threads // world) if threads else 0


class Ranks:
    """Ranks 1..N-1 of one arm, started and watched by rank 0.

    `on_failure(line)` is called (once, from a watcher thread) when a rank exits non-zero; it ends the run and
    this process. `stop()` ends the watching: rank 0 then reports failures itself.
    """

    def __init__(self, world: int, argv: list[str], run_id: str, threads: int, on_failure: Callable[[str], None]):
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        self.world, self.on_failure = world, on_failure
        self.errors = Path(tempfile.mkdtemp(prefix="ablab-ranks-"))
        common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_network_port()), "NODE_RANK": "0",
                  "WORLD_SIZE": str(world), RUN_ENV: run_id, ERROR_DIR_ENV: str(self.errors)}
        if threads:  # Lightning sets OMP_NUM_THREADS (and torch's threads) to cores // N unless it is set
            common["OMP_NUM_THREADS"] = str(threads)
        os.environ.update(common | {"LOCAL_RANK": "0", RANK_ENV: "0"})  # rank 0: Lightning launches nothing
        self.procs = [subprocess.Popen([sys.executable, "-m", "lab.arm", *argv], preexec_fn=lifecycle.die_with_parent,
                                       env={**os.environ, "LOCAL_RANK": str(r), RANK_ENV: str(r)})
                      for r in range(1, world)]
        self.lock = threading.Lock()
        self.watching = True
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="ablab-ranks", daemon=True).start()

    def failure(self) -> str | None:
        """The one line of the first rank that exited non-zero, None while none has."""
        for r, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code:
                path = self.errors / f"rank{r}.err"
                why = path.read_text().strip() if path.exists() else ""
                exit_line = f"rank {r} killed by signal {-code}" if code < 0 else f"rank {r} exited with code {code}"
                return why or exit_line
        return None

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            line = self.failure()
            if line is None:
                continue
            with self.lock:
                if not self.watching:
                    return
                self.watching = False
            try:
                self.kill()
                self.on_failure(line)
            finally:  # rank 0 may be blocked in a collective that waits for the dead rank: end it here
                os._exit(1)

    def stop(self, wait_s: float = 0.0) -> str | None:
        """Stop watching; the failure line of a rank, waiting up to `wait_s` for one (rank 0 failed too: it may
        have failed because of that rank, whose line says why)."""
        deadline = time.monotonic() + wait_s
        while self.failure() is None and self._running() and time.monotonic() < deadline:
            time.sleep(0.1)
        with self.lock:
            took_over, self.watching = not self.watching, False
        self._done.set()
        if took_over:  # the watcher is ending the run with a rank's line, and then this process
            threading.Event().wait()
        return self.failure()

    def join(self, timeout_s: float = 120.0) -> str | None:
        """After the test: wait for every rank to exit; the failure line of one that did not exit 0."""
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        line = self.stop()
        shutil.rmtree(self.errors, ignore_errors=True)
        return line

    def abort(self, interrupted: bool) -> str | None:
        """Rank 0 failed or was interrupted: stop the other ranks; the line of one that failed first, if any."""
        line = self.stop(wait_s=0.0 if interrupted else 3.0)
        self.kill()
        shutil.rmtree(self.errors, ignore_errors=True)
        return line

    def _running(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


def write_rank_error(line: str) -> None:
    """In a rank > 0: leave the one line for rank 0, which ends the run with it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        Path(folder, f"rank{rank()}.err").write_text(f"rank {rank()}: {line}")


def run_as_rank(work: Callable[[], None]) -> int:
    """A rank > 0: its share of the arm; a failure leaves one line for rank 0, which ends the run with it."""
    try:
        work()
    except BaseException as err:
        write_rank_error(runs.one_line(err))
        sys.stderr.flush()
        os._exit(1)  # skip the teardown: rank 0 may be gone, and the process group with it
    return 0


def ending_run(run_id: str, arm: str, error_file: str | None) -> Callable[[str], None]:
    """What rank 0's watcher does when another rank fails (rank 0 may be blocked waiting for it): end the run
    FAILED with that rank's line, for the launcher too; `arm` names it ("arm a (resnet18)")."""
    def fail(line: str) -> None:
        from mlflow import MlflowClient

        if lifecycle.received_signal() is not None:  # Ctrl-C reached every rank: the job says "interrupted"
            lifecycle.end_run(MlflowClient(), run_id, "interrupted", "KILLED")
            return
        message = f"{arm}: {line}"
        if error_file:
            Path(error_file).write_text(message)
        lifecycle.end_run(MlflowClient(), run_id, message, "FAILED")
        print(f"ablab: error: {message}", file=sys.stderr, flush=True)
    return fail
