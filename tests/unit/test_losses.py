"""rlhfkit.losses against values worked out by hand (arithmetic in the comments).

Constants used below: sigma(1) = 0.73105858, sigma(0.5) = 0.62245933,
-log sigma(1) = log(1 + e^-1) = 0.31326169, -log sigma(-1) = log(1 + e) = 1.31326169.
"""

import math

import pytest
import torch

from rlhfkit.losses import (
    DPO_LOSSES,
    POLICY_LOSS_REDUCTIONS,
    dpo_loss,
    entropy_bonus_loss,
    entropy_from_logits,
    kl_penalty_loss,
    kto_loss,
    orpo_loss,
    policy_loss,
    reward_model_loss,
    simpo_loss,
    value_loss,
)

INF = float("inf")


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------- reward model


def test_reward_model_loss_by_hand():
    # s_w - s_l = [1, -1]: mean(-log sigma(1), -log sigma(-1)) = (0.31326169 + 1.31326169) / 2
    loss, metrics = reward_model_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    close(loss, 0.81326169)
    close(metrics["accuracy"], 0.5)
    close(metrics["margin"], 0.0)  # (1 - 1) / 2


def test_reward_model_loss_centring_term_by_hand():
    # the pairs above, + 0.1 x mean((2 + 1)^2, (0 + 1)^2) = 0.1 x 5 = 0.5
    loss, _ = reward_model_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), center=0.1)
    close(loss, 0.81326169 + 0.5)


def test_reward_model_loss_margin_is_subtracted():
    # logits [1 - 1, -1 - 0] = [0, -1]: (log 2 + 1.31326169) / 2 = (0.69314718 + 1.31326169) / 2
    loss, _ = reward_model_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=torch.tensor([1.0, 0.0]))
    close(loss, 1.00320443)
    # gaps [2, -1] less margins [3, 0]: logits [-1, -1], loss 1.31326169 each; the metrics read the gaps alone:
    # accuracy 1/2 (the first pair's score is higher, though under its margin), margin (2 - 1) / 2
    loss, metrics = reward_model_loss(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0]),
                                      margin=torch.tensor([3.0, 0.0]))
    close(loss, 1.31326169)
    close(metrics["accuracy"], 0.5)
    close(metrics["margin"], 0.5)


def test_reward_model_loss_stable_for_large_gaps():
    # -log sigma(1000) = 0 and -log sigma(-1000) = 1000: mean 500, no inf.
    loss, _ = reward_model_loss(torch.tensor([1000.0, 0.0]), torch.tensor([0.0, 1000.0]))
    close(loss, 500.0)


def test_reward_model_accuracy_counts_ties_as_wrong():
    _, metrics = reward_model_loss(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, 5.0]))
    close(metrics["accuracy"], 1.0 / 3.0)


# --------------------------------------------------------------------------- policy loss
# Shared batch: ratios [[1.5, 0.5], [1.1, pad]], advantages [[1, -1], [2, pad]], eps 0.2.
#   (0,0) r=1.5, A=1:  unclipped -1.5, clipped -1.2*1 = -1.2   -> max -1.2 (clipped)
#   (0,1) r=0.5, A=-1: unclipped  0.5, clipped -0.8*-1 = 0.8   -> max  0.8 (clipped)
#   (1,0) r=1.1, A=2:  unclipped -2.2, clipped -2.2 (in range) -> max -2.2 (not clipped)
OLD_LOGPROBS = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
LOGPROBS = OLD_LOGPROBS + torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]])
ADVANTAGES = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
MASK = torch.tensor([[1, 1], [1, 0]])


def test_policy_loss_token_mean_by_hand():
    loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    close(loss, -2.6 / 3.0)  # (-1.2 + 0.8 - 2.2) / 3


def test_policy_loss_seq_mean_token_mean_by_hand():
    loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, reduction="seq_mean_token_mean")
    close(loss, -1.2)  # row means (-1.2 + 0.8) / 2 = -0.2 and -2.2; (-0.2 - 2.2) / 2


