"""Checkpoints on a tiny model: the saved state loads without unpickling code, a fresh run does not mix with
an earlier run's checkpoints, a resume keeps the settings it was saved with and never starts past the end,
and a checkpoint is on the disk before it is renamed into place."""

import contextlib
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.advantages import AdaptiveKLController
from rlhfkit.config import ConfigError, OptimConfig, TrainConfig, save_config
from rlhfkit.trainers.checkpoint import CONFIG_FILE, Checkpoints, NonFinite, load_checkpoint, save_checkpoint
from rlhfkit.trainers.loop import (Logger, build_optimizer, prepare_out_dir, release_out_dir, releases_out_dir,
                                  rollout_steps, run)
from rlhfkit.trainers.sft import SFTConfig


class Linear(torch.nn.Linear):
    """A model the checkpoints can save: ``save_pretrained`` writes its weights as a trainer's model would."""

    def save_pretrained(self, path, **kwargs):
        torch.save(self.state_dict(), Path(path) / "weights.pt")


def _trained(steps: int = 2) -> tuple[Linear, dict]:
    """A model and its AdamW + schedule after ``steps`` updates (the optimiser holds moments and a step)."""
    torch.manual_seed(0)
    model = Linear(3, 2)
    optimizer, scheduler = build_optimizer(model.parameters(), OptimConfig(lr=0.1), 10)
    for _ in range(steps):
        model(torch.ones(4, 3)).pow(2).mean().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    return model, {"model": (optimizer, scheduler)}


# ---------------------------------------------------------------------------------------------- 1. loading safely


class RunsCode:
    """Unpickled, it calls ``os.mkdir(path)``: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_trainer_state_holding_a_pickled_object_is_refused_without_running_it(tmp_path):
    model, optimizers = _trained()
    path = save_checkpoint(tmp_path, 2, model, optimizers)
    state = torch.load(path / "trainer_state.pt", weights_only=False)  # written just above
    marker = tmp_path / "ran"
    torch.save({**state, "extra": {"kl_ctl": RunsCode(marker)}}, path / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state\.pt holds objects other than tensors .* not loaded"
                                         r".*posix\.mkdir") as error:
        load_checkpoint(path, *_trained(0))
    assert str(path / "trainer_state.pt") in str(error.value)
    assert not marker.exists()


def test_the_state_of_every_trainer_round_trips_through_the_safe_loader(tmp_path):
    # PPO's extra (its KL controller and shuffling generator; the online methods' is the generator alone),
    # AdamW's moments and step, the schedule and every RNG come back from torch.load(weights_only=True)
    model, optimizers = _trained()
    kl_ctl, generator = AdaptiveKLController(0.1, 6.0, 100), torch.Generator().manual_seed(3)
    kl_ctl.update(9.0, 8)
    extra = {"kl_ctl": kl_ctl.state_dict(), "generator": generator.get_state()}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 2, model, optimizers, extra)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    saved_moments = optimizers["model"][0].state_dict()["state"]

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    fresh, fresh_optimizers = _trained(0)
    state = load_checkpoint(path, fresh, fresh_optimizers)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    assert torch.equal(fresh.weight, model.weight) and state["step"] == 2
    restored = fresh_optimizers["model"][0].state_dict()["state"]
    for i, moments in saved_moments.items():
        for key, value in moments.items():
            assert torch.equal(restored[i][key], value), (i, key)
    assert fresh_optimizers["model"][1].last_epoch == 2
    again = AdaptiveKLController(0.1, 6.0, 100)
    again.load_state_dict(state["extra"]["kl_ctl"])
    assert again.beta == kl_ctl.beta != 0.1
    assert torch.equal(torch.Generator().set_state(state["extra"]["generator"]).get_state(), generator.get_state())


def test_the_count_of_skipped_updates_goes_on_from_the_resumed_checkpoint(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), max_steps=4, tensorboard=False)
    checkpoints = Checkpoints(cfg, *_trained(0))
    nonfinite = NonFinite("skip", checkpoints)
    assert not nonfinite.ok("loss", float("nan"), 1) and not nonfinite.ok("gradient norm", float("inf"), 2)
    checkpoints.save(2)
    assert nonfinite.ok("loss", 1.0, 3) and nonfinite.skipped == 2
    resumed = Checkpoints(dataclasses.replace(cfg, resume="latest"), *_trained(0))
    _, extra = resumed.resume()
    assert NonFinite("skip", resumed).skipped == 2 and "skipped_updates" not in extra  # the trainer's own extra
    assert NonFinite("skip", Checkpoints(cfg, *_trained(0))).skipped == 0  # a fresh run counts from 0


def test_a_failed_save_leaves_the_last_checkpoint_and_no_half_written_copy(tmp_path, monkeypatch):
    cfg = TrainConfig(out=str(tmp_path), save_every=2)
    checkpoints = Checkpoints(cfg, *_trained(2))
    checkpoints.save(2)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save(4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


# ---------------------------------------------------------------------------------------------- 2. a fresh run


def _config(out: Path, **changes) -> SFTConfig:
    cfg = SFTConfig(data="train.jsonl", train=TrainConfig(out=str(out), max_steps=8, batch_size=8, save_every=2))
    sections = {k: v for k, v in changes.items() if "." not in k}
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            sections[section] = dataclasses.replace(sections.get(section, getattr(cfg, section)), **{name: value})
    return dataclasses.replace(cfg, **sections)


def _earlier_run(out: Path, *steps: int, cfg: SFTConfig | None = None) -> None:
    """What an earlier run left in ``out``: checkpoints of ``steps``, each with its copy of the run's config."""
    for step in steps:
        path = out / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.pt").write_bytes(b"")
        if cfg is not None:
            save_config(cfg, path / CONFIG_FILE)


