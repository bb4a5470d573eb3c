"""Critic-free online RL: GRPO, Dr. GRPO, RLOO and REINFORCE++ (DESIGN.md §3, "Critic-free online RL").

Each step: P prompts, each repeated G times (laid out group by group) → PPO's experience maker
(sample, old log-probs, reference log-probs, reward; the actor is a LoRA adapter and the reference
the same base with adapters off, as in PPO's shared mode, but without a critic; or, with
``lora.enabled: false``, the full model trained and a frozen copy as the reference, loaded only when a
KL term needs it, as in PPO's separate mode) → advantages from
the method's strategy → ``epochs`` passes over shuffled mini-batches: PPO's clipped policy loss
(+ an optional k3 KL term, GRPO eq. 4) → step → log. Methods differ only in their advantage and
the reduction of the token losses:

    grpo          (r - group mean) / (group std + 1e-4), each sequence's tokens averaged (Shao et al. 2024);
                  scale_rewards batch: the step's std, none: no std
    dr_grpo       r - group mean, token losses summed / (max_new_tokens x sequences) (Liu et al. 2025)
    rloo          r - mean of the other G - 1 rewards in the group (Ahmadian et al. 2024)
    reinforce_pp  k1-KL-shaped token rewards, reward-to-go (gamma 1), whitened over the batch (Hu 2025);
                  baseline group: each reward less its group's mean first (REINFORCE++-baseline)

Sequence advantages are broadcast over the response tokens. Rewards come from ``rlhfkit.rewards``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from rlhfkit import distributed, fsdp, zero
from rlhfkit.advantages import group_advantages, masked_mean, masked_whiten, reward_to_go, rloo_advantages
from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, arg, columns_arg
from rlhfkit.data.collate import drop_long_prompts
from rlhfkit.data.formats import load_prompts
from rlhfkit.losses import entropy_bonus_loss, kl_penalty_loss, policy_loss, reduction_units
from rlhfkit.models.forward import ROLLOUT_LOGITS_CHUNK_HELP
from rlhfkit.models.load import prompt_room
from rlhfkit.models.roles import SeparateRoles, SharedBaseRoles
from rlhfkit.ops import mean_of, mean_stderr
from rlhfkit.rewards import CombinedReward, build_reward
from rlhfkit.rollout.engine import HFRolloutEngine, RolloutEngine
from rlhfkit.rollout.experience import Experience, make_experience, rollout_kl
from rlhfkit.rollout.generate import Generations, generate
from rlhfkit.rollout.sampling import prompt_seeds
from rlhfkit.trainers.checkpoint import Checkpoints, NonFinite
from rlhfkit.trainers.loop import (ROLLOUT_TRAIN_HELP, Logger, add_metrics, batch_indices, build_optimizer,
                                   check_rollout_train, evaluate_on_main, metric_means, optimizer_step,
                                   releases_out_dir, rollout_steps, sample_records, start_run)

Method = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]


@dataclass
class OnlineConfig:
    """Critic-free online RL: G samples per prompt, advantages without a value model."""

    HELP = ROLLOUT_TRAIN_HELP  # the training loop's section, shared with the supervised trainers: what it reads

    prompts: str = arg("", "prompts file: a `prompt` column, plus any columns the reward functions read")
    rewards: list[str] = arg([], "rewards: 'module:function' names (trusted code you chose) and/or reward-model "
                             "directories, summed with reward_weights")
    reward_weights: list[float] = arg([], "weight of each reward in the sum (empty = all 1)")
    advantage: Method = arg("grpo", "advantage estimator: grpo, dr_grpo, rloo or reinforce_pp")
    scale_rewards: Literal["group", "batch", "none"] = arg(
        "group", "grpo: the std dividing r − group mean: the group's, the whole step's (TRL's scale_rewards batch), "
        "or none (Dr. GRPO's advantage with grpo's reduction)")
    group_size: int = arg(8, "G: samples per prompt", ge=1)
    prompts_per_step: int = arg(16, "prompts per step; the step's batch is prompts_per_step x group_size samples",
                                ge=1)
    mini_batch_size: int = arg(64, "samples per optimiser step", ge=1)
    micro_batch_size: int = arg(0, "samples per forward and backward in each process, gradients added up over a "
                                "mini-batch (OpenRLHF's micro_train_batch_size; 0 = a process's whole share)", ge=0)
    epochs: int = arg(1, "passes over each step's samples (1 = on-policy: the ratio stays 1 on the first pass)",
                       ge=1)
    log_samples: int = arg(4, "sampled completions written to OUT/samples.jsonl each step with their rewards "
                           "(the step's first ones, over every process; 0 = none)", ge=0)
    clip_eps: float = arg(0.2, "policy ratio clip ε", gt=0)
    clip_eps_high: float | None = arg(None, "upper ratio clip 1 + ε_high (DAPO's clip-higher, e.g. 0.28 beside ε "
                                      "0.2; none = clip_eps)", gt=0)
    mask_truncated: bool = arg(False, "leave samples cut off by max_new_tokens (no EOS) out of the loss, as "
                               "DAPO's overlong filtering (TRL's mask_truncated_completions); they still count in "
                               "their group's baseline (not in REINFORCE++'s batch whitening)")
    kl_coef: float = arg(0.0, "weight of the k3 KL-to-reference term in the loss (GRPO eq. 4; 0 = none)",
                          ge=0)
    entropy_coef: float = arg(0.0, "weight of an entropy bonus: minus the policy's entropy at each response token, "
                              "reduced as the policy term, added to the loss (OpenRLHF's entropy_loss_coef; 0 = none; "
                              "logged as loss/entropy; its backward keeps softmax-sized tensors over the whole "
                              "vocabulary unless logits_chunk is set)", ge=0, lt=float("inf"))
    logits_chunk: int = arg(0, ROLLOUT_LOGITS_CHUNK_HELP, ge=0)
    beta: float = arg(0.0, "reinforce_pp: KL coefficient β in the token rewards r_t = −β·kl_t "
                      "(+ the reward at the last token)", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = arg("k1", "reinforce_pp: per-token KL estimator in the reward")
    baseline: Literal["batch", "group"] = arg(
        "batch", "reinforce_pp: the returns whitened over the whole batch alone (REINFORCE++), or each sample's "
        "reward less its prompt's group mean first (REINFORCE++-baseline, OpenRLHF's reinforce_baseline: a "
        "prompt's easiness no longer counts; group_size 2 or more)")
    missing_eos_penalty: float | None = arg(None, "subtracted from the reward of samples that never emit EOS "
                                                  "(as TRL's)", ge=0, lt=float("inf"))
    overlong_buffer: int = arg(0, "DAPO's soft overlong punishment: a sample's last N tokens before "
                               "generation.max_new_tokens cost its reward up to overlong_penalty, linearly (0 = off; "
                               "OpenRLHF's overlong_buffer_len; rollout/score includes it)", ge=0)
    overlong_penalty: float = arg(1.0, "what a sample of max_new_tokens tokens loses with overlong_buffer "
                                  "(OpenRLHF's overlong_penalty_factor)", ge=0, lt=float("inf"))
    importance_sampling: Literal["token", "sequence"] = arg(
        "token", "the policy ratio: each token's (PPO, GRPO), or one per sample, exp of the mean over its tokens "
        "of log(pi / pi_old), clipped and given to all of them (GSPO, Zheng et al. 2025; TRL's "
        "importance_sampling_level; its paper clips at ε 3e-4 / 4e-4)")
    loss_reduction: Literal["auto", "token_mean", "seq_mean_token_mean", "token_sum_norm"] = arg(
        "auto", "reduction of the token losses; auto = the method's own (grpo: seq_mean_token_mean, dr_grpo: "
        "token_sum_norm, rloo and reinforce_pp: token_mean, or seq_mean_token_mean with importance_sampling "
        "sequence)")
    eval_prompts: str = arg("", "held-out prompts: mean of each reward (one sample each) every train.eval_every "
                            "steps and at the end")
    columns: dict[str, str] = columns_arg()
    model: ModelConfig = arg(ModelConfig, "the SFT model: the policy starts here and the reference stays here")
    lora: LoraConfig = arg(LoraConfig(enabled=True, target_modules="all-linear+head"),
                           "the policy's adapter (the reference is the base with adapters off); enabled false: "
                           "the full model is trained, a frozen copy is the reference (loaded only with a KL term)")
    optim: OptimConfig = arg(OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"), "policy optimiser")
    generation: GenerationConfig = arg(GenerationConfig, "sampling (temperature 1, no top-k/top-p by default)")
    train: TrainConfig = arg(TrainConfig(out="runs/online", max_steps=50, log_every=1), "loop; max_steps = RL steps")

    def __post_init__(self) -> None:
        check_rollout_train(self.train, "prompts_per_step x group_size samples, learned from in mini_batch_size "
                            "updates, epochs times")
        if self.baseline != "batch" and self.advantage != "reinforce_pp":
            raise ValueError(f"baseline picks REINFORCE++'s; {self.advantage}'s is its group's, always")
        grouped = self.advantage != "reinforce_pp" or self.baseline == "group"  # else the whole batch's
        if grouped and self.group_size < 2:
            name = "reinforce_pp with baseline group" if self.advantage == "reinforce_pp" else self.advantage
            raise ValueError(f"{name} needs group_size >= 2: its baseline is the other samples of the prompt, and "
                             "with one sample every advantage is 0 (nothing would be learned)")
        if self.kl_estimator != "k1" and self.advantage != "reinforce_pp":
            raise ValueError(f"kl_estimator picks REINFORCE++'s KL in the token rewards; {self.advantage}'s KL term "
                             "(kl_coef) is GRPO's k3 estimator, in the loss")
        if self.scale_rewards != "group" and self.advantage != "grpo":
            raise ValueError(f"scale_rewards is read by advantage grpo; {self.advantage}'s advantage " + {
                "dr_grpo": "is never scaled (it is grpo with scale_rewards none and its own reduction)",
                "rloo": "is not scaled", "reinforce_pp": "is whitened over the whole batch"}[self.advantage])
        if self.overlong_buffer > self.generation.max_new_tokens:
            raise ValueError(f"overlong_buffer {self.overlong_buffer} is longer than generation.max_new_tokens "
                             f"{self.generation.max_new_tokens}: the penalty would start before the first token")
        if self.beta and self.advantage != "reinforce_pp":  # its advantages read each sample's reward alone
            raise ValueError(f"beta shapes REINFORCE++'s token rewards; {self.advantage} would ignore it: for a KL "
                             "penalty set kl_coef (a k3 KL-to-reference term in the loss)")


# each advantage estimator's command: one given to another command's --advantage points there
_COMMANDS = {"grpo": "rlhfkit grpo", "dr_grpo": "rlhfkit grpo --advantage dr_grpo", "rloo": "rlhfkit rloo",
             "reinforce_pp": "rlhfkit reinforce-pp"}


def _elsewhere(*own: str) -> dict[str, str]:
    return {name: f"{name} runs as `{command}`" for name, command in _COMMANDS.items()
            if name not in own}


@dataclass
class GRPOConfig(OnlineConfig):
    """`rlhfkit grpo`: GRPO (group-normalised advantages) or Dr. GRPO (advantage dr_grpo)."""

    advantage: Literal["grpo", "dr_grpo"] = arg("grpo", "grpo: (r − mean)/std in the group; dr_grpo: r − mean, "
                                                "token losses summed / (max_new_tokens × samples)",
                                                elsewhere=_elsewhere("grpo", "dr_grpo"))


@dataclass
class RLOOConfig(OnlineConfig):
    """`rlhfkit rloo`: REINFORCE leave-one-out, clipped like PPO."""

    advantage: Literal["rloo"] = arg("rloo", "rloo: r − mean of the other samples of the prompt",
                                     elsewhere=_elsewhere("rloo"))


@dataclass
class ReinforcePPConfig(OnlineConfig):
    """`rlhfkit reinforce-pp`: REINFORCE++, KL-shaped token rewards and batch-whitened returns."""

    advantage: Literal["reinforce_pp"] = arg("reinforce_pp", "reinforce_pp: whitened reward-to-go of KL-shaped "
                                             "token rewards", elsewhere=_elsewhere("reinforce_pp"))
    beta: float = arg(0.01, "KL coefficient β in the token rewards r_t = −β·kl_t (+ reward at the last token)",
                      ge=0)


# --------------------------------------------------------------------------- strategies
# Each maps a step's experience and the run's config (its group size; GRPO's scale_rewards) to token advantages
# (B, A), 0 outside the mask. exp.scores (B,) is the
# summed reward per sample; exp.rewards (B, A) PPO's shaped token rewards −β·kl_t + score at the last token.


def _per_sequence(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages broadcast over the response tokens: (B, A)."""
    return advantages[:, None] * action_mask


