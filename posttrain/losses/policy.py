"""GRPO family: group-relative advantages and one policy-gradient core (clipped, CISPO or SAPO objective).

Every variant is a setting of two functions:

| method   | group_advantages                               | policy_loss                                        |
|----------|------------------------------------------------|----------------------------------------------------|
| GRPO     | scale="group"                                  | loss_type="grpo"                                   |
| Dr. GRPO | scale="none"                                   | loss_type="dr_grpo", max_completion_length=L       |
| DAPO     | scale="group"                                  | loss_type="dapo", epsilon_high=0.28 (clip-higher)  |
| GSPO     | scale="group"                                  | importance_sampling_level="sequence"               |
| GDPO     | aggregation="normalize_then_sum", R rewards    | any                                                |
| 2-GRPO   | group_size=2                                   | any                                                |

Numerics follow TRL's ``GRPOTrainer`` (``_generate_and_score_completions`` and ``_compute_loss``).

Gradient accumulation and the loss denominator
----------------------------------------------
``policy_loss`` returns numerator / ``num_items``. The numerator is a sum over this micro-batch (of
per-sequence token means for ``grpo``, of masked token losses for ``dr_grpo`` and ``dapo``), so when the
engine passes the denominator of the whole optimizer step, obtained by adding :func:`loss_denominator` over
every micro-batch (and every rank), the micro-batch losses add up to exactly the loss of one big batch, and so
do their gradients, however the batch is split:

* ``grpo``:    num_items = number of sequences in the step            (default: this batch's B)
* ``dr_grpo``: num_items = number of sequences * max_completion_length (default: B * max_completion_length)
* ``dapo``:    num_items = number of unmasked tokens in the step       (default: this batch's token count)
* ``bnpo``:    the token mean of this micro-batch; it is defined per micro-batch, ``num_items`` is ignored and
               the engine divides by the number of accumulation steps itself, as TRL does.

With the defaults, the ``grpo``/``bnpo``/``dr_grpo`` loss of a micro-batch is TRL's before TRL divides it
by the number of accumulation steps; for equal micro-batches the global ``num_items`` performs exactly that
division. Several processes: pass the ``num_items`` of the whole step over every process, and SUM the
processes' gradients (posttrain's engine does both, see ``posttrain.parallel``). A data-parallel wrapper that
averages gradients over ``W`` processes would need ``num_items / W`` instead (which is why TRL's ``dapo``
divides by ``num_items_in_batch / num_processes``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "LOSS_TYPES",
    "entropy_bonus",
    "group_advantages",
    "group_stats",
    "k3_kl",
    "loss_denominator",
    "policy_loss",
    "top_entropy_mask",
]

_SCALES = ("group", "batch", "none")
_STDS = ("unbiased", "population")
_AGGREGATIONS_OF_REWARDS = ("sum_then_normalize", "normalize_then_sum")
_IS_LEVELS = ("token", "sequence")


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------


def _nan_mean_std(x: Tensor, dim: int | None, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Mean and std over ``dim`` ignoring NaNs (keepdim). Fewer than 2 values with Bessel's correction, or
    none at all, give NaN, which callers turn into a zero advantage (TRL's ``nanstd`` does the same)."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True).to(x.dtype)
    mean = torch.nansum(x, dim=dim, keepdim=True) / count
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    dof = count - 1 if unbiased else count
    var = sq.sum(dim=dim, keepdim=True) / dof
    var = torch.where(dof > 0, var, torch.full_like(var, float("nan")))  # not -0/0 = 0 for an empty group
    return mean, var.sqrt()


def _combine(rewards: Tensor, group_size: int, reward_weights) -> tuple[Tensor, Tensor, Tensor, int]:
    """Validate shapes; return rewards as [N, R], weights [R], the unscorable-row mask [N], and R."""
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.ndim == 1:
        rewards = rewards.unsqueeze(1)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N] or [N, R]; got {tuple(rewards.shape)}")
    n, r = rewards.shape
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of {group_size}")
    if reward_weights is None:
        weights = torch.ones(r, dtype=rewards.dtype, device=rewards.device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=rewards.dtype, device=rewards.device)
        if weights.shape != (r,):
            raise ValueError(
                f"reward_weights must have {r} entries (one per reward function); got {tuple(weights.shape)}"
            )
    # A completion that every reward function declined to score (all NaN) carries no signal: nansum would
    # turn it into a 0 reward that biases its group's baseline, so it is kept NaN and left out instead.
    unscorable = torch.isnan(rewards).all(dim=1)
    return rewards, weights, unscorable, r


def _advantages(rewards, group_size, scale, std, aggregation, reward_weights, eps):
    """Shared core of group_advantages / group_stats.

    Returns (advantages [N], the std each row was normalised by [N], rewards [N, R], weights [R],
    unscorable mask [N])."""
    _check("scale", scale, _SCALES)
    _check("std", std, _STDS)
    _check("aggregation", aggregation, _AGGREGATIONS_OF_REWARDS)
    rewards, weights, unscorable, r = _combine(rewards, group_size, reward_weights)
    unbiased = std == "unbiased"
    n = rewards.shape[0]

    if aggregation == "sum_then_normalize":
        total = torch.nansum(rewards * weights, dim=1)
        total = total.masked_fill(unscorable, float("nan"))
        grouped = total.view(-1, group_size)
        mean, group_std = _nan_mean_std(grouped, dim=1, unbiased=unbiased)
        mean = mean.expand_as(grouped).reshape(n)
        group_std = group_std.expand_as(grouped).reshape(n)
        if scale == "batch":
            row_std = _nan_mean_std(total, dim=None, unbiased=unbiased)[1].expand(n)
        else:  # "none" still reports the group std, for frac_reward_zero_std
            row_std = group_std
        advantages = total - mean
        if scale != "none":
            advantages = advantages / (row_std + eps)
    else:
        if scale != "group":
            raise ValueError(
                "aggregation='normalize_then_sum' (GDPO) always normalises each reward within its group and "
                f"then over the batch; scale must be 'group', got {scale!r}"
            )
        grouped = rewards.view(-1, group_size, r)
        mean_k, std_k = _nan_mean_std(grouped, dim=1, unbiased=unbiased)
        per_reward = ((grouped - mean_k) / (std_k + eps)).reshape(n, r)
        total = torch.nansum(per_reward * weights, dim=1)
        total = total.masked_fill(unscorable, float("nan"))
        batch_mean, batch_std = _nan_mean_std(total, dim=None, unbiased=unbiased)
        row_std = batch_std.expand(n)
        advantages = (total - batch_mean) / (row_std + eps)

    # NaN here means "no signal" (unscorable row, or a group with a single scorable completion).
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages, row_std, rewards, weights, unscorable


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    std: str = "unbiased",
    aggregation: str = "sum_then_normalize",
    reward_weights=None,
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages A_i, one per completion.

    ``rewards`` is [N] or [N, R] (R reward functions), N = groups * group_size with the rows of a group
    contiguous. A NaN entry means that reward function did not score that completion.

    ``aggregation="sum_then_normalize"`` (GRPO, Shao et al. 2024, arXiv 2402.03300, Sec. 4.1.2 outcome
    supervision, A_i = (r_i - mean(r)) / std(r)): r_i = nansum_k w_k r_ik, then
      * ``scale="group"``: (r_i - group mean) / (group std + eps)   (GRPO)
      * ``scale="batch"``: (r_i - group mean) / (batch std + eps)   (TRL's scale_rewards="batch")
      * ``scale="none"``:  r_i - group mean                         (Dr. GRPO, Liu et al. 2025,
        arXiv 2503.20783: dividing by std(r) weights prompts by difficulty, so it is removed)

    ``aggregation="normalize_then_sum"`` (GDPO: "Group reward-Decoupled Normalization Policy Optimization for
    Multi-reward RL Optimization", Liu et al. 2026, arXiv 2601.05242): each reward is normalised within its
    group, (r_ik - mean_k) / (std_k + eps), the results are summed with the weights, and the sum is
    normalised over the batch, (s_i - mean(s)) / (std(s) + eps). Summing first lets different reward
    combinations collapse to the same advantage; normalising each reward first keeps them apart. ``scale``
    must be "group" here.

    ``std``: "unbiased" (Bessel-corrected, as TRL) or "population". Groups of two with unbiased std give
    +-1/sqrt(2) or 0 (2-GRPO, "It Takes Two: Your GRPO Is Secretly DPO", Wu et al. 2025, arXiv 2510.00977).

    A group whose rewards are all equal gets zeros (never NaN). A row whose rewards are all NaN is
    unscorable: it is left out of every mean and std and its advantage is 0; an all-NaN group gives zeros.
    """
    return _advantages(rewards, group_size, scale, std, aggregation, reward_weights, eps)[0]


