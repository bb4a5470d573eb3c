"""The one shared way to run optimiser steps, log, evaluate and checkpoint (``trainers.checkpoint``).

Supervised trainers (SFT, reward model, DPO family) hand ``run`` a function that turns a
list of example indices into a loss; PPO and the online methods use the same pieces
(``build_optimizer``, ``optimizer_step``, ``Logger``, ``Checkpoints``) around their
own rollout loop (``rollout_steps``). Data order is a pure function of (seed, step), so resuming needs only
the step counter, the model, the optimiser, the scheduler and the RNG states.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import random
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch

from rlhfkit import distributed, fsdp, zero
from rlhfkit.config import ConfigError, OptimConfig, TrainConfig, check_bounds, save_config, to_dict
from rlhfkit.models.load import checkpoint_activations, learn_mode, write_atomically
from rlhfkit.ops import mean_of
from rlhfkit.progress import progress
from rlhfkit.trainers.checkpoint import (CONFIG_FILE, DATA_FILE, Checkpoints, NonFinite, StopRequest,
                                         check_no_earlier_run, check_resume_config, data_digests, exclusive_lock,
                                         find_checkpoint)

# indices → (mean loss over its units, the number of units — tokens or examples —, detached metrics)
Metric = float | tuple[float, float]  # a mean over the micro-batch's units, or (mean, count) over some of them
LossFn = Callable[[list[int]], tuple[torch.Tensor, float, dict[str, Metric]]]


def add_metrics(sums: dict[str, list[float]], metrics: dict[str, Metric], weight: float) -> None:
    """Add one batch's ``metrics`` to ``sums`` (key → [weighted sum, weight]). A plain value is a mean over
    ``weight`` units; a pair (mean, count) a mean over ``count`` of them (KTO's reward of its desirable
    examples), which counts for nothing at count 0. Each key is entered, so every process holds the same."""
    for key, metric in metrics.items():
        value, count = metric if isinstance(metric, tuple) else (metric, weight)
        total = sums.setdefault(key, [0.0, 0.0])
        if float(count):
            total[0] += float(value) * float(count)
            total[1] += float(count)


def metric_means(sums: dict[str, list[float]], device: torch.device | None = None) -> dict[str, float]:
    """The means ``add_metrics`` added up, over every process when a ``device`` is given (a collective; a process
    whose share of the step was empty has no keys, so the processes agree on them first); a key with nothing in
    it is left out."""
    keys = sorted(sums)
    if device is not None and distributed.world_size() > 1:
        keys = sorted(set().union(*distributed.all_gather(keys)))
    flat = [x for key in keys for x in sums.get(key, [0.0, 0.0])]
    totals = distributed.all_sum(flat, device) if device is not None else flat
    return {key: totals[2 * i] / totals[2 * i + 1] for i, key in enumerate(keys) if totals[2 * i + 1]}


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


def warmup_updates(cfg: OptimConfig, num_steps: int) -> int:
    """The warm-up's length in updates: ``warmup_ratio`` of ``num_steps`` rounded up where it is set (as transformers
    rounds it), else ``warmup_steps``."""
    return math.ceil(cfg.warmup_ratio * num_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps


def lr_factor(cfg: OptimConfig, num_steps: int, step: int) -> float:
    """The learning rate of update ``step`` (0-based) of ``num_steps`` as a fraction of ``cfg.lr``: a linear warm-up
    over W = ``warmup_updates`` updates, (step + 1) / (W + 1), then ``cfg.schedule``: constant 1, or a cosine or
    linear decay from 1 at update W to ``min_lr_ratio`` at update ``num_steps``, held there after."""
    warmup = warmup_updates(cfg, num_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(1, num_steps - warmup), 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_optimizer(params, cfg: OptimConfig, num_steps: int):
    """AdamW over the trainable ``params`` and the schedule ``lr_factor`` describes. Weight decay, when set, applies
    to matrices alone (embeddings, projections, LoRA's A and B, a value head's weight): biases and norm weights, the
    1-D tensors, are left undecayed, as HF Trainer leaves them; the decayed group comes first."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is everything frozen?")
    split = [[p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]]
    groups = ([{"params": group, "weight_decay": decay} for group, decay in zip(split, (cfg.weight_decay, 0.0))
               if group] if cfg.weight_decay else [{"params": params}])
    # the fused kernel updates every tensor in one pass (CPU and CUDA): ~10× less optimiser time on a CPU.
    # Sharded and whole tensors together (PPO's sharded critic adapter and its value head) go one at a time:
    # the multi-tensor kernels take one kind only
    mixed = distributed.world_size() > 1 and len({distributed.is_shard(p) for p in params}) > 1
    fused = not mixed and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=fused, foreach=False if mixed else None)
    if warmup_updates(cfg, num_steps) >= num_steps > 0:
        setting = (f"optim.warmup_ratio {cfg.warmup_ratio} ({warmup_updates(cfg, num_steps)} updates)"
                   if cfg.warmup_ratio else f"optim.warmup_steps {cfg.warmup_steps}")
        warnings.warn(f"{setting} is not below the run's {num_steps} updates: the learning rate stays under optim.lr "
                      f"{cfg.lr} throughout (set {setting.split()[0]} lower)", stacklevel=2)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, num_steps, step))


