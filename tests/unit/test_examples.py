"""Every example config parses into its command's config (no stale keys)."""

from pathlib import Path

import pytest

from rlhfkit.cli import COMMANDS
from rlhfkit.config import from_dict, load_yaml

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_there_is_an_example_per_command():
    assert {p.stem for p in EXAMPLES} >= set(COMMANDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses(path):
    make_cls = COMMANDS[path.stem][0]
    cls = make_cls if isinstance(make_cls, type) else make_cls()
    cfg = from_dict(cls, load_yaml(path), source=str(path))
    assert type(cfg) is cls
