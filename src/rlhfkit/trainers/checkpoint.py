"""Checkpoints, exact resume, clean stops and non-finite steps: what every trainer's loop relies on so
that a run never loses work (``trainers.loop`` runs the steps).

A checkpoint is a directory ``out/checkpoints/step-N`` written atomically (a temporary directory renamed
into place): the weights as the final model is saved (``save_pretrained``, or the trainer's own
``save_weights``), and ``trainer_state.pt`` with every trainable tensor, the optimisers and schedulers,
the RNG states, the step and the trainer's extra state, and a copy of the run's resolved config. Tensors are
full whatever the run's sharding (FSDP) or partitioning (DeepSpeed), so a checkpoint resumes with any number
of processes. ``trainer_state.pt`` holds tensors and plain values only, and is read back with
``torch.load(weights_only=True)``: resuming a checkpoint from elsewhere never runs code from it.

A resumed run must be the run that was saved (``check_resume_config``), and a fresh run does not mix its
checkpoints with an earlier run's in the same directory (``check_no_earlier_run``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from rlhfkit import distributed, fsdp, zero
from rlhfkit.config import ConfigError, TrainConfig, load_yaml, to_dict

CONFIG_FILE = "rlhfkit_config.yaml"  # the resolved config, beside a run's outputs and in each checkpoint
STATE_FILE = "trainer_state.pt"


def _rng_state() -> dict:
    """Every RNG's state as tensors, tuples, lists, ints and floats, which ``torch.load(weights_only=True)``
    reads back (numpy's own state holds an ndarray, which it refuses: its keys are saved as a list)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached_gaussian],
            "torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _step_dirs(root: Path) -> list[Path]:
    """The checkpoints ``step-N`` under ``root``, oldest first (by N); other names (a user's step-best) are not."""
    found = [p for p in root.glob("step-*") if p.name[len("step-"):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("step-"):]))


