"""Reward model: scores read at the last real token, whatever the padding or the batch."""

import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhfkit.cli import main
from rlhfkit.config import ConfigError, ModelConfig
from rlhfkit.data.collate import collate, encode_example, pack
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.reward import (RewardModel, last_token_index, load_reward_backbone, packed_sequence_scores,
                                   sequence_scores)

PROMPTS = ["User: Describe the cat.\nAssistant:", "User: Tell me about the old lake you saw today.\nAssistant:",
           "User: Hi.\nAssistant:"]
RESPONSES = [" The cat is calm.", " The lake is dull, grim and cold.", " Hello."]


def test_last_token_index_handles_both_sides():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_score_ignores_padding_side_and_batch_companions(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = load_reward_backbone(ModelConfig(path=path), torch.device("cpu")).eval()
    torch.nn.init.normal_(model.score.weight)  # a fresh head; make its scores non-trivial
    tok = load_tokenizer(path)
    examples = [encode_example(tok, p, r, 64) for p, r in zip(PROMPTS, RESPONSES)]
    with torch.no_grad():
        alone = torch.cat([sequence_scores(model, torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids)))
                           for e in examples])
        for side in ("left", "right"):
            b = collate(examples, tok.pad_token_id, side)
            torch.testing.assert_close(sequence_scores(model, b["input_ids"], b["attention_mask"]), alone,
                                       rtol=1e-5, atol=1e-5)
        # packed end to end (the longest first: not in their order), each read at its own last token
        packed = pack(examples, 64, tok.pad_token_id)
        assert len(packed["input_ids"]) < len(examples)
        torch.testing.assert_close(packed_sequence_scores(model, packed["input_ids"], packed["position_ids"],
                                                          packed["sequence_ids"]), alone, rtol=1e-5, atol=1e-5)
    assert alone.std() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma", "gpt2", "gpt_neox"])
def test_pair_scores_run_each_prompt_once_with_the_same_scores_and_gradients(tiny_model_dir, arch):
    from rlhfkit.models.forward import prompt_width, shared_prefix_forward
    from rlhfkit.trainers.reward import pair_scores

    path = tiny_model_dir(arch)
    model = load_reward_backbone(ModelConfig(path=path), torch.device("cpu"))
    torch.nn.init.normal_(model.score.weight)
    tok = load_tokenizer(path)
    rejected = [" A dog.", " The lake is bright.", " Go away, now, please."]
    batch = collate([encode_example(tok, p, r, 64) for p, r in zip(PROMPTS, RESPONSES)]
                    + [encode_example(tok, p, r, 64) for p, r in zip(PROMPTS, rejected)], tok.pad_token_id)
    width = prompt_width(batch["completion_mask"])
    backbone = getattr(model, model.base_model_prefix)
    assert shared_prefix_forward(backbone, batch["input_ids"], batch["attention_mask"], width) is not None
    grads = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            chosen, rej = pair_scores(model, batch, 3)
        else:
            scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
            chosen, rej = scores[:3], scores[3:]
        (chosen - 2 * rej).sum().backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, chosen.detach(), rej.detach()))
    (g0, c0, r0), (g1, c1, r1) = grads
    torch.testing.assert_close(c1, c0, atol=1e-5, rtol=0)
    torch.testing.assert_close(r1, r0, atol=1e-5, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


def test_rm_command_trains_saves_and_normalises(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "rm"
    rc = main(["rm", "--model", tiny_model_dir("qwen2"), "--data", str(task_dir / "preference.jsonl"),
               "--out", str(out), "--train.max_steps", "6", "--train.batch_size", "8", "--optim.lr", "1e-3",
               "--train.tensorboard", "false"])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r for r in logs)
    stats = json.loads((out / "score_normalization.json").read_text())
    assert stats["std"] > 0
    # standard HF output: AutoModelForSequenceClassification loads it, and its own pooling agrees with ours
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    rm = RewardModel.from_pretrained(str(out), device="cpu")
    tok = load_tokenizer(str(out))
    b = collate([encode_example(tok, p, r, 64) for p, r in zip(PROMPTS, RESPONSES)], tok.pad_token_id)
    with torch.no_grad():
        hf_scores = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close((hf_scores - stats["mean"]) / stats["std"], rm.score(PROMPTS, RESPONSES),
                               rtol=1e-4, atol=1e-4)
    # score() is batch-independent, a prompt repeated over samples (run once for all of them) too
    torch.testing.assert_close(rm.score(PROMPTS, RESPONSES, batch_size=1), rm.score(PROMPTS, RESPONSES),
                               rtol=1e-5, atol=1e-5)
    group = [PROMPTS[0]] * len(RESPONSES)
    torch.testing.assert_close(rm.score(group, RESPONSES, batch_size=1), rm.score(group, RESPONSES),
                               rtol=1e-5, atol=1e-5)
    # the statistics are the training answers' own: normalised, their scores have mean 0 and (population) std 1;
    # the file's rows less the held-out share (eval_fraction) are, so the whole file comes close (std 1.004)
    from statistics import mean, pstdev

    from rlhfkit.data.formats import load_preference
    pairs = load_preference(task_dir / "preference.jsonl")
    scores = rm.score([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                      batch_size=64).tolist()
    assert mean(scores) == pytest.approx(0.0, abs=0.02) and pstdev(scores) == pytest.approx(1.0, abs=0.02)
    # a run without statistics into the same directory does not leave these beside its model (they rescaled it)
    assert main(["rm", "--model", tiny_model_dir("qwen2"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(out), "--train.max_steps", "1", "--train.batch_size", "8", "--normalize", "false",
                 "--train.tensorboard", "false", "--train.overwrite_output_dir", "true"]) == 0
    assert not (out / "score_normalization.json").exists()


def test_the_centring_weight_reaches_the_training_and_evaluation_losses(tiny_model_dir, task_dir, tmp_path,
                                                                        monkeypatch):
    # the term is tested by hand in test_losses
    from rlhfkit.trainers import reward

    real, seen = reward.reward_model_loss, []
    monkeypatch.setattr(reward, "reward_model_loss", lambda *a, **k: seen.append(k["center"]) or real(*a, **k))
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference_valid.jsonl"),
                 "--out", str(tmp_path / "rm"), "--train.max_steps", "1", "--train.batch_size", "8",
                 "--center_rewards", "0.01", "--train.tensorboard", "false"]) == 0
    assert len(seen) >= 2 and set(seen) == {0.01}  # a training step and the evaluation


def test_a_failed_final_evaluation_leaves_the_model_with_its_score_statistics(tiny_model_dir, task_dir, tmp_path,
                                                                               monkeypatch):
    # saved before the final evaluation, the model had no score_normalization.json beside it when that failed,
    # and PPO would have read its raw scores
    from rlhfkit.trainers import reward

    real = reward.run

    def run(**kwargs):
        def evaluate():
            raise KeyboardInterrupt  # Ctrl-C during the final evaluation

        return real(**{**kwargs, "evaluate": evaluate})

    monkeypatch.setattr(reward, "run", run)
    out = tmp_path / "rm"
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--out",
                 str(out), "--train.max_steps", "2", "--train.batch_size", "8", "--train.tensorboard", "false"]) == 130
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "score_normalization.json").read_text())["std"] > 0


