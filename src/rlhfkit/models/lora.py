"""LoRA layers without peft's per-call overhead (issue #10).

A peft LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, but each call
first checks its arguments, builds keyword dictionaries, walks its active adapters and calls four
sub-modules: at our sizes that costs as much as the arithmetic (a no-grad forward of an 8.4M-param
Llama with rank-16 adapters on every linear layer took 0.17 s through peft, 0.13 s with the same
products called directly, the base alone 0.13 s). ``LeanLoraLinear`` is peft's class with a
``forward`` that, for a plain adapter, calls those same products itself — the same operators in
the same order, so outputs and gradients are bit for bit peft's — and hands every other case
(``plain_lora`` says which) to peft's own forward.

On the CPU in float32, where a call has more rows than the adapter's break-even (``merges``),
the adapter is merged into a transient copy of the weight instead: ``x @ (W + s·B·A)ᵀ`` is one
matmul where ``x @ Wᵀ + s·(x @ Aᵀ) @ Bᵀ`` is three, two of them skinny (rank-wide) products that
run far below the machine's speed; a no-grad forward of an 8.4M Llama with rank-16 adapters on
every linear layer, (8, 85): 0.18 → 0.15 s (base alone 0.14 s). ``MergedLoraLinear`` gives the
gradients of the adapter and of ``x`` from the same merged weight. Equal to peft's products up to
float rounding (not bit for bit); GPUs, other dtypes and small calls (decode steps) keep the
unmerged products.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from rlhfkit.ops import has_hooks


def plain_lora(module) -> tuple[torch.nn.Linear, tuple | None] | None:
    """What a peft LoRA ``Linear`` computes, if it is a plain one: ``(base, lora)`` or None.

    ``lora`` is ``(lora_A, lora_B, scaling)`` of its one active adapter, or None when the layer
    computes ``base(x)`` alone (adapters disabled, or merged into the base, or none of the active
    ones on this layer). None, meaning "only the module knows", for: hooks on the base layer, a
    base that is not an ``nn.Linear``, DoRA and the other variants, several active adapters, dropout
    in training mode, ``fan_in_fan_out``, adapter and base of different dtypes, disabled adapters
    still merged (peft unmerges them on the call).
    """
    if type(module) not in (LoraLinear, LeanLoraLinear):
        return None
    base = module.base_layer
    if type(base) is not torch.nn.Linear or has_hooks(base):
        return None
    if module.disable_adapters:
        return None if module.merged else (base, None)
    if module.merged:  # peft's forward then calls the base layer alone
        return base, None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return base, None
    name = active[0]
    variant = name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False)
    if len(active) > 1 or variant or module.fan_in_fan_out:
        return None
    lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    dropout_off = isinstance(dropout, torch.nn.Identity) or not dropout.training or getattr(dropout, "p", 1) == 0
    if (not dropout_off or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
            or lora_a.weight.dtype != base.weight.dtype):
        return None
    return base, (lora_a, lora_b, module.scaling[name])


class LeanLoraLinear(LoraLinear):
    """peft's LoRA ``Linear``, its plain case computed without the per-call bookkeeping (module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        parts = None if args or kwargs or x.dtype != self.base_layer.weight.dtype else plain_lora(self)
        if parts is None:
            return super().forward(x, *args, **kwargs)
        base, lora = parts
        if lora is None:
            return F.linear(x, base.weight, base.bias)
        lora_a, lora_b, scaling = lora
        if merges(x, base, lora_b):
            if not torch.is_grad_enabled():
                return F.linear(x, merged_weight(base.weight, lora_a.weight, lora_b.weight, scaling), base.bias)
            return MergedLoraLinear.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, scaling)
        result = F.linear(x, base.weight, base.bias)
        return result + F.linear(F.linear(x, lora_a.weight), lora_b.weight, lora_b.bias) * scaling


def merges(x: torch.Tensor, base: torch.nn.Linear, lora_b: torch.nn.Linear) -> bool:
    """Whether ``LeanLoraLinear`` computes a call through the merged weight: float32 on the CPU, a
    frozen base, no LoRA bias, and more rows than the break-even of merging, where the merge's
    out·in·r multiply-adds cost less than the skinny products' rows·(in + out)·r."""
    weight = base.weight
    if (x.device.type != "cpu" or weight.dtype != torch.float32 or lora_b.bias is not None
            or torch.is_autocast_enabled("cpu")):
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
        return False
    out_features, in_features = weight.shape
    return x.numel() // in_features * (in_features + out_features) > in_features * out_features


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s·B·A: (out, in), (r, in), (out, r) → (out, in), a new tensor."""
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


class MergedLoraLinear(torch.autograd.Function):
    """``x @ (W + s·B·A)ᵀ + bias`` for a frozen ``W`` and ``bias``: x (..., in) → (..., out).

    Saves ``x`` and the parameters, no copy of the merged weight (it is made again in the backward):
    with g the output's gradient and x, g flattened to rows, ∂x = g·(W + s·B·A),
    ∂A = s·(g·B)ᵀ·x and ∂B = s·gᵀ·(x·Aᵀ): the gradients of peft's unmerged products, up to rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, merged_weight(weight, lora_a, lora_b, scaling), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        g, rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ merged_weight(weight, lora_a, lora_b, scaling)).view_as(x)
        if ctx.needs_input_grad[3]:
            grad_a = (g @ lora_b).t() @ rows * scaling
        if ctx.needs_input_grad[4]:
            grad_b = g.t() @ (rows @ lora_a.t()) * scaling
        return grad_x, None, None, grad_a, grad_b, None


def lean_lora(model):
    """Give every peft LoRA ``Linear`` of ``model`` the lean forward (in place; returns ``model``).

    The class is swapped, nothing else: weights, adapters, saving and peft's own methods are untouched.
    """
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = LeanLoraLinear
    return model


@contextlib.contextmanager
def peft_quietly():
    """peft wrapping a model reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning at every wrap; and peft warns that an adapter on an output head tied to the input embeddings
    (PPO's and the online methods' default targets take the head) would change both if merged: ``rlhfkit export``
    unties the head before merging (``load.merge_adapters``). Nothing a user of rlhfkit can act on: those two
    warnings are silenced, no other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer is part of "
                                "the adapter", category=UserWarning)
        yield


def adapter_layers(model) -> list[torch.nn.Module]:
    """The modules of a peft model that hold adapters (LoRA layers and auxiliary wrappers), in order."""
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def adapters_off(model, layers: list[torch.nn.Module] | None = None):
    """The base model: every adapter layer off, as peft's ``disable_adapter`` turns them off, without
    its survey of the whole model first (~30 ms a call at 8.4M). ``layers``: ``adapter_layers(model)``,
    if the caller keeps them. Every parameter's ``requires_grad`` is as before afterwards."""
    layers = adapter_layers(model) if layers is None else layers
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
