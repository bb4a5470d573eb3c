"""Losses: reward model, PPO policy and value, entropy, KL, and the direct preference family.

Pure tensor math: imports only torch (and rlhfkit.advantages, itself torch-only). Shape alphabet
(STYLE.md habit 1): B batch, A response tokens, V vocabulary. Formulas: DESIGN.md section 3.
Losses return the loss first, then a dict of detached metrics (0-dim or (B,) tensors, so that
logging costs no device sync until the trainer asks for it).
Padded positions may hold any value: they are replaced before any arithmetic touches them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhfkit.advantages import approx_kl, masked_mean

__all__ = [
    "DPO_LOSSES",
    "POLICY_LOSS_REDUCTIONS",
    "dpo_loss",
    "entropy_from_logits",
    "kl_penalty_loss",
    "kto_loss",
    "orpo_loss",
    "policy_loss",
    "reward_model_loss",
    "simpo_loss",
    "value_loss",
]

Metrics = dict[str, torch.Tensor]


def reward_model_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
    center: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss, L = -log sigmoid(s_w - s_l - m) (DESIGN.md section 3; Llama 2 adds m), plus
    ``center`` * (s_w + s_l)^2, which draws the scores towards mean 0 (Eisenstein et al. 2023; TRL's
    center_rewards_coefficient), each averaged over the pairs.

    chosen_scores, rejected_scores, margin: (B,). Returns (scalar mean loss, {accuracy, margin}):
    accuracy is the fraction of pairs with s_w > s_l, margin the mean of s_w - s_l.
    """
    diff = chosen_scores - rejected_scores  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center:
        loss = loss + center * ((chosen_scores + rejected_scores) ** 2).mean()
    metrics = {"accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach()}
    return loss, metrics


# --------------------------------------------------------------------------- PPO policy loss
# Reductions of the per-token loss (B, A) to a scalar. "token_mean" weights every token of the batch
# equally; "seq_mean_token_mean" every sequence equally (the GRPO paper's 1/|o_i|); "token_sum_norm"
# divides the token sum by a constant (Dr. GRPO, Liu et al. 2025: max_new_tokens x sequences), so a
# long response is not down-weighted per token.


def _token_mean(loss: torch.Tensor, mask: torch.Tensor, norm_constant: float | None) -> torch.Tensor:
    return masked_mean(loss, mask)


def _seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, norm_constant: float | None) -> torch.Tensor:
    per_sequence = masked_mean(loss, mask, dim=-1)  # (B,)
    return masked_mean(per_sequence, mask.sum(-1) > 0)  # rows without tokens do not count


def _token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, norm_constant: float | None) -> torch.Tensor:
    if norm_constant is None:
        raise ValueError("reduction 'token_sum_norm' needs norm_constant (Dr. GRPO: max_new_tokens * sequences)")
    return torch.where(mask.bool(), loss, 0.0).sum() / norm_constant


POLICY_LOSS_REDUCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "token_sum_norm": _token_sum_norm,
}


