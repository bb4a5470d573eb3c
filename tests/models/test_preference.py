"""DPO (every loss variant), ORPO, SimPO and KTO on tiny models; the three reference forms."""

import dataclasses
import json
import math
import typing

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.cli import main
from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.data.collate import collate
from rlhfkit.data.formats import load_preference
from rlhfkit.losses import DPO_LOSSES
from rlhfkit.models.load import add_lora, load_causal_lm, load_tokenizer
from rlhfkit.trainers.preference import (OBJECTIVES, DPOConfig, KTOConfig, SimPOConfig, completion_logps,
                                         encode_pairs, make_reference, mismatched_partners)
from rlhfkit.trainers.sft import completion_nll

CPU = torch.device("cpu")
QUICK = ["--train.batch_size", "8", "--train.log_every", "1", "--optim.lr", "1e-2", "--optim.warmup_steps", "0",
         "--train.tensorboard", "false"]


def _rows(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def small_data(task_dir, tmp_path_factory):
    """The first 32 preference pairs and 32 unpaired examples of the built-in task."""
    out = tmp_path_factory.mktemp("small")
    return {"preference": _write(out / "pref.jsonl", _rows(task_dir / "preference.jsonl", 32)),
            "unpaired": _write(out / "unpaired.jsonl", _rows(task_dir / "unpaired.jsonl", 32))}


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama with every weight nudged: a reference that differs from the policy at step 1."""
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("other")
    model.save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return str(out)


def _logs(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights_changed(before_dir, after_dir) -> bool:
    before = AutoModelForCausalLM.from_pretrained(before_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(after_dir).state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


PAIRED = ["rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"]


@pytest.mark.parametrize("command, extra, keys", [
    ("dpo", [], PAIRED),
    ("dpo", ["--loss_type", "robust", "--label_smoothing", "0.1"], PAIRED),
    ("dpo", ["--loss_type", "ipo"], PAIRED),
    ("dpo", ["--loss_type", "hinge", "--reference", "precomputed"], PAIRED),
    ("orpo", [], [*PAIRED, "log_odds_ratio"]),
    ("simpo", [], PAIRED),
    ("kto", [], ["kl", "rewards/chosen", "rewards/rejected"]),
], ids=["dpo", "rdpo", "ipo", "hinge-precomputed", "orpo", "simpo", "kto"])
def test_every_command_trains_and_changes_the_weights(tiny_model_dir, small_data, tmp_path, command, extra, keys):
    path, out = tiny_model_dir("llama"), tmp_path / command
    data = small_data["unpaired" if command == "kto" else "preference"]
    rc = main([command, "--model", path, "--data", str(data), "--out", str(out), "--train.max_steps", "2",
               *QUICK, *extra])
    assert rc == 0
    logs = _logs(out)
    assert len(logs) == 2
    for record in logs:
        for key in ["train/loss", *(f"train/{k}" for k in keys)]:
            assert math.isfinite(record[key]), (key, record)
    assert (out / "rlhfkit_config.yaml").is_file()
    assert _weights_changed(path, out)


def test_dpo_with_lora_and_the_adapter_reference_saves_a_trained_adapter(tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "dpo"
    with pytest.warns(UserWarning, match="lora.dropout 0.1 is not applied: the DPO family trains without dropout"):
        assert main(["dpo", "--model", tiny_model_dir("llama"), "--data", str(small_data["preference"]), "--out",
                     str(out), "--lora.enabled", "true", "--lora.r", "4", "--reference", "adapter",
                     "--lora.dropout", "0.1", "--train.max_steps", "2", *QUICK]) == 0
    assert (out / "adapter_config.json").is_file()
    adapter = load_causal_lm(ModelConfig(path=str(out)), CPU)
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # a fresh adapter's B is 0


@pytest.mark.parametrize("command", ["dpo", "kto"])
@pytest.mark.parametrize("ref_model", ["other", "same"])
def test_precomputed_reference_gives_the_losses_of_a_live_reference(tiny_model_dir, other_model_dir, small_data,
                                                                    tmp_path, command, ref_model):
    """Issue 5: the cache filled before training reproduces the live reference model's losses.
    With a reference that differs from the policy the first step's loss is not the trivial log 2."""
    data = small_data["unpaired" if command == "kto" else "preference"]
    ref = ["--ref_model", other_model_dir] if ref_model == "other" else []
    logs = {}
    for kind in ("model", "precomputed"):
        out = tmp_path / kind
        assert main([command, "--model", tiny_model_dir("llama"), "--data", str(data), "--out", str(out),
                     "--reference", kind, *ref, "--train.max_steps", "3", *QUICK]) == 0
        logs[kind] = _logs(out)
    live, cached = logs["model"], logs["precomputed"]
    assert len(live) == len(cached) == 3
    assert cached[0]["train/loss"] == pytest.approx(live[0]["train/loss"], abs=1e-6)
    if command == "dpo" and ref_model == "other":
        assert abs(live[0]["train/loss"] - math.log(2)) > 1e-3
    for a, b in zip(live, cached):  # later steps, and the reward metrics, agree as well
        for key in a:
            if key not in ("train/seconds", "train/step_seconds", "train/tokens_per_s"):  # timings
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_adapter_reference_is_the_separately_loaded_base_model(tiny_model_dir, small_data):
    path = tiny_model_dir("llama")
    tok = load_tokenizer(path)
    policy = add_lora(load_causal_lm(ModelConfig(path=path), CPU), LoraConfig(r=4))
    with torch.no_grad():  # make the adapter do something, as after training
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    examples = encode_pairs(load_preference(small_data["preference"])[:6], tok, 64, seed=0)

    def to_batch(seqs):
        return collate(seqs, tok.pad_token_id)

    cfg = DPOConfig(model=ModelConfig(path=path), lora=LoraConfig(enabled=True, r=4), reference="adapter")
    chosen, rejected = make_reference(cfg, policy, average=False, to_batch=to_batch).logps(examples)
    base = load_causal_lm(ModelConfig(path=path), CPU)
    with torch.no_grad():
        expected = completion_logps(base, to_batch([e.first for e in examples] + [e.second for e in examples]),
                                    average=False)
        adapted = completion_logps(policy, to_batch([e.first for e in examples]), average=False)
    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=1e-5, atol=1e-5)
    assert (adapted - expected[:6]).abs().max() > 1e-2  # outside the context the adapter is on
    assert policy.training  # the reference context restores the mode it found
    # reference "model" with LoRA and no ref_model names that same base: it switches the adapter off, loading nothing
    from rlhfkit.trainers import preference

    cfg = dataclasses.replace(cfg, reference="model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(preference.REFERENCES, "model", (None, lambda *a: pytest.fail("a second copy was loaded")))
        again = make_reference(cfg, policy, average=False, to_batch=to_batch).logps(examples)
    torch.testing.assert_close(torch.cat(again), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_concatenated_forward_equals_separate_forwards(tiny_model_dir, small_data, average):
    """Chosen ‖ rejected in one padded batch of 2B rows gives each row's own log-prob, and the sums
    match SFT's completion NLL (tested there against explicit indexing); packed end to end in rows (``pack``: the
    longest first, so not in their order), each sequence's own log-prob in the order given, a completion of one
    token too."""
    from rlhfkit.data.collate import Encoded, pack

    path = tiny_model_dir("llama")
    model, tok = load_causal_lm(ModelConfig(path=path), CPU), load_tokenizer(path)
    examples = encode_pairs(load_preference(small_data["preference"])[:5], tok, 64, seed=0)
    chosen = [e.first for e in examples]
    rejected = [e.second for e in examples]
    chosen[2] = Encoded(chosen[2].input_ids[:5], [0, 0, 0, 0, 1])  # a completion of one token
    with torch.no_grad():
        together = completion_logps(model, collate(chosen + rejected, tok.pad_token_id), average)  # (2B,)
        packed = completion_logps(model, pack(chosen + rejected, 64, tok.pad_token_id), average)
        alone = torch.stack([completion_logps(model, collate([s], tok.pad_token_id), average)[0]
                             for s in chosen + rejected])
        oracle = []
        for s in chosen + rejected:
            nll, n = completion_nll(model, collate([s], tok.pad_token_id))
            oracle.append(-nll / n if average else -nll)
    assert together.shape == packed.shape == (10,)
    assert len(pack(chosen + rejected, 64, tok.pad_token_id)["input_ids"]) < 10  # rows shared by sequences
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together, torch.stack(oracle), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, torch.stack(oracle), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("command, extra", [("dpo", ["--nll_weight", "0.5", "--logits_chunk", "4"]), ("kto", []),
                                            ("simpo", [])])
def test_packed_batches_train_to_the_weights_of_padded_ones(tiny_model_dir, small_data, tmp_path, command, extra):
    # the policy's, the reference's and KTO's reference point's log-probs from packed rows (DPO: its NLL term counts
    # each chosen answer's tokens; SimPO: length-averaged); evaluated so too
    from safetensors.torch import load_file

    data = small_data["preference" if command != "kto" else "unpaired"]
    args = [command, "--model", tiny_model_dir("llama"), "--data", str(data), "--eval_data", str(data),
            "--train.max_steps", "2", "--train.eval_every", "2", "--max_length", "64", *QUICK, *extra]
    for name, layout in (("padded", []), ("packed", ["--packing", "true"])):
        assert main([*args, *layout, "--out", str(tmp_path / name)]) == 0
    padded, packed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("padded", "packed"))
    assert any(not torch.equal(padded[k], v) for k, v in
               load_file(str(tiny_model_dir("llama") + "/model.safetensors")).items())  # trained
    for key, value in padded.items():  # float rounding, through Adam at lr 1e-2 (as the chunked head's test)
        assert ((packed[key] - value).norm() / value.norm().clamp(min=1e-12)).item() <= 1e-4, key
    logs = [[r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())]
            for name in ("padded", "packed")]
    for key in ("train/loss", "eval/loss", "eval/rewards/chosen"):
        values = [[r[key] for r in log if key in r] for log in logs]
        assert values[0] and values[1] == pytest.approx(values[0], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_a_chunked_head_trains_to_the_same_weights(tiny_model_dir, small_data, tmp_path, command, head_calls):
    # the policy's, the live reference's and KTO's reference point's log-probs, 3 output-head positions at a time
    from safetensors.torch import load_file

    data = small_data["preference" if command == "dpo" else "unpaired"]
    args = [command, "--model", tiny_model_dir("llama"), "--data", str(data), "--train.max_steps", "2", *QUICK]
    for name, extra in (("whole", []), ("chunked", ["--logits_chunk", "3"])):
        head_calls.clear()
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
    assert head_calls == {(3, True, "none"), (3, False, "none")}
    whole, chunked = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "chunked"))
    assert any(not torch.equal(whole[k], v) for k, v in
               load_file(str(tiny_model_dir("llama") + "/model.safetensors")).items())  # trained
    # float rounding of the chunks' summation order (test_forward: gradients within 1e-6), which Adam at lr 1e-2
    # scales up in the tied embedding's rows that only the softmax touches: 1.3e-5 there
    for key, value in whole.items():
        assert ((chunked[key] - value).norm() / value.norm().clamp(min=1e-12)).item() <= 1e-4, key


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_packing_is_refused_for_a_reference_model_that_would_let_sequences_read_each_other(
        tiny_model_dir, other_model_dir, small_data, tmp_path, monkeypatch, capsys, reference):
    # --ref_model may be another architecture than the policy's: it reads the packed rows too, so it is checked
    from rlhfkit.models import forward

    monkeypatch.setattr(forward, "packing_works", lambda model: model.name_or_path != other_model_dir)
    assert main(["dpo", "--model", tiny_model_dir("llama"), "--data", str(small_data["preference"]), "--ref_model",
                 other_model_dir, "--reference", reference, "--packing", "true", "--train.max_steps", "1", *QUICK,
                 "--out", str(tmp_path / "o")]) == 2
    assert "lets a packed example attend to the one before it: set packing false" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["dpo", "simpo"])
