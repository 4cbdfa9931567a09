"""Live diagnostics: the known ways post-training goes wrong, recognised in the metrics while the run goes on.

Each rule is a named check over the metrics rows seen so far. It fires at most once per run: `RunLog` prints
its warning (what was seen, what it means, what to try), records `diagnostics/<name>` = 1 in that step's
metrics.jsonl row, and the report lists it. A rule reads metrics by ROLE through a per-command table
(`Rule.reads`): a new algorithm joins a rule by naming its own metrics there (PPO: `objective/kl` per token as
the `kl` role, `policy/entropy_avg` as `entropy`, `objective/scores` as `reward`), and the check itself stays
as it is. Thresholds are the
`diagnostics.*` config keys (`posttrain.config.DiagnosticsConfig`).

A reader only: nothing here feeds back into training.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Context:
    """What a rule may know besides the metrics: the command, its resolved config, and facts of the run."""

    command: str
    cfg: Any
    has_chat_template: bool = True
    has_eval: bool = False


@dataclass(frozen=True)
class Rule:
    name: str
    # command -> {role: metric}; the rule runs only for the commands named here. A metric is a metrics.jsonl
    # name (an fnmatch pattern for a family), or a function of (row, config) for a quantity derived from several
    # (DPO's implicit KL), returning None where it means nothing.
    reads: dict
    condition: str  # the test in words, formatted with the thresholds (shown in the report)
    meaning: str
    advice: str
    check: Callable  # (view, thresholds, context, state) -> evidence text when the rule fires, else None


@dataclass
class Finding:
    rule: Rule
    step: int
    evidence: str

    def message(self) -> str:
        return (f"diagnostic {self.rule.name} at step {self.step}: {self.evidence}\n"
                f"  what it means: {self.rule.meaning}\n  what to try: {self.rule.advice}")


class _View:
    """The values a rule's roles took so far (finite ones, oldest first), looked up through its table."""

    def __init__(self, history: dict, reads: dict, rule: str, step: int):
        self._history, self._reads, self._rule, self.step = history, reads, rule, step

    def __call__(self, role: str) -> list[float]:
        spec = self._reads.get(role)
        if spec is None:
            return []
        return self._history.get(spec if isinstance(spec, str) else f"~{self._rule}.{role}", [])

    def family(self, role: str) -> dict[str, list[float]]:
        """Every metric matching the role's pattern, in the order they first appeared."""
        pattern = self._reads.get(role)
        return {k: v for k, v in self._history.items() if isinstance(pattern, str) and fnmatch.fnmatchcase(k, pattern)}


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _halves(values: list[float], window: int) -> tuple[float, float] | None:
    """Means of the earlier and the later half of the last `window` values (None until there are that many)."""
    if len(values) < window:
        return None
    recent = values[-window:]
    return _mean(recent[: window // 2]), _mean(recent[window // 2 :])


# ------------------------------------------------------------------------------------------------------
# The checks. Each returns the evidence (what it saw, with numbers) when its rule fires.


def _dpo_loss_collapse(v, t, ctx, state):
    k = 3  # consecutive steps: one lucky batch of easy pairs is not a collapse
    if "train" not in state:
        if v.step > t.collapse_within:
            return None
        loss, acc = v("loss"), v("accuracy")
        if len(loss) >= k and max(loss[-k:]) < t.collapse_loss:
            state["train"] = f"loss {loss[-1]:.3g} < {t.collapse_loss} for {k} steps by step {v.step}"
        elif len(acc) >= k and min(acc[-k:]) >= t.collapse_accuracy:
            state["train"] = f"reward accuracy {acc[-1]:.2f} >= {t.collapse_accuracy} for {k} steps by step {v.step}"
        else:
            return None
        state["accuracy"] = _mean(acc[-k:]) if acc else None
    held = v("eval_accuracy")
    if len(held) >= 2 and held[-1] <= held[0] + 0.01:
        return f"{state['train']}, while held-out reward accuracy went {held[0]:.2f} -> {held[-1]:.2f}"
    if len(held) == 1 and state["accuracy"] is not None and state["accuracy"] - held[0] > 0.25:
        return f"{state['train']}, while held-out reward accuracy is {held[0]:.2f}"
    if not ctx.has_eval:
        return f"{state['train']} (no eval set to tell whether held-out accuracy improves)"
    return None


def _dpo_beta_drift(v, t, ctx, state):
    chosen, rejected = v("chosen"), v("rejected")
    c, r = _halves(chosen, t.window), _halves(rejected, t.window)
    if c and r:
        c0, r0 = _mean(chosen[: t.window // 2]), _mean(rejected[: t.window // 2])
        if c[1] < min(c[0], c0 - t.drift_drop) and r[1] < min(r[0], r0 - t.drift_drop):
            return (f"logps/chosen fell {c0:.1f} -> {c[1]:.1f} and logps/rejected {r0:.1f} -> {r[1]:.1f} nats, "
                    f"both still falling")
    m = _halves(v("margin"), t.window)
    if m and m[1] > t.drift_margin and m[1] > m[0]:
        return f"log-ratio margin (rewards/margins / beta) {m[1]:.1f} nats > {t.drift_margin} and still growing"
    return None


def _grpo_sparse_reward(v, t, ctx, state):
    frac = v("frac")[-t.sparse_reward_steps :]
    if len(frac) == t.sparse_reward_steps and min(frac) > t.sparse_reward_frac:
        return (f"frac_reward_zero_std above {t.sparse_reward_frac} for {t.sparse_reward_steps} steps "
                f"(now {frac[-1]:.2f}): the completions of nearly every prompt got equal rewards")
    return None


def _kl_blowup(v, t, ctx, state):
    kl = v("kl")
    if kl:
        if kl[-1] > t.kl_max:
            return f"KL to the reference {kl[-1]:.3g} > {t.kl_max} per token"
        h = _halves(kl, t.window)
        if h and h[1] > t.kl_max / 10 and h[1] >= t.kl_growth * max(h[0], 1e-12):
            return f"KL to the reference grew {h[0]:.3g} -> {h[1]:.3g} (x{h[1] / max(h[0], 1e-12):.0f}) within {t.window} steps"
    implicit = v("implicit")[-(t.window // 2) :]
    if len(implicit) == t.window // 2 and _mean(implicit) > t.implicit_kl_max:
        return f"mean |log pi/ref| per sequence {_mean(implicit):.1f} nats > {t.implicit_kl_max}"
    return None


def _length_exploit(v, t, ctx, state):
    clipped = _halves(v("clipped"), t.window)
    if clipped and clipped[1] >= t.clipped_max and clipped[1] >= clipped[0]:
        return f"{clipped[1]:.0%} of completions cut at max_completion_length, not falling"
    limit = getattr(ctx.cfg, "max_completion_length", None)
    length, reward = _halves(v("length"), t.window), _halves(v("reward"), t.window)
    if limit and length and reward and length[1] >= t.length_frac * limit and length[1] > length[0] and reward[1] > reward[0]:
        return (f"mean completion length {length[0]:.0f} -> {length[1]:.0f} tokens (limit {limit}) while the reward "
                f"rose {reward[0]:.3g} -> {reward[1]:.3g}")
    return None


def _entropy_collapse(v, t, ctx, state):
    entropy = v("entropy")
    h = _halves(entropy, t.window)
    if h:
        start = _mean(entropy[: t.window // 2])
        if start > 0 and h[1] < t.entropy_frac * start:
            return f"entropy fell {start:.3g} -> {h[1]:.3g} nats per token (below {t.entropy_frac:g} of its start)"
    return None


def _critic_not_learning(v, t, ctx, state):
    ev = v("ev")
    if v.step > t.critic_warmup and len(ev) >= t.window:
        recent = _mean(ev[-t.window :])
        if recent <= t.explained_variance_min:
            return (f"val/explained_variance averaged {recent:.3g} over its last {t.window} values (step {v.step}): "
                    "the values predict the returns no better than a constant would")
    return None


def _orpo_without_sft(v, t, ctx, state):
    losses = set(getattr(ctx.cfg, "loss_type", None) or ())
    odd = sorted(losses & {"orpo", "simpo"})
    if odd and not ctx.has_chat_template:
        return f"loss_type {'+'.join(odd)} on a model whose tokenizer has no chat template (a base model?)"
    return None


def _reward_hacking_format(v, t, ctx, state):
    rewards = v.family("rewards")
    if len(rewards) < 2:
        return None
    names = list(rewards)
    weights = list(getattr(ctx.cfg, "reward_weights", None) or [1.0] * len(names))
    main = names[max(range(len(names)), key=lambda i: (weights[i] if i < len(weights) else 1.0, -i))]
    half = t.window // 2
    top = state.setdefault("top", {})  # each reward's best step so far (the history keeps only its ends)
    for name, values in rewards.items():
        top[name] = max(top.get(name, -math.inf), values[-1])
    m = _halves(rewards[main], t.window)
    if m is None:
        return None
    state["best"] = max(state.get("best", -math.inf), m[1])
    if not (m[1] < m[0] and m[1] < state["best"] - t.hacking_drop):
        return None
    for name in names:
        values = rewards[name]
        if name == main or len(values) < t.window:
            continue
        now, best = _mean(values[-half:]), top[name]
        if best > 0 and now >= t.hacking_saturation * best and now > _mean(values[:half]):
            return (f"{name} rose to {now:.2f} (its best {best:.2f}) while {main} fell from {state['best']:.2f} to "
                    f"{m[1]:.2f}")
    return None


def _dpo_implicit_kl(row: dict, cfg) -> float | None:
    if getattr(cfg, "reference_free", lambda: False)() or "rewards/chosen" not in row or "rewards/rejected" not in row:
        return None
    return (abs(row["rewards/chosen"]) + abs(row["rewards/rejected"])) / (2 * cfg.beta)


def _ppo_kl_per_token(row: dict, cfg) -> float | None:
    """PPO logs TRL's objective/kl, nats per completion; the rule's threshold is per token. Mean KL per completion /
    mean length = the token mean (both are means over the same completions)."""
    kl, length = row.get("objective/kl"), row.get("completions/mean_length")
    if kl is None or not length:
        return None
    return kl / length


def _log_ratio_margin(row: dict, cfg) -> float | None:
    if getattr(cfg, "reference_free", lambda: False)() or "rewards/margins" not in row:
        return None
    return row["rewards/margins"] / cfg.beta


RULES = [
    Rule("dpo_loss_collapse",
         {"dpo": {"loss": "loss", "accuracy": "rewards/accuracies", "eval_accuracy": "eval/rewards/accuracies"}},
         "loss < {collapse_loss} or reward accuracy >= {collapse_accuracy} for 3 steps within the first "
         "{collapse_within} steps, held-out reward accuracy not improving",
         "the pairs are too easy or nearly identical: the loss saturates on surface differences and the model "
         "learns little that carries over to new pairs.",
         "audit the pairs (duplicates, chosen == rejected, length or format giveaways); use harder or cleaner "
         "pairs, a lower learning rate, or a smaller beta.",
         _dpo_loss_collapse),
    Rule("dpo_beta_drift",
         {"dpo": {"chosen": "logps/chosen", "rejected": "logps/rejected", "margin": _log_ratio_margin},
          "kto": {"chosen": "logps/chosen", "rejected": "logps/rejected", "margin": _log_ratio_margin},
          "online-dpo": {"chosen": "logps/chosen", "rejected": "logps/rejected", "margin": _log_ratio_margin}},
         "log-probs of chosen and rejected both {drift_drop} nats below their start and falling, or the log-ratio "
         "margin above {drift_margin} nats and growing (over {window} steps)",
         "likelihood displacement / over-optimisation: the loss widens the margin by pushing both answers down, "
         "so the probability mass goes to completions that are in neither.",
         "raise beta; add rpo_alpha (an SFT term on the chosen answers); or use the nca_pair or apo_zero losses, "
         "which hold the chosen likelihood up.",
         _dpo_beta_drift),
    Rule("grpo_sparse_reward",
         # Online DPO: a prompt whose completions all score the same gives no pair.
         {"grpo": {"frac": "frac_reward_zero_std"}, "online-dpo": {"frac": "frac_prompts_without_pair"}},
         "frac_reward_zero_std > {sparse_reward_frac} for {sparse_reward_steps} consecutive steps",
         "no learning signal: when every completion of a prompt gets the same reward (all wrong or all right), "
         "its advantages are 0 (online DPO: it yields no pair) and the step teaches nothing.",
         "give partial credit (e.g. a format or closeness reward), use easier prompts, turn on dynamic_sampling, "
         "or raise num_generations.",
         _grpo_sparse_reward),
    Rule("kl_blowup",
         {"grpo": {"kl": "kl"}, "ppo": {"kl": _ppo_kl_per_token}, "dpo": {"implicit": _dpo_implicit_kl},
          "kto": {"implicit": "kl"}, "online-dpo": {"implicit": _dpo_implicit_kl}},
         "KL > {kl_max} per token or x{kl_growth} within {window} steps (online); mean |log pi/ref| > "
         "{implicit_kl_max} nats per sequence (offline)",
         "the policy is moving away from the reference fast: it is likely exploiting the reward or the loss, "
         "and the text it writes degrades.",
         "lower the learning rate; raise beta (the KL coefficient); clip gradients harder (max_grad_norm).",
         _kl_blowup),
    Rule("length_exploit",
         {"grpo": {"length": "completions/mean_length", "clipped": "completions/clipped_ratio", "reward": "reward"},
          "ppo": {"length": "completions/mean_length", "clipped": "completions/clipped_ratio",
                  "reward": "objective/scores"},
          "online-dpo": {"length": "completions/mean_length", "clipped": "completions/clipped_ratio",
                         "reward": "reward"}},
         "clipped ratio >= {clipped_max} and not falling, or mean length >= {length_frac} x max_completion_length "
         "and rising with the reward (over {window} steps)",
         "the policy games length: longer completions are being rewarded, or most of them are cut before they "
         "finish (a cut answer scores as wrong or by accident).",
         "add overlong shaping (the `length` reward with overlong_buffer), set mask_truncated_completions=true, "
         "or raise max_completion_length.",
         _length_exploit),
    Rule("entropy_collapse",
         {"grpo": {"entropy": "entropy"}, "ppo": {"entropy": "policy/entropy_avg"}},
         "entropy below {entropy_frac} of its start (over {window} steps)",
         "the policy has become nearly deterministic: the completions of a prompt stop differing, so there is "
         "nothing left to compare and exploration stops.",
         "use clip-higher (epsilon_high, e.g. 0.28), a higher temperature, or a lower learning rate.",
         _entropy_collapse),
    Rule("critic_not_learning",
         # GRPO's preset logs the same name when given a critic (advantage_estimator=gae critic=...).
         {"ppo": {"ev": "val/explained_variance"}, "grpo": {"ev": "val/explained_variance"}},
         "the critic's explained variance, averaged over its last {window} values, <= {explained_variance_min} "
         "after step {critic_warmup}",
         "the critic does not predict the returns: GAE's advantages use its values as the baseline, so they carry "
         "its errors instead of per-token credit, and the policy learns from noise (or from a bias).",
         "raise critic_learning_rate or vf_coef (or loosen cliprange_value when the scores are large); bound the "
         "scores (reward_clip_range); or drop the critic: num_generations >= 2 with advantage_estimator=rloo, "
         "grpo or reinforce_plus_plus_baseline.",
         _critic_not_learning),
    Rule("orpo_without_sft",
         {"dpo": {}},
         "loss_type orpo or simpo and a tokenizer without a chat template",
         "ORPO and SimPO have no reference model to hold the policy to a chat format; they are meant for models "
         "that already follow it (or, for ORPO, to do SFT and preference in one go on a chat-formatted model).",
         "start from an instruction-tuned model or run `posttrain sft` first; or give a chat_template.",
         _orpo_without_sft),
    Rule("reward_hacking_format",
         {"grpo": {"rewards": "rewards/*/mean"}, "ppo": {"rewards": "rewards/*/mean"},
          "online-dpo": {"rewards": "rewards/*/mean"}},
         "a secondary reward at >= {hacking_saturation} of its best while the main (highest-weight) reward "
         "fell {hacking_drop} below its best (over {window} steps)",
         "the policy is satisfying the easy reward (e.g. the format) at the expense of the one that matters.",
         "lower the secondary reward's weight (reward_weights), make it conditional on the main one, or use "
         "multi_objective_aggregation=normalize_then_sum.",
         _reward_hacking_format),
]
RULES_BY_NAME = {r.name: r for r in RULES}


def steps_per_rollout(cfg) -> int:
    """Optimizer steps trained on one generation (online RL with num_iterations > 1 or a generation_batch_size /
    num_mini_batches of several steps): their rows all repeat that generation's metrics (rewards, objective/*,
    completions/*, val/explained_variance). 1 for everything else."""
    iterations = getattr(cfg, "num_iterations", None)
    if not isinstance(iterations, int) or not hasattr(cfg, "num_generations"):
        return 1
    step = cfg.batch_size * cfg.num_generations
    return max(1, (getattr(cfg, "generation_batch_size", None) or step) // step) * max(1, iterations)


class Diagnostics:
    """Feeds metrics rows to the rules that apply to the run's command; returns what fired on each row.

    A generation's metrics count once: PPO's default 4 epochs log each rollout's rewards on 4 rows, and a trend
    rule over 10 rows would otherwise compare 2.5 rollouts with each other (a noisy 32-sample accuracy then looks
    like a fall). On the later steps of a generation, a value equal to the one its metric had on the step
    before is the same measurement again and is not added to the history; values that change every step (loss,
    policy/*) are."""

    def __init__(self, ctx: Context, thresholds=None, rules: list[Rule] = RULES):
        self.ctx = ctx
        self._per_rollout = steps_per_rollout(ctx.cfg)
        self._last: dict[str, float] = {}
        self.t = thresholds if thresholds is not None else ctx.cfg.diagnostics
        self.rules = [r for r in rules if ctx.command in r.reads]
        self.fired: dict[str, int] = {}
        self._history: dict[str, list[float]] = defaultdict(list)
        self._state: dict[str, dict] = {r.name: {} for r in self.rules}
        self._derived = [(f"~{r.name}.{role}", spec) for r in self.rules
                         for role, spec in r.reads[ctx.command].items() if callable(spec)]
        # The checks look at a metric's first `window` values (its start) and its recent ones only: a long run
        # keeps those ends, not every step.
        self._head = self.t.window
        self._tail = max(self.t.window, self.t.sparse_reward_steps, 3)

    def observe(self, row: dict) -> list[Finding]:
        values = {k: v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        for key, fn in self._derived:
            value = fn(row, self.ctx.cfg)
            if value is not None:
                values[key] = value
        step = int(row.get("step", 0))
        same_rollout = self._per_rollout > 1 and (step - 1) % self._per_rollout != 0
        for k, v in values.items():
            repeated = same_rollout and self._last.get(k) == v
            self._last[k] = v
            if math.isfinite(v) and not repeated:
                kept = self._history[k]
                kept.append(float(v))
                if len(kept) > self._head + self._tail + 256:  # trimmed now and then, not every step
                    del kept[self._head : len(kept) - self._tail]
        out = []
        for rule in self.rules:
            if rule.name in self.fired:
                continue
            view = _View(self._history, rule.reads[self.ctx.command], rule.name, step)
            evidence = rule.check(view, self.t, self.ctx, self._state[rule.name])
            if evidence:
                self.fired[rule.name] = step
                out.append(Finding(rule, step, evidence))
        return out

    def replay(self, rows: list[dict]) -> None:
        """A resumed run: rebuild the history from the rows kept; the rules recorded there do not fire again."""
        for row in rows:
            self.observe(row)
        self.fired = {}
        for row in rows:
            for k in row:
                if k.startswith("diagnostics/"):
                    self.fired.setdefault(k.split("/", 1)[1], int(row.get("step", 0)))


def condition_text(rule: Rule, thresholds: dict) -> str:
    """The rule's test with the run's thresholds filled in (for the report)."""
    try:
        return rule.condition.format(**thresholds)
    except (KeyError, IndexError, ValueError):
        return rule.condition


