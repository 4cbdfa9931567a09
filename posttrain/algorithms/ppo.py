"""`posttrain ppo`: PPO-RLHF with a critic, a preset of the one online-RL algorithm (`posttrain.algorithms.online`).

PPO (Schulman et al. 2017, arXiv:1707.06347) as used for language models (Ziegler et al. 2019, arXiv:1909.08593;
Stiennon et al. 2020; Ouyang et al. 2022, arXiv:2203.02155), in the shape of TRL's former PPO trainer:

  per-token rewards   r_t = -kl_coef * KL_t (k1 by default) on every completion token, + the score on the last
                      (the reward model's and/or the verifiable rewards' weighted sum, - missing_eos_penalty when
                      the completion was cut, clamped to reward_clip_range); kl_target adapts kl_coef
  advantages          GAE (gamma 1.0, lam 0.95) over the critic's values, whitened over the batch's tokens;
                      returns = advantages + values are the critic's targets
  update              the clipped surrogate (epsilon 0.2) + vf_coef * the clipped value loss (cliprange_value),
                      num_iterations (= num_ppo_epochs) passes over num_mini_batches mini-batches of each rollout

Four models in the classic set-up: the policy, the reference (a frozen copy, or the LoRA adapter switched off),
the reward model (when `reward_model` is given) and the critic: `critic: separate` (its own model, from
`value_model`, else the reward model, else the policy's weights) or `critic: shared` (a value head on the
policy's backbone, one forward; with LoRA the policy, the reference and the critic share one copy of the base
weights). Deviations from TRL's trainer: losses are normalised by the step's global token count (`loss_type:
dapo`), so the update does not depend on how a batch is split; mini-batches are contiguous (not reshuffled each
epoch), so 1 and N processes train on the same mini-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.algorithms import online
from posttrain.algorithms.online import OnlineConfig, OnlineRL
from posttrain.config import LoraConfig, preset


@dataclass
class Config(OnlineConfig):
    """PPO with a critic (GAE) and the KL in the per-token reward. `batch_size` counts PROMPTS per optimizer step (each
    brings `num_generations` completions, 1 by default; TRL's mini-batch); a rollout samples num_mini_batches x
    batch_size prompts and takes num_iterations (num_ppo_epochs) x num_mini_batches optimizer steps on them, and
    `max_steps` counts those steps. With no arguments: the embedded SmolLM2-135M-Instruct learns the built-in
    arithmetic task."""

    advantage_estimator: str = preset(OnlineConfig, "advantage_estimator", "gae")
    critic: str = preset(OnlineConfig, "critic", "separate")
    kl_coef: float = preset(OnlineConfig, "kl_coef", 0.05)
    num_generations: int = preset(OnlineConfig, "num_generations", 1)
    num_iterations: int = preset(OnlineConfig, "num_iterations", 4)
    temperature: float = preset(OnlineConfig, "temperature", 0.7)
    learning_rate: float = preset(OnlineConfig, "learning_rate", 3e-6)
    command = "ppo"
    metric_names = "ppo"
    # The README's PPO run: the GRPO main job's 640 sampled completions (20 rollouts of 32 prompts, 4 epochs each),
    # with LoRA and a shared critic: one copy of the base weights.
    demo = {"max_steps": 80, "batch_size": 32, "max_completion_length": 16, "micro_batch_size": 32,
            "learning_rate": 1e-4, "critic": "shared", "lora": LoraConfig(r=16),
            "eval_dataset": "arithmetic:split=test,n=64", "eval_batch_size": 32}


class PPO(OnlineRL):
    """The online-RL algorithm with PPO's settings (the class only names it)."""


def run(cfg: Config):
    return online.run(cfg, PPO)
