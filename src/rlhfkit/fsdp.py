"""Sharded data parallelism: weights, gradients and AdamW state split over processes (issue #9).

PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``) does the work; this module only
chooses what to shard and keeps our data-parallel arithmetic (``rlhfkit.distributed``):

* **Units.** Each decoder layer is one unit, gathered for its forward and its backward; the
  root (embeddings, final norm, output or score head, LoRA adapters outside the layers) is
  one more. Frozen base weights and trainable adapters share a unit; FSDP2 reduces only the
  gradients that exist.
* **Modes.** ``full_shard`` (like ZeRO-3) frees a layer's gathered weights after its forward and
  gathers them again for the backward; ``shard_grad_op`` (like ZeRO-2) keeps them gathered from
  the forward to the backward: more memory, one all-gather fewer per layer and step.
* **Gradients.** Each process back-propagates the *sum* of its losses; FSDP's reduce-scatter is
  set to sum (divide factor 1), and ``distributed.average_gradients`` divides each shard by the
  global number of units, so the update is the 1-process one, as with replicas.
* **Forwards that call parts of the model.** ``masked_logprobs`` and the reward model call the
  body and the head separately (the head runs on the positions that carry a loss). Those calls
  go through ``run_as_forward``, so the root unit's weights are gathered around them and its
  gradients reduced after the backward, whether the head is tied to the embeddings or not.
* **Checkpoints and the final model hold full tensors** (``gather``), written by process 0 in the
  layout of a 1-process run: ``from_pretrained`` loads them, and a checkpoint resumes with any
  number of processes, sharded or not (``copy_full_``, ``shard_optimizer_state``).
* **Mixed precision.** Under the run's bf16 autocast (``dtype: auto`` on a bf16 GPU) each decoder layer
  gathers its float32 shards as bf16 (``MixedPrecisionPolicy``) and reduces gradients in float32: autocast's
  own casts of gathered float32 weights were saved for the backward and cached for the whole autocast region,
  a bf16 copy of every layer held at once whatever the sharding. The layers' inputs are not cast and the root
  (embeddings, final norm, head) stays float32, so the residual stream is float32 as under autocast alone; a
  layer's norm weights compute rounded to bf16.
* **Rollouts and rank-0 evaluation** run on the policy's gathered weights (``gathered``): every unit
  is all-gathered once before sampling and resharded after, so the decode loop, which reads the
  weights itself, sees full tensors and makes no collective call per token, and each process may
  sample a different number of tokens. The whole policy is held in each process while it samples
  (as DeepSpeed-Chat's hybrid engine does), not while it learns.

Chosen by ``train.fsdp`` or, with ``auto``, by the FSDP config of ``accelerate launch``
(``ACCELERATE_USE_FSDP`` and ``FSDP_*`` in the environment). Every trainer: SFT, the reward
model, DPO and its family, PPO (each of its roles' models: ``models.roles``), GRPO, RLOO and
REINFORCE++.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch

from rlhfkit import distributed
from rlhfkit.config import ConfigError

MODES = ("off", "full_shard", "shard_grad_op")
# FSDP1 sharding strategies as accelerate names them (and numbers them, from 1)
_FSDP1_STRATEGIES = {"FULL_SHARD": "full_shard", "SHARD_GRAD_OP": "shard_grad_op", "NO_SHARD": "off",
                     "HYBRID_SHARD": None, "HYBRID_SHARD_ZERO2": None}
_FORWARD = "rlhfkit_forward"  # the method FSDP is told to treat as a forward (``run_as_forward``)
_RESHARD = "rlhfkit_reshard_after_forward"  # what ``shard`` chose, restored after ``gathered``
_gathered: set[int] = set()  # the models ``gathered`` holds whole now (ids): the same in every process


def _launcher_mode() -> str:
    """The sharding an ``accelerate launch`` FSDP config asks for, read from the environment it sets."""
    if not distributed.truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        return "off"
    for key, config_key, instead in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", ""),
                                     ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing",
                                      " and pass --train.gradient_checkpointing true, which checkpoints every layer")):
        if distributed.truthy(os.environ.get(key)):
            raise ConfigError(f"the accelerate FSDP config sets {config_key}: true, which rlhfkit does not read; "
                              f"set it to false{instead} (see examples/accelerate/fsdp.yaml)")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip()
    if os.environ.get("FSDP_VERSION", "1").strip() == "2":  # fsdp_reshard_after_forward: true | false
        return "full_shard" if distributed.truthy(reshard) else "shard_grad_op"
    # FSDP1 configs name a strategy, in fsdp_reshard_after_forward (newer) or fsdp_sharding_strategy (older)
    strategy = reshard if reshard.lower() not in ("true", "false") else os.environ.get("FSDP_SHARDING_STRATEGY",
                                                                                      "FULL_SHARD")
    names = list(_FSDP1_STRATEGIES)
    strategy = names[int(strategy) - 1] if strategy.isdigit() and 0 < int(strategy) <= len(names) else strategy.upper()
    if strategy not in _FSDP1_STRATEGIES:
        raise ConfigError(f"unknown FSDP sharding strategy {strategy!r} in the accelerate config; use FULL_SHARD or "
                          "SHARD_GRAD_OP (or fsdp_version: 2 with fsdp_reshard_after_forward: true | false)")
    if _FSDP1_STRATEGIES[strategy] is None:
        raise ConfigError(f"{strategy} (shard within a node, replicate across nodes) is not supported; use FULL_SHARD "
                          "or SHARD_GRAD_OP, which shard over every process of every node")
    return _FSDP1_STRATEGIES[strategy]


def mode(setting: str = "auto") -> str:
    """The sharding asked for: ``setting`` (``train.fsdp``), or with 'auto' the launcher's FSDP config,
    else 'off'. One of ``MODES``, whatever the number of processes."""
    if setting == "auto":
        return _launcher_mode()
    if setting not in MODES:
        raise ConfigError(f"train.fsdp {setting!r}: choose auto, {', '.join(MODES)}")
    return setting


def mode_for_rollouts(setting: str, **batches: int) -> str:
    """``mode(setting)`` for a trainer that splits ``batches`` (name → rows) over the processes (PPO's
    rollout batch and mini-batch, GRPO's prompts and mini-batch): 'off' with one process. Sharded, every
    process joins every forward (they gather together), so each batch must give every process a share."""
    world = distributed.world_size()
    how = mode(setting) if world > 1 else "off"
    if how == "off":
        return how
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        FSDPModule = None
    if not hasattr(FSDPModule, "set_reshard_after_forward"):  # ``gathered`` needs it (torch 2.8 has it)
        raise ConfigError(f"sharded rollouts need FSDPModule.set_reshard_after_forward, which torch "
                          f"{torch.__version__} lacks: pip install -U torch (2.8 or later), or set train.fsdp off")
    for name, rows in batches.items():
        if rows % world:
            raise ConfigError(f"with FSDP ({how}) every process runs every forward (they gather together): "
                              f"{name} {rows} must be divisible by the processes ({world})")
    return how


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded by ``shard`` (FSDP2)."""
    if distributed.world_size() == 1:  # never sharded; spares importing FSDP in every forward of a 1-process run
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: nothing can be sharded
        return False
    return isinstance(model, FSDPModule)


def collective(module) -> bool:
    """Whether a forward of ``module`` (a sharded model, or a part of one holding its units) communicates, so
    that every process must make the same forwards: not inside a ``gathered`` stretch, where nothing does."""
    if distributed.world_size() == 1 or _gathered:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _unit_classes(model) -> set[str]:
    """Class names of the modules that become units of their own: the launcher's
    ``fsdp_transformer_layer_cls_to_wrap``, else the model's decoder layers (``_no_split_modules``)."""
    launched = distributed.truthy(os.environ.get("ACCELERATE_USE_FSDP"))
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "") if launched else ""
    if named.strip():
        return {n.strip() for n in named.split(",") if n.strip()}
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(hf, "_no_split_modules", None) or [])


