"""Hangs and errors under torchrun: the collective timeout, the watchdog, one printed error per run
(docs/reliability-limits.md). The verdict comes before torch's own, later, process-group timeout, which with
NCCL would abort with a C++ dump.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from .config import shown
from .errors import UserError

TIMEOUT_VARIABLE = "FASTEMP_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # minutes, not torch's 30: long enough for a first-step compile on every rank
active: Watchdog | None = None  # this rank's, set by distributed.init_from_env


class DistributedError(UserError, RuntimeError):
    """torchrun's environment is incomplete, or the rendezvous failed: shown as one line."""


def collective_timeout_s() -> float:
    """Seconds a rank waits in a collective for the others."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DistributedError(
            f"{TIMEOUT_VARIABLE}={shown(text)} is not a number of seconds > 0; "
            f"set it to e.g. {int(DEFAULT_TIMEOUT_S)}, or unset it"
        )
    return value


def collectives_issued() -> int:
    """Collectives this rank has issued on the default group (its backends' sequence numbers, which
    count DDP's and SyncBatchNorm's too); equal on every rank that is in step."""
    group = dist.distributed_c10d._get_default_group()
    total = 0
    for device in ("cpu", "cuda"):
        with contextlib.suppress(Exception):  # no backend for that device
            total += group._get_backend(torch.device(device))._get_sequence_number_for_group()
    return total


def stalled_ranks(my_issued: int, others: dict, now: float, timeout_s: float) -> dict[int, str]:
    """The ranks a rank that waited past the timeout names, with why: behind it (fewer collectives
    issued), silent (no heartbeat for timeout_s, by wall clock) or never seen. `others`: rank ->
    (collectives issued, heartbeat time) or None. A pure function of what the store says."""
    out = {}
    for r, beat in sorted(others.items()):
        if beat is None:
            out[r] = "it never reported"
        elif beat[0] < my_issued:
            out[r] = "it has not joined the collective the others wait in"
        elif now - beat[1] > timeout_s:
            out[r] = f"no sign of life for {now - beat[1]:.0f} s"
    return out


class Watchdog:
    """One thread per rank: a heartbeat with the collectives issued, forwarding of other ranks'
    errors (rank 0), and the verdict on a rank that waited past the timeout."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.interval = timeout_s, min(1.0, timeout_s / 10)
        self.store = dist.PrefixStore("fastemp", dist.distributed_c10d._get_default_store())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.issued, self.since = collectives_issued(), time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fastemp-watchdog", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(Exception):  # the store is gone
            self.store.set(f"finished/{self.rank}", "1")  # a rank that ended cleanly is never named

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                verdict = self._check()
            except Exception:  # the store is gone: the run is ending anyway
                return
            if verdict:
                if self.claim_report():
                    print(f"fastemp: error: {verdict}", file=sys.stderr, flush=True)
                os._exit(2)

    def _check(self) -> str | None:
        issued, now = collectives_issued(), time.monotonic()
        if issued != self.issued:
            self.issued, self.since = issued, now
        self.store.set(f"beat/{self.rank}", f"{issued} {time.time()}")
        if self.rank == 0 and int(self.store.add("errors", 0)) > 0:
            first = next(r for r in range(1, self.world) if self.store.check([f"error/{r}"]))
            return f"rank {first} of {self.world}: {self.store.get(f'error/{first}').decode()}"
        waited = now - self.since
        if waited <= self.timeout_s:
            return None
        others = {}
        for r in range(self.world):
            if r == self.rank or self.store.check([f"finished/{r}"]):
                continue
            if self.store.check([f"beat/{r}"]):
                issued_r, at = self.store.get(f"beat/{r}").decode().split()
                others[r] = (int(issued_r), float(at))
            else:
                others[r] = None
        stalled = stalled_ranks(issued, others, time.time(), self.timeout_s)
        if not stalled:
            return None  # every rank is alive and as far along: a long phase, not a hang
        who = "; ".join(f"rank {r}: {why}" for r, why in stalled.items())
        return (
            f"{'rank' if len(stalled) == 1 else 'ranks'} {', '.join(map(str, stalled))} of {self.world} stopped "
            f"answering ({who}); rank {self.rank} waited {waited:.0f} s ({TIMEOUT_VARIABLE}="
            f"{self.timeout_s:g}); look for that rank's own error, or raise {TIMEOUT_VARIABLE} if it is only slow"
        )

    def claim_report(self) -> bool:
        """True for the first rank to claim the one printed error line of the run."""
        return int(self.store.add("reported", 1)) == 1


def report_error(message: str) -> bool:
    """Whether this rank prints the user error `message`: under torchrun one rank prints for the run (rank 0 its
    own, or the first error another rank posted), so K ranks give one line. Another rank hands its error to rank 0
    and prints it itself only when no rank printed one within a few seconds."""
    if active is None:
        return True
    try:
        if active.rank != 0:
            active.store.set(f"error/{active.rank}", message)
            active.store.add("errors", 1)
            deadline = time.monotonic() + min(10.0, 3 * active.timeout_s)
            while time.monotonic() < deadline:
                if int(active.store.add("reported", 0)) > 0:
                    return False
                time.sleep(0.05)
        return active.claim_report()
    except Exception:  # the store is gone
        return True
