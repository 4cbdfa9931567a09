"""Online-RL building blocks: sampling completions (``generate``), scoring them (``rewards``), and the typed
steps from prompts to scored groups that every online method shares (``groups``).

Names are imported on first use: a reward worker process (``reward_isolation: process``) imports
``posttrain.rollout.rewards`` and must not pay for torch and transformers, which the other modules need.
"""

import importlib

_WHERE = {
    "GenerationEngine": "generate", "HFEngine": "generate", "Rollout": "generate",
    "PromptExample": "groups", "ScoredRollout": "groups", "filter_groups": "groups", "has_signal": "groups",
    "prompt_examples": "groups", "prompt_seed": "groups", "sample": "groups", "score": "groups",
    "BUILTIN_REWARDS": "rewards", "RewardModelReward": "rewards", "RewardResult": "rewards",
    "compute_rewards": "rewards", "load_reward_funcs": "rewards",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"posttrain.rollout.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'posttrain.rollout' has no attribute {name!r}")
