"""The block-by-block JSONL writer `generate --out` resumes from."""

import json

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.data.resumable import ResumableJsonl


def test_blocks_counts_and_a_torn_block_survive_a_stop(tmp_path):
    out = tmp_path / "o.jsonl"
    with ResumableJsonl(out, {"seed": 0}) as file:
        assert file.done == 0 and not file.partial.exists()  # nothing written before the first block
        file.append([{"a": 1}, {"a": 2}], 2, written=2, left_out=1)
        file.append([], 3, written=0, left_out=1)
    with file.partial.open("a") as f:  # what a stop in the middle of the next block's write leaves
        f.write('{"a": 3}\n{"a"')
    with ResumableJsonl(out, {"seed": 0}) as again:  # the run, started again
        assert (again.done, again.counts) == (3, {"written": 2, "left_out": 2})
        again.append([{"a": 4}], 4, written=1)
        again.finish()
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]  # no partial, progress or lock file left


def test_nothing_to_write_still_leaves_the_file(tmp_path):
    with ResumableJsonl(tmp_path / "o.jsonl", {}) as file:
        file.finish()
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_a_second_writer_of_the_same_file_is_refused_while_the_first_runs(tmp_path):
    with ResumableJsonl(tmp_path / "o.jsonl", {}) as first:
        first.append([{"a": 1}], 1)
        with pytest.raises(ConfigError, match="another run is writing .*o.jsonl: wait for it to end"):
            ResumableJsonl(tmp_path / "o.jsonl", {})
        with ResumableJsonl(tmp_path / "p.jsonl", {}):  # another file in the same directory is not held
            pass
    with ResumableJsonl(tmp_path / "o.jsonl", {}) as again:  # the first let go
        assert again.done == 1


def test_a_stop_after_the_file_is_whole_leaves_it_whole(tmp_path, monkeypatch):
    # stopped between renaming the partial file and dropping the progress file: run again, it finds the whole file
    # (the size recorded) and finishes without sampling anything
    from pathlib import Path

    out = tmp_path / "o.jsonl"
    real = Path.unlink

    def stop(path, missing_ok=False):
        if path.name == "o.jsonl.progress":
            raise KeyboardInterrupt
        real(path, missing_ok=missing_ok)

    with ResumableJsonl(out, {}) as file:
        file.append([{"a": 1}, {"a": 2}], 2)
        monkeypatch.setattr(Path, "unlink", stop)
        with pytest.raises(KeyboardInterrupt):
            file.finish()
        monkeypatch.setattr(Path, "unlink", real)
    assert out.exists() and (tmp_path / "o.jsonl.progress").exists()
    with ResumableJsonl(out, {}) as again:
        assert again.done == 2
        again.finish()
    assert out.read_text() == '{"a": 1}\n{"a": 2}\n' and not (tmp_path / "o.jsonl.progress").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.state.write_text("{not json"), "o.jsonl.progress is not a progress file rlhfkit wrote"),
    (lambda f: f.partial.unlink(), "says 1 prompts are done in o.jsonl.partial, which is missing or shorter"),
    (lambda f: None, "holds the first 1 prompts of a run with other settings (differing: n, seed)"),
])
def test_a_progress_file_that_does_not_fit_is_refused_and_kept(tmp_path, damage, message):
    with ResumableJsonl(tmp_path / "o.jsonl", {"seed": 0, "model": "m"}) as file:
        file.append([{"a": 1}], 1)
    damage(file)
    settings = {"seed": 1, "model": "m", "n": 2} if "other settings" in message else {"seed": 0, "model": "m"}
    with pytest.raises(ConfigError) as e:
        ResumableJsonl(tmp_path / "o.jsonl", settings)
    assert message in str(e.value) and file.state.exists()
    assert not (tmp_path / ".o.jsonl.lock").exists()  # the refused run let go of its lock


def test_a_setting_added_since_a_stop_is_the_same_run_at_its_default(tmp_path):
    # a stopped run's file from before a setting existed: at its default, the run goes on; at another value, not
    out = tmp_path / "o.jsonl"
    with ResumableJsonl(out, {"seed": 0, "model": {"path": "x"}}) as file:
        file.append([{"a": 1}], 1)
    defaults = {"seed": 0, "min_margin": 0.0, "model": {"path": "", "chat_template": ""}}
    with ResumableJsonl(out, {"seed": 0, "min_margin": 0.0, "model": {"path": "x", "chat_template": ""}},
                        defaults) as again:
        assert again.done == 1
    with pytest.raises(ConfigError, match="differing: min_margin"):
        ResumableJsonl(out, {"seed": 0, "min_margin": 0.5, "model": {"path": "x", "chat_template": ""}}, defaults)
    with pytest.raises(ConfigError, match="differing: model"):
        ResumableJsonl(out, {"seed": 0, "min_margin": 0.0, "model": {"path": "x", "chat_template": "t"}}, defaults)
