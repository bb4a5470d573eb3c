"""Rewards, advantages and KL bookkeeping for the online trainers (PPO, GRPO, RLOO, REINFORCE++).

Pure tensor math: imports only torch. Shape alphabet (STYLE.md habit 1):
B batch, A response tokens, G group size, N = prompts * G.

`action_mask` (B, A) is 1 on response tokens (EOS included, DESIGN.md section 3) and 0 on padding;
the ones form a prefix of each row, and a row may be all zero. Padding may hold any value, even
inf: every function here selects with `torch.where` before doing arithmetic, so garbage in padded
positions never reaches a result (nor, through `0 * inf`, a gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "approx_kl",
    "gae",
    "group_advantages",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "reward_to_go",
    "rloo_advantages",
]


# --------------------------------------------------------------------------- masked statistics


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (bf16 / fp16 sums lose ~1% over a few hundred terms); float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over every entry (dim=None, a scalar) or along `dim`.

    x and mask have the same shape (e.g. (B, A)); mask holds 0/1 (bool, int or float).
    An all-zero mask (or mask row, with `dim`) gives 0, not NaN.
    """
    mask = mask.to(x.dtype)
    kept = torch.where(mask != 0, x, 0.0) * mask
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1.0)
    # With 0/1 masks the count is a whole number, so clamping at 1 only touches empty rows (0 / 1 = 0).
    return kept.sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (any shape, mask the same shape): a scalar.

    `unbiased` applies Bessel's correction n / (n - 1). Fewer than two masked entries give 0.
    """
    x = torch.where(mask.bool(), x, 0.0)  # padded inf would make a NaN gradient through (x - mean)**2
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with mean and (unbiased) var over the masked entries.

    x and mask share a shape, e.g. (B, A); the result has it too (in float32 at least: the statistics are sums) and is
    0 outside the mask. DESIGN.md section 3 whitens advantages with the mean *not* added back
    (shift_mean=True); shift_mean=False adds the mean back, only rescaling.
    """
    x = _wide(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


# --------------------------------------------------------------------------- KL estimators
# Schulman, "Approximating KL divergence" (2020); DESIGN.md section 3. With d = logp - logp_ref on
# tokens sampled from the policy, each estimates KL(policy || ref): k1 unbiased but noisy and
# possibly negative, k2 = d^2 / 2 low variance but biased, k3 = (1/r - 1) + log r with r = exp(d),
# unbiased and always >= 0.


def _k1(d: torch.Tensor) -> torch.Tensor:
    return d


def _k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d**2


K3_CLAMP = 20.0  # d below -20 (a reference e^20 times likelier) counts as -20: exp(-d) would overflow past 88.
# Above, k3 ~ d - 1 is finite: unclamped, the KL term keeps pulling back the tokens that drifted furthest up


def _k3(d: torch.Tensor) -> torch.Tensor:
    d = d.clamp(min=-K3_CLAMP)
    return torch.expm1(-d) + d  # exp(-d) - 1 + d, without cancellation for small d


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def approx_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    logprobs, ref_logprobs: (B, A) log-probs of the sampled tokens. Returns (B, A), unmasked.
    kind: one of KL_ESTIMATORS ("k1", "k2", "k3"); the reward uses k1 by default (DESIGN.md section 3).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid names: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs)


# --------------------------------------------------------------------------- PPO: rewards and GAE


