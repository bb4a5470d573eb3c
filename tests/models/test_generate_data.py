"""`rlhfkit generate`: several samples a prompt, scored, written as data the trainers read (best-of-n, pairs);
`rlhfkit eval --reference`: the KL of a model's samples to the model it was trained from."""

import json
import math
import statistics
import textwrap
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main, select_samples
from rlhfkit.data.formats import load_preference, load_sft
from rlhfkit.data.tasks import arithmetic

CHAT = [{"role": "user", "content": "Hi."}]


def _selected(select, min_margin=0.0):
    # 4 prompts x 3 samples: a text prompt with a column of its own, a chat prompt (one empty sample, one blank), a
    # prompt whose samples all score alike, one whose best sample was cut off by max_new_tokens (no EOS); the second
    # reward applies to the first prompt's samples alone
    rows = [{"prompt": "Q1", "answer": "7"}, {"prompt": CHAT, "answer": None}, {"prompt": "Q3", "answer": None},
            {"prompt": "Q4", "answer": None}]
    texts = ["a", "bb", "c", "", "yes", " \n", "x", "y", "z", "long", "mid", "low"]
    ended = [True] * 9 + [False, True, True]
    total = torch.tensor([1.0, 3.0, 2.0, 9.0, 0.5, 8.0, 4.0, 4.0, 4.0, 5.0, 2.0, 1.0])
    parts = {"len": total.clone(), "exact": torch.tensor([0.0, 1.0, 0.0] + [math.nan] * 9)}
    return select_samples(rows, texts, ended, total, parts, 3, select, min_margin)


def test_every_sample_is_written_with_its_rewards():
    out, left_out = _selected("all")
    assert left_out == 0 and len(out) == 12
    assert out[1] == {"prompt": "Q1", "answer": "7", "completion": "bb", "sample": 1, "ended": True, "reward": 3.0,
                      "reward/len": 3.0, "reward/exact": 1.0}
    assert out[4] == {"prompt": CHAT, "answer": None, "completion": [{"role": "assistant", "content": "yes"}],
                      "sample": 1, "ended": True, "reward": 0.5, "reward/len": 0.5, "reward/exact": None}
    assert out[9]["ended"] is False


def test_the_best_sample_of_each_prompt_is_sft_data(tmp_path):
    # the empty and the blank samples scored 9 and 8 are passed over (SFT refuses them), and so is one cut off
    # (SFT would learn it as ended); ties keep the first sample
    out, left_out = _selected("best")
    assert left_out == 0
    assert [r.get("completion") for r in out] == ["bb", None, "x", "mid"]
    assert out[1]["messages"] == CHAT + [{"role": "assistant", "content": "yes"}] and "prompt" not in out[1]
    path = tmp_path / "best.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    assert [r.get("completion") or r["messages"][-1]["content"] for r in load_sft(path)] == ["bb", "yes", "x", "mid"]