def test_the_nll_term_adds_each_chosen_answer_s_token_mean_nll_averaged_over_pairs(tiny_model_dir, small_data,
                                                                                   command):
    # RPO (TRL's rpo_alpha) and CPO-SimPO (cpo_alpha): loss + w * mean_i(NLL(chosen_i) / tokens_i); DPO's
    # log-probs are sums, SimPO's means: the term is the same either way. Oracle: SFT's completion NLL, row by row
    path = tiny_model_dir("llama")
    model, tok = load_causal_lm(ModelConfig(path=path), CPU), load_tokenizer(path)
    examples = encode_pairs(load_preference(small_data["preference"])[:5], tok, 64, seed=0)

    def to_batch(seqs):
        return collate(seqs, tok.pad_token_id)

    losses, metrics = [], []
    for weight in (0.0, 0.7):
        cfg = (DPOConfig if command == "dpo" else SimPOConfig)(model=ModelConfig(path=path), nll_weight=weight)
        objective = OBJECTIVES[type(cfg)](cfg)
        reference = make_reference(cfg, model, objective.average, to_batch) if objective.needs_reference else None
        with torch.no_grad():
            loss, m = objective.step(model, reference, to_batch, examples)
        losses.append(loss.item()), metrics.append(m)
    with torch.no_grad():
        nlls = [completion_nll(model, collate([e.first], tok.pad_token_id)) for e in examples]
    nll = sum(total.item() / n.item() for total, n in nlls) / len(nlls)
    assert losses[1] - losses[0] == pytest.approx(0.7 * nll, rel=1e-5)
    assert metrics[1]["nll"].item() == pytest.approx(nll, rel=1e-5) and "nll" not in metrics[0]


