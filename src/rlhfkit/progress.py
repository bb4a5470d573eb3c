"""Progress bars: live in a terminal, a line every 30 seconds in a log file (CI, nohup, slurm)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable, desc: str, **kwargs):
    """``tqdm`` with an ETA; when stderr is not a terminal it redraws at most every 30 s, so logs stay readable."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=0.1 if interactive else 30.0, **kwargs)
