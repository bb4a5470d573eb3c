"""Making experience: one rollout batch, everything PPO needs recorded (DESIGN.md §3).

sample → cut at EOS → old log-probs (actor: from the sampling loop's own logits for a float32
policy, else a forward), reference log-probs, old values (critic), proxy score (reward model)
→ per-token rewards (−β·kl, clipped score at the last token) → GAE → advantages (whitened
later, over the whole buffer). Shapes: B rollouts, A response tokens, P prompt width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Literal

import torch

from rlhfkit import distributed
from rlhfkit.advantages import approx_kl, gae, masked_mean, per_token_rewards
from rlhfkit.advantages import overlong_penalty as overlong_penalty_of
from rlhfkit.config import GenerationConfig
from rlhfkit.models.forward import join_prompt_response
from rlhfkit.rollout.engine import HFRolloutEngine, RolloutEngine
from rlhfkit.rollout.sampling import prompt_seeds

# (prompts, response texts) → (B,) proxy scores; one with a ``score_ids(prompt_ids, completion_ids)`` method
# (a reward on the actor's own tokenizer) is given the sampled ids instead, after plain-string prompts
ScoreFn = Callable[[list, list[str]], torch.Tensor]


@dataclass
class Experience:
    """One rollout batch. Every tensor over response tokens is (B, A), 0 where ``action_mask`` is 0."""

    input_ids: torch.Tensor       # (B, P + A) prompt (left-padded) | response (right-padded)
    attention_mask: torch.Tensor  # (B, P + A)
    action_mask: torch.Tensor     # (B, A) 1 on response tokens, EOS included
    old_logprobs: torch.Tensor | None  # (B, A) actor at sampling time; None: on-policy, taken from the learn pass
    ref_logprobs: torch.Tensor | None  # (B, A) reference; None: no KL term needs it
    old_values: torch.Tensor | None  # (B, A) critic at sampling time; None: taken from the learn pass
    rewards: torch.Tensor         # (B, A) −β·kl + clipped score at the last token
    advantages: torch.Tensor | None  # (B, A) GAE (None with old_values)
    returns: torch.Tensor | None     # (B, A) advantages + old_values (None with old_values)
    scores: torch.Tensor          # (B,) proxy score (after any missing-EOS penalty, before clipping)
    ended: torch.Tensor | None = None  # (B,) bool: the response reached a stop id (not cut by max_new_tokens)

    def _map(self, fn) -> "Experience":
        return Experience(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    def __getitem__(self, idx) -> "Experience":
        return self._map(lambda t: t[idx])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Experience":
        return self._map(lambda t: t.to(device))

    def trimmed(self) -> "Experience":
        """The same rollouts without the columns that are padding in every row: the prompt's leading columns no
        row attends to and the response's trailing columns no row has a token in (a mini- or micro-batch of short
        rows, picked from a buffer padded to its longest, runs at its own longest). At least one column of each
        half stays. Positions come from the attention mask, so the forwards give the same log-probs and values."""
        width, total = self.action_mask.shape[1], self.input_ids.shape[1]
        attended = self.attention_mask[:, : total - width].bool().any(0)  # (P,)
        lead = min(int(attended.long().argmax()) if attended.any() else total - width, max(total - width - 1, 0))
        used = self.action_mask.bool().any(0).nonzero()
        keep = int(used[-1]) + 1 if len(used) else 1
        if lead == 0 and keep == width:
            return self
        end = total - width + keep

        def narrow(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.dim() == 1:  # per row
                return t
            return t[:, lead:end] if name in ("input_ids", "attention_mask") else t[:, :keep]

        return Experience(**{f.name: narrow(f.name, getattr(self, f.name)) for f in fields(self)})

    def gather(self, pad_token_id: int) -> "Experience":
        """Every process's experience joined in process order (itself with one process)."""
        if distributed.world_size() == 1:
            return self
        device = self.input_ids.device
        parts = [part.to(device) for part in distributed.all_gather(self.to("cpu"))]
        return Experience.cat(parts, pad_token_id)

    def batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "action_mask": self.action_mask}

    @staticmethod
    def cat(items: list["Experience"], pad_token_id: int) -> "Experience":
        """Join rollout batches of different widths into one buffer (re-padding both halves)."""
        if len(items) == 1:
            return items[0]
        width_a = max(e.action_mask.shape[1] for e in items)
        width_p = max(e.input_ids.shape[1] - e.action_mask.shape[1] for e in items)

        def pad(e: Experience, name: str) -> torch.Tensor:
            t = getattr(e, name)
            if t is None or t.dim() == 1:
                return t
            a = e.action_mask.shape[1]
            if name in ("input_ids", "attention_mask"):
                fill = pad_token_id if name == "input_ids" else 0
                p = t.shape[1] - a
                left = t.new_full((t.shape[0], width_p - p), fill)
                right = t.new_full((t.shape[0], width_a - a), fill)
                return torch.cat([left, t, right], 1)
            return torch.cat([t, t.new_zeros((t.shape[0], width_a - a))], 1)

        def join(name: str) -> torch.Tensor | None:
            parts = [pad(e, name) for e in items]
            return None if any(t is None for t in parts) else torch.cat(parts)

        return Experience(**{f.name: join(f.name) for f in fields(Experience)})


