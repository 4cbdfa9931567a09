"""`posttrain audit DATA [key=value ...] [--json] [--strict]`: is this data any good for the training it is meant for?

Reads DATA as training would (the same format detection, validation, tokenizer, chat template and length limits,
resolved with the training command's own Config) and reports: the format and row counts; token-length
percentiles of prompt / chosen / rejected / completion; rows the limits would truncate or drop; exact and
near-duplicate prompts; preference pairs whose chosen and rejected are identical or nearly so; length bias;
KTO label balance and the weights that restore the recommended ratio; for prompt-only data the `answer` column
and, with `model=`, the model's pass rate on a sample (a task too hard or too easy for GRPO). It ends with the
method guide for data of this kind (posttrain/guide.py). Findings that call for action are warnings: the exit
code stays 0, or is 1 under `--strict` (for CI pipelines).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from posttrain.cli import ToolArgs, ToolSpec
from posttrain.config import UserError, load_config, opt
from posttrain.data.lengths import KIND, MODULES, Item, read_valid, text_of, tokenize

# The training command each data format is read for by default, and the kind of data each command consumes.
DEFAULT_COMMAND = {"preference": "dpo", "unpaired": "kto", "prompt_only": "grpo", "prompt_completion": "sft",
                   "language_modeling": "sft"}


@dataclass
class AuditConfig:
    """The audit's own settings (every other key is the training command's)."""

    command: str | None = opt(None, "Audit for this training command (its defaults and limits); default: by the "
                                    "data's format (pairs: dpo, unpaired: kto, prompt-only: grpo, otherwise sft).",
                              ("sft", "dpo", "rm", "kto", "grpo", "online-dpo", "ppo"))
    pair_similarity: float = opt(0.9, "Chosen and rejected count as near-identical at this normalised token edit "
                                      "similarity (1 - edit distance / longer length) or above.")
    duplicate_similarity: float = opt(0.8, "Prompts count as near-duplicates at this Jaccard similarity of their "
                                           "word 3-grams or above.")
    length_bias: float = opt(0.6, "Warn when chosen is the longer answer in more than this share of pairs (or "
                                  "shorter in more than it).")
    pass_rate_prompts: int = opt(16, "With model=: prompts sampled to measure the model's pass rate (0: skip).")
    examples: int = opt(3, "Rows quoted (file:line) for each finding.")
    command_name = "audit"

    def validate(self) -> None:
        for name in ("pair_similarity", "duplicate_similarity"):
            if not 0 < getattr(self, name) <= 1:
                raise UserError(f"{name} must be in (0, 1]")
        if not 0.5 <= self.length_bias < 1:
            raise UserError("length_bias must be in [0.5, 1)")
        if self.pass_rate_prompts < 0 or self.examples < 0:
            raise UserError("pass_rate_prompts and examples must be >= 0")


def _split_settings(settings: list[str]) -> tuple[AuditConfig, list[str]]:
    own = {f.name for f in dataclasses.fields(AuditConfig)}
    mine, rest = [], []
    for s in settings:
        (mine if s.partition("=")[0] in own else rest).append(s)
    return load_config(AuditConfig, None, mine), rest


# ---------------------------------------------------------------------------------------------------------
# Similarity


def edit_similarity(a: list[int], b: list[int]) -> float:
    """1 - Levenshtein(a, b) / max(len): 1.0 for identical sequences, 0.0 for nothing in common.

    Row by row with numpy: the insertion term of a row is a running minimum, D[j] = min_k (E[k] + j - k) =
    j + cummin(E - index), so each row costs a few vector operations instead of a Python loop."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    x, y = np.asarray(a), np.asarray(b)
    idx = np.arange(len(y) + 1)
    prev = idx.copy()
    for i in range(1, len(x) + 1):
        sub = prev[:-1] + (y != x[i - 1])
        e = np.empty_like(prev)
        e[0] = i
        e[1:] = np.minimum(prev[1:] + 1, sub)
        prev = idx + np.minimum.accumulate(e - idx)
    return 1.0 - float(prev[-1]) / max(len(x), len(y))


