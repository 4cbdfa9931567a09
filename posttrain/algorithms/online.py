"""The one online-RL algorithm: rollout -> rewards -> advantages -> the clipped policy update.

`posttrain grpo` (`algorithms/grpo.py`) and `posttrain ppo` are presets of it: settings, not trainers. One
optimizer-step batch is prepared in named steps (`OnlineRL.prepare`):

    sample G completions of each prompt with the current policy (KV cache, prompt prefilled once per group)
    -> score them with the reward functions (`posttrain.rollout.groups`; DAPO's dynamic sampling filters groups)
    -> reference log-probs (when a KL term needs them) and per-token rewards: each completion's score on its last
       token, -kl_coef * KL_t on every token (`posttrain.losses.advantages`); the critic's values (`critic:
       shared | separate`, `posttrain.critic`) when the estimator needs them
    -> advantages by the estimator `advantage_estimator` names (gae, grpo, rloo, reinforce_plus_plus,
       reinforce_plus_plus_baseline, remax; `ADVANTAGE_ESTIMATORS`), over the whole global batch, and with a
       critic its value targets
    -> micro-batches for the clipped surrogate of `posttrain.losses.policy` (+ beta * k3 to the reference),
       plus vf_coef * the clipped value loss (`posttrain.losses.value`) with a critic

then takes `num_iterations` passes of optimizer steps over it (one step per batch_size prompts; a generation of
several steps' prompts: `generation_batch_size`, PPO's `num_mini_batches`). With one step the "old" policy is the current one,
so the ratio is exactly 1 and no extra forward is needed (the gradient of exp(logp - sg(logp)) is the policy
gradient); with more, the rollout's own sampling log-probs are the old log-probs.

Two places for a KL to the reference, both optional: `beta` (k3 in the loss, GRPO's) and `kl_coef` (in the
per-token reward, PPO's and REINFORCE++'s), with Ziegler et al.'s adaptive coefficient when `kl_target` is set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from posttrain.config import TrainConfig, UserError, opt
from posttrain.critic import KINDS as CRITICS
from posttrain.critic import NAME as CRITIC
from posttrain.critic import Critic
from posttrain.critic import build as build_critic
from posttrain.data import load_train_eval
from posttrain.engine import Algorithm, Engine, Global, Max, Mean, Min, Prepared, Sum
from posttrain.evaluate import evaluate_prompts
from posttrain.logprobs import shared_prefix_token_logps
from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    AdvantageInputs,
    EstimatorOptions,
    adaptive_kl_coef,
    estimate_advantages,
    masked_mean,
    sequence_scores,
    token_kl,
)
from posttrain.losses.policy import (
    LOSS_TYPES,
    entropy_bonus,
    group_stats,
    loss_denominator,
    policy_loss,
    top_entropy_mask,
)
from posttrain.losses.value import explained_variance, value_loss
from posttrain.models import ATTACHED, prepare_model
from posttrain.parallel import all_reduce_sum, gather_rows, is_main, rank_world, routed
from posttrain.reference import Reference, Sync, build
from posttrain.rollout.curriculum import PassRateCurriculum, difficulty_column, group_pass_rates
from posttrain.rollout.generate import HFEngine, pad_cat
from posttrain.rollout.groups import (
    PromptExample,
    ScoredRollout,
    collect,
    draw_prompts,
    filter_groups,
    prompt_examples,
    prompt_seed,
    sample,
    score,
)
from posttrain.rollout.rewards import BUILTIN_FORMAT_PATTERN, load_reward_funcs

log = logging.getLogger("posttrain")

DEFAULT_DATASET = "arithmetic"
BUILTIN_REWARD_WEIGHTS = [1.0, 0.2]  # accuracy, format
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class RolloutOptions:
    """How an online method samples and scores its completions (the online-RL presets, online DPO): reward
    functions, sampling, dynamic sampling, evaluation and the logging of completions. A mixin of their configs."""

    reward_funcs: list[str] | None = opt(None, "Reward functions: names (accuracy, format, length, reward_model) or module:function. Default: accuracy (+ format for the built-in task); reward_model when reward_model is given.")
    reward_weights: list[float] | None = opt(None, "Weight of each reward function (default: all 1).")
    reward_model: str | None = opt(None, "Path of a reward model (`posttrain rm` output or any sequence-classification folder), used by the reward_model function.")
    format_pattern: str | None = opt(None, "Regex the `format` reward checks (default: a \\boxed{} answer).")
    overlong_buffer: int | None = opt(None, "`length` reward: tokens before max_completion_length where the penalty ramps.")
    reward_timeout: float = opt(10.0, "Seconds a reward function may take per batch before its column is NaN.")
    reward_isolation: str = opt(
        "thread",
        "Where reward functions run. thread: in the trainer (survives exceptions and hangs; a hung call is "
        "abandoned). process: each function in its own worker process, killed at reward_timeout and replaced "
        "after a crash, os._exit or MemoryError, so a segfault or runaway allocation costs one batch's scores.",
        ("thread", "process"),
    )
    reward_memory_mb: int | None = opt(
        None, "reward_isolation=process: address-space limit of each reward worker process in MiB (set with "
        "resource.RLIMIT_AS after the function loads); a call that allocates past it scores None. Default: none.")
    missing_eos_penalty: float | None = opt(None, "Subtracted from the score of a completion cut at max_completion_length (TRL's PPO option).")
    num_generations: int = opt(8, "G: completions sampled per prompt.")
    max_completion_length: int = opt(64, "Maximum new tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature (also divides the logits when scoring).")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    top_k: int = opt(0, "Top-k sampling (0: off).")
    min_p: float | None = opt(None, "Min-p sampling: keep the tokens whose probability is at least min_p x the most "
                              "likely one's (e.g. 0.05; default off).")
    repetition_penalty: float = opt(1.0, "Divide the logits of tokens already in the prompt or the completion by "
                                    "this (multiply negative ones) before sampling; 1: off. Old log-probs stay the "
                                    "policy's own.")
    generation_kwargs: dict | None = opt(None, "Sampling settings that override the keys of the same name: "
                                         "temperature, top_p, top_k, min_p, repetition_penalty (TRL's key).")
    chat_template_kwargs: dict | None = opt(None, "Extra variables for the chat template when prompts are rendered, "
                                            "e.g. {enable_thinking: false}.")
    num_generations_eval: int | None = opt(None, "Completions per eval prompt, sampled at `temperature` (eval reports "
                                           "their mean rewards and pass@k); default: one greedy completion.")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards are all equal and sample more prompts.")
    max_sampling_rounds: int = opt(3, "Dynamic sampling: generation rounds per step at most.")
    log_completions: bool = opt(False, "Append every sampled completion with its rewards and step to completions.jsonl.")
    num_completions_to_print: int = opt(4, "Completions per step kept (with prompt, rewards, advantage) in samples.jsonl "
                                        "for the run report, whatever log_completions says; 0: none.")
    prompt_suffix: str | None = opt(None, "Text appended to every prompt (e.g. ' Reply with only the final number.').")
    chat_prompts: bool = opt(True, "Send plain-text prompts as a user message through the chat template (when the tokenizer has one).")

    def validate_rollout(self) -> None:
        if self.max_completion_length < 1:
            raise UserError("max_completion_length must be >= 1")
        if self.num_completions_to_print < 0:
            raise UserError("num_completions_to_print must be >= 0")
        if self.max_sampling_rounds < 1:
            raise UserError("max_sampling_rounds must be >= 1")
        if self.reward_timeout <= 0:
            raise UserError("reward_timeout must be > 0")
        if self.reward_memory_mb is not None and (self.reward_memory_mb < 1 or self.reward_isolation != "process"):
            raise UserError("reward_memory_mb must be >= 1 and needs reward_isolation=process")
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise UserError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward functions")
        unknown = sorted(set(self.generation_kwargs or {}) - set(SAMPLING_KEYS))
        if unknown:
            raise UserError(f"generation_kwargs: {', '.join(unknown)} not supported (supported: {', '.join(SAMPLING_KEYS)})")
        s = self.sampling()
        if s["temperature"] < 0:
            raise UserError("temperature must be >= 0")
        if not 0 < s["top_p"] <= 1:
            raise UserError("top_p must be in (0, 1]")
        if s["top_k"] < 0:
            raise UserError("top_k must be >= 0")
        if s["min_p"] is not None and not 0 < s["min_p"] <= 1:
            raise UserError("min_p must be in (0, 1]")
        if s["repetition_penalty"] <= 0:
            raise UserError("repetition_penalty must be > 0")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise UserError("num_generations_eval must be >= 1")

    def sampling(self) -> dict:
        """The sampling settings, generation_kwargs over the keys of the same name."""
        return {**{k: getattr(self, k) for k in SAMPLING_KEYS}, **(self.generation_kwargs or {})}


@dataclass
class OnlineConfig(RolloutOptions, TrainConfig):
    """Online RL with verifiable rewards. `batch_size` counts PROMPTS per optimizer step (each brings
    `num_generations` completions); `micro_batch_size` counts COMPLETIONS per forward/backward on one device."""

    reward_clip_range: list[float] | None = opt(None, "[min, max]: each completion's score is clamped to it (after missing_eos_penalty).")
    num_generations: int = opt(8, "G: completions sampled per prompt (2 = 2-GRPO).")
    generation_batch_size: int | None = opt(
        None,
        "GLOBAL COMPLETIONS sampled in one generation (TRL's unit), a multiple of batch_size x num_generations "
        "(the default). One generation then serves generation_batch_size / (batch_size x num_generations) "
        "optimizer steps, each on its own batch_size prompts; the later ones are off-policy (ratios against the "
        "sampling log-probs). TRL's steps_per_generation sets it.")
    advantage_estimator: str = opt(
        "grpo", "How scores become advantages (veRL's names): grpo (group-normalised), rloo (leave-one-out baseline), "
        "reinforce_plus_plus (batch-whitened returns per token), reinforce_plus_plus_baseline (group mean, then "
        "batch whitening), remax (greedy completion's score as baseline; one more generation per prompt).",
        tuple(ADVANTAGE_ESTIMATORS))
    critic: str = opt("none", "Value model: none (critic-free estimators), shared (a value head on the policy's own backbone: "
                      "one forward, no second model) or separate (a model of its own with a scalar head). gae needs one.",
                      CRITICS)
    value_model: str | None = opt(None, "critic: separate: the weights it starts from (a `posttrain rm` output, any "
                                  "sequence-classification folder, or a causal LM, whose new head starts at 0). Default: "
                                  "reward_model when given, else the policy's model.")
    vf_coef: float = opt(0.1, "Weight of the critic's value loss in the total loss.")
    cliprange_value: float | None = opt(0.2, "Value clipping: a value may move this far from the rollout's per update (null: "
                                        "no clipping).")
    critic_learning_rate: float | None = opt(None, "Learning rate of the critic's parameters (default: learning_rate).")
    num_mini_batches: int | None = opt(None, "PPO's name for the split of a rollout: each generation samples num_mini_batches "
                                       "x batch_size prompts and takes one optimizer step on each batch_size of them, "
                                       "num_iterations times over (sets generation_batch_size).")
    whiten_advantages: bool | None = opt(None, "Normalise the advantages over the batch (gae, rloo, remax). Default: on for gae, "
                                         "off for rloo and remax (as TRL and veRL); grpo scales by scale_rewards and "
                                         "the reinforce_plus_plus estimators always normalise.")
    gamma: float = opt(1.0, "Discount per token of the returns (gae, reinforce_plus_plus).")
    lam: float = opt(0.95, "GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD.")
    beta: float = opt(0.0, "KL coefficient of the k3 term in the LOSS (GRPO's place for the KL).")
    kl_coef: float = opt(0.0, "KL coefficient in the per-token REWARD, r_t -= kl_coef * KL_t (PPO's and REINFORCE++'s place). "
                         "beta or kl_coef > 0 loads a reference (the LoRA adapter off, or a frozen copy).")
    kl_estimator: str = opt("k1", "Per-token KL in the reward: k1 = logp - ref (unbiased, TRL's PPO default) or k3 (never negative).",
                            KL_ESTIMATORS)
    kl_target: float | None = opt(None, "Adaptive kl_coef (Ziegler et al. 2019): the KL per completion (nats, summed over its tokens) "
                                  "to hold; kl_coef is where it starts. Default: a fixed kl_coef.")
    kl_horizon: float = opt(10000.0, "Adaptive kl_coef: completions over which it may change by up to 20%.")
    epsilon: float = opt(0.2, "Lower clip: ratio >= 1 - epsilon.")
    epsilon_high: float | None = opt(None, "Upper clip (DAPO clip-higher, e.g. 0.28); default = epsilon. With "
                                     "loss_type=cispo: the cap on the importance ratio itself (e.g. 5.0).")
    delta: float | None = opt(None, "Dual clip: cap on the ratio for negative advantages (e.g. 3).")
    top_entropy_quantile: float = opt(
        1.0, "rho: the policy term trains only the top-rho fraction of the step's completion tokens by entropy "
        "(80/20 rule, arXiv:2506.01939, recommends 0.2; 0 keeps the highest-entropy token); 1: every token.")
    entropy_coef: float = opt(0.0, "Entropy bonus: minus entropy_coef x the mean entropy over the trained tokens.")
    sync_ref_model: bool = opt(False, "TR-DPO style: move the reference (beta or kl_coef > 0) towards the policy "
                               "during training.")
    ref_model_mixup_alpha: float = opt(0.6, "sync_ref_model: ref <- alpha x policy + (1 - alpha) x ref (1: a copy).")
    ref_model_sync_steps: int = opt(512, "sync_ref_model: update the reference every N optimizer steps.")
    num_iterations: int = opt(1, "mu: passes over each generated batch, one optimizer step per batch_size prompts "
                              "(PPO's num_ppo_epochs).")
    loss_type: str = opt(
        "dapo",
        "Aggregations of the clipped objective: grpo (mean per sequence, then over sequences), bnpo (token mean "
        "per micro-batch), dr_grpo (token sum / (sequences x max_completion_length)), dapo (token sum / the step's "
        "token count). Other losses, each with the aggregation TRL fixes for it: cispo (capped, detached "
        "importance weight x A x log-prob; as dapo; needs epsilon_high), sapo (soft sigmoid gate; as grpo).",
        tuple(LOSS_TYPES),
    )
    sapo_temperature_pos: float = opt(1.0, "sapo: gate temperature for tokens with positive advantage.")
    sapo_temperature_neg: float = opt(1.05, "sapo: gate temperature for tokens with zero or negative advantage.")
    use_bias_correction_kl: bool = opt(True, "Multiply the k3 KL term by the importance ratio, which makes its "
                                       "gradient the unbiased reverse-KL gradient (TRL's default; beta > 0 only).")
    scale_rewards: str = opt("group", "grpo: advantage scale, group std, batch std, or none (Dr. GRPO).", ("group", "batch", "none"))
    std: str = opt("unbiased", "grpo: std used for scaling, unbiased (as TRL) or population (1/G).", ("unbiased", "population"))
    multi_objective_aggregation: str = opt("sum_then_normalize", "grpo with several rewards: sum then normalise (GRPO) or normalise each then sum (GDPO).", ("sum_then_normalize", "normalize_then_sum"))
    importance_sampling_level: str = opt("token", "token ratio (GRPO) or sequence ratio (GSPO).", ("token", "sequence"))
    curriculum: str = opt("none", "Which prompts a step samples: none (the data order) or pass_rate (prompts whose recent "
                          "group pass rate is inside curriculum_band, by difficulty when the data has a difficulty "
                          "column; see posttrain.rollout.curriculum).", ("none", "pass_rate"))
    curriculum_column: str = opt("auto", "pass_rate: the difficulty column; auto takes the first of difficulty, level, "
                                 "type present in every row; none: pass rates alone.")
    curriculum_band: list = opt([0.0, 1.0], "pass_rate: a prompt is drawn while its estimated pass rate (share of its "
                                "group right under the main reward) is strictly inside [low, high].")
    curriculum_explore: float = opt(0.1, "pass_rate: share of each draw taken uniformly from all prompts.")
    curriculum_window: int = opt(8, "pass_rate: groups per difficulty that its recent pass rate averages.")
    mask_truncated_completions: bool = opt(False, "Exclude completions that hit max_completion_length from the loss.")
    learning_rate: float = opt(1e-6, "Peak learning rate of AdamW.")
    batch_size: int = opt(8, "GLOBAL prompts per optimizer step (x num_generations completions).")
    micro_batch_size: int = opt(8, "Completions per forward/backward on one device.")
    max_prompt_length: int | None = opt(512, "Maximum prompt tokens; longer prompts keep their end.")
    command = "online"
    metric_names = "grpo"  # the preset's metric vocabulary: TRL's GRPO names, or TRL's PPO names ("ppo")
    trl_batch_counts_completions = True  # TRL's per_device_train_batch_size counts completions (trl_compat)

    def validate(self) -> None:
        super().validate()
        estimator = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        if self.num_generations < 1:
            raise UserError("num_generations must be >= 1")
        if estimator.needs_groups and self.num_generations < 2:
            raise UserError(f"num_generations must be >= 2 (advantage_estimator={self.advantage_estimator} compares "
                            "the completions of one prompt)")
        if estimator.needs_critic and self.critic == "none":
            raise UserError(f"advantage_estimator={self.advantage_estimator} needs a critic: critic: shared or separate")
        if not estimator.needs_critic and self.critic != "none":
            raise UserError(f"critic: {self.critic} trains a value model that advantage_estimator="
                            f"{self.advantage_estimator} does not use; set critic: none (or advantage_estimator: gae)")
        if self.value_model is not None and self.critic != "separate":
            raise UserError("value_model is where a separate critic starts from: set critic: separate")
        if self.critic_learning_rate is not None and (self.critic == "none" or self.critic_learning_rate <= 0):
            raise UserError("critic_learning_rate must be > 0 and needs a critic")
        if self.vf_coef < 0 or (self.cliprange_value is not None and self.cliprange_value <= 0):
            raise UserError("vf_coef must be >= 0 and cliprange_value > 0 (or null)")
        if self.dynamic_sampling and self.num_generations < 2:
            raise UserError("dynamic_sampling keeps the groups whose rewards vary: num_generations must be >= 2")
        if self.num_mini_batches is not None:
            if self.num_mini_batches < 1:
                raise UserError("num_mini_batches must be >= 1")
            rollout = self.num_mini_batches * self.batch_size * self.num_generations
            if self.generation_batch_size not in (None, rollout):
                raise UserError(f"num_mini_batches {self.num_mini_batches} means generation_batch_size {rollout} "
                                f"(x batch_size x num_generations), not {self.generation_batch_size}: set one of them")
            self.generation_batch_size = rollout
        if self.whiten_advantages is not None and estimator.whiten_default is None:
            raise UserError(f"whiten_advantages: advantage_estimator={self.advantage_estimator} has no such option "
                            "(it applies to gae, rloo and remax)")
        self.validate_rollout()
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError("beta, epsilon and epsilon_high must be >= 0")
        if self.kl_coef < 0 or self.kl_horizon <= 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise UserError("kl_coef must be >= 0, kl_horizon and kl_target > 0")
        if self.kl_target is not None and self.kl_coef == 0:
            raise UserError("kl_target adapts kl_coef, which starts where kl_coef says: set kl_coef > 0 (e.g. 0.05)")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise UserError("gamma and lam must be in [0, 1]")
        if self.reward_clip_range is not None:
            r = self.reward_clip_range
            if len(r) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) or r[0] >= r[1]:
                raise UserError(f"reward_clip_range: expected [min, max] with min < max, got {r!r}")
        if self.num_iterations < 1:
            raise UserError("num_iterations must be >= 1")
        if self.loss_type == "cispo" and (self.epsilon_high is None or self.epsilon_high < 1):
            raise UserError("loss_type=cispo: epsilon_high caps the importance ratio itself and must be >= 1 "
                            f"(ScaleRL recommends 5.0); got {self.epsilon_high}")
        band = self.curriculum_band
        if len(band) != 2 or not all(isinstance(b, (int, float)) for b in band) or not 0 <= band[0] < band[1] <= 1:
            raise UserError(f"curriculum_band must be [low, high] with 0 <= low < high <= 1, got {band}")
        if not 0 <= self.curriculum_explore <= 1 or self.curriculum_window < 1:
            raise UserError("curriculum_explore must be in [0, 1] and curriculum_window >= 1")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise UserError("sapo_temperature_pos and sapo_temperature_neg must be > 0")
        if self.multi_objective_aggregation == "normalize_then_sum":
            if self.scale_rewards != "group":
                raise UserError("multi_objective_aggregation=normalize_then_sum needs scale_rewards=group")
            if self.advantage_estimator != "grpo":
                raise UserError("multi_objective_aggregation=normalize_then_sum is GDPO: advantage_estimator=grpo")
            if self.kl_coef > 0 or self.missing_eos_penalty is not None or self.reward_clip_range is not None:
                raise UserError("multi_objective_aggregation=normalize_then_sum normalises each reward function's values; "
                                "kl_coef, missing_eos_penalty and reward_clip_range act on their sum: use one or the other")
        step = self.batch_size * self.num_generations
        if self.generation_batch_size is not None and (
                self.generation_batch_size < step or self.generation_batch_size % step):
            raise UserError(f"generation_batch_size {self.generation_batch_size} (completions) must be a multiple of "
                            f"batch_size x num_generations = {step}")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise UserError("top_entropy_quantile must be in [0, 1]")
        if self.entropy_coef < 0:
            raise UserError("entropy_coef must be >= 0")
        if self.sync_ref_model and ((self.beta == 0 and self.kl_coef == 0) or self.lora is not None):
            raise UserError("sync_ref_model moves a reference copy: it needs beta or kl_coef > 0 and full fine-tuning "
                            "(no lora)")
        if not 0 < self.ref_model_mixup_alpha <= 1 or self.ref_model_sync_steps < 1:
            raise UserError("ref_model_mixup_alpha must be in (0, 1] and ref_model_sync_steps >= 1")

    def estimator_options(self) -> EstimatorOptions:
        return EstimatorOptions(gamma=self.gamma, lam=self.lam, whiten=self.whiten_advantages,
                                scale_rewards=self.scale_rewards, std=self.std,
                                aggregation=self.multi_objective_aggregation)


@dataclass
class RolloutBatch:
    """A micro-batch of scored completions. Prompts are kept once (rows point at them) so the training
    forward runs each prompt once per micro-batch (`shared_prefix_token_logps`).

    prompts            unique prompts of this micro-batch (token ids)
    row_prompt         [N] long, the prompt each row continues
    completion_ids     [N, T] right-padded;  completion_mask [N, T] 1 on scored tokens (EOS included)
    advantages         [N] (one per completion) or [N, T] (one per token)
    old_logps, ref_logps  [N, T] or None, aligned with completion_ids
    entropy_mask       [N, T] 1 on the tokens the policy term trains (top_entropy_quantile < 1), or None
    entropy_tokens     the step's trained-token count over every process (the entropy bonus's mean), or None
    values, returns    [N, T] or None: the critic's values at the rollout and its targets
    """

    prompts: list
    row_prompt: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    entropy_mask: torch.Tensor | None = None
    entropy_tokens: float | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) + int(self.completion_mask.sum())


def to_micro_batches(scored: ScoredRollout, advantages: torch.Tensor | None, size: int, *, mask: torch.Tensor | None = None,
                     old_logps: torch.Tensor | None = None) -> list[RolloutBatch]:
    """Cut the rollout's rows into micro-batches of `size` rows (a micro-batch may span groups), trimming
    padding columns. `advantages` [N] or [N, T] (None: zeros, filled in later); `mask` replaces the completion
    mask (e.g. truncated rows masked out); `old_logps` are the log-probs the ratio is taken against (None:
    on-policy)."""
    G = scored.group_size
    mask = scored.completion_mask if mask is None else mask
    N = scored.completion_ids.shape[0]
    if advantages is None:
        advantages = torch.zeros(N)
    out = []
    for s in range(0, N, size):
        rows = torch.arange(s, min(s + size, N))
        groups = sorted({int(r) // G for r in rows})
        local = {g: j for j, g in enumerate(groups)}
        width = max(int(mask[rows].sum(-1).max()), 1)
        out.append(RolloutBatch(
            [scored.prompts[g].prompt_ids for g in groups],
            torch.tensor([local[int(r) // G] for r in rows]),
            scored.completion_ids[rows, :width],
            mask[rows, :width],
            advantages[rows] if advantages.ndim == 1 else advantages[rows, :width],
            None if old_logps is None else old_logps[rows, :width],
            None,
        ))
    return out


def _rows_of(micro: list[RolloutBatch], field: str, width: int) -> torch.Tensor:
    """A per-token field of every micro-batch, stacked back into the rollout's [N, width] (0 on padding)."""
    parts = [getattr(mb, field) for mb in micro]
    out = pad_cat(parts, 0.0)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]))