@dataclass
class RolloutStats:
    texts: list[str]
    prompts: list
    seconds_generate: float
    seconds_score: float  # old/ref log-probs, values, reward model and advantages
    metrics: dict[str, float]
    tokens: float = 0.0  # response tokens, over which the entropy is a mean (the others are means over rows)

    def weighted(self) -> dict[str, tuple[float, float]]:
        """Each metric as (mean, what it is a mean over): for means over processes whose shares differ in size."""
        rows = len(self.texts)
        return {k: (v, self.tokens if k == "rollout/entropy" else rows) for k, v in self.metrics.items()}


def per_token(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-response-token numbers → (B, width) float32, 0 past each row's end."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def score_generations(score_fn: ScoreFn, prompts: list, gens) -> torch.Tensor:
    """(B,) scores of sampled ``gens`` (``Generations``) for ``prompts``: a scorer on the actor's tokenizer
    (``score_ids``) is given the sampled ids; after chat prompts the texts, which it templates as its training did
    (the template's end of turn and what follows it are not the sampled stop id)."""
    score_ids = getattr(score_fn, "score_ids", None) if all(isinstance(p, str) for p in prompts) else None
    return score_ids(gens.prompt_ids, gens.completion_ids) if score_ids else score_fn(prompts, gens.texts)


def rollout_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """``rollout/kl``: the sampling policy's k1 KL to the reference summed over each response, averaged over the
    rows. logprobs, ref_logprobs, mask: (B, A)."""
    return (approx_kl(logprobs, ref_logprobs, "k1") * mask).sum(-1).mean().item()


@torch.no_grad()
def make_experience(roles, tokenizer, prompts: list, score_fn: ScoreFn, gen: GenerationConfig, *, beta: float,
                    kl_estimator: str = "k1", reward_clip: float | None = 5.0,
                    missing_eos_penalty: float | None = None, overlong_buffer: int = 0, overlong_penalty: float = 1.0,
                    gamma: float = 1.0, lam: float = 0.95,
                    seed: int = 0, seeds: list[int] | None = None, engine: RolloutEngine | None = None,
                    old_logprobs: Literal["forward", "rollout", "none"] = "forward", reference: bool = True,
                    values: bool = True) -> tuple[Experience, RolloutStats]:
    """Sample one response per prompt with the actor and record everything learning needs.

    Prompt i samples with ``seeds[i]`` (default: ``prompt_seeds(seed, len(prompts))``) through
    ``engine`` (default: the Hugging Face engine over the actor itself).
    ``old_logprobs``: ``forward`` runs the actor over the batch; ``rollout`` takes them from the
    engine's sampling logits when it gives them (no pass; equal to the forward's up to float
    rounding, so only for an engine in the trainer's precision), else runs the forward; ``none``
    skips them (one on-policy update, whose learn pass computes the same log-probs: ratio 1).
    ``overlong_buffer`` > 0 adds DAPO's soft overlong penalty to each score (``advantages.overlong_penalty``:
    the last ``overlong_buffer`` tokens before ``gen.max_new_tokens`` cost up to ``overlong_penalty``).
    ``reference=False`` skips the reference pass (no KL term: β = 0). Either leaves its field None
    and ``rollout/kl`` unlogged. ``values=False`` skips the critic pass and GAE (old values,
    advantages and returns None): one update computes them from the learn pass's values.
    """
    if beta and (old_logprobs == "none" or not reference):
        raise ValueError("a KL penalty in the rewards (beta > 0) needs the actor's and the reference's log-probs")
    model = roles.generation_model()  # also makes the actor the active adapter in shared mode
    device = next(model.parameters()).device
    engine = engine or HFRolloutEngine(model, tokenizer, gen, gen.backend)
    roles.train(False)
    t0 = time.perf_counter()
    seeds = prompt_seeds(seed, len(prompts)) if seeds is None else seeds
    gens = engine.generate(list(prompts), seeds, logprobs=old_logprobs == "rollout")
    t1 = time.perf_counter()
    batch = {k: v.to(device) for k, v in
             join_prompt_response(gens.prompt_ids, gens.completion_ids, tokenizer.pad_token_id).items()}
    mask = batch["action_mask"].float()
    temperature = gen.logprob_temperature
    old, ref, old_values, metrics = None, None, None, {}
    if old_logprobs == "rollout" and gens.logprobs is not None:
        old = per_token(gens.logprobs, mask.shape[1]).to(device)
        metrics["rollout/entropy"] = masked_mean(per_token(gens.entropy, mask.shape[1]).to(device), mask).item()
    elif old_logprobs != "none":
        old, entropy = roles.actor_logprobs(batch, temperature=temperature, entropy="detached")
        metrics["rollout/entropy"] = masked_mean(entropy, mask).item()
    if reference:
        ref = roles.reference_logprobs(batch, temperature=temperature)
    if values:
        old_values = roles.critic_values(batch)
    t2 = time.perf_counter()
    proxy = score_generations(score_fn, prompts, gens).to(device).float()
    roles.release()  # sharded models: no backward follows these passes (a reward adapter's too) to reshard them
    has_eos = torch.tensor(gens.has_eos, device=device)
    penalty = overlong_penalty_of(mask.sum(-1), gen.max_new_tokens, overlong_buffer, overlong_penalty)
    if missing_eos_penalty is not None:  # a response cut off by the length limit is penalised (DESIGN.md §3)
        penalty = torch.where(has_eos, penalty, penalty - missing_eos_penalty)
    scores = proxy + penalty
    kl = approx_kl(old, ref, kind=kl_estimator) * mask if beta else torch.zeros_like(mask)
    rewards = per_token_rewards(proxy, kl, mask, beta, clip=reward_clip, penalty=penalty)  # a score at -clip pays too
    advantages, returns = gae(rewards, old_values * mask, mask, gamma, lam) if values else (None, None)
    t3 = time.perf_counter()
    exp = Experience(batch["input_ids"], batch["attention_mask"], batch["action_mask"],
                     None if old is None else old * mask, None if ref is None else ref * mask,
                     None if old_values is None else old_values * mask, rewards, advantages, returns, scores,
                     has_eos)
    if old is not None and ref is not None:
        metrics["rollout/kl"] = rollout_kl(old, ref, mask)
    metrics.update({"rollout/score": scores.mean().item(), "rollout/response_length": mask.sum(-1).mean().item(),
                    "rollout/eos_share": has_eos.float().mean().item(), "rollout/beta": beta,
                    "time/generate": t1 - t0, "time/forward": t2 - t1, "time/score": t3 - t2})
    return exp, RolloutStats(gens.texts, list(prompts), t1 - t0, t3 - t1, metrics, mask.sum().item())