def group_stats(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    std: str = "unbiased",
    aggregation: str = "sum_then_normalize",
    reward_weights=None,
) -> dict[str, Tensor]:
    """Reward metrics named as TRL logs them, for the same arguments as :func:`group_advantages`.

    * ``reward``: mean of the weighted reward sum over scorable completions.
    * ``reward_std``: std of that sum over the batch (``std`` chooses the estimator; TRL's is unbiased).
    * ``frac_reward_zero_std``: fraction of completions whose normalising std is zero: the group std for
      ``scale`` "group"/"none" (i.e. the share of groups that give no learning signal), the batch std for
      "batch" and for GDPO, exactly as TRL computes it.
    """
    _, row_std, rewards, weights, unscorable = _advantages(
        rewards, group_size, scale, std, aggregation, reward_weights, eps=0.0
    )
    total = torch.nansum(rewards * weights, dim=1).masked_fill(unscorable, float("nan"))
    mean, batch_std = _nan_mean_std(total, dim=None, unbiased=std == "unbiased")
    is_std_zero = torch.isclose(row_std, torch.zeros_like(row_std))
    return {
        "reward": mean.squeeze().detach(),
        "reward_std": batch_std.squeeze().detach(),
        "frac_reward_zero_std": is_std_zero.to(total.dtype).mean().detach(),
    }


