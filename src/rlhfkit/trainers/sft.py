"""Supervised fine-tuning: cross-entropy on completion tokens only (DESIGN.md §1).

Data: ``prompt`` + ``completion`` rows, or chat ``messages`` whose last turn is the
assistant's (rendered with the tokenizer's chat template; every assistant turn is learned, or with
``assistant_turns: last`` the last alone). Prompt, other turns and padding tokens carry no loss,
whatever the padding side.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from rlhfkit.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig, arg, columns_arg
from rlhfkit.data.collate import (as_prompt_completion, collate, encode_conversation, encode_example, encoded_rows,
                                  fit_to_length, label_mask, pack)
from rlhfkit.data.formats import load_sft
from rlhfkit.models.forward import LOGITS_CHUNK_HELP, check_packing, masked_logprobs, packed_logprobs
from rlhfkit.models.load import (add_lora, check_max_length, load_causal_lm, mixed_precision, refuse_adapter_dir,
                                 save_model)
from rlhfkit.trainers.loop import Logger, releases_out_dir, run, split_eval, start_run


@dataclass
class SFTConfig:
    """`rlhfkit sft`: supervised fine-tuning on demonstrations."""

    data: str = arg("", "training file (json, jsonl, csv, parquet or a datasets directory)")
    eval_data: str = arg("", "evaluation file; empty = hold out eval_fraction of the training rows")
    eval_fraction: float = arg(0.05, "share of training rows held out for eval loss when eval_data is empty",
                               ge=0, lt=1)
    columns: dict[str, str] = columns_arg()
    max_length: int = arg(256, "tokens per example at most (prompt + completion + EOS)", ge=2)
    too_long: Literal["truncate", "drop"] = arg("truncate", "examples over max_length: cut them (the prompt loses its "
                                                "start first) or leave them out; either way they are counted")
    padding_side: Literal["left", "right"] = arg("right", "pad batches on the 'right' or 'left' (the loss is the same)")
    packing: bool = arg(False, "lay each micro-batch's examples end to end in rows of up to max_length tokens instead "
                        "of padding each (attention kept within each example; the same loss and update, fewer "
                        "padding tokens computed; TRL's padding_free)")
    logits_chunk: int = arg(0, LOGITS_CHUNK_HELP, ge=0)
    assistant_turns: Literal["all", "last"] = arg("all", "chat messages: learn every assistant turn (TRL's "
                                                  "assistant_only_loss) or the last alone (the earlier as context)")
    model: ModelConfig = arg(ModelConfig, "the model to fine-tune")
    lora: LoraConfig = arg(LoraConfig, "LoRA adapters (off = full fine-tuning)")
    optim: OptimConfig = arg(OptimConfig, "optimiser")
    train: TrainConfig = arg(TrainConfig(out="runs/sft", epochs=3.0), "training loop")


def completion_nll(model, batch: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of completion tokens and their count.

    batch: ``input_ids``, ``attention_mask``, ``completion_mask``, each (B, T), or a packed batch (``collate.pack``:
    ``position_ids`` instead of ``attention_mask``). Returns (nll_sum, n_tokens), scalars; the label of position t
    is token t+1. ``chunk``: output-head positions at a time (``forward.masked_logprobs``; 0 = all).
    """
    mask = label_mask(batch)  # the label of position t is token t+1
    if "attention_mask" in batch:
        logprobs = masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask, chunk)  # (B, T-1)
    else:
        logprobs = packed_logprobs(model, batch["input_ids"], batch["position_ids"], mask, chunk)
    return -logprobs.sum(), mask.sum().to(logprobs.dtype)


@releases_out_dir
def train(cfg: SFTConfig) -> dict[str, float]:
    """Fine-tune ``cfg.model.path`` on ``cfg.data``; the model lands in ``cfg.train.out``."""
    # every row is validated before anything is loaded
    load = partial(load_sft, columns=cfg.columns)
    records, eval_records = split_eval(load, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.train.seed)
    refuse_adapter_dir(cfg.model.path, "SFT")
    check_max_length(cfg.model, cfg.max_length)
    out, device, tokenizer = start_run(cfg)
    model = load_causal_lm(cfg.model, device, trainable=not cfg.lora.enabled)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, float32=cfg.model.dtype == "auto")

    def encode_row(row):
        if cfg.assistant_turns == "all" and "messages" in row:  # one turn: encoded as the last alone
            return encode_conversation(tokenizer, row["messages"], cfg.max_length)
        return encode_example(tokenizer, *as_prompt_completion(row), cfg.max_length)

    def encode(rows, source):
        file = source if source == cfg.eval_data else cfg.data  # held-out rows come from the data file
        encoded = encoded_rows(file, rows, lambda some: [encode_row(r) for r in some], lambda: load(file))
        return fit_to_length(encoded, cfg.too_long, lambda e: e.truncated, f"max_length {cfg.max_length}", source)

    examples, eval_examples = encode(records, cfg.data), encode(eval_records, cfg.eval_data or "held-out rows")

    if cfg.packing:
        check_packing(model)

    def to_batch(items):
        batch = (pack(items, cfg.max_length, tokenizer.pad_token_id) if cfg.packing
                 else collate(items, tokenizer.pad_token_id, cfg.padding_side))
        return {k: v.to(device) for k, v in batch.items()}

    def loss_fn(indices: list[int]):
        nll, n = completion_nll(model, to_batch([examples[i] for i in indices]), cfg.logits_chunk)
        tokens = n.item()
        return nll / max(tokens, 1.0), tokens, {}  # a mean over completion tokens

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not eval_examples:
            return {}
        model.eval()
        total, count = 0.0, 0.0
        for i in range(0, len(eval_examples), cfg.train.batch_size):
            nll, n = completion_nll(model, to_batch(eval_examples[i: i + cfg.train.batch_size]), cfg.logits_chunk)
            total, count = total + nll.item(), count + n.item()
        return {"eval/loss": total / max(count, 1)}

    with Logger.of_run(out, cfg) as logger:  # closed however the run ends (W&B told how)
        metrics = run(model=model, loss_fn=loss_fn, n_examples=len(examples), cfg=cfg.train, optim=cfg.optim,
                      tokens_of=lambda idx: sum(len(examples[i].input_ids) for i in idx),
                      units_of=lambda idx: float(label_mask(collate([examples[i] for i in idx], tokenizer.pad_token_id,
                                                                    cfg.padding_side)).sum()),
                      logger=logger, evaluate=evaluate, desc="sft", amp=mixed_precision(cfg.model.dtype, device),
                      tokenizer=tokenizer,
                      save=lambda: save_model(model, tokenizer, out))
    return metrics