def overlap_bound(a: list[int], b: list[int]) -> float:
    """An upper bound of edit_similarity: shared tokens (as multisets) / the longer length. An alignment with d
    edits matches at least max(len) - d tokens, all of them in the multiset intersection."""
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    return common / max(len(a), len(b))


def _shingles(text: str) -> set[int]:
    # Words and symbols (case-insensitive): "53 + 39" and "53 * 39" must stay different problems.
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))]
    return {zlib.crc32(g.encode()) for g in grams}  # a stable hash: the same groups in every run


def near_duplicate_groups(texts: list[str], threshold: float, bands: int = 16, rows: int = 4) -> list[list[int]]:
    """Groups (of 2 or more indices) of texts whose word-3-gram Jaccard similarity is >= threshold, linked
    transitively. MinHash signatures (bands x rows hash functions) propose candidate pairs that share a band
    (LSH); each candidate is confirmed with its exact Jaccard similarity, so no pair below the threshold is
    reported; a pair at or above it is missed with probability (1 - J^4)^16: 0.02% at J = 0.8."""
    sets = [_shingles(t) for t in texts]
    rng = np.random.default_rng(0)
    prime = (1 << 61) - 1
    a = rng.integers(1, 1 << 31, size=bands * rows, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, size=bands * rows, dtype=np.uint64)
    buckets: dict = defaultdict(list)
    for i, s in enumerate(sets):
        h = np.fromiter(s, dtype=np.uint64, count=len(s))
        sig = ((h[:, None] * a[None] + b[None]) % prime).min(0)  # products stay below 2^63: no overflow
        for band in range(bands):
            buckets[(band, sig[band * rows : (band + 1) * rows].tobytes())].append(i)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    checked = set()
    for members in buckets.values():
        # Every pair of a bucket (a long bucket, e.g. many copies of one text: each member with its neighbour).
        pairs = ((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members))) \
            if len(members) <= 64 else itertools.pairwise(members)
        for i, j in pairs:
            if (i, j) in checked or find(i) == find(j):
                continue
            checked.add((i, j))
            if len(sets[i] & sets[j]) / max(len(sets[i] | sets[j]), 1) >= threshold:
                parent[find(j)] = find(i)
    groups = defaultdict(list)
    for i in range(len(texts)):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


# ---------------------------------------------------------------------------------------------------------
# Reading the data as training does


@dataclass
class Report:
    data: str
    model: str
    command: str
    format: str
    settings: dict  # the limits and tokenizer the audit read with
    rows: int = 0
    invalid: list = field(default_factory=list)  # (source, reason)
    lengths: dict = field(default_factory=dict)  # column -> {mean, p50, p90, p99, max}
    truncated: list = field(default_factory=list)  # sources
    dropped: list = field(default_factory=list)
    duplicates: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    length_bias: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)
    eval_overlap: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    signals: list = field(default_factory=list)  # findings the method guide answers (posttrain.guide.SIGNALS)
    guide: list = field(default_factory=list)


def _detect(spec: str, split: str) -> str:
    from posttrain.data.formats import detect_format, read_rows

    rows = [r for r in read_rows(spec, split, "prompt") if r.error is None]
    if not rows:
        raise UserError(f"{spec}: no readable rows")
    fmt = detect_format(rows[0].data)
    if fmt is None:
        raise UserError(f"{rows[0].source}: cannot tell the data format from fields {sorted(rows[0].data)}")
    return fmt


def percentiles(values: list[int]) -> dict:
    a = np.asarray(values)
    return {"mean": round(float(a.mean()), 1), **{f"p{q}": int(np.percentile(a, q, method="higher")) for q in (50, 90, 99)},
            "max": int(a.max())}


# ---------------------------------------------------------------------------------------------------------
# The checks


def _where(sources: list[str], k: int) -> str:
    shown = ", ".join(sources[:k])
    return shown + (f" and {len(sources) - k} more" if len(sources) > k else "")