def optimizer_step(optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, advance the schedule, clear gradients; returns the pre-clip gradient norm.

    A non-finite norm (a NaN or inf anywhere in the gradients) applies nothing: the gradients
    are cleared and the schedule stays where it was, so the caller can stop or skip cleanly.
    An optimiser a DeepSpeed engine steps (``rlhfkit.zero``) takes the engine's step, which clips too.
    """
    engine = zero.engine_of(optimizer)
    if engine is not None:  # collective: every process steps
        norm = engine.step()
        if math.isfinite(norm):
            scheduler.step()
        return norm
    norm = clip_gradients(optimizer, max_grad_norm)
    take_step(optimizer, scheduler, math.isfinite(norm))
    return norm


def clip_gradients(optimizer, max_grad_norm: float) -> float:
    """The first half of ``optimizer_step`` (not for a DeepSpeed engine's optimiser): clip the gradients of
    ``optimizer``'s parameters to ``max_grad_norm`` (0: no clipping), over every shard; the norm before."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return fsdp.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))


def take_step(optimizer, scheduler, apply: bool) -> None:
    """The second half: step and advance the schedule where ``apply``, then clear the gradients."""
    if apply:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


UNREAD_BY_ROLLOUTS = ("batch_size", "grad_accum", "epochs")  # the supervised batches' settings in ``train``
# a rollout command's ``--help`` for the ``train`` section it shares with the supervised ones (config ``HELP``)
ROLLOUT_TRAIN_HELP = {"train.max_steps": "rollout steps (1 or more)",
                      **{f"train.{k}": None for k in UNREAD_BY_ROLLOUTS}}


def check_rollout_train(train: TrainConfig, batches: str) -> None:
    """A rollout trainer's ``train`` section: ``max_steps`` counts its steps (at least one), and the settings
    of supervised batches, which it does not read, keep their defaults (``batches`` names its own)."""
    if train.max_steps < 1:
        raise ValueError(f"train.max_steps is the number of rollout steps: set it to 1 or more, got {train.max_steps}")
    unread = [f"train.{k}" for k in UNREAD_BY_ROLLOUTS if getattr(train, k) != getattr(TrainConfig(), k)]
    if unread:
        raise ValueError(f"{', '.join(unread)} set, but a rollout step's batches are {batches}")


def rollout_steps(cfg: TrainConfig, desc: str, start: int, step_fn: Callable[[int], dict[str, float]],
                  checkpoints: Checkpoints, logger: "Logger", save: Callable[[], None],
                  evaluate: Callable[[], dict[str, float]] | None = None,
                  postfix: Callable[[dict[str, float]], dict[str, str]] = dict) -> dict[str, float]:
    """The outer loop of PPO and the online methods: ``step_fn(step)`` (a step's metrics) for steps ``start`` to
    ``cfg.max_steps``, then ``evaluate()`` (every process calls it) every ``cfg.eval_every`` steps and at the
    end, the metrics logged every ``cfg.log_every`` steps as their means over the steps since the last log (as the
    supervised loop logs; a rate, a count so far: the last value), an evaluation at the step it ran, checkpoints
    when due, a clean stop on SIGINT / SIGTERM, a progress bar (process 0) showing ``postfix(metrics)``. ``save()``
    writes the trained model after the last step, before the final evaluation, which may then fail or be
    interrupted without losing it. Rewinds, then closes, ``logger``. Returns the last step's metrics with the
    final evaluation's."""
    steps, metrics = cfg.max_steps, {}
    window = checkpoints.log_window = list(checkpoints.log_window_before or [])  # the steps since the last log
    with logger:  # closed however the run ends (W&B told how)
        checkpoints.check_start(start, steps)
        # a fresh run (start 0) does not append to an old run's records; one resumed from another's end takes up
        # its window
        logger.rewind(start, checkpoints.ended_with if start < steps else None)
        with StopRequest() as stop:
            bar = progress(range(start, steps), desc, initial=start, total=steps, disable=not distributed.is_main())
            for step in bar:
                metrics = step_fn(step)
                window.append(metrics)
                bar.set_postfix(**postfix(metrics))
                done = step + 1
                evaluation = {}
                if evaluate and cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
                    evaluation = evaluate()
                if done % cfg.log_every == 0 or done == steps:
                    logger.log(done, {**window_means(window), **evaluation})
                    if done % cfg.log_every == 0:  # the last window off the grid stays in the end's checkpoint
                        window.clear()
                elif evaluation:  # an evaluation between logged steps is logged at its own
                    logger.log(done, evaluation)
                metrics = {**metrics, **evaluation}
                _after_step_counted(checkpoints, done, stop, bar)
        checkpoints.at_end(steps)  # as the supervised loop: a signal now stops the run as it would without rlhfkit
        save()
        if evaluate:
            final = evaluate()
            logger.log(steps, final, again=True)
            metrics.update(final)
    return metrics


def _after_step_counted(checkpoints: Checkpoints, step: int, stop: StopRequest, bar) -> None:
    """``checkpoints.after_step``, a stop it makes counting the step on the progress ``bar`` first (tqdm counts a
    step as the next one begins: the bar showed one step fewer than the stop's message)."""
    try:
        checkpoints.after_step(step, stop)
    except SystemExit:
        bar.update(1)
        raise


LAST_IN_WINDOW = ("train/lr", "train/critic_lr", "train/skipped_updates", "rollout/beta")  # rates, counts so far


def window_means(records: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the steps ``records`` (those that have it); a rate or a count so far
    (``LAST_IN_WINDOW``), its last value."""
    means = mean_of(records)
    return {**means, **{k: records[-1][k] for k in LAST_IN_WINDOW if k in records[-1]}}


def evaluate_on_main(evaluate: Callable[[torch.nn.Module], dict[str, float]], model,
                     amp: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """``evaluate(model)`` on process 0 under the run's autocast ``amp``, {} on the others. Every process
    calls it: a sharded or partitioned ``model`` is gathered by all of them around process 0's evaluation
    (``fsdp.gathered``, ``zero.gathered``: the latter hands ``evaluate`` a whole copy)."""
    with fsdp.gathered(model), zero.gathered(model, here=distributed.is_main()) as whole:
        if not distributed.is_main():
            return {}
        with amp():
            return evaluate(whole)


class Logger:
    """Metrics to ``metrics.jsonl`` (one JSON object per line, easy to plot), TensorBoard and, with a
    ``wandb_project``, Weights & Biases (``config``: the run's settings it records); a rollout trainer's sampled
    completions to ``samples.jsonl`` (``samples``; a table in W&B)."""

    def __init__(self, out: str | os.PathLike, tensorboard: bool = True, wandb_project: str = "",
                 config: dict | None = None):
        self.out = Path(out)
        self.file = self.writer = self.wandb = None
        self.wandb_project, self.config = wandb_project, config
        if not distributed.is_main():  # one process writes; the others log nothing
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        self.writer = self._tensorboard() if tensorboard else None

    @classmethod
    def of_run(cls, out: str | os.PathLike, cfg) -> "Logger":
        """The logger a trainer's config ``cfg`` asks for (``train.tensorboard``, ``train.wandb_project``)."""
        return cls(out, cfg.train.tensorboard, cfg.train.wandb_project, to_dict(cfg))

    def _tensorboard(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"), purge_step=purge_step)

    def _start_wandb(self, step: int) -> None:
        """A W&B run for the steps after ``step``, in the group named after OUT: a resumed run is a run of its
        own there (W&B's steps only grow: the steps a killed run logged past its checkpoint are not rewound)."""
        import wandb

        if self.wandb is not None:
            self.wandb.finish()
        name = self.out.resolve().name
        # create_new: a run of its own beside any the user has open (the default would log into theirs and
        # finish it, or finish it first in a notebook)
        self.wandb = wandb.init(project=self.wandb_project, dir=str(self.out), group=name, config=self.config,
                                name=name if step == 0 else f"{name}-resumed-{step}", job_type="train",
                                reinit="create_new")

    def rewind(self, step: int, ended_with: dict | None = None) -> None:
        """Forget the records after ``step``: a resumed run logs those steps again, and a fresh run
        (step 0) into an old run's directory starts a fresh file. One record per step, always. A longer run
        resumed from the end of a shorter one (``ended_with``: that run's ``log_every`` and ``eval_every``) forgets
        too what it logged at ``step`` only because it ended there: its last window off its ``log_every`` grid (its
        end checkpoint holds that window, logged again with the steps after it) and its final evaluation off its
        ``eval_every`` grid, so the records are the longer run's unstopped.
        TensorBoard's events after ``step`` are purged too (``purge_step``: TensorBoard hides them); W&B
        starts a run for the steps to come (``_start_wandb``). Every process calls it: one W&B cannot start
        (no API key, say) stops them all."""
        failed = None
        if self.file is not None and self.wandb_project:
            try:
                self._start_wandb(step)
            except Exception as e:  # wandb's own errors (UsageError, CommError) derive from Exception alone
                failed = e
        if self.wandb_project and distributed.any_process(failed is not None):
            self.close()
            raise ConfigError(f"Weights & Biases could not start a run in project {self.wandb_project}"
                              + (f" ({type(failed).__name__}: {failed})" if failed else " (process 0 says why)")
                              + ": log in (`wandb login`, or WANDB_API_KEY), set WANDB_MODE=offline, or leave "
                              "train.wandb_project empty")
        if self.file is None:
            return
        if self.writer is not None:
            self.writer.close()
            self.writer = self._tensorboard(purge_step=step + 1)
        self._drop(lambda line: (logged := _step_of(line)) is None or logged > step,
                   (self.out / "samples.jsonl",))
        if ended_with is not None and step > 0:
            self._drop(lambda line: (record := _record(line)) is not None and int(record["step"]) == step
                       and _logged_at_an_end(record, **ended_with))

    def _drop(self, dropped: Callable[[str], bool], also: tuple[Path, ...] = ()) -> None:
        """Rewrite ``metrics.jsonl`` (and ``also``) without the lines ``dropped`` picks, when it picks any."""
        path = self.out / "metrics.jsonl"
        self.file.close()
        for records in (path, *also):
            lines = records.read_text(encoding="utf-8", errors="replace").splitlines(True) if records.exists() else []
            kept = [line for line in lines if not dropped(line)]
            if len(kept) < len(lines):
                write_atomically(records, lambda path: path.write_text("".join(kept), encoding="utf-8"))
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float], again: bool = False) -> None:
        """Append a record of ``metrics`` at ``step``; ``again``: in place of a record of the same metrics at that
        step (a finished run run again logs its final evaluation once more)."""
        if self.file is None:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if again:
            self._drop(lambda line: (logged := _record(line)) is not None and logged["step"] == step
                       and logged.keys() == record.keys())
        self.file.write(json.dumps(_finite(record)) + "\n")  # NaN as null: strict JSON (jq, JavaScript) reads it
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)
        if self.wandb is not None:  # started by ``rewind``, which every loop calls first
            self.wandb.log({k: float(v) for k, v in metrics.items()}, step=step)

    def samples(self, step: int, records: list[dict]) -> None:
        """Append sampled completions (``sample_records``: the step's first rows, over every process) of ``step`` to
        ``samples.jsonl``, one JSON object each (TRL's ``log_completions``); process 0 writes."""
        if self.file is None or not records:
            return
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:  # anything JSON lacks as text
            f.writelines(json.dumps(_finite({"step": step, **r}), ensure_ascii=False, default=str) + "\n"
                         for r in records)
        if self.wandb is not None:  # one table a step, its columns those of the records (prompt, completion, ...)
            import wandb

            columns = list(dict.fromkeys(k for r in records for k in r))
            rows = [[v if isinstance(v := _finite(r.get(k)), (str, int, float, bool)) or v is None
                     else json.dumps(v, ensure_ascii=False, default=str) for k in columns] for r in records]
            self.wandb.log({"samples": wandb.Table(columns=columns, data=rows)}, step=step)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, kind, leaving, traceback) -> None:
        self.close(leaving)

    def close(self, leaving: BaseException | None = None) -> None:
        """Close every sink; ``leaving``: the exception the run ends on, if any (``with logger:`` passes it), for
        W&B's exit code: 1, or a stop's status (130, 143). Closing again does nothing."""
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        self.file = self.writer = None
        if self.wandb is not None:
            status = leaving.code if isinstance(leaving, SystemExit) else 0 if leaving is None else 1
            code = status if isinstance(status, int) else 0 if status is None else 1  # sys.exit(), sys.exit("why")
            run, self.wandb = self.wandb, None
            try:
                run.finish(exit_code=code)
            except Exception as e:  # not over the error the run is leaving on
                warnings.warn(f"Weights & Biases did not finish its run cleanly: {e}", stacklevel=2)


def _record(line: str) -> dict | None:
    """A JSON-lines record with its step, or None for a line that is not one (blank, or cut off)."""
    try:
        record = json.loads(line)
        int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None
    return record


def _logged_at_an_end(record: dict, log_every: int, eval_every: int) -> bool:
    """Whether ``record`` is one a run logs at its last step only: a training record off its ``log_every`` grid (its
    last, shorter window) or an evaluation alone off its ``eval_every`` grid (its final one)."""
    step = int(record["step"])
    if all(key.startswith("eval/") for key in record if key != "step"):
        return not (eval_every and step % eval_every == 0)
    return step % log_every != 0


def _step_of(line: str) -> int | None:
    """The step of a JSON-lines record, or None for a line that is not one (blank, or cut off)."""
    record = _record(line)
    return None if record is None else int(record["step"])


def _finite(value):
    """``value`` with every non-finite float (NaN: a reward that does not apply; ±inf) as None, which JSON has."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def sample_records(prompts: list, completions: list[str], n: int, **values: list) -> list[dict]:
    """The step's first ``n`` samples as {prompt, completion, and each of ``values`` (name → one value per sample)},
    from this process's samples and, with several processes, theirs after: each samples a contiguous share of the
    step's rows in order, so they are the rows one process would log. Collective then: every process calls it."""
    mine = [{"prompt": p, "completion": c, **{k: v[i] for k, v in values.items()}}
            for i, (p, c) in enumerate(zip(prompts[:n], completions[:n]))]
    if distributed.world_size() == 1 or n == 0:
        return mine
    return [record for records in distributed.all_gather(mine) for record in records][:n]


class Throughput:
    """Seconds per step and tokens per second over each logging window (evaluation time left out)."""

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int) -> None:
        self.t, self.step, self.tokens = time.perf_counter(), step, 0.0

    def read(self, step: int) -> dict[str, float]:
        seconds = time.perf_counter() - self.t
        out = {"step_seconds": seconds / max(step - self.step, 1)}
        if self.tokens:
            out["tokens_per_s"] = self.tokens / max(seconds, 1e-9)
        self.restart(step)
        return out


