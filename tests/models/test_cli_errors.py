"""What a user's mistakes get from the command line: one line naming what to fix, exit code 2, no traceback;
and the chat-format preference data the loaders accept runs through the reward model's commands."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.cli import main
from rlhfkit.models.load import load_tokenizer

CHAT_PAIRS = [{"chosen": [{"role": "user", "content": f"Describe the {thing}."},
                          {"role": "assistant", "content": f"The {thing} is lovely and calm."}],
               "rejected": [{"role": "user", "content": f"Describe the {thing}."},
                            {"role": "assistant", "content": f"The {thing} is awful."}]}
              for thing in ("cat", "river", "bridge", "lake", "tree", "house", "road", "hill")]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/model", "model directory /nonexistent/model does not exist"),
    ("", "no model given: pass --model DIR"),
    ("EMPTY", "is not a saved model: a Hugging Face model directory holds config.json"),
    ("runs/my-sft-mergd", "model directory runs/my-sft-mergd does not exist"),  # a typo: runs/ is a folder here
])
def test_a_model_path_that_names_nothing_says_so(task_dir, tmp_path, capsys, monkeypatch, model, message):
    if model == "EMPTY":
        model = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my-sft").mkdir(parents=True)  # a folder of runs: runs/NAME is a path, not a hub name
    (tmp_path / "runs" / "my-sft" / "rlhfkit_config.yaml").write_text("{}\n")  # (trying the hub took ~50 s offline)
    rc = main(["sft", "--model", model, "--data", str(task_dir / "sft.jsonl"), "--out", str(tmp_path / "o")])
    assert message in _one_line_error(capsys, rc)


def test_a_model_directory_transformers_cannot_load_says_which(tiny_model_dir, task_dir, tmp_path, capsys):
    broken = tmp_path / "no-weights"  # config and tokenizer, the weights left out of a copy
    shutil.copytree(tiny_model_dir("llama"), broken, ignore=shutil.ignore_patterns("*.safetensors"))
    rc = main(["sft", "--model", str(broken), "--data", str(task_dir / "sft.jsonl"), "--out", str(tmp_path / "o")])
    assert f"could not load the model {broken}: " in _one_line_error(capsys, rc)


def test_a_model_path_from_yaml_starting_at_home_is_expanded(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "tiny")
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  path: ~/tiny\n")
    assert main(["sft", "--config", str(config), "--data", str(task_dir / "sft.jsonl"), "--out", str(tmp_path / "o"),
                 "--train.max_steps", "1", "--train.tensorboard", "false", "--eval_fraction", "0"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_ppo_s_critic_directory_is_refused_as_a_model_naming_the_actor(tmp_path, capsys):
    critic = tmp_path / "ppo" / "critic"  # an adapter and a value head, no tokenizer: it writes no text
    critic.mkdir(parents=True)
    (critic / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base")}))
    (critic / "value_head.safetensors").write_bytes(b"")
    rc = main(["export", "--model", str(critic), "--out", str(tmp_path / "merged")])
    assert f"{critic} is PPO's critic (an adapter and a value head): it scores states and writes no text; give the " \
           f"actor's directory, {tmp_path / 'ppo'}" in _one_line_error(capsys, rc)


def test_ppo_s_full_critic_is_refused_as_a_reward_model(tmp_path, capsys):
    # mode separate saves it as a classifier with score statistics, like a reward model: eval-rm had scored with it
    run = tmp_path / "ppo"
    (run / "critic").mkdir(parents=True)
    (run / "critic" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    (run / "rlhfkit_config.yaml").write_text("mode: separate\n")
    rc = main(["eval-rm", "--model", str(run / "critic"), "--data", str(tmp_path / "pairs.jsonl")])
    assert f"{run / 'critic'} is PPO's critic: a value model trained to predict returns" in _one_line_error(capsys, rc)


def test_ctrl_c_is_one_line_and_says_how_generate_goes_on(monkeypatch, capsys, tmp_path):
    from rlhfkit import cli

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "generate", (cli.GenerateConfig, interrupted, ""))
    out = tmp_path / "x.jsonl"
    assert main(["generate", "--model", "m", "--prompt", "Hi", "--out", str(out)]) == 130
    err = capsys.readouterr().err  # stopped before its first block: nothing to go on from
    assert err.strip() == "rlhfkit generate: stopped by Ctrl-C"
    (tmp_path / "x.jsonl.partial").write_text("")
    assert main(["generate", "--model", "m", "--prompt", "Hi", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"rlhfkit generate: stopped by Ctrl-C; the same command again goes on from {out}.partial" in err
    assert "Traceback" not in err


def test_no_data_file_says_to_pass_one(tiny_model_dir, tmp_path, capsys):
    rc = main(["sft", "--model", tiny_model_dir("llama"), "--out", str(tmp_path / "o")])
    assert "no data file given: pass --data FILE" in _one_line_error(capsys, rc)


def test_a_refusal_is_one_line_with_the_traceback_on_request(tiny_model_dir, task_dir, tmp_path, capsys,
                                                             monkeypatch):
    pickled = tmp_path / "pickled"  # .bin weights only: refused unless model.allow_pickle
    shutil.copytree(tiny_model_dir("llama"), pickled)
    (pickled / "model.safetensors").unlink()
    weights = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).state_dict()
    torch.save(weights, pickled / "pytorch_model.bin")
    args = ["sft", "--model", str(pickled), "--data", str(task_dir / "sft.jsonl"), "--out", str(tmp_path / "o")]
    err = _one_line_error(capsys, main(args))
    assert "holds only pickled weights" in err and "RLHFKIT_TRACEBACK=1" in err
    monkeypatch.setenv("RLHFKIT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="pickled weights"):
        main(args)


def test_a_chat_template_that_refuses_a_row_names_the_file(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "no-system"  # a template that refuses system turns, as Gemma's does
    shutil.copytree(tiny_model_dir("qwen2"), model)
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    tokenizer.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}."}, {"role": "assistant", "content": "Hello."}]}
            for i in range(30)]
    rows[17]["messages"].insert(0, {"role": "system", "content": "Be kind."})
    rows[17]["score"] = float("nan")  # a NaN in another column: the row still found (NaN is not NaN)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for held_out in ("0", "0.5"):  # the row trained on, or held out (named by its number in the file either way)
        rc = main(["sft", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"),
                   "--eval_fraction", held_out, "--train.overwrite_output_dir", "true"])
        err = _one_line_error(capsys, rc)
        assert f"{data}, row 17 (line 18): this row cannot be encoded with this model's tokenizer" in err, err
        assert "System role not" in err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
                                         "rejected": [{"role": "assistant", "content": "Go."}]}) + "\n"
                             for r in rows[15:]))
    rc = main(["dpo", "--model", str(model), "--data", str(pairs), "--out", str(tmp_path / "d")])
    assert f"{pairs}, row 2 (line 3): this row cannot be encoded" in _one_line_error(capsys, rc)


def test_reward_model_trains_and_evaluates_on_chat_pairs(tiny_model_dir, tmp_path, capsys):
    # chat pairs (whole conversations; the shared turns become the prompt) load for rm and eval-rm alike; the
    # gold reward belongs to the built-in task, so eval-rm reports accuracy alone on other data
    data = tmp_path / "chat_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_PAIRS))
    # the built-in task's meta.json beside them: its label-noise ceiling is not these pairs'
    (tmp_path / "meta.json").write_text(json.dumps({"label_accuracy_ceiling": 0.78}))
    out = tmp_path / "rm"
    assert main(["rm", "--model", tiny_model_dir("qwen2"), "--data", str(data), "--out", str(out),
                 "--train.max_steps", "2", "--train.batch_size", "4", "--train.tensorboard", "false"]) == 0
    report = tmp_path / "new" / "dir" / "rm_eval.json"
    assert main(["eval-rm", "--model", str(out), "--data", str(data), "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy vs labels" in printed and "agreement with gold" not in printed
    result = json.loads(report.read_text())
    assert result["n_pairs"] == 8 and 0 <= result["accuracy"] <= 1 and result["gold_agreement"] is None
    assert "accuracy_ceiling" not in result and "ceiling the label noise allows" not in printed


def test_a_device_name_torch_does_not_know_says_which_are(task_dir, tiny_model_dir, tmp_path, capsys):
    rc = main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"),
               "--train.device", "gpu", "--out", str(tmp_path / "o")])
    assert "train.device 'gpu' is not a device: use auto, cpu, cuda or cuda:N" in _one_line_error(capsys, rc)
    if not torch.cuda.is_available():  # a CUDA device this torch cannot reach: said, not an AssertionError
        rc = main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"),
                   "--train.device", "cuda", "--out", str(tmp_path / "o")])
        assert "train.device 'cuda': this torch sees no CUDA GPU" in _one_line_error(capsys, rc)


def test_training_from_an_sft_adapter_says_to_merge_it(tiny_model_dir, task_dir, tmp_path, capsys):
    # with LoRA on, sft and dpo wrapped the adapter in a second one and crashed; off, they trained nothing
    adapter = tmp_path / "sft"  # what `rlhfkit sft --lora.enabled true` leaves
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out",
                 str(adapter), "--lora.enabled", "true", "--lora.r", "2", "--train.max_steps", "1",
                 "--train.batch_size", "4", "--train.tensorboard", "false"]) == 0
    capsys.readouterr()
    for command, data, what in [("rm", "preference.jsonl", "a reward model"), ("sft", "sft.jsonl", "SFT"),
                                ("dpo", "preference.jsonl", "DPO"), ("kto", "unpaired.jsonl", "KTO")]:
        for lora in ("true", "false"):
            rc = main([command, "--model", str(adapter), "--data", str(task_dir / data), "--lora.enabled", lora,
                       "--out", str(tmp_path / f"out-{command}")])
            assert (f"{adapter} is a LoRA adapter directory: {what} starts from a full model; merge it first "
                    f"(rlhfkit export --model {adapter} --out DIR)") in _one_line_error(capsys, rc)
            assert not (tmp_path / f"out-{command}").exists()  # refused before the run makes its directory


def test_eval_scores_the_user_s_prompts_with_their_rewards_and_refuses_the_gold_one(tiny_model_dir, task_dir,
                                                                                   tmp_path, capsys, monkeypatch):
    # the built-in task's gold reward scored any other prompts 0 without a word
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "Q: 2+2?\\nA:", "answer": "4"}\n{"prompt": "Q: 3+3?\\nA:", "answer": "6"}\n')
    long = tmp_path / "with_a_long_one.jsonl"  # past the 256 positions: an IndexError in gpt2's lookup
    long.write_text(prompts.read_text() + json.dumps({"prompt": "the cat " * 200, "answer": "1"}) + "\n")
    (tmp_path / "user_eval_rewards.py").write_text(  # a name of its own: a module stays in sys.modules
        "def answer_length(prompts, completions, answer, **_):\n"
        "    return [float(len(c)) + len(a) for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tiny_model_dir("llama")
    rc = main(["eval", "--model", model, "--prompts", str(prompts)])
    assert "2 of 2 prompts are not the built-in describe task's" in _one_line_error(capsys, rc) and rc == 2
    from rlhfkit.data.tasks import arithmetic

    sums = tmp_path / "sums.jsonl"  # the other built-in task's: its reward named
    sums.write_text("".join(json.dumps(r) + "\n" for r in arithmetic.all_prompts()[:3]))
    rc = main(["eval", "--model", model, "--prompts", str(sums)])
    assert "its reward is --rewards rlhfkit.data.tasks.arithmetic:exact_answer" in _one_line_error(capsys, rc)
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", tiny_model_dir("gpt2"), "--prompts", str(long), "--rewards",
                 "user_eval_rewards:answer_length", "--generation.max_new_tokens", "5", "--out", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert figures["n"] == 2 and figures["eval/reward"] == figures["eval/reward/answer_length"] >= 1.0
    out, err = capsys.readouterr()
    assert "answer_length:" in out and "1 of 3 prompts exceed the 250 positions the model has left" in err
    # every completion too, as --help says, with each reward's value
    samples = figures["samples"]
    assert [s["prompt"] for s in samples] == ["Q: 2+2?\nA:", "Q: 3+3?\nA:"]
    assert [s["reward"] for s in samples] == [len(s["completion"]) + 1.0 for s in samples]
    assert all(s["rewards"] == {"answer_length": s["reward"]} for s in samples)
    # a row without the column the reward takes: named before sampling, by eval and by generate, and its inputs
    # when the reward, which cannot take None, fails on it
    gap = tmp_path / "gap.jsonl"
    gap.write_text(prompts.read_text() + json.dumps({"prompt": "Q: 1+1?\nA:"}) + "\n")
    for command in (["eval", "--out", str(report)], ["generate", "--out", str(tmp_path / "gen.jsonl")]):
        with pytest.warns(UserWarning, match=rf"1 of 3 rows have no 'answer' \(first: {gap}, row 2 \(line 3\)"):
            rc = main([*command, "--model", model, "--prompts", str(gap), "--rewards",
                       "user_eval_rewards:answer_length", "--generation.max_new_tokens", "3"])
        assert "prompt 'Q: 1+1?\\nA:', answer None)" in _one_line_error(capsys, rc)
    assert main(["eval", "--model", model, "--prompts", str(task_dir / "prompts_test.jsonl"), "--limit", "2",
                 "--generation.max_new_tokens", "4"]) == 0  # the task's own prompts: the gold reward


def test_sequences_past_the_model_s_positions_are_refused_or_dropped_before_training(tiny_model_dir, task_dir,
                                                                                     tmp_path, capsys):
    # the tiny models have 256 positions: an embedding lookup past them failed mid-run with an IndexError
    model = tiny_model_dir("gpt2")
    rc = main(["sft", "--model", model, "--data", str(task_dir / "sft.jsonl"), "--max_length", "300",
               "--out", str(tmp_path / "sft")])
    assert f"max_length 300 is over the 256 positions {model} has" in _one_line_error(capsys, rc)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat " * 200}) + "\n" + json.dumps({"prompt": "the cat"}) + "\n")
    rc = main(["grpo", "--model", model, "--prompts", str(prompts), "--rewards", "x:y",
               "--generation.max_new_tokens", "256", "--out", str(tmp_path / "grpo")])
    assert "max_new_tokens 256 leaves no room for a prompt in the 256 positions" in _one_line_error(capsys, rc)
    assert not (tmp_path / "grpo").exists()  # refused before the run directory is made
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.collate import drop_long_prompts
    from rlhfkit.models.load import load_tokenizer, prompt_room

    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    kept = drop_long_prompts(rows, load_tokenizer(model), 0, "prompts.jsonl",
                             room=prompt_room(ModelConfig(path=model), 56))
    assert kept == [{"prompt": "the cat"}]
    # 256 positions less 56 sampled tokens and the EOS a scorer appends to a row cut off at 56
    assert "1 of 2 prompts exceed the 199 positions the model has left" in capsys.readouterr().err
    from rlhfkit.data.formats import DataError

    with pytest.raises(DataError, match="every prompt exceeds the 199 positions the model has left beside "
                                        "generation.max_new_tokens; lower generation.max_new_tokens or shorten"):
        drop_long_prompts(rows[:1], load_tokenizer(model), 0, "prompts.jsonl",
                          room=prompt_room(ModelConfig(path=model), 56))


def test_a_rope_scaling_in_the_config_stretches_the_positions(tiny_model_dir, tmp_path):
    import shutil

    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import position_limit

    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert position_limit(ModelConfig(path=str(tmp_path / "m"))) == 256
    for scaling, limit in [({"rope_type": "linear", "factor": 4.0}, 1024),  # vicuna-16k style
                           ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, 1024),
                           ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 256)]:
        config.pop("rope_parameters", None)  # Llama 3.1: the config's positions are already the stretched ones
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
        assert position_limit(ModelConfig(path=str(tmp_path / "m"))) == limit, scaling


def test_a_reward_directory_that_is_no_saved_model_says_so(tiny_model_dir, task_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", str(tmp_path / "empty"), "--prompts",
               str(task_dir / "prompts_train.jsonl"), "--out", str(tmp_path / "ppo")])
    assert f"{tmp_path / 'empty'} is not a saved reward model" in _one_line_error(capsys, rc)


def test_a_hub_name_whose_organisation_is_a_folder_here_is_still_tried_on_the_hub(tmp_path, capsys, monkeypatch):
    from rlhfkit.models.load import check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen").mkdir()  # e.g. another model downloaded with --local-dir Qwen/...
    check_model_path("Qwen/Qwen2.5-0.5B")  # passed on to from_pretrained, with a word first
    assert "Qwen/Qwen2.5-0.5B is not a directory here (though Qwen is): trying it as a hub name" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("command, advantage, instead", [
    ("grpo", "rloo", "rloo runs as `rlhfkit rloo`"),
    ("rloo", "dr_grpo", "dr_grpo runs as `rlhfkit grpo --advantage dr_grpo`"),
    ("grpo", "reinforce_pp", "reinforce_pp runs as `rlhfkit reinforce-pp`"),
])
def test_another_command_s_advantage_names_that_command(command, advantage, instead, capsys):
    assert main([command, "--advantage", advantage]) == 2
    err = capsys.readouterr().err
    assert "expected one of" in err and err.rstrip().endswith(instead)
    assert main(["rloo", "--advantage", "rlo"]) == 2  # no other command's: the error alone
    assert "runs as" not in capsys.readouterr().err


def test_an_adapter_whose_base_moved_says_where_to_point_it(tiny_model_dir, task_dir, tmp_path, capsys):
    # the base is recorded as an absolute path: moved, it was asked for as a hub repo ("Repo id must be in the form")
    import shutil

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_model_dir("llama"), base)
    assert main(["sft", "--model", str(base), "--data", str(task_dir / "sft.jsonl"), "--out", str(adapter),
                 "--lora.enabled", "true", "--train.max_steps", "1", "--train.batch_size", "4",
                 "--train.tensorboard", "false"]) == 0
    base.rename(tmp_path / "moved")
    capsys.readouterr()
    rc = main(["generate", "--model", str(adapter), "--prompt", "Hi."])
    assert (f"the base model of the adapter {adapter}, {base}, is not there any more: put it back, or set "
            f"base_model_name_or_path in {adapter / 'adapter_config.json'}") in _one_line_error(capsys, rc)


def _reward_model(tiny_model_dir, out):
    """A reward-model directory (a one-label classifier, its head random) made without training one."""
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("llama"), num_labels=1).save_pretrained(out)
    load_tokenizer(tiny_model_dir("llama")).save_pretrained(out)
    return str(out)


def test_an_out_that_is_a_file_or_under_one_is_refused_before_anything_is_made(tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    # tiny-model said it wrote the model (transformers only logged that it could not); make-data: a traceback
    for command in ("tiny-model", "make-data"):
        rc = main([command, "--out", str(a_file)])
        assert f"--out {a_file} is a file: name a directory" in _one_line_error(capsys, rc)
        rc = main([command, "--out", str(a_file / "sub")])
        assert f"--out {a_file / 'sub'}: {a_file} is a file" in _one_line_error(capsys, rc)
    assert a_file.read_text() == "mine\n"
    rc = main(["tiny-model", "--num_layers", "0", "--out", str(tmp_path / "t")])  # saved a model that ignores input
    assert "'num_layers' in the command line: must be >= 1, got 0" in _one_line_error(capsys, rc)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "reinforce-pp", "eval"])
def test_no_prompts_file_names_the_prompts_flag(command, capsys):
    rc = main([command, "--prompts", ""])  # "pass --data FILE": a flag these commands do not have
    assert "no prompts file given: pass --prompts FILE" in _one_line_error(capsys, rc)


def test_an_eval_out_that_cannot_be_written_is_refused_before_the_sampling(tiny_model_dir, task_dir, tmp_path,
                                                                            capsys, monkeypatch):
    import rlhfkit.evaluate
    import rlhfkit.trainers.online

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before --out was checked")

    monkeypatch.setattr(rlhfkit.evaluate, "gold_eval", no_sampling)  # the figures were made, then lost to a traceback
    monkeypatch.setattr(rlhfkit.trainers.online, "sample_rewards", no_sampling)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    model, prompts = tiny_model_dir("llama"), str(task_dir / "prompts_test.jsonl")
    for extra in ([], ["--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer"]):
        rc = main(["eval", "--model", model, "--prompts", prompts, "--out", str(tmp_path), *extra])
        assert f"--out {tmp_path} is a directory: name a file" in _one_line_error(capsys, rc)
        rc = main(["eval", "--model", model, "--prompts", prompts, "--out", str(a_file / "e.json"), *extra])
        assert f"--out {a_file / 'e.json'}: {a_file} is a file" in _one_line_error(capsys, rc)
    rc = main(["generate", "--model", model, "--prompt", "Hi", "--out", str(a_file / "g.jsonl")])
    assert f"--out {a_file / 'g.jsonl'}: {a_file} is a file" in _one_line_error(capsys, rc)
    rc = main(["eval", "--model", model, "--prompts", prompts, "--limit", "-3"])  # had meant all of them
    assert "'limit' in the command line: must be >= 0, got -3" in _one_line_error(capsys, rc)


def test_eval_rm_checks_its_out_and_meta_json_before_scoring(tiny_model_dir, task_dir, tmp_path, capsys,
                                                             monkeypatch):
    import rlhfkit.evaluate

    rm = _reward_model(tiny_model_dir, tmp_path / "rm")
    data = tmp_path / "task" / "preference_test.jsonl"  # the built-in task's pairs: its meta.json is read
    data.parent.mkdir()
    data.write_text("".join((task_dir / "preference_test.jsonl").read_text().splitlines(keepends=True)[:6]))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    real = rlhfkit.evaluate.reward_model_eval
    scored = []
    monkeypatch.setattr(rlhfkit.evaluate, "reward_model_eval", lambda *a: scored.append(1) or real(*a))
    for out, message in [(tmp_path, f"--out {tmp_path} is a directory: name a file"),
                         (a_file / "r.json", f"--out {a_file / 'r.json'}: {a_file} is a file")]:
        rc = main(["eval-rm", "--model", rm, "--data", str(data), "--out", str(out)])
        assert message in _one_line_error(capsys, rc)
    meta = data.parent / "meta.json"
    for text, message in [('{"label_accuracy_ceiling": 0.78', f"{meta}, line 1, column 32: not valid JSON"),
                          ("[1]", f"{meta} must hold a JSON object (make-data's meta.json), got a list"),
                          ('{"label_accuracy_ceiling_test": "high"}',
                           f"{meta}: 'label_accuracy_ceiling_test' must be a number from 0 to 1")]:
        meta.write_text(text)  # a JSON error naming no file, an AttributeError, "Unknown format code 'f'"
        assert message in _one_line_error(capsys, main(["eval-rm", "--model", rm, "--data", str(data)]))
    for given, what in [(tmp_path, "is a directory"), (tmp_path / "nope.json", "does not exist")]:  # were ignored
        rc = main(["eval-rm", "--model", rm, "--data", str(data), "--meta", str(given)])
        assert f"--meta {given} {what}: name the task's meta.json" in _one_line_error(capsys, rc)
    assert not scored
    meta.write_text(json.dumps({"label_accuracy_ceiling": 0.7, "label_accuracy_ceiling_test": 0.75}))
    assert main(["eval-rm", "--model", rm, "--data", str(data), "--out", str(tmp_path / "new" / "r.json")]) == 0
    assert json.loads((tmp_path / "new" / "r.json").read_text())["accuracy_ceiling"] == 0.75


def test_an_empty_prompt_is_refused(tiny_model_dir, capsys):
    rc = main(["generate", "--model", tiny_model_dir("llama"), "--prompt", ""])  # a RuntimeError on 0-sized tensors
    assert "--prompt is empty: give the text to answer" in _one_line_error(capsys, rc)


def test_a_resume_directory_that_does_not_exist_says_so(tiny_model_dir, task_dir, tmp_path, capsys):
    rc = main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out",
               str(tmp_path / "o"), "--train.resume", str(tmp_path / "nope")])
    err = _one_line_error(capsys, rc)  # "is not a complete checkpoint", as if it were there
    assert f"--train.resume {tmp_path / 'nope'}: no such directory; give a checkpoint directory" in err
