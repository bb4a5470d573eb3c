"""Critic-free online RL: each method's advantage by hand, and every command trains through the CLI."""

import json
import textwrap
import types
import typing

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.data.tasks import arithmetic
from rlhfkit.models.roles import SeparateRoles
from rlhfkit.rollout.experience import Experience
from rlhfkit.trainers.online import STRATEGIES, Method


def _experience(scores, lengths, width=3, rewards=None):
    """An Experience with only what the strategies read: scores (B,), action_mask (B, A), rewards (B, A)."""
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    zeros = torch.zeros_like(mask)
    rewards = zeros if rewards is None else torch.tensor(rewards)
    ids = torch.zeros(len(lengths), width + 1, dtype=torch.long)
    return Experience(ids, ids, mask, zeros, zeros, zeros, rewards, zeros, zeros, torch.tensor(scores))


def _cfg(group_size: int, scale_rewards: str = "group", baseline: str = "batch"):
    """What the strategies read of a run's config."""
    return types.SimpleNamespace(group_size=group_size, scale_rewards=scale_rewards, baseline=baseline)


def test_every_method_has_a_strategy():
    assert set(STRATEGIES) == set(typing.get_args(Method))


def test_grpo_normalises_in_the_group_and_broadcasts_over_tokens():
    # group 1: rewards 1, 0 → mean 0.5, sample std √0.5; group 2: equal rewards → 0
    exp = _experience([1.0, 0.0, 2.0, 2.0], [2, 3, 1, 3])
    adv = STRATEGIES["grpo"].advantages(exp, _cfg(2))
    a = 0.5 / (0.5**0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0], [-a, -a, -a], [0, 0, 0], [0, 0, 0]]), rtol=0, atol=1e-6)
    assert STRATEGIES["grpo"].reduction == "seq_mean_token_mean"


def test_dr_grpo_only_centres_and_sums_tokens_over_a_constant():
    exp = _experience([1.0, 0.0, 3.0, 5.0], [1, 2, 2, 1])
    adv = STRATEGIES["dr_grpo"].advantages(exp, _cfg(2))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0, 0], [-0.5, -0.5, 0], [-1, -1, 0], [1, 0, 0]]),
                               rtol=0, atol=1e-6)
    assert STRATEGIES["dr_grpo"].reduction == "token_sum_norm"


def test_rloo_leaves_one_out():
    # group of 3: 3 - (0 + 6)/2 = 0, 0 - (3 + 6)/2 = -4.5, 6 - (3 + 0)/2 = 4.5
    exp = _experience([3.0, 0.0, 6.0], [1, 1, 2], width=2)
    adv = STRATEGIES["rloo"].advantages(exp, _cfg(3))
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0], [-4.5, 0], [4.5, 4.5]]), rtol=0, atol=1e-6)


def test_reinforce_pp_whitens_reward_to_go_over_the_batch():
    # token rewards (already KL-shaped): row 0 [1, 2], row 1 [3, -] → returns [3, 2], [3]
    exp = _experience([0.0, 0.0], [2, 1], width=2, rewards=[[1.0, 2.0], [3.0, 0.0]])
    adv = STRATEGIES["reinforce_pp"].advantages(exp, _cfg(1))
    returns = torch.tensor([3.0, 2.0, 3.0])
    white = (returns - returns.mean()) / (returns.var(correction=1) + 1e-8).sqrt()
    torch.testing.assert_close(adv, torch.tensor([[white[0], white[1]], [white[2], 0.0]]), rtol=0, atol=1e-6)