def test_the_best_and_the_worst_sample_are_a_preference_pair(tmp_path):
    # the chat prompt keeps one sample that ended and is not blank: no pair; the third prompt's samples all score 4
    out, left_out = _selected("pairs")
    assert left_out == 2
    assert [(r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]) for r in out] == [
        ("bb", "a", 3.0, 1.0), ("mid", "low", 2.0, 1.0)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    loaded = load_preference(path)
    assert [(r["chosen"], r["rejected"]) for r in loaded] == [(r["chosen"], r["rejected"]) for r in out]
    assert loaded[0]["answer"] == "7"  # the prompt file's columns ride along


@pytest.mark.parametrize("min_margin, kept", [(0.99, [("bb", "a"), ("mid", "low")]), (1.0, [("bb", "a")]),
                                               (1.99, [("bb", "a")]), (2.0, [])])
def test_pairs_whose_rewards_differ_by_the_margin_or_less_are_left_out(min_margin, kept):
    # the pairs are 2 and 1 apart (3 - 1, 2 - 1): each kept above its gap, left out from it on
    out, left_out = _selected("pairs", min_margin)
    assert [(r["chosen"], r["rejected"]) for r in out] == kept and left_out == 4 - len(kept)


@pytest.fixture
def length_reward(tmp_path, monkeypatch):
    (tmp_path / "gen_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, answer, **columns):
            return [len(c) / 10 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gen_rewards:length"


def _stopping(path, tmp_path):
    """The tiny model with a generation config listing many stop ids (as an instruct model lists its end of turn):
    a random model then ends most samples within a few tokens."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(path, tmp_path / "stopping")
    config = GenerationConfig.from_pretrained(path) if (Path(path) / "generation_config.json").exists() else (
        GenerationConfig())
    config.eos_token_id = list(range(3, 120))
    config.save_pretrained(tmp_path / "stopping")
    return str(tmp_path / "stopping")


def test_samples_scored_and_selected_train_dpo(tiny_model_dir, tmp_path, length_reward, capsys):
    # 4 samples of each of 6 prompts, each with its own seed: the pairs are the longest and shortest of the very
    # samples --select all writes that ended, and DPO trains on them
    arithmetic.write(tmp_path / "data")
    model = _stopping(tiny_model_dir("llama"), tmp_path)
    common = ["generate", "--model", model, "--prompts", str(tmp_path / "data" / "prompts_train.jsonl"),
              "--limit", "6", "--n", "4", "--rewards", length_reward, "--generation.max_new_tokens", "8"]
    assert main([*common, "--out", str(tmp_path / "all.jsonl")]) == 0
    assert "wrote 24 rows" in capsys.readouterr().out
    every = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in every] == [0, 1, 2, 3] * 6 and all("answer" in r for r in every)
    assert all(r["reward"] == pytest.approx(len(r["completion"]) / 10) for r in every)
    assert len({r["completion"] for r in every[:4]}) > 1  # each sample its own seed
    assert main([*common, "--select", "pairs", "--out", str(tmp_path / "pairs.jsonl")]) == 0
    printed = capsys.readouterr().out
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    by_prompt = {}
    for r in every:
        by_prompt.setdefault(r["prompt"], []).append(r)
    assert 0 < sum(r["ended"] for r in every) < len(every)
    tied = [p for p, samples in by_prompt.items()
            if len({s["reward"] for s in samples if s["ended"] and s["completion"].strip()}) < 2]
    assert pairs and len(pairs) + len(tied) == 6 and f"wrote {len(pairs)} rows" in printed
    assert (f"; {len(tied)} prompts left out" in printed) == bool(tied)
    for pair in pairs:
        samples = [s for s in by_prompt[pair["prompt"]] if s["ended"] and s["completion"].strip()]
        assert pair["chosen_reward"] == max(s["reward"] for s in samples) > pair["rejected_reward"]
        assert pair["rejected_reward"] == min(s["reward"] for s in samples)
        assert pair["chosen"] in {s["completion"] for s in samples}
    assert main(["dpo", "--model", model, "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "dpo"),
                 "--train.max_steps", "1", "--train.batch_size", "2", "--train.tensorboard", "false"]) == 0


def test_a_prompt_s_samples_do_not_depend_on_n(tiny_model_dir, tmp_path):
    # sample j of prompt i is seeded by (seed, i, j): --n 4 begins with --n 2's samples, and sample 0 is what one
    # sample a prompt gives
    arithmetic.write(tmp_path / "data")
    prompts = str(tmp_path / "data" / "prompts_test.jsonl")
    common = ["generate", "--model", tiny_model_dir("llama"), "--prompts", prompts, "--limit", "3",
              "--generation.max_new_tokens", "6"]
    runs = {}
    for n in (1, 2, 4):
        assert main([*common, "--n", str(n), "--out", str(tmp_path / f"n{n}.jsonl")]) == 0
        runs[n] = [json.loads(line)["completion"] for line in (tmp_path / f"n{n}.jsonl").read_text().splitlines()]
    assert runs[2] == [c for i, c in enumerate(runs[4]) if i % 4 < 2] and runs[1] == runs[4][::4]
    assert len(set(runs[4][:4])) > 1


def test_a_stopped_generate_goes_on_where_it_stopped_with_the_same_samples(tiny_model_dir, tmp_path, length_reward,
                                                                          monkeypatch, capsys):
    # 7 prompts in blocks of 2 (generation.batch_size), 3 samples each, the best-and-worst pairs: the run stops
    # in its third block, and the half-written block a kill would leave is added to the partial file. Run again,
    # it samples the last two blocks alone and writes what a run never stopped writes, byte for byte
    import rlhfkit.rollout.generate

    arithmetic.write(tmp_path / "data")
    model = _stopping(tiny_model_dir("llama"), tmp_path)
    common = ["generate", "--model", model, "--prompts", str(tmp_path / "data" / "prompts_train.jsonl"), "--limit", "7",
              "--n", "3", "--rewards", length_reward, "--select", "pairs", "--generation.max_new_tokens", "8",
              "--generation.batch_size", "2"]
    assert main([*common, "--out", str(tmp_path / "whole.jsonl")]) == 0
    whole = capsys.readouterr().out
    assert "wrote " in whole and "7 prompts" in whole and "left out" in whole  # a count carried over blocks

    real, blocks = rlhfkit.rollout.generate.generate, []

    def stopping(model, tokenizer, prompts, *args, **kwargs):
        blocks.append(len(prompts))
        if stop and len(blocks) == 3:
            raise KeyboardInterrupt
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(rlhfkit.rollout.generate, "generate", stopping)
    out = tmp_path / "pairs.jsonl"
    stop = True
    assert main([*common, "--out", str(out)]) == 130  # Ctrl-C: the shell's status for it
    partial, state = tmp_path / "pairs.jsonl.partial", tmp_path / "pairs.jsonl.progress"
    assert not out.exists() and json.loads(state.read_text())["done"] == 4
    assert partial.read_text() == "".join((tmp_path / "whole.jsonl").read_text().splitlines(True)[:len(
        partial.read_text().splitlines())])  # the first two blocks' pairs, as the whole run's
    with partial.open("a") as f:
        f.write('{"prompt": "half a blo')
    # other settings are refused, naming them, and the partial file is kept: another seed, or another model in
    # the same directory (its generation config changed here; new weights would do as much)
    assert main([*common, "--seed", "1", "--out", str(out)]) == 2
    assert "pairs.jsonl.partial holds the first 4 prompts of a run with other settings (differing: seed)" in (
        capsys.readouterr().err)
    config = (Path(model) / "generation_config.json").read_text()
    (Path(model) / "generation_config.json").write_text(json.dumps({**json.loads(config), "eos_token_id": [3]}))
    assert main([*common, "--out", str(out)]) == 2
    assert "(differing: model)" in capsys.readouterr().err
    (Path(model) / "generation_config.json").write_text(config)
    # the same files spelt otherwise are the same run: the model's directory and the prompts by another path
    stop, blocks[:] = False, []
    respelt = [a.replace(str(tmp_path), str(tmp_path / "data" / "..")) for a in common]
    assert main([*respelt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"going on from {partial}: 4 of 7 prompts done" in printed and blocks == [6, 3]
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert printed.splitlines()[-1] == whole.splitlines()[-1].replace("whole.jsonl", "pairs.jsonl")
    assert not partial.exists() and not state.exists()


def test_two_processes_write_what_one_does(tiny_model_dir, tmp_path, length_reward, ppo_setup, monkeypatch):
    # each process samples and scores blocks of its own (7 prompts in blocks of 2: the last round leaves process 1
    # none), process 0 writes them in order: the one-process file byte for byte, a reward model's scores too (each
    # block batched as one process batches it); then a run stopped in one process goes on in two to the same file
    import os

    from test_distributed import _launch

    arithmetic.write(tmp_path / "data")
    model = _stopping(tiny_model_dir("llama"), tmp_path)
    args = ["generate", "--model", model, "--prompts", str(tmp_path / "data" / "prompts_train.jsonl"), "--limit", "7",
            "--n_samples", "3", "--rewards", f"{ppo_setup / 'rm'},{length_reward}", "--generation.max_new_tokens", "8",
            "--generation.batch_size", "2"]  # --n_samples: torchrun takes --n for one of its own options
    assert main([*args, "--out", str(tmp_path / "one.jsonl")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def launch(out, *extra, fails=False):
        done = _launch([*args, *extra], out, 2, env, fails)
        return done.stderr if fails else done.stdout

    printed = launch(tmp_path / "two.jsonl")
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert len(one) == 21 and len({r["reward/rm"] for r in one}) > 1 and printed.count("wrote 21") == 1
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    # a run stopped in one process in its second block goes on in two
    import rlhfkit.rollout.generate

    real, calls = rlhfkit.rollout.generate.generate, []

    def stopping(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(rlhfkit.rollout.generate, "generate", stopping)
        assert main([*args, "--out", str(tmp_path / "again.jsonl")]) == 130
    # other settings: process 0 refuses the partial file, and the other process hears of it (it would wait for ever)
    said = launch(tmp_path / "again.jsonl", "--seed", "1", fails=True)
    assert said.count("rlhfkit generate: process 0 could not open the output: ") == 1 and "(differing: seed)" in said
    assert "going on from" in launch(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_printing_in_several_processes_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "--model", "m", "--prompt", "Hi"]) == 2
    assert "generate prints its samples in one process: with several (torchrun, accelerate launch) pass --out" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("out, column, message", [
    ("x.csv", None, "--out x.csv: generate writes JSON lines; name the file *.jsonl"),
    ("sub", None, "is a directory: name a new .jsonl file"),
    ("prompts.jsonl", None, "is the prompts file itself"),
    ("x.jsonl", "completion", "has a column 'completion', which generate --out writes"),
    ("x.jsonl", "reward/length", "has a column 'reward/length', which generate --out writes"),
])
def test_an_output_the_trainers_could_not_read_is_refused_before_sampling(tmp_path, monkeypatch, capsys, out, column,
                                                                           message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub.jsonl").mkdir() if out == "sub" else None
    row = {"prompt": "Hi", **({column: "x"} if column else {})}
    (tmp_path / "prompts.jsonl").write_text(json.dumps(row) + "\n")
    target = "sub.jsonl" if out == "sub" else out
    # no model named: it would be loaded after these checks
    assert main(["generate", "--prompts", "prompts.jsonl", "--out", target]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--select", "best", "--out", "x.jsonl"], "--select best picks samples by their reward into a data file: pass "
                                               "--rewards"),
    (["--select", "pairs", "--rewards", "a:b", "--out", "x.jsonl"], "--select pairs takes the best and the worst"),
    (["--select", "best", "--n", "2", "--rewards", "a:b", "--out", "x.jsonl", "--min_margin", "0.5"],
     "--min_margin 0.5 is the reward gap between a pair's chosen and rejected answers: it needs --select pairs"),
    (["--n", "3", "--generation.temperature", "0"], "--n 3 with --generation.temperature 0 (greedy) makes 3 "
                                                    "identical samples"),
])
def test_selecting_without_what_it_needs_says_what_to_pass(tiny_model_dir, capsys, extra, message):
    assert main(["generate", "--model", tiny_model_dir("llama"), "--prompt", "Hi", *extra]) == 2
    assert message in capsys.readouterr().err


def _perturbed(path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "moved")
    from rlhfkit.models.load import load_tokenizer

    load_tokenizer(path).save_pretrained(tmp_path / "moved")
    return str(tmp_path / "moved")


def test_kl_to_reference_sums_each_answer_s_log_ratio(tiny_model_dir, tmp_path):
    # oracle: each sample alone (no padding), log-softmax of both models' full forwards at its answer's tokens
    from rlhfkit.config import GenerationConfig, ModelConfig
    from rlhfkit.evaluate import kl_to_reference
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.rollout.generate import generate

    path = tiny_model_dir("llama")
    policy = load_causal_lm(ModelConfig(path=_perturbed(path, tmp_path)))
    reference, tok = load_causal_lm(ModelConfig(path=path)), load_tokenizer(path)
    prompts = ["User: Describe the cat.\nAssistant:", "User: Hi.\nAssistant:", "User: What is the lake like?"]
    gens = generate(policy, tok, prompts, GenerationConfig(max_new_tokens=6), seed=0)
    gens.completion_ids = [c[:n] for c, n in zip(gens.completion_ids, (6, 1, 3))]  # padded in a batch; length 1
    for temperature in (1.0, 2.0):  # both models at the temperature the samples were drawn at
        per_answer = []
        with torch.no_grad():
            for prompt_ids, answer in zip(gens.prompt_ids, gens.completion_ids):
                ids = torch.tensor([prompt_ids + answer])
                logp, logq = (torch.log_softmax(m(ids).logits[0, len(prompt_ids) - 1:-1] / temperature, -1)
                              for m in (policy, reference))
                picked = torch.tensor(answer)[:, None]
                per_answer.append((logp.gather(-1, picked) - logq.gather(-1, picked)).sum().item())
        kl, stderr = kl_to_reference(policy, reference, gens, tok.pad_token_id, batch_size=2, temperature=temperature)
        expected = statistics.mean(per_answer), statistics.stdev(per_answer) / math.sqrt(len(per_answer))
        assert kl == pytest.approx(expected[0], abs=1e-4) and stderr == pytest.approx(expected[1], abs=1e-4)
        assert abs(kl) > 1e-2  # the models differ


@pytest.mark.parametrize("decoding", [["--generation.temperature", "0"], ["--generation.top_p", "0.9"]])
def test_a_kl_to_a_reference_from_greedy_or_cut_off_samples_is_refused(decoding, capsys):
    # the estimate needs samples from the whole distribution: greedy and top-p ones gave no KL, negative ones too
    assert main(["eval", "--model", "m", "--reference", "r", *decoding]) == 2
    assert "--reference estimates the KL on the model's own samples" in capsys.readouterr().err


def test_a_reference_that_is_no_model_is_refused_before_sampling(tiny_model_dir, task_dir, tmp_path, capsys):
    # it had sampled every prompt and printed the gold reward first, then failed with nothing written
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", tiny_model_dir("llama"), "--prompts", str(task_dir / "prompts_test.jsonl"),
                 "--limit", "4", "--reference", str(tmp_path / "nope"), "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "does not exist" in printed.err and "gold reward on" not in printed.out


def test_eval_reports_the_kl_to_a_reference(tiny_model_dir, tmp_path, length_reward, capsys):
    from rlhfkit.config import GenerationConfig, ModelConfig
    from rlhfkit.evaluate import kl_to_reference
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.rollout.generate import generate

    arithmetic.write(tmp_path / "data")
    path = tiny_model_dir("llama")
    moved = _perturbed(path, tmp_path)
    prompts = str(tmp_path / "data" / "prompts_test.jsonl")
    common = ["eval", "--prompts", prompts, "--rewards", length_reward, "--limit", "8",
              "--generation.max_new_tokens", "6"]
    assert main([*common, "--model", path, "--reference", path]) == 0
    assert f"KL to {path}: 0.000 ± 0.000 nats per answer" in capsys.readouterr().out
    assert main([*common, "--model", moved, "--reference", path, "--out", str(tmp_path / "eval.json")]) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())
    # the very samples it scored: one per prompt, sampling seed 0
    rows = [json.loads(line)["prompt"] for line in open(prompts)][:8]
    policy, tok = load_causal_lm(ModelConfig(path=moved)), load_tokenizer(moved)
    gens = generate(policy, tok, rows, GenerationConfig(max_new_tokens=6), seed=0)
    assert [s["completion"] for s in figures["samples"]] == gens.texts
    kl, stderr = kl_to_reference(policy, load_causal_lm(ModelConfig(path=path)), gens, tok.pad_token_id)
    assert figures["kl"] == pytest.approx(kl, abs=1e-6) and figures["kl_stderr"] == pytest.approx(stderr, abs=1e-6)
    # a reference with another vocabulary is refused, naming the flag
    assert main(["tiny-model", "--out", str(tmp_path / "other"), "--vocab_size", "512"]) == 0
    capsys.readouterr()
    assert main([*common, "--model", path, "--reference", str(tmp_path / "other")]) == 2
    assert "--reference " + str(tmp_path / "other") + " has another tokenizer" in capsys.readouterr().err