def shard(model, how: str, what: str = "the model", amp: Callable[[], contextlib.AbstractContextManager] =
          contextlib.nullcontext):
    """Shard ``model`` in place over every process (``how``: 'full_shard' or 'shard_grad_op') and
    return it; with one process, or 'off', it is returned as it is. Call it before building the
    optimiser: the parameters become sharded DTensors. ``what`` names the model in the line printed;
    ``amp``: the run's autocast (``load.mixed_precision``), whose dtype the units gather their weights in."""
    if how == "off" or distributed.world_size() == 1:
        return model
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError as e:
        raise ImportError(f"FSDP sharding needs torch >= 2.6 (this is {torch.__version__}): "
                          "pip install -U torch, or set train.fsdp off") from e
    reshard = how == "full_shard"
    # on the model's device: without a mesh FSDP takes the machine's accelerator, so a --train.device cpu run on a
    # machine with a GPU had its weights moved to cuda:0 in every process
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (distributed.world_size(),))
    with amp():
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    # the layers' weights gathered in the compute dtype, their inputs left as they come: the residual stream stays
    # float32 as under autocast alone, from the root's float32 embeddings (the root, a few matrices, is not cast)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None,
                                  cast_forward_inputs=False)
    classes = _unit_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)  # the root: what no layer holds
    for unit in layers + [model]:
        set_factor = getattr(unit, "set_gradient_divide_factor", None) or unit.set_reduce_scatter_divide_factor
        set_factor(1.0)  # sums, as the replicas' all-reduce does; average_gradients divides
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # gloo has no pre-multiplied sum
            unit.set_force_sum_reduction_for_comms(True)
    setattr(model, _FORWARD, lambda fn, *args, **kwargs: fn(*args, **kwargs))
    register_fsdp_forward_method(model, _FORWARD)
    setattr(model, _RESHARD, reshard)
    if distributed.is_main():
        held = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        print(f"fsdp {how} over {distributed.world_size()} processes ({what}): units = {len(layers)} decoder "
              f"layers + the root; process 0 holds {held:,} of {total:,} parameters"
              + (f"; gathered in {str(compute).removeprefix('torch.')}" if compute else ""))
    return model


