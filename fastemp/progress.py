"""Progress bars on stderr, drawn only on a terminal: one module-level switch for the process (`--no-progress`)
rather than a parameter threaded through data loading and evaluation, which are also library calls."""

from __future__ import annotations

import sys

from tqdm import tqdm

enabled = True


def decide(requested: bool) -> bool:
    """Bars on iff requested and stderr is a terminal (a redirected log gets none); sets the switch."""
    global enabled
    isatty = getattr(sys.stderr, "isatty", None)
    enabled = bool(requested and isatty is not None and isatty())
    return enabled


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that honours `decide` (`--no-progress`, not a terminal, not rank 0)."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
