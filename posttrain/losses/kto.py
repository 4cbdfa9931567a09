"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306).

Unpaired preference loss: each example is one completion labelled desirable or undesirable. The implicit
reward is the policy/reference log-ratio r = log pi(y|x) - log pi_ref(y|x), compared with a reference point
z0 that estimates KL(pi || pi_ref) from mismatched prompt/completion pairs. Matches TRL's
``KTOTrainer.kto_loss`` (loss_type="kto").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KTO_LOSSES", "KTOLossOutput", "desirable_ratio_warning", "kl_estimate", "kto_loss"]


class KTOLoss(NamedTuple):
    """A registry entry: `fn(logratios [B], z0, beta) -> (desirable losses [B], undesirable losses [B])`, both
    before the class weights; `uses_kl` says whether z0 enters (the caller can skip estimating it)."""

    fn: object
    uses_kl: bool


def _kto(logratios: Tensor, z0: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    # KTO, Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7.
    return 1 - F.sigmoid(beta * (logratios - z0)), 1 - F.sigmoid(beta * (z0 - logratios))


def _apo_zero_unpaired(logratios: Tensor, z0: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    # APO-zero for unpaired data: D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 split per example (TRL's
    # KTO loss_type="apo_zero_unpaired"): desirable 1 - sigma(beta r), undesirable sigma(beta r). No reference
    # point: it pushes desirable likelihoods up and undesirable ones down from wherever the reference is.
    return 1 - F.sigmoid(beta * logratios), F.sigmoid(beta * logratios)


KTO_LOSSES: dict[str, KTOLoss] = {"kto": KTOLoss(_kto, True), "apo_zero_unpaired": KTOLoss(_apo_zero_unpaired, False)}


class KTOLossOutput(NamedTuple):
    losses: Tensor  # [B], in the order of the inputs; the training loss is losses.mean()
    chosen_rewards: Tensor  # [n_desirable], beta * log-ratio of the desirable rows, detached
    rejected_rewards: Tensor  # [n_undesirable], beta * log-ratio of the undesirable rows, detached
    metrics: dict[str, Tensor]


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLossOutput:
    """Per-example KTO loss, Eq. (7) of Ethayarajh et al. 2024 (arXiv 2402.01306), or another entry of
    ``KTO_LOSSES``.

    With r = policy_logps - ref_logps (summed completion log-probs) and z0 = ``kl``, ``loss_type="kto"``:

        desirable:   desirable_weight   * (1 - sigmoid(beta * (r - z0)))
        undesirable: undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

    ``loss_type="apo_zero_unpaired"`` (TRL's name): desirable ``1 - sigmoid(beta r)``, undesirable
    ``sigmoid(beta r)``, with the same class weights; ``kl`` is not read (pass 0).

    Args:
        policy_logps, ref_logps: [B] summed log-probabilities of each completion.
        labels: [B] bool (or 0/1); True marks a desirable completion.
        kl: the reference point z0, normally from :func:`kl_estimate`. It is a constant of the loss
            (stop-gradient in the paper), so it is detached here whatever the caller passes.

    Returns:
        ``KTOLossOutput``. ``losses[i]`` belongs to example i (TRL concatenates desirable rows first; the mean
        is the same). Rewards are ``beta * r`` as TRL reports them. Metrics are sums and counts, detached, so
        callers can add them over micro-batches and ranks before dividing: ``kl``, ``rewards/chosen_sum``,
        ``rewards/rejected_sum``, ``logps/chosen_sum``, ``logps/rejected_sum``, ``count/chosen``,
        ``count/rejected``.
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.ndim != 1:
        raise ValueError(
            f"policy_logps and ref_logps must both be [B]; got {policy_logps.shape}, {ref_logps.shape}"
        )
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: {sorted(KTO_LOSSES)}")
    labels = torch.as_tensor(labels, device=policy_logps.device).bool()
    if labels.shape != policy_logps.shape:
        raise ValueError(f"labels must be [B]={tuple(policy_logps.shape)}; got {tuple(labels.shape)}")
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()

    logratios = policy_logps - ref_logps
    desirable, undesirable = KTO_LOSSES[loss_type].fn(logratios, z0, beta)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)

    rewards = beta * logratios.detach()
    chosen_rewards, rejected_rewards = rewards[labels], rewards[~labels]
    detached_logps = policy_logps.detach()
    metrics = {
        "kl": z0,
        "rewards/chosen_sum": chosen_rewards.sum(),
        "rewards/rejected_sum": rejected_rewards.sum(),
        "logps/chosen_sum": detached_logps[labels].sum(),
        "logps/rejected_sum": detached_logps[~labels].sum(),
        "count/chosen": labels.sum(),
        "count/rejected": (~labels).sum(),
    }
    return KTOLossOutput(losses, chosen_rewards, rejected_rewards, metrics)


def kl_estimate(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """The KTO reference point z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))), detached.

    (y', x) are mismatched pairs: the caller pairs each prompt with another example's completion (e.g. by
    rotating completions by one within the batch), so z0 estimates KL(pi || pi_ref) without favouring any
    completion, as in the KTO paper. TRL averages per rank, gathers, averages and then clamps;
    to get the same value across ranks, gather the per-pair log-probs from every rank first and call this on
    the gathered tensors (identical to TRL when ranks hold equal numbers of pairs). An empty input gives 0.
    """
    if kl_policy_logps.shape != kl_ref_logps.shape:
        raise ValueError(f"shape mismatch: {tuple(kl_policy_logps.shape)} vs {tuple(kl_ref_logps.shape)}")
    diff = (kl_policy_logps - kl_ref_logps).detach()
    if diff.numel() == 0:
        return torch.zeros((), dtype=diff.dtype, device=diff.device)
    return diff.mean().clamp(min=0)


def desirable_ratio_warning(
    n_desirable: int,
    n_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> str | None:
    """Warn when (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable) is outside [1, 4/3].

    The KTO paper advises weighting the two classes so that this ratio lies in [1, 4/3]; TRL's
    KTOTrainer checks the same range at start-up. Returns the warning text, or None when the ratio is fine.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        return (
            f"KTO needs both desirable and undesirable examples; got {n_desirable} desirable and "
            f"{n_undesirable} undesirable."
        )
    ratio = (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0 + 1e-12:
        return None
    # Either weight alone can bring the ratio back into range; give both intervals.
    d_lo = undesirable_weight * n_undesirable / n_desirable
    u_hi = desirable_weight * n_desirable / n_undesirable
    return (
        f"KTO class balance (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable) = "
        f"({desirable_weight:g} * {n_desirable}) / ({undesirable_weight:g} * {n_undesirable}) = {ratio:.3f}, "
        f"outside the recommended [1, 4/3]. Set EITHER desirable_weight in [{d_lo:.3f}, {d_lo * 4 / 3:.3f}] "
        f"OR undesirable_weight in [{u_hi * 3 / 4:.3f}, {u_hi:.3f}] (not both)."
    )