# ----------------------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------------------


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref), DeepSeekMath Eq. (4) (Shao et al. 2024,
    arXiv 2402.03300): pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 = exp(d) - d - 1 with d = ref - logp.
    Non-negative, zero when the two agree, and its gradient is exp(d) - 1 per token."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def _aggregate_grpo(per_token_loss, mask, num_items=None, max_completion_length=None):
    # GRPO, DeepSeekMath Eq. (3): 1/G sum_i 1/|o_i| sum_t. Empty sequences count as 0 (clamp avoids 0/0).
    per_sequence = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.sum() / (per_sequence.shape[0] if num_items is None else num_items)


def _aggregate_bnpo(per_token_loss, mask, num_items=None, max_completion_length=None):
    # Token mean of this micro-batch; num_items is deliberately unused (see module docstring).
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def _aggregate_dr_grpo(per_token_loss, mask, num_items=None, max_completion_length=None):
    # Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): sum over tokens divided by a constant, so no sequence
    # length bias; TRL's constant is B * max_completion_length.
    if num_items is None:
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (or an explicit num_items)")
        num_items = per_token_loss.shape[0] * max_completion_length
    return (per_token_loss * mask).sum() / num_items


def _aggregate_dapo(per_token_loss, mask, num_items=None, max_completion_length=None):
    # DAPO token-level loss (Yu et al. 2025, arXiv 2503.14476): 1/sum_i |o_i| sum_i sum_t, where the sum of
    # lengths runs over the whole accumulated batch, hence a global num_items.
    return (per_token_loss * mask).sum() / (mask.sum().clamp(min=1.0) if num_items is None else num_items)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "grpo": _aggregate_grpo,
    "bnpo": _aggregate_bnpo,
    "dr_grpo": _aggregate_dr_grpo,
    "dapo": _aggregate_dapo,
}
"""aggregation -> fn(per_token_loss [B, T], mask [B, T], num_items=None, max_completion_length=None) -> scalar."""