def check(report: Report, items: list[Item], raw_rows: list, acfg: AuditConfig, cfg, command: str) -> None:
    """Every check that needs no model, in the order the report prints them."""
    check_lengths(report, items, acfg, cfg, command)
    check_duplicates(report, items, raw_rows, acfg)
    if report.format == "preference":
        check_pairs(report, items, acfg)
    if command == "kto":
        check_labels(report, items, cfg)
    if report.format == "prompt_only":
        check_answers(report, items, raw_rows, acfg)


def check_lengths(report: Report, items: list[Item], acfg: AuditConfig, cfg, command: str) -> None:
    k, n = acfg.examples, len(items)
    for col in ("prompt", "chosen", "rejected", "completion", "sequence", "chosen_sequence", "rejected_sequence"):
        vals = [it.lengths[col] for it in items if col in it.lengths]
        if vals:
            report.lengths[col] = percentiles(vals)
    report.truncated = [it.source for it in items if it.truncated and not it.dropped]
    report.dropped = [it.source for it in items if it.dropped]
    limits = f"max_length={cfg.max_length}" + (f", max_prompt_length={cfg.max_prompt_length}" if cfg.max_prompt_length else "")
    if report.dropped:
        report.warnings.append(
            f"{len(report.dropped)} rows ({len(report.dropped) / n:.1%}) would be dropped by posttrain {command}: the "
            f"prompt alone fills {limits} (e.g. {_where(report.dropped, k)}); raise max_length or set max_prompt_length")
    if len(report.truncated) > 0.1 * n:
        p99 = report.lengths.get("sequence", report.lengths.get("prompt"))["p99"]
        report.warnings.append(
            f"{len(report.truncated)} rows ({len(report.truncated) / n:.1%}) exceed {limits} and would be truncated "
            f"(e.g. {_where(report.truncated, k)}); p99 of the sequence is {p99} tokens")


def check_duplicates(report: Report, items: list[Item], raw_rows: list, acfg: AuditConfig) -> None:
    k = acfg.examples
    first_seen, dup_rows = {}, []
    for r in raw_rows:
        key = json.dumps(r.data, sort_keys=True)
        if key in first_seen:
            dup_rows.append(f"{r.source} = {first_seen[key]}")
        else:
            first_seen[key] = r.source
    by_text = defaultdict(list)
    for it in items:
        by_text[it.prompt_text].append(it.source)
    exact = [srcs for srcs in by_text.values() if len(srcs) > 1]
    unique = list(by_text)
    near = near_duplicate_groups(unique, acfg.duplicate_similarity)
    near_rows = [" ~ ".join(by_text[unique[i]][0] for i in g) for g in near]
    report.duplicates = {"duplicate_rows": len(dup_rows), "examples": dup_rows[:k], "repeated_prompts": len(exact),
                         "rows_with_repeated_prompt": sum(len(s) for s in exact),
                         "near_duplicate_groups": len(near), "rows_in_near_duplicate_groups": sum(len(g) for g in near),
                         "near_examples": [[by_text[unique[i]][0] for i in g][:k] for g in near[:k]]}
    if dup_rows:
        report.warnings.append(f"{len(dup_rows)} rows repeat an earlier row exactly ({_where(dup_rows, k)}): they weigh "
                               f"twice in training")
    # Several pairs or labels per prompt are normal for preference and unpaired data; prompts and demonstrations
    # should be distinct.
    if report.format in ("prompt_only", "prompt_completion", "language_modeling") and (exact or near):
        what = "prompts" if report.format != "language_modeling" else "texts"
        report.warnings.append(
            f"{len(exact)} {what} occur more than once and {len(near)} groups are near-duplicates (Jaccard >= "
            f"{acfg.duplicate_similarity:g}; e.g. {_where(near_rows or [s[0] for s in exact], k)}): repeated {what} "
            f"are memorised rather than learned")