def grpo_advantages(exp: Experience, cfg: OnlineConfig) -> torch.Tensor:
    return _per_sequence(group_advantages(exp.scores, cfg.group_size, scale=cfg.scale_rewards), exp.action_mask)


def dr_grpo_advantages(exp: Experience, cfg: OnlineConfig) -> torch.Tensor:
    return _per_sequence(group_advantages(exp.scores, cfg.group_size, scale="none"), exp.action_mask)


def rloo_token_advantages(exp: Experience, cfg: OnlineConfig) -> torch.Tensor:
    return _per_sequence(rloo_advantages(exp.scores, cfg.group_size), exp.action_mask)


def reinforce_pp_advantages(exp: Experience, cfg: OnlineConfig) -> torch.Tensor:
    # G_t = Σ_{s≥t} r_s over the KL-shaped token rewards, whitened over the whole batch (mean not added back);
    # baseline group: the score, at the last token, holds in every G_t (gamma 1): its group's mean comes off each
    returns = reward_to_go(exp.rewards, exp.action_mask, gamma=1.0)
    if cfg.baseline == "group":
        means = exp.scores.view(-1, cfg.group_size).mean(-1).repeat_interleave(cfg.group_size)  # (B,)
        returns = returns - means[:, None] * exp.action_mask
    return masked_whiten(returns, exp.action_mask)


