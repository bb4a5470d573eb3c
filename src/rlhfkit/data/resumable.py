"""A JSONL file written a block at a time, that a stopped run picks up where it left off.

The rows go to ``OUT.partial`` as they are made, each block flushed to the disk; ``OUT.progress`` records, after
each block, how many units (prompts) are done, how many bytes of ``OUT.partial`` hold them and the counts the
run reports at the end. A run with the same settings finds both and goes on from there: bytes past the
recorded size (a block half written when the run stopped) are cut off first. At the end ``OUT.partial`` is
renamed to ``OUT``, so ``OUT`` is only ever a whole file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhfkit.config import ConfigError
from rlhfkit.models.load import write_atomically
from rlhfkit.trainers.checkpoint import exclusive_lock, fsync


def _with_defaults(old: dict, new: dict, defaults: dict) -> dict:
    """``old`` with each key of ``new`` it lacks added where ``new`` holds that key's default (nested dicts too)."""
    out = dict(old)
    for key, value in new.items():
        if key not in out and key in defaults and value == defaults[key]:
            out[key] = value
        elif isinstance(out.get(key), dict) and isinstance(value, dict) and isinstance(defaults.get(key), dict):
            out[key] = _with_defaults(out[key], value, defaults[key])
    return out


class ResumableJsonl:
    """Rows appended block by block to ``path``'s partial file, used as a context (its lock let go at the end).
    ``settings``: what made the rows (JSON-able); a partial file left by other settings is refused, naming what
    differs, and left alone; so is a second writer of the same file while one runs.

    ``done``: the units a stopped run finished (0 when starting afresh); ``counts``: its totals, added to by
    ``append`` and reported when the file is finished. ``defaults``: settings' values where they are the defaults,
    for a setting that a stopped run's file lacks (one added to rlhfkit since): at its default, it is the same run."""

    def __init__(self, path: str | os.PathLike, settings: dict, defaults: dict | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.state = self.path.with_name(self.path.name + ".progress")
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
        self.defaults = json.loads(json.dumps(defaults or {}, default=str))
        self.done, self.size, self.counts = 0, 0, {}
        self._opened = False  # nothing is written before the first block: a run that fails to start leaves no file
        self._lock()
        try:
            if self.state.exists():
                self._pick_up()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """An exclusive ``flock`` on a hidden ``.OUT.lock`` until ``finish`` or the process ends: a second run
        writing the same file is refused at once (their blocks would interleave). None where locks are not
        supported."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._handle = exclusive_lock(self.path.with_name(f".{self.path.name}.lock"))
        except BlockingIOError:
            raise ConfigError(f"another run is writing {self.path}: wait for it to end, or write to another file"
                              ) from None

    def _pick_up(self) -> None:
        try:
            state = json.loads(self.state.read_text())
            done, size, counts, settings = state["done"], state["bytes"], state["counts"], state["settings"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.state} is not a progress file rlhfkit wrote ({e}): delete it and "
                              f"{self.partial.name} to start over") from e
        settings = _with_defaults(settings, self.settings, self.defaults)
        if settings != self.settings:
            differ = sorted(k for k in settings.keys() | self.settings.keys()
                            if settings.get(k) != self.settings.get(k))
            raise ConfigError(f"{self.partial} holds the first {done} prompts of a run with other settings "
                              f"(differing: {', '.join(differ)}): run it again as it was to go on, or delete "
                              f"{self.partial.name} and {self.state.name} to start over")
        if not self.partial.exists() and self.path.exists() and self.path.stat().st_size == size:
            os.replace(self.path, self.partial)  # stopped after renaming it, before dropping the progress file
        if not self.partial.exists() or self.partial.stat().st_size < size:
            raise ConfigError(f"{self.state} says {done} prompts are done in {self.partial.name}, which is missing "
                              f"or shorter: delete {self.state.name} to start over")
        self.done, self.size, self.counts = done, size, counts

    def _record(self) -> None:
        state = {"done": self.done, "bytes": self.size, "counts": self.counts, "settings": self.settings}
        write_atomically(self.state, lambda tmp: tmp.write_text(json.dumps(state) + "\n"))

    def append(self, rows: list[dict], done: int, **counts: int) -> None:
        """Write ``rows`` to the disk, then record ``done`` units finished and add ``counts`` to the totals."""
        data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
        self._open()
        with open(self.partial, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.done, self.size = done, self.size + len(data)
        self.counts = {k: self.counts.get(k, 0) + counts.get(k, 0) for k in self.counts.keys() | counts.keys()}
        self._record()

    def _open(self) -> None:
        if not self._opened:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            with open(self.partial, "ab") as f:  # a block half written by a stopped run is cut off
                f.truncate(self.size)
            self._opened = True

    def finish(self) -> None:
        """Rename the partial file to the path, and drop the progress file."""
        self._open()
        fsync(self.partial)
        os.replace(self.partial, self.path)
        fsync(self.path.parent)
        self.state.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Let go of the lock (``finish`` does; so does leaving a ``with`` block, however it is left)."""
        if self._handle is not None:
            Path(self._handle.name).unlink(missing_ok=True)
            self._handle.close()  # the lock with it
            self._handle = None

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
