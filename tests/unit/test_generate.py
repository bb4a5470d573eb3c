"""The sampling rule (rlhfkit.rollout.sampling): seeds, uniforms, top-k / top-p, inverse CDF, by hand."""

import math

import torch

from rlhfkit.rollout.sampling import filter_logits, prompt_seeds, row_uniforms, sample_next


def logits_of(probs: list[float]) -> torch.Tensor:
    """(1, V) logits whose softmax is ``probs`` (0 → −inf)."""
    return torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in probs]])


def draw(probs: list[float], u: float, **kw) -> int:
    return sample_next(logits_of(probs), torch.tensor([u]), kw.pop("temperature", 1.0), **kw).item()


def test_prompt_seeds_depend_on_seed_and_global_index_only():
    assert prompt_seeds(3, 4, start=2) == prompt_seeds(3, 6)[2:]
    assert prompt_seeds(3, 6) == prompt_seeds(3, 6)
    assert len(set(prompt_seeds(3, 100) + prompt_seeds(4, 100))) == 200
    assert all(0 <= s < 2**63 for s in prompt_seeds(0, 10))


def test_row_uniforms_are_per_row_and_prefix_stable():
    u = row_uniforms([11, 22, 33], 6)
    assert u.shape == (3, 6) and ((u >= 0) & (u < 1)).all()
    assert torch.equal(row_uniforms([22], 6)[0], u[1])  # a row does not depend on its companions
    assert torch.equal(row_uniforms([33, 11], 6), u[[2, 0]])  # nor on its place
    assert torch.equal(row_uniforms([11], 4)[0], u[0, :4])  # step t is the same draw whatever the length
    assert row_uniforms([], 5).shape == (0, 5)


def test_inverse_cdf_by_hand():
    probs = [0.1, 0.2, 0.7]  # cdf 0.1, 0.3, 1.0
    assert [draw(probs, u) for u in (0.0, 0.05, 0.099, 0.101, 0.29, 0.31, 0.999)] == [0, 0, 0, 1, 1, 2, 2]


def test_zero_probability_tokens_are_never_chosen():
    probs = [0.0, 0.5, 0.0, 0.5, 0.0]
    assert [draw(probs, u) for u in (0.0, 0.25, 0.5, 0.75, 0.9999999)] == [1, 1, 3, 3, 3]


def test_greedy_is_argmax_and_ignores_uniforms():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    for u in (0.0, 0.5, 0.99):
        assert sample_next(logits, torch.full((2,), u), temperature=0).tolist() == [1, 0]


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    u = torch.rand(64)
    assert torch.equal(sample_next(logits, u, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, u, 1.0, top_p=1e-6), logits.argmax(-1))
    assert torch.equal(sample_next(logits, u, 0.7, top_k=5, top_p=1e-6), logits.argmax(-1))


def test_top_k_renormalises_over_the_k_best():
    probs = [0.1, 0.2, 0.7]  # top-2 → 0.2 / 0.9, 0.7 / 0.9
    assert [draw(probs, u, top_k=2) for u in (0.0, 0.2, 0.23, 0.999)] == [1, 1, 2, 2]


def test_top_p_keeps_the_token_that_crosses_the_mass():
    probs = [0.3, 0.5, 0.2]  # sorted 0.5, 0.3, 0.2
    assert torch.isinf(filter_logits(logits_of(probs), 1.0, top_p=0.5)).tolist() == [[True, False, True]]
    assert torch.isinf(filter_logits(logits_of(probs), 1.0, top_p=0.6)).tolist() == [[False, False, True]]
    # {0, 1} renormalised: 0.375, 0.625 (cdf in vocabulary order)
    assert [draw(probs, u, top_p=0.6) for u in (0.0, 0.37, 0.38, 0.99)] == [0, 0, 1, 1]


def test_min_p_keeps_the_tokens_at_least_that_share_of_the_most_likely():
    probs = [0.1, 0.5, 0.15, 0.25]  # min_p 0.3: at least 0.15 -> keeps 1, 2, 3; renormalised 0.5/0.9, 0.15/0.9, ...
    assert torch.isinf(filter_logits(logits_of(probs), 1.0, min_p=0.3)).tolist() == [[True, False, False, False]]
    assert [draw(probs, u, min_p=0.3) for u in (0.0, 0.55, 0.56, 0.72, 0.73)] == [1, 1, 2, 2, 3]
    # after the temperature: at T = 2, p ∝ sqrt(p): 0.1 -> sqrt(0.1 / 0.5) = 0.447 of the top, kept at min_p 0.4
    assert not torch.isinf(filter_logits(logits_of(probs), 2.0, min_p=0.4)).any()
    torch.manual_seed(0)
    logits = torch.randn(8, 20)
    assert torch.equal(sample_next(logits, torch.rand(8), 1.0, min_p=1.0), logits.argmax(-1))  # only the top
    # after the nucleus, as transformers orders them: top_p 0.5 keeps 0.4 and 0.3 (it crosses 0.5), then min_p 0.1
    # keeps both (>= 0.04); min-p first would thin the 0.01s away and the renormalised 0.57 alone would fill 0.5
    probs = [0.4, 0.3] + [0.01] * 30
    assert (~torch.isinf(filter_logits(logits_of(probs), 1.0, top_p=0.5, min_p=0.1))).sum() == 2


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 1/4, 3/4 at T=1; at T=2: 1/(1+√3), √3/(1+√3)
    boundary = 1 / (1 + math.sqrt(3))
    assert sample_next(logits, torch.tensor([boundary - 1e-4]), 2.0).item() == 0
    assert sample_next(logits, torch.tensor([boundary + 1e-4]), 2.0).item() == 1


def test_empirical_distribution_matches_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n, temperature = 40_000, 0.8
    tokens = sample_next(logits.expand(n, -1), torch.rand(n, generator=gen), temperature)
    freq = torch.bincount(tokens, minlength=5).float() / n
    expected = (logits / temperature).softmax(-1)
    assert (freq - expected).abs().max() < 0.01  # the standard error is ≤ 0.0025


def test_rows_are_sampled_independently_of_the_batch():
    """The vectorised rule equals its plain loop over rows (the oracle), filters included."""
    torch.manual_seed(1)
    logits, u = torch.randn(16, 40), torch.rand(16)
    for kw in ({}, {"top_k": 7}, {"top_p": 0.8}, {"top_k": 10, "top_p": 0.5}):
        batched = sample_next(logits, u, 0.9, **kw)
        alone = torch.cat([sample_next(logits[i: i + 1], u[i: i + 1], 0.9, **kw) for i in range(16)])
        assert torch.equal(batched, alone), kw