@dataclass(frozen=True)
class Strategy:
    """A method: its token advantages and how its token losses are reduced to one number."""

    advantages: Callable[[Experience, OnlineConfig], torch.Tensor]
    reduction: str


STRATEGIES: dict[str, Strategy] = {
    "grpo": Strategy(grpo_advantages, "seq_mean_token_mean"),
    "dr_grpo": Strategy(dr_grpo_advantages, "token_sum_norm"),
    "rloo": Strategy(rloo_token_advantages, "token_mean"),
    "reinforce_pp": Strategy(reinforce_pp_advantages, "token_mean"),
}


# --------------------------------------------------------------------------- rollout, learning, evaluation


def with_every_column(rows: list[dict]) -> list[dict]:
    """Rows holding each column any of them has (None where one lacks it): a reward function gets the same
    keyword arguments at every step, whichever rows the step drew."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return [{k: r.get(k) for k in keys} for r in rows]


def reward_inputs(rows: list[dict], repeat: int) -> tuple[list, dict[str, list]]:
    """Each row's prompt ``repeat`` times in a row (group by group), and every other column laid out alike."""
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    prompts = [r["prompt"] for r in rows for _ in range(repeat)]
    return prompts, {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}


def one_update(cfg: OnlineConfig) -> bool:
    """Whether each step makes a single optimiser update (one epoch, one mini-batch).

    Then the learn pass runs on the weights that sampled, its log-probs are the old log-probs
    (the ratio is 1, its gradient the policy gradient) and the experience maker skips its
    actor pass; the rollout's entropy comes from the learn pass too.
    """
    return cfg.epochs == 1 and cfg.mini_batch_size >= cfg.prompts_per_step * cfg.group_size