def check_pairs(report: Report, items: list[Item], acfg: AuditConfig) -> None:
    k, warn = acfg.examples, report.warnings.append
    same, close = [], []
    for it in items:
        a, b = it.chosen_ids, it.rejected_ids
        if a == b:
            same.append(it.source)
        elif overlap_bound(a, b) >= acfg.pair_similarity and edit_similarity(a, b) >= acfg.pair_similarity:
            close.append(it.source)
    report.pairs = {"identical": len(same), "identical_examples": same[:k], "near_identical": len(close),
                    "near_identical_examples": close[:k], "threshold": acfg.pair_similarity}
    if same:
        warn(f"{len(same)} pairs have identical chosen and rejected ({_where(same, k)}): no preference to learn "
             f"(DPO's gradient is 0 on them); drop them")
    if close:
        report.signals.append("near_identical_pairs")
        warn(f"{len(close)} pairs are near-identical (token edit similarity >= {acfg.pair_similarity:g}; "
             f"{_where(close, k)}): a few tokens separate chosen from rejected, and DPO drives their loss to 0 "
             f"early by moving those tokens alone; drop them or soften with label_smoothing")
    c = np.array([it.lengths["chosen"] for it in items])
    r = np.array([it.lengths["rejected"] for it in items])
    longer, shorter = float((c > r).mean()), float((c < r).mean())
    report.length_bias = {"chosen_longer": round(longer, 4), "chosen_shorter": round(shorter, 4),
                          "ties": round(1 - longer - shorter, 4), "mean_difference": round(float((c - r).mean()), 1)}
    if max(longer, shorter) > acfg.length_bias:
        report.signals.append("length_bias")
        side = "longer" if longer > shorter else "shorter"
        warn(f"length bias: chosen is the {side} answer in {max(longer, shorter):.1%} of pairs (mean difference "
             f"{float((c - r).mean()):+.1f} tokens): DPO can learn length instead of quality; length-normalised "
             f"losses (loss_type=sigmoid_norm, ipo, simpo) or LD-DPO (ld_alpha=0.5) remove that signal")


def check_labels(report: Report, items: list[Item], cfg) -> None:
    n, warn = len(items), report.warnings.append
    if report.format == "preference":
        n_d = n_u = n  # each pair gives one desirable and one undesirable example
    else:
        n_d = sum(1 for it in items if it.label)
        n_u = n - n_d
    dw, uw = cfg.desirable_weight, cfg.undesirable_weight
    report.labels = {"desirable": n_d, "undesirable": n_u, "desirable_weight": dw, "undesirable_weight": uw}
    if not n_d or not n_u:
        warn(f"KTO needs both desirable and undesirable examples; got {n_d} desirable and {n_u} undesirable")
    else:
        ratio = dw * n_d / (uw * n_u)
        report.labels["weighted_ratio"] = round(ratio, 4)
        fix = None
        if ratio < 1:
            fix = f"desirable_weight={_ceil2(uw * n_u / n_d):g}"
        elif ratio > 4 / 3:
            fix = f"undesirable_weight={_ceil2(dw * n_d / (n_u * 4 / 3)):g}"
        if fix:
            report.signals.append("label_imbalance")
            report.labels["suggested"] = fix
            warn(f"KTO class balance: (desirable_weight x {n_d}) / (undesirable_weight x {n_u}) = {ratio:.3f}, "
                 f"outside the recommended [1, 4/3] (KTO paper, Ethayarajh et al. 2024); set {fix}")


def check_answers(report: Report, items: list[Item], raw_rows: list, acfg: AuditConfig) -> None:
    k, n, warn = acfg.examples, len(items), report.warnings.append
    with_answer = [it for it in items if it.answer not in (None, "")]
    report.prompts = {"with_answer": len(with_answer), "without_answer": n - len(with_answer),
                      "has_solution_column": any("solution" in r.data for r in raw_rows)}
    if not with_answer:
        warn("no `answer` column: the accuracy verifier has nothing to check; give each prompt its answer, or "
             "train with reward_funcs=reward_model / your own module:function")
    elif len(with_answer) < n:
        missing = [it.source for it in items if it.answer in (None, "")]
        warn(f"{len(missing)} prompts have no answer ({_where(missing, k)}): the accuracy verifier scores them "
             f"None and they teach nothing")


