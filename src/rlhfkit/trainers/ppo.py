"""PPO with the four roles: actor, reference, critic, reward (seeds 000–002, DESIGN.md §2–3).

Each step: a rollout batch of prompts → experience (sample, old/ref log-probs, values,
proxy score, shaped rewards, GAE) → whitened advantages over the buffer → ``ppo_epochs``
passes over shuffled mini-batches: clipped policy loss + clipped value loss → step →
adapt β → log. The KL penalty sits in the reward, so the loss has no KL term (seed 000).
Models run in eval mode throughout (no dropout), so old and new log-probs agree before
the first update. With one epoch of one mini-batch (``one_update``) the critic has not moved
when learning starts, so its learn forward gives GAE's values and no separate pass runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from rlhfkit import distributed, fsdp, zero
from rlhfkit.advantages import AdaptiveKLController, FixedKLController, gae, masked_mean, masked_var, masked_whiten
from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, arg, columns_arg
from rlhfkit.data.collate import drop_long_prompts
from rlhfkit.data.formats import load_prompts
from rlhfkit.losses import entropy_bonus_loss, policy_loss, value_loss
from rlhfkit.models.forward import ROLLOUT_LOGITS_CHUNK_HELP
from rlhfkit.models.load import check_same_tokenizer, is_adapter_dir, prompt_room
from rlhfkit.models.reward import RewardModel, check_reward_dir
from rlhfkit.models.roles import RewardAdapterScores, SeparateRoles, SharedBaseRoles
from rlhfkit.ops import mean_of, mean_stderr
from rlhfkit.rollout.engine import HFRolloutEngine, RolloutEngine
from rlhfkit.rollout.experience import Experience, ScoreFn, make_experience, score_generations
from rlhfkit.rollout.generate import generate
from rlhfkit.rollout.sampling import prompt_seeds
from rlhfkit.trainers.checkpoint import Checkpoints, NonFinite
from rlhfkit.trainers.loop import (ROLLOUT_TRAIN_HELP, Logger, add_metrics, batch_indices, build_optimizer,
                                   check_rollout_train, clip_gradients, evaluate_on_main, metric_means,
                                   optimizer_step, releases_out_dir, rollout_steps, sample_records, start_run,
                                   take_step)


@dataclass
class PPOConfig:
    """`rlhfkit ppo`: optimise the SFT model against a reward model, leashed to it by a KL penalty."""

    HELP = ROLLOUT_TRAIN_HELP  # the training loop's section, shared with the supervised trainers: what it reads

    prompts: str = arg("", "prompts file (a `prompt` column)")
    reward_model: str = arg("", "reward-model directory (from `rlhfkit rm`); in shared mode a LoRA reward model "
                            "trained on the same base becomes a third adapter on it")
    mode: Literal["shared", "separate"] = arg("shared", "shared: one base + LoRA actor/critic, reference = "
                                              "adapters off; separate: full actor, reference and critic models")
    critic_init: Literal["reward", "sft"] = arg("reward", "separate mode: critic starts from the reward model or "
                                                "the SFT model")
    rollout_batch_size: int = arg(64, "prompts sampled per rollout batch", ge=1)
    rollouts_per_step: int = arg(1, "rollout batches collected into the buffer before learning", ge=1)
    mini_batch_size: int = arg(16, "rollouts per optimiser step", ge=1)
    micro_batch_size: int = arg(0, "rollouts per forward and backward in each process, gradients added up over a "
                                "mini-batch (OpenRLHF's micro_train_batch_size; 0 = a process's whole share)", ge=0)
    ppo_epochs: int = arg(2, "passes over the buffer per step", ge=1)
    beta: float = arg(0.1, "KL penalty coefficient β in r_t = −β·kl_t", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = arg("k1", "per-token KL estimator in the reward")
    adaptive_kl: bool = arg(False, "adapt β towards kl_target (Ziegler et al. 2019)")
    kl_target: float = arg(6.0, "adaptive KL: target per-sequence KL", gt=0)
    kl_horizon: int = arg(10000, "adaptive KL: horizon in episodes", ge=1)
    reward_clip: float | None = arg(5.0, "clip the proxy score to ±this before adding it, the missing-EOS and "
                                    "overlong penalties after (none = no clipping)", gt=0)
    missing_eos_penalty: float | None = arg(None, "subtracted from the score of responses that never emit EOS "
                                            "(as TRL's)", ge=0, lt=float("inf"))
    gamma: float = arg(1.0, "GAE discount γ", ge=0, le=1)
    lam: float = arg(0.95, "GAE λ", ge=0, le=1)
    log_samples: int = arg(4, "sampled completions written to OUT/samples.jsonl each step with their rewards "
                           "(the step's first ones, over every process; 0 = none)", ge=0)
    clip_eps: float = arg(0.2, "policy ratio clip ε", gt=0)
    clip_eps_high: float | None = arg(None, "upper ratio clip 1 + ε_high (DAPO's clip-higher, e.g. 0.28 beside ε "
                                      "0.2; none = clip_eps)", gt=0)
    value_clip_eps: float = arg(0.2, "value clip ε_v", gt=0)
    vf_coef: float = arg(0.5, "weight of the value loss (in the logged loss and the critic's gradient; the critic has "
                         "an Adam of its own, which undoes a constant scale: it moves the critic's step only where "
                         "its gradient norm meets optim.max_grad_norm)", ge=0)
    entropy_coef: float = arg(0.0, "weight of an entropy bonus: minus the actor's entropy at each response token, "
                              "a token mean as the policy loss, added to it (OpenRLHF's entropy_loss_coef; 0 = none; "
                              "loss/policy includes it, policy/entropy logs the entropy; its backward keeps "
                              "softmax-sized tensors over the whole vocabulary unless logits_chunk is set)",
                              ge=0, lt=float("inf"))
    logits_chunk: int = arg(0, ROLLOUT_LOGITS_CHUNK_HELP, ge=0)
    critic_in_learn: bool = arg(True, "one epoch of one mini-batch: GAE's values from the critic's learn forward, "
                                "not a separate no-grad pass (the same numbers, one pass fewer)")
    critic_lr: float = arg(0.0, "critic learning rate; 0 = the actor's (optim.lr)", ge=0)
    target_kl: float | None = arg(None, "stop a step's remaining updates once a mini-batch's approx-KL to the "
                                        "rollout policy, before its update, exceeds 1.5 × this (None: never)")
    eval_prompts: str = arg("", "held-out prompts, one sample each scored by the reward model (eval/score; with "
                            "--task describe the gold reward instead), every train.eval_every steps and at the end")
    columns: dict[str, str] = columns_arg()
    task: Literal["none", "describe"] = arg("none", "built-in task whose gold reward is reported (evaluation only; "
                                            "never a training signal)")
    model: ModelConfig = arg(ModelConfig, "the SFT model: actor and reference start here")
    # the output head is adapted too: on the built-in task the actor learns several times faster with it
    lora: LoraConfig = arg(LoraConfig(enabled=True, target_modules="all-linear+head"),
                           "adapters for actor and critic in shared mode")
    optim: OptimConfig = arg(OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"), "actor optimiser")
    generation: GenerationConfig = arg(GenerationConfig, "sampling (temperature 1, no top-k/top-p by default)")
    train: TrainConfig = arg(TrainConfig(out="runs/ppo", max_steps=50, log_every=1), "loop; max_steps = PPO steps")

    def __post_init__(self) -> None:
        check_rollout_train(self.train, "rollout_batch_size x rollouts_per_step samples, learned from in "
                            "mini_batch_size updates, ppo_epochs times")
        if self.mode == "shared" and not self.lora.enabled:  # it would train adapters all the same
            raise ValueError("mode shared trains LoRA adapters for the actor and the critic on one base: to train "
                             "every weight set --mode separate")
        if self.adaptive_kl and self.beta == 0:
            raise ValueError("adaptive_kl multiplies beta towards kl_target, and from 0 it stays 0: set --beta above "
                             "0 (its starting value)")


def one_update(cfg: PPOConfig) -> bool:
    """Whether each step makes a single update from critic values its learn forward gives (``learn_once``)."""
    buffer = cfg.rollout_batch_size * cfg.rollouts_per_step
    share = len(distributed.shard_range(buffer, index=0))  # a process's rows, at most (process 0 has the most)
    return (cfg.critic_in_learn and cfg.ppo_epochs == 1 and cfg.mini_batch_size >= buffer
            and not 0 < cfg.micro_batch_size < share)  # its advantages are whitened over the whole share at once


def learn(roles, buffer: Experience, cfg: PPOConfig, actor_opt, critic_opt, generator: torch.Generator,
          nonfinite: NonFinite, step: int) -> dict:
    """``ppo_epochs`` passes of shuffled mini-batches over ``buffer``; returns mean metrics. Each process's share
    of a mini-batch is learned from in micro-batches of ``micro_batch_size`` rollouts, the actor's first, then
    the critic's (one graph alive at a time), gradients added up before the update.

    A non-finite loss or gradient stops the run or skips that mini-batch (``train.on_nan``). With
    ``target_kl``, a mini-batch whose approx-KL to the rollout policy exceeds 1.5 × ``target_kl``
    before its update ends the step's learning there, its gradients dropped (Stable-Baselines3's rule);
    the metrics then say so (``policy/early_stop``, ``policy/updates``). ``learn_once`` has one update, from
    the rollout policy itself: nothing to stop.
    """
    records: list[dict[str, float]] = []
    stopped = False
    roles.learn_mode()
    # each epoch's shuffle drawn when the epoch starts, as nested loops would draw it
    batches = (idx for _ in range(cfg.ppo_epochs)
               for idx in torch.randperm(len(buffer), generator=generator).split(cfg.mini_batch_size))
    for idx in batches:
        idx = idx.to(buffer.input_ids.device)
        mine = buffer[distributed.shard(idx)]  # this process's share of the mini-batch (all of it with one)
        tokens = max(float(buffer.action_mask[idx].sum()), 1.0)
        # both losses are token means: each micro-batch's weighted by its share of the mini-batch's tokens (a
        # spare one: 0), they sum over micro-batches and processes to the loss of the whole mini-batch; each runs
        # at its own longest row (``trimmed``), not the buffer's
        parts = [(mine[rows].trimmed(), float(mine[rows].action_mask.sum()) / tokens if real else 0.0)
                 for rows, real in distributed.micro_splits(len(mine), len(idx), cfg.micro_batch_size)]
        # actor and critic share no trainable parameter, so each loss back-propagates on its own, the
        # gradients those of (pg_loss + vf_coef · vf_loss) · share: the actor's graphs (one forward's
        # activations at a time) are freed before the critic's forwards, not held beside them
        pg_loss, pg_stats = _backward_each(parts, actor_opt[0], lambda mb: actor_loss(
            roles, mb.batch(), mb.old_logprobs, mb.advantages, cfg), roles.amp)
        share = sum(s for _, s in parts)  # this process's share of the mini-batch's tokens
        if cfg.target_kl is not None:  # the policy has moved far enough this step (over every process's share)
            moved = distributed.all_sum([pg_stats["approx_kl"] * share], pg_loss.device)[0]
            if moved > 1.5 * cfg.target_kl:
                stopped = True
                zero.drop_gradients(actor_opt[0])
                break
        vf_loss, vf_stats = _backward_each(parts, critic_opt[0], lambda mb: value_loss(
            roles.critic_values(mb.batch()), mb.old_values, mb.returns, mb.action_mask, cfg.value_clip_eps),
            roles.amp, scale=cfg.vf_coef)
        stats = apply_update(roles, pg_loss, pg_stats, vf_loss, vf_stats, cfg, actor_opt, critic_opt, nonfinite,
                             step, share)
        if stats is not None:
            records.append(stats)
    learned = mean_of(records)
    if cfg.target_kl is not None:
        learned.update({"policy/early_stop": float(stopped), "policy/updates": float(len(records))})
    return learned


def actor_loss(roles, batch: dict[str, torch.Tensor], old_logprobs: torch.Tensor, advantages: torch.Tensor,
               cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor's loss on ``batch`` (B, A response tokens): the clipped policy loss, plus ``entropy_coef`` x the
    entropy bonus (``losses.entropy_bonus_loss``, a token mean) when set, the token-mean entropy then among the
    stats (``policy/entropy``)."""
    mask = batch["action_mask"]
    out = roles.actor_logprobs(batch, temperature=cfg.generation.logprob_temperature,
                               entropy="grad" if cfg.entropy_coef else "none")
    logprobs, entropy = out if cfg.entropy_coef else (out, None)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_eps, clip_eps_high=cfg.clip_eps_high)
    if entropy is None:
        return loss, stats
    bonus = entropy_bonus_loss(entropy, mask)
    return loss + cfg.entropy_coef * bonus, {**stats, "entropy": -bonus.detach()}