def run(*, model, loss_fn: LossFn, n_examples: int, cfg: TrainConfig, optim: OptimConfig, logger: Logger,
        evaluate: Callable[[], dict[str, float]] | None = None, desc: str = "train",
        tokens_of: Callable[[list[int]], int] | None = None,
        amp: Callable[[], ContextManager] = contextlib.nullcontext,
        before_step: Callable[[list[int], int], None] | None = None,
        units_of: Callable[[list[int]], float] = len, tokenizer=None, dropout: bool = True,
        save: Callable[[], None] | None = None) -> dict[str, float]:
    """Train ``model`` for ``total_steps`` optimiser steps of ``loss_fn`` over shuffled batches.

    ``loss_fn(indices)`` returns the mean loss over those examples' units (tokens for SFT,
    examples for pairwise losses), the number of units, and detached metrics (``Metric``: each logged as its
    mean over the step's whole batch, every process's share and micro-batch counted). Each step's batch
    is split over the processes (``rlhfkit.distributed``) and, within a process, into
    ``cfg.grad_accum`` micro-batches; gradients of the unit sums are added up and divided by the
    step's total units, so the update equals one full-batch step whatever the split.
    ``tokens_of(indices)`` (optional) counts the tokens those examples feed the model: logged as
    ``train/tokens_per_s`` over all processes, beside ``train/step_seconds``. ``amp`` (from
    ``models.load.mixed_precision``) is entered around every forward (``loss_fn``, ``evaluate``), not
    around the backward. ``before_step(indices, micro)`` (optional) runs once a step in every process,
    with that process's share of the step's batch and its micro-batch size, before its micro-batches
    (KTO's reference point).
    With ``cfg.fsdp`` (or an accelerate FSDP launch) ``model`` is sharded over the processes
    first, in place (``rlhfkit.fsdp``); with ``cfg.deepspeed`` (or an accelerate DeepSpeed launch)
    DeepSpeed's ZeRO partitions it (``rlhfkit.zero``), which needs the step's units before its
    backward: ``units_of(indices)`` counts them as ``loss_fn`` will (default: one per example). ``tokenizer``
    (optional) is saved into each checkpoint beside the weights, so that one loads as a model. ``dropout``
    False trains ``model`` in eval mode, without the dropout its config asks for (the DPO family: the policy
    must give its reference's log-probs while their weights agree, as TRL's ``disable_dropout``). With
    ``cfg.gradient_checkpointing`` its layers recompute their activations in the backward (``load.learn_mode``).
    ``save()`` (every process calls it) writes the trained model after the last step, before the final
    evaluation, which may then fail or be interrupted without losing it.
    Returns the last evaluation's metrics (or the last training metrics).
    """
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"train.batch_size {cfg.batch_size} must be divisible by train.grad_accum {cfg.grad_accum}")
    world = distributed.world_size()
    sharding = fsdp.mode(cfg.fsdp) if world > 1 else "off"
    stage = zero.stage(cfg.deepspeed) if world > 1 else 0
    zero.refuse_with_fsdp(stage, sharding)
    per_step = min(cfg.batch_size, n_examples)  # a batch is the whole data when there is less than one batch
    if (sharding != "off" or stage) and per_step % (world * cfg.grad_accum):
        what = f"FSDP ({sharding})" if stage == 0 else f"DeepSpeed ZeRO-{stage}"
        raise ValueError(f"with {what} every process runs the same forwards and backwards (they gather "
                         f"and reduce together): train.batch_size {per_step} must be divisible by processes "
                         f"({world}) x train.grad_accum ({cfg.grad_accum})")
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    fsdp.shard(model, sharding, what="the trained model", amp=amp)
    sharded = fsdp.is_sharded(model)
    num_steps = total_steps(cfg, n_examples)
    optimizer, scheduler = build_optimizer(model.parameters(), optim, num_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    checkpoints = Checkpoints(cfg, model, {"model": (optimizer, scheduler)}, tokenizer=tokenizer)
    start, _ = checkpoints.resume()  # into the plain model and optimiser: a DeepSpeed engine adopts them
    nonfinite = NonFinite(cfg.on_nan, checkpoints)
    checkpoints.check_start(start, num_steps)
    engine = None
    if stage:
        engine = zero.Engine(model, optimizer, stage, cfg.grad_accum, per_step // (world * cfg.grad_accum),
                             optim.max_grad_norm)
    # every forward under the run's autocast (not around the backward); under DeepSpeed inside the engine's
    # forward, which turns off an autocast entered around it unless its own config asks for one
    loss_fn = _under(amp, loss_fn)
    before_step = before_step and _under(amp, before_step)
    evaluate = evaluate and _under(amp, evaluate)
    if engine is not None:
        # every forward of a loss (or of KTO's reference point) inside one engine forward; under ZeRO-3 an
        # evaluation's too, which every process runs (each forward gathers weights from all of them)
        loss_fn = functools.partial(engine.run, loss_fn)
        before_step = before_step and functools.partial(engine.run, before_step)
        if stage == 3 and evaluate is not None:
            evaluate = functools.partial(engine.run, evaluate)
    evaluates = distributed.is_main() or sharded or stage == 3  # a sharded model's forward needs every process
    # a fresh run (start 0) does not append to an old run's records; one resumed from another's end takes up its window
    logger.rewind(start, checkpoints.ended_with if start < num_steps else None)
    learn_mode(model, dropout)
    last: dict[str, float] = {}
    window: dict[str, list[float]] = defaultdict(list, checkpoints.log_window_before or {})  # since the last log
    checkpoints.log_window = window
    t0, throughput = time.perf_counter(), Throughput(start)
    with StopRequest() as stop:
        bar = progress(range(start, num_steps), desc, initial=start, total=num_steps, disable=not distributed.is_main())
        for step in bar:
            mine = distributed.shard(batch_indices(step, n_examples, cfg.batch_size, cfg.seed))
            micro = max(1, -(-len(mine) // cfg.grad_accum))
            units, loss_sum, bad, miscounted, sums = 0.0, 0.0, 0.0, 0.0, {}
            whole_step = micro >= len(mine) and world == 1
            if engine is not None:  # DeepSpeed averages over processes: scale by processes / the step's units
                expected = [float(units_of(mine[i: i + micro])) for i in range(0, len(mine), micro)]
                scale = world / max(distributed.all_sum([sum(expected)], device)[0], 1e-12)
            if before_step is not None:
                before_step(mine, micro)
            for i in range(0, len(mine), micro):
                loss, weight, metrics = loss_fn(mine[i: i + micro])
                finite = math.isfinite(loss.item())
                if engine is not None:  # collective too; DeepSpeed drops a step whose gradients are not finite
                    miscounted += weight != expected[i // micro]
                    last_micro, scaled = i + micro >= len(mine), loss * (weight * scale)
                    if last_micro and distributed.all_sum([bad + (not finite)], device)[0]:
                        scaled = scaled * float("nan")  # a bad loss anywhere: non-finite gradients, so no update
                    engine.backward(scaled, last=last_micro)
                elif finite or sharded:  # a sharded backward is collective: all run it; a bad step is dropped below
                    # the sum over this micro-batch's units; alone in the step, its mean needs no rescaling
                    (loss if whole_step else loss * weight).backward()
                add_metrics(sums, metrics if finite else dict.fromkeys(metrics, (0.0, 0.0)), weight)
                if not finite:
                    bad += 1
                    continue
                units, loss_sum = units + weight, loss_sum + loss.item() * weight
            tokens = float(tokens_of(mine)) if tokens_of else 0.0
            units, loss_sum, bad, tokens, miscounted = distributed.all_sum([units, loss_sum, bad, tokens, miscounted],
                                                                           device)
            for k, v in metric_means(sums, device).items():
                window[k].append(v)
            if miscounted:  # every process stops (a one-process error would leave the others waiting)
                raise RuntimeError("units_of counted other units than the loss has: the DeepSpeed scaling is wrong")
            throughput.tokens += tokens
            if engine is not None:  # its step is collective: every process takes it, a bad one applies nothing
                grad_norm = engine.step()
                if math.isfinite(grad_norm):
                    scheduler.step()
                if nonfinite.ok("loss", float("nan") if bad else loss_sum, step + 1) and nonfinite.ok(
                        "gradient norm", grad_norm, step + 1):
                    window["loss"].append(loss_sum / max(units, 1e-12))
                    window["grad_norm"].append(grad_norm)
            elif nonfinite.ok("loss", float("nan") if bad else loss_sum, step + 1):
                if not whole_step:
                    distributed.average_gradients(params, units)
                grad_norm = optimizer_step(optimizer, scheduler, optim.max_grad_norm)
                if nonfinite.ok("gradient norm", grad_norm, step + 1):
                    window["loss"].append(loss_sum / max(units, 1e-12))
                    window["grad_norm"].append(grad_norm)
            else:
                optimizer.zero_grad(set_to_none=True)
            window["skipped_steps"] = [nonfinite.skipped]
            last = _after_step(step + 1, num_steps, cfg, model, scheduler, logger, window, evaluate if evaluates
                               else None, bar, t0, last, throughput, dropout)
            _after_step_counted(checkpoints, step + 1, stop, bar)
    checkpoints.at_end(num_steps)
    if save is not None:
        save()
    if evaluate and evaluates:
        last = evaluate()
        logger.log(num_steps, last, again=True)  # process 0 alone writes
    return last


def _under(context: Callable[[], ContextManager], fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    return wrapped


def _after_step(done, num_steps, cfg, model, scheduler, logger, window, evaluate, bar, t0, last, throughput,
                dropout):
    """Log and evaluate when due; returns the last logged metrics."""
    if (done % cfg.log_every == 0 or done == num_steps) and "loss" in window:
        last = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
        last.update({f"train/{k}": v for k, v in throughput.read(done).items()})
        last["train/lr"] = scheduler.get_last_lr()[0]
        last["train/seconds"] = time.perf_counter() - t0
        logger.log(done, last)
        bar.set_postfix(loss=f"{last['train/loss']:.4f}")
        if done % cfg.log_every == 0:  # the last window off the grid stays in the end's checkpoint (``rewind``)
            window.clear()
    if evaluate and cfg.eval_every and done % cfg.eval_every == 0 and done != num_steps:
        logger.log(done, evaluate())
        learn_mode(model, dropout)
        throughput.restart(done)
    return last


_LOCKS: dict[Path, object] = {}  # the run directories this process holds now (their open lock files)
LOCK_FILE = ".rlhfkit.lock"


def lock_out_dir(out: Path) -> str | None:
    """Hold an exclusive lock on ``out`` (``flock`` on OUT/.rlhfkit.lock) until the run ends (``release_out_dir``)
    or the process does (a crash too), so that a second run into the same directory stops at once instead of
    interleaving checkpoints and logs with the first. Returns why it cannot (another process holds it), else None.
    Where locks are not supported (no ``fcntl``, some network file systems) there is none."""
    key = out.resolve()
    held = _LOCKS.get(key)
    if held is not None:  # this process holds it already (a run in one Python after another), if it is the same file
        with contextlib.suppress(OSError):
            if os.fstat(held.fileno()).st_ino == os.stat(out / LOCK_FILE).st_ino:
                return None
        release_out_dir(out)  # the directory was removed and made again: lock the new one
    out.mkdir(parents=True, exist_ok=True)
    try:
        handle = exclusive_lock(out / LOCK_FILE)
    except BlockingIOError:
        holder = (out / LOCK_FILE).read_text(encoding="utf-8").strip() or "unknown"
        return (f"another run is writing to {out} (process {holder}): wait for it to end, or write to another "
                "--train.out")
    if handle is None:
        return None
    handle.seek(0), handle.truncate(), handle.write(str(os.getpid())), handle.flush()
    _LOCKS[key] = handle
    return None


def release_out_dir(out: str | os.PathLike | None = None) -> None:
    """Let go of the lock on ``out`` (every run directory this process holds, with None)."""
    if not _LOCKS:  # none held (nor, without fcntl, ever taken)
        return
    import fcntl

    keys = list(_LOCKS) if out is None else [Path(out).resolve()]
    for key in keys:
        handle = _LOCKS.pop(key, None)
        if handle is not None:  # unlocked first: a process forked meanwhile (a reward's worker pool) holds a copy
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def releases_out_dir(train: Callable) -> Callable:
    """A trainer's ``train(cfg, ...)`` that lets go of its run directory's lock when it returns or raises (a
    notebook's next command, in another process, may write there)."""
    @functools.wraps(train)
    def wrapped(cfg, *args, **kwargs):
        try:
            return train(cfg, *args, **kwargs)
        finally:
            release_out_dir(cfg.train.out)
    return wrapped


def prepare_out_dir(cfg, out: str | os.PathLike) -> Path:
    """Create the run directory and save the resolved config beside the outputs. First, while the directory
    is as the earlier run left it: a resumed run's checkpoint must have been saved with these settings
    (``check_resume_config``), and a fresh run refuses, or with ``train.overwrite_output_dir`` deletes, an
    earlier run's checkpoints there (``check_no_earlier_run``); a fresh run over the model an earlier run saved
    there is refused too, unless ``train.overwrite_output_dir``."""
    out = Path(out)
    if Path(cfg.model.path).is_dir() and out.resolve() == Path(cfg.model.path).resolve():
        raise ConfigError(f"--train.out {out} is the model this run starts from ({cfg.model.path}): the run would "
                          "write over it (an adapter saved there would name itself as its base); write to another "
                          "--train.out")
    # a model this run did not write (no rlhfkit config beside it): saving there would remove its files
    foreign = _model_files(out)  # before the lock: no lock file is left in a user's own model folder
    if foreign and not (out / CONFIG_FILE).is_file() and not cfg.train.overwrite_output_dir:
        raise ConfigError(f"--train.out {out} holds a model no rlhfkit run wrote there ({foreign[0]}), which saving "
                          "would replace: write to another --train.out, or pass --train.overwrite_output_dir true")
    if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():
        raise ConfigError(f"{out / 'checkpoints'} is a file, where the run keeps its checkpoints: move it, or write to "
                          "another --train.out")
    # the other models a run reads (a reward model, a reference): saving there would remove their weights
    others = [getattr(cfg, "reward_model", ""), getattr(cfg, "ref_model", ""), *getattr(cfg, "rewards", [])]
    for other in others:
        if other and Path(other).is_dir() and out.resolve() == Path(other).resolve():
            raise ConfigError(f"--train.out {out} is {other}, a model this run reads: the run would write over it; "
                              "write to another --train.out")
    if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--train.wandb_project {cfg.train.wandb_project} logs to Weights & Biases, which is not "
                          "installed: pip install wandb (or leave train.wandb_project empty)")
    try:
        held = lock_out_dir(out) if distributed.is_main() else None
    except OSError as e:  # a directory it cannot make or write: every process stops on it, not process 0 alone
        held = f"cannot write to --train.out {out}: {e}"
    if distributed.any_process(held is not None):  # every process stops, not process 0 alone
        raise ConfigError(held or f"another run is writing to {out} (process 0 names it)")
    resumed = find_checkpoint(out, cfg.train.resume)
    if resumed is not None:
        check_resume_config(resumed, cfg)
    if resumed is None or resumed.resolve().parent != (out / "checkpoints").resolve():
        # a fresh run, or one resumed from another directory's checkpoint: not over a run that OUT holds
        check_no_earlier_run(out, cfg.train.overwrite_output_dir, cfg.model.path)
        # looked for under the lock: a run that finished a moment ago has saved its model by now
        finished = [name for name in _model_files(out) if name not in ("config.json", "generation_config.json")]
        if finished and (out / CONFIG_FILE).is_file() and not cfg.train.overwrite_output_dir:
            auto = (" (that run finished, saving its model: --train.resume auto resumes from checkpoints, and it "
                    "left none)" if cfg.train.resume == "auto" else "")
            raise ConfigError(f"--train.out {out} holds the model an earlier run saved ({finished[0]}), which this "
                              f"run would replace{auto}: write to another --train.out, or pass "
                              "--train.overwrite_output_dir true")
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(cfg, out / CONFIG_FILE)
        (out / DATA_FILE).write_text(json.dumps(data_digests(cfg), indent=1))
    return out


def _model_files(out: Path) -> list[str]:
    """The names of the model and adapter files (``load.MODEL_FILES``, ``ADAPTER_FILES``) in directory ``out``."""
    from rlhfkit.models.load import ADAPTER_FILES, MODEL_FILES

    return [f.name for pattern in (*MODEL_FILES, *ADAPTER_FILES) for f in out.glob(pattern)]


def start_run(cfg):
    """What every trainer does once its data is validated: the run directory (with the resolved
    config), seeds, the device and the tokenizer of ``cfg.model``. Returns (out, device, tokenizer)."""
    from rlhfkit.models.load import resolve_device, tokenizer_of

    check_bounds(cfg)  # a config built in Python has not been through the parser's check
    tokenizer = tokenizer_of(cfg.model)  # before the run directory is made: a template that cannot be read stops it
    device = distributed.setup(resolve_device(cfg.train.device), cfg.train.dist_timeout)
    out = prepare_out_dir(cfg, cfg.train.out)
    seed_everything(cfg.train.seed)
    return out, device, tokenizer


def split_eval(load: Callable[[str], list], data: str, eval_data: str, fraction: float, seed: int
               ) -> tuple[list, list]:
    """(training rows, evaluation rows): ``eval_data``'s rows, or else a seeded ``fraction`` of
    ``data``'s held out (none when there are 20 rows or fewer). Every row is validated here."""
    rows = load(data)
    if eval_data:
        return rows, load(eval_data)
    shuffled = random.Random(seed).sample(rows, len(rows))
    n_eval = int(len(rows) * fraction) if len(rows) > 20 else 0
    if fraction > 0 and not n_eval and distributed.is_main():
        print(f"{data}: {len(rows)} rows, none held out for evaluation (eval_fraction {fraction} of them is under "
              "one row, or there are 20 or fewer): pass --eval_data FILE to evaluate", file=sys.stderr)
    return shuffled[n_eval:], shuffled[:n_eval]
