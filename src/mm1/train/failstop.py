"""Stopping every rank at one step when one of them fails inside it (out of memory).

A stop request (SIGTERM, Ctrl-C) is agreed on over the process group at the end of a step
(`parallel.any_rank`). An out-of-memory error cannot be: the rank that hits it leaves its step
part-way, while its peers wait for it inside that step's collectives (FSDP2's all-gathers in
forward, DDP's gradient all-reduces in backward); a flag all-reduced now would be matched against
one of those and the job would hang. So the agreement goes around the process group, through the
rendezvous store that torchrun already runs for the job:

1. the failing rank posts what happened on the store and leaves the process group;
2. its peers get out of the collective they wait in: on NCCL each rank's watcher thread sees the post
   within a second and aborts its communicator (a kernel waiting for a rank that left would spin
   forever); on gloo, which cannot abort a collective in flight, the collective fails when
   `train.collective_timeout_s` runs out, and the rank then finds the post;
3. every rank abandons the step before its optimizer step, so its weights are those of the last
   completed step, drops what the step held, and joins a fresh gloo group on the same store;
4. over that group the ranks check that they all hold the same completed step and that none was
   caught inside its optimizer step (weights half-updated); if so the trainer saves that step's
   checkpoint, with the RNG state the abandoned step began with, so `--resume` continues exactly as an
   uninterrupted run would, and every rank stops with the reason.

Tested under torchrun on gloo with DDP and FSDP2 (tests/test_train.py); the NCCL watcher follows the
same protocol and has its own test with a stand-in store, but has not run on GPUs here. torch calls its
communicator abort experimental, meant for TORCH_NCCL_ASYNC_ERROR_HANDLING=0; with the default, the
NCCL watchdog may tear a process down over the aborted collectives, and the job then ends as a crash
would, its last periodic checkpoint intact (mm1 leaves that variable as it is).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

KEY = "mm1/step_failure"  # under the job's store prefix (torchrun gives each restart its own)


class PeerFailedError(RuntimeError):
    """Raised where a step's results cannot be trusted because a peer posted a failure during it."""


@dataclass(frozen=True)
class Report:
    """One rank's state when the job stops after a failed step."""
    rank: int
    completed: int  # optimizer steps its weights have taken
    torn: bool  # caught inside the optimizer step: its weights are part-updated
    failure: str | None  # what this rank hit itself; None for a rank stopped by a peer's failure


@dataclass(frozen=True)
class Decision:
    """What the ranks agree to do after a failed step."""
    step: int | None  # the completed step every rank holds, to save; None: no consistent state
    why: str  # which ranks failed, and how


def decide(reports: list[Report]) -> Decision:
    """The step to save if every rank holds it whole; otherwise None (and the run's last checkpoint stands)."""
    by_failure: dict[str, list[int]] = {}
    for r in reports:
        if r.failure:
            by_failure.setdefault(r.failure, []).append(r.rank)
    if len(reports) == 1:
        why = next(iter(by_failure), "a rank posted a failure")
    else:  # a uniform batch often fails on every rank at once: one line per kind of failure
        why = "; ".join(f"{_ranks(ranks)}: {failure}" for failure, ranks in by_failure.items())
        why = why or "a rank posted a failure"
    steps = {r.completed for r in reports}
    if any(r.torn for r in reports) or len(steps) != 1:
        return Decision(None, why)
    return Decision(steps.pop(), why)


def _ranks(ranks: list[int], shown: int = 4) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    listed = ", ".join(map(str, ranks[:shown]))
    return f"ranks {listed}" + (f" and {len(ranks) - shown} more" if len(ranks) > shown else "")


def _abort_default_group() -> None:
    """Leave the default process group without waiting for its pending work (which will never finish)."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None:
        abort()
    else:  # an older torch: destroying is the closest there is
        dist.destroy_process_group()


class FailureChannel:
    """The side channel of one job: post a failure, notice a peer's, regroup after one.

    `store` is the rendezvous store every rank shares (the default group's, under torchrun);
    `watch` starts the thread that aborts this rank's communicator when a peer posts (NCCL).
    """

    def __init__(self, store: dist.Store, *, rank: int, world_size: int, watch: bool, poll_s: float = 1.0,
                 abort: Callable[[], None] = _abort_default_group) -> None:
        self._store = store
        self.rank, self.world_size = rank, world_size  # kept: the group they came from may be aborted
        self._abort = abort
        self.peer_failed = threading.Event()  # set by the watcher before it aborts the communicator
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if watch:
            self._thread = threading.Thread(target=self._watch, args=(poll_s,), daemon=True,
                                            name="mm1-failure-watch")
            self._thread.start()

    @classmethod
    def for_job(cls, *, watch: bool) -> FailureChannel | None:
        """The channel of the current torchrun job, or None in a single process."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return cls(dist.distributed_c10d._get_default_store(), rank=dist.get_rank(),
                   world_size=dist.get_world_size(), watch=watch)

    def post(self, what: str) -> None:
        self._store.set(KEY, what)

    def posted(self, wait_s: float = 0.0) -> bool:
        """Whether a rank has posted a failure; a collective that just failed may be the first sign of a
        post still on its way, so this may wait `wait_s` for it."""
        deadline = time.monotonic() + wait_s
        while not self._store.check([KEY]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _watch(self, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            if self._store.check([KEY]):
                with self._lock:
                    if not self._closed.is_set():
                        # The flag first: whatever the aborted collectives hand back is not a result.
                        self.peer_failed.set()
                        self._abort()
                return

    def close(self) -> None:
        with self._lock:
            self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def regroup(self, report: Report, *, timeout_s: float = 600.0) -> list[Report]:
        """Leave the failed process group, join a fresh gloo group on the same store (it becomes the
        default group: checkpoint saving uses it), and swap reports with every rank."""
        self.close()
        _abort_default_group()  # unless this rank's watcher has already
        dist.init_process_group("gloo", store=dist.PrefixStore("mm1/regroup", self._store), rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        reports: list[Report | None] = [None] * self.world_size
        dist.all_gather_object(reports, report)
        return [r for r in reports if r is not None]