LOG_RATIO_CLAMP = 20.0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    reduction: str = "token_mean",
    norm_constant: float | None = None,
    clip_eps_high: float | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7; DESIGN.md section 3), negated for descent.

    ratio = exp(logprobs - old_logprobs); per token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A),
    eps_high = `clip_eps_high` (DAPO's clip-higher, Yu et al. 2025: a larger upper bound lets unlikely tokens with
    A > 0 gain more) or `clip_eps`; reduced by POLICY_LOSS_REDUCTIONS[reduction]; `norm_constant` is used by
    "token_sum_norm" only. `level` "sequence" takes one ratio per row, exp of the masked mean of
    logprobs - old_logprobs over its tokens, for every token of it (GSPO, Zheng et al. 2025, eq. 7; its gradient
    reaches each token through the mean); "token" is PPO's.
    logprobs, old_logprobs, advantages, action_mask: (B, A). Returns (scalar, metrics):
      clip_frac   masked fraction of tokens where the clipped term was the one taken (gradient 0 there);
      approx_kl   masked mean k3 estimate of KL(old || new), (ratio - 1) - log ratio (CleanRL's choice:
                  non-negative, unbiased on tokens sampled from the old policy);
      ratio_mean  masked mean of ratio.
    """
    if reduction not in POLICY_LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid names: {sorted(POLICY_LOSS_REDUCTIONS)}")
    if level not in ("token", "sequence"):
        raise ValueError(f"unknown importance-sampling level {level!r}; valid names: ['token', 'sequence']")
    mask = action_mask.bool()
    # Padded log-probs may be garbage; exp of it could be inf and turn the (masked) gradient into NaN.
    logprobs = torch.where(mask, logprobs, 0.0)
    old_logprobs = torch.where(mask, old_logprobs, 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    log_ratio = logprobs - old_logprobs  # (B, A), 0 off the mask
    if level == "sequence":  # a row without tokens: mean 0, ratio 1, and no token to carry it
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
    # past e^20 (a policy far from the one that sampled) the ratio is held: exp(89) is inf in float32 and made the
    # gradient NaN (0 · inf) even where the clipped term was taken; verl clamps alike
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, A)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)) * advantages
    loss = POLICY_LOSS_REDUCTIONS[reduction](torch.maximum(unclipped, clipped), mask, norm_constant)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(approx_kl(old_logprobs, logprobs, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (DESIGN.md section 3; the PPO2 baselines / OpenRLHF form).

    V_clip = old_values + clip(values - old_values, -eps, eps);
    L = 1/2 * masked_mean(max((values - R)^2, (V_clip - R)^2)).
    values, old_values, returns, action_mask: (B, A). Returns (scalar, {value_clip_frac}), the masked
    fraction of tokens where the clipped error was the larger one (gradient 0 there).
    """
    mask = action_mask.bool()
    values = torch.where(mask, values, 0.0)
    old_values = torch.where(mask, old_values, 0.0)
    returns = torch.where(mask, returns, 0.0)
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"value_clip_frac": masked_mean((clipped > unclipped).float(), mask).detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at every position: (..., V) -> (...), in float32.

    H = -sum_v p_v log p_v with log p = logits - logsumexp(logits) (log_softmax): shift-invariant, so
    large logits lose no precision. Logits of -inf (a vocabulary masked by top-k, say) are raised to the
    lowest finite value first: their p is 0 either way, and 0 * -inf would be NaN.
    """
    logits = logits.float().clamp(min=torch.finfo(torch.float32).min)  # bf16 logits: summed in float32
    logprobs = torch.log_softmax(logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def entropy_bonus_loss(entropy: torch.Tensor, action_mask: torch.Tensor, reduction: str = "token_mean",
                       norm_constant: float | None = None) -> torch.Tensor:
    """Minus the policy's entropy at each response token (``entropy_from_logits`` of its logits), reduced as the
    policy loss is (POLICY_LOSS_REDUCTIONS[reduction]): added with a weight c, the loss rewards spreading
    probability (OpenRLHF's entropy_loss_coef, verl's entropy_coeff). entropy, action_mask (B, A) → a scalar,
    with gradient into the entropies."""
    if reduction not in POLICY_LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid names: {sorted(POLICY_LOSS_REDUCTIONS)}")
    mask = action_mask.bool()
    return -POLICY_LOSS_REDUCTIONS[reduction](torch.where(mask, entropy, 0.0), mask, norm_constant)


def kl_penalty_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, action_mask: torch.Tensor,
                    reduction: str = "token_mean", norm_constant: float | None = None) -> torch.Tensor:
    """GRPO's KL term (Shao et al. 2024, eq. 3-4; DESIGN.md section 3): k3 per token, with gradient, reduced
    as the policy loss is (POLICY_LOSS_REDUCTIONS[reduction]): GRPO's objective puts β·KL inside the same
    1/|o_i| average as the surrogate, so a long response's KL is not weighted above its policy term.

    d = logprobs - ref_logprobs, k3 = exp(-d) - 1 + d. logprobs, ref_logprobs, action_mask: (B, A).
    Returns a scalar; gradient flows into logprobs.
    """
    if reduction not in POLICY_LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid names: {sorted(POLICY_LOSS_REDUCTIONS)}")
    mask = action_mask.bool()
    logprobs = torch.where(mask, logprobs, 0.0)
    ref_logprobs = torch.where(mask, ref_logprobs, 0.0)
    return POLICY_LOSS_REDUCTIONS[reduction](approx_kl(logprobs, ref_logprobs, "k3"), mask, norm_constant)


# --------------------------------------------------------------------------- direct preference losses
# Each returns per-example losses (B,) and detached metrics; the trainer takes the mean.
# DPO (Rafailov et al. 2023, eq. 7) and variants act on h = (pc - rc) - (pr - rr), the margin of
# sequence log-probs (summed over response tokens) of policy over reference, chosen over rejected.


def _dpo_sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # eps = 0: DPO. eps > 0: conservative DPO (cDPO, Mitchell 2023): labels flipped with probability eps.
    if not 0.0 <= eps < 0.5:  # at 1/2 the labels carry nothing; past it the loss prefers the rejected answers
        raise ValueError(f"cDPO needs 0 <= label_smoothing < 0.5, got {eps}")
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _dpo_robust(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # rDPO (Chowdhury et al. 2024, eq. 9): unbiased under label noise eps; needs eps < 1/2.
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _dpo_ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # IPO (Azar et al. 2023, eq. 17): regress h onto 1 / (2 beta), beta playing tau's role.
    return (h - 1 / (2 * beta)) ** 2


def _dpo_hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # SLiC-HF (Zhao et al. 2023) with the reference margin: max(0, 1 - beta h).
    return torch.relu(1 - beta * h)


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "robust": _dpo_robust,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
}
_LABEL_SMOOTHED = ("sigmoid", "robust")  # the variants that read label_smoothing


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO and its variants (DESIGN.md section 3), chosen by name from DPO_LOSSES.

    All four inputs: (B,) sequence log-probs. Returns (losses (B,), {chosen_rewards, rejected_rewards}),
    the implicit rewards beta (pc - rc) and beta (pr - rr), each (B,) and detached.
    label_smoothing is the assumed label-noise rate of "sigmoid" (cDPO) and "robust" (rDPO).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid names: {sorted(DPO_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"DPO needs beta > 0 (the KL leash; larger stays closer to the reference), got {beta}")
    if label_smoothing and loss_type not in _LABEL_SMOOTHED:
        raise ValueError(f"label_smoothing is read only by loss_type in {_LABEL_SMOOTHED}, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    metrics = {
        "chosen_rewards": (beta * chosen_logratios).detach(),
        "rejected_rewards": (beta * rejected_logratios).detach(),
    }
    return losses, metrics


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0, gamma: float = 0.5
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta (c - r) - gamma); no reference model.

    chosen_avg_logps, rejected_avg_logps: (B,) length-averaged log-probs; gamma is the target reward margin.
    Returns (losses (B,), {chosen_rewards, rejected_rewards}) with rewards beta * avg logp, detached.
    """
    losses = -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)
    metrics = {
        "chosen_rewards": (beta * chosen_avg_logps).detach(),
        "rejected_rewards": (beta * rejected_avg_logps).detach(),
    }
    return losses, metrics