def _backward_each(parts: list[tuple[Experience, float]], optimizer, loss_of, amp, scale: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """For each (micro-batch, share) of ``parts``: ``loss_of(mb)`` (its forwards under ``amp``) → (loss, stats),
    and the backward of ``scale`` · loss · share (DeepSpeed's where an engine steps ``optimizer``: the reduction
    completed after the last). Returns the loss (detached) and the stats over this process's share: the
    micro-batches' means weighted by their shares."""
    total, stats = None, defaultdict(float)
    for j, (mb, share) in enumerate(parts):
        with amp():  # forwards only (bf16 mixed precision on GPUs); the backward runs outside
            loss, figures = loss_of(mb)
        zero.backward(optimizer, scale * loss * share, last=j == len(parts) - 1)
        total = loss.detach() * share if total is None else total + loss.detach() * share
        for k, v in figures.items():
            stats[k] += float(v) * share
    weight = sum(s for _, s in parts) or 1.0  # this process's share (none: the sums, zeros)
    return total / weight, {k: v / weight for k, v in stats.items()}


def learn_once(roles, buffer: Experience, cfg: PPOConfig, actor_opt, critic_opt, generator: torch.Generator,
               nonfinite: NonFinite, step: int) -> dict:
    """One epoch of one mini-batch (``one_update``), GAE's values taken from the critic's learn forward.

    The critic has not moved since sampling, so its learn forward gives the values a no-grad pass
    would: they are the old values (the value clip is inactive) and, detached, GAE's baseline. The
    advantages are whitened over the whole buffer (every process's share). The value loss
    back-propagates before the actor's forward: one graph alive at a time, as in ``learn``.
    Returns the metrics, explained variance and advantage mean included.
    """
    roles.learn_mode()
    idx = torch.randperm(len(buffer), generator=generator).to(buffer.input_ids.device)  # as ``learn`` draws it
    mb = buffer[distributed.shard(idx)].trimmed()
    share = float(mb.action_mask.sum()) / max(float(buffer.action_mask.sum()), 1.0)
    mask = mb.action_mask.float()
    with roles.amp():  # forwards only (bf16 mixed precision on GPUs); the backward runs outside
        values = roles.critic_values(mb.batch())
    with torch.no_grad():
        old_values = values.detach() * mask
        advantages, returns = gae(mb.rewards, old_values, mask, cfg.gamma, cfg.lam)
        ev = explained_variance(old_values, returns, mask)
        advantages = whiten_over_processes(advantages, mask)
    vf_loss, vf_stats = value_loss(values, old_values, returns, mask, cfg.value_clip_eps)
    zero.backward(critic_opt[0], cfg.vf_coef * vf_loss * share)
    with roles.amp():
        pg_loss, pg_stats = actor_loss(roles, mb.batch(), mb.old_logprobs, advantages, cfg)
    zero.backward(actor_opt[0], pg_loss * share)
    stats = apply_update(roles, pg_loss, pg_stats, vf_loss, vf_stats, cfg, actor_opt, critic_opt, nonfinite, step,
                         share)
    # over every process: the advantage mean exactly (a token mean), the explained variance as a share-weighted
    # mean of each shard's (a ratio of variances: close to, not exactly, the whole batch's)
    spread = distributed.sum_over_processes({"value/explained_variance": ev * share,
                                             "rollout/advantage_mean": masked_mean(advantages, mask).item() * share},
                                            mask.device)
    return {**(stats or {}), **spread}


def apply_update(roles, pg_loss, pg_stats, vf_loss, vf_stats, cfg: PPOConfig, actor_opt, critic_opt,
                 nonfinite: NonFinite, step: int, share: float = 1.0) -> dict[str, float] | None:
    """Sum the back-propagated gradients over processes and step both optimisers; the update's metrics
    over the whole mini-batch (each process's token means weighted by its ``share`` of the tokens),
    or None when a non-finite loss or gradient skipped it. Under DeepSpeed the engines have reduced the
    gradients in the backward already, and step them here."""
    loss = pg_loss.detach() + cfg.vf_coef * vf_loss.detach()
    partitioned = zero.updates_partitions((actor_opt[0], critic_opt[0]))
    if not nonfinite.ok("loss", distributed.all_sum([loss.item()], loss.device)[0], step):
        # both roles drop the step (engines: collective; one role's NaN leaves the other's gradients finite)
        zero.drop_gradients(actor_opt[0]), zero.drop_gradients(critic_opt[0])
        return None
    if not partitioned:
        distributed.average_gradients(roles.actor_parameters() + roles.critic_parameters(), 1.0)  # the sum
    if zero.engine_of(actor_opt[0]) or zero.engine_of(critic_opt[0]):  # an engine clips and steps in one call:
        grad_norm = optimizer_step(*actor_opt, cfg.optim.max_grad_norm)  # each role's non-finite step is its own
        critic_norm = optimizer_step(*critic_opt, cfg.optim.max_grad_norm)
    else:  # both norms first: one role's non-finite gradient skips the update of both, as a non-finite loss does
        grad_norm, critic_norm = (clip_gradients(opt[0], cfg.optim.max_grad_norm) for opt in (actor_opt, critic_opt))
        for opt in (actor_opt, critic_opt):
            take_step(*opt, math.isfinite(grad_norm) and math.isfinite(critic_norm))
    if not (nonfinite.ok("actor gradient norm", grad_norm, step)
            and nonfinite.ok("critic gradient norm", critic_norm, step)):
        return None
    stats = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "grad_norm/actor": grad_norm,
             "grad_norm/critic": critic_norm,
             **{f"policy/{k}": float(v) for k, v in pg_stats.items()},
             **{f"value/{k}": float(v) for k, v in vf_stats.items()}}
    # token means over this shard, weighted by its share: summed, those of the mini-batch (the norm is global)
    return distributed.sum_over_processes({k: v * share for k, v in stats.items()}, pg_loss.device)


