"""Weights & Biases logging (``train.wandb_project``), against a stand-in ``wandb`` module that records its calls:
what W&B is handed is what metrics.jsonl holds, and a resumed run is a run of its own in the same group."""

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

from rlhfkit.cli import main
from rlhfkit.data.tasks import arithmetic


class Run:
    def __init__(self, settings: dict):
        self.settings, self.logged, self.finished, self.exit_code = settings, [], False, None

    def log(self, data: dict, step: int) -> None:
        assert not self.finished
        self.logged.append((step, data))

    def finish(self, exit_code: int | None = None) -> None:
        self.finished, self.exit_code = True, exit_code


class Table:
    def __init__(self, columns: list, data: list):
        self.columns, self.data = columns, data


@pytest.fixture
def wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs = []
    module.init = lambda **settings: module.runs.append(Run(settings)) or module.runs[-1]
    module.Table = Table
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _logged(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_logs_to_wandb_what_metrics_jsonl_holds_and_a_resume_is_a_run_of_its_own(tiny_model_dir, task_dir,
                                                                                     tmp_path, wandb):
    out = tmp_path / "sft-run"
    cmd = ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
           "--train.batch_size", "4", "--train.log_every", "1", "--train.save_every", "2", "--train.tensorboard",
           "false", "--optim.schedule", "constant", "--train.wandb_project", "demo"]
    assert main([*cmd, "--train.max_steps", "2"]) == 0
    first = wandb.runs[0]
    assert first.settings["project"] == "demo" and first.settings["group"] == first.settings["name"] == "sft-run"
    assert first.settings["config"]["train"]["max_steps"] == 2 and first.settings["dir"] == str(out)
    assert first.settings["reinit"] == "create_new"  # never the user's own open run
    assert first.finished and first.exit_code == 0
    assert [(step, {k: v for k, v in data.items()}) for step, data in first.logged] == [
        (r.pop("step"), r) for r in _logged(out)]
    assert main([*cmd, "--train.max_steps", "3", "--train.resume", "latest"]) == 0  # constant: it may go on
    second = wandb.runs[1]
    assert second.settings["name"] == "sft-run-resumed-2" and second.settings["group"] == "sft-run"
    assert [step for step, _ in second.logged] == [3, 3] and second.finished  # the step, then the final eval
    # the shorter run's final evaluation at 2 is gone from the file: the records are the 3-step run's unstopped
    assert [r["step"] for r in _logged(out)] == [1, 2, 3, 3]


def test_grpo_logs_its_samples_as_a_table(tiny_model_dir, tmp_path, wandb):
    data = tmp_path / "data"
    arithmetic.write(data)
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", tiny_model_dir("llama"), "--prompts", str(data / "prompts_train.jsonl"),
                 "--out", str(out), "--train.max_steps", "1", "--prompts_per_step", "2", "--group_size", "2",
                 "--mini_batch_size", "4", "--generation.max_new_tokens", "4", "--train.tensorboard", "false",
                 "--log_samples", "3", "--train.wandb_project", "demo", "--rewards",
                 "rlhfkit.data.tasks.arithmetic:answer_format,rlhfkit.data.tasks.arithmetic:exact_answer"]) == 0
    tables = [(step, data["samples"]) for step, data in wandb.runs[0].logged if "samples" in data]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [step for step, _ in tables] == [1] and len(tables[0][1].data) == len(samples) == 3
    table = tables[0][1]
    assert {"prompt", "completion", "ended"} <= set(table.columns)
    for row, sample in zip(table.data, samples):
        assert row[table.columns.index("completion")] == sample["completion"]
        assert row[table.columns.index("ended")] == sample["ended"]


def test_without_wandb_installed_the_run_stops_before_training_saying_what_to_install(tiny_model_dir, task_dir,
                                                                                      tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec  # wandb not found, as when it is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "run"
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out",
                 str(out), "--train.max_steps", "1", "--train.wandb_project", "demo"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_a_run_leaving_on_an_error_or_a_stop_is_marked_so(tmp_path, wandb):
    from rlhfkit.trainers.loop import Logger

    def run(leaving):
        try:
            with Logger(tmp_path, tensorboard=False, wandb_project="demo", config={}) as logger:
                logger.rewind(0)
                if leaving is not None:
                    raise leaving
        except (RuntimeError, SystemExit):
            pass
        return wandb.runs[-1].exit_code

    assert [run(e) for e in (None, RuntimeError("boom"), SystemExit(143), SystemExit(None))] == [0, 1, 143, 0]
    try:
        raise KeyError("a caller's handled error")  # a run started inside an except block (a retry) ends well
    except KeyError:
        assert run(None) == 0


def test_wandb_that_cannot_start_stops_the_run_saying_what_to_do(tiny_model_dir, task_dir, tmp_path, capsys,
                                                                 wandb):
    def refuse(**settings):
        raise RuntimeError("No API key configured")

    wandb.init = refuse
    out = tmp_path / "run"
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out",
                 str(out), "--train.max_steps", "1", "--train.wandb_project", "demo",
                 "--train.tensorboard", "false"]) == 2
    err = capsys.readouterr().err
    assert "No API key configured" in err and "WANDB_MODE=offline" in err
    assert (out / "metrics.jsonl").read_text() == ""  # nothing trained
