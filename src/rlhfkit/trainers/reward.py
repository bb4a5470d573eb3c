"""Reward-model training: pairwise Bradley–Terry on preference data (DESIGN.md §3).

loss = −log σ(s(x, y_w) − s(x, y_l) − m), the score s read at each sequence's last real
token (``rlhfkit.models.reward.sequence_scores``). Chosen and rejected go through one
concatenated forward of 2B rows. An optional ``margin`` column gives m per pair.

To serve as PPO's third adapter on a shared base, train with ``lora.enabled: true`` on
that same base model: PPO checks the adapter's base at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from statistics import mean, pstdev
from typing import Literal

import torch

from rlhfkit import distributed
from rlhfkit.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig, arg, columns_arg
from rlhfkit.data.collate import collate, drop_tied_pairs, encode_pair, encoded_rows, fit_to_length, pack
from rlhfkit.data.formats import load_preference
from rlhfkit.losses import reward_model_loss
from rlhfkit.models.forward import check_packing, prompt_width
from rlhfkit.models.load import (add_lora, check_max_length, mixed_precision, refuse_adapter_dir, save_model,
                                 write_atomically)
from rlhfkit.models.reward import (NORMALIZATION_FILE, load_reward_backbone, packed_sequence_scores,
                                   reward_backbone, sequence_scores)
from rlhfkit.trainers.loop import Logger, releases_out_dir, run, split_eval, start_run


@dataclass
class RewardConfig:
    """`rlhfkit rm`: train a reward model on (prompt, chosen, rejected) pairs."""

    data: str = arg("", "preference file with prompt, chosen, rejected (and an optional margin) columns")
    eval_data: str = arg("", "held-out pairs; empty = hold out eval_fraction of the training rows")
    eval_fraction: float = arg(0.05, "share of training pairs held out when eval_data is empty", ge=0, lt=1)
    columns: dict[str, str] = columns_arg()
    max_length: int = arg(256, "tokens per sequence at most (prompt + response + EOS)", ge=2)
    too_long: Literal["truncate", "drop"] = arg("truncate", "examples over max_length: cut them (the prompt loses its "
                                                "start first) or leave them out; either way they are counted")
    packing: bool = arg(False, "lay each micro-batch's sequences (both answers of a pair) end to end in rows of up to "
                        "max_length tokens instead of padding each (attention kept within each; the same scores and "
                        "update, fewer padding tokens computed, but a pair's prompt computed twice)")
    normalize: bool = arg(True, "record score mean/std over the training set so scores come out standardised")
    center_rewards: float = arg(0.0, "weight of the mean of (s_chosen + s_rejected)^2 added to the loss: draws "
                                "the scores towards mean 0 (TRL's center_rewards_coefficient; 0.01 in Eisenstein "
                                "et al. 2023)", ge=0, lt=float("inf"))
    model: ModelConfig = arg(ModelConfig, "the model to start from (usually the SFT model)")
    lora: LoraConfig = arg(LoraConfig, "LoRA adapters (the score head is trained alongside)")
    optim: OptimConfig = arg(OptimConfig, "optimiser")
    train: TrainConfig = arg(TrainConfig(out="runs/rm", epochs=1.0), "training loop")


def pair_scores(model, batch: dict[str, torch.Tensor], n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a 2B-row batch laid out as [chosen..., rejected...]: → (chosen (B,), rejected (B,))."""
    # a pair's two rows share their prompt's columns: those run once per pair
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"], prompt_width(batch["completion_mask"]))
    return scores[:n_pairs], scores[n_pairs:]


