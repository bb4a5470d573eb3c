"""DeepSpeed ZeRO for the supervised trainers: the launch a DeepSpeed user already has (issue #9).

DeepSpeed's engine partitions AdamW's state over the processes (stage 1), the gradients too (2), and
the weights too (3), and does the reduction, the clipping and the step. rlhfkit keeps its own
data-parallel arithmetic around it (``rlhfkit.distributed``):

* **Units.** The loop counts the step's units (completion tokens, pairs) over every process before
  the first backward, and each micro-batch back-propagates ``loss × units × processes / step units``:
  DeepSpeed averages gradients over the processes, so the update is the 1-process one.
* **Forwards.** Each micro-batch's whole loss function runs as one forward of the engine
  (``Forwards``, a module whose forward calls a function), so DeepSpeed's hooks see every forward the
  loss makes, whichever parts of the model it calls (body and head apart, a reference with the
  adapters off), and its backward bookkeeping is attached to the loss.
* **Accumulation.** ``train.grad_accum`` micro-batches, the boundary set by hand on the last one
  (``set_gradient_accumulation_boundary``), then one engine step.
* **Checkpoints and the final model hold full tensors** in the layout of a 1-process run, read and
  written through DeepSpeed's tensor-fragment API (``safe_get_full_fp32_param``,
  ``safe_get_full_optimizer_state``): they load with ``from_pretrained`` and resume with any number
  of processes, with DeepSpeed or without.
* **Precision** is ``model.dtype`` as everywhere (float32 weights, autocast to bf16 with ``auto`` on a
  bf16 GPU); DeepSpeed's own fp16 / bf16 modes and its offloading are not used.

Chosen by ``train.deepspeed`` or, with ``auto``, by the DeepSpeed config of ``accelerate launch``
(``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_*`` in the environment). For SFT, the reward
model, DPO and its family (one engine over the trained model, in ``trainers.loop.run``), and for PPO's
``mode: separate`` (one engine for the actor, one for the critic, as OpenRLHF runs them) and the online
methods training the full policy (``lora.enabled: false``), whose rollouts under ZeRO-3 sample with a whole
copy of the actor (``gathered``).
Those trainers reach an engine through its optimiser: ``backward(optimizer, loss)`` and
``loop.optimizer_step`` take DeepSpeed's way when the optimiser has one, the plain one otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Callable

import torch

from rlhfkit import distributed
from rlhfkit.config import ConfigError

MODES = ("off", "zero1", "zero2", "zero3")
_ENGINE = "_rlhfkit_zero_engine"  # where a partitioned model keeps its ``Engine``
_INSTALL = "pip install deepspeed"


def _config_file_zero() -> dict:
    """The ``zero_optimization`` section of the launch's DeepSpeed config file (``deepspeed_config_file``), or {}."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if not path or path.lower() == "none":
        return {}
    try:
        section = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"the DeepSpeed config file {path} (deepspeed_config_file) cannot be read as JSON: {e}")
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object, got {section!r}")
    return section


def settings() -> dict:
    """The ``zero_optimization`` settings of the launch (a config file's section, else its zero_stage), with
    offloading refused: rlhfkit's optimiser is PyTorch's AdamW, which DeepSpeed does not offload."""
    # "auto" (a value the HF Trainer fills in from its own arguments): DeepSpeed's default instead
    section = {k: v for k, v in _config_file_zero().items() if v != "auto"}
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if "stage" not in section and stage.isdigit():
        section["stage"] = int(stage)
    for key, env in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                     ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        device = section.get(key, {}).get("device", "none") if isinstance(section.get(key), dict) else "none"
        device = os.environ.get(env, "").strip() or device
        if device.lower() not in ("", "none"):
            raise ConfigError(f"the DeepSpeed config offloads ({key} to {device}), which rlhfkit does not support "
                              f"(its optimiser is PyTorch's AdamW): set {key}_device: none (see "
                              "examples/accelerate/zero3.yaml)")
        section.pop(key, None)
    return section


