"""The block-by-block JSONL writer `generate --out` resumes from."""

import json

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.data.resumable import ResumableJsonl


def test_blocks_counts_and_a_torn_block_survive_a_stop(tmp_path):
    out = tmp_path / "o.jsonl"
    file = ResumableJsonl(out, {"seed": 0})
    assert file.done == 0 and not file.partial.exists()  # nothing written before the first block
    file.append([{"a": 1}, {"a": 2}], 2, written=2, left_out=1)
    file.append([], 3, written=0, left_out=1)
    with file.partial.open("a") as f:  # what a stop in the middle of the next block's write leaves
        f.write('{"a": 3}\n{"a"')
    again = ResumableJsonl(out, {"seed": 0})  # the run, started again
    assert (again.done, again.counts) == (3, {"written": 2, "left_out": 2})
    again.append([{"a": 4}], 4, written=1)
    again.finish()
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert not again.partial.exists() and not again.state.exists()


def test_nothing_to_write_still_leaves_the_file(tmp_path):
    file = ResumableJsonl(tmp_path / "o.jsonl", {})
    file.finish()
    assert (tmp_path / "o.jsonl").read_text() == ""


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.state.write_text("{not json"), "o.jsonl.progress is not a progress file rlhfkit wrote"),
    (lambda f: f.partial.unlink(), "says 1 prompts are done in o.jsonl.partial, which is missing or shorter"),
    (lambda f: None, "holds the first 1 prompts of a run with other settings (differing: n, seed)"),
])
def test_a_progress_file_that_does_not_fit_is_refused_and_kept(tmp_path, damage, message):
    file = ResumableJsonl(tmp_path / "o.jsonl", {"seed": 0, "model": "m"})
    file.append([{"a": 1}], 1)
    damage(file)
    settings = {"seed": 1, "model": "m", "n": 2} if "other settings" in message else {"seed": 0, "model": "m"}
    with pytest.raises(ConfigError) as e:
        ResumableJsonl(tmp_path / "o.jsonl", settings)
    assert message in str(e.value) and file.state.exists()