def test_reinforce_pp_baseline_takes_each_group_s_mean_score_off_before_whitening():
    # groups of 2: scores 4, 2 (mean 3) and 1, 1 (mean 1); token rewards -0.1 kl shaping, the score at the last
    # token: row 0 [-0.1, 3.9] -> returns [3.8, 3.9] - 3 = [0.8, 0.9]; row 1 [1.9] -> [-1.1];
    # row 2 [-0.2, 0.8, -] -> [0.6, 0.8] - 1 = [-0.4, -0.2]; row 3 [1, -, -] -> [0]
    exp = _experience([4.0, 2.0, 1.0, 1.0], [2, 1, 2, 1],
                      rewards=[[-0.1, 3.9, 0], [1.9, 0, 0], [-0.2, 0.8, 0], [1.0, 0, 0]])
    adv = STRATEGIES["reinforce_pp"].advantages(exp, _cfg(2, baseline="group"))
    centred = torch.tensor([0.8, 0.9, -1.1, -0.4, -0.2, 0.0])
    white = (centred - centred.mean()) / (centred.var(correction=1) + 1e-8).sqrt()
    expected = torch.tensor([[white[0], white[1], 0], [white[2], 0, 0], [white[3], white[4], 0], [white[5], 0, 0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_reinforce_pp_s_group_baseline_needs_groups():
    from rlhfkit.trainers.online import ReinforcePPConfig

    ReinforcePPConfig(group_size=1)  # the batch's baseline: one sample a prompt will do
    with pytest.raises(ValueError, match="reinforce_pp with baseline group needs group_size >= 2"):
        ReinforcePPConfig(group_size=1, baseline="group")


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A user's reward file on sys.path: the length of the completion, plus the task's exact answer."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, answer, **columns):
            assert len(answer) == len(completions)  # the dataset's other columns arrive, one per completion
            return [len(c) / 10 for c in completions]

        def broken(prompts, completions, **columns):
            return [float("nan")] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


@pytest.fixture(scope="module")
def arithmetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("arithmetic")
    arithmetic.write(out)
    return out


def _run(command, model, data, out, *extra):
    options = {"--train.max_steps": "2", "--prompts_per_step": "4", "--group_size": "4", "--mini_batch_size": "8",
               "--optim.lr": "1e-2", "--generation.max_new_tokens": "8", "--train.tensorboard": "false"}
    options = [a for k, v in options.items() if k not in extra for a in (k, v)]  # ``extra`` may set one of them
    return main([command, "--model", model, "--prompts", str(data / "prompts_train.jsonl"),
                 "--eval_prompts", str(data / "prompts_valid.jsonl"), "--out", str(out), *options, *extra])


@pytest.mark.parametrize("command, extra", [
    ("grpo", ["--kl_coef", "0.05"]),
    ("grpo", ["--kl_coef", "0.05", "--mini_batch_size", "16"]),  # one update: the rollout's KL read in the learn pass
    ("grpo", ["--advantage", "dr_grpo"]),
    ("rloo", []),
    ("reinforce-pp", ["--beta", "0.05"]),
    ("reinforce-pp", ["--beta", "0.05", "--mini_batch_size", "16"]),  # one update, with a KL penalty in the rewards
    ("reinforce-pp", ["--beta", "0.05", "--baseline", "group"]),
])
def test_command_trains_the_adapter(tiny_model_dir, arithmetic_dir, reward_module, tmp_path, command, extra):
    out = tmp_path / command
    rc = _run(command, tiny_model_dir("llama"), arithmetic_dir, out,
              "--rewards", "my_rewards:length,rlhfkit.data.tasks.arithmetic:exact_answer",
              "--reward_weights", "1,0.5", *extra)
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 3  # two steps and the final evaluation
    for key in ("rollout/score", "reward/length", "reward/exact_answer", "policy/clip_frac",
                "loss/policy", "loss/kl", "rollout/response_length", "rollout/entropy", "time/step",
                "time/tokens_per_s"):
        assert key in logs[0], key
    # the reference pass (and with it the KL to the reference) runs only when a KL term needs it
    assert ("rollout/kl" in logs[0]) == (extra[:1] in (["--kl_coef"], ["--beta"]))
    if "rollout/kl" in logs[0]:  # a fresh adapter is the reference; the updated one is not (k1: of either sign)
        assert logs[0]["rollout/kl"] == pytest.approx(0.0, abs=1e-5) and abs(logs[1]["rollout/kl"]) > 1e-4
    assert "eval/reward/exact_answer" in logs[-1] and "eval/reward_stderr" in logs[-1]
    # a few samples a step with their rewards (TRL's log_completions): the first group's, as sampled
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1] * 4 + [2] * 4
    assert {"prompt", "completion", "reward", "reward/length", "reward/exact_answer", "ended"} <= samples[0].keys()
    assert len({r["prompt"] for r in samples[:4]}) == 1  # group_size 4: one prompt's group
    assert samples[0]["reward/length"] == pytest.approx(len(samples[0]["completion"]) / 10)
    # LoRA B matrices start at zero: any non-zero one means the adapter was trained
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert not (out / "critic").exists()  # critic-free


@pytest.mark.parametrize("extra", [
    ["--kl_coef", "0.05", "--mini_batch_size", "16"],  # one on-policy update: entropy and KL read in the learn pass
    ["--advantage", "dr_grpo"],  # two updates a step, a token sum over a constant
])
def test_micro_batches_add_up_to_the_mini_batch_s_update(tiny_model_dir, arithmetic_dir, reward_module, tmp_path,
                                                         extra):
    # OpenRLHF's micro_train_batch_size: a mini-batch of 8 or 16 samples in forwards and backwards of at most 3
    runs = {}
    for name, micro in (("whole", []), ("micro", ["--micro_batch_size", "3"])):
        assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / name, "--rewards",
                    "my_rewards:length", "--eval_prompts", "", *extra, *micro) == 0
        logs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = load_file(str(tmp_path / name / "adapter_model.safetensors")), logs
    (whole, whole_logs), (micro, micro_logs) = runs["whole"], runs["micro"]
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora_B" in k)  # the adapter trained
    for name, value in whole.items():
        assert (micro[name] - value).norm() <= 1e-5 * value.norm().clamp(min=1e-12), name
    keys = ["loss/policy", "grad_norm", "policy/approx_kl", "policy/clip_frac", "rollout/entropy"]
    for key in keys + (["rollout/kl", "loss/kl"] if "--kl_coef" in extra else []):
        assert [r[key] for r in micro_logs] == pytest.approx([r[key] for r in whole_logs], rel=1e-4, abs=1e-6), key


def test_a_nan_loss_in_a_later_micro_batch_drops_the_earlier_ones_gradients(tiny_model_dir, arithmetic_dir,
                                                                              reward_module, tmp_path, monkeypatch):
    # train.on_nan skip: the first mini-batch's loss is NaN, in its second micro-batch (micro 3 of 4+4 rows)
    # or in its only one (whole): both skip that update, and the first micro-batch's gradients do not leak
    # into the next mini-batch's update
    from rlhfkit.trainers import online

    real, runs = online.policy_loss, {}
    for name, micro, bad_call in (("whole", [], 0), ("micro", ["--micro_batch_size", "3"], 1)):
        calls = []

        def policy_loss(*args, **kwargs):
            loss, stats = real(*args, **kwargs)
            calls.append(1)
            return (loss * float("nan"), stats) if len(calls) - 1 == bad_call else (loss, stats)

        monkeypatch.setattr(online, "policy_loss", policy_loss)
        assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / name, "--rewards",
                    "my_rewards:length", "--eval_prompts", "", "--train.on_nan", "skip", *micro) == 0
        logs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert logs[-1]["train/skipped_updates"] == 1
        runs[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in runs["whole"].items() if "lora_B" in k)  # the other updates ran
    for name, value in runs["whole"].items():
        assert (runs["micro"][name] - value).norm() <= 1e-5 * value.norm().clamp(min=1e-12), name


