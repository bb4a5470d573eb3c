"""Direct preference optimisation from offline data: DPO and its variants, ORPO, SimPO, KTO.

DESIGN.md §3 gives the formulas and ``rlhfkit.losses`` holds the math; this file feeds it.
Every optimiser step, for every method:

1. policy log-probs of the two sequences of each example in one forward over 2B rows
   (chosen ‖ rejected; KTO: the completion with gradient, then the mismatched pair without);
2. reference log-probs of the same rows: a frozen model, the base with LoRA switched off, or a
   cache filled in one pass before training (ORPO and SimPO have no reference);
3. per-example losses from ``rlhfkit.losses``, their mean, and the implicit rewards as metrics.

Sequence log-probs are summed over completion tokens (EOS included); IPO (as TRL does),
SimPO and ORPO take the length-averaged form. Shapes: B examples, T tokens.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from rlhfkit import distributed, fsdp
from rlhfkit.advantages import masked_mean
from rlhfkit.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig, arg, columns_arg
from rlhfkit.data.collate import (Encoded, collate, drop_tied_pairs, encode_pair, encode_reply, encoded_rows,
                                  fit_to_length, label_mask, pack)
from rlhfkit.data.formats import load_preference, load_unpaired
from rlhfkit.losses import dpo_loss, kto_loss, orpo_loss, simpo_loss
from rlhfkit.models.forward import LOGITS_CHUNK_HELP, check_packing, masked_logprobs, packed_logprobs
from rlhfkit.models.load import (add_lora, check_max_length, check_same_tokenizer, eval_mode, load_causal_lm,
                                 mixed_precision, refuse_adapter_dir, save_model)
from rlhfkit.ops import sequence_logprobs
from rlhfkit.trainers.loop import Logger, add_metrics, metric_means, releases_out_dir, run, start_run

LENGTH_AVERAGED_DPO = ("ipo",)  # DPO variants fed mean token log-probs (TRL's choice for IPO)
ReferenceKind = Literal["model", "adapter", "precomputed"]
_REFERENCE_HELP = ("pi_ref: model = frozen ref_model (with LoRA and no ref_model: the base, its adapter off, no "
                   "second copy), adapter = LoRA switched off, precomputed = cached up front")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PreferenceConfig:
    """Options every direct preference method shares."""

    data: str = arg("", "training file: prompt/chosen/rejected rows (KTO: prompt/completion/label)")
    eval_data: str = arg("", "held-out file of the same kind, for eval loss and rewards (empty = none)")
    columns: dict[str, str] = columns_arg()
    max_length: int = arg(256, "tokens per sequence at most (prompt + completion + EOS)", ge=2)
    too_long: Literal["truncate", "drop"] = arg("truncate", "examples over max_length: cut them (the prompt loses its "
                                                "start first) or leave them out; either way they are counted")
    logits_chunk: int = arg(0, LOGITS_CHUNK_HELP, ge=0)
    packing: bool = arg(False, "lay each micro-batch's sequences (both answers of a pair) end to end in rows of up to "
                        "max_length tokens instead of padding each (attention kept within each; the same loss and "
                        "update, fewer padding tokens computed, but a pair's prompt computed twice; TRL's "
                        "padding_free)")
    model: ModelConfig = arg(ModelConfig, "the model to train, usually the SFT model")
    lora: LoraConfig = arg(LoraConfig, "LoRA adapters (off = full fine-tuning)")
    optim: OptimConfig = arg(OptimConfig(lr=1e-6), "optimiser (the quickstart's tiny models use 5e-4)")
    train: TrainConfig = arg(TrainConfig(out="runs/preference"), "training loop")


_NLL_HELP = ("weight of the chosen answer's NLL (each pair's mean over its tokens, averaged over pairs) added to "
             "the loss; 0 = off")


def _check_reference(cfg) -> None:
    if cfg.reference == "adapter" and not cfg.lora.enabled:
        raise ValueError("reference 'adapter' is the policy with its LoRA adapter switched off; "
                         "set lora.enabled: true, or use reference: model")


@dataclass(frozen=True)
class DPOConfig(PreferenceConfig):
    """`rlhfkit dpo`: direct preference optimisation (Rafailov et al. 2023) and its loss variants."""

    beta: float = arg(0.1, "KL leash to the reference (larger stays closer); reward = beta * log(pi / pi_ref)")
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] = arg(
        "sigmoid", "sigmoid = DPO (cDPO with label_smoothing), robust = rDPO, ipo = IPO, hinge = SLiC")
    label_smoothing: float = arg(0.0, "assumed label-noise rate, read by sigmoid (cDPO) and robust (rDPO)")
    nll_weight: float = arg(0.0, _NLL_HELP + " (RPO, as OpenRLHF's nll_loss_coef; TRL's rpo_alpha weighs every "
                            "chosen token of the batch alike)", ge=0, lt=float("inf"))
    reference: ReferenceKind = arg("model", _REFERENCE_HELP)
    ref_model: str = arg("", "reference model directory; empty = model.path")
    train: TrainConfig = arg(TrainConfig(out="runs/dpo"), "training loop")

    def __post_init__(self):
        _check_reference(self)
        nothing = torch.zeros(1)  # let dpo_loss apply its own rules (robust needs eps < 1/2, ...)
        dpo_loss(nothing, nothing, nothing, nothing, self.beta, self.loss_type, self.label_smoothing)


@dataclass(frozen=True)
class ORPOConfig(PreferenceConfig):
    """`rlhfkit orpo`: odds-ratio preference optimisation (Hong et al. 2024); no reference model."""

    lam: float = arg(0.1, "weight of the odds-ratio term next to the chosen answer's NLL", ge=0, lt=float("inf"))
    train: TrainConfig = arg(TrainConfig(out="runs/orpo"), "training loop")


@dataclass(frozen=True)
class SimPOConfig(PreferenceConfig):
    """`rlhfkit simpo`: simple preference optimisation (Meng et al. 2024); no reference model."""

    beta: float = arg(2.0, "scale of the length-averaged log-prob reward", gt=0, lt=float("inf"))
    gamma: float = arg(0.5, "target reward margin between chosen and rejected", ge=0, lt=float("inf"))
    nll_weight: float = arg(0.0, _NLL_HELP + " (CPO-SimPO; TRL's cpo_alpha weighs every chosen token of the batch "
                            "alike)", ge=0, lt=float("inf"))
    train: TrainConfig = arg(TrainConfig(out="runs/simpo"), "training loop")


@dataclass(frozen=True)
class KTOConfig(PreferenceConfig):
    """`rlhfkit kto`: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired labelled data."""

    beta: float = arg(0.1, "scale of the implicit reward beta * log(pi / pi_ref)", gt=0, lt=float("inf"))
    desirable_weight: float = arg(1.0, "lambda_D; with imbalanced data aim for lambda_D n_D / (lambda_U n_U) "
                                  "in [1, 4/3]", ge=0, lt=float("inf"))
    undesirable_weight: float = arg(1.0, "lambda_U, the weight of undesirable examples", ge=0, lt=float("inf"))
    reference: ReferenceKind = arg("model", _REFERENCE_HELP)
    ref_model: str = arg("", "reference model directory; empty = model.path")
    train: TrainConfig = arg(TrainConfig(out="runs/kto"), "training loop")

    def __post_init__(self):
        _check_reference(self)


# --------------------------------------------------------------------------- examples and log-probs


@dataclass
class Example:
    """One training example: two tokenised sequences that always travel together.

    Paired methods: (prompt + chosen, prompt + rejected). KTO: (prompt + completion,
    prompt + another example's completion), the second only for the KL reference point.
    """

    first: Encoded
    second: Encoded
    label: bool = True  # KTO: is the completion desirable?
    ref_logps: tuple[float, float] | None = None  # reference log-probs of (first, second), when cached


def encode_pairs(rows: list[dict], tokenizer, max_length: int, seed: int) -> list[Example]:
    """Preference rows → Examples of (prompt + chosen, prompt + rejected); ``seed`` is unused (the
    signature is encode_unpaired's)."""
    return [Example(*encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], max_length)) for r in rows]


