"""The one shared way to run optimiser steps, log, evaluate and checkpoint.

Supervised trainers (SFT, reward model, DPO family) hand ``run`` a function that turns a
list of example indices into a loss; PPO and the online methods use the same pieces
(``build_optimizer``, ``optimizer_step``, ``Logger``, ``save_checkpoint``) around their
own rollout loop. Data order is a pure function of (seed, step), so resuming needs only
the step counter, the model, the optimiser, the scheduler and the RNG states.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch

from rlhfkit import distributed, fsdp, zero
from rlhfkit.config import ConfigError, OptimConfig, TrainConfig, save_config
from rlhfkit.progress import progress

CONFIG_FILE = "rlhfkit_config.yaml"
# indices → (mean loss over its units, the number of units — tokens or examples —, detached metrics)
LossFn = Callable[[list[int]], tuple[torch.Tensor, float, dict[str, float]]]


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
    # the fused kernel updates every tensor in one pass (CPU and CUDA): ~10× less optimiser time on a CPU.
    # Sharded and whole tensors together (PPO's sharded critic adapter and its value head) go one at a time:
    # the multi-tensor kernels take one kind only
    mixed = distributed.world_size() > 1 and len({distributed.is_shard(p) for p in params}) > 1
    fused = not mixed and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=fused, foreach=False if mixed else None)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = fsdp.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))  # over every shard
    if math.isfinite(norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def rollout_steps(cfg: TrainConfig, desc: str, start: int, step_fn: Callable[[int], dict[str, float]],
                  checkpoints: "Checkpoints", logger: "Logger", evaluate: Callable[[], dict[str, float]] | None = None,
                  postfix: Callable[[dict[str, float]], dict[str, str]] = dict) -> dict[str, float]:
    """The outer loop of PPO and the online methods: ``step_fn(step)`` (a step's metrics) for steps ``start`` to
    ``cfg.max_steps``, then ``evaluate()`` (every process calls it) every ``cfg.eval_every`` steps and at the
    end, the metrics logged every ``cfg.log_every`` steps, checkpoints when due, a clean stop on SIGINT /
    SIGTERM, a progress bar (process 0) showing ``postfix(metrics)``. Rewinds, then closes, ``logger``.
    Returns the last step's metrics with the final evaluation's."""
    steps, metrics = cfg.max_steps, {}
    logger.rewind(start)  # a fresh run (start 0) does not append to an old run's records
    try:
        with StopRequest() as stop:
            bar = progress(range(start, steps), desc, initial=start, total=steps, disable=not distributed.is_main())
            for step in bar:
                metrics = step_fn(step)
                bar.set_postfix(**postfix(metrics))
                done = step + 1
                if evaluate and cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
                    metrics.update(evaluate())
                if done % cfg.log_every == 0 or done == steps:
                    logger.log(done, metrics)
                checkpoints.after_step(done, stop)
            checkpoints.at_end(steps)
        if evaluate:
            final = evaluate()
            logger.log(steps, final)
            metrics.update(final)
    finally:
        logger.close()
    return metrics


def evaluate_on_main(evaluate: Callable[[torch.nn.Module], dict[str, float]], model) -> dict[str, float]:
    """``evaluate(model)`` on process 0, {} on the others. Every process calls it: a sharded ``model``
    is gathered by all of them around process 0's evaluation (``fsdp.gathered``)."""
    with fsdp.gathered(model):
        return evaluate(model) if distributed.is_main() else {}


class NonFinite:
    """What to do with a NaN or inf loss or gradient (``train.on_nan``): stop naming the step, the
    quantity and the last good checkpoint, or skip the update and count it."""

    def __init__(self, policy: str, checkpoints: "Checkpoints"):
        self.policy, self.checkpoints, self.skipped = policy, checkpoints, 0

    def ok(self, what: str, value: float, step: int) -> bool:
        """True when ``value`` is finite; else raises (policy 'stop') or counts a skip and returns False."""
        if math.isfinite(value):
            return True
        if self.policy == "skip":
            self.skipped += 1
            return False
        last = self.checkpoints.last or "none (set train.save_every)"
        raise FloatingPointError(f"the {what} is {value} at step {step}; last good checkpoint: {last}. "
                                 "Lower optim.lr, check the data, or set train.on_nan skip")


class Logger:
    """Metrics to ``metrics.jsonl`` (one JSON object per line, easy to plot) and TensorBoard."""

    def __init__(self, out: str | os.PathLike, tensorboard: bool = True):
        self.out = Path(out)
        self.file = self.writer = None
        if not distributed.is_main():  # one process writes; the others log nothing
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        self.writer = self._tensorboard() if tensorboard else None

    def _tensorboard(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"), purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Forget the records after ``step``: a resumed run logs those steps again, and a fresh run
        (step 0) into an old run's directory starts a fresh file. One record per step, always.
        TensorBoard's events after ``step`` are purged too (``purge_step``: TensorBoard hides them)."""
        if self.file is None:
            return
        if self.writer is not None:
            self.writer.close()
            self.writer = self._tensorboard(purge_step=step + 1)
        path = self.out / "metrics.jsonl"
        self.file.close()
        kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is None:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


Optimizers = dict[str, tuple]  # name → (optimizer, scheduler)


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizers: Optimizers, extra: dict | None = None,
                    keep: int = 2, save_weights: Callable[[Path], None] | None = None) -> Path:
    """Write ``out/checkpoints/step-N`` atomically: a temporary directory renamed into place.

    Holds the weights as ``save_weights(dir)`` writes them (default ``model.save_pretrained``,
    so a checkpoint loads like the final model) and ``trainer_state.pt`` with every trainable
    tensor of ``model.named_parameters()``, the optimisers and schedulers, RNG states, the
    step and any ``extra`` state. Only the newest ``keep`` checkpoints are kept.

    A sharded model (``rlhfkit.fsdp``; or PPO's roles, whose models are) or one DeepSpeed partitions
    (``rlhfkit.zero``: optimisers an engine steps) and its optimiser state are gathered into full tensors
    first, by every process
    (call this on all of them; each calls ``save_weights`` too, which gathers); process 0 writes what a
    1-process run writes.
    """
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    sharded = fsdp.updates_shards(opt for opt, _ in optimizers.values())
    engines = {name: zero.engine_of(opt) for name, (opt, _) in optimizers.items()}
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if sharded:  # collectives: every process gathers, process 0 keeps the full tensors
        if save_weights is None:
            from rlhfkit.models.load import saved_keys

            keys = saved_keys(model)  # a peft model's: its adapters, not the frozen base
            weights = fsdp.full_state_dict(model, None if keys is None else keys | set(trainable))
            trained = None if weights is None else {n: weights[n] for n in trainable}
        else:  # save_weights gathers what it writes
            weights, trained = None, fsdp.gather({n: params[n].detach() for n in trainable})
        optimizer_states = fsdp.gather({name: opt.state_dict() for name, (opt, _) in optimizers.items()})
    elif any(engines.values()):  # collectives too: DeepSpeed's partitions, as full tensors
        # stages 1-2 hold whole weights; PPO's engines (its save_weights) are never ZeRO-3
        weights = zero.full_state_dict(model) if zero.partitioned(model) else None
        optimizer_states = {name: engine.optimizer_state() for name, engine in engines.items()}
        trained = zero.full_params(model, trainable)
    else:
        weights, optimizer_states = None, {name: opt.state_dict() for name, (opt, _) in optimizers.items()}
        trained = {n: params[n].detach().clone() for n in trainable}
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if save_weights is not None and (sharded or distributed.is_main()):
        save_weights(tmp)  # sharded: every process gathers, process 0 writes
    if not distributed.is_main():
        return final
    if save_weights is None:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}))
    # the trainable tensors by name as well: restoring them needs no knowledge of how the
    # model (full, LoRA, score or value head) was saved above
    state = {"step": step, "rng": _rng_state(), "trainable": trained, "extra": extra or {},
             "optimizers": {name: {"optimizer": optimizer_states[name], "scheduler": sched.state_dict()}
                            for name, (_, sched) in optimizers.items()}}
    torch.save(state, tmp / "trainer_state.pt")
    if (Path(out) / CONFIG_FILE).is_file():  # the resolved config the run was started with
        shutil.copy2(Path(out) / CONFIG_FILE, tmp / CONFIG_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted((p for p in root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: str | os.PathLike, resume: str) -> Path:
    """``resume`` = 'latest' → the newest complete checkpoint under ``out/checkpoints``; else that directory."""
    if resume != "latest":
        path = Path(resume)
    else:
        found = sorted(Path(out).glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
        if not found:
            raise FileNotFoundError(f"no checkpoint under {Path(out) / 'checkpoints'} to resume from")
        path = found[-1]
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.pt)")
    return path


def load_checkpoint(path: Path, model, optimizers: Optimizers) -> dict:
    """Restore trainable weights, optimisers, schedulers and RNG states; returns the saved state.
    The saved tensors are full ones: a sharded model takes each process's shard of them."""
    # our own file, written by save_checkpoint; read onto the CPU (it may come from another device), then
    # copied into the parameters and optimiser states wherever they live
    state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    params = dict(model.named_parameters())
    missing = set(state["trainable"]) - set(params)
    if missing or set(state["optimizers"]) != set(optimizers):
        raise ValueError(f"{path} does not match this run (other model or trainer?): "
                         f"unknown tensors {sorted(missing)[:3]}, optimisers {sorted(state['optimizers'])}")
    for name, value in state["trainable"].items():
        fsdp.copy_full_(params[name], value)
    for name, (opt, sched) in optimizers.items():
        saved = fsdp.shard_optimizer_state(opt, state["optimizers"][name]["optimizer"])
        # how this run's AdamW steps (fused, or one tensor at a time: ``build_optimizer``) is its own choice,
        # whatever the run that saved it chose
        kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in opt.param_groups]
        opt.load_state_dict({**saved, "param_groups": [{**group, **kernel} for group, kernel
                                                       in zip(saved["param_groups"], kernels)]})
        sched.load_state_dict(state["optimizers"][name]["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    cuda = state["rng"].get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state


class Checkpoints:
    """One run's checkpoints: resume at start, save when due (``train.save_every``) or on request.

    ``model`` offers ``named_parameters()`` (every trainable tensor is saved and restored) and,
    unless ``save_weights`` is given, ``save_pretrained``; ``optimizers`` maps a name to
    (optimizer, scheduler); ``extra()`` returns any other state to save (a KL controller, a
    generator), handed back by ``resume``.
    """

    def __init__(self, cfg: TrainConfig, model, optimizers: Optimizers, extra: Callable[[], dict] | None = None,
                 save_weights: Callable[[Path], None] | None = None):
        self.cfg, self.model, self.optimizers = cfg, model, optimizers
        self.extra, self.save_weights = extra or dict, save_weights
        self.last: Path | None = None

    def resume(self) -> tuple[int, dict]:
        """(steps already done, the saved extra state); (0, {}) when ``train.resume`` is unset."""
        if not self.cfg.resume:
            return 0, {}
        self.last = find_checkpoint(self.cfg.out, self.cfg.resume)
        state = load_checkpoint(self.last, self.model, self.optimizers)
        return state["step"], state["extra"]

    def save(self, step: int) -> Path:
        # rank 0 writes; the path is the same for every rank. A sharded model is gathered by all of them.
        sharded = fsdp.updates_shards(opt for opt, _ in self.optimizers.values())
        partitioned = zero.updates_partitions(opt for opt, _ in self.optimizers.values())
        if not distributed.is_main() and not sharded and not partitioned:
            self.last = Path(self.cfg.out) / "checkpoints" / f"step-{step}"
            return self.last
        self.last = save_checkpoint(self.cfg.out, step, self.model, self.optimizers, self.extra(),
                                    self.cfg.keep_checkpoints, self.save_weights)
        return self.last

    def finish(self, step: int) -> Path:
        """The checkpoint of ``step``: the one already written, or a new one."""
        return self.last if self.last and self.last.name == f"step-{step}" else self.save(step)

    def at_end(self, step: int) -> None:
        """A checkpoint of the last step too, when the run checkpoints at all (``train.save_every``)."""
        if self.cfg.save_every:
            self.finish(step)

    def after_step(self, step: int, stop: "StopRequest") -> None:
        """Save when due; after SIGINT/SIGTERM, save and exit saying how to resume. Processes that saw the
        signal at different steps stop together, after the same one (saving a sharded model is collective)."""
        stopping = distributed.any_process(stop.signal is not None)
        if self.cfg.save_every and step % self.cfg.save_every == 0:
            self.save(step)
        if stopping:
            path = self.finish(step)
            distributed.barrier()  # process 0 writes it: the others, exiting first, would have the launcher kill it
            raise SystemExit(f"stopped by signal {stop.signal or 'in another process'} after step {step}; "
                             f"checkpoint {path}. Resume with the same command and --train.resume latest")


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step (and checkpoint), not mid-step."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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
        units_of: Callable[[list[int]], float] = len) -> dict[str, float]:
    """Train ``model`` for ``total_steps`` optimiser steps of ``loss_fn`` over shuffled batches.

    ``loss_fn(indices)`` returns the mean loss over those examples' units (tokens for SFT,
    examples for pairwise losses), the number of units, and detached metrics. Each step's batch
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
    backward: ``units_of(indices)`` counts them as ``loss_fn`` will (default: one per example).
    Returns the last evaluation's metrics (or the last training metrics).
    """
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"train.batch_size {cfg.batch_size} must be divisible by train.grad_accum {cfg.grad_accum}")
    world = distributed.world_size()
    sharding = fsdp.mode(cfg.fsdp) if world > 1 else "off"
    stage = zero.stage(cfg.deepspeed) if world > 1 else 0
    if sharding != "off" and stage:
        raise ConfigError(f"both FSDP ({sharding}) and DeepSpeed (ZeRO-{stage}) are asked for: choose one "
                          "(train.fsdp off or train.deepspeed off, or one accelerate config)")
    per_step = min(cfg.batch_size, n_examples)  # a batch is the whole data when there is less than one batch
    if (sharding != "off" or stage) and per_step % (world * cfg.grad_accum):
        what = f"FSDP ({sharding})" if stage == 0 else f"DeepSpeed ZeRO-{stage}"
        raise ValueError(f"with {what} every process runs the same forwards and backwards (they gather "
                         f"and reduce together): train.batch_size {per_step} must be divisible by processes "
                         f"({world}) x train.grad_accum ({cfg.grad_accum})")
    fsdp.shard(model, sharding, what="the trained model")
    sharded = fsdp.is_sharded(model)
    num_steps = total_steps(cfg, n_examples)
    optimizer, scheduler = build_optimizer(model.parameters(), optim, num_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    checkpoints = Checkpoints(cfg, model, {"model": (optimizer, scheduler)})
    nonfinite = NonFinite(cfg.on_nan, checkpoints)
    start, _ = checkpoints.resume()  # into the plain model and optimiser: a DeepSpeed engine adopts them
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
    logger.rewind(start)  # a fresh run (start 0) does not append to an old run's records
    model.train()
    last: dict[str, float] = {}
    window: dict[str, list[float]] = defaultdict(list)
    t0, throughput = time.perf_counter(), Throughput(start)
    with StopRequest() as stop:
        bar = progress(range(start, num_steps), desc, initial=start, total=num_steps, disable=not distributed.is_main())
        for step in bar:
            mine = distributed.shard(batch_indices(step, n_examples, cfg.batch_size, cfg.seed))
            micro = max(1, -(-len(mine) // cfg.grad_accum))
            units, loss_sum, bad, miscounted = 0.0, 0.0, 0.0, 0.0
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
                if not finite:
                    bad += 1
                    continue
                units, loss_sum = units + weight, loss_sum + loss.item() * weight
                for k, v in metrics.items():
                    window[k].append(float(v))
            tokens = float(tokens_of(mine)) if tokens_of else 0.0
            units, loss_sum, bad, tokens, miscounted = distributed.all_sum([units, loss_sum, bad, tokens, miscounted],
                                                                           device)
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
                               else None, bar, t0, last, throughput)
            checkpoints.after_step(step + 1, stop)
    checkpoints.at_end(num_steps)
    if evaluate and evaluates:
        last = evaluate()
        logger.log(num_steps, last)  # process 0 alone writes
    return last


def _under(context: Callable[[], ContextManager], fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    return wrapped


def _after_step(done, num_steps, cfg, model, scheduler, logger, window, evaluate, bar, t0, last, throughput):
    """Log and evaluate when due; returns the last logged metrics."""
    if (done % cfg.log_every == 0 or done == num_steps) and "loss" in window:
        last = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
        last.update({f"train/{k}": v for k, v in throughput.read(done).items()})
        last["train/lr"] = scheduler.get_last_lr()[0]
        last["train/seconds"] = time.perf_counter() - t0
        logger.log(done, last)
        bar.set_postfix(loss=f"{last['train/loss']:.4f}")
        window.clear()
    if evaluate and cfg.eval_every and done % cfg.eval_every == 0 and done != num_steps:
        logger.log(done, evaluate())
        model.train()
        throughput.restart(done)
    return last


def prepare_out_dir(cfg, out: str | os.PathLike) -> Path:
    """Create the run directory and save the resolved config beside the outputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(cfg, out / CONFIG_FILE)
    return out


ZERO_TRAINERS = "sft, rm, dpo, orpo, simpo, kto and ppo's mode separate"  # the trainers DeepSpeed partitions


def start_run(cfg, deepspeed: bool = False):
    """What every trainer does once its data is validated: the run directory (with the resolved
    config), seeds, the device and the tokenizer of ``cfg.model``. Returns (out, device, tokenizer).
    A trainer whose models DeepSpeed cannot partition (``deepspeed`` False: the online methods, which
    shard with FSDP) refuses a DeepSpeed run here."""
    from rlhfkit.models.load import load_tokenizer, resolve_device

    chosen = zero.mode(cfg.train.deepspeed)
    if chosen != "off" and not deepspeed:
        raise ConfigError(f"DeepSpeed ({chosen}, from train.deepspeed or the accelerate config) is supported for "
                          f"{ZERO_TRAINERS}, not for {type(cfg).__name__.removesuffix('Config')}: shard it with FSDP "
                          "(train.fsdp full_shard, or examples/accelerate/fsdp.yaml) and train.deepspeed off, or "
                          "launch it with replicas (docs/distributed.md)")
    device = distributed.setup(resolve_device(cfg.train.device))
    out = prepare_out_dir(cfg, cfg.train.out)
    seed_everything(cfg.train.seed)
    return out, device, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)


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
