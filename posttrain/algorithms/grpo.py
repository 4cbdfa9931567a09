"""Group Relative Policy Optimization and its family, with verifiable rewards.

GRPO: Shao et al. 2024, arXiv:2402.03300, eq. 3: for each prompt sample G completions, score them, use
the group-normalised reward (r - mean) / std as every token's advantage, and maximise the clipped
importance-weighted surrogate minus beta * KL(pi || ref) (k3 estimator).
The variants are settings, not copies (`posttrain.losses.policy`):
  Dr. GRPO   scale_rewards=none, loss_type=dr_grpo           (Liu et al. 2025, arXiv:2503.20783)
  DAPO       epsilon_high=0.28, loss_type=dapo, dynamic_sampling, length reward (Yu et al. 2025, arXiv:2503.14476)
  GSPO       importance_sampling_level=sequence              (Zheng et al. 2025, arXiv:2507.18071)
  GDPO       multi_objective_aggregation=normalize_then_sum  (Liu et al. 2026, arXiv:2601.05242)
  2-GRPO     num_generations=2                               (Wu et al. 2025, arXiv:2510.00977)

One optimizer step: generate G completions for each of `batch_size` prompts with the current policy
(KV cache, prompt prefilled once per group), score them, compute advantages, then take
`num_iterations` optimizer steps on that batch. With num_iterations = 1 the "old" policy is the current
one, so the ratio is exactly 1 and no extra forward is needed (the gradient of exp(logp - sg(logp)) is
the policy gradient). With more iterations the rollout's own sampling log-probs serve as the old log-probs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from posttrain.config import TrainConfig, UserError, opt
from posttrain.data import load_train_eval
from posttrain.data.tokenize import encode_prompt
from posttrain.engine import Algorithm, Engine, all_reduce_sum, is_main
from posttrain.logprobs import shared_prefix_token_logps
from posttrain.losses.policy import AGGREGATIONS, group_advantages, group_stats, loss_denominator, policy_loss
from posttrain.models import frozen_copy, is_peft, prepare_model
from posttrain.parallel import gather_rows
from posttrain.rollout.generate import HFEngine
from posttrain.rollout.rewards import compute_rewards, load_reward_funcs

log = logging.getLogger("posttrain")

DEFAULT_DATASET = "arithmetic"
# The built-in task asks for only the final number. Partial credit for a short one-line reply that ends in a
# number ("47 + 38 = 85" counts): the small model almost never replies with a bare number at first, so a
# bare-number pattern gives no signal, and a heavy format reward is learned instead of the arithmetic.
BUILTIN_FORMAT_PATTERN = r"^[^\n]{0,40}?-?\d+\.?\s*$"
BUILTIN_REWARD_WEIGHTS = [1.0, 0.2]  # accuracy, format


@dataclass
class Config(TrainConfig):
    """GRPO family with verifiable rewards. `batch_size` counts PROMPTS per optimizer step (each brings
    `num_generations` completions); `micro_batch_size` counts COMPLETIONS per forward/backward on one device.
    With no arguments: the embedded SmolLM2-135M-Instruct learns the built-in arithmetic task."""

    reward_funcs: list | None = opt(None, "Reward functions: names (accuracy, format, length, reward_model) or module:function. Default: accuracy (+ format for the built-in task).")
    reward_weights: list | None = opt(None, "Weight of each reward function (default: all 1).")
    reward_model: str | None = opt(None, "Path of a posttrain reward model, used by the reward_model function.")
    format_pattern: str | None = opt(None, "Regex the `format` reward checks (default: a \\boxed{} answer).")
    overlong_buffer: int | None = opt(None, "`length` reward: tokens before max_completion_length where the penalty ramps.")
    reward_timeout: float = opt(10.0, "Seconds a reward function may take per batch before its column is NaN.")
    num_generations: int = opt(8, "G: completions sampled per prompt (2 = 2-GRPO).")
    max_completion_length: int = opt(64, "Maximum new tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature (also divides the logits when scoring).")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    top_k: int = opt(0, "Top-k sampling (0: off).")
    beta: float = opt(0.0, "KL coefficient to the reference (k3). 0 loads no reference model.")
    epsilon: float = opt(0.2, "Lower clip: ratio >= 1 - epsilon.")
    epsilon_high: float | None = opt(None, "Upper clip (DAPO clip-higher, e.g. 0.28); default = epsilon.")
    delta: float | None = opt(None, "Dual clip: cap on the ratio for negative advantages (e.g. 3).")
    num_iterations: int = opt(1, "mu: optimizer steps per generated batch.")
    loss_type: str = opt("dapo", "Loss aggregation.", tuple(AGGREGATIONS))
    scale_rewards: str = opt("group", "Advantage scale: group std, batch std, or none (Dr. GRPO).", ("group", "batch", "none"))
    std: str = opt("unbiased", "Std used for scaling: unbiased (as TRL) or population (1/G).", ("unbiased", "population"))
    multi_objective_aggregation: str = opt("sum_then_normalize", "Several rewards: sum then normalise (GRPO) or normalise each then sum (GDPO).", ("sum_then_normalize", "normalize_then_sum"))
    importance_sampling_level: str = opt("token", "token ratio (GRPO) or sequence ratio (GSPO).", ("token", "sequence"))
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards are all equal and sample more prompts.")
    max_sampling_rounds: int = opt(3, "Dynamic sampling: generation rounds per step at most.")
    mask_truncated_completions: bool = opt(False, "Exclude completions that hit max_completion_length from the loss.")
    log_completions: bool = opt(False, "Append every sampled completion with its rewards to completions.jsonl.")
    num_completions_to_print: int = opt(4, "Completions per step kept (with prompt, rewards, advantage) in samples.jsonl "
                                        "for the run report, whatever log_completions says; 0: none.")
    learning_rate: float = opt(1e-6, "Peak learning rate of AdamW.")
    batch_size: int = opt(8, "GLOBAL prompts per optimizer step (x num_generations completions).")
    micro_batch_size: int = opt(8, "Completions per forward/backward on one device.")
    max_prompt_length: int | None = opt(512, "Maximum prompt tokens; longer prompts keep their end.")
    prompt_suffix: str | None = opt(None, "Text appended to every prompt (e.g. ' Reply with only the final number.').")
    chat_prompts: bool = opt(True, "Send plain-text prompts as a user message through the chat template (when the tokenizer has one).")
    command = "grpo"
    # The README's main job: settings that show the reward rising within minutes on a 2-core CPU.
    demo = {"max_steps": 20, "batch_size": 4, "num_generations": 8, "max_completion_length": 16,
            "micro_batch_size": 32, "learning_rate": 1e-5, "eval_dataset": "arithmetic:split=test,n=64",
            "eval_batch_size": 32}

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise UserError("num_generations must be >= 2 (advantages compare completions of one prompt)")
        if self.max_completion_length < 1:
            raise UserError("max_completion_length must be >= 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError("beta, epsilon and epsilon_high must be >= 0")
        if self.num_completions_to_print < 0:
            raise UserError("num_completions_to_print must be >= 0")
        if self.num_iterations < 1 or self.max_sampling_rounds < 1:
            raise UserError("num_iterations and max_sampling_rounds must be >= 1")
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise UserError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward functions")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards != "group":
            raise UserError("multi_objective_aggregation=normalize_then_sum needs scale_rewards=group")


@dataclass
class PromptExample:
    index: int
    prompt: object  # text or messages, as in the data
    prompt_ids: list[int]
    columns: dict  # the row's other columns (e.g. `answer`) for reward functions


@dataclass
class RolloutBatch:
    """A micro-batch of scored completions. Prompts are kept once (rows point at them) so the training
    forward runs each prompt once per micro-batch (`shared_prefix_token_logps`).

    prompts            unique prompts of this micro-batch (token ids)
    row_prompt         [N] long, the prompt each row continues
    completion_ids     [N, T] right-padded;  completion_mask [N, T] 1 on scored tokens (EOS included)
    advantages         [N]
    old_logps, ref_logps  [N, T] or None, aligned with completion_ids
    """

    prompts: list
    row_prompt: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) + int(self.completion_mask.sum())


def split_micro_batches(prompt_ids: list[list[int]], G: int, completion_ids, completion_mask, advantages, old_logps,
                        size: int) -> list[RolloutBatch]:
    """Cut N = len(prompt_ids) * G rows into micro-batches of `size` rows, trimming padding columns."""
    out = []
    N = completion_ids.shape[0]
    for s in range(0, N, size):
        rows = torch.arange(s, min(s + size, N))
        groups = sorted({int(r) // G for r in rows})
        local = {g: j for j, g in enumerate(groups)}
        width = max(int(completion_mask[rows].sum(-1).max()), 1)
        out.append(RolloutBatch(
            [prompt_ids[g] for g in groups],
            torch.tensor([local[int(r) // G] for r in rows]),
            completion_ids[rows, :width],
            completion_mask[rows, :width],
            advantages[rows],
            None if old_logps is None else old_logps[rows, :width],
            None,
        ))
    return out


class GRPO(Algorithm):
    def __init__(self, cfg: Config, tokenizer, reward_funcs, prompts: list[PromptExample], ref_model=None):
        self.cfg, self.tok, self.funcs, self.prompts, self.ref_model = cfg, tokenizer, reward_funcs, prompts, ref_model
        self.steps_per_batch = cfg.num_iterations
        self.weights = cfg.reward_weights
        self._step_metrics: dict = {}
        self._samples: list[dict] = []
        self._round = 0

    # --- rollout ---------------------------------------------------------------------------------------
    def _seed(self, example: PromptExample) -> int:
        # Per prompt and per generation round: the same completions whatever else shares the batch or rank.
        return (self.cfg.seed * 1_000_003 + self._round * 7919 + example.index) % (2**63 - 1)

    def _sample(self, model, examples: list[PromptExample]):
        cfg, G = self.cfg, self.cfg.num_generations
        engine = HFEngine(model, self.tok)
        rollout = engine.generate(
            [e.prompt_ids for e in examples], G, max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seeds=[self._seed(e) for e in examples],
        )
        prompts = [e.prompt for e in examples for _ in range(G)]
        columns = {k: [e.columns.get(k) for e in examples for _ in range(G)] for k in examples[0].columns}
        columns["completion_lengths"] = rollout.completion_lengths.tolist()
        columns["truncated"] = rollout.truncated.tolist()
        scored = compute_rewards(self.funcs, prompts, rollout.texts, columns, weights=self.weights, timeout=cfg.reward_timeout)
        return rollout, scored

    def prepare(self, model, examples: list[PromptExample]) -> list:
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.time()
        groups = []  # (example, rollout rows) kept for this step
        rounds = 0
        pool = list(examples)
        gen_rounds_metrics = {"failures": 0, "timeouts": 0}
        while True:
            rollout, scored = self._sample(model, pool)
            self._round += 1
            rounds += 1
            gen_rounds_metrics["failures"] += sum(scored.failures.values())
            gen_rounds_metrics["timeouts"] += sum(scored.timeouts.values())
            for j, e in enumerate(pool):
                sl = slice(j * G, (j + 1) * G)
                groups.append((e, rollout, sl, scored))
            if not cfg.dynamic_sampling:
                break
            per_reward = cfg.multi_objective_aggregation == "normalize_then_sum"
            groups = [g for g in groups if _has_signal(g[3].rewards[g[2]], self.weights, per_reward)]
            if len(groups) >= len(examples) or rounds >= cfg.max_sampling_rounds:
                if len(groups) < len(examples) and is_main():
                    log.warning(f"dynamic sampling: {len(groups)}/{len(examples)} groups with reward variance after {rounds} rounds")
                if not groups:  # nothing informative at all: train on the last round (advantages are 0)
                    groups = [(e, rollout, slice(j * G, (j + 1) * G), scored) for j, e in enumerate(pool)]
                groups = groups[: len(examples)]
                break
            g = torch.Generator().manual_seed(self._seed(pool[0]))
            # Without replacement: a prompt drawn twice would get the same seed and so the same completions.
            pool = [self.prompts[i] for i in torch.randperm(len(self.prompts), generator=g)[: len(examples)].tolist()]
        gen_seconds = time.time() - t0

        rewards = torch.cat([s.rewards[sl] for _, _, sl, s in groups])  # [N, R]
        comp_ids = [r.completion_ids[sl] for _, r, sl, _ in groups]
        width = max(c.shape[1] for c in comp_ids)

        def stack(tensors, value):
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

        rollout = _Merged(
            completion_ids=stack(comp_ids, self.tok.pad_token_id),
            completion_mask=stack([r.completion_mask[sl] for _, r, sl, _ in groups], 0),
            logps=stack([r.logps[sl] for _, r, sl, _ in groups], 0.0),
            truncated=torch.cat([r.truncated[sl] for _, r, sl, _ in groups]),
            texts=[t for _, r, sl, _ in groups for t in r.texts[sl]],
        )
        kept = [e for e, _, _, _ in groups]
        # Several processes: every rank's groups (whole groups per rank), so batch statistics (scale_rewards
        # =batch, GDPO's batch normalisation, the reward metrics) are over the global batch.
        all_rewards, start = gather_rows(rewards)
        advantages = group_advantages(
            all_rewards, G, scale=cfg.scale_rewards, std=cfg.std, aggregation=cfg.multi_objective_aggregation,
            reward_weights=self.weights,
        )[start : start + len(rewards)]
        stats = group_stats(all_rewards, G, scale=cfg.scale_rewards, std=cfg.std,
                            aggregation=cfg.multi_objective_aggregation, reward_weights=self.weights)
        mask = rollout.completion_mask
        if cfg.mask_truncated_completions:
            mask = mask * (~rollout.truncated).long()[:, None]
        old = rollout.logps if cfg.num_iterations > 1 else None
        lengths = gather_rows(rollout.completion_mask.sum(-1).float())[0]
        truncated = gather_rows(rollout.truncated)[0]
        failures = all_reduce_sum(torch.tensor([gen_rounds_metrics["failures"], gen_rounds_metrics["timeouts"]],
                                               dtype=torch.float64))
        m = {
            "reward": float(stats["reward"]),
            "reward_std": float(stats["reward_std"]),
            "frac_reward_zero_std": float(stats["frac_reward_zero_std"]),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.float().mean()),
            "reward_failures": float(failures[0]),
            "reward_timeouts": float(failures[1]),
            "generation_seconds": gen_seconds,
            "sampling_rounds": float(rounds),
        }
        for j, (name, _) in enumerate(self.funcs):
            col = all_rewards[:, j]
            col = col[~col.isnan()]
            m[f"rewards/{name}/mean"] = float(col.mean()) if len(col) else float("nan")
            m[f"rewards/{name}/std"] = float(col.std()) if len(col) > 1 else float("nan")  # unbiased, as TRL
        self._step_metrics = m
        if cfg.log_completions and is_main():
            self._log_completions(kept, rollout.texts, rewards, advantages)
        self._samples = self._pick_samples(kept, rollout.texts, rewards, advantages) if is_main() else []

        micro = split_micro_batches([e.prompt_ids for e in kept], G, rollout.completion_ids, mask, advantages, old,
                                    cfg.micro_batch_size)
        if cfg.beta > 0:
            with torch.no_grad():
                for mb in micro:
                    mb.ref_logps = self._reference_logps(model, mb)
        self._step_metrics["prepare_seconds"] = time.time() - t0
        return micro

    def _logps(self, model, mb: RolloutBatch, with_stats: bool | tuple[str, ...] = False):
        return shared_prefix_token_logps(model, mb.prompts, mb.row_prompt, mb.completion_ids, mb.completion_mask,
                                         self.tok.pad_token_id, temperature=self._temp(), with_stats=with_stats)

    def _reference_logps(self, model, mb: RolloutBatch) -> torch.Tensor:
        if self.ref_model is None:  # LoRA: the base model is the reference
            with model.disable_adapter():
                return self._logps(model, mb).logps
        return self._logps(self.ref_model, mb).logps

    def _temp(self) -> float:
        return self.cfg.temperature if self.cfg.temperature > 0 else 1.0

    def _pick_samples(self, kept, texts, rewards, advantages) -> list[dict]:
        """`num_completions_to_print` of this rank's completions, spread evenly over its prompts."""
        n, G = min(self.cfg.num_completions_to_print, len(texts)), self.cfg.num_generations
        names = [name for name, _ in self.funcs]
        out = []
        for i in sorted({k * len(texts) // n for k in range(n)}) if n else []:
            prompt = kept[i // G].prompt
            values = [None if v != v else round(v, 6) for v in rewards[i].tolist()]
            out.append({"prompt": prompt if isinstance(prompt, str) else prompt[-1].get("content", ""),
                        "completion": texts[i], "rewards": dict(zip(names, values)),
                        "advantage": round(float(advantages[i]), 6)})
        return out

    def completion_samples(self) -> list[dict]:
        return self._samples

    def _log_completions(self, kept, texts, rewards, advantages) -> None:
        G = self.cfg.num_generations
        out = self.cfg.resolved_output_dir() + "/completions.jsonl"
        with open(out, "a") as f:
            for i, text in enumerate(texts):
                e = kept[i // G]
                row = {"prompt_index": e.index, "completion": text,
                       "rewards": [None if v != v else v for v in rewards[i].tolist()], "advantage": float(advantages[i])}
                f.write(json.dumps(row) + "\n")

    # --- loss --------------------------------------------------------------------------------------------
    def num_items(self, mb: RolloutBatch) -> float:
        d = loss_denominator(self.cfg.loss_type, mb.completion_mask, self.cfg.max_completion_length)
        return 1.0 if d is None else float(d)  # bnpo: a per-micro-batch mean, averaged over micro-batches

    def loss(self, model, mb: RolloutBatch, total_items: float):
        cfg = self.cfg
        out = self._logps(model, mb, with_stats=("entropy",))
        mask = out.mask
        bnpo = cfg.loss_type == "bnpo"
        loss, metrics = policy_loss(
            out.logps, mb.old_logps, mb.advantages, mask, ref_logps=mb.ref_logps, beta=cfg.beta,
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
            # max(., 1): a step whose every token is masked (all completions truncated, with
            # mask_truncated_completions) has a dapo count of 0; its loss is 0, not 0/0.
            max_completion_length=cfg.max_completion_length, num_items=None if bnpo else max(total_items, 1.0),
        )
        if bnpo:
            loss = loss / total_items
        result = {k: float(v) for k, v in metrics.items()}
        result["entropy"] = float((out.entropy * mask).sum() / mask.sum().clamp(min=1))
        return loss, result

    def step_metrics(self) -> dict:
        return self._step_metrics

    # The sampling seeds count generation rounds: a resumed run must go on from the same round.
    def state_dict(self) -> dict:
        return {"round": self._round}

    def load_state_dict(self, state: dict) -> None:
        self._round = int(state.get("round", 0))

    def evaluate(self, model, examples: list) -> dict:
        from posttrain.evaluate import evaluate_prompts

        report = evaluate_prompts(model, self.tok, examples, self.funcs, max_new_tokens=self.cfg.max_completion_length,
                                  batch_size=self.cfg.eval_batch_size)
        return report["metrics"]


class _Merged:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _has_signal(group_rewards: torch.Tensor, weights=None, per_reward: bool = False) -> bool:
    """A group teaches something when the quantity its advantages normalise varies (unscorable rows ignored):
    the WEIGHTED total of the rewards (GRPO; unweighted, (1, 0) and (0, 1) would look equal under weights
    (1, 0.2)), or any single reward (GDPO normalises each reward within the group)."""
    r = group_rewards[~group_rewards.isnan().all(-1)]
    if r.shape[0] < 2:
        return False
    if per_reward:
        columns = [c[~c.isnan()] for c in r.T]
        return any(c.numel() >= 2 and bool((c != c[0]).any()) for c in columns)
    w = torch.ones(r.shape[1]) if weights is None else torch.as_tensor(weights, dtype=r.dtype)
    total = (r * w).nansum(-1)
    return bool((total != total[0]).any())


def default_reward_funcs(cfg: Config, builtin: bool, has_answer: bool) -> list[str]:
    if cfg.reward_funcs:
        return list(cfg.reward_funcs)
    if cfg.reward_model and not has_answer:
        return ["reward_model"]
    if not has_answer:
        raise UserError("reward_funcs: none given and the data has no `answer` column to check accuracy against")
    return ["accuracy", "format"] if builtin else ["accuracy"]


def prompt_examples(ds, tok, cfg) -> list[PromptExample]:
    """Tokenized prompts (+ their other columns). Plain-text prompts become a user turn when `chat_prompts`
    is on and the tokenizer has a chat template: instruction-tuned models answer far better that way."""
    out = []
    max_prompt_length = cfg.max_prompt_length
    for i, row in enumerate(ds.rows):
        data = row.data
        prompt = data["prompt"]
        if cfg.prompt_suffix:
            if isinstance(prompt, str):
                prompt = prompt + cfg.prompt_suffix
            else:
                prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + cfg.prompt_suffix}]
        as_chat = isinstance(prompt, str) and cfg.chat_prompts and tok.chat_template
        # Reward functions see the prompt as the data has it (text stays text, as in TRL).
        ids = encode_prompt(tok, [{"role": "user", "content": prompt}] if as_chat else prompt)
        if max_prompt_length and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
        cols = {k: v for k, v in data.items() if k not in ("prompt", "completion", "chosen", "rejected")}
        out.append(PromptExample(i, prompt, ids, cols))
    return out


def run(cfg: Config):
    train, evald = load_train_eval(cfg, "prompt", DEFAULT_DATASET)
    builtin = cfg.dataset is None or cfg.dataset.split(":")[0] == DEFAULT_DATASET
    names = default_reward_funcs(cfg, builtin, "answer" in train.rows[0].data)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(names):
        raise UserError(f"reward_weights: {len(cfg.reward_weights)} weights for {len(names)} reward functions")
    pattern = cfg.format_pattern or (BUILTIN_FORMAT_PATTERN if builtin else None)
    if cfg.reward_weights is None and cfg.reward_funcs is None and builtin:
        cfg.reward_weights = list(BUILTIN_REWARD_WEIGHTS)
    try:
        funcs = load_reward_funcs(
            names, format_pattern=pattern, overlong_buffer=cfg.overlong_buffer,
            max_completion_length=cfg.max_completion_length, reward_model=cfg.reward_model,
        )
    except ValueError as e:
        raise UserError(f"reward_funcs: {e}") from None
    tok, model = prepare_model(cfg)
    prompts = prompt_examples(train, tok, cfg)
    eval_prompts = prompt_examples(evald, tok, cfg) if evald else None
    ref_model = None
    if cfg.beta > 0 and not is_peft(model):
        ref_model = frozen_copy(model)
    algo = GRPO(cfg, tok, funcs, prompts, ref_model)
    if is_main():
        log.info(f"grpo: {len(prompts)} prompts, G={cfg.num_generations}, rewards {', '.join(names)}, "
                 f"loss {cfg.loss_type}, beta {cfg.beta}")
    return Engine(cfg, model, tok, algo, prompts, eval_prompts).train()