def mismatched_partners(n: int, seed: int) -> list[int]:
    """For each example i, the example whose completion forms its mismatched pair; never i when n > 1.

    The KTO paper shifts completions by one within a batch; like TRL, we fix that shift once, over
    a seeded shuffle of the data, so the reference side of the pair can be precomputed too.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def encode_unpaired(rows: list[dict], tokenizer, max_length: int, seed: int) -> list[Example]:
    """Unpaired rows → Examples of (prompt + completion, prompt + a mismatched completion), labelled."""
    partners = mismatched_partners(len(rows), seed)
    return [Example(encode_reply(tokenizer, r["prompt"], r["completion"], max_length),
                    encode_reply(tokenizer, r["prompt"], rows[j]["completion"], max_length), label=r["label"])
            for r, j in zip(rows, partners)]


def both(examples: list[Example]) -> list[Encoded]:
    """The 2B sequences of one concatenated forward: every first, then every second."""
    return [e.first for e in examples] + [e.second for e in examples]


def completion_logps(model, batch: dict[str, torch.Tensor], average: bool, chunk: int = 0) -> torch.Tensor:
    """Log-probability of each sequence's completion: the sum over its tokens, or their mean (0 for none).

    batch: ``input_ids``, ``attention_mask``, ``completion_mask`` (B, T) → (B,); or B sequences packed in R rows
    (``collate.pack``: ``position_ids``, ``sequence_ids``, no attention mask) → (B,), in the order they were
    given. ``chunk``: output-head positions at a time (``forward.masked_logprobs``; 0 = all).
    """
    mask = label_mask(batch)  # the label of position t is token t+1
    if "position_ids" not in batch:
        logprobs = masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask, chunk)  # (B, T-1)
        return masked_mean(logprobs, mask, dim=-1) if average else sequence_logprobs(logprobs, mask)
    logprobs = packed_logprobs(model, batch["input_ids"], batch["position_ids"], mask, chunk)  # (R, L-1)
    total, tokens = per_sequence(batch, logprobs), per_sequence(batch, mask.to(logprobs.dtype))
    return total / tokens.clamp(min=1.0) if average else total


def per_sequence(batch: dict[str, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """``values`` of the next-token labels summed over each sequence: (B, T-1) → (B,) for a padded batch, (R, L-1)
    → (number of sequences,) for a packed one (its labels within one sequence: ``label_mask`` cuts the others)."""
    if "sequence_ids" not in batch:
        return values.sum(-1)
    owner = batch["sequence_ids"][:, 1:]  # the sequence of each label's token
    count = int(batch["sequence_ids"].max()) + 1
    return values.new_zeros(count).index_add(0, owner[owner >= 0], values[owner >= 0])


Batcher = Callable[[list[Encoded]], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------- the reference policy


class LiveReference:
    """pi_ref's log-probs computed when asked, inside ``context()``, which yields the model to call
    (STYLE.md habit 11: the reference is a context, whether a frozen model or the adapter switched off)."""

    def __init__(self, context: Callable, average: bool, to_batch: Batcher, chunk: int = 0):
        self.context, self.average, self.to_batch, self.chunk = context, average, to_batch, chunk

    def prepare(self, examples: list[Example], batch_size: int) -> None:
        """Nothing to do before training."""

    def logps(self, examples: list[Example], parts: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, ...]:
        """Reference log-probs of each example's ``parts`` (0 = first, 1 = second): one (B,) tensor each."""
        seqs = [(e.first, e.second)[k] for k in parts for e in examples]
        # no_grad, not inference_mode: under DeepSpeed ZeRO-3 the weights this pass gathers are partitioned
        # again at its end, and storage made in inference mode leaves them unreadable to the backward
        with torch.no_grad(), self.context() as model:
            return completion_logps(model, self.to_batch(seqs), self.average, self.chunk).chunk(len(parts))