def whiten_over_processes(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_whiten`` with the mean and (unbiased) variance of the masked entries of every process's ``x``:
    (B, A) → (B, A), 0 outside the mask. With one process it is ``masked_whiten``."""
    x = torch.where(mask.bool(), x, 0.0)
    total, n = distributed.all_sum([float((x * mask).sum()), float(mask.sum())], x.device)
    mean = total / max(n, 1.0)
    squares = distributed.all_sum([float((((x - mean) ** 2) * mask).sum())], x.device)[0]
    var = squares / max(n, 1.0) * n / max(n - 1, 1.0)
    return torch.where(mask.bool(), (x - mean) * (var + 1e-8) ** -0.5, 0.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over response tokens: how much of the return the critic predicts."""
    var_r = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_r).item() if var_r > 0 else 0.0


def build_roles(cfg: PPOConfig, device: torch.device):
    if cfg.mode == "shared":
        return SharedBaseRoles(cfg.model, cfg.lora, device, logits_chunk=cfg.logits_chunk)
    return SeparateRoles(cfg.model, cfg.reward_model if cfg.critic_init == "reward" else cfg.model.path, device,
                         logits_chunk=cfg.logits_chunk)


def ppo_step(step: int, roles, engine: RolloutEngine, tokenizer, prompts: list, score_fn: ScoreFn, probe, kl_ctl,
             cfg: PPOConfig, actor_opt, critic_opt, generator: torch.Generator, nonfinite: NonFinite,
             log_samples: Callable[[list[dict]], None] | None = None) -> dict[str, float]:
    """One PPO step: experience → whitened advantages → learn → adapt β. Returns its metrics. ``log_samples``
    is handed the first rollout batch's first ``cfg.log_samples`` samples (``loop.sample_records``)."""
    t_step = time.perf_counter()
    # 1. experience: rollouts_per_step batches of prompts into the buffer
    parts, sums = [], {}  # the rollout metrics: each mean weighted by its rows (tokens), over the processes
    for r in range(cfg.rollouts_per_step):
        k = step * cfg.rollouts_per_step + r
        batch_prompts = [prompts[i] for i in batch_indices(k, len(prompts), cfg.rollout_batch_size, cfg.train.seed)]
        # each process samples its share of the batch, every prompt with its own seed: the same samples
        # whatever the number of processes
        seeds = distributed.shard(prompt_seeds(cfg.train.seed * 7919 + k, len(batch_prompts)))
        with roles.amp():
            exp, stats = make_experience(
                roles, tokenizer, distributed.shard(batch_prompts), score_fn, cfg.generation, engine=engine,
                beta=kl_ctl.beta, kl_estimator=cfg.kl_estimator, reward_clip=cfg.reward_clip,
                missing_eos_penalty=cfg.missing_eos_penalty, gamma=cfg.gamma, lam=cfg.lam, seeds=seeds,
                old_logprobs="rollout", values=not one_update(cfg))
        if log_samples and r == 0:
            log_samples(sample_records(stats.prompts, stats.texts, cfg.log_samples, score=exp.scores.tolist(),
                                       ended=exp.ended.tolist()))
        parts.append(exp.gather(tokenizer.pad_token_id))
        add_metrics(sums, stats.weighted(), 0)
        if probe:
            add_metrics(sums, probe(stats.prompts, stats.texts), len(stats.texts))
    buffer = Experience.cat(parts, tokenizer.pad_token_id)  # the whole buffer, in every process
    t0 = time.perf_counter()
    if buffer.advantages is None:  # 2–3. one update: values, advantages and learning in one pass
        learned = learn_once(roles, buffer, cfg, actor_opt, critic_opt, generator, nonfinite, step + 1)
    else:
        # 2. advantages whitened over the whole buffer (mean not added back, DESIGN.md §3)
        buffer.advantages = masked_whiten(buffer.advantages, buffer.action_mask)
        learned = {"value/explained_variance": explained_variance(buffer.old_values, buffer.returns,
                                                                  buffer.action_mask),
                   "rollout/advantage_mean": masked_mean(buffer.advantages, buffer.action_mask).item()}
        # 3. learn: ppo_epochs × shuffled mini-batches; the buffer is dropped afterwards
        learned.update(learn(roles, buffer, cfg, actor_opt, critic_opt, generator, nonfinite, step + 1))
    engine.update_weights(roles.generation_model())  # the HF engine shares the module; vLLM would reload here
    metrics = metric_means(sums, buffer.input_ids.device)
    metrics.update(learned)
    seconds = time.perf_counter() - t_step
    metrics.update({"time/learn": time.perf_counter() - t0, "time/step": seconds,
                    "time/tokens_per_s": buffer.attention_mask.sum().item() / seconds,  # all processes' sequences
                    "train/skipped_updates": nonfinite.skipped, "train/lr": actor_opt[1].get_last_lr()[0],
                    "train/critic_lr": critic_opt[1].get_last_lr()[0]})
    # 4. adapt β from the per-sequence KL averaged over the batch (TRL's form)
    kl_ctl.update(metrics["rollout/kl"], len(buffer))
    return metrics