def _launcher_mode() -> str:
    if not distributed.truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        return "off"
    stage = settings().get("stage", 2)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage {stage!r} in the DeepSpeed config: choose 1, 2 or 3")
    return "off" if stage == 0 else f"zero{stage}"


def mode(setting: str = "auto") -> str:
    """The ZeRO stage asked for: ``setting`` (``train.deepspeed``), or with 'auto' the launcher's DeepSpeed
    config, else 'off'. One of ``MODES``, whatever the number of processes."""
    if setting == "auto":
        return _launcher_mode()
    if setting not in MODES:
        raise ConfigError(f"train.deepspeed {setting!r}: choose auto, {', '.join(MODES)}")
    return setting


def stage(setting: str = "auto") -> int:
    """``mode(setting)`` as the ZeRO stage number, 0 for off."""
    chosen = mode(setting)
    return 0 if chosen == "off" else int(chosen.removeprefix("zero"))


def engine_of(owner) -> "Engine | None":
    """The ``Engine`` that partitions ``owner`` (a model, or the optimiser the engine steps), or None."""
    return getattr(owner, _ENGINE, None)


def updates_partitions(optimizers) -> bool:
    """Whether any of ``optimizers`` is stepped by an ``Engine``: saving their state gathers, on every process."""
    return any(engine_of(opt) is not None for opt in optimizers)


def refuse_with_fsdp(stage_: int, sharding: str) -> None:
    """FSDP (``sharding``) and DeepSpeed (ZeRO-``stage_``, 0 for none) in one run are refused."""
    if sharding != "off" and stage_:
        raise ConfigError(f"both FSDP ({sharding}) and DeepSpeed (ZeRO-{stage_}) are asked for: choose one "
                          "(train.fsdp off or train.deepspeed off, or one accelerate config)")


def gathers_collectively(module) -> bool:
    """Whether ``module`` holds weights ZeRO-3 partitioned over the processes: each call gathers them from every
    process, so every process must call it as often (``forward._masked_head_logprobs`` pads its chunks, and
    ``forward.shared_prefix_forward`` shares prompts in every process or in none)."""
    return distributed.world_size() > 1 and any(hasattr(p, "ds_id") for p in module.parameters())


def rollout_stage(setting: str, sharding: str, full: bool, instead: str) -> int:
    """The ZeRO stage of a PPO or online-method run (``train.deepspeed`` ``setting``, the FSDP mode chosen), 0 for
    none: always 0 with one process. It partitions the AdamW state (and gradients, and weights) of full trained
    models (``full``: PPO's mode separate, the online methods with lora.enabled false); a run training LoRA
    adapters is refused with ``instead`` (what to do)."""
    stage_ = stage(setting) if distributed.world_size() > 1 else 0
    if not stage_:
        return 0
    refuse_with_fsdp(stage_, sharding)
    if not full:
        raise ConfigError(f"DeepSpeed ZeRO-{stage_} partitions full trained models only. {instead}")
    return stage_


def backward(optimizer, loss: torch.Tensor, last: bool = True) -> None:
    """Back-propagate ``loss``, this process's part of a sum over processes, for the parameters ``optimizer``
    updates: ``loss.backward()``, or, where an ``Engine`` steps ``optimizer``, DeepSpeed's backward of
    ``loss × processes`` (DeepSpeed averages the gradients), the reduction completed after the step's ``last``
    micro-batch. A non-finite loss there poisons its gradients, so every process's engine skips the update
    (and the caller, who sees the loss, skips the other engines' with ``Engine.skip``)."""
    engine = engine_of(optimizer)
    if engine is None:
        loss.backward()
        return
    if not torch.isfinite(loss.detach()):
        loss = loss * float("nan")  # a NaN gradient everywhere this loss reaches: the norm, summed, is NaN
    engine.backward(loss * distributed.world_size(), last=last)


def drop_gradients(optimizer) -> None:
    """Clear the step's gradients without an update: ``Engine.skip`` where an engine steps ``optimizer`` (every
    process calls it), else ``zero_grad``."""
    engine = engine_of(optimizer)
    if engine is not None:
        engine.skip()
    else:
        optimizer.zero_grad(set_to_none=True)