class PrecomputedReference(LiveReference):
    """pi_ref's log-probs computed in one pass before training and cached on the examples; during
    training no reference model is held at all."""

    def prepare(self, examples: list[Example], batch_size: int) -> None:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            first, second = super().logps(chunk)
            for e, a, b in zip(chunk, first.tolist(), second.tolist()):
                e.ref_logps = (a, b)
            self.device = first.device
        self.context = None  # drops the frozen model, if one was loaded for this pass

    def logps(self, examples: list[Example], parts: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, ...]:
        cached = torch.tensor([e.ref_logps for e in examples], device=self.device)  # (B, 2)
        return tuple(cached[:, k] for k in parts)


def _frozen_model(cfg, policy) -> Callable:
    """A frozen copy of the reference: sharded like the policy when the run shards (each layer's weights
    gathered for its forward only: it has no backward), whole in every process otherwise. In the policy's dtype:
    under ``dtype: auto`` on a GPU a fully trained policy keeps float32 weights (computing in bf16 under autocast),
    and a bf16 reference beside it would give a nonzero implicit reward before the first update."""
    first = next(policy.parameters())
    ref_cfg = dataclasses.replace(cfg.model, path=cfg.ref_model or cfg.model.path)
    model = load_causal_lm(ref_cfg, first.device, trainable=first.dtype == torch.float32).eval().requires_grad_(False)
    if getattr(cfg, "packing", False):  # it reads the packed rows too: another architecture may not keep them apart
        check_packing(model)
    if fsdp.mode(cfg.train.fsdp) != "off":
        fsdp.shard(model, "full_shard", what="the frozen reference",
                   amp=mixed_precision(cfg.model.dtype, first.device))
    return lambda: nullcontext(model)