def test_dapo_s_clip_higher_reaches_the_loss_and_truncated_samples_can_be_left_out(tiny_model_dir, arithmetic_dir,
                                                                                   reward_module, tmp_path,
                                                                                   monkeypatch):
    from rlhfkit.trainers import online

    real, seen = online.policy_loss, []

    def policy_loss(*args, **kwargs):
        seen.append(kwargs["clip_eps_high"])
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "policy_loss", policy_loss)
    # 3 new tokens: a random tiny model never ends a sample that early, so every sample is cut off; one on-policy
    # update a step, so the rollout's entropy is read in the learn pass
    args = ["--rewards", "my_rewards:length", "--eval_prompts", "", "--generation.max_new_tokens", "3",
            "--clip_eps_high", "0.28", "--mini_batch_size", "16"]
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "all", *args) == 0
    assert seen and set(seen) == {0.28}
    logs = [json.loads(line) for line in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/eos_share"] == 0.0 for r in logs)
    trained = load_file(str(tmp_path / "all" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    # left out of the loss, they teach nothing: the adapter stays where it started
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "masked", *args, "--mask_truncated",
                "true") == 0
    masked = load_file(str(tmp_path / "masked" / "adapter_model.safetensors"))
    assert all(v.abs().max() == 0 for k, v in masked.items() if "lora_B" in k)
    logs = [json.loads(line) for line in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss/policy" in r or "grad_norm" in r for r in logs)  # no update: nothing learned to log
    # the rollout's metrics still read every sampled token: step 1 (the same weights, the same samples) agrees
    unmasked = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[0])
    assert logs[0]["rollout/entropy"] == pytest.approx(unmasked["rollout/entropy"], rel=1e-6)
    assert logs[0]["rollout/entropy"] > 0


def test_the_batch_scale_gspo_and_the_overlong_penalty_reach_the_run(tiny_model_dir, arithmetic_dir, reward_module,
                                                                      tmp_path, monkeypatch):
    # each is tested by hand where it is computed (test_advantages, test_losses): here, that the options get there
    from rlhfkit.trainers import online

    real_loss, real_advantages, seen = online.policy_loss, online.group_advantages, []
    monkeypatch.setattr(online, "policy_loss", lambda *a, **k: seen.append(k["level"]) or real_loss(*a, **k))
    monkeypatch.setattr(online, "group_advantages", lambda *a, **k: seen.append(k["scale"]) or real_advantages(*a, **k))
    # 3 new tokens: every sample of a random tiny model is cut off at 3 tokens, so with a buffer of 2 each loses
    # 0.5 x (3 - (3 - 2)) / 2 = 0.5 of its reward
    args = ["--rewards", "my_rewards:length", "--eval_prompts", "", "--generation.max_new_tokens", "3",
            "--train.max_steps", "1"]
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "plain", *args) == 0
    assert set(seen) == {"token", "group"}
    seen.clear()
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "options", *args, "--scale_rewards",
                "batch", "--importance_sampling", "sequence", "--overlong_buffer", "2", "--overlong_penalty",
                "0.5") == 0
    assert set(seen) == {"sequence", "batch"}
    plain, options = (json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])
                      for run in ("plain", "options"))
    assert plain["rollout/eos_share"] == options["rollout/eos_share"] == 0.0
    assert options["rollout/score"] == pytest.approx(plain["rollout/score"] - 0.5, abs=1e-6)