def test_policy_loss_token_sum_norm_by_hand():
    # Dr. GRPO: sum -2.6 over constant 2 sequences x 2 max new tokens = 4
    loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, reduction="token_sum_norm", norm_constant=4)
    close(loss, -0.65)


def test_policy_loss_token_sum_norm_needs_constant():
    with pytest.raises(ValueError, match="norm_constant"):
        policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, reduction="token_sum_norm")


def test_policy_loss_unknown_reduction_lists_valid_names():
    with pytest.raises(ValueError, match="seq_mean_token_mean.*token_mean.*token_sum_norm"):
        policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, reduction="mean")


def test_policy_loss_clip_frac():
    _, metrics = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    close(metrics["clip_frac"], 2.0 / 3.0)  # tokens (0,0) and (0,1) of 3


def test_policy_loss_clip_higher_raises_only_the_upper_bound():
    # clip_eps_high 0.6: (0,0) r=1.5 ≤ 1.6, A=1: unclipped -1.5 now; (0,1) r=0.5 < 0.8 stays clipped at 0.8
    loss, metrics = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps_high=0.6)
    close(loss, (-1.5 + 0.8 - 2.2) / 3.0)
    close(metrics["clip_frac"], 1.0 / 3.0)
    # 0.3: r=1.5 is clipped at 1.3 instead of 1.2
    close(policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps_high=0.3)[0], (-1.3 + 0.8 - 2.2) / 3.0)


def test_policy_loss_ratio_mean_and_approx_kl():
    _, metrics = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    close(metrics["ratio_mean"], 3.1 / 3.0)  # (1.5 + 0.5 + 1.1) / 3
    # k3 of KL(old || new): (r - 1) - log r per token, then the mean over 3 tokens
    #   (0.5 - 0.40546511) + (-0.5 + 0.69314718) + (0.1 - 0.09531018) = 0.29237189
    close(metrics["approx_kl"], 0.29237189 / 3.0)
    assert not any(m.requires_grad for m in metrics.values())


def test_policy_loss_no_clipping_when_ratio_is_one():
    # ratio 1: loss = -mean(A) = -(1 - 1 + 2) / 3; nothing clipped.
    loss, metrics = policy_loss(OLD_LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    close(loss, -2.0 / 3.0)
    close(metrics["clip_frac"], 0.0)
    close(metrics["ratio_mean"], 1.0)


def test_policy_loss_holds_a_ratio_past_e20_with_finite_gradients():
    # log-ratio 100 (a policy far from the sampler): exp overflowed, and the clipped token's gradient was 0 · inf.
    # A = 1: the clipped term -1.2 is taken, gradient 0; A = -1: the held ratio e^20, gradient 0 past the clamp
    logprobs = torch.tensor([[100.0, 100.0, math.log(1.1)]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]), torch.ones(1, 3))
    close(loss, (-1.2 + math.exp(20) - 1.1) / 3)
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0, -1.1 / 3]])