def _adapter_off(cfg, policy) -> Callable:
    from rlhfkit.models.lora import adapters_off

    @contextmanager
    def context():
        # the reference is deterministic: no dropout; adapters_off: peft's disable_adapter surveys the model first
        with adapters_off(policy), eval_mode(policy):  # (~30 ms)
            yield policy

    return context


def _before_training(cfg, policy) -> Callable:
    # Before its first step the policy is the reference (a fresh LoRA adapter adds zero), so the one
    # pass needs no second model unless ref_model names a different one.
    return _frozen_model(cfg, policy) if cfg.ref_model else (lambda: eval_mode(policy))


REFERENCES: dict[str, tuple[type[LiveReference], Callable]] = {
    "model": (LiveReference, _frozen_model),
    "adapter": (LiveReference, _adapter_off),
    "precomputed": (PrecomputedReference, _before_training),
}


def make_reference(cfg, policy, average: bool, to_batch: Batcher) -> LiveReference:
    """The reference named by ``cfg.reference`` ("model", "adapter" or "precomputed"). "model" with a LoRA policy
    and no ``ref_model`` is the policy's own base with its adapter off: the model it names, without loading a
    second copy of it (TRL does the same with a peft model)."""
    name = "adapter" if cfg.reference == "model" and cfg.lora.enabled and not cfg.ref_model else cfg.reference
    kind, context = REFERENCES[name]
    return kind(context(cfg, policy), average, to_batch, cfg.logits_chunk)