def test_a_fresh_run_refuses_a_directory_holding_an_earlier_run_s_checkpoints(tmp_path):
    _earlier_run(tmp_path, 4, 8)
    with pytest.raises(ConfigError) as error:
        prepare_out_dir(_config(tmp_path), tmp_path)
    message = str(error.value)
    for part in (str(tmp_path / "checkpoints"), "step-8", "--train.resume latest", "another --train.out",
                 "--train.overwrite_output_dir true"):
        assert part in message
    assert not (tmp_path / CONFIG_FILE).exists()  # nothing written


def test_overwrite_output_dir_deletes_the_earlier_checkpoints_and_starts(tmp_path):
    _earlier_run(tmp_path, 4, 8)
    (tmp_path / "checkpoints" / ".tmp-step-10").mkdir()  # a save cut short
    (tmp_path / "checkpoints" / "step-best").mkdir()  # what the user keeps there is not a checkpoint
    (tmp_path / "checkpoints" / "NOTES.txt").write_text("step 4 looked best")
    prepare_out_dir(_config(tmp_path, **{"train.overwrite_output_dir": True}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["NOTES.txt", "step-best"]
    assert (tmp_path / CONFIG_FILE).is_file()


def test_a_file_where_the_checkpoints_go_is_refused_before_the_run_starts(tmp_path):
    (tmp_path / "checkpoints").write_text("notes")
    with pytest.raises(ConfigError, match="checkpoints is a file, where the run keeps its checkpoints"):
        prepare_out_dir(_config(tmp_path), tmp_path)


def test_a_checkpoint_resumed_from_elsewhere_does_not_write_over_the_run_out_holds(tmp_path):
    # run D's step 2 resumed into run C's directory once replaced C's later checkpoints and model, unasked
    cfg = _config(tmp_path / "C")
    _earlier_run(tmp_path / "C", 4, 6, cfg=cfg)
    _earlier_run(tmp_path / "D", 2, cfg=cfg)
    resumed = _config(tmp_path / "C", **{"train.resume": str(tmp_path / "D" / "checkpoints" / "step-2")})
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoints"):
        prepare_out_dir(resumed, tmp_path / "C")
    assert (tmp_path / "C" / "checkpoints" / "step-6").is_dir()
    prepare_out_dir(_config(tmp_path / "E", **{"train.resume": str(tmp_path / "D" / "checkpoints" / "step-2")}),
                    tmp_path / "E")  # into a directory of its own: fine


def test_overwrite_output_dir_does_not_delete_the_model_it_starts_from(tmp_path):
    _earlier_run(tmp_path, 8)
    cfg = _config(tmp_path, **{"train.overwrite_output_dir": True, "model.path": str(tmp_path / "checkpoints" /
                                                                                     "step-8")})
    with pytest.raises(ConfigError, match="lies in .*checkpoints, which --train.overwrite_output_dir true would"):
        prepare_out_dir(cfg, tmp_path)
    assert (tmp_path / "checkpoints" / "step-8").is_dir()
    (tmp_path / "checkpoints" / "step-best").mkdir()  # a copy the user keeps there: not deleted, so fine
    prepare_out_dir(_config(tmp_path, **{"train.overwrite_output_dir": True,
                                         "model.path": tmp_path / "checkpoints" / "step-best"}), tmp_path)


def test_the_quickstart_s_stages_may_rerun_into_their_own_directories(tmp_path):
    from rlhfkit import quickstart

    ppo = quickstart.ppo_config(tmp_path, tmp_path / "ppo", {"prompts_train": "p.jsonl"}, 0, 2, 0.1)
    assert ppo.train.overwrite_output_dir
    assert all(cfg.train.overwrite_output_dir for cfg in quickstart.extra_methods(tmp_path, {
        "preference": "p.jsonl", "unpaired": "u.jsonl"}, 0).values())


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_run_into_the_same_directory_stops_at_once(tmp_path):
    # another process holds the run directory (a run started twice by mistake, or by a scheduler)
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nf.write('4242')\nf.flush()\nprint('held', flush=True)\n"
                               "time.sleep(60)", str(out / ".rlhfkit.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"another run is writing to .*run \(process 4242\): wait for it"):
            prepare_out_dir(_config(out), out)
    finally:
        holder.kill(), holder.wait()
    prepare_out_dir(_config(out), out)  # the lock went with its process
    assert (out / ".rlhfkit.lock").read_text() == str(os.getpid())
    prepare_out_dir(_config(out), out)  # this process holds it: a second run in one Python goes on
    try_lock = [sys.executable, "-c", "import fcntl, sys\nfcntl.flock(open(sys.argv[1], 'a+'), "
                "fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / ".rlhfkit.lock")]
    assert subprocess.run(try_lock, capture_output=True).returncode != 0  # held while the run is on

    @releases_out_dir
    def train(cfg):  # a trainer whose run fails after taking the directory (a notebook's cell)
        prepare_out_dir(cfg, cfg.train.out)
        assert subprocess.run(try_lock, capture_output=True).returncode != 0
        raise ValueError("the model would not load")

    with pytest.raises(ValueError, match="would not load"):
        train(_config(out))
    assert subprocess.run(try_lock, capture_output=True).returncode == 0  # a command run next may write there
    # unlocked before it is closed: a process forked during the run (a reward's worker pool) keeps no lock
    prepare_out_dir(_config(out), out)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=[
        __import__("rlhfkit.trainers.loop", fromlist=["_LOCKS"])._LOCKS[out.resolve()].fileno()])
    try:
        release_out_dir(out)
        assert subprocess.run(try_lock, capture_output=True).returncode == 0
    finally:
        child.kill(), child.wait()
    # a directory removed and made again is locked anew, not taken for the one held before
    prepare_out_dir(_config(out), out)
    shutil.rmtree(out)
    prepare_out_dir(_config(out), out)
    assert subprocess.run(try_lock, capture_output=True).returncode != 0
    release_out_dir()


# ---------------------------------------------------------------------------------------------- 3. resumed settings


def test_a_resume_with_other_settings_is_refused_listing_each_change(tmp_path):
    _earlier_run(tmp_path, 2, cfg=_config(tmp_path, **{"optim.lr": 1e-3}))
    save_config(_config(tmp_path, **{"optim.lr": 1e-3}), tmp_path / CONFIG_FILE)
    before = (tmp_path / CONFIG_FILE).read_text()
    changed = _config(tmp_path, **{"optim.lr": 1e-6, "train.batch_size": 16, "train.max_steps": 9,
                                   "train.resume": "latest", "lora.enabled": True})
    with pytest.raises(ConfigError) as error:
        prepare_out_dir(changed, tmp_path)
    message = str(error.value)
    for part in ("cannot resume " + str(tmp_path / "checkpoints" / "step-2"), "optim.lr: 0.001 → 1e-06",
                 "train.batch_size: 8 → 16", "train.max_steps: 8 → 9", "lora.enabled: false → true",
                 "--train.resume latest", "--model " + str(tmp_path / "checkpoints" / "step-2")):
        assert part in message
    assert "train.resume" not in message.split("(")[1].split(")")[0]  # not listed as a change
    assert (tmp_path / CONFIG_FILE).read_text() == before  # the run's record untouched


def test_a_resume_may_change_where_it_runs_and_what_it_logs_evaluates_and_saves(tmp_path):
    saved = tmp_path / "first"
    _earlier_run(saved, 2, cfg=_config(saved))
    cfg = _config(tmp_path / "copy", **{"train.resume": str(saved / "checkpoints" / "step-2"), "train.device": "cpu",
                                        "train.log_every": 1, "train.eval_every": 3, "train.save_every": 1,
                                        "train.keep_checkpoints": 5, "train.tensorboard": False,
                                        "train.on_nan": "skip", "train.fsdp": "full_shard", "train.grad_accum": 2,
                                        "train.gradient_checkpointing": True})
    prepare_out_dir(cfg, cfg.train.out)
    assert (tmp_path / "copy" / CONFIG_FILE).is_file()
    # a rollout run may fit its memory anew: micro-batches change the memory, not the update
    from rlhfkit.trainers.online import OnlineConfig

    first = OnlineConfig(prompts="p.jsonl", rewards=["m:f"], train=TrainConfig(out=str(tmp_path / "grpo"),
                                                                                max_steps=4))
    _earlier_run(tmp_path / "grpo", 2, cfg=first)
    prepare_out_dir(dataclasses.replace(first, micro_batch_size=2, log_samples=0, train=dataclasses.replace(
        first.train, resume="latest", gradient_checkpointing=True)), tmp_path / "grpo")
    with pytest.raises(ConfigError, match=r"mini_batch_size: 64 → 8"):  # the update's size is the run's
        prepare_out_dir(dataclasses.replace(first, mini_batch_size=8, train=dataclasses.replace(
            first.train, resume="latest")), tmp_path / "grpo")


def test_a_resume_refuses_a_data_file_whose_rows_changed_under_the_same_name(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 30)
    cfg = dataclasses.replace(_config(tmp_path / "run"), data=str(data))
    prepare_out_dir(cfg, tmp_path / "run")
    save_checkpoint(tmp_path / "run", 2, *_trained())
    resumed = _config(tmp_path / "run", **{"train.resume": "latest"})
    resumed = dataclasses.replace(resumed, data=str(data))
    prepare_out_dir(resumed, tmp_path / "run")  # the same rows: resumed
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 20)  # fewer rows, the same name
    with pytest.raises(ConfigError, match=rf"cannot resume .*step-2: data {data} changed since it was saved"):
        prepare_out_dir(resumed, tmp_path / "run")


def test_a_resume_takes_the_same_data_at_another_path_and_refuses_other_data_there(tmp_path):
    # a job restarted where the disk is mounted elsewhere: the rows it trained on, under a new name
    data, moved = tmp_path / "train.jsonl", tmp_path / "mnt" / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 30)
    prepare_out_dir(dataclasses.replace(_config(tmp_path / "run"), data=str(data)), tmp_path / "run")
    save_checkpoint(tmp_path / "run", 2, *_trained())
    moved.parent.mkdir()
    moved.write_text(data.read_text())
    resumed = dataclasses.replace(_config(tmp_path / "run", **{"train.resume": "latest"}), data=str(moved))
    prepare_out_dir(resumed, tmp_path / "run")
    moved.write_text('{"prompt": "a", "completion": "c"}\n' * 30)  # other rows at the new path: another run
    with pytest.raises(ConfigError, match=rf"saved with other settings \(data: {data} → {moved}\)"):
        prepare_out_dir(resumed, tmp_path / "run")


def test_a_setting_added_since_the_checkpoint_changes_nothing_at_its_default(tmp_path):
    # a checkpoint saved before rlhfkit had some setting (its copy lacks the key): the same command resumes it;
    # the setting away from its default is a change
    import yaml

    _earlier_run(tmp_path, 2, cfg=_config(tmp_path))
    copy = tmp_path / "checkpoints" / "step-2" / CONFIG_FILE
    old = yaml.safe_load(copy.read_text())
    del old["optim"]["weight_decay"]
    copy.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"optim.weight_decay: \(not set\) → 0.1"):
        prepare_out_dir(_config(tmp_path, **{"train.resume": "latest", "optim.weight_decay": 0.1}), tmp_path)
    prepare_out_dir(_config(tmp_path, **{"train.resume": "latest"}), tmp_path)


