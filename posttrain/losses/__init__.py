"""Losses as pure functions of tensors (log-probs, rewards, masks): no models, no I/O.

Each family keeps a registry whose entries share one signature, and a config string selects the entry:
  preference.py  PREFERENCE_LOSSES  (DPO family, SimPO, CPO, ORPO)
  kto.py         KTO (unpaired)
  reward.py      Bradley-Terry reward-model loss
  policy.py      LOSS_TYPES (objective + AGGREGATIONS) of the GRPO family's policy core, plus advantages
"""

from posttrain.losses.kto import KTO_LOSSES, KTOLossOutput, desirable_ratio_warning, kl_estimate, kto_loss
from posttrain.losses.policy import (
    AGGREGATIONS,
    LOSS_TYPES,
    group_advantages,
    group_stats,
    k3_kl,
    loss_denominator,
    policy_loss,
)
from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    PreferenceLossOutput,
    cpo_loss,
    ld_logps,
    orpo_loss,
    preference_loss,
    simpo_loss,
    wpo_weights,
)
from posttrain.losses.reward import bradley_terry_loss

__all__ = [
    "AGGREGATIONS",
    "KTO_LOSSES",
    "LOSS_TYPES",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "KTOLossOutput",
    "PreferenceLossOutput",
    "bradley_terry_loss",
    "cpo_loss",
    "desirable_ratio_warning",
    "group_advantages",
    "group_stats",
    "k3_kl",
    "kl_estimate",
    "kto_loss",
    "ld_logps",
    "loss_denominator",
    "orpo_loss",
    "policy_loss",
    "preference_loss",
    "simpo_loss",
    "wpo_weights",
]