def _log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logps) (B,), in float32 at least; clamped just below 0 so that 1 - p > 0.
    1 - p is -expm1(a): exact near a = 0, where 1 - exp(a) cancels (and rounds to 0 in bf16)."""
    avg_logps = avg_logps.to(torch.promote_types(avg_logps.dtype, torch.float32)).clamp(max=-1e-6)
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lam: float = 0.1
) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong et al. 2024, eqs. 6-7): NLL of the chosen answer + lam * odds-ratio loss; no reference.

    L = -c + lam * (-log sigmoid(log odds(c) - log odds(r))), log odds(a) = a - log(1 - exp a).
    chosen_avg_logps, rejected_avg_logps: (B,) length-averaged log-probs. Returns (losses (B,),
    {chosen_rewards, rejected_rewards, log_odds_ratio}): rewards lam * avg logp (TRL's convention), detached.
    """
    log_odds_ratio = _log_odds(chosen_avg_logps) - _log_odds(rejected_avg_logps)  # (B,)
    losses = -chosen_avg_logps - lam * F.logsigmoid(log_odds_ratio)
    metrics = {
        "chosen_rewards": (lam * chosen_avg_logps).detach(),
        "rejected_rewards": (lam * rejected_avg_logps).detach(),
        "log_odds_ratio": log_odds_ratio.detach(),
    }
    return losses, metrics


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 8; DESIGN.md section 3) on unpaired examples.

    r = policy_logps - ref_logps; reference point z = max(0, kl), without gradient;
    desirable (label True): lambda_D (1 - sigmoid(beta (r - z))), undesirable: lambda_U (1 - sigmoid(beta (z - r))).
    policy_logps, ref_logps: (B,) sequence log-probs; labels: (B,) bool; kl: scalar tensor, the batch KL
    estimate from mismatched (x, y') pairs. Returns (losses (B,), {rewards}): beta * r, (B,), detached.
    """
    rewards = policy_logps - ref_logps  # (B,)
    z = torch.as_tensor(kl, dtype=rewards.dtype, device=rewards.device).clamp(min=0).detach()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (rewards - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - rewards)))
    losses = torch.where(labels.bool(), desirable, undesirable)
    return losses, {"rewards": (beta * rewards).detach()}


def reduction_units(reduction: str, action_mask: torch.Tensor) -> float:
    """How many units a reduction averages over in ``action_mask`` (B, A): tokens ("token_mean"),
    sequences with at least one token ("seq_mean_token_mean") or sequences ("token_sum_norm",
    whose constant grows with them). A shard's loss times units(shard) / units(batch), summed
    over the shards of a batch, is the loss of the whole batch: how data parallelism stays exact.
    """
    if reduction == "token_mean":
        return float(action_mask.sum())
    if reduction == "seq_mean_token_mean":
        return float((action_mask.sum(-1) > 0).sum())
    if reduction == "token_sum_norm":
        return float(action_mask.shape[0])
    raise ValueError(f"unknown reduction {reduction!r}; valid names: {sorted(POLICY_LOSS_REDUCTIONS)}")