def test_an_sft_run_from_before_every_turn_was_learned_resumes_only_as_it_ran(tmp_path):
    # its copy lacks assistant_turns, and it learned a conversation's last turn alone: the new default ("all")
    # would change what it learns half-way, so it resumes with "last" only; packing, a layout, may change
    import yaml

    _earlier_run(tmp_path, 2, cfg=_config(tmp_path))
    copy = tmp_path / "checkpoints" / "step-2" / CONFIG_FILE
    old = yaml.safe_load(copy.read_text())
    del old["assistant_turns"]
    copy.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"assistant_turns: last → all.*--train.resume latest \(--assistant_turns "
                                          r"last: what runs saved before rlhfkit had assistant_turns did\)"):
        prepare_out_dir(_config(tmp_path, **{"train.resume": "latest"}), tmp_path)
    prepare_out_dir(_config(tmp_path, **{"train.resume": "latest", "assistant_turns": "last", "packing": True}),
                    tmp_path)


def test_a_resume_may_lower_the_generation_batch(tmp_path):
    # memory, not the samples (each prompt has its own seed): what one lowers after running out of memory
    from rlhfkit.config import GenerationConfig
    from rlhfkit.trainers.online import GRPOConfig

    def grpo(**train):
        return GRPOConfig(prompts="p.jsonl", generation=GenerationConfig(batch_size=train.pop("gen", 64)),
                          train=TrainConfig(out=str(tmp_path), max_steps=4, **train))

    _earlier_run(tmp_path, 2, cfg=grpo())
    prepare_out_dir(grpo(resume="latest", gen=8), tmp_path)
    with pytest.raises(ConfigError, match="train.seed: 0 → 1"):
        prepare_out_dir(dataclasses.replace(grpo(resume="latest"), train=TrainConfig(
            out=str(tmp_path), max_steps=4, seed=1, resume="latest")), tmp_path)


