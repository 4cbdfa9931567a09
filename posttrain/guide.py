"""`posttrain guide [model=...] [device=cpu|gpu] [--json] [--markdown]`: which method, for what you have.

Written once, as data (GUIDE): the CLI prints it, every `posttrain audit` ends with the part for its data, and
the README's "Which method?" section is `render_markdown()` of it (tests/test_guide.py fails when they differ;
`posttrain guide --markdown` prints the section to paste). The memory column is the planner's total
(posttrain/memory.py) for the entry's own command line, on the model given (default: the embedded one).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass

from posttrain.cli import ToolArgs, ToolSpec
from posttrain.config import UserError


@dataclass(frozen=True)
class Method:
    have: str  # what the user has
    when: str  # the situation that picks this method
    method: str
    why: str  # one line: what it does about that situation
    command: str  # the line that starts it (memory is planned for exactly this line)
    formats: tuple  # data formats (posttrain.data.formats) it trains on
    signal: str = ""  # the audit finding that points at it (posttrain.audit.Report.signals)


PAIRS_HAVE = "preference pairs (prompt, chosen, rejected)"
VERIFIER_HAVE = "prompts with a verifiable answer"
RM_HAVE = "prompts and a reward model"
PAIRS, UNPAIRED, PROMPTS, DEMOS = ("preference",), ("unpaired", "preference"), ("prompt_only",), (
    "prompt_completion", "language_modeling")

GUIDE: tuple[Method, ...] = (
    Method("demonstrations (prompt, ideal answer)", "first step: teach the format and the task", "SFT",
           "maximum likelihood of the answers; start here before any preference or RL method",
           "posttrain sft dataset=demos.jsonl", DEMOS),
    Method(PAIRS_HAVE, "the default", "DPO",
           "learns the preference directly, against a reference model; no reward model, no sampling",
           "posttrain dpo dataset=pairs.jsonl", PAIRS),
    Method(PAIRS_HAVE, "noisy labels (annotators disagree, ~10-20% flipped)", "cDPO / robust DPO",
           "label_smoothing is the assumed flip rate: the loss stops trusting any single pair completely",
           "posttrain dpo dataset=pairs.jsonl loss_type=robust label_smoothing=0.1", PAIRS, "near_identical_pairs"),
    Method(PAIRS_HAVE, "near-deterministic preferences (one answer is always right)", "IPO",
           "a finite target margin instead of DPO's push towards infinite log-ratios, which over-fits such data",
           "posttrain dpo dataset=pairs.jsonl loss_type=ipo", PAIRS),
    Method(PAIRS_HAVE, "the chosen answers' likelihood falls during DPO", "NCA / APO-zero / RPO",
           "keep the chosen answers' probability up (RPO: DPO + the chosen answers' NLL)",
           "posttrain dpo dataset=pairs.jsonl rpo_alpha=1.0", PAIRS),
    Method(PAIRS_HAVE, "chosen answers are systematically longer (see audit: length bias)",
           "length-normalised DPO / LD-DPO",
           "per-token log-ratios (or down-weighted extra tokens) so 'longer' is not what the model learns",
           "posttrain dpo dataset=pairs.jsonl ld_alpha=0.5", PAIRS, "length_bias"),
    Method(PAIRS_HAVE, "no memory for a reference model", "SimPO / ORPO / CPO",
           "reference-free: nothing but the policy in memory and no reference pass",
           "posttrain dpo dataset=pairs.jsonl loss_type=simpo", PAIRS),
    Method(PAIRS_HAVE, "a scalar reward for RLHF or best-of-n", "reward model (Bradley-Terry)",
           "a sequence classifier that scores any (prompt, answer); PPO and GRPO use it with reward_model=PATH",
           "posttrain rm dataset=pairs.jsonl", PAIRS),
    Method("thumbs up / down per answer (no pairs)", "the default", "KTO",
           "learns from unpaired desirable / undesirable answers; balance the classes with desirable_weight",
           "posttrain kto dataset=feedback.jsonl", UNPAIRED, "label_imbalance"),
    Method(VERIFIER_HAVE, "the default", "GRPO",
           "samples a group of answers per prompt and reinforces the ones the verifier accepts; no critic",
           "posttrain grpo dataset=prompts.jsonl", PROMPTS),
    Method(VERIFIER_HAVE, "long reasoning (chain of thought)", "DAPO settings",
           "clip-higher against entropy collapse, token-level loss, groups without signal resampled",
           "posttrain grpo dataset=prompts.jsonl loss_type=dapo epsilon_high=0.28 dynamic_sampling=true "
           "max_completion_length=1024", PROMPTS, "sparse_reward"),
    Method(VERIFIER_HAVE, "off-policy updates (several optimizer steps per batch)", "GSPO",
           "one importance ratio per sequence: stable when the policy drifts from the one that sampled",
           "posttrain grpo dataset=prompts.jsonl importance_sampling_level=sequence num_iterations=4", PROMPTS),
    Method(VERIFIER_HAVE, "several rewards (correctness, format, length)", "GDPO",
           "normalises each reward within the group before summing, so no reward drowns the others",
           "posttrain grpo dataset=prompts.jsonl reward_funcs=accuracy,format "
           "multi_objective_aggregation=normalize_then_sum", PROMPTS),
    Method(VERIFIER_HAVE, "rollouts are the cost", "2-GRPO",
           "two samples per prompt (a contrastive pair): a quarter of the rollouts of G = 8",
           "posttrain grpo dataset=prompts.jsonl num_generations=2", PROMPTS),
    Method(RM_HAVE, "token-level credit (long answers, one score at the end)", "PPO",
           "a critic estimates each token's value (GAE), so credit goes to the tokens that earned the score; the KL "
           "to the reference is in the per-token reward", "posttrain ppo dataset=prompts.jsonl reward_model=runs/rm",
           PROMPTS),
    Method(RM_HAVE, "PPO in the memory of one model", "PPO, LoRA + shared critic",
           "the critic is a value head on the policy and the reference its adapter switched off: one copy of the "
           "base weights (plus the reward model)",
           "posttrain ppo dataset=prompts.jsonl reward_model=runs/rm lora.r=16 critic=shared", PROMPTS),
    Method(RM_HAVE, "no critic wanted (one sequence score is enough)", "GRPO with a reward model",
           "the reward model scores each sampled answer; the group is the baseline, no value model to train",
           "posttrain grpo dataset=prompts.jsonl reward_funcs=reward_model reward_model=runs/rm", PROMPTS),
)


def memory_of(method: Method, settings: list[str]) -> int:
    """The planner's total for the method's command line plus `settings` (model=, device=, nproc=)."""
    from posttrain.memory import plan

    words = shlex.split(method.command)
    # At the length limits: the command lines name example files, which must not be read even if they exist.
    return plan(words[1], words[2:] + ["lengths=limits"] + list(settings)).total


def rows(settings: list[str], formats: tuple | None = None) -> list[dict]:
    """The guide as dicts (with the memory of each line), optionally only the methods for `formats`."""
    out = []
    for m in GUIDE:
        if formats is not None and not set(m.formats) & set(formats):
            continue
        out.append({**asdict(m), "memory_bytes": memory_of(m, settings)})
    return out


def _gib(n: int) -> str:
    from posttrain.memory import GiB

    return f"{n / GiB:.1f} GiB"


SIGNALS = {"length_bias": "length bias", "near_identical_pairs": "near-identical pairs",
           "sparse_reward": "sparse reward", "label_imbalance": "label imbalance"}


def render_text(entries: list[dict], settings: list[str], signals: tuple = ()) -> str:
    """The guide as text; entries whose signal the audit found are marked."""
    model = next((s.split("=", 1)[1] for s in settings if s.startswith("model=")), "smollm2-135m-instruct")
    lines = [f"which method (memory: `posttrain memory` of each line, model {model}):"]
    have = None
    for e in entries:
        if e["have"] != have:
            have = e["have"]
            lines.append(f"  {have}")
        mark = f"   <- this data: {SIGNALS[e['signal']]}" if e["signal"] in signals else ""
        lines.append(f"    {e['when']}: {e['method']} ({_gib(e['memory_bytes'])}){mark}")
        lines.append(f"        {e['why']}")
        lines.append(f"        $ {e['command']}")
    return "\n".join(lines)


README_SETTINGS = ["device=cpu"]  # the README's column: the embedded model, one CPU process


def render_markdown(settings: list[str] = README_SETTINGS) -> str:
    """The README section (between its guide markers)."""
    lines = ["| you have | situation | method | what it does | command | memory |", "| --- | --- | --- | --- | --- | --- |"]
    for e in rows(settings):
        lines.append(f"| {e['have']} | {e['when']} | **{e['method']}** | {e['why']} | `{e['command']}` | "
                     f"{_gib(e['memory_bytes'])} |")
    return "\n".join(lines)


TOOL = ToolSpec(
    usage="posttrain guide [model=...] [device=cpu|gpu] [nproc=N] [--json] [--markdown]",
    flags={"--json": bool, "--markdown": bool},
    help="""Which method for what you have, with the command that starts it and the memory it needs (the
planner's total for that command on `model`, default the embedded model; any other planner setting applies
to every line, e.g. model=8b device=gpu lora.r=16).
--json      the guide as a JSON list
--markdown  the README's table (the same data)""",
)


def main(args: ToolArgs) -> int:
    if args.config_file:
        raise UserError("posttrain guide takes settings as key=value, not --config")
    if args.flags.get("--markdown"):
        print(render_markdown(args.settings or README_SETTINGS))
        return 0
    entries = rows(args.settings)
    if args.flags.get("--json"):
        json.dump(entries, sys.stdout, indent=1)
        print()
    else:
        print(render_text(entries, args.settings))
    return 0
