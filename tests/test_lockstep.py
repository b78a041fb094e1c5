"""Tests of callbacks/lockstep.py: arms in separate processes take turns batch by batch.

    .venv/bin/python -m pytest tests/test_lockstep.py -q

The arms are real processes running a real Trainer on the CPU (and on one GPU where there is one).
They are forked from a forkserver that imported Lightning once (importing it costs seconds per
process here), never from this process, whose torch thread pools are not safe to fork.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lockstep import Lockstep, LockstepServer, LockstepTimeout, is_done, latest_turn

ARM_TIMEOUT_S = 30.0  # an arm's wait for its turn; the scenarios below take about a second


# ---- an arm: a tiny module trained and tested under Lockstep --------------------------------


class TinyNet(LightningModule):
    def __init__(self, die_at_test_batch: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
        )
        self.die_at_test_batch = die_at_test_batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels, _ids = batch
        return nn.functional.cross_entropy(self(images), labels)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        if batch_idx == self.die_at_test_batch:
            os._exit(3)  # a crash that runs no hook: only the launcher's reap frees the turn
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n_batches: int) -> DataLoader:
    n = 2 * n_batches
    images = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(images, torch.arange(n) % 2, torch.arange(n)), batch_size=2)


def run_arm(
    address: str,
    rank: int,
    order_log: str,
    test_batches: int,
    fit_batches: int = 0,
    die_at_test_batch: int | None = None,
    accelerator: str = "cpu",
) -> None:
    """One arm's process: optionally fit one epoch, then test, taking turns with the other arm."""
    torch.set_num_threads(1)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        limit_train_batches=fit_batches,
        limit_val_batches=0,
        limit_test_batches=test_batches,
        callbacks=[Lockstep(address, rank, 2, timeout_s=ARM_TIMEOUT_S, order_log=order_log)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = TinyNet(die_at_test_batch)
    if fit_batches:
        trainer.fit(module, train_dataloaders=loader(fit_batches))
    trainer.test(module, dataloaders=loader(test_batches))


@pytest.fixture(scope="module")
def ctx() -> mp.context.ForkServerContext:
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["lightning.pytorch", "callbacks.lockstep", __name__])
    return context


def start_arms(ctx: mp.context.ForkServerContext, arms: list[dict]) -> list[mp.process.BaseProcess]:
    processes = [ctx.Process(target=run_arm, kwargs=arm, daemon=True) for arm in arms]
    for process in processes:
        process.start()
    return processes


def read_order(path: Path) -> list[tuple[int, str, int]]:
    return [
        (int(r), stage, int(i)) for r, stage, i in (line.split() for line in path.read_text().splitlines())
    ]


def assert_alternates_then_one_arm(order: list[tuple[int, str, int]], n_first: int) -> None:
    """Ranks alternate 0,1,0,1,... for the first n_first lines; rank 0 alone after that."""
    ranks = [rank for rank, _, _ in order]
    assert ranks[:n_first] == [i % 2 for i in range(n_first)], ranks
    assert set(ranks[n_first:]) <= {0}, ranks


# ---- scenarios -----------------------------------------------------------------------------


@pytest.mark.slow  # arm processes from a forkserver
def test_fit_and_test_alternate_and_a_shorter_arm_does_not_hold_up_the_other(
    ctx: mp.context.ForkServerContext, tmp_path: Path
) -> None:
    server = LockstepServer(world_size=2)
    log = tmp_path / "order.log"
    common = {"address": server.address, "order_log": str(log), "fit_batches": 3}
    arms = start_arms(
        ctx, [{**common, "rank": 0, "test_batches": 5}, {**common, "rank": 1, "test_batches": 2}]
    )
    for arm in arms:
        arm.join(timeout=60)
    assert [arm.exitcode for arm in arms] == [0, 0]

    order = read_order(log)
    # Both arms: 3 training batches, then rank 1 tests 2 batches and is done while rank 0 tests 5.
    assert_alternates_then_one_arm(order, n_first=2 * 3 + 2 * 2)
    train = [("train", i) for i in range(3)]
    assert [(s, i) for r, s, i in order if r == 0] == train + [("test", i) for i in range(5)]
    assert [(s, i) for r, s, i in order if r == 1] == train + [("test", i) for i in range(2)]
    assert is_done(server.store, 0) and is_done(server.store, 1)
    server.close()


