"""Every function of harness.methods.losses against numbers computed by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from harness.methods.losses import (
    NonFiniteError,
    adaptive_kl_coef,
    aggregate_loss,
    bradley_terry_loss,
    check_finite,
    clipped_value_loss,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    group_relative_advantages,
    kl_k2,
    kl_k3,
    kl_log_ratio,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    missing_eos_penalty,
    online_pairs,
    pairwise_accuracy,
    ppo_clipped_surrogate,
    rloo_advantages,
    rloo_policy_loss,
    sequence_kl_shaped_rewards,
    sequence_logprobs,
    td_residuals,
    token_logprobs,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# A hand-made [2, 3] batch: row 0 has 3 valid tokens, row 1 has 1 (right padding).
X = [[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]]
M = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


# ------------------------------------------------------------------------- masked reductions


def test_masked_sum_and_mean():
    x, m = t(X), t(M)
    # valid entries 1, 2, 3, 4: sum 10, mean 10 / 4 = 2.5
    assert_close(masked_sum(x, m), t(10.0))
    assert_close(masked_mean(x, m), t(2.5))
    # per row: (1 + 2 + 3) / 3 = 2 ; 4 / 1 = 4
    assert_close(masked_mean(x, m, dim=-1), t([2.0, 4.0]))
    assert_close(masked_sum(x, m, dim=-1), t([6.0, 4.0]))
    # bool and int masks give the same
    assert_close(masked_mean(x, m.bool()), t(2.5))
    assert_close(masked_mean(x, m.long()), t(2.5))


def test_masked_mean_empty_mask_and_garbage():
    x = t([[1.0, float("inf")], [float("nan"), 2.0]])
    m = t([[1.0, 0.0], [0.0, 1.0]])
    # inf / nan sit at masked positions only -> mean (1 + 2) / 2 = 1.5
    assert_close(masked_mean(x, m), t(1.5))
    # an all-zero mask gives 0, with a finite (zero) gradient
    y = t([1.0, 2.0]).requires_grad_()
    out = masked_mean(y, t([0.0, 0.0]))
    out.backward()
    assert out.item() == 0.0
    assert_close(y.grad, t([0.0, 0.0]))
    # a row without valid tokens gives 0 for that row
    assert_close(masked_mean(t([[1.0, 3.0], [5.0, 7.0]]), t([[1, 1], [0, 0]]), dim=1),
                 t([2.0, 0.0]))


def test_masked_var():
    x, m = t(X), t(M)
    # valid 1, 2, 3, 4, mean 2.5: squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # population 5 / 4 = 1.25 ; unbiased 5 / 3
    assert_close(masked_var(x, m, unbiased=False), t(1.25))
    assert_close(masked_var(x, m, unbiased=True), t(5.0 / 3.0))
    # a single valid entry: unbiased variance is undefined -> 0
    assert masked_var(t([3.0, 9.0]), t([1.0, 0.0])).item() == 0.0


def test_masked_whiten():
    x, m = t(X), t(M)
    w = masked_whiten(x, m)
    # (x - 2.5) / sqrt(5/3 + 1e-8): e.g. (1 - 2.5) / 1.290994 = -1.161895
    std = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = t([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert_close(w, expected)
    assert w[0, 0].item() == pytest.approx(-1.161895, abs=1e-6)
    # mean 0 and (unbiased) std 1 over the valid entries; padding stays 0
    valid = w[m.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-6)
    # shift_mean=False adds the mean 2.5 back at valid positions only
    w2 = masked_whiten(x, m, shift_mean=False)
    assert_close(w2, torch.where(m.bool(), expected + 2.5, 0.0))


# ------------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_against_hand_softmax():
    # t=0: logits log[1, 2, 3] -> p = [1/6, 1/3, 1/2]; label 2 -> log(1/2)
    # t=1: logits [0, 0, 0]    -> p = 1/3 each;          label 0 -> log(1/3)
    # t=2: label -100 (masked)  -> 0
    logits = t([[[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0], [5.0, 1.0, 2.0]]])
    labels = torch.tensor([[2, 0, -100]])
    expected = t([[math.log(0.5), math.log(1 / 3), 0.0]])
    assert_close(token_logprobs(logits, labels), expected)
    mask = t([[1.0, 1.0, 0.0]])
    assert_close(token_logprobs(logits, labels, mask), expected)
    # a mask that also hides t=1 zeroes it
    assert_close(token_logprobs(logits, labels, t([[1.0, 0.0, 0.0]])),
                 t([[math.log(0.5), 0.0, 0.0]]))
    # shift invariance / stability: +1000 on all logits changes nothing, no overflow (float32)
    big = token_logprobs((logits + 1000.0).float(), labels, mask)
    assert_close(big, expected.float())
    # agrees with cross-entropy
    ce = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2], reduction="none")
    assert_close(token_logprobs(logits, labels)[0, :2], -ce)


def test_sequence_logprobs():
    # row 0: -1 - 2 = -3 (third token masked); row 1: -0.5
    lp = t([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    assert_close(sequence_logprobs(lp, t([[1, 1, 0], [1, 0, 0]])), t([-3.0, -0.5]))


def test_entropy_from_logits():
    # uniform over V = 4: H = log 4
    assert_close(entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.float64)),
                 t([[math.log(4)]]))
    # p = [1/6, 1/3, 1/2]: H = (1/6) log 6 + (1/3) log 3 + (1/2) log 2 = 1.011404
    h = (1 / 6) * math.log(6) + (1 / 3) * math.log(3) + 0.5 * math.log(2)
    out = entropy_from_logits(t([[[0.0, math.log(2), math.log(3)]]]))
    assert_close(out, t([[h]]))
    assert h == pytest.approx(1.011404, abs=1e-6)
    # near one-hot [100, 0, 0]: H ~ 2 * 100 e^-100 ~ 0 ; no overflow at 1e4 either (float32)
    assert entropy_from_logits(t([[[100.0, 0.0, 0.0]]])).item() == pytest.approx(0.0, abs=1e-30)
    assert entropy_from_logits(torch.tensor([[[1e4, 0.0, 0.0]]])).item() == pytest.approx(0.0)
    # a -inf logit (top-k masking): [0, 0, -inf] -> H = log 2, finite gradient
    z = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    hz = entropy_from_logits(z)
    hz.sum().backward()
    assert hz.item() == pytest.approx(math.log(2))
    assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------- reward model


def test_bradley_terry_loss_and_accuracy():
    # -log sigma(2) = log(1 + e^-2) = 0.126928 ; -log sigma(0) = log 2 = 0.693147 ; mean 0.410038
    loss = bradley_terry_loss(t([2.0, 0.0]), t([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2)
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)
    # stable for large margins: -log sigma(-1000) = 1000
    assert bradley_terry_loss(t([0.0]), t([1000.0])).item() == pytest.approx(1000.0)
    # win, tie (0.5), loss -> (1 + 0.5 + 0) / 3 = 0.5
    assert pairwise_accuracy(t([2.0, 0.0, 1.0]), t([0.0, 0.0, 3.0])).item() == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- KL


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])
    # k1 = logp - ref = [1, -1]
    assert_close(kl_log_ratio(logp, ref), t([1.0, -1.0]))
    # k2 = 0.5 (logp - ref)^2 = [0.5, 0.5]
    assert_close(kl_k2(logp, ref), t([0.5, 0.5]))
    # k3 with d = ref - logp = [-1, 1]: e^-1 + 1 - 1 = 0.367879 ; e - 1 - 1 = 0.718282
    assert_close(kl_k3(logp, ref), t([math.exp(-1), math.e - 2]))
    # all three are 0 when the policies agree
    same = t([-0.3, -4.0])
    for fn in (kl_log_ratio, kl_k2, kl_k3):
        assert_close(fn(same, same), t([0.0, 0.0]))
    # k3 >= 0 everywhere, == 0 only where equal
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g, dtype=torch.float64)
    b = torch.randn(1000, generator=g, dtype=torch.float64)
    k3 = kl_k3(a, b)
    assert (k3 >= 0).all() and (k3 > 0).all()
    # tiny differences stay accurate (expm1): d = 1e-6 -> d^2 / 2 = 5e-13
    assert kl_k3(t([0.0]), t([1e-6])).item() == pytest.approx(5e-13, rel=1e-5)


# ------------------------------------------------------------------------------- TD and GAE


def test_lecture_advantage_example_learn_sleep():
    # State "The best way to", two one-step episodes (gamma = 1, V(s) = 0.5):
    #   "learn": r = 0.8 -> A = 0.8 + 0 - 0.5 = 0.3 ; "sleep": r = 0.1 -> A = 0.1 - 0.5 = -0.4
    rewards, values, mask = t([[0.8], [0.1]]), t([[0.5], [0.5]]), t([[1.0], [1.0]])
    assert_close(td_residuals(rewards, values, mask, gamma=1.0), t([[0.3], [-0.4]]))
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(adv, t([[0.3], [-0.4]]))
    assert_close(ret, t([[0.8], [0.1]]))  # returns = A + V = the rewards


# Padded batch, T = 3: row 0 has 3 valid tokens, row 1 has 2 (position 2 is padding with
# garbage reward 9 and value 7 that must not leak in).
GAE_R = [[1.0, 0.0, 2.0], [0.5, 1.5, 9.0]]
GAE_V = [[0.5, 1.0, 1.5], [2.0, 1.0, 7.0]]
GAE_M = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_td_residuals_padded():
    # gamma = 0.9
    # row 0: d2 = 2 + 0 - 1.5 = 0.5 ; d1 = 0 + 0.9*1.5 - 1 = 0.35 ; d0 = 1 + 0.9*1 - 0.5 = 1.4
    # row 1: d1 = 1.5 + 0 - 1 = 0.5 (V past the end = 0, not 7) ; d0 = 0.5 + 0.9*1 - 2 = -0.6
    d = td_residuals(t(GAE_R), t(GAE_V), t(GAE_M), gamma=0.9)
    assert_close(d, t([[1.4, 0.35, 0.5], [-0.6, 0.5, 0.0]]))


def test_gae_padded_batch():
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72
    # row 0: A2 = 0.5 ; A1 = 0.35 + 0.72*0.5 = 0.71 ; A0 = 1.4 + 0.72*0.71 = 1.9112
    #        R = A + V = [2.4112, 1.71, 2.0]
    # row 1: A1 = 0.5 ; A0 = -0.6 + 0.72*0.5 = -0.24 ; A2 = 0 (pad)
    #        R = [1.76, 1.5, 0]
    adv, ret = gae_advantages(t(GAE_R), t(GAE_V), t(GAE_M), gamma=0.9, lam=0.8)
    assert_close(adv, t([[1.9112, 0.71, 0.5], [-0.24, 0.5, 0.0]]))
    assert_close(ret, t([[2.4112, 1.71, 2.0], [1.76, 1.5, 0.0]]))


def test_gae_limits():
    r, v, m = t(GAE_R), t(GAE_V), t(GAE_M)
    # lam = 0: A = delta (TD(0) residuals)
    adv, _ = gae_advantages(r, v, m, gamma=0.9, lam=0.0)
    assert_close(adv, td_residuals(r, v, m, 0.9))
    assert_close(adv, t([[1.4, 0.35, 0.5], [-0.6, 0.5, 0.0]]))
    # lam = 1, gamma = 1: reward-to-go minus V
    # row 0: [1+0+2, 0+2, 2] - [0.5, 1, 1.5] = [2.5, 1.0, 0.5]
    # row 1: [0.5+1.5, 1.5] - [2, 1] = [0.0, 0.5] ; pad 0
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=1.0)
    assert_close(adv, t([[2.5, 1.0, 0.5], [0.0, 0.5, 0.0]]))
    assert_close(ret, t([[3.0, 2.0, 2.0], [2.0, 1.5, 0.0]]))


def test_gae_has_no_gradient():
    v = t(GAE_V).requires_grad_()
    adv, ret = gae_advantages(t(GAE_R), v, t(GAE_M), gamma=0.9, lam=0.8)
    assert not adv.requires_grad and not ret.requires_grad


def test_kl_penalized_rewards_right_padded():
    # beta = 0.1, scores [10, 20]
    # row 0 (3 valid): logp - ref = [0.5, -0.5, -1.5] -> -0.1 * = [-0.05, 0.05, 0.15], +10 at t=2
    # row 1 (2 valid): logp - ref = [1, 1, pad]        -> [-0.1, -0.1 + 20, 0]
    # row 2 (0 valid): nothing at all
    logp = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, 5.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.5, -1.5], [-2.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    out = kl_penalized_rewards(t([10.0, 20.0, 30.0]), logp, ref, mask, beta=0.1)
    assert_close(out, t([[-0.05, 0.05, 10.15], [-0.1, 19.9, 0.0], [0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------- PPO


def _ppo(ratio: float, adv: float, eps: float = 0.2, eps_high: float | None = None):
    logp = t([[math.log(ratio * 0.1)]]).requires_grad_()
    old = t([[math.log(0.1)]])
    loss, stats = ppo_clipped_surrogate(logp, old, t([[adv]]), t([[1.0]]), eps, eps_high)
    loss.backward()
    return loss, stats, logp.grad


def test_ppo_clip_lecture_example():
    # p_old = 0.1, p_new = 0.3 -> ratio c = 3, eps = 0.2
    # A = 2 > 0: min(3*2, 1.2*2) = 2.4 -> objective 1.2 A, loss -2.4 ; clipped term active,
    #   so no gradient
    loss, stats, grad = _ppo(3.0, 2.0)
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert stats["clip_frac"].item() == 1.0
    assert stats["ratio_mean"].item() == pytest.approx(3.0)
    # approx_kl = 0.5 (log 3)^2 = 0.603474
    assert stats["approx_kl"].item() == pytest.approx(0.5 * math.log(3) ** 2)
    assert grad.item() == 0.0
    # A = -2 < 0: min(3*(-2), 1.2*(-2)) = -6 -> unclipped 3A active, loss = -3A = 6
    #   d loss / d logp = -A * c = 6
    loss, stats, grad = _ppo(3.0, -2.0)
    assert loss.item() == pytest.approx(6.0)
    assert stats["clip_frac"].item() == 0.0
    assert grad.item() == pytest.approx(6.0)


def test_ppo_clip_other_cases():
    # inside the range: c = 1.1, A = 1 -> loss -1.1, not clipped
    loss, stats, _ = _ppo(1.1, 1.0)
    assert loss.item() == pytest.approx(-1.1) and stats["clip_frac"].item() == 0.0
    # below the range with A < 0: c = 0.5, A = -1: min(-0.5, 0.8*(-1)) = -0.8 -> loss 0.8, clipped
    loss, stats, grad = _ppo(0.5, -1.0)
    assert loss.item() == pytest.approx(0.8) and stats["clip_frac"].item() == 1.0
    assert grad.item() == 0.0
    # below the range with A > 0: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped
    loss, stats, _ = _ppo(0.5, 1.0)
    assert loss.item() == pytest.approx(-0.5) and stats["clip_frac"].item() == 0.0
    # DAPO clip-higher: eps_high = 0.28, c = 3, A = 1 -> loss -1.28 ; the low side keeps 0.2
    loss, _, _ = _ppo(3.0, 1.0, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.28)
    loss, _, _ = _ppo(0.5, -1.0, eps_high=0.28)
    assert loss.item() == pytest.approx(0.8)


def test_ppo_batch_token_aggregation_and_padding():
    # tokens (c=3, A=2) -> -2.4 and (c=3, A=-2) -> 6 ; third token is padding with old_logp = -inf
    # (ratio inf) that must not produce NaN. token mean (-2.4 + 6) / 2 = 1.8, clip_frac 1/2
    logp = t([[math.log(0.3), math.log(0.3), 0.0]])
    old = t([[math.log(0.1), math.log(0.1), float("-inf")]])
    adv = t([[2.0, -2.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, stats = ppo_clipped_surrogate(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(1.8)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(3.0)
    assert all(not v.requires_grad for v in stats.values())
    # dr_grpo over max_len T = 3: (−2.4 + 6) / (1 * 3) = 1.2
    loss, _ = ppo_clipped_surrogate(logp, old, adv, mask, 0.2, aggregation="dr_grpo")
    assert loss.item() == pytest.approx(1.2)


def test_aggregate_loss_modes():
    x, m = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t(M)
    # token: (1 + 2 + 3 + 4) / 4 = 2.5
    for mode in ("token", "bnpo", "dapo"):
        assert aggregate_loss(x, m, mode).item() == pytest.approx(2.5)
    # sequence: mean(2, 4) = 3
    for mode in ("sequence", "grpo"):
        assert aggregate_loss(x, m, mode).item() == pytest.approx(3.0)
    # dr_grpo: 10 / (2 * 3) = 1.6667 ; with max_len 5: 10 / (2 * 5) = 1
    assert aggregate_loss(x, m, "dr_grpo").item() == pytest.approx(10 / 6)
    assert aggregate_loss(x, m, "dr_grpo", max_len=5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="token.*dr_grpo"):
        aggregate_loss(x, m, "mean")


def test_clipped_value_loss():
    # c = 0.2
    # token 0: V=1, V_old=0.5, R=2 -> V_clip = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # token 1: V=2, V_old=1.5, R=1 -> V_clip = 1.7; (2-1)^2 = 1, (1.7-1)^2 = 0.49 -> 1
    # token 2: padding
    # loss = 0.5 * (1.69 + 1) / 2 = 0.6725 ; value_clip_frac = 1/2
    v = t([[1.0, 2.0, 50.0]]).requires_grad_()
    loss, stats = clipped_value_loss(v, t([[0.5, 1.5, 0.0]]), t([[2.0, 1.0, 0.0]]),
                                     t([[1.0, 1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(0.6725)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # token 0: clipped branch active and V outside the clip range -> 0 grad
    # token 1: d/dV 0.5 * (V - R)^2 / 2 = 0.5 * (2 - 1) = 0.5 ; padding 0
    assert_close(v.grad, t([[0.0, 0.5, 0.0]]))


def test_a_value_inside_the_clip_range_is_never_counted_as_clipped():
    """Inside the clip range nothing is clipped: the clip fraction is exactly 0 and the loss is the
    plain squared error. ``V_old + clamp(V - V_old, -c, c)`` rounds away from V whenever V and
    V_old are not within a factor of two of each other (the subtraction is then inexact), and the
    max then counts that rounding as clipping: 6% of these tokens, and the one token of 128 that
    made one process and two DDP ranks disagree (0.2031 vs 0.2109). ``clamp(V, V_old - c,
    V_old + c)`` (TRL's form) returns V itself inside the range."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4096, generator=g) * 0.2
    values = torch.randn(4096, generator=g) * 0.2
    inside = (values - old).abs() < 0.2
    old, values = old[inside][None], values[inside][None].requires_grad_()  # [1, ~2100]
    returns = torch.randn(values.shape, generator=g) * 0.2
    mask = torch.ones_like(returns)
    loss, stats = clipped_value_loss(values, old, returns, mask, 0.2)
    assert stats["value_clip_frac"].item() == 0.0
    assert loss.item() == (0.5 * ((values - returns) ** 2).mean()).item()
    loss.backward()
    assert_close(values.grad, (values - returns).detach() / values.numel())


def test_explained_variance():
    # R = [1, 2, 3, 4], V = [1, 2, 3, 3]: R - V = [0, 0, 0, 1] -> population var 0.1875
    # Var[R] = 1.25 -> EV = 1 - 0.1875 / 1.25 = 0.85 ; the padded 5th entry is ignored
    r = t([[1.0, 2.0, 3.0, 4.0, 100.0]])
    v = t([[1.0, 2.0, 3.0, 3.0, -100.0]])
    m = t([[1, 1, 1, 1, 0]])
    assert explained_variance(v, r, m).item() == pytest.approx(0.85)
    assert explained_variance(r, r, m).item() == pytest.approx(1.0)
    # constant returns: Var[R] = 0 -> 0 (documented), not NaN
    ev = explained_variance(t([[0.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]]))
    assert ev.item() == 0.0


def test_adaptive_kl_coef():
    # coef 0.2, target 4, horizon 10000, n_steps 64
    # KL 6:   6/4 - 1 = 0.5 -> clip 0.2   -> 0.2 * (1 + 0.2 * 64/1e4) = 0.200256
    # KL 3:   3/4 - 1 = -0.25 -> -0.2     -> 0.2 * (1 - 0.00128)     = 0.199744
    # KL 4.4: 0.1 (inside)                -> 0.2 * (1 + 0.1 * 0.0064) = 0.200128
    assert adaptive_kl_coef(0.2, 6.0, 4.0, 10000, 64) == pytest.approx(0.200256)
    assert adaptive_kl_coef(0.2, 3.0, 4.0, 10000, 64) == pytest.approx(0.199744)
    assert adaptive_kl_coef(0.2, torch.tensor(4.4), 4.0, 10000, 64) == pytest.approx(0.200128)
    assert adaptive_kl_coef(0.2, 4.0, 4.0, 10000, 64) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        adaptive_kl_coef(0.2, 1.0, 0.0, 10000, 64)


# ------------------------------------------------------------------------------------ GRPO


def test_group_relative_advantages():
    # G = 3, 2 prompts. group 0 = [1, 2, 3]: mu 2, sigma^2 = (1 + 0 + 1)/3 = 2/3
    #   A = [-1, 0, 1] / (0.816497 + 1e-4) = [-1.224595, 0, 1.224595]
    # group 1 = [0, 0, 6]: mu 2, sigma^2 = (4 + 4 + 16)/3 = 8 -> sigma 2.828427
    #   A = [-2, -2, 4] / 2.828527
    r = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    s0, s1 = math.sqrt(2 / 3) + 1e-4, math.sqrt(8) + 1e-4
    expected = t([-1 / s0, 0.0, 1 / s0, -2 / s1, -2 / s1, 4 / s1])
    out = group_relative_advantages(r, 3)
    assert_close(out, expected)
    assert out[2].item() == pytest.approx(1.224595, abs=1e-6)
    # Dr. GRPO: R - mu
    assert_close(group_relative_advantages(r, 3, scale_rewards=False),
                 t([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))
    # identical rewards in a group -> 0 advantages, not NaN
    assert_close(group_relative_advantages(t([1.0, 1.0, 1.0]), 3), t([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="divisible"):
        group_relative_advantages(t([1.0, 2.0, 3.0, 4.0, 5.0]), 3)


# ------------------------------------------------------------------------------------- DPO


def test_missing_eos_penalty_by_hand():
    # EOS = 2: row 0 ends with it, row 1 is cut off (no EOS among its valid tokens), row 2 has
    # an EOS token only in its padding (invalid: cut off too)
    response = torch.tensor([[5, 2, 0], [5, 6, 7], [5, 6, 2]])
    mask = t([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    out = missing_eos_penalty(t([1.0, 1.0, 0.5]), response, mask, eos_id=2, penalty=1.5)
    assert out.tolist() == [1.0, -0.5, -1.0]
    scores = t([1.0, 1.0, 0.5])
    assert missing_eos_penalty(scores, response, mask, 2, 0.0) is scores


def test_online_pairs_take_each_prompts_best_and_worst_and_skip_ties():
    # k = 4: prompt 0 scores (0, 1, 1, 0) -> chosen row 1 (the first best), rejected row 0;
    # prompt 1 all 2 -> no preference; prompt 2 (3, 1, 2, 0) -> chosen row 8, rejected row 11
    chosen, rejected, valid = online_pairs(t([0.0, 1, 1, 0, 2, 2, 2, 2, 3, 1, 2, 0]), 4)
    assert chosen.tolist() == [1, 4, 8] and rejected.tolist() == [0, 4, 11]
    assert valid.tolist() == [True, False, True]
    chosen, rejected, valid = online_pairs(t([0.2, -0.5]), 2)  # k = 2: Guo et al.'s pair
    assert (chosen.tolist(), rejected.tolist(), valid.tolist()) == ([0], [1], [True])
    with pytest.raises(ValueError, match="k >= 2"):
        online_pairs(t([1.0]), 1)
    with pytest.raises(ValueError, match="divisible"):
        online_pairs(t([1.0, 2.0, 3.0]), 2)


def test_dpo_losses_by_hand():
    # pair 0: pi_w = -1, pi_l = -2, ref_w = ref_l = -1.5 -> h = 0.5 - (-0.5) = 1, beta h = 0.1
    # pair 1: pi_w = -3, pi_l = -1, ref = -2, -2          -> h = -1 - 1 = -2, beta h = -0.2
    pc, pr, rc, rr, beta = t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -2.0]), 0.1
    # sigmoid: -log sigma(0.1) = log(1 + e^-0.1) = 0.644397 ; -log sigma(-0.2) = log(1 + e^0.2)
    #          = 0.798139
    losses, r_w, r_l = dpo_loss(pc, pr, rc, rr, beta)
    assert_close(losses, t([math.log1p(math.exp(-0.1)), math.log1p(math.exp(0.2))]))
    assert losses[0].item() == pytest.approx(0.644397, abs=1e-6)
    assert losses[1].item() == pytest.approx(0.798139, abs=1e-6)
    # rewards = beta (pi - ref): chosen [0.05, -0.1], rejected [-0.05, 0.1]
    assert_close(r_w, t([0.05, -0.1]))
    assert_close(r_l, t([-0.05, 0.1]))
    # label smoothing 0.1: 0.9 * 0.644397 + 0.1 * log(1 + e^0.1) = 0.579957 + 0.074440 = 0.654397
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    assert losses[0].item() == pytest.approx(0.654397, abs=1e-6)
    assert losses[0].item() == pytest.approx(
        0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1)))
    # IPO: (h - 1/(2 beta))^2 = (1 - 5)^2 = 16 ; (-2 - 5)^2 = 49
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    assert_close(losses, t([16.0, 49.0]))
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(pc, pr, rc, rr, beta, loss_type="hinge")


def test_dpo_gradient_and_detached_rewards():
    # d/dpi_w of -log sigma(beta h) = -beta (1 - sigma(beta h)) ; at beta h = 0.1:
    #   -0.1 * (1 - 0.524979) = -0.047502
    pc = t([-1.0]).requires_grad_()
    losses, r_w, _ = dpo_loss(pc, t([-2.0]), t([-1.5]), t([-1.5]), 0.1)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.1))))
    assert not r_w.requires_grad


