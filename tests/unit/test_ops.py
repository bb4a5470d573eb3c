"""rlhfkit.ops against values worked out by hand: positions under padding, log-probabilities, sums over masks,
and the mean ± standard error every evaluation reports."""

import math

import pytest
import torch

from rlhfkit.ops import (distinct_rows, mean_of, mean_stderr, position_ids_from_mask, sequence_logprobs,
                         shifted_logprobs, token_logprobs)

INF = float("inf")


def test_positions_count_real_tokens_only():
    # left padding starts the real tokens at 0; right padding's positions stay 0 (never attended)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask),
                       torch.tensor([[0, 0, 0, 1], [0, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]]))


def test_token_logprobs_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]; logits [0, 0]: p = [1/2, 1/2]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    torch.testing.assert_close(token_logprobs(logits, labels), torch.tensor([[math.log(0.75), math.log(0.5)]]))


def test_shifted_logprobs_read_each_token_from_the_position_before():
    # position t's logits predict token t + 1: ids [0, 1, 1] read p(1 | pos 0) and p(1 | pos 1); the last logits
    # (position 2) predict nothing and are dropped
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [50.0, -50.0]]])
    out = shifted_logprobs(logits, torch.tensor([[0, 1, 1]]))
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    # a bf16 model's logits are read in float32
    assert shifted_logprobs(logits.bfloat16(), torch.tensor([[0, 1, 1]])).dtype == torch.float32


def test_sequence_logprobs_sum_the_mask_and_ignore_padding_garbage():
    token_lp = torch.tensor([[-1.0, -2.0, -INF], [float("nan"), 0.0, 0.0], [-0.5, 3.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    out = sequence_logprobs(token_lp, mask)
    torch.testing.assert_close(out, torch.tensor([-3.0, 0.0, -0.5]))  # an empty row gives 0, a length-1 row its one
    out.sum().backward()
    torch.testing.assert_close(token_lp.grad, mask.float())  # no NaN leaks in through the padding


def test_mean_stderr_by_hand():
    # [1, 2, 3, 4]: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, error sqrt(5/3) / 2
    mean, err = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and err == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_stderr([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_stderr([])


def test_mean_of_averages_each_metric_over_the_records_that_have_it():
    assert mean_of([{"a": 1.0, "b": 4.0}, {"a": 3.0}, {"b": 0.0, "c": 5.0}]) == {"a": 2.0, "b": 2.0, "c": 5.0}


def test_distinct_rows_in_order_of_first_appearance():
    # rows 0 and 2 equal; row 3 has row 1's ids but another mask (the pad id may be a real token)
    ids = torch.tensor([[5, 6], [1, 0], [5, 6], [1, 0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    first, index = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 3] and index.tolist() == [0, 1, 0, 2]


def test_a_float32_head_computes_in_float32_under_autocast():
    # a value head under the run's bf16 autocast had rounded every value to bf16's 3 significant digits
    from rlhfkit.ops import scalar_head

    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(16, 1), torch.randn(4, 16)
    exact = head(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(hidden).dtype == torch.bfloat16  # what autocast alone does
        out = scalar_head(head, hidden.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(hidden.bfloat16().float()), rtol=0, atol=0)
    assert (out - exact).abs().max() < 0.05  # hidden states rounded to bf16, nothing else
    # a bf16 head computes as stored, on hidden states cast to it
    assert scalar_head(head.to(torch.bfloat16), hidden).dtype == torch.bfloat16
