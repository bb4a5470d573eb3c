"""Held-out evaluation with the built-in task's gold reward (the "human").

Only this module and the CLI import the gold reward; trainers never do (tested), so no
training signal can leak from it. Trainers that report gold reward receive an
evaluation callback built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev

from rlhfkit.config import GenerationConfig
from rlhfkit.data.tasks.describe import gold_reward
from rlhfkit.rollout.generate import generate


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n); 0 error for fewer than two values."""
    if not values:
        raise ValueError("no values to average")
    err = stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean(values), err


@dataclass
class GoldEval:
    """Gold reward of one completion per test prompt."""

    mean: float
    stderr: float
    rewards: list[float]
    prompts: list
    completions: list[str]
    eos_rate: float

    def summary(self) -> dict[str, float]:
        return {"gold_reward_mean": self.mean, "gold_reward_stderr": self.stderr, "n": len(self.rewards),
                "eos_rate": self.eos_rate}


def gold_eval(model, tokenizer, prompts: list[str], cfg: GenerationConfig, seed: int = 0,
              progress: bool = False) -> GoldEval:
    """Sample one completion per prompt (``cfg`` decoding) and score it with the gold reward."""
    gens = generate(model, tokenizer, prompts, cfg, seed=seed, progress=progress)
    rewards = [gold_reward(p, c) for p, c in zip(prompts, gens.texts)]
    m, se = mean_stderr(rewards)
    return GoldEval(m, se, rewards, list(prompts), gens.texts, sum(gens.has_eos) / len(gens.has_eos))