def rollout(roles, engine: RolloutEngine, tokenizer, rows: list[dict], reward: CombinedReward, cfg: OnlineConfig,
            seed: int, log_samples: Callable[[list[dict]], None] | None = None) -> tuple[Experience, dict[str, float]]:
    """G samples of each row's prompt, group by group, through PPO's experience maker. ``log_samples`` is handed
    the first ``cfg.log_samples`` with their rewards (``loop.sample_records``)."""
    G = cfg.group_size
    # each process samples its share of the rows (whole groups), every sample with its own seed
    span = distributed.shard_range(len(rows))
    prompts, columns = reward_inputs(rows[span.start: span.stop], G)
    seeds = prompt_seeds(seed, len(rows) * G)[span.start * G: span.stop * G]
    parts: dict[str, torch.Tensor] = {}

    def score_fn(prompts: list, texts: list[str]) -> torch.Tensor:
        total, values = reward(prompts, texts, columns)
        parts.update(values)
        return total

    # one update needs no old log-probs (ratio 1), unless a KL penalty in the rewards (REINFORCE++'s β) needs them
    with roles.amp():
        exp, stats = make_experience(roles, tokenizer, prompts, score_fn, cfg.generation, engine=engine,
                                     beta=cfg.beta, kl_estimator=cfg.kl_estimator, reward_clip=None,
                                     missing_eos_penalty=cfg.missing_eos_penalty, seeds=seeds,
                                     overlong_buffer=cfg.overlong_buffer, overlong_penalty=cfg.overlong_penalty,
                                     old_logprobs="none" if one_update(cfg) and not cfg.beta else "rollout",
                                     reference=bool(cfg.kl_coef or cfg.beta), values=False)  # no critic
    if log_samples:
        log_samples(sample_records(stats.prompts, stats.texts, cfg.log_samples, reward=exp.scores.tolist(),
                                   **{f"reward/{k}": v.tolist() for k, v in parts.items()}, ended=exp.ended.tolist()))
    grouped = exp.scores.view(-1, G)  # (P, G)
    # each a mean over this process's rows (groups: G rows each), entropy's over tokens; a reward's over the
    # completions it applies to (None elsewhere), left out of the log when it applied to none
    sums = {}
    add_metrics(sums, {**stats.weighted(), **{f"reward/{k}": (v.nanmean().item(), (~v.isnan()).sum().item())
                                              for k, v in parts.items()}}, 0)
    add_metrics(sums, {"rollout/score_std_in_group": grouped.std(-1).mean().item() if G > 1 else 0.0,
                       "rollout/flat_groups": (grouped == grouped[:, :1]).all(-1).float().mean().item()}, len(exp))
    return exp.gather(tokenizer.pad_token_id), metric_means(sums, exp.input_ids.device)