def test_kto_trains_on_one_desirable_to_four_undesirable_when_weighted(tiny_model_dir, task_dir, tmp_path):
    rows = _rows(task_dir / "unpaired.jsonl", 200)
    good, bad = [r for r in rows if r["label"]][:8], [r for r in rows if not r["label"]][:32]
    data = _write(tmp_path / "imbalanced.jsonl", good + bad)
    out = tmp_path / "kto"
    # lambda_D n_D / (lambda_U n_U) = 4 * 8 / 32 = 1, the paper's recommended range [1, 4/3]
    assert main(["kto", "--model", tiny_model_dir("llama"), "--data", str(data), "--out", str(out),
                 "--desirable_weight", "4", "--train.max_steps", "3", *QUICK]) == 0
    for record in _logs(out):
        assert math.isfinite(record["train/loss"]) and record["train/loss"] > 0
    assert _weights_changed(tiny_model_dir("llama"), out)


@pytest.mark.parametrize("n", [2, 3, 10, 33])
def test_mismatched_partners_never_pair_an_example_with_itself(n):
    partners = mismatched_partners(n, seed=n)
    assert sorted(partners) == list(range(n))  # every completion is used once
    assert all(j != i for i, j in enumerate(partners))


def test_dpo_loss_types_are_the_losses_module_variants():
    assert set(typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"])) == set(DPO_LOSSES)


@pytest.mark.parametrize("argv, message", [
    (["dpo", "--reference", "adapter"], "lora.enabled"),
    (["kto", "--reference", "adapter"], "lora.enabled"),
    (["dpo", "--loss_type", "ipo", "--label_smoothing", "0.1"], "label_smoothing"),
    (["dpo", "--loss_type", "robust", "--label_smoothing", "0.5"], "robust"),
    (["dpo", "--loss_type", "sigmod"], "did you mean 'sigmoid'"),
])
def test_bad_settings_fail_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--data", "x.jsonl", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError):
        KTOConfig(reference="adapter")


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_kto_reference_point_is_the_whole_step_s_so_micro_batches_do_not_change_the_update(
        tiny_model_dir, other_model_dir, small_data, tmp_path, reference):
    """z is the KL estimate of the step's whole batch (DESIGN.md §3), not of each micro-batch: with
    grad_accum 4 the weights equal those of one full batch. A reference unlike the policy makes z > 0."""
    weights, logs = {}, {}
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        assert main(["kto", "--model", tiny_model_dir("llama"), "--data", str(small_data["unpaired"]),
                     "--ref_model", other_model_dir, "--reference", reference, "--out", str(out), "--beta", "0.5",
                     "--train.max_steps", "3", "--train.grad_accum", str(accum),
                     *QUICK]) == 0
        weights[accum], logs[accum] = load_file(str(out / "model.safetensors")), _logs(out)
    assert all(r["train/kl"] > 0.1 for r in logs[1])  # z is active: every step's estimate is well above 0
    for a, b in zip(logs[1], logs[4]):
        assert b["train/kl"] == pytest.approx(a["train/kl"], rel=1e-5)  # one z per step, however it is split
    for name, value in weights[1].items():
        diff = (weights[4][name] - value).norm() / value.norm().clamp(min=1e-12)
        assert diff <= 1e-4, (name, diff.item())  # float noise (3e-5 seen); a z per micro-batch gave 0.12


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_the_policy_trains_without_the_dropout_its_config_asks_for(tiny_model_dir, small_data, tmp_path, reference):
    # a GPT-2 config with dropout 0.1: at lr 0 the policy is its reference, so every step's DPO loss is log 2
    # and no pair is ranked. With dropout on in training, the policy's log-probs were noise around the reference's
    path = tmp_path / "gpt2-dropout"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    model.config.update({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    model.save_pretrained(path)
    load_tokenizer(tiny_model_dir("gpt2")).save_pretrained(path)
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(path), "--data", str(small_data["preference"]), "--out", str(out),
                 "--reference", reference, "--train.max_steps", "3", *QUICK[:4], "--optim.lr", "0",
                 "--train.tensorboard", "false"]) == 0
    for record in _logs(out):
        assert record["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert record["train/rewards/accuracy"] == 0.0


def test_a_reference_model_with_another_tokenizer_is_refused(tiny_model_dir, small_data, tmp_path, capsys):
    # the reference reads the policy's token ids: under another vocabulary they are other words
    import shutil

    other = tmp_path / "ref"
    shutil.copytree(tiny_model_dir("llama"), other)
    grown = load_tokenizer(str(other))
    grown.add_tokens(["<extra>"])
    grown.save_pretrained(other)
    rc = main(["dpo", "--model", tiny_model_dir("llama"), "--data", str(small_data["preference"]),
               "--ref_model", str(other), "--out", str(tmp_path / "dpo"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and f"the reference model {other} has another tokenizer than the policy's" in err


def test_kto_reads_the_reference_once_a_step_for_both_completions(tiny_model_dir, small_data, tmp_path, monkeypatch):
    # the KL pass and the loss had each run the reference over the same prompts: once for the mismatched completion,
    # once for the example's own
    from rlhfkit.trainers import preference

    calls, real = [], preference.LiveReference.logps
    monkeypatch.setattr(preference.LiveReference, "logps",
                        lambda self, examples, parts=(0, 1): calls.append(tuple(parts)) or real(self, examples, parts))
    assert main(["kto", "--model", tiny_model_dir("llama"), "--data", str(small_data["unpaired"]), "--out",
                 str(tmp_path / "kto"), "--train.max_steps", "2", *QUICK]) == 0
    assert set(calls) == {(0, 1)} and len(calls) == 4  # each step: two halves of its batch, each for both parts


@pytest.mark.parametrize("command", ["dpo", "rm", "orpo", "dpo-nll"])
def test_pairs_that_differ_only_past_max_length_are_left_out(tiny_model_dir, tmp_path, capsys, command):
    # cut to the same tokens, a pair's loss has no gradient: DPO's stayed at log 2 and learned nothing, silently
    rows = [{"prompt": "Describe the cat.", "chosen": f"The cat is small and grey {end}", "rejected":
             f"The cat is small and grey {other}"} for end, other in (("and calm.", "and loud."), ("today.", "now."))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [command.removesuffix("-nll"), "--model", tiny_model_dir("llama"), "--data", str(data), "--out",
            str(tmp_path / "out"), "--train.max_steps", "1", "--train.batch_size", "2", "--train.tensorboard", "false",
            "--train.overwrite_output_dir", "true"]
    args += ["--eval_fraction", "0"] if command == "rm" else []  # the reward model holds out rows of its own
    args += ["--nll_weight", "1"] if command == "dpo-nll" else []
    if command in ("orpo", "dpo-nll"):  # the chosen answer's NLL still learns from a tied pair: kept
        assert main([*args, "--max_length", "12"]) == 0
        assert "pairs have the same chosen and rejected" not in capsys.readouterr().err
        return
    assert main([*args, "--max_length", "12"]) == 2
    assert (f"{data}: every pair has the same chosen and rejected tokens once cut to max_length 12: raise it"
            in capsys.readouterr().err)
    assert main([*args, "--max_length", "64"]) == 0  # whole, they differ


def test_a_margin_column_is_said_to_be_unread_by_the_dpo_family(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi.", "chosen": "Hello there.", "rejected": "Go.", "margin": 2.0}) + "\n")
    with pytest.warns(UserWarning, match="has a 'margin' column, which only the reward model's loss reads"):
        assert main(["dpo", "--model", tiny_model_dir("llama"), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--train.max_steps", "1", "--train.batch_size", "1", "--train.tensorboard", "false"]) == 0
