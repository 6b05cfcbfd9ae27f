"""Every equation of the alignment methods as pure tensor functions (torch only, no state).

The Lightning modules (SFT, reward model, PPO, GRPO, DPO) are thin shells around these functions;
each one names the equation it implements and the shapes it reads and returns, with

    B = batch, T = sequence length, V = vocabulary, G = group size (completions per prompt).

Conventions shared by all functions:

* ``mask`` is a 0/1 tensor (bool, int or float) of the same shape as the quantity it masks;
  positions with ``mask == 0`` never contribute, even when the tensor holds NaN/inf there (the
  functions select with ``torch.where`` instead of multiplying by the mask).
* Sequences are right-padded: each row of a ``[B, T]`` mask is a run of 1s followed by 0s
  (rows of different lengths in one batch). The last valid token of a row ends its episode.
* Scalar losses are 0-dim tensors; ``stats`` dicts hold detached 0-dim tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "adaptive_kl_coef",
    "aggregate_loss",
    "bradley_terry_loss",
    "batch_std",
    "check_finite",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "group_relative_advantages",
    "kl_k2",
    "kl_k3",
    "kl_log_ratio",
    "kl_penalized_rewards",
    "last_valid_index",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "missing_eos_penalty",
    "online_pairs",
    "pairwise_accuracy",
    "ppo_clipped_surrogate",
    "rloo_advantages",
    "rloo_policy_loss",
    "sequence_kl_shaped_rewards",
    "sequence_logprobs",
    "td_residuals",
    "token_logprobs",
]

Dim = int | tuple[int, ...] | None

AGGREGATION_MODES: dict[str, str] = {
    "token": "token", "bnpo": "token", "dapo": "dapo",
    "sequence": "sequence", "grpo": "sequence",
    "dr_grpo": "dr_grpo",
}
DPO_LOSS_TYPES = ("sigmoid", "ipo")


class NonFiniteError(ValueError):
    """A loss, reward or statistic is NaN or infinite (raised by :func:`check_finite`)."""


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------


def _valid(mask: Tensor) -> Tensor:
    """Boolean view of a 0/1 mask."""
    return mask if mask.dtype == torch.bool else mask != 0


def last_valid_index(mask: Tensor) -> Tensor:
    """Index [B] of each row's last valid position of a mask [B, T]; -1 for a row with none."""
    valid = _valid(mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    return torch.where(valid, positions, -1).max(dim=1).values


def masked_sum(x: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Masked sum  S = sum_i m_i x_i  (over ``dim``, or all entries when ``dim`` is None).

    x, mask: same shape (e.g. [B, T]). Returns a 0-dim tensor, or x's shape without ``dim``.
    Entries with m_i = 0 are excluded even if x is NaN/inf there.
    """
    m = mask.to(x.dtype)
    return torch.where(_valid(mask), x * m, 0.0).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Masked mean  mu = sum_i m_i x_i / sum_i m_i ;  0 where sum_i m_i = 0.

    x, mask: same shape (e.g. [B, T]); mask bool or float. Returns a 0-dim tensor (dim=None) or
    x's shape without ``dim`` (e.g. [B] for dim=-1). Gradients stay finite for empty masks.
    """
    num = masked_sum(x, mask, dim)
    den = mask.to(x.dtype).sum(dim=dim)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def masked_moments(x: Tensor, mask: Tensor, unbiased: bool = True,
                   sum_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Masked mean and variance over all masked entries (as TRL's ``masked_mean``/``masked_var``):

        mu  = sum_i m_i x_i / n,  n = sum_i m_i
        var = sum_i m_i (x_i - mu)^2 / n                    (unbiased=False, population)
        var = var * n / (n - 1)                             (unbiased=True, Bessel)

    x, mask: same shape; returns two 0-dim tensors. The variance is 0 when n = 0, and (unbiased)
    when n = 1, instead of raising or returning NaN. ``sum_fn`` (e.g.
    :func:`harness.util.distributed.all_reduce_sum`) sums the partial sums over the parts of a batch
    held elsewhere, so mu and var are those of the whole batch (DDP ranks); without it, this
    batch's, computed as ever.
    """
    if sum_fn is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
        n = mask.to(x.dtype).sum()
    else:
        total, n = sum_fn(torch.stack((masked_sum(x, mask), mask.to(x.dtype).sum()))).unbind()
        mean = total / n.clamp(min=1)
        var = sum_fn(masked_sum((x - mean) ** 2, mask)) / n.clamp(min=1)
    if unbiased:
        safe = torch.where(n > 1, n - 1, torch.ones_like(n))
        var = torch.where(n > 1, var * n / safe, torch.zeros_like(var))
    return mean, var


def batch_std(x: Tensor, sum_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The sample standard deviation (Bessel's n - 1, as ``torch.std``) of all of ``x``'s
    elements, 0 for fewer than 2; with ``sum_fn`` over the parts of the batch other ranks hold too
    (:func:`masked_moments`)."""
    if sum_fn is None:
        return x.std() if x.numel() > 1 else x.new_zeros(())
    return masked_moments(x.detach(), torch.ones_like(x), unbiased=True, sum_fn=sum_fn)[1].sqrt()


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True,
               sum_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The variance of :func:`masked_moments` (TRL's ``masked_var``); a 0-dim tensor."""
    return masked_moments(x, mask, unbiased, sum_fn)[1]


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  sum_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Advantage whitening over the masked entries (TRL's ``masked_whiten``).

        x_hat = (x - mu) / sqrt(var + eps)        mu, var: masked mean and unbiased variance
        x_hat = x_hat + mu                         when shift_mean is False (scale only)

    x, mask: same shape (e.g. [B, T]); returns x's shape, 0 at masked-out positions (TRL leaves
    them whitened; here they are zeroed so padding never leaks into sums). ``sum_fn``: moments of
    the whole batch across DDP ranks (:func:`masked_moments`).
    """
    mean, var = masked_moments(x, mask, unbiased=True, sum_fn=sum_fn)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_valid(mask), out, 0.0)


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor | None = None,
                   ignore_index: int = -100) -> Tensor:
    """Per-token log-likelihood  log pi(y_t | y_<t) = z_t[y_t] - logsumexp_v z_t[v].

    logits: [B, T, V], already aligned with labels [B, T] (position t scores labels[:, t]; the
    caller does the shift). mask: [B, T] or None. Returns [B, T], 0 where mask == 0 or where
    labels == ignore_index (-100 labels are clamped to 0 before the gather). Computed with
    log_softmax + gather in the dtype of ``logits`` (upcast bf16 logits first for precision).
    """
    logps = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & _valid(mask)
    picked = torch.gather(logps, -1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def sequence_logprobs(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-likelihood  log pi(y | x) = sum_t m_t log pi(y_t | y_<t, x).

    token_logps, mask: [B, T]. Returns [B].
    """
    return masked_sum(token_logps, mask, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution  H_t = -sum_v p_v log p_v,  p = softmax(z_t).

    Computed as log p = z - logsumexp(z) (log_softmax), so large logits do not overflow, and
    with log p clamped to the dtype's finite minimum so -inf logits (top-k masking) give
    0 * log 0 = 0 and finite gradients. logits: [B, T, V]. Returns [B, T].
    """
    logp = torch.log_softmax(logits, dim=-1)
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(dim=-1)


def response_scores(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float = 1.0,
                    with_entropy: bool = False, entropy_grad: bool = True,
                    ) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) under ``softmax(logits / temperature)`` and, with ``with_entropy``, the
    entropy H_t of that distribution: (logp [B, N], entropy [B, N] or None).

    logits: [B, N, V] aligned with tokens [B, N] (:func:`token_logprobs`); mask [B, N].
    ``entropy_grad=False`` computes the entropy without autograd (for logging only).
    """
    scaled = logits.float() / temperature
    logp = token_logprobs(scaled, tokens, mask)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(scaled if entropy_grad else scaled.detach())
    return logp, ent


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Bradley-Terry reward-model loss  L = -mean_i log sigma(r_w,i - r_l,i).

    r_chosen, r_rejected: [B] scalar rewards of the preferred / dispreferred response.
    Returns a 0-dim tensor (computed with logsigmoid, stable for large margins).
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Preference accuracy  acc = mean_i [ 1(r_w,i > r_l,i) + 0.5 * 1(r_w,i = r_l,i) ].

    r_chosen, r_rejected: [B]. Returns a detached 0-dim float tensor; ties count one half.
    """
    r_w, r_l = r_chosen.detach(), r_rejected.detach()
    return ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean()


# --------------------------------------------------------------------------------------------
# KL estimators (per token, samples drawn from pi; Schulman, "Approximating KL divergence")
# --------------------------------------------------------------------------------------------


def kl_log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 estimator of KL(pi || pi_ref):  k1 = log pi - log pi_ref  (unbiased, can be < 0).

    logp, ref_logp: any matching shape (e.g. [B, T]); returns the same shape, unmasked.
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 estimator  k2 = 0.5 * (log pi - log pi_ref)^2  (biased, >= 0, low variance).

    logp, ref_logp: any matching shape (e.g. [B, T]); returns the same shape, unmasked.
    """
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator (GRPO's KL)  k3 = exp(d) - d - 1,  d = log pi_ref - log pi.

    Unbiased and always >= 0 (exp(d) >= 1 + d), = 0 iff logp == ref_logp; computed as
    expm1(d) - d for accuracy near 0. logp, ref_logp: any matching shape; returns that shape.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


# --------------------------------------------------------------------------------------------
# PPO: rewards, TD residuals, GAE, losses
# --------------------------------------------------------------------------------------------


def _next_valid(mask: Tensor) -> Tensor:
    """Bool [B, T]: whether position t + 1 exists and is valid (False in the last column)."""
    valid = _valid(mask)
    return torch.cat((valid[:, 1:], torch.zeros_like(valid[:, :1])), dim=1)


def td_residuals(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """TD(0) residuals  delta_t = r_t + gamma * V(s_{t+1}) - V(s_t).

    rewards, values, mask: [B, T], right-padded. V(s_{t+1}) is taken as 0 when t is the last
    valid token of its row (the episode ends there; values at padded positions are ignored).
    Returns [B, T], 0 at padded positions.
    """
    valid = _valid(mask)
    next_values = torch.cat((values[:, 1:], torch.zeros_like(values[:, :1])), dim=1)
    next_values = torch.where(_next_valid(mask), next_values, 0.0)
    delta = rewards + gamma * next_values - values
    return torch.where(valid, delta, 0.0)


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016).

        A_t = sum_{l >= 0} (gamma * lam)^l delta_{t+l}
            = delta_t + gamma * lam * A_{t+1}       (backwards recursion, A = 0 past the end)
        R_t = A_t + V(s_t)                           (value targets, "returns")

    with delta from :func:`td_residuals`. The recursion is cut at the last valid token of each
    row (right padding, rows of different lengths). lam = 0 gives A = delta (TD(0)); lam = 1,
    gamma = 1 gives reward-to-go minus V. rewards, values, mask: [B, T]. Returns (advantages
    [B, T], returns [B, T]), both 0 at padded positions and without gradient (inputs detached).
    """
    with torch.no_grad():
        rewards, values = rewards.detach(), values.detach()
        valid = _valid(mask)
        delta = td_residuals(rewards, values, mask, gamma)
        cont = _next_valid(mask).to(delta.dtype)
        adv = torch.zeros_like(delta)
        running = torch.zeros_like(delta[:, 0])
        for t in range(delta.shape[1] - 1, -1, -1):
            running = delta[:, t] + gamma * lam * cont[:, t] * running
            adv[:, t] = running
        adv = torch.where(valid, adv, 0.0)
        returns = torch.where(valid, adv + values, 0.0)
    return adv, returns


def kl_penalized_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                         beta: float) -> Tensor:
    """PPO reward shaping (InstructGPT; "Secrets of RLHF"):

        r_t = -beta * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))  +  1(t = t_last) * score

    score: [B] sequence reward (reward model / gold); logp, ref_logp, mask: [B, T], right-padded.
    t_last is each row's last valid token. Returns [B, T], 0 at padded positions; a row with no
    valid token gets no reward at all.
    """
    rewards = torch.where(_valid(mask), -beta * kl_log_ratio(logp, ref_logp), 0.0)
    last = last_valid_index(mask)
    has_token = last >= 0
    bonus = torch.where(has_token, score.to(rewards.dtype), 0.0)
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), bonus.unsqueeze(1))


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None,
                   n_active: Tensor | float | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar; ``mode`` picks the normalisation:

        "token"    (= "bnpo"):  L = sum_{i,t} m_it l_it / sum_{i,t} m_it      (this minibatch)
        "dapo":                 L = sum_{i,t} m_it l_it / N_active            (the rollout batch)
        "sequence" (= "grpo"):  L = 1/B sum_i ( sum_t m_it l_it / sum_t m_it )
        "dr_grpo":              L = sum_{i,t} m_it l_it / (B * max_len)

    ``n_active`` (dapo) is the number of valid tokens of the *whole rollout batch* the minibatch
    was cut from (DAPO, Yu et al. 2025, eq. 8; TRL's ``dapo``): the minibatch losses of one rollout
    then sum to its token mean, which differs from bnpo as soon as minibatches split the rollout.
    Without ``n_active`` dapo falls back to this minibatch's count (the same as bnpo). max_len
    defaults to T. In "sequence" mode a row without valid tokens contributes 0 (and still counts
    in B, as TRL's clamp(min=1)). Returns a 0-dim tensor. Unknown mode -> ValueError naming the
    accepted values.
    """
    kind = AGGREGATION_MODES.get(mode)
    if kind is None:
        raise ValueError(f"unknown loss aggregation {mode!r}; accepted: "
                         f"{', '.join(AGGREGATION_MODES)}")
    if kind == "dapo" and n_active is not None:
        return masked_sum(per_token, mask) / torch.as_tensor(n_active, dtype=per_token.dtype).clamp(min=1)
    if kind in ("token", "dapo"):
        return masked_mean(per_token, mask)
    if kind == "sequence":
        return masked_mean(per_token, mask, dim=-1).mean()
    length = per_token.shape[-1] if max_len is None else max_len
    return masked_sum(per_token, mask) / (per_token.shape[0] * length)


def ppo_clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                          clip_eps: float, clip_eps_high: float | None = None,
                          aggregation: str = "token", max_len: int | None = None,
                          n_active: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), with DAPO's clip-higher.

        c_t = exp(log pi_theta(a_t|s_t) - log pi_old(a_t|s_t))
        l_t = -min( c_t A_t,  clip(c_t, 1 - eps, 1 + eps_high) A_t ),   eps_high = eps if None
        L   = aggregate_loss(l, mask, aggregation, max_len, n_active)

    logp, old_logp, advantages, mask: [B, T] (GRPO broadcasts its [B] advantages over T).
    Returns (L 0-dim, stats) with detached 0-dim stats:
      clip_frac  - fraction of valid tokens where the clipped term is the active (smaller) one:
                   c_t > 1 + eps_high with A_t > 0, or c_t < 1 - eps with A_t < 0
                   (those tokens get no gradient);
      approx_kl  - masked mean of k2 = 0.5 (log pi_theta - log pi_old)^2 (as TRL's PPO);
      ratio_mean - masked mean of c_t.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate_loss(per_token, mask, aggregation, max_len, n_active)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
    return loss, stats


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float, n_tokens: Tensor | float | None = None,
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / TRL):

        V_clip = clip(V, V_old - c, V_old + c)
        L_V    = 0.5 * masked_mean( max( (V - R)^2, (V_clip - R)^2 ) )

    values, old_values, returns, mask: [B, T]. ``n_tokens``: divide the masked sum by this count
    instead of the mask's (DDP: the global minibatch's tokens over the world size). Returns (L_V
    0-dim, {"value_clip_frac": fraction of valid tokens where the clipped error is the larger,
    i.e. active, term}).

    ``V_clip`` is ``clamp(V, V_old - c, V_old + c)`` (TRL's form), not baselines'
    ``V_old + clamp(V - V_old, -c, c)``: the two agree in exact arithmetic, but the second rounds
    away from V inside the range whenever the subtraction is inexact, and the ``max`` then counts
    that rounding as clipping.
    """
    v_clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    worse = torch.maximum(err, err_clipped)
    loss = 0.5 * (masked_mean(worse, mask) if n_tokens is None
                  else masked_sum(worse, mask) / torch.as_tensor(n_tokens, dtype=worse.dtype))
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, {"value_clip_frac": clip_frac}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor,
                       sum_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Critic diagnostic  EV = 1 - Var[R - V] / Var[R]  over the valid entries.

    values, returns, mask: [B, T]. Returns a detached 0-dim tensor: 1 = perfect critic,
    0 = no better than a constant, < 0 = worse. When Var[R] = 0 (nothing to explain) it returns
    0 rather than NaN/inf. Population variances (the ratio does not depend on the correction).
    ``sum_fn``: over the whole batch across DDP ranks (:func:`masked_moments`).
    """
    with torch.no_grad():
        var_r = masked_var(returns.detach(), mask, unbiased=False, sum_fn=sum_fn)
        var_res = masked_var((returns - values).detach(), mask, unbiased=False, sum_fn=sum_fn)
        safe = torch.where(var_r > 0, var_r, torch.ones_like(var_r))
        return torch.where(var_r > 0, 1.0 - var_res / safe, torch.zeros_like(var_r))


def adaptive_kl_coef(current_coef: float, observed_kl: float, target_kl: float, horizon: int,
                     n_steps: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019):

        e      = clip(KL_obs / KL_target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)

    All scalars (observed_kl may be a 0-dim tensor); returns the new coefficient as a float.
    target_kl and horizon must be > 0 (ValueError otherwise).
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target_kl > 0 and horizon > 0, got "
                         f"target_kl={target_kl}, horizon={horizon}")
    error = min(max(float(observed_kl) / target_kl - 1.0, -0.2), 0.2)
    return float(current_coef) * (1.0 + error * n_steps / horizon)


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def group_relative_advantages(rewards: Tensor, group_size: int, scale_rewards: bool = True,
                              eps: float = 1e-4) -> Tensor:
    """GRPO group-relative advantages (DeepSeekMath, Shao et al. 2024):

        mu_g      = 1/G sum_j R_j
        sigma_g^2 = 1/G sum_j (R_j - mu_g)^2          (population std, as the seed lecture)
        A_j       = (R_j - mu_g) / (sigma_g + eps)    (scale_rewards=True)
        A_j       = R_j - mu_g                        (scale_rewards=False, Dr. GRPO)

    TRL divides by the unbiased (1/(G-1)) std instead; this follows the lecture's 1/G. rewards:
    [B] with B = n_prompts * G and the G completions of prompt i at rows i*G .. i*G + G - 1.
    Returns [B]. ValueError if group_size < 1 or B is not divisible by group_size.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"rewards must be [B] with B divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        sigma = grouped.std(dim=1, correction=0, keepdim=True)
        centred = centred / (sigma + eps)
    return centred.reshape(-1)


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Kool et al. 2019; Ahmadian et al. 2024):

        A_i = R_i - 1/(k-1) sum_{j != i} R_j   =   k/(k-1) (R_i - mean_j R_j)

    over the k samples of one prompt: each sample's baseline is the mean reward of the others, so
    the estimate stays unbiased without a critic. rewards: [B] with B = n_prompts * k and the k
    samples of prompt p at rows p*k .. p*k + k - 1. Returns [B]. ValueError if k < 2 or B is not
    divisible by k.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    if rewards.ndim != 1 or rewards.shape[0] % k != 0:
        raise ValueError(f"rewards must be [B] with B divisible by k={k}, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def sequence_kl_shaped_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                               beta: float) -> Tensor:
    """The per-token KL penalty folded into a sequence reward (RLOO treats a response as one action):

        R = score - beta * sum_t (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))

    the sum of PPO's shaped per-token rewards (:func:`kl_penalized_rewards`) over the response.
    scores: [B]; logp, ref_logp, mask: [B, T]. Returns [B].
    """
    return scores - beta * masked_sum(kl_log_ratio(logp, ref_logp), mask, dim=-1)


def rloo_policy_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
                     mask: Tensor, clip_eps: float, beta: float = 0.0) -> tuple[Tensor, dict]:
    """RLOO's policy loss: the sequence-level REINFORCE objective with PPO's ratio clipping, plus an
    optional k3 KL term in the loss (``kl_penalty: loss``; 0 when the KL is in the reward):

        c_t = pi(a_t|s_t) / pi_old(a_t|s_t)
        L   = 1/B sum_i sum_t [ -min(c_t A_i, clip(c_t, 1 - eps, 1 + eps) A_i)
                                + beta * KL_k3(pi || pi_ref)_t ] * mask_it

    Summing over a response's tokens makes the gradient at c = 1 that of REINFORCE on the sequence
    log-probability, ``-A_i grad log pi(y_i|x)`` (Ahmadian et al.); TRL's RLOO averages over tokens
    instead, which weights short responses more. logp, old_logp, ref_logp, mask: [B, T];
    advantages: [B]. Returns (loss, stats with ``pg_loss``, ``kl_k3`` per sequence, ``clip_frac``);
    ``ref_logp`` None (no reference pass, ``beta`` 0): no KL term and no ``kl_k3`` stat.
    """
    a = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.minimum(ratio * a, clipped * a)
    rows = max(int(mask.shape[0]), 1)
    pg = masked_sum(per_token, mask) / rows
    clip_frac = masked_mean(((ratio - 1.0).abs() > clip_eps).to(logp.dtype), mask)
    stats = {"pg_loss": pg.detach(), "clip_frac": clip_frac.detach()}
    if ref_logp is None:
        if beta:
            raise ValueError(f"rloo_policy_loss: beta={beta} needs the reference log-probs")
        return pg, stats
    kl = masked_sum(kl_k3(logp, ref_logp), mask) / rows
    stats["kl_k3"] = kl.detach()
    return pg + beta * kl, stats


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) per-pair losses.

        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        sigmoid: L = -(1 - ls) log sigma(beta h) - ls log sigma(-beta h)   (ls > 0: cDPO)
        ipo:     L = (h - 1 / (2 beta))^2                                 (label_smoothing unused)
        rewards: r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)),  r_l likewise (detached)

    cDPO is Mitchell (2023)'s conservative DPO; current TRL's ``sigmoid`` loss ignores
    ``label_smoothing``, so with ls > 0 the two differ.
    All inputs [B] sequence log-probs summed over tokens, also for IPO; TRL's IPO averages the
    log-probs over tokens (length-normalised), so its h is this h divided by the lengths.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]). Unknown loss_type ->
    ValueError.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * h) * (1.0 - label_smoothing)
                  - F.logsigmoid(-beta * h) * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; accepted: "
                         f"{', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def missing_eos_penalty(scores: Tensor, response: Tensor, mask: Tensor, eos_id: int,
                        penalty: float) -> Tensor:
    """Sequence rewards with ``penalty`` subtracted from every response that has no EOS among its
    tokens (it was cut off at the rollout's ``max_new_tokens``): ``R_i - penalty [EOS not in
    y_i]`` (TRL's ``missing_eos_penalty``; Huang et al. 2024).

    scores: [B]; response, mask: [B, N] tokens and their validity (1 up to and including EOS).
    Returns [B] (``scores`` itself when ``penalty`` is 0).
    """
    if not penalty:
        return scores
    ended = ((response == eos_id) & mask.bool()).any(dim=-1)
    return scores - penalty * (~ended).to(scores.dtype)


def online_pairs(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Online DPO's preference pairs from k sampled responses per prompt (Guo et al. 2024 with k =
    2; with k > 2 the best against the worst, as iterative DPO's rejection sampling does):

        chosen_g   = g k + argmax_j R_{g,j}     rejected_g = g k + argmin_j R_{g,j}
        valid_g    = max_j R_{g,j} > min_j R_{g,j}

    scores: [B] with B = n_prompts * k and the k responses of prompt g at rows g*k .. g*k + k - 1.
    Returns (chosen [G], rejected [G] row indices, valid [G] bool): a group whose responses all
    score the same (all right or all wrong under a 0/1 reward) states no preference and is not a
    pair. Ties go to the first row of the group. TRL's ``OnlineDPOTrainer`` samples two and makes
    a tied pair anyway (the first as chosen). ValueError if k < 2 or B is not divisible by k.
    """
    if k < 2:
        raise ValueError(f"online DPO needs k >= 2 responses per prompt, got {k}")
    if scores.ndim != 1 or scores.shape[0] % k != 0:
        raise ValueError(f"scores must be [B] with B divisible by k={k}, got {tuple(scores.shape)}")
    grouped = scores.view(-1, k)
    offset = torch.arange(grouped.shape[0], device=scores.device) * k
    best, chosen = grouped.max(dim=1)
    worst, rejected = grouped.min(dim=1)
    return offset + chosen, offset + rejected, best > worst


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


def check_finite(name: str, tensor: Tensor | float) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if any entry is NaN or +-inf.

    tensor: any shape (or a Python number). Returns None when every entry is finite.
    """
    t = torch.as_tensor(tensor).detach()
    if not t.is_floating_point() and not t.is_complex():
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    shape = tuple(t.shape)
    value = f" (value {t.item()})" if t.numel() == 1 else ""
    raise NonFiniteError(f"{name} is not finite: {n_nan} NaN and {n_inf} inf of {t.numel()} "
                         f"entries, shape {shape}{value}")