def test_rm_with_lora_trains_the_score_head_too(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "rm"
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(out), "--lora.enabled", "true", "--lora.r", "4", "--train.max_steps", "3",
                 "--train.batch_size", "8", "--optim.lr", "1e-2", "--train.tensorboard", "false"]) == 0
    assert (out / "adapter_config.json").is_file()
    # the saved adapter carries the trained score head: were it missing, each load would draw a new random head
    first = RewardModel.from_pretrained(str(out), device="cpu").score(PROMPTS, RESPONSES)
    torch.manual_seed(123)
    second = RewardModel.from_pretrained(str(out), device="cpu").score(PROMPTS, RESPONSES)
    torch.testing.assert_close(first, second)
    assert torch.isfinite(first).all() and first.std() > 0


@pytest.mark.parametrize("lora", ["false", "true"])
def test_packed_pairs_train_to_the_weights_of_padded_ones(tiny_model_dir, task_dir, tmp_path, lora):
    # chosen and rejected end to end in rows, each scored at its own last token: the same loss, update, evaluation
    # and score statistics as padded rows (which run a pair's prompt once)
    from safetensors.torch import load_file

    args = ["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--lora.enabled",
            lora, "--train.max_steps", "3", "--train.batch_size", "8", "--train.log_every", "1", "--optim.lr", "1e-2",
            "--train.eval_every", "3", "--max_length", "64", "--train.tensorboard", "false"]
    for name, layout in (("padded", []), ("packed", ["--packing", "true"])):
        assert main([*args, *layout, "--out", str(tmp_path / name)]) == 0
    weights = "adapter_model.safetensors" if lora == "true" else "model.safetensors"
    padded, packed = (load_file(str(tmp_path / name / weights)) for name in ("padded", "packed"))
    assert padded.keys() == packed.keys() and any("score" in k for k in padded)
    for key, value in padded.items():
        assert ((packed[key] - value).norm() / value.norm().clamp(min=1e-12)).item() <= 1e-4, key
    logs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("padded", "packed")]
    for key in ("train/loss", "eval/accuracy", "eval/loss", "eval/score_mean"):
        values = [[r[key] for r in log if key in r] for log in logs]
        assert values[0] and values[1] == pytest.approx(values[0], rel=1e-4, abs=1e-6), key
    stats = [json.loads((tmp_path / name / "score_normalization.json").read_text()) for name in ("padded", "packed")]
    assert stats[1] == pytest.approx(stats[0], rel=1e-4)


def test_packing_is_refused_for_a_body_that_would_let_sequences_read_each_other(tiny_model_dir, task_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)  # plain causal
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--packing",
                 "true", "--train.max_steps", "1", "--out", str(tmp_path / "o")]) == 2
    said = capsys.readouterr().err
    assert "LlamaModel (llama, attention sdpa) lets a packed example attend to the one before it: set packing" in said