# --------------------------------------------------------------------------- objectives


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Implicit-reward metrics of a batch of pairs, from (B,) rewards of chosen and rejected."""
    margin = chosen_rewards - rejected_rewards
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": margin.mean(), "rewards/accuracy": (margin > 0).float().mean()}


@dataclass(frozen=True)
class PairedObjective:
    """DPO, ORPO, SimPO: chosen and rejected in one forward, then a pairwise loss."""

    loss: Callable  # (chosen, rejected, ref_chosen, ref_rejected) (B,) each → (losses (B,), metrics)
    average: bool  # length-averaged log-probs instead of sums
    needs_reference: bool
    nll_weight: float = 0.0  # the chosen answer's NLL, a mean over its tokens, added with this weight
    chunk: int = 0  # output-head positions at a time (forward.masked_logprobs; 0 = all)
    read = staticmethod(load_preference)  # rows, validated
    encode = staticmethod(encode_pairs)  # rows → Examples

    def before_step(self, policy, reference, to_batch: Batcher, examples: list[Example], chunk: int) -> dict:
        """What a whole step's batch must settle before its micro-batches: nothing for pairwise losses."""
        return {}

    def step(self, policy, reference: LiveReference | None, to_batch: Batcher, examples: list[Example]):
        batch = to_batch(both(examples))
        logps = completion_logps(policy, batch, self.average, self.chunk)  # (2B,)
        chosen, rejected = logps.chunk(2)  # (B,), (B,)
        ref_chosen, ref_rejected = reference.logps(examples) if self.needs_reference else (None, None)
        losses, m = self.loss(chosen, rejected, ref_chosen, ref_rejected)
        metrics = reward_metrics(m["chosen_rewards"], m["rejected_rewards"])
        if "log_odds_ratio" in m:  # ORPO's, as TRL logs it
            metrics["log_odds_ratio"] = m["log_odds_ratio"].mean()
        if self.nll_weight:
            tokens = per_sequence(batch, label_mask(batch)).chunk(2)[0]  # (B,) the chosen answers' lengths
            nll = -(chosen if self.average else chosen / tokens.clamp(min=1))  # (B,)
            losses = losses + self.nll_weight * nll
            metrics["nll"] = nll.detach().mean()
        return losses.mean(), metrics


