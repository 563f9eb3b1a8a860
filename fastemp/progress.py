"""Progress bars for every long wait: one switch for the whole process.

Bars go to stderr and are drawn only on a terminal (tqdm's disable=None), so logs and pipes stay
clean; `--no-progress` turns them off everywhere. A module-level switch rather than a parameter
threaded through data loading and evaluation, which are also library calls.
"""

from __future__ import annotations

from tqdm import tqdm

enabled = True


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that honours `--no-progress` and is off when stderr is not a terminal."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