def test_the_entropy_bonus_is_minus_the_rollout_s_entropy_on_one_on_policy_update(tiny_model_dir, arithmetic_dir,
                                                                                    reward_module, tmp_path):
    # rloo reduces over tokens: with one on-policy update its entropy term is minus the mean entropy over every
    # sampled token, which the rollout logs (the pure function: test_losses)
    args = ["--rewards", "my_rewards:length", "--eval_prompts", "", "--train.max_steps", "1",
            "--mini_batch_size", "16", "--entropy_coef", "0.01"]
    assert _run("rloo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "rloo", *args) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "rloo" / "metrics.jsonl").read_text().splitlines()]
    assert row["loss/entropy"] == pytest.approx(-row["rollout/entropy"], rel=1e-5) and row["rollout/entropy"] > 0
    # and it is in the loss: the update differs from the one without it
    assert _run("rloo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "plain", *args[:-2]) == 0
    bonus, plain = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("rloo", "plain"))
    assert any(not torch.equal(bonus[k], plain[k]) for k in plain)


@pytest.mark.parametrize("extra", [
    ["--kl_coef", "0.05", "--entropy_coef", "0.01"],  # two updates a step, the reference's pass
    ["--mini_batch_size", "16"],  # one on-policy update: the rollout's entropy from the learn pass
])
def test_a_chunked_head_trains_to_the_same_weights(tiny_model_dir, arithmetic_dir, reward_module, tmp_path, extra,
                                                   head_calls):
    # the policy's and the reference's log-probs (and entropies) with the head run on 3 response tokens at a time
    runs = {}
    for name, chunk in (("whole", []), ("chunked", ["--logits_chunk", "3"])):
        head_calls.clear()
        assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / name, "--rewards",
                    "my_rewards:length", "--eval_prompts", "", *extra, *chunk) == 0
        logs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = load_file(str(tmp_path / name / "adapter_model.safetensors")), logs
    # the reference's pass: log-probs, no gradients; the learn pass: log-probs and the entropies, with gradient for
    # the bonus, or without for the on-policy rollout's metric (the old log-probs come from the sampler)
    assert head_calls == ({(3, False, "none"), (3, True, "grad")} if "--kl_coef" in extra else
                          {(3, True, "detached")})
    (whole, whole_logs), (chunked, chunked_logs) = runs["whole"], runs["chunked"]
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora_B" in k)  # the adapter trained
    for name, value in whole.items():  # float rounding, through Adam (test_forward: the passes agree within 1e-5)
        assert (chunked[name] - value).norm() <= 1e-4 * value.norm().clamp(min=1e-12), name
    keys = ["loss/policy", "policy/approx_kl", "rollout/entropy"] + (["loss/entropy", "loss/kl", "rollout/kl"]
                                                                     if "--kl_coef" in extra else [])
    for key in keys:
        assert [r[key] for r in chunked_logs] == pytest.approx([r[key] for r in whole_logs], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("extra, message", [
    (["--advantage", "dr_grpo", "--scale_rewards", "batch"], "dr_grpo's advantage is never scaled"),
    (["--overlong_buffer", "9"], "overlong_buffer 9 is longer than generation.max_new_tokens 8"),
    (["--baseline", "group"], "baseline picks REINFORCE++'s; grpo's is its group's"),
])
def test_online_options_that_cannot_apply_are_refused(tiny_model_dir, arithmetic_dir, tmp_path, capsys, extra,
                                                      message):
    rc = _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "x", *extra,
              "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer")
    assert rc == 2 and message in capsys.readouterr().err


