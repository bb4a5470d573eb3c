"""Checkpoints, exact resume, clean stops and non-finite steps: what every trainer's loop relies on so
that a run never loses work (``trainers.loop`` runs the steps).

A checkpoint is a directory ``out/checkpoints/step-N`` written atomically (a temporary directory renamed
into place): the weights as the final model is saved (``save_pretrained``, or the trainer's own
``save_weights``), and ``trainer_state.pt`` with every trainable tensor, the optimisers and schedulers,
the RNG states, the step and the trainer's extra state. Tensors are full whatever the run's sharding
(FSDP) or partitioning (DeepSpeed), so a checkpoint resumes with any number of processes.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rlhfkit import distributed, fsdp, zero
from rlhfkit.config import TrainConfig

CONFIG_FILE = "rlhfkit_config.yaml"  # the resolved config, beside a run's outputs and in each checkpoint


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