def exclusive_lock(path: str | os.PathLike):
    """An open handle on ``path`` (made if missing) holding an exclusive ``flock`` until it is closed or the process
    ends; None where locks are not supported (no ``fcntl``, some network file systems). Raises BlockingIOError while
    another process holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise
    except OSError:  # no locks on this file system
        handle.close()
        return None
    return handle


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path``, then each directory's entries: after a power loss, a checkpoint
    renamed into place is complete, never a name pointing at a truncated file."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


Optimizers = dict[str, tuple]  # name → (optimizer, scheduler)


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizers: Optimizers, extra: dict | None = None,
                    keep: int = 2, save_weights: Callable[[Path], None] | None = None, tokenizer=None,
                    rngs: list[dict] | None = None) -> Path:
    """Write ``out/checkpoints/step-N`` atomically: a temporary directory renamed into place.

    Holds the weights as ``save_weights(dir)`` writes them (default ``model.save_pretrained``,
    so a checkpoint loads like the final model) and ``trainer_state.pt`` with every trainable
    tensor of ``model.named_parameters()``, the optimisers and schedulers, RNG states (``rngs``: every
    process's, in rank order, as ``Checkpoints.save`` gathers them; by default the calling process's), the
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
        # stages 1-2 hold whole weights; the rollout trainers' ZeRO-3 engines are gathered by their save_weights
        weights = zero.full_state_dict(model) if zero.partitioned(model) else None
        optimizer_states = {name: engine.optimizer_state() for name, engine in engines.items()}
        trained = zero.full_params(model, trainable)
    else:
        weights, optimizer_states = None, {name: opt.state_dict() for name, (opt, _) in optimizers.items()}
        trained = {n: params[n].detach().to("cpu", copy=True) for n in trainable}  # not a second copy on a GPU
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        partitioned = any(zero.partitioned(opt) for opt, _ in optimizers.values())  # ZeRO-3: its weights split
        if save_weights is not None and (sharded or partitioned or distributed.is_main()):
            save_weights(tmp)  # sharded or partitioned: every process gathers, process 0 writes
        if not distributed.is_main():
            return final
        if save_weights is None:
            from rlhfkit.models.load import adapter_saving

            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}),
                                  **adapter_saving(model))
            if tokenizer is not None:  # a checkpoint of full weights then loads as a model (--model step-N)
                tokenizer.save_pretrained(tmp)
        # the trainable tensors by name as well: restoring them needs no knowledge of how the
        # model (full, LoRA, score or value head) was saved above
        # each process's RNG states: dropout draws masks as large as its own share's padded rows, so after a
        # step the processes' generators differ (and each GPU's generator is its own process's)
        rngs = rngs or [_rng_state()]
        state = {"step": step, "rng": rngs[0], "rng_by_rank": rngs, "trainable": trained, "extra": extra or {},
                 "optimizers": {name: {"optimizer": optimizer_states[name], "scheduler": sched.state_dict()}
                                for name, (_, sched) in optimizers.items()}}
        torch.save(state, tmp / STATE_FILE)
        for name in (CONFIG_FILE, DATA_FILE):  # the resolved config the run was started with, and its data's digests
            if (Path(out) / name).is_file():
                shutil.copy2(Path(out) / name, tmp / name)
        fsync_tree(tmp)  # on the disk before the rename makes it look complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:  # a failed save (a full disk, a second Ctrl-C): not its half-written copy left in OUT
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(root)  # the rename too
    done = _step_dirs(root)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint ``train.resume`` names: 'latest' → the newest complete one under ``out/checkpoints``;
    'auto' → that, or None when there is none (a fresh start); '' → None; else that directory."""
    if not resume:
        return None
    if resume not in ("latest", "auto"):
        path = Path(resume)
    else:
        found = _step_dirs(Path(out) / "checkpoints")
        if not found and resume == "auto":
            return None
        if not found:
            raise FileNotFoundError(f"no checkpoint under {Path(out) / 'checkpoints'} to resume from (--train.resume "
                                    "auto starts afresh when there is none)")
        path = found[-1]
    if not path.exists():  # a typo or a run elsewhere: "not a complete checkpoint" sent users looking inside it
        raise FileNotFoundError(f"--train.resume {resume}: no such directory; give a checkpoint directory "
                                "(OUT/checkpoints/step-N), or 'latest' or 'auto' for the newest under --train.out")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def read_state(path: Path) -> dict:
    """``path/trainer_state.pt`` onto the CPU (it may come from another device). Read with
    ``weights_only=True``: a file holding anything but tensors and plain values (a pickled object runs code
    as it loads) is refused, not run."""
    file = path / STATE_FILE
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]  # torch's line naming it
        raise ValueError(f"{file} holds objects other than tensors and plain values, so it was not loaded "
                         "(unpickling them could run code): rlhfkit writes none, so it was made elsewhere, or by "
                         f"an rlhfkit older than this format. {' '.join(found[:1])}".strip()) from None


def load_checkpoint(path: Path, model, optimizers: Optimizers) -> dict:
    """Restore trainable weights, optimisers, schedulers and RNG states; returns the saved state.
    The saved tensors are full ones: a sharded model takes each process's shard of them."""
    # read onto the CPU, then copied into the parameters and optimiser states wherever they live
    state = read_state(path)
    params = dict(model.named_parameters())
    missing = set(state["trainable"]) - set(params)
    if missing or set(state["optimizers"]) != set(optimizers):
        raise ValueError(f"{path} does not match this run (other model or trainer?): "
                         f"unknown tensors {sorted(missing)[:3]}, optimisers {sorted(state['optimizers'])}")
    for name, value in state["trainable"].items():
        fsdp.copy_full_(params[name], value)
    for name, (opt, sched) in optimizers.items():
        groups = len(state["optimizers"][name]["optimizer"]["param_groups"])
        if groups != len(opt.param_groups):
            raise ValueError(f"{path}: its {name} optimiser has {groups} parameter groups, this run's "
                             f"{len(opt.param_groups)}: it was saved by an rlhfkit that decayed biases and norms too "
                             "(optim.weight_decay); start the run afresh")
        saved = fsdp.shard_optimizer_state(opt, state["optimizers"][name]["optimizer"])
        # how this run's AdamW steps (fused, or one tensor at a time: ``build_optimizer``) is its own choice,
        # whatever the run that saved it chose
        kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in opt.param_groups]
        opt.load_state_dict({**saved, "param_groups": [{**group, **kernel} for group, kernel
                                                       in zip(saved["param_groups"], kernels)]})
        sched.load_state_dict(state["optimizers"][name]["scheduler"])
    by_rank = state.get("rng_by_rank") or []  # absent from older checkpoints
    # this process's own; on another number of processes, process 0's for all (as a fresh run seeds them alike)
    _set_rng_state(by_rank[distributed.rank()] if len(by_rank) == distributed.world_size() else state["rng"])
    return state