def test_policy_loss_sequence_level_ratio_by_hand():
    # GSPO: row 0 log-ratios 0.2, 0.1 (third token masked) -> mean 0.15, ratio e^0.15 = 1.1618 > 1.1 with A = +1:
    # clipped, -1.1 per token, no gradient; row 1: -0.1, -0.2, 0.0 -> mean -0.1, ratio r = e^-0.1 = 0.9048 with
    # A = -1: inside the clip, +r per token. token_mean over 5 tokens: (2 x -1.1 + 3 r) / 5; each of row 1's
    # tokens gets d/dlp (3 r) / 5 = 3 r (1/3) / 5 = r / 5 (the mean passes 1/3 to each)
    logprobs = torch.tensor([[-1.0, -2.0, 5.0], [-0.6, -0.7, -0.3]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.1, 0.0], [-0.5, -0.5, -0.3]])
    advantages = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = math.exp(-0.1)
    loss, m = policy_loss(logprobs, old, advantages, mask, clip_eps=0.1, level="sequence")
    assert loss.item() == pytest.approx((2 * -1.1 + 3 * r) / 5, rel=1e-5)
    assert m["clip_frac"].item() == pytest.approx(2 / 5) and m["ratio_mean"].item() == pytest.approx(
        (2 * math.exp(0.15) + 3 * r) / 5, rel=1e-5)
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0, 0.0], [r / 5, r / 5, r / 5]])
    # the token level on the same numbers: row 1's ratios differ by token, so do their gradients
    logprobs.grad = None
    policy_loss(logprobs, old, advantages, mask, clip_eps=0.1)[0].backward()
    assert logprobs.grad[1, 0] != pytest.approx(logprobs.grad[1, 1].item())
    with pytest.raises(ValueError, match="unknown importance-sampling level 'seq'"):
        policy_loss(logprobs, old, advantages, mask, level="seq")


def test_entropy_bonus_by_hand():
    # row 0: two tokens uniform over 4 -> ln 4 each; row 1: one token uniform over 2 (two logits at -1e9: p = 0)
    # and a masked one. token_mean: -(2 ln 4 + ln 2) / 3 = -5 ln 2 / 3; seq_mean_token_mean: -(ln 4 + ln 2) / 2
    logits = torch.zeros(2, 2, 4)
    logits[1, :, 2:] = -1e9
    logits[1, 1] = torch.tensor([9.0, -3.0, 2.0, 0.0])  # masked: any value
    mask = torch.tensor([[1, 1], [1, 0]])
    close(entropy_bonus_loss(entropy_from_logits(logits), mask), -5 * math.log(2) / 3)
    close(entropy_bonus_loss(entropy_from_logits(logits), mask, "seq_mean_token_mean"), -1.5 * math.log(2))
    # Dr. GRPO's constant, 2 sequences x 2 tokens: -(2 ln 4 + ln 2) / 4 = -5 ln 2 / 4; no token at all: 0
    close(entropy_bonus_loss(entropy_from_logits(logits), mask, "token_sum_norm", norm_constant=4),
          -5 * math.log(2) / 4)
    for reduction in ("token_mean", "seq_mean_token_mean"):
        close(entropy_bonus_loss(entropy_from_logits(logits), torch.zeros(2, 2), reduction), 0.0)
    peaked = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    entropy_bonus_loss(entropy_from_logits(peaked), torch.ones(1, 1)).backward()
    assert peaked.grad[0, 0, 0] > 0 > peaked.grad[0, 0, 1]  # descending it lowers the peak: entropy rises


def test_policy_loss_gradient_zero_on_clipped_tokens():
    # ratios [[1.5, 1.5], [1.1, pad]], A [[1, -1], [2, pad]]:
    #   (0,0) r=1.5, A=1 is clipped: gradient 0
    #   (0,1) r=1.5, A=-1: unclipped 1.5 > clipped 1.2, so the unclipped term is kept (pessimistic bound):
    #         d(-r A / 3)/dlogp = -r A / 3 = 1.5 / 3 = 0.5
    #   (1,0) r=1.1, A=2: -1.1 * 2 / 3 = -0.73333333
    logprobs = (OLD_LOGPROBS + torch.tensor([[math.log(1.5), math.log(1.5)], [math.log(1.1), 0.0]])).requires_grad_()
    loss, metrics = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK)
    loss.backward()
    close(logprobs.grad, [[0.0, 0.5], [-2.2 / 3.0, 0.0]])
    close(metrics["clip_frac"], 1.0 / 3.0)