def test_a_late_row_without_a_reward_s_column_is_named_before_any_step_and_when_the_reward_fails(
        tiny_model_dir, arithmetic_dir, tmp_path, capsys):
    # the first rows have 'answer', the last does not: exact_answer gets None for it (a reward may return None where
    # it does not apply); this one cannot take None, so the row is named up front and its inputs when it fails
    lines = (arithmetic_dir / "prompts_valid.jsonl").read_text().splitlines()[:11]
    bad = tmp_path / "late.jsonl"
    bad.write_text("\n".join([*lines, json.dumps({"prompt": "What is 2 + 2?"})]) + "\n")
    with pytest.warns(UserWarning, match=rf"1 of 12 rows have no 'answer' \(first: {bad}, row 11 \(line 12\), "
                                         r"field 'answer'\), which reward 'exact_answer' takes"):
        rc = _run("grpo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "x", "--eval_prompts", str(bad),
                  "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer")
    assert rc == 2  # at the final evaluation, which reaches the row
    assert "reward 'exact_answer' raised TypeError" in (err := capsys.readouterr().err)
    assert "prompt 'What is 2 + 2?', answer None)" in err


def test_the_full_policy_trains_beside_a_frozen_reference_and_resumes_exactly(tiny_model_dir, arithmetic_dir,
                                                                              reward_module, tmp_path, monkeypatch):
    # lora.enabled false: the whole model is trained and saved as a model directory; the reference is a frozen
    # copy, loaded only when a KL term needs it; a checkpoint resumes to the uninterrupted run's weights
    from transformers import AutoModelForCausalLM

    from rlhfkit.trainers import online

    built = []
    monkeypatch.setattr(online, "SeparateRoles", lambda *a, **k: built.append(k) or SeparateRoles(*a, **k))
    model = tiny_model_dir("llama")
    args = ["--rewards", "my_rewards:length", "--lora.enabled", "false", "--optim.lr", "1e-3"]
    assert _run("grpo", model, arithmetic_dir, tmp_path / "one", *args, "--kl_coef", "0.05",
                "--train.save_every", "1") == 0
    logs = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    # the reference is the policy at step 1 (the k1 estimate is 0), then a copy the policy has moved away from
    assert logs[0]["rollout/kl"] == pytest.approx(0.0, abs=1e-6) and abs(logs[1]["rollout/kl"]) > 1e-3
    assert not (tmp_path / "one" / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    base = AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in base.items() if v.dim() == 2)  # every matrix trained
    assert _run("grpo", model, arithmetic_dir, tmp_path / "two", *args, "--kl_coef", "0.05", "--train.resume",
                str(tmp_path / "one" / "checkpoints" / "step-1")) == 0
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    for k, v in trained.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6)
    assert _run("rloo", model, arithmetic_dir, tmp_path / "three", *args) == 0  # no KL term: no reference
    assert [k["reference"] for k in built] == [True, True, False]


def test_a_resumed_run_rewrites_the_samples_of_the_steps_it_takes_again(tiny_model_dir, arithmetic_dir,
                                                                         reward_module, tmp_path):
    out = tmp_path / "run"
    args = ["--rewards", "my_rewards:length", "--eval_prompts", "", "--log_samples", "2"]
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, out, *args, "--train.save_every", "1") == 0
    first = (out / "samples.jsonl").read_text().splitlines()
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, out, *args, "--train.resume",
                str(out / "checkpoints" / "step-1")) == 0
    again = (out / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in again] == [1, 1, 2, 2] and again == first  # the same samples