# ----------------------------------------------------------------------------------------------------------
# Per-token objectives. Each: fn(ratio, logps, adv, o) -> per-token loss to minimise ([B, T] or [B, 1]), with
# ratio = exp(logp - old_logp) at the importance-sampling level ([B, T] token, [B, 1] sequence), adv [B, 1]
# and o the options (epsilon_low, epsilon_high, delta, sapo temperatures).


def _objective_clip(ratio, logps, adv, o):
    # PPO's clipped surrogate (GRPO, DeepSeekMath Eq. 3), with DAPO's decoupled bounds and the dual clip delta.
    clipped = torch.clamp(ratio, 1 - o["epsilon_low"], 1 + o["epsilon_high"])
    if o["delta"] is not None:
        ratio = torch.clamp(ratio, max=o["delta"])
    return -torch.min(ratio * adv, clipped * adv)


def _objective_cispo(ratio, logps, adv, o):
    # CISPO (MiniMax-M1, arXiv:2506.13585, Eq. 4; the epsilon_max form of ScaleRL, arXiv:2510.13786): REINFORCE
    # with the importance weight capped at epsilon_high and detached, so every token keeps a gradient
    # (PPO's clip zeroes it) but no weight exceeds the cap: -sg(min(r, eps_max)) A log pi.
    return -torch.clamp(ratio, max=o["epsilon_high"]).detach() * adv * logps


def _objective_sapo(ratio, logps, adv, o):
    # SAPO (arXiv:2511.20347): a smooth gate instead of the hard clip, -(4/tau) sigma(tau (r - 1)) A, with
    # tau = sapo_temperature_pos for A > 0 and sapo_temperature_neg otherwise. At r = 1 its gradient is the
    # policy gradient; far off-policy tokens fade out instead of being cut.
    tau = torch.where(adv > 0, o["sapo_temperature_pos"], o["sapo_temperature_neg"]).to(ratio.dtype)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


OBJECTIVES: dict[str, Callable[..., Tensor]] = {"clip": _objective_clip, "cispo": _objective_cispo,
                                                 "sapo": _objective_sapo}

# loss_type -> (per-token objective, aggregation). The first four are AGGREGATIONS of the clipped objective
# (TRL's loss_type values that only change how token losses are averaged); cispo and sapo are other objectives
# whose aggregation TRL fixes: cispo over the active tokens of the step (as dapo), sapo per sequence (as grpo).
LOSS_TYPES: dict[str, tuple[str, str]] = {
    "grpo": ("clip", "grpo"),
    "bnpo": ("clip", "bnpo"),
    "dr_grpo": ("clip", "dr_grpo"),
    "dapo": ("clip", "dapo"),
    "cispo": ("cispo", "dapo"),
    "sapo": ("sapo", "grpo"),
}


def top_entropy_mask(entropies: Tensor, mask: Tensor, top_quantile: float, pool: Tensor | None = None) -> Tensor:
    """Entropy-based token selection (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939): 1 on the
    masked tokens whose entropy is at least the (1 - top_quantile) quantile (linear interpolation, as TRL's
    torch.quantile) of `pool`, the entropies the selection ranks among (default: this batch's masked tokens;
    the caller passes every token of the step on every process). top_quantile = 0 keeps the largest entropy,
    1 every token. [B, T] in, [B, T] in the mask's dtype out."""
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_quantile must be in [0, 1], got {top_quantile}")
    keep = mask.bool()
    pool = entropies[keep] if pool is None else pool
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(pool.float(), 1.0 - top_quantile)
    return ((entropies >= threshold) & keep).to(mask.dtype)