def test_policy_loss_padding_garbage_changes_nothing():
    # exp(1e4 - (-1e4)) would be inf: neither loss nor gradient may notice.
    garbage = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    logprobs = (LOGPROBS + 1e4 * garbage).requires_grad_()
    loss, metrics = policy_loss(logprobs, OLD_LOGPROBS - 1e4 * garbage, ADVANTAGES + 1e30 * garbage, MASK)
    loss.backward()
    close(loss, -2.6 / 3.0)
    close(metrics["approx_kl"], 0.29237189 / 3.0)
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[1, 1] == 0


def test_policy_loss_length_one_responses():
    # Only token (0,0) of row 0 and (1,0) of row 1: (-1.2 - 2.2) / 2 under both mean reductions.
    mask = torch.tensor([[1, 0], [1, 0]])
    for reduction in ("token_mean", "seq_mean_token_mean"):
        loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, mask, reduction=reduction)
        close(loss, -1.7)
    # Dr. GRPO's constant does not care how long they are: (-1.2 - 2.2) / (2 sequences x 2 tokens)
    loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, mask, reduction="token_sum_norm", norm_constant=4)
    close(loss, -0.85)


def test_policy_loss_sequence_level_length_one_and_empty_rows():
    # a one-token row's sequence ratio is its token's (1.5 with A = 1: clipped, -1.2, no gradient); an empty row
    # has ratio 1 and no token to carry it: the loss is row 0's alone, its gradient 0 everywhere
    mask = torch.tensor([[1, 0], [0, 0]])
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, metrics = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask, level="sequence")
    close(loss, -1.2)
    close(metrics["clip_frac"], 1.0)
    close(metrics["ratio_mean"], 1.5)
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(2, 2))


def test_policy_loss_seq_mean_skips_empty_rows():
    # Row 1 has no tokens: the mean is over row 0 alone, (-1.2 + 0.8) / 2.
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, mask, reduction="seq_mean_token_mean")
    close(loss, -0.2)


def test_policy_loss_all_masked_is_zero_for_every_reduction():
    mask = torch.zeros(2, 2)
    for reduction in POLICY_LOSS_REDUCTIONS:
        for level in ("token", "sequence"):
            logprobs = LOGPROBS.clone().requires_grad_()
            loss, metrics = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask, reduction=reduction,
                                        norm_constant=4, level=level)
            loss.backward()
            close(loss, 0.0)
            close(metrics["clip_frac"], 0.0)
            assert torch.equal(logprobs.grad, torch.zeros(2, 2))


# --------------------------------------------------------------------------- value loss


def test_value_loss_clipping_inactive():
    # V - V_old = [0.1, -0.1], inside eps 0.2, so V_clip = V:
    # 1/2 * mean((1 - 1.5)^2, (2 - 1)^2) = 1/2 * (0.25 + 1) / 2 = 0.3125
    values = torch.tensor([[1.0, 2.0]])
    loss, metrics = value_loss(values, torch.tensor([[0.9, 2.1]]), torch.tensor([[1.5, 1.0]]), torch.ones(1, 2))
    close(loss, 0.3125)
    close(metrics["value_clip_frac"], 0.0)


def test_value_loss_clipping_active():
    # V = 1, V_old = 0.5, eps 0.2 -> V_clip = 0.7 for both tokens
    #   R = 2: (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69 -> 1.69 (clipped term)
    #   R = 0: (1 - 0)^2 = 1 vs (0.7 - 0)^2 = 0.49 -> 1
    # 1/2 * (1.69 + 1) / 2 = 0.6725
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss, metrics = value_loss(values, torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2))
    close(loss, 0.6725)
    close(metrics["value_clip_frac"], 0.5)
    loss.backward()
    # clipped token: V_clip does not depend on V -> 0; other: d(1/2 * (V - R)^2 / 2)/dV = (1 - 0) / 2
    close(values.grad, [[0.0, 0.5]])