def learned_mask(exp: Experience, mask_truncated: bool) -> torch.Tensor:
    """(B, A) the response tokens the loss reads: all of them, or with ``mask_truncated`` those of the samples
    that ended (DAPO's overlong filtering)."""
    return exp.action_mask * exp.ended[:, None] if mask_truncated else exp.action_mask


def loss_reduction(cfg: OnlineConfig) -> str:
    """How the token losses reduce: ``cfg.loss_reduction``, or under auto the method's own, except that sequence-
    level ratios (GSPO) average over samples (its paper's eq. 5): a token mean would weigh each sample's one ratio
    by its length."""
    if cfg.loss_reduction != "auto":
        return cfg.loss_reduction
    if cfg.importance_sampling == "sequence" and STRATEGIES[cfg.advantage].reduction == "token_mean":
        return "seq_mean_token_mean"
    return STRATEGIES[cfg.advantage].reduction


def learn(roles, exp: Experience, cfg: OnlineConfig, reduction: str, optimizer, generator: torch.Generator,
          nonfinite: NonFinite, step: int) -> dict[str, float]:
    """``epochs`` passes of shuffled mini-batches: clipped policy loss (+ k3 KL term); mean metrics. Each
    process's share of a mini-batch is learned from in micro-batches of ``micro_batch_size`` samples, their
    gradients added up before the one update.

    A non-finite loss or gradient stops the run or skips that mini-batch (``train.on_nan``).
    """
    records: list[dict[str, float]] = []
    temperature = cfg.generation.logprob_temperature
    learned = learned_mask(exp, cfg.mask_truncated)  # (B, A) the tokens the loss reads
    roles.learn_mode()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(exp), generator=generator).split(cfg.mini_batch_size):
            idx = idx.to(exp.input_ids.device)
            mine = distributed.shard(idx)
            share, share_mask = exp[mine], learned[mine]  # this process's share of the mini-batch (all with one)
            whole = learned[idx]
            units, tokens = max(reduction_units(reduction, whole), 1.0), max(float(whole.sum()), 1.0)
            sampled = max(float(exp.action_mask[idx].sum()), 1.0)  # every response token: the rollout's metrics
            splits = distributed.micro_splits(len(share), len(idx), cfg.micro_batch_size)
            loss_sum, stats = 0.0, defaultdict(float)
            for j, (rows, real) in enumerate(splits):
                mb = share[rows].trimmed()  # at its own longest row, not the buffer's
                mask = share_mask[rows][:, : mb.action_mask.shape[1]]
                on_policy = mb.old_logprobs is None  # the experience maker left the old log-probs to this pass
                # the entropy with gradient for the bonus, or without for the rollout's metric (no graph kept)
                entropy_kind = "grad" if cfg.entropy_coef else "detached" if on_policy else "none"
                with roles.amp():  # forwards only (bf16 mixed precision on GPUs); the backward runs outside
                    out = roles.actor_logprobs(mb.batch(), temperature=temperature, entropy=entropy_kind)
                logprobs, token_entropy = (out, None) if entropy_kind == "none" else out  # (B, A) each
                del out
                old_logprobs = logprobs.detach() if on_policy else mb.old_logprobs
                # Dr. GRPO divides the token sum by a constant: max_new_tokens × samples in the mini-batch
                reduce = dict(reduction=reduction, norm_constant=cfg.generation.max_new_tokens * len(mb))
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, mb.advantages, mask, cfg.clip_eps,
                                                clip_eps_high=cfg.clip_eps_high, level=cfg.importance_sampling,
                                                **reduce)
                # the KL term reduced as the policy term is (GRPO's β·KL sits inside the same average)
                kl_loss = (kl_penalty_loss(logprobs, mb.ref_logprobs, mask, **reduce)
                           if mb.ref_logprobs is not None else logprobs.new_zeros(()))
                entropy_loss = (entropy_bonus_loss(token_entropy, mask, **reduce) if cfg.entropy_coef
                                else logprobs.new_zeros(()))
                # each term weighted by this micro-batch's share of the mini-batch's units (a spare one: 0):
                # summed over micro-batches and processes, the mini-batch's loss
                pg_share = reduction_units(reduction, mask) / units if real else 0.0
                token_share = float(mask.sum()) / tokens if real else 0.0
                if on_policy:  # the rollout's entropy, over every sampled token (truncated samples' too)
                    entropy = masked_mean(token_entropy.detach(), mb.action_mask).item()
                    stats["rollout/entropy"] += entropy * float(mb.action_mask.sum()) / sampled if real else 0.0
                    if mb.ref_logprobs is not None:  # on-policy this pass is the sampling policy: its KL to the
                        kl = rollout_kl(logprobs.detach(), mb.ref_logprobs, mb.action_mask)  # reference, per sequence
                        stats["rollout/kl"] += kl * len(mb) / len(idx) if real else 0.0
                # DeepSpeed's backward where an engine steps the optimiser (which then reduces the gradients); a
                # non-finite loss is back-propagated too (its gradients are dropped below): collective when sharded
                loss = pg_loss + cfg.kl_coef * kl_loss + cfg.entropy_coef * entropy_loss
                zero.backward(optimizer[0], loss * pg_share, last=j == len(splits) - 1)
                loss_sum += (pg_loss + kl_loss + entropy_loss).item() * pg_share  # a spare micro-batch's NaN: NaN
                for k, v in {"loss/policy": pg_loss.item() * pg_share, "loss/kl": kl_loss.item() * pg_share,
                             **({"loss/entropy": entropy_loss.item() * pg_share} if cfg.entropy_coef else {}),
                             **{f"policy/{k}": float(v) * token_share for k, v in pg_stats.items()}}.items():
                    stats[k] += v
            if not whole.any():  # every sample cut off (mask_truncated): no update (AdamW's moments would still
                zero.drop_gradients(optimizer[0])  # move the weights), only the rollout's metrics; the same in
                rollout = {k: v for k, v in stats.items() if k.startswith("rollout/")}  # every process
                if rollout:
                    records.append(distributed.sum_over_processes(rollout, whole.device))
                continue
            if not nonfinite.ok("loss", distributed.all_sum([loss_sum], whole.device)[0], step):
                zero.drop_gradients(optimizer[0])
                continue
            if not zero.engine_of(optimizer[0]):
                distributed.average_gradients(roles.actor_parameters(), 1.0)  # the sum over processes
            grad_norm = optimizer_step(*optimizer, cfg.optim.max_grad_norm)  # applies nothing when non-finite
            if not nonfinite.ok("gradient norm", grad_norm, step):
                continue
            # over the whole mini-batch: each shard's figures weighted by its share (the norm is global already)
            stats["grad_norm"] = grad_norm * float(share_mask.sum()) / tokens
            records.append(distributed.sum_over_processes(dict(stats), whole.device))
    return mean_of(records)