def test_a_resume_may_lengthen_a_constant_schedule_run_only(tmp_path):
    # GRPO's default schedule is constant: 4 steps resumed as 6 are the 6-step run (tests/models/test_resume.py)
    from rlhfkit.config import OptimConfig
    from rlhfkit.trainers.online import GRPOConfig

    def grpo(out, steps, schedule="constant", warmup_ratio=0.0):
        return GRPOConfig(prompts="p.jsonl", optim=OptimConfig(schedule=schedule, warmup_ratio=warmup_ratio),
                          train=TrainConfig(out=str(out), max_steps=steps, resume="latest"))

    _earlier_run(tmp_path / "constant", 2, cfg=grpo(tmp_path / "constant", 4))
    prepare_out_dir(grpo(tmp_path / "constant", 6), tmp_path / "constant")
    cosine = tmp_path / "cosine"
    _earlier_run(cosine, 2, cfg=grpo(cosine, 4, "cosine"))
    with pytest.raises(ConfigError, match=r"train.max_steps: 4 → 6; a decaying schedule's length .* is the run's"):
        prepare_out_dir(grpo(cosine, 6, "cosine"), cosine)
    with pytest.raises(ConfigError, match=r"optim.schedule: cosine → constant; train.max_steps: 4 → 6; a decaying"):
        prepare_out_dir(grpo(cosine, 6), cosine)  # a schedule changed on the way is no constant one
    # a constant schedule whose warm-up is a fraction of the run: a longer run warms up for longer
    ratio = tmp_path / "ratio"
    _earlier_run(ratio, 2, cfg=grpo(ratio, 4, warmup_ratio=0.5))
    with pytest.raises(ConfigError, match=r"train.max_steps: 4 → 6; a decaying schedule's length \(or a warmup_ratio"):
        prepare_out_dir(grpo(ratio, 6, warmup_ratio=0.5), ratio)


