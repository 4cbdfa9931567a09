"""Online-RL building blocks: sampling completions (``generate``), scoring them (``rewards``), and the typed
steps from prompts to scored groups that every online method shares (``groups``)."""

from posttrain.rollout.generate import GenerationEngine, HFEngine, Rollout
from posttrain.rollout.groups import (
    PromptExample,
    ScoredRollout,
    filter_groups,
    has_signal,
    prompt_examples,
    prompt_seed,
    sample,
    score,
)
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
    "PromptExample",
    "RewardModelReward",
    "RewardResult",
    "Rollout",
    "ScoredRollout",
    "compute_rewards",
    "filter_groups",
    "has_signal",
    "load_reward_funcs",
    "prompt_examples",
    "prompt_seed",
    "sample",
    "score",
]
