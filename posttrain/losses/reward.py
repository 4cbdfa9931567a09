"""Bradley-Terry pairwise loss for reward models, as TRL's ``RewardTrainer.compute_loss``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bradley_terry_loss"]


def _as_vector(x: Tensor, name: str) -> Tensor:
    # A sequence-classification head returns [B, 1]; subtracting a [B] margin from that would broadcast to
    # [B, B] silently, so everything is flattened to [B] first.
    if x.ndim == 2 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.ndim != 1:
        raise ValueError(f"{name} must be [B] or [B, 1]; got {tuple(x.shape)}")
    return x


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair Bradley-Terry reward-model loss.

        loss_i = -log sigmoid(r_c - r_r - m_i)  +  c * (r_c + r_r)^2

    The first term is the pairwise ranking loss of InstructGPT (Ouyang et al. 2022, arXiv 2203.02155,
    Eq. 1) with the optional preference margin m of Llama 2 (Touvron et al. 2023, arXiv 2307.09288, Eq. 2).
    The second is TRL's reward-centering auxiliary loss, c * mean((r_c + r_r)^2), from Eisenstein et al.
    2023 (arXiv 2312.09244); it pushes rewards towards zero mean. Adding it per pair keeps
    ``losses.mean()`` equal to TRL's scalar loss.

    Args:
        chosen_rewards, rejected_rewards: [B] (or [B, 1]) scalar rewards of the preferred / rejected answers.
        margin: optional [B] tensor or scalar m.
        center_rewards_coefficient: optional c; None or 0 disables the centering term.

    Returns:
        ``(losses [B], metrics)``. Metrics (detached, TRL names): ``accuracy`` = mean(r_c > r_r), ``margin`` =
        mean(r_c - r_r) (the learned gap, not the input margin), and ``mean_reward`` / ``min_reward`` /
        ``max_reward`` over all 2B rewards.
    """
    chosen = _as_vector(chosen_rewards, "chosen_rewards")
    rejected = _as_vector(rejected_rewards, "rejected_rewards")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected rewards differ in shape: {tuple(chosen.shape)} vs {tuple(rejected.shape)}"
        )

    logits = chosen - rejected
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=logits.dtype, device=logits.device)
        if margin.ndim > 0:
            margin = _as_vector(margin, "margin")
            if margin.shape != logits.shape:
                raise ValueError(
                    f"margin must be a scalar or [B]={tuple(logits.shape)}; got {tuple(margin.shape)}"
                )
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2

    with torch.no_grad():
        everything = torch.cat([chosen, rejected])
        metrics = {
            "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
            "margin": (chosen - rejected).mean(),
            "mean_reward": everything.mean(),
            "min_reward": everything.min(),
            "max_reward": everything.max(),
        }
    return losses, metrics