def run_as_forward(model, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, as one forward of the ``Engine`` over ``model`` when its gradients are
    wanted (DeepSpeed attaches its backward bookkeeping there); no-grad passes over weights ZeRO-1/2
    leave whole run as they are."""
    engine = engine_of(model)
    if engine is None or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return engine.run(fn, *args, **kwargs)


def partitioned(model) -> bool:
    """Whether ``model``'s weights are split over the processes (ZeRO-3): its forwards and gathers are collective."""
    engine = engine_of(model)
    return engine is not None and engine.stage == 3


def _sized_to(model) -> dict:
    """Bucket sizes for ``model`` where the DeepSpeed config leaves them out (or says "auto"), as the HF
    integration sizes them: DeepSpeed's own defaults (5e8 elements a reduction bucket, 2 GB in float32)
    are sized for models of billions of weights and cost far more than the model below that. H = hidden size."""
    config = getattr(model, "config", None)
    hidden = getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
    if not hidden:
        return {}
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


class Forwards(torch.nn.Module):
    """The trained model under a forward that runs any function of it: handed to DeepSpeed in its place,
    so one engine forward covers a whole loss function (``Engine.run``). Its parameters are the model's,
    under the names the model gives them after ``model.``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


class Engine:
    """DeepSpeed's engine over ``model`` and its PyTorch ``optimizer`` (AdamW over ``params``), for steps of
    ``micro_batches`` micro-batches. Built after a checkpoint was loaded into the plain model and optimiser:
    it adopts their weights and AdamW state. ``amp`` (the run's autocast) is entered inside each engine
    forward: DeepSpeed's forward turns off an autocast entered around it. ``what`` names the model in the
    line process 0 prints."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: int, micro_batches: int,
                 micro_size: int, max_grad_norm: float, amp: Callable[[], contextlib.AbstractContextManager] =
                 contextlib.nullcontext, what: str = "the trained model"):
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError(f"a DeepSpeed run (ZeRO-{stage}) needs DeepSpeed: {_INSTALL}") from e
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-rank banners; warnings still show
        self.stage, self.optimizer, self.amp = stage, optimizer, amp
        self.params = [p for group in optimizer.param_groups for p in group["params"]]  # AdamW's order, as saved
        self.group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        loaded = {i: optimizer.state.pop(p) for i, p in enumerate(self.params) if p in optimizer.state}
        world = distributed.world_size()
        config = {"train_micro_batch_size_per_gpu": micro_size, "gradient_accumulation_steps": micro_batches,
                  "train_batch_size": micro_size * micro_batches * world,
                  "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
                  "zero_optimization": {**_sized_to(model), **settings(), "stage": stage,
                                        "compute_grad_norm": True},  # the norm is logged
                  "zero_allow_untested_optimizer": True, "steps_per_print": 2**62, "wall_clock_breakdown": False}
        self.engine, *_ = deepspeed.initialize(model=Forwards(model), optimizer=optimizer, config=config,
                                               dist_init_required=False)
        setattr(model, _ENGINE, self), setattr(optimizer, _ENGINE, self)
        if loaded:  # a checkpoint's AdamW state, full tensors: into DeepSpeed's partitions
            self.load_optimizer_state(loaded)
        if distributed.is_main():
            split = {1: "AdamW state", 2: "AdamW state and gradients", 3: "weights, gradients and AdamW state"}[stage]
            held = sum(p.numel() for p in self._flats())
            trained = sum(getattr(p, "ds_numel", p.numel()) for p in self.params)
            line = (f"deepspeed ZeRO-{stage} over {world} processes ({what}): {split} partitioned; "
                    f"process 0 updates {held:,} of {trained:,} trained parameters")
            if stage == 3:
                line += (f", holds {sum(p.ds_tensor.numel() for p in model.parameters()):,} of "
                         f"{sum(p.ds_numel for p in model.parameters()):,} weights")
            print(line)

    def run(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` as one forward of the engine (every forward of the model inside it)."""
        return self.engine(self._under_amp, fn, *args, **kwargs)

    def _under_amp(self, fn: Callable, *args, **kwargs):
        with self.amp():
            return fn(*args, **kwargs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Back-propagate ``loss`` (already scaled for DeepSpeed's average over processes); ``last``: the step's
        last micro-batch, whose backward completes the gradients' reduction."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def skip(self) -> None:
        """Drop this step's reduced gradients and apply nothing (collective: every process calls it, for a
        loss that was not finite in some process). The gradients DeepSpeed holds are made NaN, so its step
        takes its own overflow path: gradients cleared, AdamW and its step count untouched. Another
        model's NaN loss (PPO: the critic's) leaves this one's gradients finite, so skipping it needs this."""
        held = getattr(self.engine.optimizer, "averaged_gradients", None)  # this process's partitions
        if held is None:
            raise RuntimeError(f"DeepSpeed {_version()}'s ZeRO-{self.stage} optimiser keeps no averaged_gradients "
                               "to drop: skipping a step is not supported with this DeepSpeed (set train.on_nan stop)")
        filled = [grad for grads in held.values() for grad in grads or []]
        for grad in filled:
            grad.fill_(float("nan"))
        self.engine.step()
        # ZeRO-3 keeps these buffers, and a backward writes a tensor's elements alone, never the padding after the
        # last one (a partition of a size the processes do not divide): NaN left there would end every later step
        for grad in filled:
            grad.zero_()

    def step(self) -> float:
        """Clip, step AdamW and clear the gradients; returns the gradient norm before clipping. A non-finite
        norm applies nothing (DeepSpeed skips the update), so the caller can stop or skip cleanly."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("inf") if norm is None else float(norm)

    # ------------------------------------------------------------------ full tensors, for checkpoints

    def _flats(self) -> list[torch.Tensor]:
        """The flat float32 partitions DeepSpeed hands AdamW (this process's share of every trained weight)."""
        zero_optimizer = self.engine.optimizer
        flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # stage 3
        return list(flats if flats is not None else zero_optimizer.single_partition_of_fp32_groups)  # stages 1-2

    def _base_states(self) -> list[dict]:
        """AdamW's state of each flat partition (none before the first step)."""
        return [self.optimizer.state[p] for p in self._flats() if p in self.optimizer.state]

    def optimizer_state(self) -> dict | None:
        """AdamW's ``state_dict()`` as a 1-process run holds it (full tensors, parameters numbered in order),
        on process 0; None on the others, which must call it too (the gathers are collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base_states()
        state, main = {}, distributed.is_main()
        if base:  # after the first step: every parameter has moments; the step count is shared
            for i, p in enumerate(self.params):  # one tensor at a time, kept by process 0 alone
                moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
                if main:
                    state[i] = {"step": base[0]["step"].detach().clone().cpu(),
                                **{k: v.detach().cpu().clone() for k, v in moments.items()}}
                del moments
        if not main:
            return None
        groups, start = [], 0
        for group, size in zip(self.optimizer.param_groups, self.group_sizes):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(start, start + size))})
            start += size
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, per_param: dict[int, dict]) -> None:
        """Full AdamW state per parameter index (from a checkpoint) into DeepSpeed's partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if len(per_param) != len(self.params) or len({float(s["step"]) for s in per_param.values()}) != 1:
            raise ValueError(f"the checkpoint's AdamW state covers {len(per_param)} of {len(self.params)} trained "
                             "tensors, or counts their steps differently; DeepSpeed keeps one count for all of them: "
                             "resume this checkpoint without DeepSpeed")
        flats = self._flats()
        step = torch.as_tensor(next(iter(per_param.values()))["step"], dtype=torch.float32)
        for flat in flats:  # AdamW makes its state at its first step: make it now, then fill it
            self.optimizer.state[flat] = {"step": step.clone().to(flat.device if self.optimizer.defaults.get("fused")
                                                                  else "cpu"),
                                          "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # stages 1-2: each parameter points at its slice of the new state (else at step 1)
            link()
        for i, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = per_param[i][key].to(p.device)
                if self.stage == 3:
                    self._set_zero3_state(p, value, key)
                else:
                    safe_set_full_optimizer_state(p, value, key)

    def _set_zero3_state(self, param: torch.Tensor, value: torch.Tensor, key: str) -> None:
        """This process's slice of a full AdamW state tensor into its ZeRO-3 partition. DeepSpeed 0.19's own
        setter (``set_full_hp_param``) reads past the end of a tensor whose size does not divide by the
        processes, on the last one; here the padding past the end stays zero."""
        z3 = self.engine.optimizer
        part, _ = z3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        start = part.numel() * z3._get_param_partition_rank(param)
        flat = value.flatten()
        n = max(0, min(part.numel(), flat.numel() - start))
        part.data.zero_()
        part.data[:n].copy_(flat[start: start + n])


def _version() -> str:
    import deepspeed

    return deepspeed.__version__


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """``model.state_dict()`` with full tensors on the CPU on process 0 (None on the others, which must call
    it too) for a model whose weights ZeRO-3 partitions. A weight held under two names (a head tied to the
    embeddings) stays one tensor, so ``save_pretrained`` sees the tie as in a 1-process run."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # the partitioned ones only: weights under stage3_param_persistence_threshold stay whole in every process
    split = [p for p in model.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(split, modifier_rank=None):
        if not distributed.is_main():
            return None
        copies: dict[tuple, torch.Tensor] = {}
        full = {}
        for k, v in model.state_dict().items():
            key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else (k,)
            full[k] = copies.setdefault(key, v.detach().cpu().clone())
        return full


@contextlib.contextmanager
def gathered(model, here: bool = True):
    """A ZeRO-3 ``model`` whole, for forwards outside its engine that not every process makes alike: the rollout
    engine's decode loop (each process stops at its own samples' end) and process 0's evaluation. Yields a plain
    copy of it (the same class and a copy of its config, built on the meta device, no DeepSpeed hooks: its forwards
    gather nothing; no gradients) holding the gathered weights and the buffers, freed at the end: what
    ``fsdp.gathered`` costs, a whole model in each process while inside. Entering is collective: every process
    enters; one not ``here`` joins the gathers alone and yields None. Any other model: itself.
    Forwards inside must not build a graph to back-propagate."""
    if not partitioned(model):
        yield model
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    state = {}
    for name, p in model.named_parameters():  # one weight gathered at a time: one whole model at the peak, not two
        # one held whole (under the persistence threshold) is not gathered: that would partition it after
        split = getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None) if split else contextlib.nullcontext():
            if here:
                state[name] = p.detach().clone()
    if not here:
        yield None
        return
    with torch.device("meta"):
        replica = type(model)(copy.deepcopy(model.config))
    replica.generation_config = copy.deepcopy(model.generation_config)
    replica.load_state_dict(state, strict=False, assign=True)  # a tied head is listed once, under its embeddings
    for name, b in model.named_buffers():  # never partitioned; rotary frequencies are not in the state dict
        owner, _, leaf = name.rpartition(".")
        replica.get_submodule(owner)._buffers[leaf] = b.detach().clone()
    replica.tie_weights()  # as the model's config says
    left = [n for n, t in [*replica.named_parameters(), *replica.named_buffers()] if t.is_meta]
    if left or sum(p.numel() for p in replica.parameters()) != sum(p.ds_numel for p in model.parameters()):
        what = left[:3] or "its weights tied otherwise"
        raise RuntimeError(f"the whole copy of a ZeRO-3 {type(model).__name__} differs from it ({what}): it has "
                           "tensors its class does not make from its config")
    del state
    try:
        yield replica.eval().requires_grad_(False)
    finally:
        del replica


def full_params(model, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The float32 values DeepSpeed trains for the parameters ``names``, full, on the CPU, on process 0."""
    from deepspeed.utils import safe_get_full_fp32_param

    params, full, main = dict(model.named_parameters()), {}, distributed.is_main()
    for n in names:  # one tensor at a time, kept by process 0 alone
        value = safe_get_full_fp32_param(params[n])
        if main:
            full[n] = value.detach().cpu().clone()
        del value
    return full if main else None
