"""`posttrain grpo`: Group Relative Policy Optimization and its family, with verifiable rewards: a preset of the
one online-RL algorithm (`posttrain.algorithms.online`).

GRPO: Shao et al. 2024, arXiv:2402.03300, eq. 3: for each prompt sample G completions, score them, use
the group-normalised reward (r - mean) / std as every token's advantage, and maximise the clipped
importance-weighted surrogate minus beta * KL(pi || ref) (k3 estimator).
The variants are settings, not copies (`posttrain.losses.policy`):
  Dr. GRPO   scale_rewards=none, loss_type=dr_grpo           (Liu et al. 2025, arXiv:2503.20783)
  DAPO       epsilon_high=0.28, loss_type=dapo, dynamic_sampling, length reward (Yu et al. 2025, arXiv:2503.14476)
  GSPO       importance_sampling_level=sequence              (Zheng et al. 2025, arXiv:2507.18071)
  GDPO       multi_objective_aggregation=normalize_then_sum  (Liu et al. 2026, arXiv:2601.05242)
  2-GRPO     num_generations=2                               (Wu et al. 2025, arXiv:2510.00977)
and so are the other critic-free estimators (`advantage_estimator`): rloo, reinforce_plus_plus,
reinforce_plus_plus_baseline, remax (`posttrain.losses.advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.algorithms import online
from posttrain.algorithms.online import (  # noqa: F401  (the names GRPO's users and tests import from here)
    OnlineConfig,
    OnlineRL,
    PromptExample,
    RolloutBatch,
    ScoredRollout,
    to_micro_batches,
)
from posttrain.rollout.generate import HFEngine


@dataclass
class Config(OnlineConfig):
    """GRPO family with verifiable rewards. `batch_size` counts PROMPTS per optimizer step (each brings
    `num_generations` completions); `micro_batch_size` counts COMPLETIONS per forward/backward on one device.
    With no arguments: the embedded SmolLM2-135M-Instruct learns the built-in arithmetic task."""

    command = "grpo"
    # The README's main job: settings that show the reward rising within minutes on a 2-core CPU.
    demo = {"max_steps": 20, "batch_size": 4, "num_generations": 8, "max_completion_length": 16,
            "micro_batch_size": 32, "learning_rate": 1e-5, "eval_dataset": "arithmetic:split=test,n=64",
            "eval_batch_size": 32}


class GRPO(OnlineRL):
    """The online-RL algorithm; sampling with this module's `HFEngine` unless `make_engine` says otherwise."""

    def __init__(self, cfg: Config, tokenizer, reward_funcs, prompts, reference=None, make_engine=None, critic=None):
        super().__init__(cfg, tokenizer, reward_funcs, prompts, reference, make_engine=make_engine or HFEngine,
                         critic=critic)


def run(cfg: Config):
    return online.run(cfg, GRPO)