def _ceil2(x: float) -> float:
    import math

    return math.ceil(x * 100 - 1e-9) / 100


def eval_overlap(report: Report, items: list[Item], cfg, command: str, tok, acfg: AuditConfig) -> None:
    """Prompts of `eval_dataset` that also occur (exactly or nearly) in the training data: held-out numbers
    on them measure memory, not learning."""
    _, rows, _ = read_valid(cfg.eval_dataset, command, cfg.eval_split, cfg.eval_max_samples)
    train = {it.prompt_text for it in items}
    evals = [(text_of(r.data.get("prompt", r.data.get("messages", r.data.get("text", "")))), r.source) for r in rows]
    exact = [src for text, src in evals if text in train]
    texts = list(train) + [t for t, _ in evals if t not in train]
    n_train = len(train)
    near = set()
    for g in near_duplicate_groups(texts, acfg.duplicate_similarity):
        if any(i < n_train for i in g):
            near.update(texts[i] for i in g if i >= n_train)
    near_src = [src for text, src in evals if text in near]
    report.eval_overlap = {"eval_rows": len(rows), "exact": len(exact), "near": len(near_src),
                           "examples": (exact + near_src)[: acfg.examples]}
    if exact or near_src:
        warn = report.warnings.append
        warn(f"eval_dataset overlaps the training data: {len(exact)} eval prompts occur in it exactly and "
             f"{len(near_src)} nearly ({_where(exact + near_src, acfg.examples)}): held-out numbers on them are not held out")


