"""rlhfkit.advantages against values worked out by hand (arithmetic in the comments)."""

import pytest
import torch

from rlhfkit.advantages import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    approx_kl,
    gae,
    group_advantages,
    overlong_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    reward_to_go,
    rloo_advantages,
)

INF = float("inf")


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_over_all_entries():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7.0 / 3.0)  # (1 + 2 + 4) / 3


def test_masked_mean_along_dim():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1


def test_masked_mean_ignores_garbage_in_padding():
    x = torch.tensor([[1.0, 2.0, INF], [4.0, -1e30, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7.0 / 3.0)
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])


def test_masked_mean_all_masked_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0, 0], [1, 1]])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    close(masked_mean(x, mask, dim=-1), [0.0, 3.5])  # empty row -> 0; (3 + 4) / 2


def test_masked_var_unbiased_and_biased():
    # Kept 1, 2, 3 (mean 2, squared deviations 1 + 0 + 1 = 2): biased 2 / 3, unbiased 2 / 2 = 1.
    x = torch.tensor([1.0, 2.0, 3.0, 1e6])
    mask = torch.tensor([1, 1, 1, 0])
    close(masked_var(x, mask), 1.0)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)


def test_masked_var_of_one_or_zero_entries_is_zero():
    x = torch.tensor([5.0, 7.0])
    close(masked_var(x, torch.tensor([1, 0])), 0.0)
    close(masked_var(x, torch.tensor([0, 0])), 0.0)


def test_masked_whiten_by_hand_padding_stays_zero():
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8) = -1, 0, 1 (to 5e-9); padded entry 0.
    x = torch.tensor([[1.0, 2.0], [3.0, 1e6]])
    mask = torch.tensor([[1, 1], [1, 0]])
    close(masked_whiten(x, mask), [[-1.0, 0.0], [1.0, 0.0]])


def test_masked_whiten_without_shift_adds_mean_back():
    # (x - 2) / 1 + 2 = x on kept entries; padded entry 0.
    x = torch.tensor([1.0, 2.0, 3.0, -7.0])
    mask = torch.tensor([1, 1, 1, 0])
    close(masked_whiten(x, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0])