def entropy_bonus(entropies: Tensor, trained: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """The mean entropy of the trained tokens, sum(entropy x trained) / num_tokens (default: this batch's trained
    tokens; pass the count of the whole step for a step-wide mean that splits over micro-batches). A loss
    subtracts entropy_coef times it (TRL's entropy_coef: the same meaning whatever the loss_type)."""
    total = (entropies * trained).sum()
    count = trained.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=total.dtype)
    return total / count.clamp(min=1.0)


def loss_denominator(loss_type: str, mask: Tensor, max_completion_length: int | None = None) -> Tensor | None:
    """This micro-batch's share of ``num_items``: add it over all micro-batches of an optimizer step (and
    all-reduce over ranks) and pass the total to :func:`policy_loss`. None for ``bnpo`` (per micro-batch)."""
    _check("loss_type", loss_type, tuple(LOSS_TYPES))
    loss_type = LOSS_TYPES[loss_type][1]
    batch = torch.tensor(float(mask.shape[0]), device=mask.device)
    if loss_type == "grpo":
        return batch
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return batch * max_completion_length
    if loss_type == "dapo":
        return mask.sum().float()
    return None


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
    entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss of the GRPO family (to minimise), as TRL's ``GRPOTrainer._compute_loss``.

    Per token (GRPO objective, DeepSeekMath Eq. 3, negated):

        loss_t = -min(w_t * A, clip(w_t, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3_t

    * ``w_t`` with ``importance_sampling_level="token"``: exp(logp_t - old_logp_t) (GRPO/DAPO).
      With ``"sequence"`` (GSPO, Zheng et al. 2025, arXiv 2507.18071, Eq. 5): one ratio per sequence,
      s_i = exp(mean over the sequence's unmasked tokens of (logp_t - old_logp_t)), shared by its tokens;
      the gradient flows through the mean, exactly as TRL's "sequence" level.
    * ``epsilon_high`` (default ``epsilon``): DAPO's decoupled clip-higher bound (Yu et al. 2025,
      arXiv 2503.14476).
    * ``delta``: two-sided / dual clip (INTELLECT-2 report, arXiv 2505.07291; TRL's ``delta``): the
      unclipped ratio is capped at ``delta`` (> 1 + epsilon_high), which bounds the loss of tokens with
      negative advantage and a very large ratio; for positive advantages it changes nothing.
    * ``k3_t``: :func:`k3_kl` against ``ref_logps``, required when ``beta != 0``. With
      ``use_bias_correction_kl`` (TRL's default) it is multiplied by the importance ratio ``w_t``, so that its
      gradient is the unbiased gradient of KL(pi_theta || pi_ref) (DeepSeek-V3.2, arXiv:2512.02556, Eq. 7):
      E_old[w k3] = KL(pi || ref) and the gradient flows through ``w``, on-policy too (where w = 1 in value).
      Without it the k3 gradient alone is biased.

    ``loss_type`` picks the per-token objective and its aggregation (``LOSS_TYPES``):

    * aggregations of the clipped objective above (see the module docstring for ``num_items``): ``grpo`` mean
      over each sequence's tokens then over sequences; ``bnpo`` token mean of this batch; ``dr_grpo``
      sum / (B * max_completion_length); ``dapo`` token sum / global token count.
    * ``cispo``: -sg(min(w_t, epsilon_high)) A log pi_t (MiniMax-M1, arXiv 2506.13585; ``epsilon_high`` is the
      cap on the ratio itself, e.g. 5.0, and must be given), aggregated as ``dapo``.
    * ``sapo``: -(4 / tau) sigma(tau (w_t - 1)) A, tau = ``sapo_temperature_pos`` if A > 0 else
      ``sapo_temperature_neg`` (arXiv 2511.20347), aggregated as ``grpo``.

    ``entropy_mask`` ([B, T], 1 = keep): the policy term of the tokens outside it is 0 (Wang et al. 2025,
    "Beyond the 80/20 Rule", arXiv 2506.01939: train only the high-entropy "forking" tokens); they still count
    in the aggregation's denominators and keep their KL term, as in TRL.

    Args:
        logps, old_logps, ref_logps, mask: [B, T] per-token log-probs of the sampled completion tokens and the
            completion mask. ``old_logps=None`` means on-policy (num_iterations=1): ``logps.detach()``.
        advantages: [B], one per completion (every token gets it), or [B, T], one per token (PPO's GAE,
            REINFORCE++: `posttrain.losses.advantages`).

    Returns:
        ``(loss, metrics)``; metrics are detached and named as TRL logs them: ``kl`` (token mean of the KL term,
        when ``ref_logps`` is given), for the clipped objective ``clip_ratio/low_mean`` (ratio below
        1 - epsilon with A < 0), ``clip_ratio/high_mean`` (above 1 + epsilon_high with A > 0) and
        ``clip_ratio/region_mean`` (either), for cispo ``cispo_clip_ratio`` (ratio above epsilon_high with
        A > 0). They are token means, or sequence means at the "sequence" level. Entropy is the caller's.
    """
    _check("loss_type", loss_type, tuple(LOSS_TYPES))
    _check("importance_sampling_level", importance_sampling_level, _IS_LEVELS)
    objective, aggregation = LOSS_TYPES[loss_type]
    if loss_type == "cispo" and epsilon_high is None:
        raise ValueError("loss_type='cispo' needs epsilon_high: the cap on the importance ratio (e.g. 5.0)")
    if logps.ndim != 2 or mask.shape != logps.shape:
        raise ValueError(
            f"logps and mask must be [B, T] of one shape; got {tuple(logps.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"advantages must be [B]={logps.shape[0]} or [B, T]={tuple(logps.shape)}; got "
                         f"{tuple(advantages.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_weights)  # [B, T] or [B, 1]
    adv = (advantages.unsqueeze(1) if advantages.ndim == 1 else advantages).to(logps.dtype)
    options = {"epsilon_low": epsilon_low, "epsilon_high": epsilon_high, "delta": delta,
               "sapo_temperature_pos": sapo_temperature_pos, "sapo_temperature_neg": sapo_temperature_neg}
    per_token_loss = OBJECTIVES[objective](ratio, logps, adv, options)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(logps.dtype)
    per_token_kl = None
    if ref_logps is not None:
        per_token_kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = per_token_loss.expand_as(mask)

    loss = AGGREGATIONS[aggregation](
        per_token_loss, mask, num_items=num_items, max_completion_length=max_completion_length
    )

    with torch.no_grad():
        token_count = mask.sum().clamp(min=1.0)

        # (with per-token advantages the flags differ between a sequence's tokens: token means again)
        per_sequence = importance_sampling_level == "sequence" and advantages.ndim == 1

        def ratio_mean(x: Tensor) -> Tensor:
            # Sequence-level ratios are one per sequence, so their clip fractions are sequence means (as TRL).
            return x.mean() if per_sequence else (x * mask).sum() / token_count

        metrics = {}
        if objective == "clip":
            is_low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(logps.dtype)
            is_high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(logps.dtype)
            metrics = {
                "clip_ratio/low_mean": ratio_mean(is_low),
                "clip_ratio/high_mean": ratio_mean(is_high),
                "clip_ratio/region_mean": ratio_mean(torch.maximum(is_low, is_high)),
            }
        elif objective == "cispo":
            metrics["cispo_clip_ratio"] = ratio_mean(((ratio > epsilon_high) & (adv > 0)).to(logps.dtype))
        if per_token_kl is not None:
            kl = per_token_kl.expand_as(mask) if per_token_kl.shape != mask.shape else per_token_kl
            metrics["kl"] = (kl * mask).sum() / token_count
    return loss, metrics