@dataclass(frozen=True)
class KTOObjective:
    """KTO: each completion scored alone against the KL reference point z of its batch."""

    cfg: KTOConfig
    # the reference's log-prob of each example's own completion, by id(example): the KL pass reads it with the
    # mismatched one in one pass over their shared prompt, and the step's loss then takes it from here
    reference_logps: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    average = False  # KTO's reward uses summed log-probs
    needs_reference = True
    read = staticmethod(load_unpaired)
    encode = staticmethod(encode_unpaired)

    def before_step(self, policy, reference: LiveReference, to_batch: Batcher, examples: list[Example],
                    chunk: int) -> dict:
        """The step's KL estimate over its whole batch: this process's ``examples`` in chunks of ``chunk``,
        summed over every process. So z does not depend on how the batch is split (processes,
        ``grad_accum``); every process calls this once a step, whatever its share."""
        total = 0.0
        self.reference_logps.clear()  # last step's
        for i in range(0, len(examples), chunk):
            total += self._kl_sum(policy, reference, to_batch, examples[i: i + chunk])
        total, count = distributed.all_sum([total, float(len(examples))], next(policy.parameters()).device)
        return {"kl": total / max(count, 1.0)}

    def _kl_sum(self, policy, reference: LiveReference, to_batch: Batcher, examples: list[Example]) -> float:
        """Σ over examples of log π(y'|x) − log π_ref(y'|x) on their mismatched pairs, without gradient."""
        with torch.no_grad():  # z has no gradient (KTO paper, section 4.1); no_grad: see LiveReference.logps
            kl_logps = completion_logps(policy, to_batch([e.second for e in examples]), False,
                                        self.cfg.logits_chunk)  # (B,)
        ref_kl_logps = []
        half = max(1, (len(examples) + 1) // 2)  # both completions of half the examples: as many rows as one part
        for i in range(0, len(examples), half):
            ref_logps, kl_part = reference.logps(examples[i: i + half], parts=(0, 1))  # one pass over their prompts
            self.reference_logps.update((id(e), v) for e, v in zip(examples[i: i + half], ref_logps))
            ref_kl_logps.append(kl_part)
        return (kl_logps - torch.cat(ref_kl_logps).to(kl_logps.device)).sum().item()

    def step(self, policy, reference: LiveReference, to_batch: Batcher, examples: list[Example],
             kl: float | None = None):
        """``kl``: the step's estimate (``before_step``); None (evaluation) takes this batch's own."""
        if kl is None:
            kl = self._kl_sum(policy, reference, to_batch, examples) / len(examples)
        logps = completion_logps(policy, to_batch([e.first for e in examples]), False, self.cfg.logits_chunk)  # (B,)
        # read by the KL pass, this step's (before_step) or this batch's own (above)
        ref_logps = torch.stack([self.reference_logps[id(e)] for e in examples]).to(logps.device)
        kl = torch.tensor(kl, device=logps.device)  # kto_loss clamps it at 0 and detaches it
        labels = torch.tensor([e.label for e in examples], device=logps.device)  # (B,) bool
        losses, m = kto_loss(logps, ref_logps, labels, kl, self.cfg.beta, self.cfg.desirable_weight,
                             self.cfg.undesirable_weight)
        # each reward a mean over the examples of its label, counted as many (``loop.add_metrics``); both keys
        # always, so that every process and micro-batch reports the same ones
        desirable = labels.sum().item()
        rewards = m["rewards"].detach()
        metrics = {"kl": kl.detach(),
                   "rewards/chosen": (rewards[labels].sum().item() / max(desirable, 1), desirable),
                   "rewards/rejected": (rewards[~labels].sum().item() / max(len(examples) - desirable, 1),
                                        len(examples) - desirable)}
        return losses.mean(), metrics


def dpo_objective(cfg: DPOConfig) -> PairedObjective:
    return PairedObjective(
        lambda c, r, rc, rr: dpo_loss(c, r, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing),
        average=cfg.loss_type in LENGTH_AVERAGED_DPO, needs_reference=True, nll_weight=cfg.nll_weight,
        chunk=cfg.logits_chunk)


def orpo_objective(cfg: ORPOConfig) -> PairedObjective:
    return PairedObjective(lambda c, r, rc, rr: orpo_loss(c, r, cfg.lam), average=True, needs_reference=False,
                           chunk=cfg.logits_chunk)


def simpo_objective(cfg: SimPOConfig) -> PairedObjective:
    return PairedObjective(lambda c, r, rc, rr: simpo_loss(c, r, cfg.beta, cfg.gamma), average=True,
                           needs_reference=False, nll_weight=cfg.nll_weight, chunk=cfg.logits_chunk)


OBJECTIVES: dict[type, Callable] = {DPOConfig: dpo_objective, ORPOConfig: orpo_objective,
                                    SimPOConfig: simpo_objective, KTOConfig: KTOObjective}


# --------------------------------------------------------------------------- training


@releases_out_dir
def train(cfg: DPOConfig | ORPOConfig | SimPOConfig | KTOConfig) -> dict[str, float]:
    """Train ``cfg.model.path`` on ``cfg.data`` with the method ``cfg`` configures; the model
    (or LoRA adapter) lands in ``cfg.train.out``. Returns the last logged metrics."""
    objective = OBJECTIVES[type(cfg)](cfg)
    rows = objective.read(cfg.data, cfg.columns)  # validates every row before anything is loaded
    if any("margin" in r for r in rows):
        warnings.warn(f"{cfg.data} has a 'margin' column, which only the reward model's loss reads (rlhfkit rm); "
                      "this method trains without it", stacklevel=2)
    eval_rows = objective.read(cfg.eval_data, cfg.columns) if cfg.eval_data else []
    refuse_adapter_dir(cfg.model.path, type(cfg).__name__.removesuffix("Config"))
    check_max_length(cfg.model, cfg.max_length)
    out, device, tokenizer = start_run(cfg)
    if getattr(cfg, "ref_model", ""):  # it reads the policy's token ids
        check_same_tokenizer(tokenizer, cfg.ref_model, "the reference model",
                             "Give a reference that shares the policy's tokenizer, or none (the policy as it starts)",
                             cfg.model.trust_remote_code)
    policy = load_causal_lm(cfg.model, device, trainable=not cfg.lora.enabled)
    if cfg.lora.enabled:
        if cfg.lora.dropout:  # run(dropout=False) below, as TRL's disable_dropout
            warnings.warn(f"lora.dropout {cfg.lora.dropout} is not applied: the DPO family trains without dropout, so "
                          "that the policy gives its reference's log-probs while their weights agree", stacklevel=2)
        policy = add_lora(policy, cfg.lora, float32=cfg.model.dtype == "auto")

    # a pair goes as a whole; a KTO example by its own completion (its mismatched partner, another example's
    # completion, only enters the KL estimate: cut when too long, it does not take the example with it)
    kto = isinstance(objective, KTOObjective)

    def encode(rows, source):
        encoded = encoded_rows(source, rows, lambda some: objective.encode(some, tokenizer, cfg.max_length,
                                                                           cfg.train.seed))
        return fit_to_length(encoded, cfg.too_long, lambda e: e.first.truncated or not kto and e.second.truncated,
                             f"max_length {cfg.max_length}", source)

    examples, eval_examples = encode(rows, cfg.data), encode(eval_rows, cfg.eval_data)
    # pairs cut to the same tokens teach a pairwise loss nothing; ORPO's, or one with the chosen answer's NLL
    # (nll_weight), still learns from the chosen answer. Held-out pairs stay: a tie counts against the model.
    if not kto and not isinstance(cfg, ORPOConfig) and not cfg.nll_weight:
        examples = drop_tied_pairs(examples, lambda e: (e.first, e.second), f"max_length {cfg.max_length}", cfg.data)

    if cfg.packing:
        check_packing(policy)

    def to_batch(seqs: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = (pack(seqs, cfg.max_length, tokenizer.pad_token_id) if cfg.packing
                 else collate(seqs, tokenizer.pad_token_id))
        return {k: v.to(device) for k, v in batch.items()}

    amp = mixed_precision(cfg.model.dtype, device)
    reference = None
    if objective.needs_reference:
        reference = make_reference(cfg, policy, objective.average, to_batch)
        with amp():  # a precomputed reference's forwards as a live one's run: under the loop's autocast
            reference.prepare(examples + eval_examples, cfg.train.batch_size)

    settled: dict = {}  # what before_step settled for the current step's micro-batches

    def before_step(indices: list[int], micro: int) -> None:
        settled.update(objective.before_step(policy, reference, to_batch, [examples[i] for i in indices], micro))

    def loss_fn(indices: list[int]):
        loss, metrics = objective.step(policy, reference, to_batch, [examples[i] for i in indices], **settled)
        return loss, len(indices), metrics  # a mean over examples

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not eval_examples:
            return {}
        policy.eval()
        sums = {}
        for i in range(0, len(eval_examples), cfg.train.batch_size):
            chunk = eval_examples[i: i + cfg.train.batch_size]
            loss, metrics = objective.step(policy, reference, to_batch, chunk)
            add_metrics(sums, {"loss": loss, **metrics}, len(chunk))  # means over the whole held-out set
        return {f"eval/{k}": v for k, v in metric_means(sums).items()}

    with Logger.of_run(out, cfg) as logger:  # closed however the run ends (W&B told how)
        metrics = run(model=policy, loss_fn=loss_fn, n_examples=len(examples), cfg=cfg.train, optim=cfg.optim,
                      logger=logger, evaluate=evaluate if eval_examples else None,
                      desc=type(cfg).__name__.removesuffix("Config").lower(),
                      tokens_of=lambda idx: sum(len(examples[i].first.input_ids) + len(examples[i].second.input_ids)
                                                for i in idx),
                      amp=amp, before_step=before_step, tokenizer=tokenizer,
                      save=lambda: save_model(policy, tokenizer, out), dropout=False)
    return metrics
