"""Lockstep: arms that share one device take turns batch by batch, across processes.

    server = LockstepServer(world_size=2)                          # in the launcher
    Trainer(callbacks=[Lockstep(server.address, rank=r, world_size=2)])   # in arm r's process
    server.reap(r)                                                 # launcher, once arm r's process exited

Each gated batch (train, validation, test) waits for its arm's turn at batch start; at batch end the
arm synchronizes its GPU and passes the turn to the next arm that is not done. An arm is done once it
will run no more gated batches: at ``teardown(stage="test")``, on an exception, on ``finish()``, or
when the launcher reaps its process. Arms may run different numbers of batches. Put Lockstep before
GPUTelemetry in the callbacks list, so that the wait for the turn is not timed as the batch's latency.

The protocol, on a ``torch.distributed.TCPStore`` owned by the launcher, and the launcher's server are in
callbacks/turns.py (no Lightning there).
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

from callbacks.turns import (
    GEN_KEY,
    POLL_S,
    LockstepServer,
    LockstepTimeout,
    done_key,
    hand_over,
    is_done,
    latest_turn,
    mark_done,
    turn_key,
)

__all__ = ["Lockstep", "LockstepServer", "LockstepTimeout", "is_done", "latest_turn"]

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
            store.delete_key(done_key(self.rank))
            self._done = False
        if self._holding:
            return
        self._generation, self._owner = latest_turn(store, self._generation)
        deadline = time.monotonic() + self.timeout_s
        while self._owner != self.rank:
            following = turn_key(self._generation + 1)
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
            self._store.set(done_key(self.rank), "1")
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