def test_value_loss_padding_and_all_masked_rows():
    # Row 0 as in test_value_loss_clipping_inactive with garbage after it; row 1 empty.
    values = torch.tensor([[1.0, 2.0, INF], [INF, 5.0, 5.0]], requires_grad=True)
    old_values = torch.tensor([[0.9, 2.1, -INF], [0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.5, 1.0, 1e30], [1e30, 1e30, 1e30]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    loss, _ = value_loss(values, old_values, returns, mask)
    close(loss, 0.3125)
    loss.backward()
    assert torch.isfinite(values.grad).all()


def test_value_loss_clip_fraction_counts_response_tokens_alone():
    # test_value_loss_clipping_active's two tokens (one clipped) and a padded third: 1/2, not 1/3
    values = torch.tensor([[1.0, 1.0, 9.0]])
    loss, metrics = value_loss(values, torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]]),
                               torch.tensor([[1, 1, 0]]))
    close(loss, 0.6725)
    close(metrics["value_clip_frac"], 0.5)


def test_value_loss_length_one_and_empty_batches():
    # one token, V = 1, V_old = 0.5, R = 2: the clipped error (0.7 - 2)^2 = 1.69 is taken, 1/2 x 1.69, gradient 0
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, metrics = value_loss(values, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    close(loss, 0.845)
    close(metrics["value_clip_frac"], 1.0)
    loss.backward()
    close(values.grad, [[0.0]])
    # no response token anywhere: loss 0, gradient 0, nothing clipped
    values = torch.tensor([[3.0, INF]], requires_grad=True)
    loss, metrics = value_loss(values, torch.zeros(1, 2), torch.full((1, 2), 1e30), torch.zeros(1, 2))
    close(loss, 0.0)
    close(metrics["value_clip_frac"], 0.0)
    loss.backward()
    close(values.grad, [[0.0, 0.0]])


# --------------------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_vocab():
    close(entropy_from_logits(torch.zeros(2, 3, 4)), torch.full((2, 3), math.log(4)))  # shape (B, A, V) -> (B, A)


def test_entropy_by_hand():
    # p = [1/2, 1/4, 1/4]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 = 1.03972077
    logits = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])
    close(entropy_from_logits(logits), 1.5 * math.log(2))


def test_entropy_of_large_logits_keeps_precision():
    # logits [1, 0, 0] shifted by 1000 (exact in float32): Z = e + 2 = 4.71828183,
    # H = log Z - e / Z = 1.55144471 - 0.57611688 = 0.97532783
    close(entropy_from_logits(torch.tensor([1001.0, 1000.0, 1000.0])), 0.97532783)


def test_entropy_with_masked_vocabulary_is_finite():
    # p = [1, 0, 0]: H = 0, and -inf logits give no NaN in value or gradient.
    logits = torch.tensor([[0.0, -INF, -INF], [0.0, 0.0, -INF]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    close(entropy, [0.0, math.log(2)])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- KL penalty


def test_kl_penalty_loss_by_hand_with_gradient():
    # d = [0.5, -1.0, pad]; k3 = exp(-d) - 1 + d = [0.10653066, 0.71828183]; mean 0.41240625
    # dk3/dlogp = 1 - exp(-d) = [0.39346934, -1.71828183], over 2 tokens: [0.19673467, -0.85914091]
    logprobs = torch.tensor([[-1.0, -2.0, 1e4]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.5, -1.0, -1e4]])
    loss = kl_penalty_loss(logprobs, ref_logprobs, torch.tensor([[1, 1, 0]]))
    close(loss, 0.41240625)
    loss.backward()
    close(logprobs.grad, [[0.19673467, -0.85914091, 0.0]])


def test_kl_penalty_loss_all_masked_is_zero():
    close(kl_penalty_loss(torch.tensor([[-1.0]]), torch.tensor([[5.0]]), torch.tensor([[0]])), 0.0)


def test_kl_penalty_loss_is_reduced_as_the_policy_loss_is():
    # row 0: one token, d = -1, k3 = e - 2 = 0.71828183; row 1: nine tokens, d = 0, k3 = 0; one padded column
    logprobs = torch.zeros(2, 10)
    logprobs[0, 0] = -1.0
    mask = torch.tensor([[1] + [0] * 9, [1] * 9 + [0]])
    k3 = math.e - 2
    close(kl_penalty_loss(logprobs, torch.zeros(2, 10), mask), k3 / 10)  # every token alike
    close(kl_penalty_loss(logprobs, torch.zeros(2, 10), mask, "seq_mean_token_mean"), k3 / 2)  # GRPO: 1/|o_i|
    close(kl_penalty_loss(logprobs, torch.zeros(2, 10), mask, "token_sum_norm", norm_constant=20.0), k3 / 20)
    with pytest.raises(ValueError, match="unknown reduction"):
        kl_penalty_loss(logprobs, logprobs, mask, "sum")


def test_kl_penalty_loss_stays_finite_far_from_the_reference():
    # d = -100: exp(100) overflows float32; d is clamped to -20, where k3 = exp(20) - 21 and the gradient is 0
    logprobs = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    loss = kl_penalty_loss(logprobs, torch.tensor([[0.0, -1.0]]), torch.tensor([[1, 1]]))
    assert math.isclose(loss.item(), (math.exp(20) - 21) / 2, rel_tol=1e-6)
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0]])


