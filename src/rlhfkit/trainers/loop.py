"""The one shared way to run optimiser steps, log, evaluate and checkpoint.

Supervised trainers (SFT, reward model, DPO family) hand ``run`` a function that turns a
list of example indices into a loss; PPO and the online methods use the same pieces
(``build_optimizer``, ``optimizer_step``, ``Logger``, ``save_checkpoint``) around their
own rollout loop. Data order is a pure function of (seed, step), so resuming needs only
the step counter, the model, the optimiser, the scheduler and the RNG states.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhfkit.config import OptimConfig, TrainConfig, save_config

LossFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimiser step ``step``: epoch e is a permutation seeded by (seed, e).

    Stateless, so a resumed run sees exactly the batches the uninterrupted run would.
    A final partial batch of each epoch is dropped unless the data is smaller than a batch.
    """
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[k * batch_size: (k + 1) * batch_size]


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * max(n_examples // cfg.batch_size, 1)))


def build_optimizer(params, cfg: OptimConfig, num_steps: int):
    """AdamW over the trainable ``params`` and a warm-up + cosine/constant schedule."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is everything frozen?")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, advance the schedule, clear gradients; returns the pre-clip gradient norm."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class Logger:
    """Metrics to ``metrics.jsonl`` (one JSON object per line, easy to plot) and TensorBoard."""

    def __init__(self, out: str | os.PathLike, tensorboard: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizer, scheduler, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """Write ``out/checkpoints/step-N`` atomically: a temporary directory renamed into place.

    Holds the model (or adapter) as ``save_pretrained`` writes it, and ``trainer_state.pt``
    with optimiser, scheduler, RNG states, the step and any ``extra`` state. Only the
    newest ``keep`` checkpoints are kept.
    """
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": _rng_state(), "extra": extra or {}}
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted((p for p in root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def run(*, model, loss_fn: LossFn, n_examples: int, cfg: TrainConfig, optim: OptimConfig, logger: Logger,
        evaluate: Callable[[], dict[str, float]] | None = None, desc: str = "train") -> dict[str, float]:
    """Train ``model`` for ``total_steps`` optimiser steps of ``loss_fn`` over shuffled batches.

    ``loss_fn(indices)`` returns a mean loss over those examples and detached metrics.
    Gradient accumulation splits each batch into ``cfg.grad_accum`` micro-batches, each
    weighted by its share of the batch, so the update equals one full-batch step.
    Returns the last evaluation's metrics (or the last training metrics).
    """
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"train.batch_size {cfg.batch_size} must be divisible by train.grad_accum {cfg.grad_accum}")
    num_steps = total_steps(cfg, n_examples)
    optimizer, scheduler = build_optimizer(model.parameters(), optim, num_steps)
    model.train()
    last: dict[str, float] = {}
    window: dict[str, list[float]] = defaultdict(list)
    t0 = time.perf_counter()
    bar = tqdm(range(num_steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        indices = batch_indices(step, n_examples, cfg.batch_size, cfg.seed)
        micro = max(1, len(indices) // cfg.grad_accum)
        for i in range(0, len(indices), micro):
            chunk = indices[i: i + micro]
            loss, metrics = loss_fn(chunk)
            (loss * len(chunk) / len(indices)).backward()
            for k, v in {"loss": loss.item(), **metrics}.items():
                window[k].append(float(v))
        window["grad_norm"].append(optimizer_step(optimizer, scheduler, optim.max_grad_norm))
        done = step + 1
        if done % cfg.log_every == 0 or done == num_steps:
            last = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
            last["train/lr"] = scheduler.get_last_lr()[0]
            last["train/seconds"] = time.perf_counter() - t0
            logger.log(done, last)
            bar.set_postfix(loss=f"{last['train/loss']:.4f}")
            window.clear()
        if evaluate and cfg.eval_every and done % cfg.eval_every == 0 and done != num_steps:
            logger.log(done, evaluate())
            model.train()
        if cfg.save_every and done % cfg.save_every == 0:
            save_checkpoint(cfg.out, done, model, optimizer, scheduler)
    if evaluate:
        last = evaluate()
        logger.log(num_steps, last)
    return last


def prepare_out_dir(cfg, out: str | os.PathLike) -> Path:
    """Create the run directory and save the resolved config beside the outputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "rlhfkit_config.yaml")
    return out


def start_run(cfg):
    """What every trainer does once its data is validated: the run directory (with the resolved
    config), seeds, the device and the tokenizer of ``cfg.model``. Returns (out, device, tokenizer)."""
    from rlhfkit.models.load import load_tokenizer, resolve_device

    out = prepare_out_dir(cfg, cfg.train.out)
    seed_everything(cfg.train.seed)
    return out, resolve_device(cfg.train.device), load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)


def split_eval(load: Callable[[str], list], data: str, eval_data: str, fraction: float, seed: int
               ) -> tuple[list, list]:
    """(training rows, evaluation rows): ``eval_data``'s rows, or else a seeded ``fraction`` of
    ``data``'s held out (none when there are 20 rows or fewer). Every row is validated here."""
    rows = load(data)
    if eval_data:
        return rows, load(eval_data)
    shuffled = random.Random(seed).sample(rows, len(rows))
    n_eval = int(len(rows) * fraction) if len(rows) > 20 else 0
    return shuffled[n_eval:], shuffled[:n_eval]