def test_a_checkpoint_without_its_config_is_resumed_unchecked(tmp_path):
    # (saved by an rlhfkit from before checkpoints held their config) no settings to compare: a changed lr goes
    # through, the checkpoint stays to be resumed, and the run's config is this one
    _earlier_run(tmp_path, 2)
    prepare_out_dir(_config(tmp_path, **{"optim.lr": 1e-6, "train.resume": "latest"}), tmp_path)
    assert (tmp_path / "checkpoints" / "step-2" / "trainer_state.pt").exists()
    assert "lr: 1.0e-06" in (tmp_path / CONFIG_FILE).read_text()


# ---------------------------------------------------------------------------------------------- 4. past the end


def _loss(model):
    return lambda idx: (model(torch.ones(len(idx), 3)).pow(2).mean(), len(idx), {})


def _run(out: Path, evaluate=None, **train) -> None:
    model = Linear(3, 2)
    logger = Logger(out, tensorboard=False)
    try:
        run(model=model, loss_fn=_loss(model), n_examples=8, cfg=TrainConfig(out=str(out), batch_size=4, **train),
            optim=OptimConfig(lr=0.1), logger=logger, evaluate=evaluate)
    finally:
        logger.close()


def test_a_finished_run_run_again_logs_its_final_evaluation_once(tmp_path):
    # a job scheduler restarting a finished run (resume auto) appended a second final-evaluation row
    evaluations = [lambda: {"eval/loss": 0.5}, lambda: {"eval/loss": 0.25}]
    _run(tmp_path, evaluate=evaluations[0], max_steps=4, save_every=2, log_every=2)
    _run(tmp_path, evaluate=evaluations[1], max_steps=4, save_every=2, log_every=2, resume="auto")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("eval/loss")) for r in logged] == [(2, None), (4, None), (4, 0.25)]