@torch.no_grad()
def sample_rewards(model, tokenizer, rows: list[dict], reward: CombinedReward, gen: GenerationConfig, seed: int,
                   progress: bool = False) -> tuple[list, Generations, torch.Tensor, dict[str, torch.Tensor]]:
    """One sample per prompt: (prompts, the samples (``Generations``), summed reward (N,), {reward name: (N,)
    values, NaN where it does not apply})."""
    prompts, columns = reward_inputs(rows, 1)
    gens = generate(model, tokenizer, prompts, gen, seed=seed, progress=progress)
    return prompts, gens, *reward(prompts, gens.texts, columns)


def evaluate_rewards(model, tokenizer, rows: list[dict], reward: CombinedReward, gen: GenerationConfig,
                     seed: int) -> dict[str, float]:
    """One sample per held-out prompt; mean ± stderr of the summed reward and of each reward."""
    return reward_figures(*sample_rewards(model, tokenizer, rows, reward, gen, seed)[2:])


def reward_figures(total: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """``eval/reward`` and ``eval/reward/NAME``, each with its ``_stderr``: means over the completions each
    applies to."""
    out = {}
    for name, values in {"reward": total, **{f"reward/{k}": v for k, v in parts.items()}}.items():
        applied = values[~values.isnan()].tolist()  # a reward's None: not its completion to score
        if applied:
            out[f"eval/{name}"], out[f"eval/{name}_stderr"] = mean_stderr(applied)
    return out


@releases_out_dir
def train(cfg: OnlineConfig, reward: CombinedReward | None = None) -> dict[str, float]:
    """Run the method ``cfg.advantage``; the policy (an adapter, or the full model with lora.enabled false)
    lands in ``cfg.train.out``.

    ``reward`` replaces the rewards named in the config (any CombinedReward).
    """
    rows = load_prompts(cfg.prompts, cfg.columns)
    eval_rows = load_prompts(cfg.eval_prompts, cfg.columns) if cfg.eval_prompts else []
    file_rows, file_eval_rows = rows, eval_rows
    strategy = STRATEGIES[cfg.advantage]
    reduction = loss_reduction(cfg)
    sharding = fsdp.mode_for_rollouts(cfg.train.fsdp, prompts_per_step=cfg.prompts_per_step,
                                      mini_batch_size=cfg.mini_batch_size)
    stage = zero.rollout_stage(cfg.train.deepspeed, sharding, not cfg.lora.enabled,  # ZeRO, the full policy only
                               f"{cfg.advantage} with a LoRA policy trains a small adapter: launch it with replicas "
                               "(docs/distributed.md), or train the full model (--lora.enabled false)")
    room = prompt_room(cfg.model, cfg.generation.max_new_tokens)  # before the run directory is made
    out, device, tokenizer = start_run(cfg)
    rows = drop_long_prompts(rows, tokenizer, cfg.generation.max_prompt_length, cfg.prompts, room=room)
    eval_rows = drop_long_prompts(eval_rows, tokenizer, 0, cfg.eval_prompts, room=room) if eval_rows else []
    per_step = min(len(rows), cfg.prompts_per_step)  # a step's prompts: the whole file when it holds fewer
    distributed.check_shares(per_step * cfg.group_size, cfg.mini_batch_size, cfg.prompts, len(rows),
                             prompts_per_step=per_step)
    cfg = dataclasses.replace(cfg, prompts_per_step=per_step)  # what a step holds: the schedule counts its updates
    reward = reward or build_reward(cfg.rewards, cfg.reward_weights, device)
    rows, eval_rows = with_every_column(rows), with_every_column(eval_rows)
    reward.check_columns(rows[0], cfg.prompts)  # before anything is sampled
    reward.check_rows(file_rows, cfg.prompts)  # each row, counted as in the file (before long prompts are dropped)
    if eval_rows:
        reward.check_columns(eval_rows[0], cfg.eval_prompts)
        reward.check_rows(file_eval_rows, cfg.eval_prompts)
    roles = (SharedBaseRoles(cfg.model, cfg.lora, device, critic=False, logits_chunk=cfg.logits_chunk)
             if cfg.lora.enabled else SeparateRoles(cfg.model, None, device, reference=bool(cfg.kl_coef or cfg.beta),
                                                    logits_chunk=cfg.logits_chunk))
    if cfg.train.gradient_checkpointing:
        roles.checkpoint_activations()
    roles.shard(sharding)  # FSDP: the policy (a base and its adapter) split over the processes, before the optimiser
    steps = cfg.train.max_steps
    samples = cfg.prompts_per_step * cfg.group_size
    updates = steps * cfg.epochs * -(-samples // cfg.mini_batch_size)  # the schedule counts updates
    optimizer = build_optimizer(roles.actor_parameters(), cfg.optim, updates)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    # prompts and sampling seeds are functions of the step: the adapter, the optimiser and the
    # mini-batch shuffling generator are all a checkpoint needs to resume exactly
    checkpoints = Checkpoints(cfg.train, roles, {"policy": optimizer},
                              extra=lambda: {"generator": generator.get_state()},
                              save_weights=lambda path: roles.save(path, tokenizer))
    start, extra = checkpoints.resume()  # into the plain model and optimiser: a DeepSpeed engine adopts them
    if extra:
        generator.set_state(extra["generator"])
    if stage:
        roles.partition(stage, optimizer[0], None, cfg.mini_batch_size, cfg.optim.max_grad_norm)
    nonfinite = NonFinite(cfg.train.on_nan, checkpoints)
    engine = HFRolloutEngine(roles.generation_model(), tokenizer, cfg.generation, cfg.generation.backend)

    logger = Logger.of_run(out, cfg)

    def step_fn(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        # 1. experience: G samples per prompt, laid out group by group
        batch_rows = [rows[i] for i in batch_indices(step, len(rows), cfg.prompts_per_step, cfg.train.seed)]
        exp, metrics = rollout(roles, engine, tokenizer, batch_rows, reward, cfg, seed=cfg.train.seed * 7919 + step,
                               log_samples=lambda records: logger.samples(step + 1, records))
        # 2. advantages: the method's strategy, over the whole step's batch
        # (mask_truncated: a cut-off sample stays in its group's baseline, as in TRL, but not in REINFORCE++'s
        # batch whitening, whose statistics its tokens would swamp; either way the loss leaves it out)
        kept = cfg.mask_truncated and cfg.advantage == "reinforce_pp"
        exp.advantages = strategy.advantages(dataclasses.replace(exp, action_mask=learned_mask(exp, True))
                                             if kept else exp, cfg)
        metrics["rollout/advantage_abs_mean"] = masked_mean(exp.advantages.abs(),
                                                            learned_mask(exp, cfg.mask_truncated)).item()
        # 3. learn: epochs × shuffled mini-batches, clipped policy loss (+ k3 KL)
        t1 = time.perf_counter()
        metrics.update(learn(roles, exp, cfg, reduction, optimizer, generator, nonfinite, step + 1))
        engine.update_weights(roles.generation_model())  # a no-op for the HF engine (shared module)
        seconds = time.perf_counter() - t0
        metrics.update({"time/learn": time.perf_counter() - t1, "time/step": seconds,
                        "time/tokens_per_s": exp.attention_mask.sum().item() / seconds,
                        "train/skipped_updates": nonfinite.skipped, "train/lr": optimizer[1].get_last_lr()[0]})
        return metrics

    def evaluate() -> dict[str, float]:  # on process 0; a sharded policy gathered by every process around it
        return evaluate_on_main(lambda model: evaluate_rewards(model, tokenizer, eval_rows, reward, cfg.generation,
                                                               cfg.train.seed), roles.generation_model(), roles.amp)

    return rollout_steps(cfg.train, cfg.advantage, start, step_fn, checkpoints, logger,
                         save=lambda: roles.save(out, tokenizer), evaluate=evaluate if eval_rows else None,
                         postfix=lambda m: {"reward": f"{m['rollout/score']:.3f}",
                                            **({"kl": f"{m['rollout/kl']:.2f}"} if "rollout/kl" in m else {})})
