"""Advantage estimators of the one online-RL core: a registry with one signature, chosen by `advantage_estimator`.

An online-RL step samples completions, scores them, turns the scores into advantages and takes the clipped
policy-gradient step of `posttrain.losses.policy`. Only the third part tells GRPO, PPO, RLOO, REINFORCE++ and
ReMax apart, so each is an entry of `ADVANTAGE_ESTIMATORS` (veRL's names), all called the same way:

    ADVANTAGE_ESTIMATORS[name].fn(inputs: AdvantageInputs, options: EstimatorOptions) -> Advantages

`AdvantageInputs` holds everything any estimator may read (each completion's score, the per-token KL penalty,
the critic's values, the greedy baseline); an entry declares what it needs (`Estimator`), so a config asking
for GAE without a critic is refused before anything loads. An entry returns one advantage per completion ([N],
outcome estimators: every token of the completion gets it) or one per token ([N, T]); completions no reward
function could score (score NaN) get 0 and are left out of every statistic. Critic estimators also return
the value targets [N, T].

Rewards per token (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155):

    r_t = -kl_coef * KL_t on every completion token, plus the completion's score on its last token

`KL_t` is `token_kl` (k1 or k3) of the sampling policy against the reference; with kl_coef = 0 the score is the
only reward. Outcome estimators use the completion's return, sum_t r_t = score - kl_coef * sum_t KL_t.

Tensors are right-padded [N, T] with `mask` 1 on completion tokens (EOS included); the G completions of a
prompt are contiguous rows. Everything here is a pure function of tensors (the KL controller too: it returns
the new coefficient), tested against numbers worked out by hand (tests/losses/test_advantages.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.losses.policy import group_advantages, k3_kl

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "Advantages",
    "Estimator",
    "EstimatorOptions",
    "adaptive_kl_coef",
    "estimate_advantages",
    "gae",
    "masked_whiten",
    "returns_to_go",
    "sequence_scores",
    "token_kl",
    "token_rewards",
]

KL_ESTIMATORS = ("k1", "k3")


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and Bessel-corrected variance over the entries where `mask` is 1
    (TRL's and veRL's `masked_whiten`); entries outside the mask are returned as 0. Fewer than two entries:
    nothing to compare, all 0."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 2:
        return torch.zeros_like(x)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_kl(logps: Tensor, ref_logps: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs (Schulman 2020, "Approximating KL
    divergence"): k1 = logp - ref (unbiased, can be negative per token; TRL's PPO and RLOO default), k3 =
    exp(ref - logp) - (ref - logp) - 1 (never negative, lower variance; GRPO's)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def sequence_scores(rewards: Tensor, weights=None, *, truncated: Tensor | None = None,
                    missing_eos_penalty: float | None = None, clip_range=None) -> Tensor:
    """Each completion's score [N] from its reward functions' values [N, R]: the weighted sum over the functions
    that scored it (NaN where none did: unscorable), minus `missing_eos_penalty` for completions cut at the
    length limit (`truncated`, TRL's PPO option), then clamped to `clip_range` = (min, max) (TRL's RLOO
    option). The weighted sum is computed exactly as `group_advantages` computes it, bit for bit."""
    if rewards.ndim == 1:
        rewards = rewards.unsqueeze(1)
    w = torch.ones(rewards.shape[1], dtype=rewards.dtype, device=rewards.device) if weights is None else \
        torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    scores = torch.nansum(rewards * w, dim=1).masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))
    if missing_eos_penalty is not None:
        if truncated is None:
            raise ValueError("missing_eos_penalty needs `truncated`")
        scores = scores - missing_eos_penalty * truncated.to(scores.dtype)
    if clip_range is not None:
        low, high = clip_range
        scores = scores.clamp(min=low, max=high)
    return scores


def _last_token(mask: Tensor) -> Tensor:
    """[N, T] one-hot of each row's last masked position (all zero for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values
    return (positions[None] == last[:, None]).to(torch.get_default_dtype()) * (last[:, None] >= 0)