# Settings a resumed run may change: where it runs and what it logs, evaluates and saves; how each step's
# work is split over processes and micro-batches (a checkpoint holds full tensors, and the update is the
# full batch's: ``loop.run``; with dropout on, other masks: the same training in distribution); the sampler
# (the same samples either way); and the inputs of evaluation alone (PPO's and the online methods' held-out
# prompts, PPO's gold-reward task).
MAY_CHANGE_ON_RESUME = frozenset({
    "train.resume", "train.out", "train.device", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.tensorboard", "train.wandb_project", "train.overwrite_output_dir",
    "train.on_nan", "train.dist_timeout", "train.fsdp", "train.deepspeed", "train.grad_accum", "generation.backend",
    "generation.batch_size", "eval_prompts", "task", "model.allow_pickle", "model.trust_remote_code",
    # memory and logging, not the update: a run resumed to fit memory (rlhfkit ppo / grpo / rloo / reinforce-pp)
    "train.gradient_checkpointing", "micro_batch_size", "log_samples",
    "packing", "logits_chunk"})  # how a batch is laid out and computed (packing: sft), not what it learns

# settings added since some checkpoints were written whose default is not what those runs did: such a run
# resumes with the value it ran with (compared as any other setting) rather than the new default
EARLIER_BEHAVIOUR = {"assistant_turns": "last"}  # sft learned a conversation's last turn alone before fc0605a
# the run's length: under a constant schedule (PPO's and the online methods' default) it may change on a resume
LENGTH = frozenset({"train.max_steps", "train.epochs"})


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"optim": {"lr": 1e-3}} → {"optim.lr": 1e-3}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _as_saved(cfg) -> dict:
    """``cfg``'s settings as dotted keys, as ``save_config`` writes them and ``load_yaml`` reads them back."""
    return _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))


DATA_FILE = "data_digests.json"  # the sha256 of each training data file, beside a run's config and in each checkpoint
DATA_KEYS = ("data", "eval_data", "prompts")  # the config's data files that a resume must find unchanged


def data_digests(cfg) -> dict[str, str]:
    """The sha256 of each data file ``cfg`` names (``DATA_KEYS``; a ``datasets`` directory: its files, in order),
    by config key. A path that is not on the disk (a hub data set) is left out."""
    digests = {}
    for key in DATA_KEYS:
        if not getattr(cfg, key, ""):
            continue
        path = Path(getattr(cfg, key))
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            continue
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(path) if file != path else "").encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digests[key] = digest.hexdigest()
    return digests


def _check_resume_data(path: Path, cfg, saved: dict[str, str], now: dict[str, str]) -> None:
    """Refuse (ConfigError) to resume checkpoint ``path`` when a data file it was trained on (``saved``: its
    digests, by config key), under the same name, now holds other rows (``now``: ``data_digests``): the rest of the
    run would train on other data than its first part did."""
    changed = [f"{key} {getattr(cfg, key)}" for key in saved if key in now and saved[key] != now[key]]
    if changed:
        raise ConfigError(f"cannot resume {path}: {', '.join(changed)} changed since it was saved (its contents, "
                          "not its name). Resume with the data it was trained on, or start afresh: "
                          + _fresh_start_hint(path, ""))


def check_resume_config(path: Path, cfg) -> None:
    """Refuse (ConfigError) to resume checkpoint ``path`` as another run than the one it saved: with other
    settings (``_check_resume_settings``), or on data files that now hold other rows (``_check_resume_data``).
    Call it before the run's own config and data digests are written over. What a checkpoint holds no copy
    of is not checked. A data file found at another path (a job restarted where the disk is mounted elsewhere)
    may be resumed from when its contents are the same."""
    # {} for a checkpoint written before the digests were kept: nothing to compare
    saved = json.loads((path / DATA_FILE).read_text()) if (path / DATA_FILE).is_file() else {}
    now = data_digests(cfg)  # each file read once
    _check_resume_settings(path, cfg, {key for key, digest in now.items() if saved.get(key) == digest})
    _check_resume_data(path, cfg, saved, now)