def test_a_lora_adapter_cannot_be_trained_in_full_and_says_how_to(tmp_path):
    # loaded, it would be a frozen base under a frozen adapter: nothing to train (before: "no trainable parameters")
    from rlhfkit.config import ConfigError, ModelConfig

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a LoRA adapter directory: merge it into a full model .*rlhfkit export"):
        SeparateRoles(ModelConfig(path=str(tmp_path)), None, torch.device("cpu"))


def test_reward_function_errors_name_the_function(tiny_model_dir, arithmetic_dir, reward_module, tmp_path, capsys):
    rc = _run("rloo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "broken", "--rewards", "my_rewards:broken")
    assert rc == 2
    assert "reward 'broken' returned nan" in capsys.readouterr().err


def test_a_column_a_reward_function_needs_is_checked_before_sampling(tiny_model_dir, arithmetic_dir, tmp_path,
                                                                    capsys):
    rows = [json.loads(line) for line in (arithmetic_dir / "prompts_train.jsonl").read_text().splitlines()]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "prompts_train.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                                                   for r in rows))
    rc = _run("grpo", tiny_model_dir("llama"), tmp_path / "bare", tmp_path / "x", "--eval_prompts", "",
              "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer")
    err = capsys.readouterr().err
    assert rc == 2 and "reward 'exact_answer' takes column 'answer', which" in err and "(its columns: prompt)" in err
    assert not (tmp_path / "x" / "metrics.jsonl").exists() or not (tmp_path / "x" / "metrics.jsonl").read_text()
    # the file's own names, mapped to ours: the other columns reach the reward function as they are
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "prompts_train.jsonl").write_text("".join(
        json.dumps({"question": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    assert _run("grpo", tiny_model_dir("llama"), tmp_path / "theirs", tmp_path / "y", "--eval_prompts", "",
                "--columns", "prompt=question", "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer",
                "--train.max_steps", "1") == 0
    logs = [json.loads(line) for line in (tmp_path / "y" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/exact_answer" in logs[0]


def test_rloo_refuses_a_method_of_another_command(tiny_model_dir, arithmetic_dir, tmp_path, capsys):
    rc = _run("rloo", tiny_model_dir("llama"), arithmetic_dir, tmp_path / "x", "--advantage", "grpo",
              "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer")
    assert rc == 2 and "expected one of 'rloo'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_beta_is_refused_where_the_advantage_would_ignore_it(tiny_model_dir, arithmetic_dir, tmp_path, capsys,
                                                             command):
    # grpo, dr_grpo and rloo read each sample's reward alone: β's KL-shaped token rewards would be dropped silently
    rc = _run(command, tiny_model_dir("llama"), arithmetic_dir, tmp_path / "x", "--beta", "0.05",
              "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer")
    assert rc == 2 and "for a KL penalty set kl_coef" in capsys.readouterr().err
    rc = _run(command, tiny_model_dir("llama"), arithmetic_dir, tmp_path / "x", "--kl_estimator", "k3",
              "--kl_coef", "0.1", "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer")  # was ignored
    assert rc == 2 and "kl_estimator picks REINFORCE++'s KL in the token rewards" in capsys.readouterr().err


def test_reward_model_directory_and_function_combined(tiny_model_dir, task_dir, arithmetic_dir, reward_module,
                                                      tmp_path):
    rm = tmp_path / "my-rm"
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(rm), "--train.max_steps", "1", "--train.batch_size", "8",
                 "--train.tensorboard", "false"]) == 0
    out = tmp_path / "grpo"
    assert _run("grpo", tiny_model_dir("llama"), arithmetic_dir, out, "--rewards", f"{rm},my_rewards:length",
                "--reward_weights", "0.5,1") == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout/score"] == pytest.approx(0.5 * first["reward/my-rm"] + first["reward/length"], abs=1e-4)


def test_one_on_policy_update_skips_the_actor_and_reference_passes(tiny_model_dir, arithmetic_dir):
    """One epoch of one mini-batch and no KL term: the experience maker runs neither the actor's nor
    the reference's pass, and the update equals the one made from recorded old log-probs."""
    import copy
    import dataclasses

    from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
    from rlhfkit.data.formats import load_prompts
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.roles import SharedBaseRoles
    from rlhfkit.rollout.experience import make_experience
    from rlhfkit.trainers.checkpoint import NonFinite
    from rlhfkit.trainers.loop import build_optimizer
    from rlhfkit.trainers.online import GRPOConfig, learn, one_update

    path = tiny_model_dir("llama")
    prompts = [r["prompt"] for r in load_prompts(str(arithmetic_dir / "prompts_train.jsonl"))[:2] for _ in range(3)]
    cfg = GRPOConfig(prompts="unused", group_size=3, prompts_per_step=2, mini_batch_size=6, epochs=1,
                     model=ModelConfig(path=path), lora=LoraConfig(enabled=True, r=4, target_modules="all-linear"),
                     optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                     generation=GenerationConfig(max_new_tokens=6),
                     train=TrainConfig(out="unused", max_steps=1, on_nan="stop"))
    assert one_update(cfg)
    assert not one_update(dataclasses.replace(cfg, epochs=2))
    assert not one_update(dataclasses.replace(cfg, mini_batch_size=3))
    torch.manual_seed(0)
    roles = SharedBaseRoles(cfg.model, cfg.lora, torch.device("cpu"), critic=False)
    with torch.no_grad():  # a fresh adapter adds nothing: make it count
        for p in roles.actor_parameters():
            p.normal_(0, 0.05)
    tok = load_tokenizer(path)

    def score(prompts, texts):
        return torch.tensor([float(len(t)) for t in texts])

    kwargs = dict(beta=0.0, reward_clip=None, seeds=list(range(6)))
    full, _ = make_experience(roles, tok, prompts, score, cfg.generation, **kwargs)
    skip, stats = make_experience(roles, tok, prompts, score, cfg.generation, old_logprobs="none", reference=False,
                                  **kwargs)
    assert skip.old_logprobs is None and skip.ref_logprobs is None and "rollout/kl" not in stats.metrics
    assert torch.equal(skip.input_ids, full.input_ids)  # the same samples
    updated = []
    for exp in (full, skip):
        exp.advantages = STRATEGIES["grpo"].advantages(exp, cfg)
        copy_roles = copy.deepcopy(roles)
        optimizer = build_optimizer(copy_roles.actor_parameters(), cfg.optim, 1)
        metrics = learn(copy_roles, exp, cfg, "seq_mean_token_mean", optimizer, torch.Generator().manual_seed(0),
                        NonFinite("stop", None), 1)
        assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        updated.append([p.detach().clone() for p in copy_roles.actor_parameters()])
    assert "rollout/entropy" in metrics  # the skipped pass's entropy comes from the learn pass
    moved = max((a - p).abs().max().item() for a, p in zip(updated[0], roles.actor_parameters()))
    assert moved > 1e-4  # the update did something
    for a, b in zip(*updated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("command", ["grpo", "ppo"])
@pytest.mark.parametrize("setting, message", [
    (["--train.max_steps", "0"], "train.max_steps is the number of rollout steps: set it to 1 or more"),
    (["--train.batch_size", "7", "--train.epochs", "2"], "train.batch_size, train.epochs set, but a rollout step's"),
])
def test_rollout_trainers_refuse_the_supervised_batch_settings_they_do_not_read(tmp_path, capsys, command, setting,
                                                                                message):
    # max_steps 0 saved an untrained adapter as if done; batch_size, grad_accum and epochs were accepted and ignored
    rc = main([command, "--model", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"), *setting])
    assert rc == 2 and message in capsys.readouterr().err


def test_sequence_level_ratios_average_over_samples_unless_a_reduction_is_named():
    # GSPO's one ratio per sample, token-averaged, would weigh a 40-token sample 40x a 1-token one
    from rlhfkit.trainers.online import OnlineConfig, loss_reduction

    def reduction(advantage, level, named="auto"):
        return loss_reduction(OnlineConfig(prompts="p.jsonl", advantage=advantage, importance_sampling=level,
                                           loss_reduction=named))

    assert [reduction(a, "token") for a in ("grpo", "dr_grpo", "rloo", "reinforce_pp")] == [
        "seq_mean_token_mean", "token_sum_norm", "token_mean", "token_mean"]
    assert [reduction(a, "sequence") for a in ("grpo", "dr_grpo", "rloo", "reinforce_pp")] == [
        "seq_mean_token_mean", "token_sum_norm", "seq_mean_token_mean", "seq_mean_token_mean"]
    assert reduction("rloo", "sequence", "token_mean") == "token_mean"
