"""The critic's loss: clipped squared error to the value targets (PPO), and how much of the returns it explains.

Aggregated like the policy loss (`posttrain.losses.policy.AGGREGATIONS`, with the step's global `num_items`), so
the sum of the micro-batch losses is the loss of the whole step however it is split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.policy import AGGREGATIONS, LOSS_TYPES

__all__ = ["explained_variance", "value_loss"]


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange_value: float | None = 0.2,
    loss_type: str = "dapo",
    num_items: Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss (Schulman et al. 2017, as in TRL's PPO trainer and OpenAI's baselines), to minimise:

        V_clip = old_V + clip(V - old_V, -cliprange_value, +cliprange_value)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

    The max keeps the pessimistic of the two, so one update cannot move a value far from the one the advantages
    were computed with. `cliprange_value=None`: the plain 0.5 (V - R)^2. The per-token losses are reduced by
    `AGGREGATIONS[loss_type]` exactly as the policy loss is (see `policy_loss` for `num_items`).

    values, old_values, returns, mask: [B, T] (new values with gradient; the rollout's values; the targets).
    Returns (loss, metrics): `clipfrac`, the share of scored tokens whose clipped term was the larger (TRL's
    `val/clipfrac_avg`), detached.
    """
    if values.shape != mask.shape or old_values.shape != mask.shape or returns.shape != mask.shape:
        raise ValueError(f"values, old_values, returns and mask must be one [B, T] shape; got {tuple(values.shape)}, "
                         f"{tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        per_token, clipped_more = 0.5 * unclipped, torch.zeros_like(unclipped)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        clipped = (clipped_values - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_more = (clipped > unclipped).to(values.dtype)
    aggregation = LOSS_TYPES[loss_type][1] if loss_type in LOSS_TYPES else loss_type  # cispo, sapo: as their policy loss
    loss = AGGREGATIONS[aggregation](per_token, mask, num_items=num_items, max_completion_length=max_completion_length)
    with torch.no_grad():
        clipfrac = (clipped_more * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"clipfrac": clipfrac.detach()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 for a perfect critic, 0 for one that predicts the mean,
    negative for one worse than that (OpenRLHF logs it). NaN when the returns do not vary."""
    mask = mask.to(values.dtype)
    n = mask.sum().clamp(min=1.0)

    def var(x):
        mean = (x * mask).sum() / n
        return (((x - mean) ** 2) * mask).sum() / n

    total = var(returns)
    if float(total) == 0.0:
        return torch.tensor(float("nan"))
    return 1.0 - var(returns - values) / total
