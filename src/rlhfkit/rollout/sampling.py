"""The sampling rule: per-sample seeds, per-row uniforms, temperature / top-k / top-p, inverse CDF.

Torch only. Row i of a batch draws its uniforms from its own ``torch.Generator`` seeded with
its own seed, one uniform per new token, and picks its token by inverse CDF over its own
filtered distribution — so a sample depends on its prompt, the model and its seed, not on the
other rows of its batch (issue #9: a batch split over two processes gives the rollouts one process
gives). Up to float rounding: a row's logits in a batch of another size or padding can differ in
their last bits, and where a uniform falls within that of a token boundary the row samples another
token from there on (seen once in ~335,000 tokens on CPU, float32; bf16 and GPUs make it likelier).
Shapes: B rows, A new tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
import math

import torch


def prompt_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """Sampling seeds of prompts ``start .. start + n - 1`` of a run seeded ``seed``.

    A hash of (seed, global index), so a process that holds prompts 8..15 of a batch passes
    ``start=8`` and gets the seeds one process gives them.
    """
    return [_hashed(f"{seed}:{i}") for i in range(start, start + n)]


def _hashed(key: str) -> int:
    """A 63-bit seed from ``key`` (blake2b): the same on every machine and process."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def sample_seeds(seed: int, prompts: list[int], n: int) -> list[int]:
    """Seeds of samples 0 .. n-1 of each of ``prompts`` (their places in a file), prompt by prompt: sample 0's is
    the prompt's own (``prompt_seeds``: one sample a prompt samples as before), sample j's a hash of (seed, place,
    j). None depends on n or on which other prompts are sampled beside it."""
    return [_hashed(f"{seed}:{i}" if j == 0 else f"{seed}:{i}:{j}") for i in prompts for j in range(n)]


def row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """(B, A) uniforms in [0, 1): row i is the first ``steps`` draws of a CPU generator seeded ``seeds[i]``.

    Drawn on the CPU so a seed means the same samples on every device; step t of a row is the
    same draw whatever ``steps`` is.
    """
    gen = torch.Generator()
    rows = []
    for s in seeds:
        gen.manual_seed(s % 2**64)
        rows.append(torch.rand(steps, generator=gen))
    return torch.stack(rows) if rows else torch.zeros(0, steps)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """(B, V) logits → (B, V) float32 logits / temperature, −inf outside the top-k, the top-p nucleus and the
    tokens at least ``min_p`` times as likely as the most likely one (min-p sampling, Nguyen et al. 2024), in that
    order (transformers' warpers' order: the nucleus is measured before min-p thins it).

    The nucleus keeps the most likely tokens until their mass reaches ``top_p``, the token that
    crosses it included, so at least one token always stays (min-p keeps the most likely one too). Each row is
    filtered on its own.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:  # last, as transformers orders its warpers: p_v >= min_p * p_max <=> logit_v >= max + log(min_p)
        floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)  # (B, 1)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Next tokens (B,) from (B, V) logits and (B,) uniforms in [0, 1), by inverse CDF.

    Token v is chosen when cdf[v − 1] ≤ u · cdf[V − 1] < cdf[v], the cdf summed in vocabulary
    order: token v has probability p_v, and a token of probability 0 is never chosen.
    ``temperature <= 0`` is greedy (argmax; the uniforms are unused).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = filter_logits(logits, temperature, top_k, top_p, min_p).softmax(-1).cumsum(-1)  # (B, V)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