def run_as_forward(model, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, run as a forward of ``model``: when it is sharded, the root unit's
    weights are gathered around the call and their gradients reduced after the backward, as for
    ``model(...)``. For code that calls a model's parts (body, head) rather than the model."""
    forward = getattr(model, _FORWARD, None) if is_sharded(model) else None
    return forward(fn, *args, **kwargs) if forward is not None else fn(*args, **kwargs)


@contextlib.contextmanager
def gathered(model):
    """Every unit of a sharded ``model`` all-gathered for the stretch inside, and kept so by its forwards:
    full weights in each process, for forwards that run outside FSDP's hooks (the rollout engine's
    decode loop reads the weights itself) or on one process alone (process 0's evaluation), with no
    collective call inside. Entering is collective: every process enters. Nothing happens for a model
    that is not sharded or is gathered already. Forwards inside must not build a graph to back-propagate."""
    if not is_sharded(model) or id(model) in _gathered:
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the same order in every process
    with torch.no_grad():  # FSDP sets itself up in the root's first forward: make it one (``generate`` inside
        run_as_forward(model, lambda: None)  # may call a wrapped model's own forward, not the root's)
    model.set_reshard_after_forward(False)  # a forward inside would otherwise reshard its unit behind it
    for unit in units:
        unit.unshard()
    _gathered.add(id(model))
    try:
        yield model
    finally:
        _gathered.discard(id(model))
        release(model)
        model.set_reshard_after_forward(getattr(model, _RESHARD, True))  # as ``shard`` chose


def release(model) -> None:
    """Reshard every unit of a sharded ``model`` now (nothing otherwise): what ``shard_grad_op`` keeps gathered
    after a forward that no backward follows (PPO's experience passes, a learn pass stopped early), so that the
    whole model is not held through what comes next (``full_shard`` reshards each unit, the root too, after its
    forward). Local: no communication."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def updates_shards(optimizers) -> bool:
    """Whether any of ``optimizers`` updates FSDP shards. Their parameters are the shards whatever the modules
    hold at the moment (a unit's gathered weights stay between a forward and its reshard): saving then
    gathers, which every process must join."""
    return distributed.world_size() > 1 and any(distributed.is_shard(p) for opt in optimizers
                                                for group in opt.param_groups for p in group["params"])


def gather(obj: Any) -> Any:
    """``obj`` (nested dicts, lists and tuples of tensors and other values) with every sharded
    tensor replaced by its full tensor on the CPU, on process 0; None stands for each on the
    others. Every process must call it on the same structure (each gather is a collective)."""
    if isinstance(obj, dict):
        return {k: gather(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather(v) for v in obj)
    if isinstance(obj, torch.Tensor) and distributed.is_shard(obj):
        full = obj.full_tensor()
        return full.detach().cpu() if distributed.is_main() else None
    return obj


def full_state_dict(model, keys: set[str] | None = None) -> dict[str, torch.Tensor] | None:
    """``model.state_dict()`` with full tensors on the CPU, on process 0 (None on the others, which
    must call it too); ``keys``: those entries alone (what a peft adapter directory holds), the rest
    not gathered. A weight held under two names (a head tied to the embeddings) is gathered once and
    stays one tensor, so ``save_pretrained`` sees the tie as in a 1-process run."""
    first: dict[int, str] = {}
    alias = {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
    state = model.state_dict()
    wanted = list(state) if keys is None else [k for k in state if k in keys]
    full = gather({k: state[k] for k in dict.fromkeys(alias.get(k, k) for k in wanted)})
    return {k: full[alias.get(k, k)] for k in wanted} if distributed.is_main() else None


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A (possibly sharded) tensor's full value, e.g. a gradient norm over shards."""
    return t.full_tensor() if distributed.world_size() > 1 and distributed.is_shard(t) else t


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over ``params``, sharded or whole or both (PPO's critic: a sharded
    adapter beside a value head kept whole, which PyTorch will not take in one call): the gradients scaled by
    min(1, max_norm / (norm + 1e-6)), as PyTorch scales them; returns the norm before, over every shard."""
    shards = [p for p in params if distributed.is_shard(p)] if distributed.world_size() > 1 else []
    whole = [p for p in params if not distributed.is_shard(p)] if shards else []
    if not whole:  # one kind: PyTorch's own
        return float(full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    groups = (shards, whole)
    norms = [float(full_value(torch.nn.utils.get_total_norm([p.grad for p in group]))) for group in groups]
    total = (norms[0] ** 2 + norms[1] ** 2) ** 0.5  # a NaN or inf stays one
    scale = min(1.0, max_norm / (total + 1e-6))
    if scale < 1.0:
        for group in groups:
            torch._foreach_mul_([p.grad for p in group], scale)
    return total


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Full ``value`` laid out as ``param`` is: this process's shard of it when ``param`` is sharded."""
    if distributed.world_size() == 1 or not distributed.is_shard(param):  # one process shards nothing
        return value
    from torch.distributed.tensor import distribute_tensor

    # every process holds the full value (each loaded the checkpoint): each cuts its own shard, no communication
    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


@torch.no_grad()
def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into ``param``, sharded or not."""
    param.copy_(_like(param, value.to(param.device)))


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A full ``optimizer.state_dict()`` (a checkpoint's, any number of processes) with each tensor
    of a parameter's shape cut to this process's shard of that parameter, ready for
    ``optimizer.load_state_dict``. Unchanged when no parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state ids count in this order
    if distributed.world_size() == 1 or not any(distributed.is_shard(p) for p in params):
        return state
    per_param = {}
    for i, entries in state["state"].items():
        p = params[int(i)]
        per_param[i] = {k: _like(p, v) if k != "step" and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                        for k, v in entries.items()}  # AdamW's moments; its step count is one number
    return {**state, "state": per_param}
