"""Online DPO: preference pairs sampled from the policy as it trains, ranked by rewards.

Online / iterative DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792; Xiong et al. 2024, "Iterative Preference Learning from Human Feedback", arXiv:2312.11456;
TRL's OnlineDPOTrainer): every optimizer step samples G >= 2 completions of each prompt from the current policy,
scores them with the reward functions or a reward model, and trains the DPO-family loss on each prompt's best
completion (chosen) against its worst (rejected).

Built from the shared steps, not copies: sampling, scoring and dynamic sampling are the online-RL algorithm's
(`posttrain.rollout.groups`: `generate_and_score`, `collect`), and so are the reward functions and the setup (`online_setup`),
the scores they sum to (`sequence_scores`, with `missing_eos_penalty`) and the generation eval; the loss, its
metrics and the reference are the `dpo` command's (`DPO` with `posttrain.reference`), on pairs built from the
samples. The config mixes the online `RolloutOptions` with DPO's `PreferenceOptions`.

Deviations from TRL's OnlineDPOTrainer, on purpose: G may exceed 2 (best against worst, the widest margin, as
Xiong et al.); a prompt whose completions all score the same gives no pair (TRL keeps two such completions in
an arbitrary order, a preference without a signal), and with `dynamic_sampling` (on by default) further prompts
are sampled until the batch has its pairs, as DAPO does for GRPO. A step with no pair at all trains on nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from posttrain.algorithms.dpo import DPO, Pair, PreferenceOptions
from posttrain.algorithms.online import RolloutOptions, evaluate_online, online_setup
from posttrain.config import TrainConfig, UserError, opt
from posttrain.data.tokenize import Encoded
from posttrain.engine import Algorithm, Engine, Max, Mean, Prepared, Sum
from posttrain.losses.advantages import sequence_scores
from posttrain.parallel import is_main
from posttrain.reference import Reference, build
from posttrain.rollout.generate import HFEngine
from posttrain.rollout.groups import (
    PromptExample,
    ScoredRollout,
    collect,
    draw_prompts,
    generate_and_score,
)

log = logging.getLogger("posttrain")


@dataclass
class Config(RolloutOptions, PreferenceOptions, TrainConfig):
    """Online DPO: sample `num_generations` completions of each prompt from the policy, rank them with the reward
    functions (or `reward_model`), train the DPO-family loss (`loss_type`, `beta`, ... as `posttrain dpo`) on the
    best against the worst. `batch_size` counts PROMPTS per optimizer step (each gives at most one pair);
    `micro_batch_size` counts PAIRS. With no dataset: the built-in arithmetic task."""

    num_generations: int = opt(2, "G: completions sampled per prompt; its best and its worst make the pair.")
    dynamic_sampling: bool = opt(True, "Sample more prompts when some give no pair (all their completions scored "
                                       "the same), up to max_sampling_rounds rounds.")
    learning_rate: float | None = opt(None, "Peak learning rate (default 5e-7 full fine-tuning, 5e-6 with LoRA).")  # type: ignore[assignment]
    batch_size: int = opt(8, "GLOBAL prompts per optimizer step (each gives at most one pair).")
    micro_batch_size: int = opt(8, "Pairs per forward/backward on one device.")
    max_prompt_length: int | None = opt(512, "Maximum prompt tokens; longer prompts keep their end.")
    command = "online-dpo"
    # With no dataset: the arithmetic task at GRPO's main-job budget (as examples/online_dpo_arith.yaml).
    demo = {"max_steps": 20, "batch_size": 4, "num_generations": 8, "max_completion_length": 16,
            "micro_batch_size": 4, "learning_rate": 5e-6, "eval_dataset": "arithmetic:split=test,n=64",
            "eval_batch_size": 32}

    def validate(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = 5e-6 if self.lora is not None else 5e-7
        super().validate()
        if self.num_generations < 2:
            raise UserError("num_generations must be >= 2 (a pair needs two completions of one prompt)")
        self.validate_rollout()
        self.validate_preference()
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise UserError("missing_eos_penalty must be >= 0 (it is subtracted)")


def choose_pairs(scored: ScoredRollout, weights=None, missing_eos_penalty: float | None = None):
    """Each group's best and worst completion by its score (`sequence_scores`: the weighted reward sum, NaN for a
    row no function scored, which is left out; minus `missing_eos_penalty` for truncated rows). Returns (pairs:
    [(group, best row, worst row)], scores [N]); a group whose scorable rows all have the same score (or fewer
    than two of them) gives no pair. Ties for best or worst go to the earlier row."""
    totals = sequence_scores(scored.rewards, weights, truncated=scored.truncated, missing_eos_penalty=missing_eos_penalty)
    G, pairs = scored.group_size, []
    for g in range(len(scored)):
        rows = [g * G + j for j in range(G) if not math.isnan(float(totals[g * G + j]))]
        if len(rows) < 2:
            continue
        best = max(rows, key=lambda i: (float(totals[i]), -i))
        worst = min(rows, key=lambda i: (float(totals[i]), i))
        if float(totals[best]) > float(totals[worst]):
            pairs.append((g, best, worst))
    return pairs, totals


class OnlineDPO(Algorithm):
    """One step (`prepare`): sample and score (GRPO's `collect`), `choose_pairs`, then the `dpo` command's
    micro-batches; `loss` is DPO's. `make_engine(model, tokenizer)` builds the sampler (default `HFEngine`)."""

    def __init__(self, cfg: Config, tokenizer, reward_funcs, prompts: list[PromptExample],
                 reference: Reference | None = None, make_engine=None):
        self.cfg, self.tok, self.funcs, self.prompts = cfg, tokenizer, reward_funcs, prompts
        self.reference = reference or Reference()
        self.dpo = DPO(cfg, tokenizer.pad_token_id, self.reference)  # the loss, its metrics, the reference passes
        self.make_engine = make_engine or HFEngine
        self._round = 0  # generation rounds so far: part of every prompt's sampling seed

    def rollout(self, model, prompts: list[PromptExample]) -> ScoredRollout:
        cfg = self.cfg
        out = generate_and_score(self.make_engine(model, self.tok), prompts, self.funcs, num_generations=cfg.num_generations,
                                 seed=cfg.seed, round=self._round, max_new_tokens=cfg.max_completion_length,
                                 sampling=cfg.sampling(), weights=cfg.reward_weights, timeout=cfg.reward_timeout)
        self._round += 1
        return out

    def _with_pairs(self, scored: ScoredRollout) -> ScoredRollout:
        pairs, _ = choose_pairs(scored, self.cfg.reward_weights, self.cfg.missing_eos_penalty)
        return scored.select([g for g, _, _ in pairs])

    def prepare(self, model, examples: list[PromptExample]) -> Prepared:
        cfg = self.cfg
        t0 = time.time()
        scored, rounds, _ = collect(
            lambda p: self.rollout(model, p), examples,
            lambda rounds: draw_prompts(self.prompts, len(examples), seed=cfg.seed, round=self._round, last=rounds[-1]),
            self.tok.pad_token_id, dynamic=cfg.dynamic_sampling, max_rounds=cfg.max_sampling_rounds,
            keep=self._with_pairs)
        generation_seconds = time.time() - t0
        pairs, totals = choose_pairs(scored, cfg.reward_weights, cfg.missing_eos_penalty)
        if len(pairs) < len(examples) and is_main():
            log.info(f"online-dpo: {len(pairs)}/{len(examples)} prompts gave a pair after {len(rounds)} round(s)")
        placeholder = not pairs
        if placeholder:
            # No pair on this process: one pair of the first group trains with weight 0, so every process still
            # runs a forward and a backward (data-parallel gradients are exchanged in backward).
            pairs = [(0, 0, 1)]
        micro = self.dpo.prepare(model, [self._pair(scored, g, best, worst) for g, best, worst in pairs])
        for mb in micro:
            mb.placeholder = placeholder
        chosen = torch.tensor([float(totals[b]) for _, b, _ in pairs])
        rejected = torch.tensor([float(totals[w]) for _, _, w in pairs])
        n_pairs = 0 if placeholder else len(pairs)
        lengths = scored.completion_mask.sum(-1).float()
        scorable = totals[~totals.isnan()]
        metrics = {
            "reward": Mean(scorable.mean() if len(scorable) else 0.0, len(scorable)),
            "scores/chosen": Mean(chosen.mean(), n_pairs),
            "scores/rejected": Mean(rejected.mean(), n_pairs),
            "scores/margin": Mean((chosen - rejected).mean(), n_pairs),
            "pairs": Sum(n_pairs),
            "frac_prompts_without_pair": Mean(1 - n_pairs / max(len(scored), 1), len(scored)),
            "completions/mean_length": Mean(lengths.mean(), len(lengths)),
            "completions/clipped_ratio": Mean(scored.truncated.float().mean(), len(lengths)),
            "reward_failures": Sum(sum(r.failures for r in rounds)),
            "reward_timeouts": Sum(sum(r.timeouts for r in rounds)),
            "sampling_rounds": Max(len(rounds)),
            "generation_seconds": Max(generation_seconds),
        }
        for j, (name, _) in enumerate(self.funcs):
            col = scored.rewards[:, j]
            col = col[~col.isnan()]
            metrics[f"rewards/{name}/mean"] = Mean(col.mean() if len(col) else 0.0, len(col))
        samples = self._samples(scored, pairs[: self.cfg.num_completions_to_print // 2]) if is_main() else []
        completions = []
        if cfg.log_completions and is_main():
            completions = self._completion_rows(scored, totals, [] if placeholder else pairs)
        return Prepared(micro, metrics, samples, completions)

    def _pair(self, scored: ScoredRollout, g: int, best: int, worst: int) -> Pair:
        prompt = scored.prompts[g].prompt_ids

        def side(row: int) -> Encoded:
            completion = scored.completion_ids[row, : int(scored.completion_mask[row].sum())].tolist()
            return Encoded(prompt + completion, [0] * len(prompt) + [1] * len(completion))

        return Pair(side(best), side(worst))

    def _samples(self, scored: ScoredRollout, pairs) -> list[dict]:
        names = [name for name, _ in self.funcs]
        out = []
        for g, best, worst in pairs:
            prompt = scored.prompts[g].prompt
            for role, row in (("chosen", best), ("rejected", worst)):
                values = [None if math.isnan(v) else round(v, 6) for v in scored.rewards[row].tolist()]
                out.append({"prompt": prompt if isinstance(prompt, str) else prompt[-1].get("content", ""),
                            "completion": scored.texts[row], "rewards": dict(zip(names, values)), "pair": role})
        return out

    @staticmethod
    def _completion_rows(scored: ScoredRollout, totals: torch.Tensor, pairs) -> list[dict]:
        """Every completion of the step with its rewards, its score and its part in a pair (chosen, rejected or
        none), for completions.jsonl (the engine adds the step)."""
        role = {b: "chosen" for _, b, _ in pairs} | {w: "rejected" for _, _, w in pairs}
        G = scored.group_size
        return [{"prompt_index": scored.prompts[i // G].index, "completion": text,
                 "rewards": [None if math.isnan(v) else v for v in scored.rewards[i].tolist()],
                 "score": None if math.isnan(float(totals[i])) else float(totals[i]), "pair": role.get(i)}
                for i, text in enumerate(scored.texts)]

    # --- loss: DPO's, on the sampled pairs ---------------------------------------------------------------
    def num_items(self, mb) -> float:
        return 0.0 if getattr(mb, "placeholder", False) else self.dpo.num_items(mb)

    def num_tokens(self, mb) -> int:
        return self.dpo.num_tokens(mb)

    def loss(self, model, mb, total_items: float):
        if getattr(mb, "placeholder", False):
            loss, metrics = self.dpo.loss(model, mb, 1.0)
            return loss * 0.0, {k: Mean(float(v), 0) for k, v in metrics.items()}
        return self.dpo.loss(model, mb, total_items)

    def state_dict(self) -> dict:
        return {"round": self._round, **self.reference.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._round = int(state.get("round", 0))
        self.reference.load_state_dict(state)

    def evaluate(self, model, examples: list) -> dict:
        return evaluate_online(self.cfg, model, self.tok, examples, self.funcs, self.make_engine)


def run(cfg: Config):
    with online_setup(cfg) as s:
        reference = build(s.model, needed=not cfg.reference_free(), path=cfg.ref_model, model_path=cfg.model,
                          sync=s.sync, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
        algo = OnlineDPO(cfg, s.tok, s.funcs, s.prompts, reference)
        if is_main():
            log.info(f"online-dpo: {len(s.prompts)} prompts, G={cfg.num_generations}, rewards {', '.join(s.names)}, "
                     f"loss {'+'.join(cfg.loss_type)}, beta {cfg.beta}, reference: {reference.strategy}")
        return Engine(cfg, s.model, s.tok, algo, s.prompts, s.eval_prompts).train()