def test_masked_whiten_divides_by_the_masked_std():
    # x = [1, 3, 5]: mean 3, unbiased var ((-2)^2 + 0 + 2^2) / 2 = 4, std 2 -> [-1, 0, 1]; without the shift the mean
    # comes back: [2, 3, 4]; the padded 100 is in neither statistic
    x = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    close(masked_whiten(x, mask), [[-1.0, 0.0], [1.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[2.0, 3.0], [4.0, 0.0]])
    # one kept entry: var 0 (no spread), so x - mean = 0 whatever the 1e-8 does
    close(masked_whiten(torch.tensor([[7.0, 1.0]]), torch.tensor([[1, 0]])), [[0.0, 0.0]])


def test_masked_whiten_all_masked_is_zero():
    out = masked_whiten(torch.tensor([[3.0, INF]]), torch.tensor([[0, 0]]))
    close(out, [[0.0, 0.0]])


# --------------------------------------------------------------------------- KL estimators

# d = logprobs - ref_logprobs = [0.5, -1.0]
LOGPROBS = torch.tensor([[-1.0, -2.0]])
REF_LOGPROBS = torch.tensor([[-1.5, -1.0]])


def test_kl_k1_is_log_ratio():
    close(approx_kl(LOGPROBS, REF_LOGPROBS, "k1"), [[0.5, -1.0]])


def test_kl_k2_is_half_squared_log_ratio():
    close(approx_kl(LOGPROBS, REF_LOGPROBS, "k2"), [[0.125, 0.5]])  # 0.5^2 / 2, (-1)^2 / 2


def test_kl_k3_by_hand():
    # exp(-0.5) - 1 + 0.5 = 0.60653066 - 0.5 = 0.10653066; exp(1) - 1 - 1 = 0.71828183.
    close(approx_kl(LOGPROBS, REF_LOGPROBS, "k3"), [[0.10653066, 0.71828183]])


def test_kl_k1_is_the_default():
    close(approx_kl(LOGPROBS, REF_LOGPROBS), [[0.5, -1.0]])


def test_kl_all_kinds_zero_when_policies_agree():
    for kind in KL_ESTIMATORS:
        close(approx_kl(LOGPROBS, LOGPROBS, kind), [[0.0, 0.0]])


def test_kl_unknown_kind_lists_valid_names():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        approx_kl(LOGPROBS, REF_LOGPROBS, "k4")


# --------------------------------------------------------------------------- per-token rewards


def test_per_token_rewards_by_hand_with_score_clip():
    score = torch.tensor([2.0, -7.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # row 0: -0.1*0.1, -0.1*0.2 + 2 (last token = index 1), padded 0
    # row 1 (no EOS, mask full to the end): -0.05, +0.05, -0.9 + clip(-7, -5, 5) = -5.9
    # row 2: all masked -> nothing, not even the score
    expected = [[-0.01, 1.98, 0.0], [-0.05, 0.05, -5.9], [0.0, 0.0, 0.0]]
    close(per_token_rewards(score, kl, mask, beta=0.1, clip=5.0), expected)


def test_per_token_rewards_add_a_penalty_after_the_clip():
    # a score already at -clip still loses a missing-EOS penalty: clip(-7) - 2 = -7, clip(3) + 0 = 3
    score, penalty = torch.tensor([-7.0, 3.0]), torch.tensor([-2.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    close(per_token_rewards(score, torch.zeros(2, 2), mask, beta=0.1, clip=5.0, penalty=penalty),
          [[0.0, -7.0], [3.0, 0.0]])


def test_per_token_rewards_without_clip_keeps_score():
    score = torch.tensor([-7.0])
    kl = torch.tensor([[0.5, -0.5, 9.0]])
    mask = torch.ones(1, 3)
    close(per_token_rewards(score, kl, mask, beta=0.1), [[-0.05, 0.05, -7.9]])  # -0.9 - 7


def test_per_token_rewards_length_one_response():
    score = torch.tensor([1.5])
    kl = torch.tensor([[0.2, INF, -INF]])  # garbage after the only response token
    mask = torch.tensor([[1, 0, 0]])
    close(per_token_rewards(score, kl, mask, beta=0.5), [[1.4, 0.0, 0.0]])  # -0.5*0.2 + 1.5


# --------------------------------------------------------------------------- GAE


def gae_loop(rewards, values, lengths, gamma, lam):
    """Plain-Python oracle: one row at a time, V = 0 and A = 0 past the last response token."""
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for b, n in enumerate(lengths):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            advantages[b][t] = next_adv
            returns[b][t] = next_adv + values[b][t]
            next_value = values[b][t]
    return advantages, returns


def test_gae_by_hand():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72), V past the end = 0:
    # t=2: delta = 2 + 0.9*0 - 1.5 = 0.5;        A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;     A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;      A0 = 1.4 + 0.72*0.71 = 1.9112
    # returns = A + V = 2.4112, 1.71, 2.0
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5]])
    close(returns, [[2.4112, 1.71, 2.0]])


def test_gae_padding_values_do_not_leak_back():
    # The same row as test_gae_by_hand with garbage after it: V_{T+1} must still be 0.
    rewards = torch.tensor([[1.0, 0.0, 2.0, 100.0, INF]])
    values = torch.tensor([[0.5, 1.0, 1.5, 100.0, -INF]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5, 0.0, 0.0]])
    close(returns, [[2.4112, 1.71, 2.0, 0.0, 0.0]])


def test_gae_length_one_response():
    # delta_0 = 3 + 0 - 1 = 2 = A_0; R_0 = 2 + 1 = 3.
    advantages, returns = gae(torch.tensor([[3.0, 9.0]]), torch.tensor([[1.0, 9.0]]), torch.tensor([[1, 0]]), 1.0, 0.95)
    close(advantages, [[2.0, 0.0]])
    close(returns, [[3.0, 0.0]])


def test_gae_all_masked_row_is_zero():
    advantages, returns = gae(torch.tensor([[INF, 1.0]]), torch.tensor([[2.0, INF]]), torch.zeros(1, 2), 1.0, 0.95)
    close(advantages, [[0.0, 0.0]])
    close(returns, [[0.0, 0.0]])