def token_rewards(scores: Tensor, mask: Tensor, non_score: Tensor | None = None) -> Tensor:
    """r [N, T]: `non_score` (e.g. -kl_coef * KL_t) on the completion tokens, plus each completion's score on
    its last token. An unscorable completion (score NaN) gets no score (0)."""
    mask = mask.to(scores.dtype)
    r = torch.nan_to_num(scores, nan=0.0)[:, None] * _last_token(mask).to(scores.dtype)
    if non_score is not None:
        r = r + non_score * mask
    return r


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum over the masked positions s >= t of gamma^(s - t) r_s (positions outside the mask are skipped:
    they neither add reward nor count as a step); 0 outside the mask."""
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        running = m * (rewards[:, t] + gamma * running) + (1 - m) * running
        out[:, t] = running * m
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438), unwhitened.

    For right-padded [B, T] `rewards` and `values` (V_t: the critic's estimate before token t is generated),
    with `mask` marking the completion tokens, going backwards over the masked positions:

        delta_t = r_t + gamma * V_next - V_t          (V_next = 0 after the last token: the episode ends)
        A_t     = delta_t + gamma * lam * A_next
        returns = A + V                               (the critic's targets)

    Positions outside the mask are skipped (neither a step nor a value), and both outputs are 0 there.
    gamma = lam = 1: A_t = (sum of rewards from t on) - V_t. lam = 0: A_t = delta_t (one-step TD).
    Returns (advantages, returns), both [B, T].
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        next_adv = m * adv + (1 - m) * next_adv
        advantages[:, t] = adv * m
    return advantages, (advantages + values) * mask


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n: int) -> float:
    """Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2): after a rollout of `n` completions whose KL to the
    reference is `kl` (nats per completion), kl_coef <- kl_coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n /
    horizon). Above the target the penalty grows, below it shrinks, by at most 20% per `horizon` completions."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n / horizon)


# ----------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AdvantageInputs:
    """What any estimator may read, for the N completions of one optimizer-step batch (all processes').

    scores      [N]     each completion's score (`sequence_scores`); NaN: unscorable
    mask        [N, T]  1 on completion tokens
    group_size  G: rows g*G .. g*G+G-1 continue the same prompt
    non_score   [N, T] or None  per-token reward besides the score: -kl_coef * KL_t (None: 0)
    values      [N, T] or None  the critic's V_t (gae)
    baseline    [N] or None     ReMax: the score of the prompt's greedy completion, repeated on its rows
    rewards     [N, R] or None  each reward function's values, and `weights` [R]: GDPO (grpo with
                                aggregation normalize_then_sum) normalises each function's column
    """

    scores: Tensor
    mask: Tensor
    group_size: int = 1
    non_score: Tensor | None = None
    values: Tensor | None = None
    baseline: Tensor | None = None
    rewards: Tensor | None = None
    weights: object = None

    @property
    def scorable(self) -> Tensor:
        return ~torch.isnan(self.scores)

    def returns(self) -> Tensor:
        """Each completion's return, sum_t r_t = score + sum_t non_score_t [N] (NaN where unscorable)."""
        if self.non_score is None:
            return self.scores
        return self.scores + (self.non_score * self.mask.to(self.non_score.dtype)).sum(-1)


@dataclass(frozen=True)
class EstimatorOptions:
    """Settings of the estimators; each reads the ones it names.

    gamma, lam       discount and GAE lambda (gae; gamma also reinforce_plus_plus)
    whiten           normalise the advantages over the batch (gae, rloo, remax); None: the entry's default
    scale_rewards, std, aggregation   grpo's options, as `group_advantages` takes them
    """

    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool | None = None
    scale_rewards: str = "group"
    std: str = "unbiased"
    aggregation: str = "sum_then_normalize"


@dataclass
class Advantages:
    advantages: Tensor  # [N] (one per completion) or [N, T] (one per token, 0 off the mask)
    returns: Tensor | None = None  # [N, T] value targets (critic estimators)


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs, EstimatorOptions], Advantages]
    per_token: bool  # the advantages are [N, T]; else [N]
    needs_critic: bool = False
    needs_groups: bool = False  # G >= 2 completions per prompt
    needs_baseline: bool = False  # a greedy completion per prompt, scored (ReMax)
    whiten_default: bool | None = None  # None: `whiten` is not this estimator's option
    reference: str = ""


def _rows(inputs: AdvantageInputs) -> Tensor:
    """The mask restricted to scorable completions [N, T]."""
    return inputs.mask.to(inputs.scores.dtype) * inputs.scorable[:, None].to(inputs.scores.dtype)


def _whiten_rows(a: Tensor, eps: float = 1e-4) -> Tensor:
    """(a - mean) / (std + eps) over the non-NaN entries of [N] (TRL's RLOO `normalize_advantages`)."""
    valid = ~torch.isnan(a)
    if int(valid.sum()) < 2:
        return torch.zeros_like(a)
    v = a[valid]
    return (a - v.mean()) / (v.std() + eps)


def _gae(x: AdvantageInputs, o: EstimatorOptions) -> Advantages:
    if x.values is None:
        raise ValueError("advantage_estimator 'gae' needs the critic's values")
    rows = _rows(x)
    adv, ret = gae(token_rewards(x.scores, x.mask, x.non_score), x.values, x.mask, o.gamma, o.lam)
    adv = masked_whiten(adv, rows) if _whiten(o, "gae") else adv * rows
    # An unscorable completion teaches neither the policy (A = 0) nor the critic (target = its own value).
    ret = torch.where(rows > 0, ret, x.values * x.mask.to(ret.dtype))
    return Advantages(adv, ret)