# ---------------------------------------------------------------------------------- guards


def test_check_finite():
    check_finite("train/loss", t([1.0, 2.0]))
    check_finite("train/loss", 3.0)
    check_finite("ids", torch.tensor([1, 2]))
    with pytest.raises(NonFiniteError, match="train/loss"):
        check_finite("train/loss", t([1.0, float("nan")]))
    with pytest.raises(ValueError, match="train/reward"):
        check_finite("train/reward", t(float("inf")))


def test_warmup_cosine_schedule_by_hand():
    from harness.methods.optim import warmup_cosine

    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)      # (0+1)/10
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)    # half-way: 0.1 + 0.9 * 0.5
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)



# ---------------------------------------------------------------------------------------- RLOO
def test_rloo_advantages_leave_one_out():
    # k = 2: each baseline is the other sample: [1, 2] -> [-1, 1]; [3, 6] -> [-3, 3]
    assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2),
                 torch.tensor([-1.0, 1.0, -3.0, 3.0]))
    # k = 3, [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    a = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3)
    assert_close(a, torch.tensor([-3.0, -1.5, 4.5]))
    # = k/(k-1) (R - mean): unbiased and zero-sum within the group
    assert_close(a, 1.5 * (torch.tensor([1.0, 2.0, 6.0]) - 3.0))
    assert float(a.sum()) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="divisible"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_sequence_kl_shaped_rewards_sum_the_per_token_penalty():
    # k1 = logp - ref = [[0.5, 0], [0, -2 (masked)]] -> sums [0.5, 0]; R = score - 0.5 * sum
    scores = torch.tensor([1.0, 0.0])
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert_close(sequence_kl_shaped_rewards(scores, logp, ref, mask, 0.5), torch.tensor([0.75, 0.0]))


