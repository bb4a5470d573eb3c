"""SFT on tiny models of every supported architecture, and its loss masking."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.cli import main
from rlhfkit.config import ModelConfig
from rlhfkit.data.collate import collate, encode_conversation, encode_example
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.trainers.sft import completion_nll

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2", "gpt_neox"]

EXAMPLES = [("User: Describe the cat.\nAssistant:", " The cat is calm and lovely."),
            ("User: What is the lake you saw today like?\nAssistant:", " The lake is dull."),
            ("User: Hi.\nAssistant:", " Hello.")]


def _single_nll(model, tok, prompt, completion):
    """Oracle: -Σ log p(completion token | prefix) from one unpadded forward, by explicit indexing."""
    e = encode_example(tok, prompt, completion, 64)
    ids = torch.tensor([e.input_ids])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    start = e.completion_mask.index(1)
    return -sum(logp[t - 1, e.input_ids[t]] for t in range(start, len(e.input_ids))), len(e.input_ids) - start


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_nll_ignores_prompt_and_padding(tiny_model_dir, arch, side):
    path = tiny_model_dir(arch)
    model, tok = load_causal_lm(ModelConfig(path=path), torch.device("cpu")), load_tokenizer(path)
    oracle = [_single_nll(model, tok, p, c) for p, c in EXAMPLES]
    batch = collate([encode_example(tok, p, c, 64) for p, c in EXAMPLES], tok.pad_token_id, side)
    nll, n = completion_nll(model, batch)
    assert n.item() == sum(k for _, k in oracle)
    assert nll.item() == pytest.approx(sum(v.item() for v, _ in oracle), rel=1e-5)
    # whatever sits in the padded slots, the loss is the same
    garbage = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    nll2, _ = completion_nll(model, {**batch, "input_ids": garbage})
    assert nll2.item() == pytest.approx(nll.item(), rel=1e-5)


def test_a_completion_that_opens_its_row_loses_only_its_first_token_under_either_padding(tiny_model_dir):
    # an empty prompt and a tokenizer without BOS: the first completion token has no position before it.
    # Left padding used to predict it from a pad position (a different loss than right padding's)
    path = tiny_model_dir("llama")
    model, tok = load_causal_lm(ModelConfig(path=path), torch.device("cpu")), load_tokenizer(path)
    assert tok("x").input_ids == tok("x", add_special_tokens=False).input_ids  # no BOS
    rows = [("", " The cat is calm."), *EXAMPLES[:2]]
    (nll_right, n_right), (nll_left, n_left) = (completion_nll(model, collate(
        [encode_example(tok, p, c, 64) for p, c in rows], tok.pad_token_id, side)) for side in ("right", "left"))
    oracle = [_single_nll(model, tok, p, c) for p, c in rows[1:]]
    empty = encode_example(tok, *rows[0], 64).input_ids
    logp = torch.log_softmax(model(torch.tensor([empty])).logits[0].float(), -1)
    first_left_out = -sum(logp[t - 1, empty[t]] for t in range(1, len(empty)))
    assert n_right.item() == n_left.item() == sum(k for _, k in oracle) + len(empty) - 1
    expected = sum(v.item() for v, _ in oracle) + first_left_out.item()
    assert [nll_right.item(), nll_left.item()] == pytest.approx([expected, expected], rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_command_trains_every_architecture(tiny_model_dir, task_dir, tmp_path, arch):
    path = tiny_model_dir(arch)
    out = tmp_path / "sft"
    rc = main(["sft", "--model", path, "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
               "--train.max_steps", "4", "--train.batch_size", "8", "--train.log_every", "2",
               "--optim.warmup_steps", "0", "--train.tensorboard", "false"])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in logs if "train/loss" in r]
    assert len(train_losses) == 2 and all(v > 0 for v in train_losses)
    assert any("eval/loss" in r for r in logs)
    assert (out / "rlhfkit_config.yaml").is_file() and (out / "model.safetensors").is_file()
    before = AutoModelForCausalLM.from_pretrained(path).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch, layout", [
    ("llama", ["--packing", "true"]), ("gpt2", ["--packing", "true"]),
    ("llama", ["--logits_chunk", "7"]), ("llama", ["--packing", "true", "--logits_chunk", "5"])])
def test_packed_batches_and_a_chunked_head_train_to_the_weights_of_padded_ones(tiny_model_dir, task_dir, tmp_path,
                                                                               arch, layout):
    # the same examples a step and the same loss: only the layout differs (llama: rotary positions; gpt2: learned),
    # or how many positions the head and log-softmax take at a time; the held-out loss (evaluated so too) agrees
    from safetensors.torch import load_file

    args = ["sft", "--model", tiny_model_dir(arch), "--data", str(task_dir / "sft.jsonl"), "--train.max_steps", "3",
            "--train.batch_size", "8", "--train.grad_accum", "2", "--train.log_every", "1", "--optim.lr", "3e-3",
            "--max_length", "48", "--train.tensorboard", "false"]
    for name, extra in (("padded", []), ("packed", layout)):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
    padded, packed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("padded", "packed"))
    for key, value in padded.items():
        # GPT-2's attention key bias gets gradients of float noise alone (softmax ignores a shift per query), which
        # Adam scales into steps: 7e-5 apart there (as between replicas: test_zero)
        tol = 1e-3 if key.endswith("c_attn.bias") else 1e-5
        assert ((packed[key] - value).norm() / value.norm().clamp(min=1e-12)).item() <= tol, key
    losses = [[r["eval/loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
               if "eval/loss" in r] for name in ("padded", "packed")]
    assert losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_packing_is_refused_for_a_model_that_would_let_examples_read_each_other(tiny_model_dir, task_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)  # plain causal
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--packing", "true",
                 "--out", str(tmp_path / "o"), "--train.max_steps", "1"]) == 2
    assert "lets a packed example attend to the one before it: set packing false" in capsys.readouterr().err


def test_packing_works_asks_for_packed_positions_read_in_more_than_one_row(tiny_model_dir, monkeypatch):
    # transformers' flash attention reads packed positions from a batch of one row only: such a model passed a
    # one-row check, then let examples read each other in batches of several rows
    from transformers import masking_utils

    from rlhfkit.models.forward import packing_works

    model = load_causal_lm(ModelConfig(path=tiny_model_dir("llama")), torch.device("cpu")).train()
    assert packing_works(model)
    real = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda position_ids: real(position_ids) if position_ids.shape[0] == 1 else None)
    assert not packing_works(model) and model.training  # its mode restored


def test_sft_with_lora_saves_an_adapter_that_exports(tiny_model_dir, task_dir, tmp_path):
    path = tiny_model_dir("llama")
    out, merged = tmp_path / "sft", tmp_path / "merged"
    assert main(["sft", "--model", path, "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
                 "--lora.enabled", "true", "--lora.r", "4", "--train.max_steps", "2", "--train.batch_size", "4",
                 "--optim.lr", "1e-2", "--train.tensorboard", "false"]) == 0
    assert (out / "adapter_config.json").is_file()
    assert main(["export", "--model", str(out), "--out", str(out)]) == 2  # it would replace the adapter
    assert main(["export", "--model", str(out), "--out", path]) == 2  # or its base, the adapter applied twice
    assert (out / "adapter_config.json").is_file()
    assert main(["export", "--model", str(out), "--out", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists()
    adapted = load_causal_lm(ModelConfig(path=str(out)), torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(adapted(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-5)


def test_export_keeps_the_base_s_dtype_and_does_not_write_into_a_directory_holding_files(tiny_model_dir, task_dir,
                                                                                           tmp_path, capsys):
    base, out = tmp_path / "bf16", tmp_path / "sft"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir("llama")).save_pretrained(base)
    assert main(["sft", "--model", str(base), "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
                 "--lora.enabled", "true", "--lora.r", "4", "--train.max_steps", "1", "--train.batch_size", "4",
                 "--train.tensorboard", "false"]) == 0
    # merged in float32, saved as the base was (peft's merge_and_unload keeps it): not twice its size
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "merged" / "model.safetensors")).values()} == {torch.bfloat16}
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "wide"), "--dtype", "float32"]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "wide" / "model.safetensors")).values()} == {torch.float32}
    # a directory with files in it (another run's, or a model other adapters stand on) is left alone unless asked
    capsys.readouterr()
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged")]) == 2
    assert "merged holds files already (chat_template.jinja, config.json, " in capsys.readouterr().err
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged"), "--overwrite", "true"]) == 0
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_a_file_with_its_own_column_names_trains_as_ours_does(tiny_model_dir, task_dir, tmp_path):
    path = tiny_model_dir("llama")
    rows = [json.loads(line) for line in (task_dir / "sft.jsonl").read_text().splitlines()]
    renamed = tmp_path / "qa.jsonl"
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows))
    common = ["--model", path, "--train.max_steps", "2", "--train.batch_size", "4", "--train.tensorboard", "false"]
    assert main(["sft", *common, "--data", str(task_dir / "sft.jsonl"), "--out", str(tmp_path / "ours")]) == 0
    assert main(["sft", *common, "--data", str(renamed), "--columns", "prompt=question,completion=answer",
                 "--out", str(tmp_path / "theirs")]) == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "theirs").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    before = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert any(not torch.equal(before[k], ours[k]) for k in ours)  # it trained


def test_chat_messages_data_uses_the_chat_template(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2")
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Describe the cat."},
                          {"role": "assistant", "content": "The cat is calm."}]}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sft", "--model", path, "--data", str(data), "--out", str(tmp_path / "o"),
                 "--train.max_steps", "1", "--train.batch_size", "4", "--train.tensorboard", "false"]) == 0
    tok = load_tokenizer(path)
    e = encode_example(tok, rows[0]["messages"][:-1], "The cat is calm.", 64)
    prompt_text = tok.decode([t for t, m in zip(e.input_ids, e.completion_mask) if not m])
    assert prompt_text == "User: Describe the cat.\nAssistant:"


def test_a_base_model_without_a_chat_template_is_given_one(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    base = tmp_path / "base"  # the tiny model, its tokenizer's template removed: a base model's
    shutil.copytree(tiny_model_dir("qwen2"), base)
    tok = load_tokenizer(str(base))
    tok.chat_template = None
    tok.save_pretrained(base)
    for name in ("chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Describe the cat."},
                          {"role": "assistant", "content": "The cat is calm."}]}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["sft", "--model", str(base), "--data", str(data), "--train.max_steps", "1", "--train.batch_size", "4",
              "--train.tensorboard", "false"]
    assert main([*common, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "has no chat template; give one (--model.chat_template FILE.jinja" in err
    assert f"{data}: a row cannot be encoded" in err  # every row fails: the model's doing, no row named
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }} says: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant says:{% endif %}")
    out = tmp_path / "sft"
    assert main([*common, "--out", str(out), "--model.chat_template", str(template)]) == 0
    assert load_tokenizer(str(out)).chat_template == template.read_text()  # saved with the model: later stages
    assert main([*common, "--out", str(tmp_path / "copied"), "--model.chat_template", tiny_model_dir("llama")]) == 0
    taken = load_tokenizer(str(tmp_path / "copied")).chat_template  # another model's template
    monkeypatch.setenv("HOME", str(tmp_path))  # a directory under ~, spelt so (a YAML value, --opt=~/...)
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "home_model")
    assert main([*common, "--out", str(tmp_path / "home"), "--model.chat_template", "~/home_model"]) == 0
    assert taken == load_tokenizer(tiny_model_dir("llama")).chat_template
    chatml = tmp_path / "chatml.jinja"  # tokens this tokenizer lacks: said
    chatml.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.warns(UserWarning, match=r"writes <\|im_end\|>, <\|im_start\|>, which the tokenizer has no token"):
        assert main([*common, "--out", str(tmp_path / "chatml"), "--model.chat_template", str(chatml)]) == 0
    assert main([*common, "--out", str(tmp_path / "x"), "--model.chat_template", "missing.jinja"]) == 2
    assert "--model.chat_template missing.jinja: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("turns", ["all", "last"])
def test_every_assistant_turn_is_learned_unless_the_last_alone_is_asked_for(tiny_model_dir, tmp_path, turns):
    # the first step's loss is the mean NLL over the learned tokens at the starting weights: both replies', or the
    # last one's (tokenisation tested in test_collate)
    path = tiny_model_dir("llama")
    messages = [{"role": "user", "content": "Describe the cat."}, {"role": "assistant", "content": "The cat is calm."},
                {"role": "user", "content": "And the lake?"}, {"role": "assistant", "content": "The lake is dull."}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    assert main(["sft", "--model", path, "--data", str(data), "--out", str(tmp_path / "o"), "--eval_fraction", "0",
                 "--assistant_turns", turns, "--train.max_steps", "1", "--train.batch_size", "1", "--train.log_every",
                 "1", "--train.tensorboard", "false"]) == 0
    logged = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]
    tok, model = load_tokenizer(path), load_causal_lm(ModelConfig(path=path), torch.device("cpu"))
    e = (encode_conversation(tok, messages, 256) if turns == "all"
         else encode_example(tok, messages[:-1], messages[-1]["content"], 256))
    with torch.no_grad():
        nll, n = completion_nll(model, collate([e], tok.pad_token_id))
    assert logged == pytest.approx((nll / n).item(), rel=1e-5)
    assert sum(e.completion_mask) > 0 and (turns == "last") == (tok.decode(
        [t for t, m in zip(e.input_ids, e.completion_mask) if m]).count("The cat is calm.") == 0)


def test_a_text_row_is_learned_whole(tiny_model_dir, tmp_path):
    # TRL's language-modelling rows: after what the tokenizer puts first (the empty prompt's ids: a BOS, or
    # nothing), every token and the EOS carry loss
    from rlhfkit.data.collate import as_prompt_completion
    from rlhfkit.data.formats import load_sft

    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "The cat is calm."}) + "\n")
    tok = load_tokenizer(tiny_model_dir("llama"))
    e = encode_example(tok, *as_prompt_completion(load_sft(data)[0]), 64)
    assert e.input_ids == tok("The cat is calm.").input_ids + [tok.eos_token_id]
    head = len(tok("").input_ids)  # what the tokenizer puts before any text (a BOS, or nothing)
    assert e.completion_mask == [0] * head + [1] * (len(e.input_ids) - head) and len(e.input_ids) - head > 2


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("eos", ["<|im_end|>", "</s>"])
def test_a_chat_reply_is_learned_as_the_template_writes_it(tiny_model_dir, tmp_path, eos):
    # the reply used to be its bare text + EOS: a model whose template ends a turn with another token than its
    # EOS (a base checkpoint's tokenizer) never learned to end its turns
    tok = load_tokenizer(tiny_model_dir("llama"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template, tok.eos_token = CHATML, eos
    messages = [{"role": "user", "content": "Describe the cat."}]
    e = encode_example(tok, messages, "The cat is calm.", 64)
    prompt = tok.decode([t for t, m in zip(e.input_ids, e.completion_mask) if not m])
    completion = tok.decode([t for t, m in zip(e.input_ids, e.completion_mask) if m])
    assert prompt == "<|im_start|>user\nDescribe the cat.<|im_end|>\n<|im_start|>assistant\n"
    # an instruct tokenizer's EOS is its end of turn: the reply stops there; else the turn ends, then EOS follows
    assert completion == ("The cat is calm.<|im_end|>" if eos == "<|im_end|>" else "The cat is calm.<|im_end|>\n</s>")
    assert e.input_ids == tok(prompt + completion, add_special_tokens=False).input_ids  # the template's own tokens


@pytest.mark.parametrize("row, field", [
    ({"prompt": "hi"}, "completion"),
    ({"prompt": "hi", "completion": ""}, "completion"),
    ({"prompt": 3, "completion": "x"}, "prompt"),
])
def test_malformed_row_fails_before_training(tiny_model_dir, tmp_path, capsys, row, field):
    data = tmp_path / "bad.jsonl"
    good = {"prompt": "a", "completion": "b"}
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, row, good]))
    out = tmp_path / "out"
    rc = main(["sft", "--model", tiny_model_dir("llama"), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl" in err and "row 2" in err and field in err
    assert not out.exists()  # failed before any run directory or training


def test_chat_answers_each_line_until_eof(tiny_model_dir, monkeypatch, capsys):
    lines = iter(["Describe the cat.", "/reset", "Tell me about the lake."])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", tiny_model_dir("llama"), "--generation.max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2  # /reset is a command, not a message


def test_chat_leaves_out_the_oldest_messages_when_the_conversation_outgrows_the_model(tmp_path, monkeypatch, capsys):
    # 48 positions: the fourth line had run GPT-2's position embeddings out of range (an IndexError, the session lost)
    from rlhfkit.models.tiny import make_tiny_model

    path = make_tiny_model("gpt2", tmp_path / "gpt2", hidden_size=32, num_layers=1, num_heads=2, max_positions=48)
    lines = iter(["Describe the cat and the dog."] * 4 + ["word " * 60, "Hi."])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    import rlhfkit.rollout.generate as generation

    sent, real = [], generation.generate
    monkeypatch.setattr(generation, "generate", lambda model, tok, prompts, *a, **k: sent.append(list(prompts[0]))
                        or real(model, tok, prompts, *a, **k))
    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", str(path), "--generation.max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 5  # every line answered but the one too long alone
    assert "oldest exchanges are left out" in out and "that message is longer than the 41 tokens" in out
    # whole exchanges go: each prompt opens with a user message and alternates (templates that check it refuse
    # otherwise); the declined message leaves the conversation before it in place
    assert all([m["role"] for m in p] == ["user", "assistant"] * (len(p) // 2) + ["user"] for p in sent)
    assert len(sent[-1]) > 1 and sent[-1][-1]["content"] == "Hi."


def test_pickled_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    """Safe loading: a directory with only a pickle (.bin) checkpoint is refused by default."""
    import shutil

    from rlhfkit.models.load import load_causal_lm as load

    src = tiny_model_dir("llama")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    model = AutoModelForCausalLM.from_pretrained(src)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"):
        load(ModelConfig(path=str(pickled)), torch.device("cpu"))
    loaded = load(ModelConfig(path=str(pickled), allow_pickle=True), torch.device("cpu"))
    assert torch.equal(loaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


@pytest.mark.parametrize("command, row", [
    ("sft", lambda text: {"prompt": "User: Hi.\nAssistant:", "completion": text}),
    ("dpo", lambda text: {"prompt": "User: Hi.\nAssistant:", "chosen": " Hello.", "rejected": text}),
    ("rm", lambda text: {"prompt": "User: Hi.\nAssistant:", "chosen": text, "rejected": " Hello."}),
    # KTO: an example is measured by its own completion; one whose KL partner is long is kept (the partner cut)
    ("kto", lambda text: {"prompt": "User: Hi.\nAssistant:", "completion": text, "label": len(text) % 2 == 0}),
])
@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_examples_over_max_length_are_counted_then_cut_or_dropped(tiny_model_dir, tmp_path, capsys, command, row,
                                                                   too_long):
    path = tiny_model_dir("llama")
    long_text = " The cat is calm and lovely." * 8
    rows = [row(long_text if i % 4 == 0 else " Fine.") for i in range(12)]  # 3 of 12 too long for 24 tokens
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(path)
    assert len(encode_example(tok, rows[0]["prompt"], long_text, 1000).input_ids) > 24
    assert main([command, "--model", path, "--data", str(data), "--eval_data", str(data), "--out",
                 str(tmp_path / "out"), "--max_length", "24", "--too_long", too_long, "--train.max_steps", "1",
                 "--train.batch_size", "4", "--train.tensorboard", "false"]) == 0
    err = capsys.readouterr().err
    action = "dropped" if too_long == "drop" else "truncated"
    assert f"{data}: 3 of 12 examples exceed max_length 24: {action}" in err


def test_dropping_every_example_says_what_to_change(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "User: Hi.\nAssistant:", "completion": " word" * 50}) + "\n")
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max_length", "16", "--too_long", "drop", "--train.tensorboard", "false"]) != 0
    assert "every example exceeds max_length 16; raise it or set too_long truncate" in capsys.readouterr().err


def test_rollout_prompts_over_max_prompt_length_are_dropped_and_counted(tiny_model_dir, capsys):
    from rlhfkit.data.collate import drop_long_prompts, encode_prompt
    from rlhfkit.data.formats import DataError

    tok = load_tokenizer(tiny_model_dir("llama"))
    rows = [{"prompt": "User: Hi.\nAssistant:"}, {"prompt": "User: " + "Tell me more. " * 20 + "\nAssistant:"},
            {"prompt": [{"role": "user", "content": "Hi."}]}]
    limit = len(encode_prompt(tok, rows[0]["prompt"])) + 4
    assert len(encode_prompt(tok, rows[2]["prompt"])) <= limit  # the chat prompt, rendered, fits
    kept = drop_long_prompts(rows, tok, limit, "prompts.jsonl")
    assert kept == [rows[0], rows[2]]
    err = capsys.readouterr().err
    assert f"prompts.jsonl: 1 of 3 prompts exceed max_prompt_length {limit}: dropped\n" in err  # no too_long to set
    with pytest.raises(DataError, match="every prompt exceeds max_prompt_length 2; raise it or shorten the prompts"):
        drop_long_prompts(rows, tok, 2, "prompts.jsonl")
    assert drop_long_prompts(rows, tok, 0, "prompts.jsonl") == rows


def test_an_adapter_trained_from_a_relative_path_loads_from_anywhere(tiny_model_dir, tmp_path, monkeypatch):
    """The base is recorded as an absolute path: the adapter loads from another working directory."""
    import shutil

    from rlhfkit.config import LoraConfig
    from rlhfkit.models.load import add_lora, save_model

    shutil.copytree(tiny_model_dir("llama"), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = add_lora(load_causal_lm(ModelConfig(path="base"), torch.device("cpu")), LoraConfig(enabled=True, r=2))
    save_model(model, load_tokenizer("base"), tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "base").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_causal_lm(ModelConfig(path=str(tmp_path / "adapter")), torch.device("cpu"))
    assert loaded.config.vocab_size == model.config.vocab_size


@pytest.mark.parametrize("targets, task, extra", [
    ("all-linear", "CAUSAL_LM", set()),
    ("all-linear+head", "CAUSAL_LM", set()),  # not the frozen head's base (vocab x hidden), which the base has
    ("all-linear", "SEQ_CLS", {"base_model.model.score.modules_to_save.default.weight",  # a reward model's head
                               "base_model.model.score.modules_to_save.critic.weight"}),
])
def test_saved_keys_are_what_the_adapter_directory_holds(tiny_model_dir, tmp_path, targets, task, extra):
    # a sharded peft model gathers these alone to save (not the frozen base): they must be all save_pretrained writes
    from safetensors.torch import load_file

    from rlhfkit.config import LoraConfig
    from rlhfkit.models.load import add_lora, saved_keys
    from rlhfkit.models.reward import load_reward_backbone

    cfg, cpu = ModelConfig(path=tiny_model_dir("llama")), torch.device("cpu")
    base = load_causal_lm(cfg, cpu) if task == "CAUSAL_LM" else load_reward_backbone(cfg, cpu)
    model = add_lora(base, LoraConfig(enabled=True, r=4, target_modules=targets), task_type=task)
    model.add_adapter("critic", model.peft_config["default"])  # every adapter is saved: PPO's critic too
    keys = saved_keys(model)
    assert keys and keys < set(model.state_dict())
    assert {k for k in keys if ".lora_" not in k} == extra
    assert {k for k in keys if ".critic." in k} and {k for k in keys if ".default." in k}
    model.save_pretrained(tmp_path / "all", safe_serialization=True, save_embedding_layers=False)  # as save_model
    state = model.state_dict()
    model.save_pretrained(tmp_path / "some", safe_serialization=True, state_dict={k: state[k] for k in keys},
                          save_embedding_layers=False)
    for path in ("adapter_model.safetensors", "critic/adapter_model.safetensors"):
        whole, some = load_file(str(tmp_path / "all" / path)), load_file(str(tmp_path / "some" / path))
        assert whole.keys() == some.keys() and all(torch.equal(whole[k], some[k]) for k in whole)


def test_an_adapter_on_the_output_head_is_saved_without_the_frozen_head(tiny_model_dir, tmp_path):
    # peft saved the base's output head (vocab x hidden) beside such an adapter: GBs per checkpoint at 128k tokens
    from safetensors.torch import load_file

    from rlhfkit.config import LoraConfig
    from rlhfkit.models.load import add_lora, save_model

    path = tiny_model_dir("llama")
    model = add_lora(load_causal_lm(ModelConfig(path=path), torch.device("cpu")),
                     LoraConfig(enabled=True, r=4, target_modules="all-linear+head"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    save_model(model, load_tokenizer(path), tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in k for k in saved) and any("lm_head.lora_B" in k for k in saved)
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = load_causal_lm(ModelConfig(path=str(tmp_path / "adapter")), torch.device("cpu"))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    # a second adapter (PPO's critic) goes to its own folder, where a full critic of an earlier run is removed
    old = tmp_path / "adapter" / "critic"
    old.mkdir()
    (old / "config.json").write_text("{}"), (old / "model.safetensors").write_text("old weights")
    model.add_adapter("critic", model.peft_config["default"])
    save_model(model, load_tokenizer(path), tmp_path / "adapter")
    assert sorted(p.name for p in old.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # each with a card saying what it is: the actor's, that peft's merge would change the tied input embeddings
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM.from_pretrained(" in card
    assert "adapts the output head (lm_head), which this base ties to the input embeddings" in card
    assert "PPO's critic: this adapter on the base, with value_head.safetensors" in (old / "README.md").read_text()


def test_a_save_cut_short_leaves_the_earlier_model_whole(tiny_model_dir, tmp_path, monkeypatch):
    import os

    from rlhfkit.models.load import save_model

    path = tiny_model_dir("llama")
    model, tok = load_causal_lm(ModelConfig(path=path), torch.device("cpu")), load_tokenizer(path)
    out = tmp_path / "out"
    save_model(model, tok, out)
    before = (out / "model.safetensors").read_bytes()
    (out / "model-00002-of-00002.safetensors").write_text("a shard of an earlier, larger model")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", fails)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tok, out)
    assert (out / "model.safetensors").read_bytes() == before  # not a half-written file: the earlier one
    assert not (out / ".tmp-model").exists()  # nor the failed save's files
    monkeypatch.undo()
    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), replace(a, b)))
    save_model(model, tok, out)
    assert not (out / ".tmp-model").exists() and not (out / "model-00002-of-00002.safetensors").exists()
    assert renamed.index("model.safetensors") < renamed.index("config.json")  # a new config: new weights beside it
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(next(loaded.parameters()), next(model.parameters()))


def test_a_save_stopped_before_its_configs_never_loads_the_earlier_adapter(tiny_model_dir, tmp_path, monkeypatch):
    import os

    from rlhfkit.config import LoraConfig
    from rlhfkit.models.load import add_lora, is_adapter_dir, save_model

    path = tiny_model_dir("llama")
    tok, out = load_tokenizer(path), tmp_path / "out"
    save_model(add_lora(load_causal_lm(ModelConfig(path=path), torch.device("cpu")), LoraConfig(enabled=True, r=2)),
               tok, out)
    assert is_adapter_dir(out)
    replace = os.replace

    def stop_at_configs(a, b):
        if Path(b).name == "config.json":
            raise KeyboardInterrupt
        replace(a, b)

    monkeypatch.setattr(os, "replace", stop_at_configs)
    with pytest.raises(KeyboardInterrupt):
        save_model(load_causal_lm(ModelConfig(path=path), torch.device("cpu")), tok, out)  # now a full model
    assert not is_adapter_dir(out)  # the earlier adapter is gone before any new config names the new layout


def test_write_atomically_leaves_the_earlier_file_when_the_write_fails(tmp_path):
    from rlhfkit.models.load import write_atomically

    path = tmp_path / "score_normalization.json"
    write_atomically(path, lambda p: p.write_text('{"mean": 1.0}'))

    def half(p):
        p.write_text('{"me')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half)
    assert path.read_text() == '{"mean": 1.0}' and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_full_model_written_where_an_adapter_was_is_the_one_that_loads(tiny_model_dir, task_dir, tmp_path, capsys):
    # the earlier run's adapter_config.json made every loader take the stale adapter over the new weights
    out, model = tmp_path / "mix", tiny_model_dir("llama")
    common = ["--data", str(task_dir / "sft.jsonl"), "--out", str(out), "--train.batch_size", "4",
              "--train.tensorboard", "false"]
    assert main(["sft", "--model", model, *common, "--lora.enabled", "true", "--train.max_steps", "1"]) == 0
    again = ["--train.overwrite_output_dir", "true"]  # each run below replaces the model the one before saved
    assert main(["sft", "--model", model, *common, "--train.max_steps", "2", "--optim.lr", "1e-2", *again]) == 0
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    loaded = load_causal_lm(ModelConfig(path=str(out)), torch.device("cpu"))
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    capsys.readouterr()
    assert main(["sft", "--model", str(out), *common, "--train.max_steps", "1"]) == 2  # out is the model itself
    assert "is the model this run starts from" in capsys.readouterr().err
    # a model no rlhfkit run wrote (a user's own folder) is not written over unless asked
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    assert main(["sft", "--model", model, *common[:2], "--out", str(theirs), *common[4:], "--lora.enabled", "true",
                 "--train.max_steps", "1"]) == 2
    assert "holds a model no rlhfkit run wrote there (config.json)" in capsys.readouterr().err
    assert (theirs / "config.json").read_text() == "{}"
    # and an adapter where a full model was: transformers loaded the old full weights under the new adapter
    assert main(["sft", "--model", model, *common, "--lora.enabled", "true", "--train.max_steps", "1", *again]) == 0
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    adapted = load_causal_lm(ModelConfig(path=str(out)), torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers follows the adapter to its base
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(adapted(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-5)


def test_generate_sends_a_prompt_through_the_chat_template_when_asked(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    common = ["generate", "--model", model, "--prompt", "Describe the cat.", "--generation.max_new_tokens", "3"]
    assert main(common) == 0
    out = capsys.readouterr().out  # (DeepSpeed may print a line first)
    assert "Describe the cat." in out and "User:" not in out  # as typed
    assert main([*common, "--chat"]) == 0
    assert "User: Describe the cat.\nAssistant:" in capsys.readouterr().out  # the tiny model's template
    prompts = tmp_path / "chat.jsonl"  # a file's chat prompts print as the model saw them, not as a list
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi."}]}) + "\n")
    assert main(["generate", "--model", model, "--prompts", str(prompts), "--generation.max_new_tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "User: Hi.\nAssistant:" in out and "'role'" not in out


def test_generate_and_chat_sample_as_the_model_s_generation_config_says_unless_told(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    # Hugging Face's generate and vLLM take a model's own sampling defaults; ours had sampled at temperature 1
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    saved = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**saved, "do_sample": True, "top_k": 1}))

    def answers(*flags):
        capsys.readouterr()
        texts = []
        for seed in (0, 1, 2):
            assert main(["generate", "--model", str(model), "--prompt", "Describe the cat.", "--seed", str(seed),
                         "--generation.max_new_tokens", "8", *flags]) == 0
            texts.append(capsys.readouterr().out)
        return texts

    first = answers()
    assert all("sampling as" in t and "generation_config.json says: top_k 1 (set --generation.NAME" in t for t in first)
    assert len({t.split("says:")[1] for t in first}) == 1  # top_k 1: the most likely token each time, whatever seed
    told = answers("--generation.top_k", "0")
    assert not any("sampling as" in t for t in told) and len(set(told)) > 1  # as told: every token, seeds differ
    (model / "generation_config.json").write_text(json.dumps({**saved, "do_sample": False}))
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))  # no line: leaves
    assert main(["chat", "--model", str(model), "--generation.max_new_tokens", "4"]) == 0
    assert "generation_config.json says: temperature 0.0" in capsys.readouterr().out  # greedy, as it says


def test_an_adapter_saved_without_a_tokenizer_takes_its_base_s(tiny_model_dir, task_dir, tmp_path):
    # peft's own save_pretrained writes the adapter alone: generate and export had failed asking for sentencepiece
    out, bare = tmp_path / "sft", tmp_path / "bare"
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
                 "--lora.enabled", "true", "--lora.r", "4", "--train.max_steps", "1", "--train.batch_size", "4",
                 "--train.tensorboard", "false"]) == 0
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((out / name).read_bytes())
    assert load_tokenizer(str(bare)).get_vocab() == load_tokenizer(tiny_model_dir("llama")).get_vocab()
    assert main(["export", "--model", str(bare), "--out", str(tmp_path / "merged")]) == 0


def test_a_full_model_saved_where_an_adapter_was_leaves_no_adapter_model_card(tiny_model_dir, task_dir, tmp_path):
    # peft's README.md ("library_name: peft") had stayed beside the full model, calling it an adapter
    out = tmp_path / "sft"
    common = ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
              "--train.max_steps", "1", "--train.batch_size", "4", "--train.tensorboard", "false"]
    assert main([*common, "--lora.enabled", "true", "--lora.r", "4"]) == 0
    assert "library_name: peft" in (out / "README.md").read_text()
    (out / "notes.md").write_text("mine")
    assert main([*common, "--lora.enabled", "false", "--train.overwrite_output_dir", "true"]) == 0
    assert not (out / "README.md").exists() and not (out / "adapter_config.json").exists()
    assert (out / "notes.md").read_text() == "mine" and (out / "model.safetensors").is_file()
