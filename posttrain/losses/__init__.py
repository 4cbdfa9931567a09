"""Losses as pure functions of tensors (log-probs, rewards, masks): no models, no I/O.

Each family keeps a registry whose entries share one signature, and a config string selects the entry:
  preference.py  PREFERENCE_LOSSES  (DPO family, SimPO, CPO, ORPO)
  kto.py         KTO (unpaired)
  reward.py      Bradley-Terry reward-model loss
  policy.py      LOSS_TYPES (objective + AGGREGATIONS) of the online-RL family's policy core, GRPO's group advantages
  advantages.py  ADVANTAGE_ESTIMATORS (gae, grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax),
                 `gae`, per-token KL rewards, the adaptive KL controller
  value.py       the critic's clipped value loss (PPO)
"""

from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    Advantages,
    EstimatorOptions,
    adaptive_kl_coef,
    estimate_advantages,
    gae,
    masked_whiten,
    returns_to_go,
    sequence_scores,
    token_kl,
    token_rewards,
)
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
from posttrain.losses.value import explained_variance, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KTO_LOSSES",
    "LOSS_TYPES",
    "AdvantageInputs",
    "Advantages",
    "EstimatorOptions",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "KTOLossOutput",
    "PreferenceLossOutput",
    "bradley_terry_loss",
    "adaptive_kl_coef",
    "cpo_loss",
    "desirable_ratio_warning",
    "estimate_advantages",
    "explained_variance",
    "gae",
    "group_advantages",
    "group_stats",
    "k3_kl",
    "kl_estimate",
    "kto_loss",
    "ld_logps",
    "loss_denominator",
    "masked_whiten",
    "orpo_loss",
    "policy_loss",
    "preference_loss",
    "returns_to_go",
    "sequence_scores",
    "simpo_loss",
    "token_kl",
    "token_rewards",
    "value_loss",
    "wpo_weights",
]
