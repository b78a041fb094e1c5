"""The turn-taking protocol of callbacks/lockstep.py on a ``torch.distributed.TCPStore``, and the launcher's
server, apart from the Lightning callback: the launcher imports this without Lightning.

    server = LockstepServer(world_size=2)     # in the launcher
    server.reap(r)                            # once arm r's process exited

Keys:
  turn/<g>  the rank holding the turn in generation g; turn/0 = "0", so rank 0 starts. Written only
            by ``compare_set(key, "", rank)``, so writers that race agree on one owner.
  done/<r>  present while rank r is done.
  gen       a generation known to exist; readers scan forward from it.
Whoever hands the turn to a rank checks afterwards that the rank is not done, and hands it on if it
is; the reaper marks a rank done and then does the same for the current owner. So a turn is never
left with a dead arm, even when a pass and a reap race.
"""

from __future__ import annotations

from datetime import timedelta

from torch.distributed import TCPStore

GEN_KEY = "gen"
POLL_S = 30.0  # a waiting arm re-checks the owner this often even without a new turn (defensive)


class LockstepTimeout(RuntimeError):
    """An arm waited ``timeout_s`` for its turn."""


def turn_key(generation: int) -> str:
    return f"turn/{generation}"


def done_key(rank: int) -> str:
    return f"done/{rank}"


def is_done(store: TCPStore, rank: int) -> bool:
    return store.check([done_key(rank)])


def next_active(store: TCPStore, after: int, world_size: int) -> int | None:
    """The first rank after ``after`` (cyclically, ``after`` itself last) that is not done."""
    for step in range(1, world_size + 1):
        rank = (after + step) % world_size
        if not is_done(store, rank):
            return rank
    return None


def latest_turn(store: TCPStore, generation: int) -> tuple[int, int]:
    """Scan forward from an existing generation to the latest one; returns (generation, owner)."""
    while store.check([turn_key(generation + 1)]):
        generation += 1
    return generation, int(store.get(turn_key(generation)))


def hand_over(store: TCPStore, generation: int, owner: int, world_size: int) -> tuple[int, int]:
    """Pass the turn that ``owner`` holds in ``generation`` to the next rank not done.

    Keeps the turn with ``owner`` when it is the only rank not done; keeps passing while the rank
    that ends up with the turn turns out to be done. Returns the new (generation, owner).
    """
    while True:
        nxt = next_active(store, owner, world_size)
        if nxt is None or nxt == owner:
            return generation, owner
        generation, owner = generation + 1, int(store.compare_set(turn_key(generation + 1), "", str(nxt)))
        store.set(GEN_KEY, str(generation))
        if not is_done(store, owner):
            return generation, owner


def mark_done(store: TCPStore, rank: int, world_size: int) -> None:
    """Mark ``rank`` done without holding the turn (it died or gave up), then free the turn."""
    store.set(done_key(rank), "1")
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
        self.store.set(turn_key(0), "0")
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