def _check_resume_settings(path: Path, cfg, moved: set[str] = frozenset()) -> None:
    """Refuse (ConfigError, naming each change) to resume checkpoint ``path`` with settings other than those
    in its copy of the run's config, except ``MAY_CHANGE_ON_RESUME``, and the run's length (``LENGTH``) under a
    constant schedule. A new learning rate, batch size, seed, data file or length (``max_steps``, ``epochs``: a
    cosine schedule's length too) would silently train half of one run and half of another, while the run's
    recorded config claimed the new settings throughout. ``moved``: data keys whose files hold what they held
    when the checkpoint was saved, wherever they are now."""
    if not (path / CONFIG_FILE).is_file():
        return
    # both as save_config writes them and load_yaml reads them back, so that equal settings compare equal
    old = _flat(load_yaml(path / CONFIG_FILE))
    new = _as_saved(cfg)
    try:
        defaults = _as_saved(type(cfg)())
    except (TypeError, ValueError):  # a config class with required fields: no defaults to compare with
        defaults = {}
    for key in new.keys() - old.keys():  # a setting added to rlhfkit since: at its default, it changes nothing
        if key in EARLIER_BEHAVIOUR:
            old[key] = EARLIER_BEHAVIOUR[key]
        elif key in defaults and new[key] == defaults[key]:
            old[key] = new[key]
    # under a constant schedule the run's length sets no update (data order and sampling seeds are functions of
    # the step): a longer run resumed is the longer run uninterrupted, so it may be extended
    constant = (old.get("optim.schedule") == new.get("optim.schedule") == "constant"
                and not old.get("optim.warmup_ratio") and not new.get("optim.warmup_ratio"))  # nor a warm-up of it
    free = MAY_CHANGE_ON_RESUME | (LENGTH if constant else set()) | moved
    keys = [key for key in dict.fromkeys([*old, *new])
            if key not in free and (key in old, old.get(key)) != (key in new, new.get(key))]
    changed = [f"{key}: {_show(old, key)} → {_show(new, key)}" for key in keys]
    if changed:
        longer = ("; a decaying schedule's length (or a warmup_ratio's) is the run's: a run trained with "
                  "--optim.schedule constant and its warm-up in warmup_steps may be resumed for more steps"
                  if LENGTH & set(keys) else "")
        earlier = "".join(f" (--{key} {value}: what runs saved before rlhfkit had {key} did)"
                          for key, value in EARLIER_BEHAVIOUR.items() if key in keys)
        raise ConfigError(f"cannot resume {path}: it was saved with other settings ({'; '.join(changed)}{longer}). "
                          f"To continue it, run the first run's command plus --train.resume {cfg.train.resume}"
                          f"{earlier}. To train on with new settings, "
                          + _fresh_start_hint(path, old.get("model.path", "")))


def _show(config: dict, key: str) -> str:
    """``config[key]`` as typed on the command line (true, none, 0.001, a,b), or that it is not set."""
    if key not in config:
        return "(not set)"
    value = config[key]
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _fresh_start_hint(path: Path, model_path: str) -> str:
    """How to start a fresh run from checkpoint ``path``'s weights: a checkpoint of full weights loads as a
    model; one of a LoRA run holds its adapter, which trains no further as ``--model`` (it loads frozen):
    merged into its base by ``rlhfkit export``, it does. Both need the tokenizer, which checkpoints hold (those
    written before it was saved with them lack it: copied in, it is there)."""
    tokenizer = "" if (path / "tokenizer_config.json").is_file() else (
        f"copy the tokenizer files of {model_path or 'the model it started from'} into {path}, then ")
    if (path / "adapter_config.json").is_file():
        return (f"{tokenizer}merge its LoRA adapter into its base with `rlhfkit export --model {path} --out MERGED` "
                "and start a fresh run (without --train.resume) with --model MERGED and another --train.out")
    return f"{tokenizer}start a fresh run (without --train.resume) with --model {path} and another --train.out"