def test_rloo_policy_loss_is_sequence_reinforce_at_ratio_one():
    # ratio 1: L = 1/B sum_i sum_t -A_i m_it = (-(2 + 2) + 1) / 2 = -1.5
    logp = torch.zeros(2, 2, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = rloo_policy_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-1.5) and float(stats["clip_frac"]) == 0.0
    loss.backward()
    # the REINFORCE gradient of the summed sequence log-probability: -A_i m_it / B
    assert_close(logp.grad, torch.tensor([[-1.0, -1.0], [0.5, 0.0]]))


def test_rloo_policy_loss_clips_and_adds_the_k3_term():
    one = torch.ones(1, 1)
    # ratio 1.5, A = 1: min(1.5, 1.2) -> -1.2; ratio 0.5, A = -1: min(-0.5, -0.8) -> +0.8
    up, stats = rloo_policy_loss(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1),
                                 torch.zeros(1, 1), torch.tensor([1.0]), one, clip_eps=0.2)
    assert float(up) == pytest.approx(-1.2) and float(stats["clip_frac"]) == 1.0
    down, _ = rloo_policy_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1),
                               torch.zeros(1, 1), torch.tensor([-1.0]), one, clip_eps=0.2)
    assert float(down) == pytest.approx(0.8)
    # A = 0, pi_ref / pi = 2: k3 = 2 - ln 2 - 1 = 0.306853; beta 0.1 -> 0.0306853
    kl, stats = rloo_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1),
                                 torch.log(torch.tensor([[2.0]])), torch.zeros(1), one, 0.2, beta=0.1)
    assert float(kl) == pytest.approx(0.0306853, abs=1e-6)
    assert float(stats["kl_k3"]) == pytest.approx(0.306853, abs=1e-5)