def _grpo(x: AdvantageInputs, o: EstimatorOptions) -> Advantages:
    if o.aggregation == "normalize_then_sum":
        if x.rewards is None or x.non_score is not None:
            raise ValueError("grpo with aggregation normalize_then_sum (GDPO) normalises each reward function's "
                             "values: it needs `rewards` and takes no per-token KL reward")
        return Advantages(group_advantages(x.rewards, x.group_size, o.scale_rewards, o.std, o.aggregation, x.weights))
    # The return of a completion is its score when there is no KL in the reward: today's GRPO, bit for bit.
    return Advantages(group_advantages(x.returns().unsqueeze(1), x.group_size, o.scale_rewards, o.std))


def _rloo(x: AdvantageInputs, o: EstimatorOptions) -> Advantages:
    R = x.returns().view(-1, x.group_size)
    counted = (~torch.isnan(R)).sum(dim=1, keepdim=True).to(R.dtype)
    # Leave-one-out mean over the other scorable completions of the prompt: (sum - R_i) / (count - 1); a prompt
    # with one scorable completion has no baseline (0/0 = NaN -> advantage 0), as in TRL.
    baseline = (torch.nansum(R, dim=1, keepdim=True) - R) / (counted - 1)
    adv = (R - baseline).reshape(-1)
    if _whiten(o, "rloo"):
        adv = _whiten_rows(adv)
    return Advantages(torch.nan_to_num(adv, nan=0.0, posinf=0.0, neginf=0.0))


def _reinforce_pp(x: AdvantageInputs, o: EstimatorOptions) -> Advantages:
    rows = _rows(x)
    G = returns_to_go(token_rewards(x.scores, x.mask, x.non_score), x.mask, o.gamma)
    return Advantages(masked_whiten(G, rows))


def _reinforce_pp_baseline(x: AdvantageInputs, o: EstimatorOptions) -> Advantages:
    rows = _rows(x)
    R = x.returns().view(-1, x.group_size)
    centred = (R - torch.nanmean(R, dim=1, keepdim=True)).reshape(-1)
    per_token = torch.nan_to_num(centred, nan=0.0)[:, None] * rows
    return Advantages(masked_whiten(per_token, rows))


def _remax(x: AdvantageInputs, o: EstimatorOptions) -> Advantages:
    if x.baseline is None:
        raise ValueError("advantage_estimator 'remax' needs the greedy completions' scores (baseline)")
    rows = _rows(x) * (~torch.isnan(x.baseline))[:, None].to(x.scores.dtype)
    G = returns_to_go(token_rewards(x.scores, x.mask, x.non_score), x.mask, 1.0)
    adv = (G - torch.nan_to_num(x.baseline, nan=0.0)[:, None]) * rows
    return Advantages(masked_whiten(adv, rows) if _whiten(o, "remax") else adv)


def _whiten(o: EstimatorOptions, name: str) -> bool:
    return ADVANTAGE_ESTIMATORS[name].whiten_default if o.whiten is None else o.whiten


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, per_token=True, needs_critic=True, whiten_default=True,
                     reference="PPO, Schulman et al. 2017 (arXiv:1707.06347); GAE, Schulman et al. 2016 (arXiv:1506.02438)"),
    "grpo": Estimator(_grpo, per_token=False, needs_groups=True,
                      reference="GRPO, Shao et al. 2024 (arXiv:2402.03300)"),
    "rloo": Estimator(_rloo, per_token=False, needs_groups=True, whiten_default=False,
                      reference="RLOO, Ahmadian et al. 2024 (arXiv:2402.14740)"),
    "reinforce_plus_plus": Estimator(_reinforce_pp, per_token=True,
                                     reference="REINFORCE++, Hu 2025 (arXiv:2501.03262)"),
    "reinforce_plus_plus_baseline": Estimator(_reinforce_pp_baseline, per_token=True, needs_groups=True,
                                              reference="REINFORCE++-baseline, Hu 2025 (arXiv:2501.03262)"),
    "remax": Estimator(_remax, per_token=True, needs_baseline=True, whiten_default=False,
                       reference="ReMax, Li et al. 2023 (arXiv:2310.10505)"),
}
"""advantage_estimator -> Estimator; every `fn(AdvantageInputs, EstimatorOptions) -> Advantages`."""


def estimate_advantages(name: str, inputs: AdvantageInputs, options: EstimatorOptions = EstimatorOptions()) -> Advantages:
    """The advantages (and value targets) of `inputs` by the estimator registered as `name`."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage_estimator {name!r}; expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    entry = ADVANTAGE_ESTIMATORS[name]
    if entry.needs_groups and inputs.group_size < 2:
        raise ValueError(f"advantage_estimator {name!r} compares the completions of a prompt: group_size must be >= 2")
    if inputs.scores.shape[0] % inputs.group_size:
        raise ValueError(f"{inputs.scores.shape[0]} completions cannot be split into groups of {inputs.group_size}")
    return entry.fn(inputs, options)