def test_gae_matches_plain_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    values = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    lengths = [0, 1, 4, 7, 7]  # empty row, length-1 row, padded row, two rows with no EOS
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.9)
    expected_adv, expected_ret = gae_loop(rewards.tolist(), values.tolist(), lengths, 0.99, 0.9)
    close(advantages, expected_adv, atol=1e-12)
    close(returns, expected_ret, atol=1e-12)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # With gamma = lam = 1 the deltas telescope: A_t = sum_{s>=t} r_s - V_t, so returns = reward-to-go.
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0, 0.0]])
    close(advantages, [[5.5, 4.5, 2.5, 0.0]])


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_by_hand():
    # group [1, 2, 3]: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1 -> (r - 2) / (1 + 1e-4)
    # group [5, 5, 5]: all equal -> 0
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    close(adv, [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    # group [0, 2, 4]: mean 2, sample std sqrt((4 + 0 + 4) / 2) = 2 -> (r - 2) / (2 + 1e-4)
    close(group_advantages(torch.tensor([0.0, 2.0, 4.0]), group_size=3), [-2 / 2.0001, 0.0, 2 / 2.0001])


def test_group_advantages_identical_rewards_exactly_zero():
    # In float32 the mean of three 0.1233s is not exactly 0.1233: r - mean comes out about 7e-9, about
    # 7e-5 once divided by std + 1e-4. The advantage must be exactly 0 anyway.
    rewards = torch.tensor([0.1233, 0.1233, 0.1233, 0.7, 0.7, 0.7])
    assert torch.equal(group_advantages(rewards, 3), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, 3, scale="none"), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, 3, scale="batch"), torch.zeros(6))


def test_group_advantages_unscaled_is_dr_grpo():
    # r - group mean: [1, 2, 3] - 2; [0, 4] - 2.
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 2.0])
    close(group_advantages(rewards, 3, scale="none"), [-1.0, 0.0, 1.0, -2.0, 2.0, 0.0])


def test_group_advantages_scaled_by_the_batch_std():
    # TRL's scale_rewards="batch": r - group mean as above, over the std of all six rewards: mean 2, squared
    # deviations 1 + 0 + 1 + 4 + 4 + 0 = 10, sample variance 10 / 5 = 2
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 2.0])
    expected = [a / (2 ** 0.5 + 1e-4) for a in [-1.0, 0.0, 1.0, -2.0, 2.0, 0.0]]
    close(group_advantages(rewards, 3, scale="batch"), expected)
    with pytest.raises(ValueError, match="unknown scale 'global'; valid names: \\['group', 'batch', 'none'\\]"):
        group_advantages(rewards, 3, scale="global")


