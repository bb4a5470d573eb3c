"""PPO roles and experience on tiny models: reference = adapters off, first-step ratios, both modes train."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.cli import main
from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig
from rlhfkit.models.forward import join_prompt_response, response_logprobs
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.roles import SeparateRoles, SharedBaseRoles
from rlhfkit.rollout.experience import Experience, make_experience

CPU = torch.device("cpu")
PROMPTS = ["User: Describe the cat.\nAssistant:", "User: Tell me about the old lake you saw today.\nAssistant:",
           "User: What is the park like?\nAssistant:"]


def _length_score(prompts, texts):
    return torch.tensor([float(len(t)) / 10 for t in texts])


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(out), "--train.max_steps", "2", "--train.batch_size", "8",
                 "--train.tensorboard", "false"]) == 0
    return str(out)


def test_shared_reference_equals_a_separately_loaded_sft_model(tiny_model_dir):
    path = tiny_model_dir("llama")
    roles = SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU)
    # move the actor away from the base so "adapters off" is a real difference
    for p in roles.actor_parameters():
        torch.nn.init.normal_(p, std=0.5)
    tok = load_tokenizer(path)
    batch = join_prompt_response([tok(p).input_ids for p in PROMPTS], [[10, 11, 12], [13], [14, 15]],
                                 tok.pad_token_id)
    sft = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        expected = response_logprobs(sft, batch)
        torch.testing.assert_close(roles.reference_logprobs(batch) * batch["action_mask"], expected,
                                   rtol=0, atol=1e-6)
        assert (roles.actor_logprobs(batch) * batch["action_mask"] - expected).abs().max() > 1e-3


@pytest.mark.parametrize("nan_in", ["actor", "critic"])
def test_a_role_s_non_finite_gradient_skips_both_roles_update(tiny_model_dir, nan_in):
    # train.on_nan skip: one role's NaN gradient once left the other role's update applied (and its schedule moved)
    from rlhfkit.advantages import masked_whiten
    from rlhfkit.config import OptimConfig
    from rlhfkit.trainers import ppo
    from rlhfkit.trainers.checkpoint import NonFinite
    from rlhfkit.trainers.loop import build_optimizer

    path = tiny_model_dir("llama")
    roles = SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU)
    gen = GenerationConfig(max_new_tokens=6)
    exp, _ = make_experience(roles, load_tokenizer(path), PROMPTS[:2], lambda p, t: torch.tensor([1.0, -1.0]), gen,
                             beta=0.1, seed=1, old_logprobs="rollout")
    exp.advantages = masked_whiten(exp.advantages, exp.action_mask)
    cfg = ppo.PPOConfig(mini_batch_size=2, ppo_epochs=1, generation=gen,
                        optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    actor, critic = (build_optimizer(params, cfg.optim, 1) for params in (roles.actor_parameters(),
                                                                          roles.critic_parameters()))
    (roles.actor_parameters() if nan_in == "actor" else roles.critic_parameters())[0].register_hook(
        lambda g: g * float("nan"))
    before = [p.detach().clone() for p in roles.actor_parameters() + roles.critic_parameters()]
    nonfinite = NonFinite("skip", None)
    assert ppo.learn(roles, exp, cfg, actor, critic, torch.Generator().manual_seed(0), nonfinite, 1) == {}
    assert nonfinite.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(roles.actor_parameters() + roles.critic_parameters(), before))
    assert [opt[1].last_epoch for opt in (actor, critic)] == [0, 0]  # neither schedule moved


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_first_update_starts_at_ratio_one(tiny_model_dir, rm_dir, mode):
    path = tiny_model_dir("llama")
    roles = (SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU) if mode == "shared"
             else SeparateRoles(ModelConfig(path=path), rm_dir, CPU))
    tok = load_tokenizer(path)
    exp, stats = make_experience(roles, tok, PROMPTS * 2, _length_score, GenerationConfig(max_new_tokens=8),
                                 beta=0.1, seed=1)
    assert exp.old_logprobs.shape == exp.action_mask.shape == exp.advantages.shape
    with torch.no_grad():
        now = roles.actor_logprobs(exp.batch()) * exp.action_mask
    torch.testing.assert_close(now, exp.old_logprobs, rtol=0, atol=1e-5)
    # a fresh actor equals the reference: the KL part of the reward is zero, the score sits at the last token
    assert stats.metrics["rollout/kl"] == pytest.approx(0.0, abs=1e-5)
    last = exp.action_mask.sum(-1) - 1
    rows = torch.arange(len(exp))
    torch.testing.assert_close(exp.rewards[rows, last], exp.scores.clamp(-5, 5), rtol=0, atol=1e-5)


def test_a_response_without_eos_loses_the_missing_eos_penalty_as_in_trl(tiny_model_dir):
    # TRL's missing_eos_penalty is positive and subtracted; it was added here (a TRL value of 1 rewarded cut-offs)
    path = tiny_model_dir("llama")
    roles = SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU)
    tok = load_tokenizer(path)
    lift = torch.zeros(len(tok))
    lift[tok.eos_token_id] = 6.0  # EOS likely enough to see responses with and without it
    roles.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + lift)
    exp, stats = make_experience(roles, tok, PROMPTS * 4, _length_score, GenerationConfig(max_new_tokens=3),
                                 beta=0.0, seed=1, missing_eos_penalty=2.0, reward_clip=None)
    responses = exp.input_ids[:, -exp.action_mask.shape[1]:]
    ended = responses[torch.arange(len(exp)), exp.action_mask.sum(-1) - 1] == tok.eos_token_id
    assert ended.any() and not ended.all()
    expected = _length_score(stats.prompts, stats.texts) - 2.0 * (~ended)
    torch.testing.assert_close(exp.scores, expected)
    # with a clip the proxy's score is clipped, not the penalty: a score clipped to -0.1 still loses 2
    exp, stats = make_experience(roles, tok, PROMPTS * 4, lambda p, t: -_length_score(p, t), GenerationConfig(
        max_new_tokens=3), beta=0.0, seed=1, missing_eos_penalty=2.0, reward_clip=0.1)
    rows = torch.arange(len(exp))
    last = exp.action_mask.sum(-1) - 1
    clipped = (-_length_score(stats.prompts, stats.texts)).clamp(-0.1, 0.1) - 2.0 * (~ended)
    torch.testing.assert_close(exp.rewards[rows, last], clipped)
    assert (clipped < -2).any()  # a cut-off response whose score was clipped, penalised beyond the clip


def test_experience_cat_repads_both_halves():
    def exp(p, a, fill):
        b = join_prompt_response([[fill] * p], [[fill] * a], 0)
        t = torch.full((1, a), float(fill)) * b["action_mask"]
        return Experience(b["input_ids"], b["attention_mask"], b["action_mask"], t, t, t, t, t, t,
                          torch.tensor([float(fill)]))

    cat = Experience.cat([exp(2, 3, 5), exp(4, 1, 7)], pad_token_id=0)
    assert cat.input_ids.tolist() == [[0, 0, 5, 5, 5, 5, 5], [7, 7, 7, 7, 7, 0, 0]]
    assert cat.action_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert cat.old_logprobs.tolist() == [[5, 5, 5], [7, 0, 0]]
    # the response still sits in the last A columns, so log-probs line up after the join
    assert cat.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]


def _rows(prompts, responses):
    """An experience of the given prompt / response ids, every per-token field its column index + 1 on the
    response tokens, the rows numbered in ``scores``."""
    b = join_prompt_response(prompts, responses, 0)
    t = (torch.arange(b["action_mask"].shape[1]) + 1.0) * b["action_mask"]
    return Experience(b["input_ids"], b["attention_mask"], b["action_mask"], t, t, t, t, t, t,
                      torch.arange(len(prompts)).float(), torch.tensor([True] * len(prompts)))


def test_trimmed_drops_the_columns_that_are_padding_in_every_row():
    buffer = _rows([[5, 6, 7], [8], [9, 9]], [[1, 2, 3, 4], [1], [2, 2]])
    mb = buffer[1:]  # a micro-batch of the two shorter rows, still at the buffer's width (3 + 4)
    assert mb.input_ids.shape == (2, 7)
    cut = mb.trimmed()
    assert cut.input_ids.tolist() == [[0, 8, 1, 0], [9, 9, 2, 2]]
    assert cut.attention_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert cut.action_mask.tolist() == [[1, 0], [1, 1]]
    for name in ("old_logprobs", "ref_logprobs", "old_values", "rewards", "advantages", "returns"):
        assert getattr(cut, name).tolist() == [[1.0, 0.0], [1.0, 2.0]], name
    assert cut.scores.tolist() == [1.0, 2.0] and cut.ended.tolist() == [True, True]
    assert buffer.trimmed() is buffer  # nothing to drop: the same object


def test_trimmed_keeps_a_column_of_each_half_and_missing_fields():
    mb = _rows([[5], [6, 6]], [[], [3, 3]])[:1]  # a row with an empty response: no response token at all
    mb.ref_logprobs = None
    cut = mb.trimmed()
    assert cut.input_ids.tolist() == [[5, 0]] and cut.action_mask.tolist() == [[0]]
    assert cut.ref_logprobs is None and cut.old_logprobs.tolist() == [[0.0]]
    empty = mb[0:0].trimmed()  # no rows (a spare micro-batch is a real row, but an empty slice must not fail)
    assert empty.input_ids.shape == (0, 2) and empty.action_mask.shape == (0, 1)


def test_trimmed_rows_give_the_same_response_logprobs(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    responses = [tok(" a small cat sat on the warm mat and slept")["input_ids"], tok(" yes")["input_ids"],
                 tok(" it is green")["input_ids"]]
    buffer = _rows(prompts, responses)
    mb = buffer[torch.tensor([0, 2])]  # the two shorter prompts, a long and a short response
    cut = buffer[torch.tensor([2])].trimmed()  # a short prompt and response: both halves narrower
    assert cut.input_ids.shape[1] < buffer.input_ids.shape[1] and cut.action_mask.shape[1] == len(responses[2])
    with torch.no_grad():
        for part in (mb, buffer[torch.tensor([2])]):
            whole = response_logprobs(model, part.batch())
            short = response_logprobs(model, part.trimmed().batch())
            torch.testing.assert_close(short, whole[:, : short.shape[1]], rtol=1e-5, atol=1e-6)
            assert not whole[:, short.shape[1]:].any()  # nothing cut but padding
    assert cut.action_mask.sum() == buffer[torch.tensor([2])].action_mask.sum()


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_ppo_command_trains_in_both_modes(tiny_model_dir, task_dir, rm_dir, tmp_path, mode):
    path = tiny_model_dir("llama")
    out = tmp_path / "ppo"
    rc = main(["ppo", "--model", path, "--reward_model", rm_dir, "--prompts", str(task_dir / "prompts_train.jsonl"),
               "--out", str(out), "--mode", mode, "--train.max_steps", "2", "--rollout_batch_size", "8",
               "--mini_batch_size", "4", "--optim.lr", "1e-2", "--generation.max_new_tokens", "8",
               "--task", "describe", "--train.tensorboard", "false"])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 2
    for key in ("rollout/score", "rollout/kl", "rollout/gold", "rollout/entropy", "policy/clip_frac",
                "policy/approx_kl", "loss/value", "value/value_clip_frac", "value/explained_variance",
                "rollout/response_length", "rollout/eos_share", "time/generate", "time/score", "time/learn"):
        assert key in logs[-1], key
    assert logs[-1]["rollout/kl"] != 0.0  # the actor moved away from the reference
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1] * 4 + [2] * 4
    assert {"prompt", "completion", "score", "ended"} <= samples[0].keys()
    if mode == "shared":
        assert (out / "adapter_config.json").is_file() and (out / "critic" / "value_head.safetensors").is_file()
        # the actor adapts the (tied) output head too; the merged export must give the same logits
        assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
        from rlhfkit.models.load import load_causal_lm

        adapted = load_causal_lm(ModelConfig(path=str(out)), CPU)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    else:
        before, after = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(out)
        assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
        assert (out / "critic" / "config.json").is_file()


def test_shared_roles_optimise_both_adapters_and_the_value_head(tiny_model_dir):
    from rlhfkit.config import OptimConfig
    from rlhfkit.trainers.loop import build_optimizer

    roles = SharedBaseRoles(ModelConfig(path=tiny_model_dir("llama")), LoraConfig(enabled=True, r=4), CPU)
    for params in (roles.actor_parameters(), roles.critic_parameters()):
        optimizer, _ = build_optimizer(params, OptimConfig(), 1)
        assert len(optimizer.param_groups[0]["params"]) == len(params) > 2


@pytest.mark.parametrize("arch, head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("gpt_neox", "embed_out")])
def test_lora_targets_with_head_adds_the_output_layer(tiny_model_dir, arch, head):
    from rlhfkit.models.load import lora_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
    targets = lora_targets(model, "all-linear+head")
    output_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert output_name in targets and output_name in (head, "lm_head")
    assert len(targets) > 1 and lora_targets(model, "all-linear") == "all-linear"
    assert lora_targets(model, "q_proj,v_proj") == ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def lora_rm_dir(tiny_model_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_rm")
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(out), "--lora.enabled", "true", "--lora.r", "4", "--train.max_steps", "3",
                 "--train.batch_size", "8", "--optim.lr", "1e-2", "--train.tensorboard", "false"]) == 0
    return str(out)


def test_reward_as_third_adapter_scores_like_the_separate_reward_model(tiny_model_dir, lora_rm_dir):
    from rlhfkit.models.reward import RewardModel

    path = tiny_model_dir("llama")
    roles = SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU)
    for p in roles.actor_parameters():  # a trained-looking actor must not leak into the reward's scores
        torch.nn.init.normal_(p, std=0.5)
    roles.add_reward_adapter(lora_rm_dir, path)
    texts = [" The cat is calm.", " The lake is grim and cold.", " Hello."]
    expected = RewardModel.from_pretrained(lora_rm_dir, device=CPU).score(PROMPTS, texts)
    torch.testing.assert_close(roles.reward_scores(load_tokenizer(path), PROMPTS, texts), expected,
                               rtol=1e-5, atol=1e-5)
    # and the actor is active again afterwards
    batch = join_prompt_response([[5, 6, 7]], [[8, 9]], 0)
    with torch.no_grad():
        assert (roles.actor_logprobs(batch) - roles.reference_logprobs(batch)).abs().max() > 1e-3


def test_adapter_switches_give_what_peft_switches_give(tiny_model_dir, lora_rm_dir):
    path = tiny_model_dir("llama")
    roles = SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU)
    roles.add_reward_adapter(lora_rm_dir, path)
    with torch.no_grad():
        for p in roles.actor_parameters() + roles.critic_parameters():
            p.normal_(0, 0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def hidden():
        with torch.no_grad():
            return roles.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]

    outputs = {}
    for name in ("critic", "reward", "default"):
        roles._use(name)
        outputs[name] = hidden()
        assert roles.model.active_adapter == name
        with roles.reference():
            outputs[name, "off"] = hidden()
        torch.testing.assert_close(hidden(), outputs[name])  # back on, the same adapter
        # every trainable adapter stays trainable, whatever is active; the reward adapter stays frozen
        assert all(p.requires_grad for p in roles.actor_parameters() + roles.critic_parameters())
        assert not any(p.requires_grad for n, p in roles.model.named_parameters() if ".reward." in n)
    for name in ("critic", "reward", "default"):
        roles.model.set_adapter(name)  # peft's own switch
        torch.testing.assert_close(outputs[name], hidden(), rtol=0, atol=0)
        with roles.model.disable_adapter():
            torch.testing.assert_close(outputs[name, "off"], hidden(), rtol=0, atol=0)
    assert (outputs["critic"] - outputs["default"]).abs().max() > 1e-3  # the adapters differ: the check means something
    assert (outputs["default"] - outputs["default", "off"]).abs().max() > 1e-3


def test_an_adaptive_kl_from_beta_zero_is_refused():
    from rlhfkit.trainers.ppo import PPOConfig

    with pytest.raises(ValueError, match="from 0 it stays 0: set --beta above 0"):
        PPOConfig(adaptive_kl=True, beta=0.0)


def test_reward_adapter_on_another_base_is_refused(tiny_model_dir, lora_rm_dir):
    roles = SharedBaseRoles(ModelConfig(path=tiny_model_dir("gpt2")), LoraConfig(enabled=True, r=4), CPU)
    with pytest.raises(ValueError, match="was trained on"):
        roles.add_reward_adapter(lora_rm_dir, tiny_model_dir("gpt2"))


def test_ppo_with_the_reward_as_third_adapter_trains(tiny_model_dir, task_dir, lora_rm_dir, tmp_path):
    out = tmp_path / "ppo"
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", lora_rm_dir,
                 "--prompts", str(task_dir / "prompts_train.jsonl"), "--out", str(out), "--train.max_steps", "2",
                 "--rollout_batch_size", "8", "--mini_batch_size", "4", "--optim.lr", "1e-2",
                 "--generation.max_new_tokens", "8", "--train.tensorboard", "false", "--train.save_every", "2"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(r["rollout/score"] == r["rollout/score"] for r in logs)  # finite, not NaN
    # what it trained is saved (the actor, the critic); the frozen reward adapter, re-saved without its score head,
    # was a reward model no command could load
    assert (out / "adapter_model.safetensors").is_file() and (out / "critic" / "adapter_model.safetensors").is_file()
    assert not (out / "reward").exists() and not (out / "checkpoints" / "step-2" / "reward").exists()


def test_ppo_evaluates_held_out_prompts_with_its_reward_model(tiny_model_dir, task_dir, rm_dir, tmp_path, capsys):
    # --eval_prompts was read only with --task describe (the gold reward): on one's own data it did nothing
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.trainers.ppo import score_samples

    out, test = tmp_path / "ppo", task_dir / "prompts_test.jsonl"
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", rm_dir,
                 "--prompts", str(task_dir / "prompts_train.jsonl"), "--eval_prompts", str(test), "--out", str(out),
                 "--train.max_steps", "2", "--train.eval_every", "1", "--train.log_every", "2",
                 "--rollout_batch_size", "8", "--mini_batch_size", "4", "--optim.lr", "1e-2",
                 "--generation.max_new_tokens", "8", "--train.tensorboard", "false"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval/score" in r, "rollout/score" in r) for r in logs] == [(1, True, False), (2, False, True),
                                                                                   (2, True, False)]
    prompts = [json.loads(line)["prompt"] for line in test.read_text().splitlines()]
    again = score_samples(load_causal_lm(ModelConfig(path=str(out)), CPU), load_tokenizer(str(out)), prompts,
                          RewardModel.from_pretrained(rm_dir).score, GenerationConfig(max_new_tokens=8), 0)
    assert logs[-1]["eval/score"] == pytest.approx(again["eval/score"], abs=1e-4)  # the saved actor, scored again
    # a run writing into a model it reads would remove that model's weights when it saves
    rm_files = sorted(p.name for p in Path(rm_dir).iterdir())
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", rm_dir, "--prompts", str(test),
                 "--out", rm_dir]) == 2
    assert f"--train.out {rm_dir} is {rm_dir}, a model this run reads" in capsys.readouterr().err
    assert sorted(p.name for p in Path(rm_dir).iterdir()) == rm_files
    # the gold reward of --task describe is the built-in task's: other prompts are refused
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "Q: 2+2?\\nA:"}\n')
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", rm_dir, "--prompts", str(mine),
                 "--task", "describe", "--out", str(tmp_path / "x")]) == 2
    assert "1 of 1 prompts are not the built-in describe task's" in capsys.readouterr().err


def test_old_logprobs_from_the_rollout_equal_the_actor_pass(tiny_model_dir):
    roles = SharedBaseRoles(ModelConfig(path=tiny_model_dir("llama")), LoraConfig(enabled=True, r=4), CPU)
    torch.manual_seed(0)  # the adapter's draw, whatever ran before
    with torch.no_grad():  # a fresh adapter adds nothing: make the actor differ from the reference
        for p in roles.actor_parameters():
            p.normal_(0, 0.05)
    tok = load_tokenizer(tiny_model_dir("llama"))
    kwargs = dict(beta=0.1, seed=1, values=False)
    gen = GenerationConfig(max_new_tokens=8, temperature=0.9)
    forward, f_stats = make_experience(roles, tok, PROMPTS * 2, _length_score, gen, old_logprobs="forward", **kwargs)
    rollout, r_stats = make_experience(roles, tok, PROMPTS * 2, _length_score, gen, old_logprobs="rollout", **kwargs)
    assert torch.equal(forward.input_ids, rollout.input_ids)
    torch.testing.assert_close(rollout.old_logprobs, forward.old_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout.rewards, forward.rewards, rtol=0, atol=1e-5)  # −β·kl is built on them
    assert r_stats.metrics["rollout/entropy"] == pytest.approx(f_stats.metrics["rollout/entropy"], abs=1e-5)
    assert r_stats.metrics["rollout/kl"] == pytest.approx(f_stats.metrics["rollout/kl"], abs=1e-5)
    assert abs(r_stats.metrics["rollout/kl"]) > 1e-3  # the actor differs from the reference (k1: either sign)
    assert forward.old_values is forward.advantages is forward.returns is None  # values=False: learn computes them


def test_one_update_takes_the_critic_values_from_its_learn_forward(tiny_model_dir):
    import copy
    import dataclasses

    from rlhfkit.advantages import FixedKLController
    from rlhfkit.config import OptimConfig
    from rlhfkit.rollout.engine import HFRolloutEngine
    from rlhfkit.trainers.checkpoint import NonFinite
    from rlhfkit.trainers.loop import build_optimizer
    from rlhfkit.trainers.ppo import PPOConfig, one_update, ppo_step

    cfg = PPOConfig(prompts="unused", rollout_batch_size=6, mini_batch_size=6, ppo_epochs=1, beta=0.1,
                    model=ModelConfig(path=tiny_model_dir("llama")), lora=LoraConfig(enabled=True, r=4),
                    optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                    generation=GenerationConfig(max_new_tokens=8))
    separate = dataclasses.replace(cfg, critic_in_learn=False)
    assert one_update(cfg) and not one_update(separate)
    assert not one_update(dataclasses.replace(cfg, ppo_epochs=2))
    assert not one_update(dataclasses.replace(cfg, mini_batch_size=3))
    torch.manual_seed(0)
    roles = SharedBaseRoles(cfg.model, cfg.lora, CPU)
    with torch.no_grad():
        for p in roles.actor_parameters() + roles.critic_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok = load_tokenizer(cfg.model.path)
    results = []
    for c in (cfg, separate):
        r = copy.deepcopy(roles)
        actor_opt = build_optimizer(r.actor_parameters(), c.optim, 1)
        critic_opt = build_optimizer(r.critic_parameters(), c.optim, 1)
        engine = HFRolloutEngine(r.generation_model(), tok, c.generation)
        metrics = ppo_step(0, r, engine, tok, PROMPTS * 2, _length_score, None, FixedKLController(c.beta), c,
                           actor_opt, critic_opt, torch.Generator().manual_seed(0), NonFinite("stop", None))
        results.append((metrics, [p.detach().clone() for p in r.actor_parameters() + r.critic_parameters()]))
    (once, after_once), (twice, after_twice) = results
    for key in ("loss/policy", "loss/value", "value/explained_variance", "rollout/advantage_mean", "rollout/kl",
                "policy/ratio_mean"):
        assert once[key] == pytest.approx(twice[key], abs=1e-5), key
    assert once["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    moved = max((a - p).abs().max().item() for a, p in zip(after_once, roles.actor_parameters() +
                                                              roles.critic_parameters()))
    assert moved > 1e-3  # the step did something
    for a, b in zip(after_once, after_twice):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_reward_adapter_scores_the_sampled_ids(tiny_model_dir, lora_rm_dir):
    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.models.roles import RewardAdapterScores

    path = tiny_model_dir("llama")
    tok = load_tokenizer(path)
    roles = SharedBaseRoles(ModelConfig(path=path), LoraConfig(enabled=True, r=4), CPU)
    roles.add_reward_adapter(lora_rm_dir, path)
    scorer = RewardAdapterScores(roles, tok)
    texts = [" The cat is calm.", " The lake is grim and cold.", " Hello."]
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    with_eos = [ids[0] + [tok.eos_token_id], ids[1], ids[2] + [tok.eos_token_id]]  # ended by EOS or cut off
    by_text = scorer(PROMPTS, texts)
    torch.testing.assert_close(scorer.score_ids(prompt_ids, with_eos), by_text, rtol=1e-5, atol=1e-5)
    assert by_text.std() > 1e-4  # the rows score differently: the comparison means something
    # ids that decode and encode again into other tokens: the sampled ones are scored, not the round trip's
    split = [tok.convert_tokens_to_ids(list(tok.convert_ids_to_tokens(i)[0])) + i[1:] for i in ids]
    assert [tok.decode(s) for s in split] == [tok.decode(i) for i in ids] and split != ids
    assert not torch.allclose(scorer.score_ids(prompt_ids, split), by_text, atol=1e-4)
    # a row that stopped at another stop id of the model (an end-of-turn token) is scored as the text path
    # scores it: that token gives way to the EOS the reward model was trained with, not followed by it
    end_of_turn = tok.convert_tokens_to_ids(".")
    roles.model.get_base_model().generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    by_turn = RewardAdapterScores(roles, tok)
    assert by_turn.stops == [tok.eos_token_id, end_of_turn]
    ended = [ids[0][:-1] + [end_of_turn], ids[1][:-1] + [end_of_turn], ids[2] + [tok.eos_token_id]]
    torch.testing.assert_close(by_turn.score_ids(prompt_ids, ended),
                               scorer(PROMPTS, [" The cat is calm", " The lake is grim and cold", " Hello."]),
                               rtol=1e-5, atol=1e-5)


def test_make_experience_gives_a_token_scorer_the_sampled_ids(tiny_model_dir):
    roles = SharedBaseRoles(ModelConfig(path=tiny_model_dir("llama")), LoraConfig(enabled=True, r=4), CPU)
    tok = load_tokenizer(tiny_model_dir("llama"))
    seen = {}

    class Scorer:
        def __call__(self, prompts, texts):
            raise AssertionError("texts scored where ids were wanted")

        def score_ids(self, prompt_ids, completion_ids):
            seen["ids"] = prompt_ids, completion_ids
            return torch.tensor([float(len(c)) for c in completion_ids])

    exp, stats = make_experience(roles, tok, PROMPTS, Scorer(), GenerationConfig(max_new_tokens=6), beta=0.0, seed=2)
    prompt_ids, completion_ids = seen["ids"]
    assert exp.scores.tolist() == [float(len(c)) for c in completion_ids]
    assert exp.action_mask.sum(-1).tolist() == [float(len(c)) for c in completion_ids]  # the very sampled ids
    assert [tok.decode(c, skip_special_tokens=True) for c in completion_ids] == stats.texts


@pytest.mark.parametrize("target_kl, updates", [(1e-9, 1), (1e9, 4)])
def test_target_kl_stops_a_step_s_updates(tiny_model_dir, task_dir, lora_rm_dir, tmp_path, target_kl, updates):
    out = tmp_path / "ppo"
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", lora_rm_dir,
                 "--prompts", str(task_dir / "prompts_train.jsonl"), "--out", str(out), "--train.max_steps", "2",
                 "--rollout_batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs", "2", "--optim.lr", "1e-2",
                 "--target_kl", str(target_kl), "--generation.max_new_tokens", "8",
                 "--train.tensorboard", "false"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 2 epochs × 2 mini-batches; a tiny target stops at the second (the first starts from the rollout policy)
    assert [r["policy/updates"] for r in logs] == [updates] * 2
    assert [r["policy/early_stop"] for r in logs] == [float(updates < 4)] * 2


@pytest.mark.parametrize("mode, extra", [
    ("shared", []),
    ("shared", ["--target_kl", "1e-9"]),  # the second mini-batch's gradients computed, then dropped: none leak
    ("separate", []),
])
def test_micro_batches_add_up_to_the_mini_batch_s_update(tiny_model_dir, task_dir, rm_dir, tmp_path, mode, extra):
    # OpenRLHF's micro_train_batch_size: each mini-batch of 4 rollouts in forwards and backwards of at most 3
    runs = {}
    for name, micro in (("whole", []), ("micro", ["--micro_batch_size", "3"])):
        out = tmp_path / name
        assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", rm_dir, "--mode", mode,
                     "--prompts", str(task_dir / "prompts_train.jsonl"), "--out", str(out), "--train.max_steps", "2",
                     "--rollout_batch_size", "8", "--mini_batch_size", "4", "--optim.lr", "1e-3",
                     "--generation.max_new_tokens", "8", "--train.tensorboard", "false", *extra, *micro]) == 0
        weights = {f"{p.relative_to(out)}:{k}": v for p in sorted(out.rglob("*.safetensors"))
                   for k, v in load_file(str(p)).items()}
        runs[name] = weights, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (whole, whole_logs), (micro, micro_logs) = runs["whole"], runs["micro"]
    assert whole.keys() == micro.keys()
    # float rounding apart, through Adam: a mini-batch's repeated prompts run their shared prefix once
    # (forward.shared_prefix_forward), a micro-batch without repeats the plain forward (in float64, prefixes not
    # shared, the gradients agree within 3e-16)
    for name, value in whole.items():
        assert (micro[name] - value).norm() <= 1e-4 * value.norm().clamp(min=1e-12), name
    for key in ("loss/policy", "loss/value", "grad_norm/actor", "grad_norm/critic", "policy/approx_kl",
                "value/value_clip_frac", "rollout/kl"):
        assert [r[key] for r in micro_logs] == pytest.approx([r[key] for r in whole_logs], rel=1e-4, abs=1e-6), key
    if extra:
        assert [r["policy/updates"] for r in micro_logs] == [1, 1]


@pytest.mark.parametrize("which", ["full", "lora"])
def test_a_critic_from_the_reward_model_trains_in_full_and_starts_on_the_rewards_scale(tiny_model_dir, rm_dir,
                                                                                        lora_rm_dir, which):
    # a LoRA reward model's adapter is merged into a trainable critic (it was loaded frozen: "no trainable
    # parameters"), and the reward model's score normalisation applies to the critic's values, as to its scores
    from rlhfkit.data.collate import collate, encode_example
    from rlhfkit.models.reward import RewardModel, sequence_scores

    path, rm = tiny_model_dir("llama"), {"full": rm_dir, "lora": lora_rm_dir}[which]
    roles = SeparateRoles(ModelConfig(path=path), rm, CPU)
    assert all(p.requires_grad for p in roles.critic_parameters())
    tok = load_tokenizer(path)
    prompts, responses = ["User: Describe the cat.\nAssistant:", "Hello"], [" The cat is calm.", " Hi there"]
    batch = collate([encode_example(tok, p, r, 64) for p, r in zip(prompts, responses)], tok.pad_token_id)
    with torch.no_grad():
        raw = sequence_scores(roles.critic, batch["input_ids"], batch["attention_mask"])
    stats = roles.critic_stats
    assert stats is not None and stats["std"] != 1.0  # rlhfkit rm normalises by default
    torch.testing.assert_close((raw - stats["mean"]) / stats["std"], RewardModel.from_pretrained(rm, CPU).score(
        prompts, responses), rtol=1e-4, atol=1e-4)
    values = roles.critic_values(join_prompt_response([tok(p).input_ids for p in prompts],
                                                      [tok(r).input_ids for r in responses], tok.pad_token_id))
    with torch.no_grad():
        roles.critic_stats = None
        unscaled = roles.critic_values(join_prompt_response([tok(p).input_ids for p in prompts],
                                                            [tok(r).input_ids for r in responses], tok.pad_token_id))
    torch.testing.assert_close(values.detach(), (unscaled - stats["mean"]) / stats["std"])


def test_shared_mode_refuses_an_adapter_directory_and_full_training(tiny_model_dir, lora_rm_dir, task_dir, tmp_path,
                                                                    capsys):
    # an SFT adapter as --model: peft re-initialised it as the actor, silently training from the bare base
    from rlhfkit.config import ConfigError

    with pytest.raises(ConfigError, match="is a LoRA adapter directory: .* merge it first .*rlhfkit export"):
        SharedBaseRoles(ModelConfig(path=lora_rm_dir), LoraConfig(enabled=True, r=4), CPU)
    rc = main(["ppo", "--model", tiny_model_dir("llama"), "--prompts", str(task_dir / "prompts_train.jsonl"),
               "--reward_model", lora_rm_dir, "--lora.enabled", "false", "--out", str(tmp_path / "x")])
    assert rc == 2 and "to train every weight set --mode separate" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ppo", "reinforce-pp"])
def test_the_schedule_counts_the_updates_a_small_prompts_file_gives(tiny_model_dir, task_dir, rm_dir, tmp_path,
                                                                    command):
    # 6 prompts and a batch of 64 asked for: a step holds 6; the cosine schedule ends at 0 after the updates
    # actually taken (it was sized for 64 prompts a step and ended near the peak)
    prompts = tmp_path / "six.jsonl"
    prompts.write_text("".join((task_dir / "prompts_train.jsonl").read_text().splitlines(keepends=True)[:6]))
    common = ["--model", tiny_model_dir("llama"), "--prompts", str(prompts), "--out", str(tmp_path / command),
              "--train.max_steps", "2", "--mini_batch_size", "3", "--generation.max_new_tokens", "4",
              "--optim.lr", "1e-3", "--optim.schedule", "cosine", "--optim.warmup_steps", "0",
              "--train.tensorboard", "false"]
    if command == "ppo":
        args = ["ppo", *common, "--reward_model", rm_dir, "--rollout_batch_size", "64", "--ppo_epochs", "1"]
    else:
        args = ["reinforce-pp", *common, "--rewards", "my_length:score", "--prompts_per_step", "64",
                "--group_size", "1"]  # its baseline is the batch's: one sample a prompt will do
        (tmp_path / "my_length.py").write_text("def score(prompts, completions, **columns):\n"
                                               "    return [len(c) / 10 for c in completions]\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        assert main(args) == 0
    finally:
        sys.path.remove(str(tmp_path))
    logs = [json.loads(line) for line in (tmp_path / command / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["train/lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))  # 2 of 4 updates
    assert logs[1]["train/lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_critic_started_from_a_reward_model_with_another_tokenizer_is_refused(tiny_model_dir, rm_dir, task_dir,
                                                                               tmp_path, capsys):
    # the critic reads the policy's sampled ids: under another vocabulary they would be other words
    import shutil

    from rlhfkit.config import ConfigError
    from rlhfkit.models.load import check_same_tokenizer

    policy = load_tokenizer(tiny_model_dir("llama"))
    check_same_tokenizer(policy, rm_dir, "the reward model", "")  # trained on the policy's base: accepted
    other = tmp_path / "rm"
    shutil.copytree(rm_dir, other)
    grown = load_tokenizer(rm_dir)
    grown.add_tokens(["<extra>"])
    grown.save_pretrained(other)
    with pytest.raises(ConfigError, match=rf"the reward model {other} has another tokenizer than the policy's"):
        check_same_tokenizer(policy, str(other), "the reward model", "")
    rc = main(["ppo", "--model", tiny_model_dir("llama"), "--prompts", str(task_dir / "prompts_train.jsonl"),
               "--reward_model", str(other), "--mode", "separate", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--critic_init sft" in capsys.readouterr().err


def test_a_model_without_a_trained_score_head_is_refused_as_a_reward(tiny_model_dir, task_dir, tmp_path, capsys):
    # a causal LM loads as a classifier with a random score head: PPO, GRPO and eval-rm scored noise
    from rlhfkit.config import ConfigError
    from rlhfkit.models.reward import RewardModel

    causal = tiny_model_dir("llama")
    with pytest.raises(ConfigError, match=rf"{causal} is not a reward model: it is a LlamaForCausalLM, without a "
                                          "trained score head"):
        RewardModel.from_pretrained(causal, CPU)
    for argv in (["ppo", "--model", causal, "--reward_model", causal, "--prompts",
                  str(task_dir / "prompts_train.jsonl"), "--out", str(tmp_path / "ppo")],
                 ["eval-rm", "--model", causal, "--data", str(task_dir / "preference.jsonl")]):
        assert main(argv) == 2 and "is not a reward model" in capsys.readouterr().err
    assert not (tmp_path / "ppo").exists()  # refused before the run starts


def test_an_exported_lora_reward_model_keeps_its_score_head(lora_rm_dir, tmp_path):
    # export merged the adapter into a causal LM: the score head and the normalisation were lost
    from rlhfkit.models.reward import NORMALIZATION_FILE, RewardModel

    assert main(["export", "--model", lora_rm_dir, "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == load_tokenizer(lora_rm_dir).pad_token_id is not None
    assert (tmp_path / "merged" / NORMALIZATION_FILE).is_file() == (Path(lora_rm_dir) / NORMALIZATION_FILE).is_file()
    prompts, texts = PROMPTS, [" The cat is calm.", " The lake is grim and cold.", " Hello."]
    adapter = RewardModel.from_pretrained(lora_rm_dir, CPU).score(prompts, texts)
    torch.testing.assert_close(RewardModel.from_pretrained(str(tmp_path / "merged"), CPU).score(prompts, texts),
                               adapter, rtol=1e-4, atol=1e-5)
    assert adapter.std() > 1e-4


def test_after_chat_prompts_a_token_scorer_is_given_the_texts(tiny_model_dir):
    # its training wrote the template's end of turn (and what follows it) after a reply: the sampled stop id
    # alone is not that, so the texts go through the template as they did in training
    roles = SharedBaseRoles(ModelConfig(path=tiny_model_dir("llama")), LoraConfig(enabled=True, r=4), CPU)
    tok = load_tokenizer(tiny_model_dir("llama"))
    seen = {}

    class Scorer:
        def __call__(self, prompts, texts):
            seen["texts"] = prompts, texts
            return torch.zeros(len(texts))

        def score_ids(self, prompt_ids, completion_ids):
            raise AssertionError("ids scored after chat prompts")

    chat = [[{"role": "user", "content": "Describe the cat."}], [{"role": "user", "content": "Hi."}]]
    exp, _ = make_experience(roles, tok, chat, Scorer(), GenerationConfig(max_new_tokens=4), beta=0.0, seed=2)
    assert seen["texts"][0] == chat and len(seen["texts"][1]) == 2


def test_a_reward_model_is_refused_where_a_language_model_is_wanted(rm_dir, lora_rm_dir, capsys):
    # loaded as a causal LM, a classifier got a random output head: generate wrote noise without a word
    from rlhfkit.config import ConfigError
    from rlhfkit.models.load import load_causal_lm

    for path in (rm_dir, lora_rm_dir):
        with pytest.raises(ConfigError, match=rf"{path} is a reward model \(a sequence classifier\)"):
            load_causal_lm(ModelConfig(path=path), CPU)
    assert main(["generate", "--model", rm_dir, "--prompt", "Hi"]) == 2
    assert "is a reward model" in capsys.readouterr().err


def _ppo(tiny_model_dir, task_dir, rm_dir, out, *extra):
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", rm_dir,
                 "--prompts", str(task_dir / "prompts_train.jsonl"), "--out", str(out), "--rollout_batch_size", "8",
                 "--optim.lr", "1e-3", "--generation.max_new_tokens", "8", "--train.tensorboard", "false",
                 *extra]) == 0
    weights = {f"{p.relative_to(out)}:{k}": v for p in sorted(out.rglob("*.safetensors"))
               for k, v in load_file(str(p)).items()}
    return weights, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_a_chunked_head_trains_ppo_to_the_same_weights(tiny_model_dir, task_dir, rm_dir, tmp_path, mode, head_calls):
    # the reference's pass (no gradients) and the actor's learn passes with the entropy bonus (with gradients), the
    # head run on 3 response tokens at a time; two updates a step (the old log-probs come from the sampler)
    args = ["--mode", mode, "--train.max_steps", "2", "--mini_batch_size", "4", "--entropy_coef", "0.1"]
    whole, whole_logs = _ppo(tiny_model_dir, task_dir, rm_dir, tmp_path / "whole", *args)
    head_calls.clear()
    chunked, chunked_logs = _ppo(tiny_model_dir, task_dir, rm_dir, tmp_path / "chunked", *args, "--logits_chunk", "3")
    assert head_calls == {(3, False, "none"), (3, True, "grad")}
    assert whole.keys() == chunked.keys()
    for name, value in whole.items():  # float rounding, through Adam (test_forward: the passes agree within 1e-5)
        assert (chunked[name] - value).norm() <= 1e-4 * value.norm().clamp(min=1e-12), name
    for key in ("loss/policy", "policy/entropy", "policy/approx_kl", "rollout/entropy", "rollout/kl"):
        assert [r[key] for r in chunked_logs] == pytest.approx([r[key] for r in whole_logs], rel=1e-4, abs=1e-6), key


def test_the_entropy_bonus_is_the_rollout_s_entropy_in_one_update(tiny_model_dir, task_dir, rm_dir, tmp_path):
    # one update from the rollout policy (learn_once): the learn pass's token-mean entropy is the rollout's, and
    # the actor's loss is the clipped surrogate's minus entropy_coef times it; the update differs from the plain one
    args = ["--train.max_steps", "1", "--ppo_epochs", "1", "--mini_batch_size", "8"]
    plain, (plain_row,) = _ppo(tiny_model_dir, task_dir, rm_dir, tmp_path / "plain", *args)
    bonus, (row,) = _ppo(tiny_model_dir, task_dir, rm_dir, tmp_path / "bonus", *args, "--entropy_coef", "0.1")
    assert "policy/entropy" not in plain_row and row["rollout/entropy"] > 0.1
    assert row["policy/entropy"] == pytest.approx(row["rollout/entropy"], rel=1e-5)
    assert row["loss/policy"] == pytest.approx(plain_row["loss/policy"] - 0.1 * row["policy/entropy"], abs=1e-6)
    assert row["loss/value"] == pytest.approx(plain_row["loss/value"], rel=1e-6)
    assert any(not torch.equal(bonus[k], v) for k, v in plain.items() if "critic" not in k)


def test_a_reward_model_directory_loads_as_the_run_s_models_do(tiny_model_dir, task_dir, rm_dir, tmp_path,
                                                                monkeypatch):
    # it had loaded at dtype auto whatever model.dtype said (bf16 on a GPU for a run asking float32)
    import rlhfkit.trainers.ppo as ppo

    class Stop(Exception):
        pass

    def spy(path, device, **kwargs):
        raise Stop(kwargs)

    monkeypatch.setattr(ppo.RewardModel, "from_pretrained", spy)
    with pytest.raises(Stop) as stopped:
        main(["ppo", "--model", tiny_model_dir("llama"), "--reward_model", rm_dir, "--prompts",
              str(task_dir / "prompts_train.jsonl"), "--out", str(tmp_path / "ppo"), "--mode", "separate",
              "--model.dtype", "float32", "--train.max_steps", "1", "--rollout_batch_size", "8"])
    assert stopped.value.args[0] == {"dtype": "float32", "trust_remote_code": False, "allow_pickle": False}


def test_a_ppo_run_of_the_other_mode_leaves_nothing_of_the_earlier_one_in_its_directory(tiny_model_dir, task_dir,
                                                                                         lora_rm_dir, rm_dir,
                                                                                         tmp_path):
    # shared then separate: the value head beside the full critic had made it "an adapter and a value head";
    # separate then shared: the full critic's score statistics stayed. A reward model kept at OUT/reward, the one
    # the run reads, is left as it is
    import shutil

    out = tmp_path / "ppo"
    common = ["ppo", "--model", tiny_model_dir("llama"), "--prompts", str(task_dir / "prompts_train.jsonl"),
              "--out", str(out), "--train.max_steps", "1", "--rollout_batch_size", "8", "--mini_batch_size", "8",
              "--generation.max_new_tokens", "6", "--train.tensorboard", "false",
              "--train.overwrite_output_dir", "true"]
    shutil.copytree(lora_rm_dir, out / "reward")
    kept = {p.name: p.read_bytes() for p in (out / "reward").iterdir() if p.is_file()}
    assert main([*common, "--mode", "shared", "--reward_model", str(out / "reward"), "--train.save_every", "1"]) == 0
    assert (out / "critic" / "value_head.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in (out / "reward").iterdir() if p.is_file()} == kept
    assert main([*common, "--mode", "separate", "--reward_model", rm_dir]) == 0
    assert not (out / "critic" / "value_head.safetensors").exists() and (out / "critic" / "model.safetensors").is_file()
    assert (out / "critic" / "score_normalization.json").is_file()
    assert main([*common, "--mode", "shared", "--reward_model", rm_dir]) == 0
    assert not (out / "critic" / "score_normalization.json").exists()
    assert not (out / "critic" / "model.safetensors").exists() and (out / "critic" / "value_head.safetensors").is_file()