@releases_out_dir
def train(cfg: RewardConfig) -> dict[str, float]:
    """Train a reward model from ``cfg.model.path`` on ``cfg.data``; saved to ``cfg.train.out``."""
    # every row is validated before anything is loaded
    load = partial(load_preference, columns=cfg.columns)
    records, eval_records = split_eval(load, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.train.seed)
    refuse_adapter_dir(cfg.model.path, "a reward model")  # a causal LM's adapter: its head is not a score head
    check_max_length(cfg.model, cfg.max_length)
    out, device, tokenizer = start_run(cfg)
    model = load_reward_backbone(cfg.model, device, trainable=not cfg.lora.enabled)
    # HF's own pooling reads the last token that is not the pad token, this toolkit the last attended one (the
    # EOS): the same where the tokenizer has a pad token of its own, one token early where it pads with EOS
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, task_type="SEQ_CLS", float32=cfg.model.dtype == "auto")

    def encode_rows(rows):
        return [(*encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], cfg.max_length), r.get("margin"))
                for r in rows]

    def encode(rows, source):
        file = source if source == cfg.eval_data else cfg.data  # held-out rows come from the data file
        encoded = encoded_rows(file, rows, encode_rows, lambda: load(file))
        return fit_to_length(encoded, cfg.too_long, lambda e: e[0].truncated or e[1].truncated,
                             f"max_length {cfg.max_length}", source)

    pairs, eval_pairs = encode(records, cfg.data), encode(eval_records, cfg.eval_data or "held-out rows")
    # pairs cut to the same tokens teach the loss nothing; held-out ones stay (a tie counts against the model)
    pairs = drop_tied_pairs(pairs, lambda e: (e[0], e[1]), f"max_length {cfg.max_length}", cfg.data)

    if cfg.packing:
        check_packing(reward_backbone(model))

    def scores_of(items):
        seqs = [c for c, _, _ in items] + [r for _, r, _ in items]
        batch = (pack(seqs, cfg.max_length, tokenizer.pad_token_id) if cfg.packing
                 else collate(seqs, tokenizer.pad_token_id))
        batch = {k: v.to(device) for k, v in batch.items()}
        if cfg.packing:
            chosen, rejected = packed_sequence_scores(model, batch["input_ids"], batch["position_ids"],
                                                      batch["sequence_ids"]).chunk(2)
        else:
            chosen, rejected = pair_scores(model, batch, len(items))
        margins = [m for _, _, m in items]  # a row without a margin has 0 (Llama 2's "negligibly better")
        margin = (torch.tensor([m or 0.0 for m in margins], device=device)
                  if any(m is not None for m in margins) else None)
        return chosen, rejected, margin

    def loss_fn(indices):
        loss, stats = reward_model_loss(*scores_of([pairs[i] for i in indices]), center=cfg.center_rewards)
        return loss, len(indices), {k: float(v) for k, v in stats.items()}  # a mean over pairs

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not eval_pairs:
            return {}
        model.eval()
        chosen, rejected, margins = [], [], []
        for i in range(0, len(eval_pairs), cfg.train.batch_size):
            c, r, m = scores_of(eval_pairs[i: i + cfg.train.batch_size])
            chosen.append(c), rejected.append(r), margins.append(torch.zeros_like(c) if m is None else m)
        c, r, m = torch.cat(chosen), torch.cat(rejected), torch.cat(margins)
        scores = torch.cat([c, r])
        return {"eval/accuracy": (c > r).float().mean().item(), "eval/margin": (c - r).mean().item(),
                # with the rows' margins and the centring term, as train/loss
                "eval/loss": reward_model_loss(c, r, m, center=cfg.center_rewards)[0].item(),
                "eval/score_mean": scores.mean().item(), "eval/score_std": scores.std().item()}

    stats: dict[str, float] = {}
    amp = mixed_precision(cfg.model.dtype, device)

    def save() -> None:
        """The model and, with ``normalize``, its score statistics over the training pairs beside it: both
        before the final evaluation, which may fail or be interrupted (PPO reads raw scores without them). The
        scores as training computed them, under its autocast: a LoRA model's float32 score head beside a bf16 base
        could not read bf16 hidden states without it."""
        if cfg.normalize:
            model.eval()
            with torch.no_grad(), amp():
                train_scores = []
                for i in range(0, len(pairs), cfg.train.batch_size):
                    c, r, _ = scores_of(pairs[i: i + cfg.train.batch_size])
                    train_scores += c.tolist() + r.tolist()
            stats.update(mean=mean(train_scores), std=max(pstdev(train_scores), 1e-6))
            if distributed.is_main():  # (prepare_out_dir made ``out``)
                write_atomically(out / NORMALIZATION_FILE, lambda path: path.write_text(json.dumps(stats, indent=2)))
        elif distributed.is_main():  # an earlier run's statistics there would rescale this model's scores
            (out / NORMALIZATION_FILE).unlink(missing_ok=True)
        save_model(model, tokenizer, out)

    with Logger.of_run(out, cfg) as logger:  # closed however the run ends (W&B told how)
        metrics = run(model=model, loss_fn=loss_fn, n_examples=len(pairs), cfg=cfg.train, optim=cfg.optim,
                      tokens_of=lambda idx: sum(len(pairs[i][0].input_ids) + len(pairs[i][1].input_ids) for i in idx),
                      logger=logger, evaluate=evaluate, desc="reward model",
                      amp=amp, tokenizer=tokenizer, save=save)
    if stats:
        metrics = {**metrics, "train/score_mean": stats["mean"], "train/score_std": stats["std"]}
    return metrics