def test_kl_penalty_loss_pulls_back_a_token_far_above_the_reference():
    # d = 25: k3 = exp(-25) - 1 + 25 ~ 24, dk3/dd = 1 - exp(-25) ~ 1 (a clamp at +20 once made it 19 and 0)
    logprobs = torch.tensor([[25.0]], requires_grad=True)
    loss = kl_penalty_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1))
    assert math.isclose(loss.item(), 24.0, rel_tol=1e-6)
    loss.backward()
    close(logprobs.grad, [[1.0]])


# --------------------------------------------------------------------------- DPO family
# Example 0: pc=-1, rc=-2, pr=-3, rr=-2 -> h = (-1 + 2) - (-3 + 2) = 2; with beta 0.5, beta h = 1.
# Example 1: policy equals reference -> h = 0.
POLICY_CHOSEN = torch.tensor([-1.0, -4.0])
POLICY_REJECTED = torch.tensor([-3.0, -5.0])
REF_CHOSEN = torch.tensor([-2.0, -4.0])
REF_REJECTED = torch.tensor([-2.0, -5.0])


def dpo(loss_type, beta=0.5, label_smoothing=0.0, policy_chosen=POLICY_CHOSEN):
    return dpo_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta, loss_type, label_smoothing)


def test_dpo_sigmoid_by_hand():
    losses, _ = dpo("sigmoid")
    close(losses, [0.31326169, math.log(2)])  # -log sigma(1), -log sigma(0)


def test_dpo_sigmoid_label_smoothing_is_cdpo():
    # 0.9 * 0.31326169 + 0.1 * 1.31326169 = 0.41326169 (= plain + eps * beta h, since
    # -log sigma(-x) = -log sigma(x) + x); at h = 0 both terms are log 2.
    losses, _ = dpo("sigmoid", label_smoothing=0.1)
    close(losses, [0.41326169, math.log(2)])


def test_dpo_robust_by_hand():
    # (0.9 * 0.31326169 - 0.1 * 1.31326169) / 0.8 = (0.28193552 - 0.13132617) / 0.8 = 0.18826169
    # h = 0: (0.9 - 0.1) log 2 / 0.8 = log 2
    losses, _ = dpo("robust", label_smoothing=0.1)
    close(losses, [0.18826169, math.log(2)])


