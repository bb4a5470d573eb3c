"""Progress bars: live in a terminal, a line every 30 seconds in a log file (CI, nohup, slurm)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _Bar(tqdm):
    """A bar whose ``set_postfix`` redraws only in a terminal: in a log file the postfix waits for the
    next 30-second line (redrawing it every step would write a line per step, with a stale count)."""

    def set_postfix(self, ordered_dict=None, refresh=None, **kwargs):
        interactive = getattr(self, "mininterval", 30.0) < 30.0  # a disabled bar (other ranks) has none
        super().set_postfix(ordered_dict, refresh=interactive if refresh is None else refresh, **kwargs)


def progress(iterable, desc: str, **kwargs):
    """``tqdm`` with an ETA; when stderr is not a terminal it redraws at most every 30 s, so logs stay readable."""
    interactive = sys.stderr.isatty()
    return _Bar(iterable, desc=desc, dynamic_ncols=True, mininterval=0.1 if interactive else 30.0, **kwargs)