def _set_rows(micro: list[RolloutBatch], field: str, values: torch.Tensor) -> None:
    """The inverse of `_rows_of`: each micro-batch gets its rows of `values` ([N] or [N, T], trimmed to its width)."""
    at = 0
    for mb in micro:
        rows = values[at : at + len(mb)]
        setattr(mb, field, rows if rows.ndim == 1 else rows[:, : mb.completion_ids.shape[1]].contiguous())
        at += len(mb)


class OnlineRL(Algorithm):
    """One optimizer-step batch is prepared in named steps (`prepare`):

        sample -> score (`rollout`), dynamic sampling's filter and further rounds (`collect`),
        -> micro-batches with the reference's log-probs and the critic's values (no gradient)
        -> per-token KL rewards (`kl_rewards`) -> advantages and value targets (`advantages`)

    `make_engine(model, tokenizer)` builds the `GenerationEngine` that samples (default: `HFEngine`);
    `critic` is the value model (`posttrain.critic`), attached to the policy, when the estimator needs one.
    """

    def __init__(self, cfg: OnlineConfig, tokenizer, reward_funcs, prompts: list[PromptExample],
                 reference: Reference | None = None, make_engine=None, critic: Critic | None = None):
        self.cfg, self.tok, self.funcs, self.prompts = cfg, tokenizer, reward_funcs, prompts
        self.reference = reference or Reference()
        if (cfg.beta > 0 or cfg.kl_coef > 0) and self.reference.strategy == "none":
            raise ValueError("beta or kl_coef > 0 needs a reference (posttrain.reference.build)")
        self.critic = critic or Critic()
        if self.critic.kind != cfg.critic:
            raise ValueError(f"the config asks for critic {cfg.critic!r}, the algorithm got {self.critic.kind!r} "
                             "(posttrain.critic.build)")
        self.make_engine = make_engine or HFEngine
        self.estimator = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator]
        # generation_batch_size (PPO: num_mini_batches): one generation, k optimizer steps on its k slices, each
        # num_iterations (num_ppo_epochs) times.
        step = cfg.batch_size * cfg.num_generations
        self.parts_per_batch = (cfg.generation_batch_size or step) // step
        self.steps_per_batch = self.parts_per_batch * cfg.num_iterations
        self.weights = cfg.reward_weights
        self.kl_coef = cfg.kl_coef  # moves with the adaptive controller (kl_target); part of the run's state
        self._round = 0  # generation rounds so far: part of every prompt's sampling seed
        self._steps = 0  # batches prepared: seeds the curriculum's draw, the same on every rank
        self.curriculum = make_curriculum(cfg, prompts) if cfg.curriculum == "pass_rate" else None
        # The reward whose group mean is the curriculum's pass rate: the main one (highest weight, first on ties).
        w = self.weights or [1.0] * len(reward_funcs)
        self._pass_column = max(range(len(w)), key=lambda j: (w[j], -j)) if w else 0

    # --- the steps of one prepared batch ---------------------------------------------------------------
    def rollout(self, model, prompts: list[PromptExample]) -> ScoredRollout:
        """One generation round: G completions of each prompt, scored by the reward functions. ReMax: also each
        prompt's greedy completion, whose score is the baseline of its G samples."""
        cfg = self.cfg
        seeds = [prompt_seed(cfg.seed, self._round, e.index) for e in prompts]
        engine = self.make_engine(model, self.tok)
        out = sample(engine, prompts, cfg.num_generations, seeds=seeds, max_new_tokens=cfg.max_completion_length,
                     **cfg.sampling())
        self._round += 1
        scored = score(self.funcs, prompts, out, weights=self.weights, timeout=cfg.reward_timeout)
        if self.estimator.needs_baseline:
            greedy = score(self.funcs, prompts, sample(engine, prompts, 1, seeds=seeds, temperature=0.0,
                                                       max_new_tokens=cfg.max_completion_length),
                           weights=self.weights, timeout=cfg.reward_timeout)
            scored.baseline = self._scores(greedy.rewards, greedy.truncated).repeat_interleave(cfg.num_generations)
            scored.failures += greedy.failures
            scored.timeouts += greedy.timeouts
        return scored

    def collect(self, model, examples: list[PromptExample]) -> tuple[ScoredRollout, list[ScoredRollout]]:
        """The step's groups, and every round as sampled (`posttrain.rollout.groups.collect`): with dynamic
        sampling, the groups that have a signal (`filter_groups`), more prompts drawn from the whole dataset (or
        the curriculum) until `len(examples)` are kept or `max_sampling_rounds` is reached."""
        cfg = self.cfg
        per_reward = cfg.multi_objective_aggregation == "normalize_then_sum"

        def draw(rounds: list[ScoredRollout]) -> list[PromptExample]:
            if self.curriculum is None:
                return draw_prompts(self.prompts, len(examples), seed=cfg.seed, round=self._round, last=rounds[-1])
            # More prompts from the curriculum, none of this step's again.
            seed = prompt_seed(cfg.seed, self._round, rounds[-1].prompts[0].index)
            taken = [e.index for r in rounds for e in r.prompts]
            return [self.prompts[i] for i in self.curriculum.draw(len(examples), seed, exclude=taken)]

        scored, rounds, found = collect(
            lambda p: self.rollout(model, p), examples, draw, self.tok.pad_token_id, dynamic=cfg.dynamic_sampling,
            max_rounds=cfg.max_sampling_rounds, keep=lambda r: filter_groups(r, self.weights, per_reward))
        if cfg.dynamic_sampling and found < len(examples) and is_main():
            log.warning(f"dynamic sampling: {found}/{len(examples)} groups with reward variance after "
                        f"{len(rounds)} rounds")
        return scored, rounds

    def _scores(self, rewards: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return sequence_scores(rewards, self.weights, truncated=truncated, missing_eos_penalty=cfg.missing_eos_penalty,
                               clip_range=cfg.reward_clip_range)

    def kl_rewards(self, scored: ScoredRollout, mask: torch.Tensor, ref_logps: torch.Tensor | None):
        """(non_score [N, T] = -kl_coef * KL_t per completion token, or None without a KL in the reward; the KL
        summed over each completion's tokens [N], or None without a reference). The policy's log-probs are the
        sampler's own, taken at the sampling temperature as the reference's are."""
        if ref_logps is None:
            return None, None
        kl = token_kl(scored.logps[:, : mask.shape[1]], ref_logps, self.cfg.kl_estimator) * mask
        non_score = -self.kl_coef * kl if self.cfg.kl_coef > 0 else None
        return non_score, kl.sum(-1)

    def advantages(self, scored: ScoredRollout, mask: torch.Tensor, non_score: torch.Tensor | None = None,
                   values: torch.Tensor | None = None) -> Estimated:
        """This rank's advantages ([N] or [N, T]) and value targets, with the global statistics the metrics need.
        Several processes: the estimator sees the global batch (whole groups per rank), so batch statistics
        (whitening, scale_rewards=batch, GDPO) are the global ones."""
        cfg = self.cfg
        n, width = mask.shape
        all_rewards, start = gather_rows(scored.rewards)

        def everyone(t):
            return None if t is None else gather_rows(t, pad=0.0)[0]

        inputs = AdvantageInputs(
            scores=self._scores(all_rewards, everyone(scored.truncated)), mask=everyone(mask).float(),
            group_size=cfg.num_generations, non_score=everyone(non_score), values=everyone(values),
            baseline=everyone(scored.baseline), rewards=all_rewards, weights=self.weights)
        out = estimate_advantages(cfg.advantage_estimator, inputs, cfg.estimator_options())

        def mine(t):
            return None if t is None else (t[start : start + n] if t.ndim == 1 else t[start : start + n, :width])

        ev = None
        if out.returns is not None:  # how much of the targets the critic already predicted (rollout values)
            rows = inputs.mask * inputs.scorable[:, None]
            ev = float(explained_variance(inputs.values, out.returns, rows))
        return Estimated(mine(out.advantages), mine(out.returns), all_rewards, inputs.scores, ev)

    def rollout_metrics(self, scored: ScoredRollout, rounds: list[ScoredRollout], all_rewards: torch.Tensor) -> dict:
        """TRL's reward and completion metrics of the step (see `group_stats`), plus the reward-call failures."""
        cfg = self.cfg
        stats = group_stats(all_rewards, cfg.num_generations, scale=cfg.scale_rewards, std=cfg.std,
                            aggregation=cfg.multi_objective_aggregation, reward_weights=self.weights)
        lengths = scored.completion_mask.sum(-1).float()
        n = len(lengths)
        if cfg.metric_names == "ppo":  # TRL's PPO names; no group statistics (one completion a prompt, usually)
            m = {"objective/entropy": Mean((-scored.logps * scored.completion_mask).sum(-1).mean(), n),
                 "val/num_eos_tokens": Sum((~scored.truncated).sum())}
        else:
            # From every rank's rewards (gathered for the advantages): already the global batch's statistics.
            m = {"reward": Global(stats["reward"]), "reward_std": Global(stats["reward_std"]),
                 "frac_reward_zero_std": Global(stats["frac_reward_zero_std"])}
        m |= {
            "completions/mean_length": Mean(lengths.mean(), n),
            "completions/min_length": Min(lengths.min()),
            "completions/max_length": Max(lengths.max()),
            "completions/clipped_ratio": Mean(scored.truncated.float().mean(), n),
            "reward_failures": Sum(sum(r.failures for r in rounds)),
            "reward_timeouts": Sum(sum(r.timeouts for r in rounds)),
            "sampling_rounds": Max(len(rounds)),
        }
        for j, (name, _) in enumerate(self.funcs):
            col = all_rewards[:, j]
            col = col[~col.isnan()]
            m[f"rewards/{name}/mean"] = Global(col.mean() if len(col) else float("nan"))
            m[f"rewards/{name}/std"] = Global(col.std() if len(col) > 1 else float("nan"))  # unbiased, as TRL
        return m

    def kl_metrics(self, kl_sums: torch.Tensor | None, scores: torch.Tensor) -> dict:
        """The scores (PPO's names) and, with a KL in the reward, TRL's PPO names for it; then the adaptive
        controller's step (which every rank takes alike, from the global mean). `scores`: every rank's."""
        cfg = self.cfg
        m = {}
        valid = scores[~scores.isnan()]
        mean_score = float(valid.mean()) if len(valid) else float("nan")
        if cfg.metric_names == "ppo":
            m["objective/scores"] = Global(mean_score)
            m["objective/rlhf_reward"] = Global(mean_score)
        if cfg.kl_coef == 0 or kl_sums is None:
            return m
        everyone = gather_rows(kl_sums)[0]
        mean_kl = float(everyone.mean())
        m |= {"objective/kl": Mean(kl_sums.mean(), len(kl_sums)),
              "objective/non_score_reward": Mean(-self.kl_coef * kl_sums.mean(), len(kl_sums)),
              "objective/kl_coef": Global(self.kl_coef)}
        if cfg.metric_names == "ppo":  # TRL: the mean score plus the mean non-score reward
            m["objective/rlhf_reward"] = Global(mean_score - self.kl_coef * mean_kl)
        if cfg.kl_target is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, mean_kl, cfg.kl_target, cfg.kl_horizon, len(everyone))
        return m

    def choose(self, examples: list[PromptExample]) -> list[PromptExample]:
        """This rank's prompts of the step: the data order's, or the curriculum's draw. The curriculum draws the
        whole global batch with a seed every rank shares and each rank takes its share, so ranks never
        disagree on what was drawn."""
        if self.curriculum is None:
            return examples
        rank, world = rank_world()
        drawn = self.curriculum.draw(len(examples) * world, prompt_seed(self.cfg.seed, self._steps, len(self.prompts)))
        return [self.prompts[i] for i in drawn[rank::world]]

    def update_curriculum(self, rounds: list[ScoredRollout]) -> dict:
        """Record the pass rate of every group sampled this step (all rounds, all ranks: each rank gathers the
        others' so the curriculum stays the same everywhere), and return its metrics."""
        G = self.cfg.num_generations
        local = [(e.index, rate) for r in rounds
                 for e, rate in zip(r.prompts, group_pass_rates(r.rewards, G, self._pass_column))]
        rows, _ = gather_rows(torch.tensor(local, dtype=torch.float64).view(-1, 2))
        self.curriculum.update([int(i) for i in rows[:, 0].tolist()], rows[:, 1].tolist())
        return {f"curriculum/{k}": Global(v) for k, v in self.curriculum.stats().items()}

    def prepare(self, model, examples: list[PromptExample]) -> Prepared:
        cfg = self.cfg
        t0 = time.time()
        scored, rounds = self.collect(model, self.choose(examples))
        self._steps += 1
        generation_seconds = time.time() - t0
        mask = scored.completion_mask
        if cfg.mask_truncated_completions:
            mask = mask * (~scored.truncated).long()[:, None]
        # More than one optimizer step on these samples: the later ones are off-policy, so the ratio is taken
        # against the sampling log-probs. Each step (part) trains on its own slice of the prompts; the
        # micro-batches of every part, in row order, go through the batch-wide steps below.
        old = scored.logps if self.steps_per_batch > 1 else None
        parts = []
        for groups in self._parts(len(scored)):
            rows = [g * scored.group_size + j for g in groups for j in range(scored.group_size)]
            parts.append(to_micro_batches(scored.select(groups), None, cfg.micro_batch_size, mask=mask[rows],
                                          old_logps=None if old is None else old[rows]))
        micro = [mb for part in parts for mb in part]
        # The reference (beta or kl_coef > 0), scored like the policy (same temperature, same packing), and the
        # critic's values at the rollout: the baseline of GAE and the anchor of value clipping.
        pad = self.tok.pad_token_id
        for mb in micro:
            mb.ref_logps = self.reference.logps(model, lambda m, mb=mb: self._logps(m, mb).logps)
            with torch.no_grad():
                mb.values = self.critic.values(model, mb.prompts, mb.row_prompt, mb.completion_ids,
                                               mb.completion_mask, pad)
        width = mask.shape[1]
        ref = _rows_of(micro, "ref_logps", width) if micro[0].ref_logps is not None else None
        values = _rows_of(micro, "values", width) if micro[0].values is not None else None
        non_score, kl_sums = self.kl_rewards(scored, mask, ref)
        est = self.advantages(scored, mask, non_score, values)
        _set_rows(micro, "advantages", est.advantages)
        if est.returns is not None:
            _set_rows(micro, "returns", est.returns)
        if cfg.beta == 0:  # the reference served the reward only; the loss has no KL term
            for mb in micro:
                mb.ref_logps = None
        for part in parts:
            self._entropy_selection(model, part)
        metrics = self.rollout_metrics(scored, rounds, est.all_rewards)
        metrics.update(self.kl_metrics(kl_sums, est.scores))
        if est.explained_variance is not None:
            metrics["val/explained_variance"] = Global(est.explained_variance)
        if self.curriculum is not None:
            metrics.update(self.update_curriculum(rounds))
        metrics["generation_seconds"] = Max(generation_seconds)
        per_completion = _per_completion(est.advantages, mask)
        completions = self._completion_rows(scored, per_completion) if cfg.log_completions and is_main() else []
        samples = self._pick_samples(scored, per_completion) if is_main() else []
        metrics["prepare_seconds"] = Max(time.time() - t0)
        return Prepared(micro, metrics, samples, completions, parts=parts if len(parts) > 1 else None)

    def _parts(self, n_groups: int) -> list[list[int]]:
        """This rank's groups split into parts_per_batch contiguous slices, one per optimizer step."""
        k = self.parts_per_batch
        bounds = [round(i * n_groups / k) for i in range(k + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]

    def _entropy_selection(self, model, micro: list[RolloutBatch]) -> None:
        """One optimizer step's micro-batches: the top_entropy_quantile token mask, and the trained-token count the
        entropy bonus averages over. The quantile is taken over every completion token of the step on every
        process (TRL takes it per micro-batch, so its selection depends on how a step is split), from the
        policy's entropies at sampling time (a no-grad pass; the same policy the first step trains)."""
        cfg = self.cfg
        if cfg.top_entropy_quantile < 1:
            with torch.no_grad():
                entropies = [self._logps(model, mb, with_stats=("entropy",)).entropy for mb in micro]
            pool = gather_rows(torch.cat([e[mb.completion_mask.bool()] for e, mb in zip(entropies, micro)]))[0]
            for e, mb in zip(entropies, micro):
                mb.entropy_mask = top_entropy_mask(e, mb.completion_mask, cfg.top_entropy_quantile, pool=pool)
        if cfg.entropy_coef > 0:
            local = sum(float((mb.completion_mask if mb.entropy_mask is None else mb.entropy_mask).sum()) for mb in micro)
            total = float(all_reduce_sum(torch.tensor(local, dtype=torch.float64)))
            for mb in micro:
                mb.entropy_tokens = total

    def _logps(self, model, mb: RolloutBatch, with_stats: bool | tuple[str, ...] = False, grad_entropy: bool = False):
        return shared_prefix_token_logps(model, mb.prompts, mb.row_prompt, mb.completion_ids, mb.completion_mask,
                                         self.tok.pad_token_id, temperature=self._temp(), with_stats=with_stats,
                                         grad_entropy=grad_entropy)

    def _temp(self) -> float:
        temperature = self.cfg.sampling()["temperature"]  # generation_kwargs may set it
        return temperature if temperature > 0 else 1.0

    def _pick_samples(self, scored: ScoredRollout, advantages: torch.Tensor) -> list[dict]:
        """`num_completions_to_print` of this rank's completions, spread evenly over its prompts."""
        texts, G = scored.texts, scored.group_size
        n = min(self.cfg.num_completions_to_print, len(texts))
        names = [name for name, _ in self.funcs]
        out = []
        for i in sorted({k * len(texts) // n for k in range(n)}) if n else []:
            prompt = scored.prompts[i // G].prompt
            values = [None if math.isnan(v) else round(v, 6) for v in scored.rewards[i].tolist()]
            out.append({"prompt": prompt if isinstance(prompt, str) else prompt[-1].get("content", ""),
                        "completion": texts[i], "rewards": dict(zip(names, values)),
                        "advantage": round(float(advantages[i]), 6)})
        return out

    def _completion_rows(self, scored: ScoredRollout, advantages: torch.Tensor) -> list[dict]:
        """Every completion with its rewards, for completions.jsonl (the engine adds the step)."""
        G = scored.group_size
        return [{"prompt_index": scored.prompts[i // G].index, "completion": text,
                 "rewards": [None if math.isnan(v) else v for v in scored.rewards[i].tolist()],
                 "advantage": float(advantages[i])} for i, text in enumerate(scored.texts)]

    # --- loss --------------------------------------------------------------------------------------------
    def num_items(self, mb: RolloutBatch) -> float:
        d = loss_denominator(self.cfg.loss_type, mb.completion_mask, self.cfg.max_completion_length)
        return 1.0 if d is None else float(d)  # bnpo: a per-micro-batch mean, averaged over micro-batches

    def learning_rate_of(self, name: str) -> float | None:
        if self.cfg.critic_learning_rate is not None and name.startswith(f"{ATTACHED}.{CRITIC}."):
            return self.cfg.critic_learning_rate
        return None

    def loss(self, model, mb: RolloutBatch, total_items: float):
        cfg = self.cfg
        out = _forward(model, mb, self.tok.pad_token_id, self._temp(), self.critic, cfg.entropy_coef > 0)
        mask = out.mask
        bnpo = cfg.loss_type == "bnpo"
        loss, metrics = policy_loss(
            out.logps, mb.old_logps, mb.advantages, mask, ref_logps=mb.ref_logps, beta=cfg.beta,
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
            # max(., 1): a step whose every token is masked (all completions truncated, with
            # mask_truncated_completions) has a dapo count of 0; its loss is 0, not 0/0.
            max_completion_length=cfg.max_completion_length, num_items=None if bnpo else max(total_items, 1.0),
            sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
            use_bias_correction_kl=cfg.use_bias_correction_kl, entropy_mask=mb.entropy_mask,
        )
        if bnpo:
            loss = loss / total_items
        if cfg.entropy_coef > 0:
            # The mean entropy of the trained tokens over the whole step (every micro-batch and process), so
            # entropy_coef means the same whatever the loss_type's normalisation and however the step is split.
            trained = mask if mb.entropy_mask is None else mb.entropy_mask
            loss = loss - cfg.entropy_coef * entropy_bonus(out.entropy, trained, mb.entropy_tokens)
        metrics["entropy"] = (out.entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        if cfg.metric_names == "ppo":
            with torch.no_grad():
                log_ratio = out.logps - (out.logps if mb.old_logps is None else mb.old_logps)
                metrics["policy/approxkl_avg"] = 0.5 * masked_mean(log_ratio**2, mask)
                metrics["val/ratio"] = masked_mean(log_ratio.exp(), mask)
            metrics = {PPO_NAMES.get(k, k): v for k, v in metrics.items()}
        # Micro-batch means (over tokens, or sequences at the sequence level), weighted like the loss.
        weight = self.num_items(mb)
        out_metrics = {k: Mean(v, weight) for k, v in metrics.items()}
        if cfg.metric_names == "ppo":
            out_metrics["loss/policy_avg"] = Sum(loss.detach())  # the micro-batches' shares add up to the step's
        if self.critic.kind != "none":
            vloss, vm = value_loss(out.values, mb.values, mb.returns, mask, cliprange_value=cfg.cliprange_value,
                                   loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                   num_items=None if bnpo else max(total_items, 1.0))
            if bnpo:
                vloss = vloss / total_items
            loss = loss + cfg.vf_coef * vloss
            out_metrics["loss/value_avg"] = Sum(vloss.detach())
            out_metrics["val/clipfrac_avg"] = Mean(vm["clipfrac"], weight)
        return loss, out_metrics

    # The sampling seeds count generation rounds: a resumed run must go on from the same round; the adaptive
    # KL coefficient goes on from where it was.
    def state_dict(self) -> dict:
        state = {"round": self._round, "steps": self._steps, "kl_coef": self.kl_coef, **self.reference.state_dict()}
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._round = int(state.get("round", 0))
        self._steps = int(state.get("steps", 0))
        self.kl_coef = float(state.get("kl_coef", self.cfg.kl_coef))
        if self.curriculum is not None and "curriculum" in state:
            try:
                self.curriculum.load_state_dict(state["curriculum"])
            except ValueError as e:
                raise UserError(f"resume_from_checkpoint: {e}") from None
        self.reference.load_state_dict(state)

    def evaluate(self, model, examples: list) -> dict:
        return evaluate_online(self.cfg, model, self.tok, examples, self.funcs, self.make_engine)


# The GRPO preset's names of the loss metrics -> TRL's PPO names, for the ppo preset.
PPO_NAMES = {"entropy": "policy/entropy_avg", "clip_ratio/region_mean": "policy/clipfrac_avg"}


@dataclass
class Estimated:
    advantages: torch.Tensor  # this rank's [N] or [N, T]
    returns: torch.Tensor | None  # this rank's value targets [N, T]
    all_rewards: torch.Tensor  # every rank's [N_all, R]
    scores: torch.Tensor  # every rank's [N_all]
    explained_variance: float | None


@routed
def _forward(model, mb: RolloutBatch, pad_id: int, temperature: float, critic: Critic, grad_entropy: bool = False):
    """The policy's log-probs (with the entropy) and the critic's values of one micro-batch, in ONE call through the
    data-parallel wrapper, so DDP and FSDP see every trained parameter, the policy's and the critic's, used by one
    forward. A shared critic's head reads the policy's own hidden states; a separate one runs its model."""
    out = shared_prefix_token_logps(model, mb.prompts, mb.row_prompt, mb.completion_ids, mb.completion_mask, pad_id,
                                    temperature=temperature, with_stats=("entropy",), grad_entropy=grad_entropy,
                                    value_head=critic.shared_head)
    if critic.kind == "separate":
        out.values = critic.values(model, mb.prompts, mb.row_prompt, mb.completion_ids, mb.completion_mask, pad_id)
    return out


def _per_completion(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One number per completion for the logs: the advantage, or its mean over the tokens when it varies."""
    if advantages.ndim == 1:
        return advantages
    m = mask[:, : advantages.shape[1]].to(advantages.dtype)
    return (advantages * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def make_curriculum(cfg: OnlineConfig, prompts: list[PromptExample]) -> PassRateCurriculum:
    """The pass-rate curriculum over these prompts, bucketed by the difficulty column when there is one."""
    try:
        column = difficulty_column([p.columns for p in prompts], cfg.curriculum_column)
        curriculum = PassRateCurriculum([p.columns.get(column) if column else None for p in prompts],
                                        cfg.num_generations, band=cfg.curriculum_band,
                                        explore=cfg.curriculum_explore, window=cfg.curriculum_window)
    except ValueError as e:
        raise UserError(str(e)) from None
    batch = (cfg.generation_batch_size or cfg.batch_size * cfg.num_generations) // cfg.num_generations
    if len(prompts) < batch:
        raise UserError(f"curriculum: {len(prompts)} prompts for a batch of {batch}; it draws distinct prompts")
    if is_main():
        what = f"difficulty column {column!r} ({len(curriculum.keys)} values)" if column else "pass rates alone"
        log.info(f"curriculum pass_rate: {what}, band {cfg.curriculum_band}, explore {cfg.curriculum_explore}")
    return curriculum


def evaluate_online(cfg: RolloutOptions, model, tok, examples: list, funcs, make_engine) -> dict:
    """Generation eval of an online method: one greedy completion per prompt, or `num_generations_eval` sampled
    at the sampling temperature (mean rewards and pass@k)."""
    k = cfg.num_generations_eval or 1
    report = evaluate_prompts(model, tok, examples, funcs, max_new_tokens=cfg.max_completion_length,
                              batch_size=cfg.eval_batch_size, make_engine=make_engine, num_samples=k,
                              temperature=cfg.sampling()["temperature"] if k > 1 else 0.0, seed=cfg.seed)
    return report["metrics"]


def default_reward_funcs(cfg: RolloutOptions, builtin: bool, has_answer: bool) -> list[str]:
    if cfg.reward_funcs:
        return list(cfg.reward_funcs)
    if cfg.reward_model:
        return ["reward_model"]
    if not has_answer:
        raise UserError("reward_funcs: none given and the data has no `answer` column to check accuracy against")
    return ["accuracy", "format"] if builtin else ["accuracy"]


@contextmanager
def load_rewards(cfg: RolloutOptions, train) -> Iterator[tuple[list[str], list]]:
    """The run's reward functions `[(name, fn)]` (and their names) from the config and the training data: the
    ones named, else the reward model, else accuracy (+ format, weighted 1 : 0.2, on the built-in task).
    Closes them (reward worker processes, reward_isolation=process) when the block ends."""
    builtin = cfg.dataset is None or cfg.dataset.split(":")[0] == DEFAULT_DATASET
    names = default_reward_funcs(cfg, builtin, any({"answer", "solution"} & set(r.data) for r in train.rows))
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(names):
        raise UserError(f"reward_weights: {len(cfg.reward_weights)} weights for {len(names)} reward functions")
    pattern = cfg.format_pattern or (BUILTIN_FORMAT_PATTERN if builtin else None)
    if cfg.reward_weights is None and cfg.reward_funcs is None and builtin and names == ["accuracy", "format"]:
        cfg.reward_weights = list(BUILTIN_REWARD_WEIGHTS)
    try:
        funcs = load_reward_funcs(
            names, format_pattern=pattern, overlong_buffer=cfg.overlong_buffer,
            max_completion_length=cfg.max_completion_length, reward_model=cfg.reward_model,
            isolation=cfg.reward_isolation, memory_mb=cfg.reward_memory_mb,
        )
    except ValueError as e:
        raise UserError(f"reward_funcs: {e}") from None
    try:
        yield names, funcs
    finally:
        for _, fn in funcs:
            if hasattr(fn, "close"):
                fn.close()


@dataclass
class OnlineSetup:
    """What every online trainer builds the same way before its own reference rule and algorithm."""

    names: list[str]
    funcs: list
    tok: object
    model: torch.nn.Module
    prompts: list
    eval_prompts: list | None
    sync: Sync | None


@contextmanager
def online_setup(cfg) -> Iterator[OnlineSetup]:
    """Data, reward functions (closed when the block ends), model, rendered prompts and the TR-DPO sync rule."""
    train, evald = load_train_eval(cfg, "prompt", DEFAULT_DATASET)
    with load_rewards(cfg, train) as (names, funcs):
        tok, model = prepare_model(cfg)
        prompts = prompt_examples(train, tok, cfg)
        eval_prompts = prompt_examples(evald, tok, cfg) if evald else None
        sync = Sync(cfg.ref_model_sync_steps, cfg.ref_model_mixup_alpha) if cfg.sync_ref_model else None
        yield OnlineSetup(names, funcs, tok, model, prompts, eval_prompts, sync)


def run(cfg: OnlineConfig, algorithm: type[OnlineRL] = OnlineRL):
    with online_setup(cfg) as s:
        reference = build(s.model, needed=cfg.beta > 0 or cfg.kl_coef > 0, sync=s.sync)
        critic = build_critic(cfg, s.model)  # after the reference: a frozen copy of the policy must not copy the critic
        algo = algorithm(cfg, s.tok, s.funcs, s.prompts, reference, critic=critic)
        if is_main():
            log.info(f"{cfg.command}: {len(s.prompts)} prompts, G={cfg.num_generations}, rewards {', '.join(s.names)}, "
                     f"advantages {cfg.advantage_estimator}, critic {critic.kind}, reference {reference.strategy}, "
                     f"loss {cfg.loss_type}, beta {cfg.beta}, kl_coef {cfg.kl_coef}")
        return Engine(cfg, s.model, s.tok, algo, s.prompts, s.eval_prompts).train()