def per_token_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    clip: float | None = None,
    penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL-shaped token rewards (DESIGN.md section 3; Ziegler et al. 2019).

    r_t = -beta * kl_t on response tokens, and r_T += clip(score, -clip, clip) + penalty at each row's last
    response token T = action_mask.sum(-1) - 1. Rows with an empty mask get no score.
    score: (B,) reward-model score; kl: (B, A) per-token KL; action_mask: (B, A); penalty: (B,) shaping added
    after the clip, which must not take it away (a missing EOS, an overlong answer). Returns (B, A),
    0 outside the mask.
    """
    mask = action_mask.bool()
    rewards = torch.where(mask, -beta * kl, 0.0)
    if clip is not None:
        score = score.clamp(-clip, clip)
    if penalty is not None:
        score = score + penalty
    lengths = mask.sum(-1)  # (B,)
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (A,)
    is_last = positions[None, :] == (lengths - 1)[:, None]  # (B, A); never true for an empty row
    return rewards + torch.where(is_last, score[:, None].to(rewards.dtype), 0.0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16; DESIGN.md section 3).

    Backwards over tokens with V = 0 past each row's last response token:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.
    rewards, values, action_mask: (B, A). Returns (advantages, returns), each (B, A), in float32 at
    least (the sums: in bf16 they lose ~1% over a few hundred tokens), 0 outside the mask.
    """
    mask = action_mask.bool()
    # Zeroing padded rewards and values is what makes V_{T+1} = 0 and A_{T+1} = 0 for every row.
    rewards = torch.where(mask, _wide(rewards), 0.0)
    values = torch.where(mask, _wide(values), 0.0)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)  # (B, A)
    advantages = torch.where(mask, advantages, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


# --------------------------------------------------------------------------- critic-free advantages


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) laid out group by group -> (prompts, G), after checking that the sizes fit."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, group_size)


GROUP_SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath eq. 3 / outcome supervision).

    rewards: (N,) one scalar per response, the G responses of each prompt next to each other.
    Returns (N,): r - group mean, divided by ``scale``'s sample std + 1e-4: "group" its group's (GRPO),
    "batch" all N rewards' (TRL's scale_rewards="batch"; Liu et al. 2025's "Lite PPO": group mean, batch
    std), "none" nothing (Dr. GRPO, Liu et al. 2025, which drops the std). A group whose rewards are all
    equal carries no signal and gets exactly 0 (a float mean of equal values can round off them). G = 1 is
    such a group: every advantage is 0.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid names: {list(GROUP_SCALES)}")
    grouped = _grouped(rewards, group_size)  # (prompts, G)
    if group_size == 1:
        return torch.zeros_like(rewards)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        advantages = advantages / (grouped.std(-1, correction=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (grouped.std(correction=1) + 1e-4)
    all_equal = (grouped == grouped[:, :1]).all(-1, keepdim=True)  # (prompts, 1)
    return torch.where(all_equal, 0.0, advantages).view(-1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times ``factor``: 0 up to L_max - L_buffer tokens,
    then falling linearly to -factor at L_max = ``max_length`` (-factor past it).

    lengths: (B,) response lengths in tokens. Returns (B,) float, added to each response's reward;
    ``buffer`` = 0 gives zeros.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_length - buffer)).clamp(min=0.0) / buffer  # (B,) 0 .. 1 within the buffer
    return -factor * over.clamp(max=1.0)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): r_i - mean_{j != i} r_j.

    rewards: (N,) laid out group by group. Returns (N,). group_size must be >= 2 (with one sample
    there is nothing to leave out).
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    grouped = _grouped(rewards, group_size)  # (prompts, G)
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).view(-1)


def reward_to_go(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return from each token on: G_t = sum_{s >= t} gamma^(s - t) r_s over response tokens.

    REINFORCE++ (Hu 2025) uses gamma = 1 (DESIGN.md section 3). rewards, action_mask: (B, A).
    Returns (B, A), summed in float32 at least, 0 outside the mask.
    """
    mask = action_mask.bool()
    rewards = torch.where(mask, _wide(rewards), 0.0)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    returns_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[:, t] + gamma * running
        returns_reversed.append(running)
    returns = torch.stack(returns_reversed[::-1], dim=-1)  # (B, A)
    return torch.where(mask, returns, 0.0)


# --------------------------------------------------------------------------- KL coefficient


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2, in TRL's form; DESIGN.md section 3).

    After each batch: e = clip(current_kl / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon),
    where current_kl is the per-sequence summed KL averaged over the batch and n_steps the episodes in it.
    """

    def __init__(self, init_beta: float, target: float = 6.0, horizon: int = 10000) -> None:
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """A NaN ``current_kl`` (a rollout gone bad) leaves beta as it was: NaN would stay in it for good."""
        if math.isnan(float(current_kl)):
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class FixedKLController:
    """A constant KL coefficient with AdaptiveKLController's interface; `update` does nothing."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
