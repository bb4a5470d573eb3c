"""Built-in tasks generated from a seed: `describe` (preferences, hidden gold reward) and
`arithmetic` (verifiable reward)."""

from __future__ import annotations

import json
from pathlib import Path


def write_splits(splits: dict[str, list[dict]], out_dir: str | Path) -> dict[str, Path]:
    """Write each split as ``<name>.jsonl`` (and ``meta`` as ``meta.json``) under ``out_dir``; returns name → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        path = out / ("meta.json" if name == "meta" else f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            if name == "meta":
                json.dump(rows[0], f, indent=2)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        paths[name] = path
    return paths
