"""Lockstep: arms that share one device take turns batch by batch, across processes.

    server = LockstepServer(world_size=2)                          # in the launcher
    Trainer(callbacks=[Lockstep(server.address, rank=r, world_size=2)])   # in arm r's process
    server.reap(r)                                                 # launcher, once arm r's process exited

Each gated batch (train, validation, test) waits for its arm's turn at batch start; at batch end the
arm synchronizes its GPU and passes the turn to the next arm that is not done. An arm is done once it
will run no more gated batches: at ``teardown(stage="test")``, on an exception, on ``finish()``, or
when the launcher reaps its process. Arms may run different numbers of batches. Put Lockstep before
GPUTelemetry in the callbacks list, so that the wait for the turn is not timed as the batch's latency.

Protocol, on a ``torch.distributed.TCPStore`` owned by the launcher:
  turn/<g>  the rank holding the turn in generation g; turn/0 = "0", so rank 0 starts. Written only
            by ``compare_set(key, "", rank)``, so writers that race agree on one owner.
  done/<r>  present while rank r is done.
  gen       a generation known to exist; readers scan forward from it.
Whoever hands the turn to a rank checks afterwards that the rank is not done, and hands it on if it
is; the reaper marks a rank done and then does the same for the current owner. So a turn is never
left with a dead arm, even when a pass and a reap race.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed import DistStoreError, TCPStore
from typing_extensions import override

GEN_KEY = "gen"
POLL_S = 30.0  # a waiting arm re-checks the owner this often even without a new turn (defensive)


class LockstepTimeout(RuntimeError):
    """An arm waited ``timeout_s`` for its turn."""


# ---- the protocol, shared by the server and the arms -------------------------------------------


def _turn_key(generation: int) -> str:
    return f"turn/{generation}"


def _done_key(rank: int) -> str:
    return f"done/{rank}"


def is_done(store: TCPStore, rank: int) -> bool:
    return store.check([_done_key(rank)])


def next_active(store: TCPStore, after: int, world_size: int) -> int | None:
    """The first rank after ``after`` (cyclically, ``after`` itself last) that is not done."""
    for step in range(1, world_size + 1):
        rank = (after + step) % world_size
        if not is_done(store, rank):
            return rank
    return None


def latest_turn(store: TCPStore, generation: int) -> tuple[int, int]:
    """Scan forward from an existing generation to the latest one; returns (generation, owner)."""
    while store.check([_turn_key(generation + 1)]):
        generation += 1
    return generation, int(store.get(_turn_key(generation)))


def hand_over(store: TCPStore, generation: int, owner: int, world_size: int) -> tuple[int, int]:
    """Pass the turn that ``owner`` holds in ``generation`` to the next rank not done.

    Keeps the turn with ``owner`` when it is the only rank not done; keeps passing while the rank
    that ends up with the turn turns out to be done. Returns the new (generation, owner).
    """
    while True:
        nxt = next_active(store, owner, world_size)
        if nxt is None or nxt == owner:
            return generation, owner
        generation, owner = generation + 1, int(store.compare_set(_turn_key(generation + 1), "", str(nxt)))
        store.set(GEN_KEY, str(generation))
        if not is_done(store, owner):
            return generation, owner


def mark_done(store: TCPStore, rank: int, world_size: int) -> None:
    """Mark ``rank`` done without holding the turn (it died or gave up), then free the turn."""
    store.set(_done_key(rank), "1")
    generation, owner = latest_turn(store, int(store.get(GEN_KEY)))
    if is_done(store, owner):
        hand_over(store, generation, owner, world_size)


class LockstepServer:
    """The launcher's side: owns the store that the arms meet on.

    Args:
        world_size: number of arms (ranks 0 .. world_size - 1).
        host: address to listen on; the port is chosen by the system (see ``address``).
        timeout_s: the store's default timeout for its clients' blocking calls.
    """

    def __init__(self, world_size: int, host: str = "127.0.0.1", timeout_s: float = 600.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.host = host
        self.store: TCPStore | None = TCPStore(
            host, 0, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.store.set(_turn_key(0), "0")
        self.store.set(GEN_KEY, "0")

    @property
    def address(self) -> str:
        """'host:port' for ``Lockstep(address, ...)``."""
        if self.store is None:
            raise RuntimeError("lockstep server is closed")
        return f"{self.host}:{self.store.port}"

    def reap(self, rank: int) -> None:
        """Mark a dead (or finished) arm done and pass the turn on if it held it; safe to repeat."""
        if self.store is not None and not is_done(self.store, rank):
            mark_done(self.store, rank, self.world_size)

    def close(self) -> None:
        self.store = None  # dropping the last reference stops the store's server


# ---- the arm's side ------------------------------------------------------------------------------


class Lockstep(Callback):
    """Make this arm's train, validation and test batches take turns with the other arms'.

    Args:
        address: ``LockstepServer.address``.
        rank: this arm's rank, 0 .. world_size - 1; rank 0 goes first.
        world_size: number of arms.
        timeout_s: the longest wait for a turn before ``LockstepTimeout`` (a RuntimeError).
        order_log: if given, a file to which "<rank> <stage> <batch_idx>" is appended at the start
            of each gated batch (once the turn is held).
    """

    def __init__(
        self, address: str, rank: int, world_size: int, timeout_s: float = 600.0, order_log: str | None = None
    ) -> None:
        self.address = address
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.order_log = order_log
        self._store: TCPStore | None = None
        self._log_fd: int | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self._store is None:
            host, port = self.address.rsplit(":", 1)
            timeout = timedelta(seconds=self.timeout_s)
            self._store = TCPStore(host, int(port), None, False, timeout=timeout, wait_for_workers=False)
            self._generation, self._owner = latest_turn(self._store, int(self._store.get(GEN_KEY)))
            self._holding = self._done = False
        if self.order_log and self._log_fd is None:
            self._log_fd = os.open(self.order_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._begin("train", batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end(pl_module)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._begin("val", batch_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._end(pl_module)

    @override
    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._begin("test", batch_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._end(pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # After our own timeout the others are unresponsive, and when interrupted they are stopping too (each
        # would wait for the other's turn): mark done without waiting.
        self.finish(wait=not isinstance(exception, (LockstepTimeout, KeyboardInterrupt)))
        self._close_log()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "test":
            self.finish()
        self._close_log()

    # ---- turns -----------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Block until this arm holds the turn (at once if every other arm is done)."""
        store = self._connected()
        if self._done:  # run again after finishing, e.g. a retried test: take part again
            store.delete_key(_done_key(self.rank))
            self._done = False
        if self._holding:
            return
        self._generation, self._owner = latest_turn(store, self._generation)
        deadline = time.monotonic() + self.timeout_s
        while self._owner != self.rank:
            following = _turn_key(self._generation + 1)
            if store.check([following]):
                self._generation, self._owner = latest_turn(store, self._generation)
            elif is_done(store, self._owner):  # its holder finished or died: take it over
                self._generation, self._owner = hand_over(
                    store, self._generation, self._owner, self.world_size
                )
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockstepTimeout(
                        f"lockstep: arm {self.rank} waited {self.timeout_s:g} s for its turn;"
                        " another arm has stopped responding"
                    )
                # A timed-out wait just loops: the owner and the deadline are checked again.
                with contextlib.suppress(DistStoreError):
                    store.wait([following], timedelta(seconds=min(remaining, POLL_S)))
        self._holding = True

    def release(self) -> None:
        """Pass the turn on (keep it if every other arm is done)."""
        store = self._connected()
        self._generation, self._owner = hand_over(store, self._generation, self.rank, self.world_size)
        self._holding = self._owner == self.rank

    def finish(self, wait: bool = True) -> None:
        """Mark this arm done, holding the turn while doing so; safe to call twice."""
        if self._store is None or self._done:
            return
        if wait and not self._holding:
            with contextlib.suppress(LockstepTimeout):
                self.acquire()
        self._done = True
        if self._holding:
            self._store.set(_done_key(self.rank), "1")
            self.release()
        else:
            mark_done(self._store, self.rank, self.world_size)
        self._holding = False

    def _begin(self, stage: str, batch_idx: int) -> None:
        self.acquire()
        if self._log_fd is not None:
            os.write(self._log_fd, f"{self.rank} {stage} {batch_idx}\n".encode())

    def _end(self, pl_module: pl.LightningModule) -> None:
        if not self._holding:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the batch must be finished before the next arm starts
        self.release()

    def _connected(self) -> TCPStore:
        if self._store is None:
            raise RuntimeError("lockstep: not connected; setup() connects to the server")
        return self._store

    def _close_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