def score_samples(model, tokenizer, prompts: list, score_fn: ScoreFn, gen: GenerationConfig,
                  seed: int) -> dict[str, float]:
    """One sample per held-out prompt scored as rollouts are (the proxy reward, before clipping and the KL
    penalty): ``eval/score`` and ``eval/score_stderr``."""
    scores = score_generations(score_fn, prompts, generate(model, tokenizer, prompts, gen, seed=seed))
    mean, stderr = mean_stderr(scores.float().tolist())
    return {"eval/score": mean, "eval/score_stderr": stderr}


@releases_out_dir
def train(cfg: PPOConfig, score_fn: ScoreFn | None = None,
          probe: Callable[[list, list[str]], dict[str, float]] | None = None,
          evaluate: Callable[[object, object], dict[str, float]] | None = None) -> dict[str, float]:
    """Run PPO; the actor lands in ``cfg.train.out`` (an adapter in shared mode), the critic in ``out/critic``.

    ``score_fn`` replaces the reward model (any (prompts, texts) → scores function);
    ``probe(prompts, texts)`` adds metrics about each rollout (the quickstart's gold reward);
    ``evaluate(model, tokenizer)`` runs every ``train.eval_every`` steps and at the end; by default, with
    ``cfg.eval_prompts``, ``score_samples`` on them.
    """
    rows = load_prompts(cfg.prompts, cfg.columns)
    eval_rows = load_prompts(cfg.eval_prompts, cfg.columns) if cfg.eval_prompts and evaluate is None else []
    if score_fn is None and not cfg.reward_model:
        raise ValueError("PPO needs a reward: set reward_model (a directory from `rlhfkit rm`)")
    if score_fn is None:
        check_reward_dir(cfg.reward_model)  # before anything is loaded
    sharding = fsdp.mode_for_rollouts(cfg.train.fsdp, rollout_batch_size=cfg.rollout_batch_size,
                                      mini_batch_size=cfg.mini_batch_size)
    stage = zero.rollout_stage(cfg.train.deepspeed, sharding, cfg.mode == "separate",  # ZeRO, full models only
                               "PPO's mode: shared trains two small LoRA adapters on one base: launch it with "
                               "replicas (docs/distributed.md), or set --mode separate")
    room = prompt_room(cfg.model, cfg.generation.max_new_tokens)  # before the run directory is made
    out, device, tokenizer = start_run(cfg)
    if cfg.mode == "separate" and cfg.critic_init == "reward" and cfg.reward_model:
        check_same_tokenizer(tokenizer, cfg.reward_model, "the reward model the critic starts from",
                             "Start the critic from the policy (--critic_init sft), or train the reward model on "
                             "the policy's base", cfg.model.trust_remote_code)
    rows = drop_long_prompts(rows, tokenizer, cfg.generation.max_prompt_length, cfg.prompts, room=room)
    prompts = [r["prompt"] for r in rows]
    eval_prompts = [r["prompt"] for r in drop_long_prompts(eval_rows, tokenizer, 0, cfg.eval_prompts, room=room)
                    ] if eval_rows else []
    batch = min(len(prompts), cfg.rollout_batch_size)  # a rollout batch: the whole file when it holds fewer
    distributed.check_shares(batch * cfg.rollouts_per_step, cfg.mini_batch_size, cfg.prompts, len(prompts),
                             rollout_batch_size=batch)
    cfg = dataclasses.replace(cfg, rollout_batch_size=batch)  # what a step holds: the schedule counts its updates
    roles = build_roles(cfg, device)
    if score_fn is None and cfg.mode == "shared" and is_adapter_dir(cfg.reward_model):
        roles.add_reward_adapter(cfg.reward_model, cfg.model.path)  # the third adapter: no second model in memory
        score_fn = RewardAdapterScores(roles, tokenizer)  # scores the sampled ids themselves
    elif score_fn is None:
        # whole in every process, loaded as the run's models are (model.dtype, trust_remote_code, allow_pickle)
        score_fn = RewardModel.from_pretrained(cfg.reward_model, device, dtype=cfg.model.dtype,
                                               trust_remote_code=cfg.model.trust_remote_code,
                                               allow_pickle=cfg.model.allow_pickle).score
    if evaluate is None and eval_prompts:
        def evaluate(model, tokenizer):
            return score_samples(model, tokenizer, eval_prompts, score_fn, cfg.generation, cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        roles.checkpoint_activations()
    roles.shard(sharding)  # FSDP: the roles' models split over the processes (before the optimisers see them)
    steps = cfg.train.max_steps
    buffer_size = cfg.rollout_batch_size * cfg.rollouts_per_step
    updates = steps * cfg.ppo_epochs * -(-buffer_size // cfg.mini_batch_size)  # the schedule counts updates
    actor_opt = build_optimizer(roles.actor_parameters(), cfg.optim, updates)
    critic_optim = OptimConfig(**{**vars(cfg.optim), "lr": cfg.critic_lr or cfg.optim.lr})
    critic_opt = build_optimizer(roles.critic_parameters(), critic_optim, updates)
    kl_ctl = (AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.beta))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    # a checkpoint holds both adapters (or models) and heads, both optimisers, β and the shuffling generator;
    # prompts and sampling seeds are functions of the step, so nothing else is needed to resume exactly
    checkpoints = Checkpoints(cfg.train, roles, {"actor": actor_opt, "critic": critic_opt},
                              extra=lambda: {"kl_ctl": kl_ctl.state_dict(), "generator": generator.get_state()},
                              save_weights=lambda path: roles.save(path, tokenizer))
    start, extra = checkpoints.resume()  # into the plain models and optimisers: DeepSpeed's engines adopt them
    if extra:
        kl_ctl.load_state_dict(extra["kl_ctl"]), generator.set_state(extra["generator"])
    if stage:
        roles.partition(stage, actor_opt[0], critic_opt[0], cfg.mini_batch_size, cfg.optim.max_grad_norm)
    nonfinite = NonFinite(cfg.train.on_nan, checkpoints)
    engine = HFRolloutEngine(roles.generation_model(), tokenizer, cfg.generation, cfg.generation.backend)
    logger = Logger.of_run(out, cfg)
    return rollout_steps(
        cfg.train, "ppo", start, checkpoints=checkpoints, logger=logger, save=lambda: roles.save(out, tokenizer),
        step_fn=lambda step: ppo_step(step, roles, engine, tokenizer, prompts, score_fn, probe, kl_ctl, cfg, actor_opt,
                                      critic_opt, generator, nonfinite,
                                      log_samples=lambda records: logger.samples(step + 1, records)),
        evaluate=evaluate and (lambda: evaluate_on_main(lambda model: evaluate(model, tokenizer),
                                                        roles.generation_model(), roles.amp)),
        postfix=lambda m: {"score": f"{m['rollout/score']:.3f}", "kl": f"{m['rollout/kl']:.2f}"})
