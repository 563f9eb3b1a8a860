"""Ending a run early and cleanly: Ctrl-C (SIGINT) and SIGTERM stop training between two steps
(docs/reliability.md#ending-a-run-early-signals-and-files-that-fail).

While `handled` is on, a signal during a training iteration (Trainer.train_until; `defer`) is only noted in
`pending`, and training stops after that iteration (under torchrun the ranks agree on it at the next logged
step, Trainer._log). Elsewhere, and the same signal a second time anywhere, stops the command at once.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from .errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
pending = 0  # the signal noted during an iteration, 0 when none
_deferring = False


class Interrupted(UserError):
    """A signal ended the command; `forced`: a repeated signal, which may have come mid-step."""

    def __init__(self, signum: int, forced: bool = False):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.forced, self.exit_code = signum, forced, 128 + signum


def _handle(signum: int, frame) -> None:
    global pending
    if pending == signum or not _deferring:
        raise Interrupted(signum, forced=pending == signum)
    pending = signum


@contextmanager
def handled(defer_always: bool = False):
    """SIGINT and SIGTERM handled as the module says during the body (only the main thread can: elsewhere the
    body runs as it is). defer_always: note every signal (under torchrun no rank may stop alone)."""
    global pending, _deferring
    try:  # a signal the process ignores (nohup, a background job) stays ignored
        before = {s: signal.signal(s, _handle) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # not the main thread
        yield
        return
    pending, _deferring = 0, defer_always
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        pending, _deferring = 0, False


def defer(on: bool) -> None:
    """From now on a signal is noted in `pending`, not raised (the first one); on=False: raised again."""
    global _deferring
    _deferring = on
