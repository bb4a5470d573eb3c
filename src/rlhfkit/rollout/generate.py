"""Sampling completions from a causal LM: ``generate``, the entry point every stage calls.

Prompts are encoded exactly as in training (``rlhfkit.data.collate.encode_prompt``), padded on
the left, and each completion is cut just after its first EOS. Each prompt samples with its own
seed (``rlhfkit.rollout.sampling``), so a sample depends on its prompt, the model and its seed
only — not on its batch companions or its place among them (issue #9), up to float rounding
(``rlhfkit.rollout.sampling`` says when that shows). The sampling loop and its backends live in
``rlhfkit.rollout.engine``.
"""

from __future__ import annotations

from rlhfkit.config import GenerationConfig
from rlhfkit.rollout.engine import Generations, cut_at_eos, sample_prompts
from rlhfkit.rollout.sampling import prompt_seeds

__all__ = ["Generations", "cut_at_eos", "generate", "prompt_seeds"]


def generate(model, tokenizer, prompts: list, cfg: GenerationConfig, seed: int = 0, progress: bool = False,
             seeds: list[int] | None = None, backend: str | None = None) -> Generations:
    """Sample one completion per prompt, ``cfg.batch_size`` prompts at a time.

    Prompt i samples with ``seeds[i]``; by default ``prompt_seeds(seed, len(prompts))`` (a hash of
    ``seed`` and i), so a call repeats exactly. ``backend`` (default ``cfg.backend``): ``auto`` (our
    loop where it is tested, else HF), ``loop`` or ``hf`` — the same tokens either way, up to float rounding.
    """
    seeds = prompt_seeds(seed, len(prompts)) if seeds is None else list(seeds)
    return sample_prompts(model, tokenizer, prompts, seeds, cfg, backend or cfg.backend, progress)