def test_a_row_without_a_margin_counts_as_margin_0_beside_rows_with_one(tiny_model_dir, task_dir, tmp_path):
    # one row of the batch has a margin: it must reach the loss (it was dropped for the whole batch), and the
    # others count as margin 0: the first step's loss equals that of the same file with explicit zeros
    rows = [json.loads(line) for line in (task_dir / "preference.jsonl").read_text().splitlines()[:8]]

    def first_loss(name, margins):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({**r, **({} if m is None else {"margin": m})}) + "\n"
                                for r, m in zip(rows, margins)))
        out = tmp_path / name
        assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(data), "--out", str(out),
                     "--train.max_steps", "1", "--train.batch_size", "8", "--train.tensorboard", "false",
                     "--eval_fraction", "0"]) == 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]

    partial = first_loss("partial", [3.0] + [None] * 7)
    assert partial == pytest.approx(first_loss("zeros", [3.0] + [0.0] * 7), rel=1e-6)
    assert partial != pytest.approx(first_loss("none", [None] * 8), rel=1e-4)


def test_agreement_with_gold_is_reported_on_the_built_in_task_s_pairs_alone(task_dir):
    # everyday words carry the gold reward's valence here and there: on other data its "agreement" meant nothing
    from rlhfkit.data.formats import load_preference
    from rlhfkit.evaluate import reward_model_eval

    class ByLength:  # a stand-in reward model: longer is better
        def score(self, prompts, texts):
            return torch.tensor([float(len(t)) for t in texts])

    foreign = [{"prompt": "Human: Is it simple?\n\nAssistant:", "chosen": " Yes, simple and small.",
                "rejected": " No, cold."}]
    assert reward_model_eval(ByLength(), foreign)["gold_agreement"] is None
    ours = load_preference(task_dir / "preference_valid.jsonl")[:50]
    result = reward_model_eval(ByLength(), ours)
    # the oracle, pair by pair: where gold does not tie them, does the longer answer have the higher gold score?
    from rlhfkit.data.tasks.describe import gold_reward
    verdicts = [len(p["chosen"]) > len(p["rejected"]) if g > 0 else len(p["rejected"]) > len(p["chosen"])
                for p in ours if (g := gold_reward(p["prompt"], p["chosen"]) - gold_reward(p["prompt"], p["rejected"]))]
    assert result["n_gold_untied"] == len(verdicts) > 0
    assert result["gold_agreement"] == pytest.approx(sum(verdicts) / len(verdicts))
    accuracy = sum(len(p["chosen"]) > len(p["rejected"]) for p in ours) / 50
    assert result["accuracy"] == pytest.approx(accuracy)
    # the sample std of 50 zeros and ones over sqrt(50): sqrt(p (1 - p) / 49)
    assert result["accuracy_stderr"] == pytest.approx((accuracy * (1 - accuracy) / 49) ** 0.5)


def test_a_tied_score_agrees_with_neither_side_of_gold(task_dir):
    # a model scoring every response alike ranks nothing: it had "agreed" with gold on each pair gold scores lower
    from rlhfkit.data.formats import load_preference
    from rlhfkit.data.tasks.describe import gold_reward
    from rlhfkit.evaluate import reward_model_eval

    class Constant:
        def score(self, prompts, texts):
            return torch.zeros(len(texts))

    class Gold:
        def score(self, prompts, texts):
            return torch.tensor([gold_reward(p, t) for p, t in zip(prompts, texts)])

    pairs = load_preference(task_dir / "preference_valid.jsonl")[:60]
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    tied = reward_model_eval(Constant(), pairs + flipped)
    assert tied["n_gold_untied"] > 0 and tied["gold_agreement"] == 0.0 and tied["accuracy"] == 0.0
    assert reward_model_eval(Gold(), pairs + flipped)["gold_agreement"] == 1.0


@pytest.mark.parametrize("text, message", [
    ('{"mean": "x"}', r"'mean' must be a finite number, got 'x'"),  # a KeyError 'std' traceback
    ('{"mean": 0.1}', r"'std' must be a finite number above 0, it has none"),
    ('{"mean": 0.1, "std": 0}', r"'std' must be a finite number above 0, got 0"),
    ('{"mean": NaN, "std": 1}', r"'mean' must be a finite number, got nan"),
    ('[0.1, 1.0]', r"must hold a JSON object with 'mean' and 'std', got a list"),
    ("{bad", r", line 1, column 2: not valid JSON"),  # a JSON error naming no file
])
def test_a_damaged_score_normalization_names_the_file_and_the_field(tiny_model_dir, tmp_path, capsys, text,
                                                                     message):
    from rlhfkit.models.reward import score_normalization

    out = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("llama"), num_labels=1).save_pretrained(out)
    load_tokenizer(tiny_model_dir("llama")).save_pretrained(out)
    (out / "score_normalization.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(out / 'score_normalization.json'))}.*{message}"):
        score_normalization(out)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi.", "chosen": " Hello.", "rejected": " Go."}) + "\n")
    assert main(["eval-rm", "--model", str(out), "--data", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "score_normalization.json" in err and err.count("\n") == 1, err