def pass_rate(report: Report, items: list[Item], raw_rows: list, cfg, tok, acfg: AuditConfig) -> None:
    """The model's pass rate on a sample of prompts, sampled as GRPO samples (num_generations at its temperature):
    a task the model never solves gives GRPO groups with no reward variance (no signal); one it always solves,
    nothing to learn."""
    import random

    import torch

    from posttrain.data.formats import Dataset
    from posttrain.evaluate import evaluate_prompts
    from posttrain.models import load_model
    from posttrain.rollout.groups import prompt_examples
    from posttrain.rollout.rewards import load_reward_funcs

    with_answer = [r for r, it in zip(raw_rows, items) if it.answer not in (None, "")]
    if not with_answer or acfg.pass_rate_prompts <= 0:
        return
    sample = random.Random(cfg.seed).sample(with_answer, min(acfg.pass_rate_prompts, len(with_answer)))
    examples = prompt_examples(Dataset(sample, report.data, "prompt_only"), tok, cfg)
    model = load_model(cfg.model, cfg.trust_remote_code)
    G = cfg.num_generations
    funcs = load_reward_funcs(["accuracy"])
    with torch.no_grad():
        out = evaluate_prompts(model, tok, examples, funcs, max_new_tokens=cfg.max_completion_length,
                               batch_size=max(1, 32 // G), num_samples=G, temperature=cfg.temperature or 1.0,
                               seed=cfg.seed)
    per_prompt = defaultdict(list)
    for row in out["rows"]:
        per_prompt[row["index"]].append((row["rewards"]["accuracy"] or 0.0) > 0)
    groups = list(per_prompt.values())
    none = sum(not any(g) for g in groups) / len(groups)
    every = sum(all(g) for g in groups) / len(groups)
    mean = sum(sum(g) for g in groups) / sum(len(g) for g in groups)
    report.prompts["pass_rate"] = {"prompts": len(groups), "generations": G, "temperature": cfg.temperature,
                                   "max_completion_length": cfg.max_completion_length, "accuracy": round(mean, 4),
                                   "groups_all_wrong": round(none, 4), "groups_all_right": round(every, 4),
                                   "groups_with_signal": round(1 - none - every, 4)}
    method = {"grpo": "GRPO", "ppo": "PPO", "online-dpo": "online DPO"}[report.command]
    if none >= 0.75:
        report.signals.append("sparse_reward")
        why = ("zero reward variance, no learning signal" if G > 1 else
               "almost every reward is 0: a critic or baseline has nothing to tell apart")
        report.warnings.append(
            f"too hard for {method} as it is: {cfg.model} solves {mean:.1%} of {G} samples per prompt and {none:.0%} "
            f"of groups get no correct answer ({why}); start with easier prompts, add a format reward with partial "
            f"credit, raise num_generations, or first SFT the model")
    elif every >= 0.75:
        report.warnings.append(
            f"too easy for {method}: {every:.0%} of groups are all correct ({mean:.1%} of samples); nothing left to learn")


# ---------------------------------------------------------------------------------------------------------
# The command


def audit(spec: str, settings: list[str], config_file: str | None = None) -> Report:
    import importlib

    from posttrain.models import load_tokenizer

    acfg, rest = _split_settings(settings)
    split = next((s.split("=", 1)[1] for s in rest if s.startswith("dataset_split=")), "train")
    fmt = _detect(spec, split)
    command = acfg.command or DEFAULT_COMMAND[fmt]
    cfg = load_config(importlib.import_module(MODULES[command]).Config, config_file, rest + [f"dataset={spec}"])
    fmt, rows, invalid = read_valid(spec, command, cfg.dataset_split, cfg.max_samples)
    tok = load_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code, cfg.chat_template)
    items, bad = tokenize(command, fmt, rows, tok, cfg)
    invalid += bad
    if not items:
        raise UserError(f"{spec}: no valid rows ({invalid[0][0]}: {invalid[0][1]})" if invalid else f"{spec}: no rows")
    valid_sources = {it.source for it in items}
    rows = [r for r in rows if r.source in valid_sources]
    limits = {"tokenizer": cfg.tokenizer or cfg.model, "max_length": cfg.max_length,
              "max_prompt_length": cfg.max_prompt_length}
    if KIND[command] == "prompt":
        limits.update(max_completion_length=cfg.max_completion_length, num_generations=cfg.num_generations)
    report = Report(spec, cfg.model, command, fmt, limits, len(rows) + len(invalid), invalid)
    if invalid:
        reasons = Counter(reason for _, reason in invalid)
        top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
        report.warnings.append(f"{len(invalid)} invalid rows would stop training (or be skipped with skip_invalid=true): "
                               f"{top} (e.g. {_where([s for s, _ in invalid], acfg.examples)})")
    check(report, items, rows, acfg, cfg, command)
    if cfg.eval_dataset:
        eval_overlap(report, items, cfg, command, tok, acfg)
    model_given = any(s.startswith("model=") for s in rest)
    if fmt == "prompt_only" and KIND[command] == "prompt" and model_given:
        pass_rate(report, items, rows, cfg, tok, acfg)
    from posttrain.guide import rows as guide_rows

    report.guide = guide_rows([f"model={cfg.model}"] if model_given else [], (fmt,))
    return report