def test_dpo_robust_without_noise_is_plain_dpo():
    close(dpo("robust")[0], dpo("sigmoid")[0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
@pytest.mark.parametrize("eps", [0.5, 0.9, -0.1])
def test_dpo_label_smoothing_outside_0_to_half_is_refused(loss_type, eps):
    # cDPO at eps 0.9 would train towards the rejected answers; a negative eps gives negative losses
    with pytest.raises(ValueError, match="0 <= label_smoothing < 0.5"):
        dpo(loss_type, label_smoothing=eps)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_dpo_needs_a_positive_beta(beta):
    with pytest.raises(ValueError, match="beta > 0"):
        dpo("ipo", beta=beta)  # IPO divided by beta


def test_dpo_ipo_by_hand():
    # beta 0.25: 1 / (2 beta) = 2; (2 - 2)^2 = 0, (0 - 2)^2 = 4
    losses, _ = dpo("ipo", beta=0.25)
    close(losses, [0.0, 4.0])


def test_dpo_hinge_by_hand():
    losses, _ = dpo("hinge")
    close(losses, [0.0, 1.0])  # max(0, 1 - 1), max(0, 1 - 0)


def test_dpo_implicit_rewards_detached():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    _, metrics = dpo("sigmoid", policy_chosen=policy_chosen)
    close(metrics["chosen_rewards"], [0.5, 0.0])  # 0.5 * (-1 + 2), 0.5 * 0
    close(metrics["rejected_rewards"], [-0.5, 0.0])  # 0.5 * (-3 + 2), 0.5 * 0
    assert not metrics["chosen_rewards"].requires_grad


def test_dpo_sigmoid_gradient_by_hand():
    # d(-log sigma(beta h))/d pc = -beta sigma(-beta h) = -0.5 * 0.26894142 (ex. 0), -0.5 * 0.5 (ex. 1)
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, _ = dpo("sigmoid", policy_chosen=policy_chosen)
    losses.sum().backward()
    close(policy_chosen.grad, [-0.13447071, -0.25])


def test_dpo_every_variant_returns_per_example_losses():
    for loss_type in DPO_LOSSES:
        losses, _ = dpo(loss_type)
        assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_dpo_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match="hinge.*ipo.*robust.*sigmoid"):
        dpo("kto")


def test_dpo_label_smoothing_rejected_where_unused():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo("ipo", label_smoothing=0.1)


def test_simpo_by_hand():
    # beta (c - r) - gamma = 2 * (-1 + 1.5) - 0.5 = 0.5; -log sigma(0.5) = log(1 + e^-0.5) = 0.47407698
    losses, metrics = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    close(losses, [0.47407698])
    close(metrics["chosen_rewards"], [-2.0])  # 2 * -1
    close(metrics["rejected_rewards"], [-3.0])  # 2 * -1.5


def test_simpo_margin_shifts_the_decision_point():
    # A reward gap equal to gamma: beta (c - r) = 2 * 0.25 = 0.5 = gamma -> -log sigma(0) = log 2.
    losses, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.25]), beta=2.0, gamma=0.5)
    close(losses, [math.log(2)])


def test_orpo_by_hand():
    # p_c = 0.5: odds 0.5 / 0.5 = 1, log odds 0; p_r = 0.2: odds 0.2 / 0.8 = 0.25, log odds log 0.25
    # log odds ratio = 0 - log 0.25 = log 4; -log sigma(log 4) = -log(4/5) = log 1.25 = 0.22314355
    # L = -log 0.5 + 0.1 * 0.22314355 = 0.69314718 + 0.02231436 = 0.71546154
    losses, metrics = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), lam=0.1)
    close(losses, [0.71546154])
    close(metrics["log_odds_ratio"], [math.log(4)])
    close(metrics["chosen_rewards"], [0.1 * math.log(0.5)])  # lam x avg logp
    close(metrics["rejected_rewards"], [0.1 * math.log(0.2)])


def test_orpo_without_odds_term_is_nll():
    losses, _ = orpo_loss(torch.tensor([-0.7, -2.0]), torch.tensor([-0.1, -3.0]), lam=0.0)
    close(losses, [0.7, 2.0])


