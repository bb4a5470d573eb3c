"""Held-out evaluation with the built-in task's gold reward (the "human").

Only this module and the CLI import the gold reward; trainers never do (tested), so no
training signal can leak from it. Trainers that report gold reward receive an
evaluation callback built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import GenerationConfig
from rlhfkit.data.tasks.describe import gold_reward, prompt_topic
from rlhfkit.models.forward import join_prompt_response, response_logprobs
from rlhfkit.ops import mean_stderr
from rlhfkit.rollout.generate import Generations, generate


@dataclass
class GoldEval:
    """Gold reward of one completion per test prompt."""

    mean: float
    stderr: float
    rewards: list[float]
    prompts: list
    completions: list[str]
    eos_rate: float
    generations: Generations

    def summary(self) -> dict[str, float]:
        return {"gold_reward_mean": self.mean, "gold_reward_stderr": self.stderr, "n": len(self.rewards),
                "eos_rate": self.eos_rate}


def gold_eval(model, tokenizer, prompts: list[str], cfg: GenerationConfig, seed: int = 0,
              progress: bool = False) -> GoldEval:
    """Sample one completion per prompt (``cfg`` decoding) and score it with the gold reward."""
    gens = generate(model, tokenizer, prompts, cfg, seed=seed, progress=progress)
    rewards = [gold_reward(p, c) for p, c in zip(prompts, gens.texts)]
    m, se = mean_stderr(rewards)
    return GoldEval(m, se, rewards, list(prompts), gens.texts, sum(gens.has_eos) / len(gens.has_eos), gens)


@torch.no_grad()
def kl_to_reference(policy, reference, gens: Generations, pad_token_id: int, batch_size: int = 64,
                    temperature: float = 1.0) -> tuple[float, float]:
    """Mean ± stderr over prompts of the sequence KL estimate Σ_t (log π(y_t) − log π_ref(y_t)),
    on the policy's own samples ``gens`` (an unbiased estimate of KL(π ‖ π_ref) per sequence), both models'
    log-probs at the ``temperature`` the samples were drawn at (from the whole vocabulary: no top-k / top-p)."""
    device = next(policy.parameters()).device
    per_seq: list[float] = []
    for i in range(0, len(gens.prompt_ids), batch_size):
        batch = join_prompt_response(gens.prompt_ids[i: i + batch_size], gens.completion_ids[i: i + batch_size],
                                     pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        diff = response_logprobs(policy, batch, temperature) - response_logprobs(reference, batch, temperature)
        per_seq += diff.sum(-1).tolist()
    return mean_stderr(per_seq)


def task_pairs(pairs: list[dict]) -> bool:
    """Whether preference ``pairs`` are the built-in task's: text whose prompts are its (the gold reward's)."""
    return all(isinstance(p["chosen"], str) and isinstance(p["prompt"], str) and prompt_topic(p["prompt"])
               is not None for p in pairs)


def reward_model_eval(reward_model, pairs: list[dict]) -> dict[str, float]:
    """How well a reward model ranks held-out pairs.

    ``accuracy``: chosen scored above rejected (agreement with the noisy labels);
    ``gold_agreement``: the higher-scored response is the one the built-in task's gold reward prefers (a tie in
    score agrees with neither; pairs the gold reward ties are left out; None when it ties them all, or some
    prompts are not the task's, or the pairs are chat messages); both with standard errors.
    """
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_model.score(prompts, [p["chosen"] for p in pairs])
    rejected = reward_model.score(prompts, [p["rejected"] for p in pairs])
    correct = (chosen > rejected).float().tolist()
    # the built-in task's pairs: on others the gold reward reads a valence word here and there, meaning nothing
    text = task_pairs(pairs)
    gold_diff = [gold_reward(p["prompt"], p["chosen"]) - gold_reward(p["prompt"], p["rejected"])
                 for p in pairs] if text else []
    # a tie in score agrees with neither side, as it counts wrong in ``accuracy``
    agree = [float(c > r if d > 0 else r > c) for d, c, r in zip(gold_diff, chosen.tolist(), rejected.tolist())
             if d != 0]
    acc, acc_se = mean_stderr(correct)
    gold, gold_se = mean_stderr(agree) if agree else (None, None)
    return {"accuracy": acc, "accuracy_stderr": acc_se, "gold_agreement": gold, "gold_agreement_stderr": gold_se,
            "n_pairs": len(pairs), "n_gold_untied": len(agree)}


@torch.no_grad()
def per_prompt_accuracy(model, tokenizer, rows: list[dict], gen: GenerationConfig, samples: int, seed: int
                        ) -> list[float]:
    """Verifiable tasks: the share of ``samples`` completions per prompt with the exact answer
    (``rlhfkit.data.tasks.arithmetic.exact_answer`` on the rows' ``answer`` column), one value per prompt."""
    from rlhfkit.data.tasks import arithmetic

    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    hits = [0.0] * len(rows)
    for k in range(samples):
        texts = generate(model, tokenizer, prompts, gen, seed=seed * 1000 + k).texts
        for i, hit in enumerate(arithmetic.exact_answer(prompts, texts, answer=answers)):
            hits[i] += hit / samples
    return hits