def test_resuming_a_checkpoint_past_the_run_s_last_step_is_an_error(tmp_path):
    _run(tmp_path, max_steps=5, save_every=5)
    with pytest.raises(ConfigError, match=r"step-5 is at step 5, past this run's 3 steps"):
        _run(tmp_path, max_steps=3, resume="latest")
    _run(tmp_path, max_steps=5, resume="latest")  # at the end: a finished run, nothing left to do


def test_the_rollout_loop_refuses_a_checkpoint_past_its_last_step(tmp_path):
    _run(tmp_path, max_steps=5, save_every=5)
    model, optimizers = _trained(0)
    cfg = TrainConfig(out=str(tmp_path), max_steps=3, resume="latest", tensorboard=False)
    checkpoints = Checkpoints(cfg, model, optimizers)
    start, _ = checkpoints.resume()
    steps = []
    with pytest.raises(ConfigError, match="past this run's 3 steps"):
        rollout_steps(cfg, "ppo", start, steps.append, checkpoints, Logger(tmp_path, tensorboard=False),
                      save=lambda: steps.append("saved"))
    assert not steps


def test_the_rollout_loop_saves_the_model_before_its_final_evaluation_and_logs_every_evaluation(tmp_path):
    # a failing (or interrupted) final evaluation lost the trained policy: it was saved after it
    model, optimizers = _trained(0)
    cfg = TrainConfig(out=str(tmp_path), max_steps=4, log_every=2, eval_every=3, tensorboard=False)
    events = []

    def evaluate():
        events.append("evaluate")
        if len(events) > 5:  # the final evaluation
            raise RuntimeError("a reward function failed on the held-out prompts")
        return {"eval/reward": 1.0}

    with pytest.raises(RuntimeError, match="held-out"):
        rollout_steps(cfg, "ppo", 0,
                      lambda step: events.append(step) or {"rollout/score": float(step), "train/lr": step / 10},
                      Checkpoints(cfg, model, optimizers), Logger(tmp_path, tensorboard=False),
                      save=lambda: events.append("saved"), evaluate=evaluate)
    assert events == [0, 1, 2, "evaluate", 3, "saved", "evaluate"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # step 3's evaluation, between the logged steps 2 and 4, is logged at its own step
    assert [(r["step"], "eval/reward" in r) for r in logged] == [(2, False), (3, True), (4, False)]
    # a logged step holds the means over the steps since the last log, as the supervised loop logs
    assert [r.get("rollout/score") for r in logged] == [0.5, None, 2.5]
    assert [r.get("train/lr") for r in logged] == [0.1, None, 0.3]  # a rate: the step's own, the last


def test_a_rollout_run_resumed_inside_a_logging_window_logs_the_means_of_all_of_it(tmp_path):
    # a run killed after step 2's checkpoint; the resumed run's step-4 row once held the means of steps 3-4 alone
    def step_fn(fail_at=None):
        def step(i):
            if i == fail_at:
                raise RuntimeError("killed")
            return {"rollout/score": float(i)}
        return step

    for resume, fail_at in (("", 2), ("latest", None)):
        cfg = TrainConfig(out=str(tmp_path), max_steps=4, log_every=4, save_every=1, tensorboard=False, resume=resume)
        model, optimizers = _trained(0)
        checkpoints = Checkpoints(cfg, model, optimizers)
        start, _ = checkpoints.resume()
        with contextlib.suppress(RuntimeError):
            rollout_steps(cfg, "ppo", start, step_fn(fail_at), checkpoints, Logger(tmp_path, tensorboard=False),
                          save=lambda: None)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [{"step": 4, "rollout/score": 1.5}]  # (0 + 1 + 2 + 3) / 4


def test_the_supervised_loop_saves_the_model_before_its_final_evaluation(tmp_path):
    # SFT, the reward model and the DPO family saved after run returned: a failing (or interrupted) final
    # evaluation lost a run without checkpoints
    torch.manual_seed(0)
    model, events = Linear(3, 2), []

    def evaluate():
        events.append("evaluate")
        if events.count("evaluate") > 1:  # the final evaluation
            raise KeyboardInterrupt
        return {"eval/loss": 1.0}

    def loss_fn(indices):
        events.append("step")
        return model(torch.ones(len(indices), 3)).pow(2).mean(), len(indices), {}

    cfg = TrainConfig(out=str(tmp_path), max_steps=3, batch_size=2, eval_every=2, tensorboard=False)
    with pytest.raises(KeyboardInterrupt):
        run(model=model, loss_fn=loss_fn, n_examples=4, cfg=cfg, optim=OptimConfig(lr=0.1),
            logger=Logger(tmp_path, tensorboard=False), evaluate=evaluate, save=lambda: events.append("saved"))
    assert events == ["step", "step", "evaluate", "step", "saved", "evaluate"]


# ---------------------------------------------------------------------------------------------- 5. durability


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads which file a descriptor is from /proc")
def test_a_checkpoint_s_files_and_directory_reach_the_disk_before_its_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(src, dst):
        events.append(("replace", str(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    model, optimizers = _trained()
    save_checkpoint(tmp_path, 2, model, optimizers)
    tmp = str(tmp_path / "checkpoints" / ".tmp-step-2")
    renamed = events.index(("replace", tmp))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    assert {f"{tmp}/trainer_state.pt", f"{tmp}/weights.pt", tmp} <= synced
    assert ("fsync", str(tmp_path / "checkpoints")) in events[renamed:]  # the rename itself


def test_a_second_signal_stops_at_once():
    # the first asks for a stop after the step; a second one (an impatient Ctrl-C) is no longer swallowed
    import signal

    from rlhfkit.trainers.checkpoint import StopRequest

    with StopRequest() as stop:
        stop.handle(signal.SIGINT, None)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
        with pytest.raises(SystemExit, match="second signal"):
            stop.handle(signal.SIGTERM, None)


def test_a_folder_named_like_a_checkpoint_but_not_one_is_left_alone(tmp_path):
    (tmp_path / "checkpoints" / "step-best").mkdir(parents=True)  # a user's copy: not a step number
    prepare_out_dir(_config(tmp_path), tmp_path)
    assert (tmp_path / "checkpoints" / "step-best").is_dir()


def test_a_checkpoint_whose_optimiser_groups_differ_is_refused_naming_them(tmp_path):
    # saved with one group (as before biases and norms were left undecayed), resumed into two
    model, optimizers = _trained()
    path = save_checkpoint(tmp_path, 2, model, optimizers)
    fresh = Linear(3, 2)
    decayed = {"model": build_optimizer(fresh.parameters(), OptimConfig(lr=0.1, weight_decay=0.1), 10)}
    with pytest.raises(ValueError, match=r"its model optimiser has 1 parameter groups, this run's 2.*start the run"):
        load_checkpoint(path, fresh, decayed)