def check_no_earlier_run(out: str | os.PathLike, overwrite: bool, model_path: str = "") -> None:
    """A fresh run into ``out`` whose ``checkpoints/`` holds an earlier run's ``step-N`` directories: refused
    (ConfigError) unless ``overwrite`` (``train.overwrite_output_dir``), which deletes them first (process 0).
    Mixed with them, the new run's checkpoints would be pruned by step number in favour of the old run's,
    and ``--train.resume latest`` could load the other run's weights."""
    root = Path(out) / "checkpoints"
    found = _step_dirs(root)
    distributed.barrier()  # every process has looked before process 0 deletes anything
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{root} holds an earlier run's checkpoints (newest: {found[-1].name}): to continue that "
                          "run add --train.resume latest; to start afresh, write to another --train.out, or "
                          "delete them with --train.overwrite_output_dir true")
    if model_path and any(d.resolve() in (Path(model_path).resolve(), *Path(model_path).resolve().parents)
                          for d in found):
        raise ConfigError(f"--model {model_path} lies in {root}, which --train.overwrite_output_dir true would "
                          "delete before loading it: write this run to another --train.out")
    if distributed.is_main():  # the checkpoints alone: a copy the user named otherwise (step-best) stays
        for old in [*found, *root.glob(".tmp-step-*")]:
            shutil.rmtree(old)
    distributed.barrier()  # gone before any process goes on


