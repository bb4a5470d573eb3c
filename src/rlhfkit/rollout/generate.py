"""Sampling completions from a causal LM with the Hugging Face backend (KV cache).

Prompts are encoded exactly as in training (``rlhfkit.data.collate.encode_prompt``),
padded on the left, and each completion is cut just after its first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import GenerationConfig
from rlhfkit.data.collate import encode_prompt, pad_batch


@dataclass
class Generations:
    """Sampled completions: ids per row (EOS included when emitted) and decoded text."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    has_eos: list[bool]


def cut_at_eos(ids: list[int], eos_token_id: int) -> tuple[list[int], bool]:
    """Ids up to and including the first EOS, and whether there was one."""
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1], True
    return ids, False


@torch.no_grad()
def generate(model, tokenizer, prompts: list, cfg: GenerationConfig, seed: int = 0,
             progress: bool = False) -> Generations:
    """Sample one completion per prompt, ``cfg.batch_size`` prompts at a time.

    The RNG is re-seeded per batch from ``seed``, so a run repeats exactly.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    greedy = cfg.temperature <= 0
    sampling = {} if greedy else dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    result = Generations([], [], [], [])
    batches = range(0, len(prompts), cfg.batch_size)
    if progress:
        from rlhfkit.progress import progress as bar

        batches = bar(batches, "generate")
    for b, start in enumerate(batches):
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts[start: start + cfg.batch_size]]
        input_ids = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left").to(device)
        attention_mask = pad_batch([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
        torch.manual_seed(seed * 1_000_003 + b)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=not greedy,
                             max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        for ids, row in zip(prompt_ids, out[:, input_ids.shape[1]:].tolist()):
            completion, eos = cut_at_eos(row, tokenizer.eos_token_id)
            result.prompt_ids.append(ids)
            result.completion_ids.append(completion)
            result.has_eos.append(eos)
            result.texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    model.train(was_training)
    return result