def test_sft_loss_under_ddp_is_the_mean_over_every_token_of_the_global_batch():
    from harness.methods.sft.stage import sft_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[:, :2] = -100                 # prompts
    labels[0, 2:] = -100                 # rank 0's first example has no response at all
    labels[1, 5] = -100                  # rank 0: 3 + 0 response tokens; rank 1: 4 + 4
    one, n = sft_loss(logits, labels)
    assert n == 11
    # by hand: -mean of the 11 response tokens' log-probabilities
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    mask = labels[:, 1:] != -100
    assert one.item() == pytest.approx(-(logp[mask]).mean().item(), rel=1e-6)
    # two ranks of 2 examples: DDP averages their losses (and gradients)
    shards = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    total = torch.tensor(float(n))
    ranks = [sft_loss(lg, lb, global_tokens=total, world=2)[0] for lg, lb in shards]
    assert (sum(ranks) / 2).item() == pytest.approx(one.item(), rel=1e-6)
    # each rank's own token mean would weight rank 0's 3 tokens like rank 1's 8
    naive = sum(sft_loss(lg, lb)[0] for lg, lb in shards) / 2
    assert abs(naive.item() - one.item()) > 1e-3


def _two_rank_statistics(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: the batch's statistics from its half (rank 0: rows 0-1, rank 1:
    rows 2-4) through the all-reduce, saved for the test to read."""
    import torch.distributed as dist

    from harness.methods.losses import (
        aggregate_loss,
        batch_std,
        explained_variance,
        masked_moments,
        masked_whiten,
    )
    from harness.methods.reduction import Reduction
    from harness.util.distributed import all_reduce_sum, share_per_rank

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x, mask, values = _batch()
    rows = slice(0, 2) if rank == 0 else slice(2, 5)
    x, mask, values = x[rows], mask[rows], values[rows]
    # GRPO's token losses (x as the per-token loss): bnpo on the rank's part of one minibatch;
    # dapo over two minibatches of the rank's rows, each divided by the rollout's tokens
    def loss(rows: slice, loss_type: str, rollout_tokens: torch.Tensor | None = None) -> torch.Tensor:
        mode, n = Reduction(sharded=True).normaliser(loss_type, mask[rows], rollout_tokens)
        return aggregate_loss(x[rows], mask[rows], mode, n_active=n)

    bnpo = loss(slice(None), "bnpo")
    dapo = sum(loss(mb, "dapo", share_per_rank(mask.sum())) for mb in (slice(0, 1), slice(1, None)))
    torch.save({"moments": masked_moments(x, mask, sum_fn=all_reduce_sum),
                "whiten": masked_whiten(x, mask, sum_fn=all_reduce_sum),
                "ev": explained_variance(values, x, mask, sum_fn=all_reduce_sum),
                "std": batch_std(x[:, 0], all_reduce_sum),
                "bnpo": bnpo, "dapo": dapo}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g) * 2 + 1
    x[2:] += 3  # the ranks' parts differ: each part's own moments are not the batch's
    mask = torch.ones(5, 4)
    mask[0, 2:] = 0
    mask[3, 1:] = 0
    return x, mask, x + 0.3 * torch.randn(5, 4, generator=g)


@pytest.fixture(scope="module")
def two_rank_parts(tmp_path_factory) -> list[dict]:
    """What each of 2 gloo ranks computed in :func:`_two_rank_statistics` (one spawn per module)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_two_rank_statistics, args=(f"file://{out}/init", str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_batch_statistics_over_two_ranks_equal_those_of_the_whole_batch(two_rank_parts):
    """masked_moments / masked_whiten / explained_variance with sum_fn = the all-reduce, and
    batch_std, on 2 gloo processes holding uneven parts of a batch: the whole batch's values (a
    mean of the ranks' own statistics would not be)."""
    from harness.methods.losses import explained_variance, masked_moments, masked_whiten

    x, mask, values = _batch()
    mean, var = masked_moments(x, mask)
    assert float(mean) == pytest.approx(float(x[mask.bool()].mean()), rel=1e-6)
    assert float(var) == pytest.approx(float(x[mask.bool()].var()), rel=1e-6)  # Bessel
    whole = masked_whiten(x, mask)
    for r, p in enumerate(two_rank_parts):
        torch.testing.assert_close(torch.stack(p["moments"]), torch.stack((mean, var)))
        torch.testing.assert_close(p["whiten"], whole[:2] if r == 0 else whole[2:])
        torch.testing.assert_close(p["ev"], explained_variance(values, x, mask))
        torch.testing.assert_close(p["std"], x[:, 0].std())
    own = masked_moments(x[:2], mask[:2])[1]  # rank 0's own variance is another number
    assert abs(float(own) - float(var)) > 0.1


def test_grpo_token_losses_over_two_ranks_average_to_the_global_token_mean(two_rank_parts):
    """GRPO bnpo and dapo under DDP (Reduction(sharded=True).normaliser), on 2 gloo ranks
    whose rows hold different numbers of valid tokens (rank 0: 6, rank 1: 9): DDP's mean of the
    ranks' losses is the whole batch's token mean sum(m l) / sum(m) = 55.7196 / 15, which the mean
    of the ranks' own token means is not."""
    from harness.methods.losses import aggregate_loss
    from harness.methods.reduction import Reduction

    x, mask, _ = _batch()
    parts = two_rank_parts
    whole = float((x * mask).sum() / mask.sum())
    assert mask[:2].sum() == 6 and mask[2:].sum() == 9
    assert whole == pytest.approx(55.7196 / 15, rel=1e-5)
    assert whole == pytest.approx(aggregate_loss(x, mask, "bnpo").item(), rel=1e-6)
    for kind in ("bnpo", "dapo"):
        assert float(sum(p[kind] for p in parts) / 2) == pytest.approx(whole, rel=1e-5), kind
    own = (aggregate_loss(x[:2], mask[:2], "bnpo") + aggregate_loss(x[2:], mask[2:], "bnpo")) / 2
    assert abs(float(own) - whole) > 0.1
    # one process: nothing to share; the modes pass through (grpo and dr_grpo are global as is)
    assert Reduction().normaliser("bnpo", mask) == ("bnpo", None)
    assert Reduction(sharded=True).normaliser("grpo", mask, torch.tensor(3.0)) == ("grpo", None)
    assert Reduction().share(torch.tensor(7.0)) == 7.0 and Reduction().sum_fn is None
