"""Online-RL building blocks: sampling completions (``generate``) and scoring them (``rewards``)."""

from posttrain.rollout.generate import GenerationEngine, HFEngine, Rollout
from posttrain.rollout.rewards import (
    BUILTIN_REWARDS,
    RewardModelReward,
    RewardResult,
    compute_rewards,
    load_reward_funcs,
)

__all__ = [
    "BUILTIN_REWARDS",
    "GenerationEngine",
    "HFEngine",
    "RewardModelReward",
    "RewardResult",
    "Rollout",
    "compute_rewards",
    "load_reward_funcs",
]