def test_orpo_certain_answer_stays_finite():
    # avg logp 0 means p = 1, odds infinite: the clamp holds both answers' log odds at the same finite value, so
    # the ratio is 0: L = -0 + 0.1 x -log sigma(0) = 0.1 ln 2, and the gradient is the NLL's alone, -1
    chosen = torch.tensor([0.0], requires_grad=True)
    losses, _ = orpo_loss(chosen, torch.tensor([0.0]))
    losses.sum().backward()
    close(losses, [0.1 * math.log(2)])
    close(chosen.grad, [-1.0])


def test_kto_by_hand():
    # r = -1 - (-2) = 1 for both; z = 0.5; beta 1
    # desirable:   2.0 * (1 - sigma(1 - 0.5)) = 2.0 * 0.37754067 = 0.75508134
    # undesirable: 0.5 * (1 - sigma(0.5 - 1)) = 0.5 * 0.62245933 = 0.31122967
    losses, metrics = kto_loss(
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([True, False]),
        torch.tensor(0.5),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    close(losses, [0.75508134, 0.31122967])
    close(metrics["rewards"], [1.0, 1.0])


def test_kto_reference_point_clamps_at_zero():
    # kl = -3 -> z = 0: 1 - sigma(1) = 0.26894142; 1 - sigma(-1) = 0.73105858
    labels = torch.tensor([True, False])
    losses, _ = kto_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0]), labels, torch.tensor(-3.0), beta=1.0)
    close(losses, [0.26894142, 0.73105858])


def test_kto_reference_point_has_no_gradient():
    kl = torch.tensor(0.5, requires_grad=True)
    policy_logps = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, _ = kto_loss(policy_logps, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), kl)
    losses.sum().backward()
    assert kl.grad is None
    assert (policy_logps.grad != 0).all()


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_shard_losses_weighted_by_their_units_add_up_to_the_batch_loss(reduction):
    from rlhfkit.losses import reduction_units

    torch.manual_seed(0)
    logprobs, old = torch.randn(5, 4), torch.randn(5, 4)
    adv = torch.randn(5, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])  # an empty row too

    def loss(rows):
        norm = 4 * len(rows)  # Dr. GRPO's constant: max_new_tokens × sequences
        return policy_loss(logprobs[rows], old[rows], adv[rows], mask[rows], 0.2, reduction=reduction,
                           norm_constant=norm)[0]

    whole = loss(list(range(5)))
    total = reduction_units(reduction, mask)
    split = sum(loss(rows) * reduction_units(reduction, mask[rows]) / total for rows in ([0, 1], [2, 3, 4]))
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    assert total == {"token_mean": 10.0, "seq_mean_token_mean": 4.0, "token_sum_norm": 5.0}[reduction]


def test_mean_of_averages_each_metric_over_the_records_that_have_it():
    from rlhfkit.ops import mean_of

    assert mean_of([{"a": 1.0, "b": 4.0}, {"a": 3.0}, {"a": 5.0, "b": 2.0}]) == {"a": 3.0, "b": 3.0}
    assert mean_of([]) == {}


def test_orpo_near_certain_answers_in_bf16_stay_finite():
    # avg log-probs near 0: 1 - exp(a) rounds to 0 in bf16 (log odds inf - inf = NaN); -expm1(a) in float32 does not
    c, r = torch.tensor([-1e-3], dtype=torch.bfloat16), torch.tensor([-2e-3], dtype=torch.bfloat16)
    losses, metrics = orpo_loss(c, r, lam=1.0)
    assert torch.isfinite(losses).all()
    # log odds(a) = a - log(1 - e^a) ≈ -log(-a) for small a: c's odds above r's by about log 2 (bf16 inputs rounded)
    a, b = c.float().item(), r.float().item()
    expected = (a - math.log(-math.expm1(a))) - (b - math.log(-math.expm1(b)))
    assert metrics["log_odds_ratio"].item() == pytest.approx(expected, rel=1e-5)