@pytest.mark.slow  # arm processes from a forkserver
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_arms_on_one_gpu_alternate(ctx: mp.context.ForkServerContext, tmp_path: Path) -> None:
    server = LockstepServer(world_size=2)
    log = tmp_path / "order.log"
    common = {"address": server.address, "order_log": str(log), "fit_batches": 4, "accelerator": "gpu"}
    arms = start_arms(
        ctx, [{**common, "rank": 0, "test_batches": 6}, {**common, "rank": 1, "test_batches": 6}]
    )
    for arm in arms:
        arm.join(timeout=120)
    assert [arm.exitcode for arm in arms] == [0, 0]
    assert_alternates_then_one_arm(read_order(log), n_first=2 * (4 + 6))
    server.close()


@pytest.mark.slow  # arm processes from a forkserver
def test_a_dead_arm_once_reaped_does_not_hold_up_the_other(
    ctx: mp.context.ForkServerContext, tmp_path: Path
) -> None:
    server = LockstepServer(world_size=2)
    log = tmp_path / "order.log"
    common = {"address": server.address, "order_log": str(log), "test_batches": 6}
    survivor, crasher = start_arms(
        ctx, [{**common, "rank": 0}, {**common, "rank": 1, "die_at_test_batch": 2}]
    )
    crasher.join(timeout=60)
    assert crasher.exitcode == 3
    # It died holding the turn; the launcher notices the exit and reaps it.
    server.reap(1)
    survivor.join(timeout=60)
    assert survivor.exitcode == 0

    order = read_order(log)
    assert_alternates_then_one_arm(order, n_first=2 * 3)
    assert [i for r, _, i in order if r == 0] == list(range(6))
    assert [i for r, _, i in order if r == 1] == [0, 1, 2]  # batch 2 started, then the crash
    server.close()


def test_a_wait_that_times_out_raises_one_line(tmp_path: Path) -> None:
    """Rank 0 holds the turn and never comes: rank 1's first batch gives up after timeout_s."""
    server = LockstepServer(world_size=2)
    trainer = Trainer(
        accelerator="cpu",
        limit_test_batches=2,
        callbacks=[Lockstep(server.address, rank=1, world_size=2, timeout_s=0.3)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    message = "lockstep: arm 1 waited 0.3 s for its turn; another arm has stopped responding"
    with pytest.raises(RuntimeError, match=message) as raised:
        trainer.test(TinyNet(), dataloaders=loader(2))
    assert isinstance(raised.value, LockstepTimeout) and "\n" not in str(raised.value)
    assert is_done(server.store, 1)  # it gave up, so it is marked done and will not be waited for
    server.close()


# ---- the protocol, driven by hand within one process ---------------------------------------


def connect(server: LockstepServer, rank: int, timeout_s: float = 1.0) -> Lockstep:
    arm = Lockstep(server.address, rank, server.world_size, timeout_s=timeout_s)
    arm.setup(None, None, "test")  # type: ignore[arg-type]  # setup uses neither
    return arm


def test_turn_passes_in_rank_order_skipping_done_arms() -> None:
    server = LockstepServer(world_size=3)
    arms = [connect(server, rank) for rank in range(3)]
    arms[0].acquire()
    arms[0].release()
    arms[1].acquire()
    arms[1].finish()  # done while holding the turn: passes it to 2
    arms[2].acquire()
    arms[2].release()  # to 0, skipping the finished 1
    arms[0].acquire()
    arms[0].release()
    arms[2].acquire()
    server.reap(0)  # 0 reaped while 2 holds the turn: 2 is now alone and keeps it
    arms[2].release()
    arms[2].acquire()
    assert latest_turn(server.store, 0)[1] == 2  # the latest turn is 2's
    server.close()


def test_reaping_the_holder_passes_the_turn_and_a_lone_arm_never_waits() -> None:
    server = LockstepServer(world_size=2)
    arm1 = connect(server, 1, timeout_s=0.2)
    with pytest.raises(LockstepTimeout):
        arm1.acquire()  # rank 0 holds the turn and has not connected
    server.reap(0)
    arm1.acquire()  # the turn passed to 1 when 0 was reaped
    for _ in range(3):
        arm1.release()  # nobody else left: keeps the turn
        arm1.acquire()
    arm1.finish()
    arm1.acquire()  # run again after finishing (a retried test): takes part again
    assert not is_done(server.store, 1)
    server.close()