def render(r: Report) -> str:
    fmt = r.format.replace("_", "-")
    lines = [f"posttrain audit {r.data}",
             f"format: {fmt}, {r.rows} rows ({len(r.invalid)} invalid), read as `posttrain {r.command}` reads it: "
             + ", ".join(f"{k} {'none' if v is None else v}" for k, v in r.settings.items()), ""]
    if r.lengths:
        lines.append(f"  {'tokens':<12}{'mean':>8}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
        for col, s in r.lengths.items():
            lines.append(f"  {col:<12}{s['mean']:>8}{s['p50']:>7}{s['p90']:>7}{s['p99']:>7}{s['max']:>7}")
        lines.append("")
    n = r.rows - len(r.invalid)
    lines.append(f"limits: {len(r.truncated)} rows truncated ({len(r.truncated) / n:.1%}), {len(r.dropped)} dropped")
    d = r.duplicates
    lines.append(f"duplicates: {d['duplicate_rows']} repeated rows; {d['repeated_prompts']} prompts occur more than once "
                 f"({d['rows_with_repeated_prompt']} rows); {d['near_duplicate_groups']} groups of near-duplicate prompts "
                 f"({d['rows_in_near_duplicate_groups']} prompts)")
    if r.pairs:
        lines.append(f"pairs: {r.pairs['identical']} with identical chosen and rejected, {r.pairs['near_identical']} "
                     f"near-identical (similarity >= {r.pairs['threshold']:g})")
        b = r.length_bias
        lines.append(f"length: chosen longer in {b['chosen_longer']:.1%} of pairs, shorter in {b['chosen_shorter']:.1%}, "
                     f"mean difference {b['mean_difference']:+} tokens")
    if r.labels:
        ratio = r.labels.get("weighted_ratio")
        lines.append(f"labels: {r.labels['desirable']} desirable, {r.labels['undesirable']} undesirable"
                     + (f"; weighted ratio {ratio:.3f} (recommended 1 to 4/3)" if ratio is not None else ""))
    if r.prompts:
        p = r.prompts
        lines.append(f"answers: {p['with_answer']} prompts with an `answer`, {p['without_answer']} without"
                     + ("; a `solution` column (posttrain sft trains on it as the completion)" if p["has_solution_column"] else ""))
        if "pass_rate" in p:
            q = p["pass_rate"]
            lines.append(f"pass rate: {q['accuracy']:.1%} of {q['generations']} samples on {q['prompts']} prompts; groups "
                         f"all wrong {q['groups_all_wrong']:.0%}, all right {q['groups_all_right']:.0%}, with signal "
                         f"{q['groups_with_signal']:.0%}")
        else:
            lines.append("pass rate: give model=... to sample the model on a few prompts")
    if r.eval_overlap:
        e = r.eval_overlap
        lines.append(f"eval overlap: {e['exact']} of {e['eval_rows']} eval prompts in the training data, {e['near']} nearly")
    lines.append("")
    if r.warnings:
        lines.append(f"warnings ({len(r.warnings)}):")
        lines += [f"  - {w}" for w in r.warnings]
    else:
        lines.append("no warnings")
    if r.guide:
        from posttrain.guide import render_text

        lines += ["", render_text(r.guide, [f"model={r.model}"], tuple(r.signals))]
    return "\n".join(lines)


TOOL = ToolSpec(
    usage="posttrain audit DATA [key=value ...] [--json] [--strict]",
    positionals=(0, 1),
    flags={"--json": bool, "--strict": bool},
    help="""DATA: a file, a folder of files, a hub dataset or a built-in task, as `dataset=` takes it (dataset=DATA
works too).
Settings: the training command's own keys (model= for the tokenizer and chat template, max_length,
max_prompt_length, eval_dataset to check for overlap, ...; defaults are that command's), and the audit's:
""" + "\n".join(f"  {f.name}: {f.metadata['help']} (default {f.default!r})" for f in dataclasses.fields(AuditConfig)) + """
With model= on prompt-only data: the model's pass rate on pass_rate_prompts prompts (GRPO's sampling settings).
--json    one JSON object with every count, the rows quoted and the warnings
--strict  exit 1 when any warning fired (exit 0 otherwise; errors exit 2)""",
)


def main(args: ToolArgs) -> int:
    # DATA, or dataset= as the training commands take it (then dropped from the settings: DATA is the dataset)
    given = [s for s in args.settings if s.startswith("dataset=")]
    if args.positionals:
        spec = args.positionals[0]
    elif given:
        spec = given[-1].split("=", 1)[1]
    else:
        raise UserError(f"usage: {TOOL.usage}")
    settings = [s for s in args.settings if not s.startswith("dataset=")]
    report = audit(spec, settings, args.config_file)
    if args.flags.get("--json"):
        json.dump(dataclasses.asdict(report), sys.stdout, indent=1, default=str)
        print()
    else:
        print(render(report))
    return 1 if args.flags.get("--strict") and report.warnings else 0