def test_overlong_penalty_by_hand():
    # DAPO eq. 13: L_max 10, buffer 4: free up to 6 tokens, then -(L - 6) / 4, at most -1; times factor 0.5
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    close(overlong_penalty(lengths, max_length=10, buffer=4, factor=0.5), [0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    assert torch.equal(overlong_penalty(lengths, 10, buffer=0), torch.zeros(6))


def test_group_advantages_group_size_one_is_zero():
    assert torch.equal(group_advantages(torch.tensor([1.0, -3.0, 2.0]), 1), torch.zeros(3))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_rloo_by_hand():
    # [1, 2, 6]: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
    # [0, 0, 3]: 0 - (0+3)/2 = -1.5 (twice); 3 - (0+0)/2 = 3
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    close(adv, [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_rloo_group_of_two():
    close(rloo_advantages(torch.tensor([1.0, 4.0]), 2), [-3.0, 3.0])  # 1 - 4, 4 - 1


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)


# --------------------------------------------------------------------------- reward-to-go


def test_reward_to_go_discounted_by_hand():
    # gamma 0.5: G2 = 3; G1 = 2 + 0.5*3 = 3.5; G0 = 1 + 0.5*3.5 = 2.75; padding 0 (its 100 ignored)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(reward_to_go(rewards, mask, gamma=0.5), [[2.75, 3.5, 3.0, 0.0]])


def test_reward_to_go_undiscounted_default():
    # gamma 1: suffix sums 1+2+3 = 6, 2+3 = 5, 3
    close(reward_to_go(torch.tensor([[1.0, 2.0, 3.0, INF]]), torch.tensor([[1, 1, 1, 0]])), [[6.0, 5.0, 3.0, 0.0]])


def test_reward_to_go_no_eos_and_all_masked_rows():
    rewards = torch.tensor([[1.0, 1.0], [INF, 5.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(reward_to_go(rewards, mask), [[2.0, 1.0], [0.0, 0.0]])


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_raises_beta_when_kl_above_target():
    # e = 6.6 / 6 - 1 = 0.1; beta = 0.1 * (1 + 0.1 * 256 / 10000) = 0.1 * 1.00256
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)
    assert ctl.beta == pytest.approx(0.100256, abs=1e-12)


def test_adaptive_kl_lowers_beta_when_kl_below_target():
    # e = 5.4 / 6 - 1 = -0.1; beta = 0.1 * (1 - 0.1 * 256 / 10000) = 0.1 * 0.99744
    ctl = AdaptiveKLController(0.1)
    ctl.update(torch.tensor(5.4), n_steps=256)
    assert ctl.beta == pytest.approx(0.099744, abs=1e-9)


def test_adaptive_kl_error_clipped_to_plus_minus_point_two():
    # 60 / 6 - 1 = 9 -> 0.2: 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    # 0 / 6 - 1 = -1 -> -0.2: 0.1 * (1 - 0.2 * 256 / 10000) = 0.099488
    up, down = AdaptiveKLController(0.1), AdaptiveKLController(0.1)
    up.update(60.0, 256)
    down.update(0.0, 256)
    assert up.beta == pytest.approx(0.100512, abs=1e-12)
    assert down.beta == pytest.approx(0.099488, abs=1e-12)


def test_adaptive_kl_passes_over_a_nan_kl():
    # a NaN batch (skipped with train.on_nan skip) once made beta NaN for every later step; +inf clips to +0.2
    ctl = AdaptiveKLController(0.1)
    ctl.update(float("nan"), 256)
    assert ctl.beta == 0.1
    ctl.update(float("inf"), 256)
    assert ctl.beta == pytest.approx(0.100512, abs=1e-12)


def test_adaptive_kl_state_dict_restores_beta():
    ctl = AdaptiveKLController(0.1)
    ctl.update(60.0, 256)
    restored = AdaptiveKLController(0.1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.beta == ctl.beta


def test_fixed_kl_controller_update_is_noop_and_restores():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.beta == 0.05
    other = FixedKLController(0.2)
    other.load_state_dict(ctl.state_dict())
    assert other.beta == 0.05


def test_bf16_inputs_are_summed_in_float32():
    # 512 tokens of reward 0.01: every return is the count of tokens left times 0.01; bf16 running sums round
    # that by ~2.5%, float32 keeps it within 1e-5
    rewards = torch.full((1, 512), 0.01, dtype=torch.bfloat16)
    mask = torch.ones(1, 512)
    expected = 0.01 * torch.arange(512, 0, -1, dtype=torch.float32)[None] * (rewards.float()[0, 0] / 0.01)
    returns = reward_to_go(rewards, mask)
    assert returns.dtype == torch.float32
    torch.testing.assert_close(returns, expected, rtol=1e-5, atol=1e-5)
    advantages, gae_returns = gae(rewards, torch.zeros(1, 512, dtype=torch.bfloat16), mask, 1.0, 1.0)
    torch.testing.assert_close(gae_returns, expected, rtol=1e-5, atol=1e-5)
    assert masked_whiten(rewards + torch.arange(512) * 0.001, mask).dtype == torch.float32


def test_explained_variance_by_hand():
    from rlhfkit.trainers.ppo import explained_variance

    # R - V = [0, 0, 2] over the mask (mean 2/3, variance ((2/3)^2 x 2 + (4/3)^2) / 2 = 4/3); Var R = 4 (mean 3):
    # 1 - (4/3) / 4 = 2/3; the padded fourth token is in neither
    returns, values = torch.tensor([[1.0, 3.0], [5.0, 1e6]]), torch.tensor([[1.0, 3.0], [3.0, -7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert explained_variance(values, returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(returns - 1.0, returns, mask) == pytest.approx(1.0)  # off by a constant: all of it
    assert explained_variance(torch.zeros(2, 2), returns, mask) == pytest.approx(0.0)
    assert explained_variance(values, torch.full((2, 2), 4.0), mask) == 0.0  # returns without spread