class Checkpoints:
    """One run's checkpoints: resume at start, save when due (``train.save_every``) or on request.

    ``model`` offers ``named_parameters()`` (every trainable tensor is saved and restored) and,
    unless ``save_weights`` is given, ``save_pretrained``; ``optimizers`` maps a name to
    (optimizer, scheduler); ``extra()`` returns any other state to save (a KL controller, a
    generator), handed back by ``resume``.
    """

    def __init__(self, cfg: TrainConfig, model, optimizers: Optimizers, extra: Callable[[], dict] | None = None,
                 save_weights: Callable[[Path], None] | None = None, tokenizer=None):
        self.cfg, self.model, self.optimizers = cfg, model, optimizers
        self.extra, self.save_weights, self.tokenizer = extra or dict, save_weights, tokenizer
        self.last: Path | None = None
        self.nonfinite: NonFinite | None = None  # its count of skipped updates is saved and restored too
        self.skipped_before = 0  # that count at the resumed checkpoint
        # the loop's metrics since it last logged (a dict of lists, or a list of dicts), saved too: a run resumed
        # within a logging window logs the means over all of it, as the run unstopped does
        self.log_window: dict | list | None = None
        self.log_window_before: dict | list | None = None  # that window at the resumed checkpoint
        self.total = 0  # the run's steps (``check_start``)
        # of a checkpoint at the end of the run that saved it: that run's train.log_every and eval_every, by which
        # a longer run resumed there knows which records it logged only because it ended (``Logger.rewind``)
        self.ended_with: dict | None = None

    def resume(self) -> tuple[int, dict]:
        """(steps already done, the saved extra state); (0, {}) when ``train.resume`` names no checkpoint."""
        self.last = find_checkpoint(self.cfg.out, self.cfg.resume)
        if self.last is None:
            return 0, {}
        state = load_checkpoint(self.last, self.model, self.optimizers)
        self.skipped_before = state["extra"].pop("skipped_updates", 0)  # absent from older checkpoints
        self.log_window_before = state["extra"].pop("log_window", None)
        self.ended_with = state["extra"].pop("ended_with", None)  # absent from older checkpoints
        return state["step"], state["extra"]

    def save(self, step: int) -> Path:
        # rank 0 writes; the path is the same for every rank. A sharded model is gathered by all of them.
        rngs = distributed.all_gather(_rng_state())  # every process's, a collective: before any returns
        sharded = fsdp.updates_shards(opt for opt, _ in self.optimizers.values())
        partitioned = zero.updates_partitions(opt for opt, _ in self.optimizers.values())
        if not distributed.is_main() and not sharded and not partitioned:
            self.last = Path(self.cfg.out) / "checkpoints" / f"step-{step}"
            return self.last
        extra = self.extra()
        if self.nonfinite is not None:
            extra["skipped_updates"] = self.nonfinite.skipped
        if self.log_window is not None:  # plain containers, as torch.load(weights_only=True) reads them
            extra["log_window"] = dict(self.log_window) if isinstance(self.log_window, dict) else list(self.log_window)
        if self.total and step == self.total:
            extra["ended_with"] = {"log_every": self.cfg.log_every, "eval_every": self.cfg.eval_every}
        self.last = save_checkpoint(self.cfg.out, step, self.model, self.optimizers, extra,
                                    self.cfg.keep_checkpoints, self.save_weights, self.tokenizer, rngs)
        return self.last

    def check_start(self, start: int, total: int) -> None:
        """Refuse a resumed ``start`` past the run's ``total`` steps: the loop would train nothing and exit
        as if it had finished. A checkpoint at ``total`` is a finished run's, fine to resume."""
        self.total = total
        if start > total:
            raise ConfigError(f"{self.last} is at step {start}, past this run's {total} steps (another run's "
                              "checkpoint, or the data changed?): resume a checkpoint of this run, or "
                              + _fresh_start_hint(self.last, ""))

    def finish(self, step: int) -> Path:
        """The checkpoint of ``step``: the one already written, or a new one."""
        return self.last if self.last and self.last.name == f"step-{step}" else self.save(step)

    def at_end(self, step: int) -> None:
        """A checkpoint of the last step too, when the run checkpoints at all (``train.save_every``)."""
        if self.cfg.save_every:
            self.finish(step)

    def after_step(self, step: int, stop: "StopRequest") -> None:
        """Save when due; after SIGINT/SIGTERM, save and exit saying how to resume, with the shell's status for
        that signal (128 + its number: 130, 143; every process the same: a launcher such as torchrun reports 1
        for any failed worker), so that a job scheduler sees the run did not finish. Processes that saw the
        signal at different steps stop together, after the same one (saving a sharded model is collective)."""
        stopping = distributed.any_process(stop.signal is not None)
        if self.cfg.save_every and step % self.cfg.save_every == 0:
            self.save(step)
        if stopping:
            path = self.finish(step)
            distributed.barrier()  # process 0 writes it: the others, exiting first, would have the launcher kill it
            caught = next((s for s in distributed.all_gather(stop.signal) if s), signal.SIGTERM)  # the same everywhere
            print(f"stopped by signal {stop.signal or 'in another process'} after step {step}; checkpoint {path}. "
                  "Resume with the same command and --train.resume latest", file=sys.stderr, flush=True)
            raise SystemExit(128 + caught)


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step (and checkpoint), not mid-step. A second
    one while it finishes that step stops at once, as without rlhfkit (KeyboardInterrupt; SystemExit for
    SIGTERM): the last checkpoint written stands."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None:  # asked twice: do not wait for the step
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(f"stopped by a second signal {signum} in the middle of a step")
        self.signal = signum
        # os.write: a print in a handler can meet a print it interrupted (RuntimeError: reentrant call)
        os.write(2, b"\nstopping after this step, with a checkpoint (again to stop at once)\n")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFinite:
    """What to do with a NaN or inf loss or gradient (``train.on_nan``): stop naming the step, the
    quantity and the last good checkpoint, or skip the update and count it. The count goes into the run's
    checkpoints and goes on from the resumed one's (made after ``checkpoints.resume()``)."""

    def __init__(self, policy: str, checkpoints: "Checkpoints | None"):
        self.policy, self.checkpoints = policy, checkpoints
        self.skipped = checkpoints.skipped_before if checkpoints is not None else 0
        if checkpoints is not None:
            checkpoints.nonfinite = self

    def ok(self, what: str, value: float, step: int) -> bool:
        """True when ``value`` is finite; else raises (policy 'stop') or counts a skip and returns False."""
        if math.isfinite(value):
            return True
        if self.policy == "skip":
            self.skipped += 1
            return False
        last = (self.checkpoints and self.checkpoints.last) or "none (set train.save_every)"
        raise FloatingPointError(f"the {what} is {value} at step {step}; last good checkpoint: {last}. "
                                 "Lower optim.lr, check the data, or set train.on_nan skip")
