"""Does training make the model better? Each ROW runs a recipe end to end and prints its line of the README table.

    python benchmarks/learning.py ROW [--seeds 1,2] [--quick] [--json benchmarks/learning.json]

    # the same row as separate jobs (so a shared job queue can interleave other work), then the report:
    python benchmarks/learning.py ROW --part before --resume
    python benchmarks/learning.py ROW --part train --seeds 1 --resume     # one job per seed
    python benchmarks/learning.py ROW --part train --seeds 2 --resume
    python benchmarks/learning.py ROW --seeds 1,2 --part report           # runs nothing: assembles the table line

    # a variant: KEY=VALUE added to the row's last training command; warm-up and before-eval shared with the row
    python benchmarks/learning.py main --seeds 1,2 --resume --set curriculum=pass_rate

Rows (recipes in examples/; SmolLM2-135M-Instruct, float32, this CPU):

    arith   arith_train -> arith_test (300): greedy accuracy before, SFT warm-up on the `solution` column, GRPO,
            greedy accuracy after (and after the warm-up alone)
    main    `posttrain grpo` with no arguments -> greedy accuracy on the built-in test split (500)
    dpo     DPO on hh_helpful_train -> held-out implicit-reward accuracy on all 300 pairs of hh_helpful_test
    rm      reward model on the same pairs -> held-out accuracy on all 300
    gsm8k   gsm8k_train -> gsm8k_test (500): base, SFT on the solutions, then GRPO

Every step is one `posttrain` command in its own process under `/usr/bin/time -v` (wall time, CPU time, peak
RSS). Accuracies come with their standard errors: greedy evaluations from `posttrain eval` (the sample std over
prompts / sqrt(n)), and a gain also with the *paired* standard error (the std of the per-problem differences
/ sqrt(n)), which is what says whether a gain on the same test problems is real. Preference accuracies (DPO,
RM) are binomial: sqrt(p (1 - p) / n). The machine is shared: the load average during every command is
recorded, and so is its CPU time (user + sys), which does not grow with other people's load the way wall time
does. `--resume` reuses a step finished earlier with the very same command (its record sits next to its
output folder as NAME.step.json), so a row can be run in parts and assembled. `--quick` runs every step with a few examples (a smoke test: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ARITH_SUFFIX = " Reply with only the final number."


def default_data() -> Path:
    for candidate in (ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------------
# Running one command


@dataclass
class Step:
    """One finished command: what ran and what it cost."""

    name: str
    argv: list[str]
    wall_s: float
    cpu_s: float
    peak_rss_gb: float
    load: float  # mean 1-minute load average while it ran
    out_dir: str
    log: str


def _parse_time_v(text: str) -> dict:
    def grab(label):
        m = re.search(rf"{re.escape(label)}: (.+)", text)
        return m.group(1).strip() if m else None

    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)") or "0:0"
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {"wall_s": seconds,
            "cpu_s": float(grab("User time (seconds)") or 0) + float(grab("System time (seconds)") or 0),
            "peak_rss_gb": int(grab("Maximum resident set size (kbytes)") or 0) * 1024 / 1e9}


class Runner:
    def __init__(self, work: Path, model: str, threads: int | None, verbose: bool, resume: bool = False,
                 part: str = "all"):
        self.work, self.model, self.threads, self.verbose = work, model, threads, verbose
        self.resume, self.part = resume, part
        self.eval_samples: int | None = None
        self.final_eval_only = False
        self.overrides: list[str] = []  # --set: KEY=VALUE for the row's last training stage (a variant)
        self.steps: list[Step] = []

    def seed_dir(self, seed: int) -> Path:
        """A seed's run folders; a variant's sit beside the plain row's, sharing its before-evaluation."""
        variant = "".join(f"_{re.sub(r'[^A-Za-z0-9._=-]+', '-', kv)}" for kv in self.overrides)
        return self.work / f"seed{seed}{variant}"

    def run(self, name: str, command: str, args: list[str], out_dir: Path) -> Step:
        """`posttrain COMMAND ARGS` in its own process; stops the benchmark when it fails. With `resume`, a step
        that already finished with the same command is not run again: its recorded cost is reused."""
        record = out_dir.parent / f"{out_dir.name}.step.json"
        old = json.loads(record.read_text()) if (self.resume or self.part == "report") and record.exists() else None
        if old is not None:
            if old["argv"] == ["posttrain", command, *args]:
                step = Step(**{k: old[k] for k in Step.__dataclass_fields__})
                step.name = name
                self.steps.append(step)
                print(f"[{time.strftime('%H:%M:%S')}] {name}: reused ({_minutes(step.wall_s)} wall, "
                      f"{_minutes(step.cpu_s)} CPU, peak RSS {step.peak_rss_gb:.2f} GB)", flush=True)
                return step
        if self.part == "report":
            raise SystemExit(f"{name}: no finished step with this command in {out_dir.parent} (--part report runs "
                             "nothing); run its part first")
        if out_dir.exists():  # a step folder of this benchmark's own, from an older or failed run: run it afresh
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        argv = ["/usr/bin/time", "-v", sys.executable, "-m", "posttrain", command, *args]
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log_path = out_dir.parent / f"{out_dir.name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: posttrain {command} {shlex.join(args)}", flush=True)
        loads, done = [], threading.Event()

        def sample_load():
            while not done.wait(10.0):
                loads.append(os.getloadavg()[0])

        sampler = threading.Thread(target=sample_load, daemon=True)
        loads.append(os.getloadavg()[0])
        sampler.start()
        with open(log_path, "w") as log:
            rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        done.set()
        text = log_path.read_text()
        if rc != 0:
            print(text[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed (exit {rc}); log: {log_path}")
        t = _parse_time_v(text)
        step = Step(name, ["posttrain", command, *args], t["wall_s"], t["cpu_s"], t["peak_rss_gb"],
                    sum(loads) / len(loads), str(out_dir), str(log_path))
        self.steps.append(step)
        record.write_text(json.dumps({**step.__dict__, "commit": commit(),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        print(f"    {_minutes(step.wall_s)} wall, {_minutes(step.cpu_s)} CPU, peak RSS {step.peak_rss_gb:.2f} GB, "
              f"load {step.load:.1f}", flush=True)
        if self.verbose:
            print(text[-2000:])
        return step


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


# ------------------------------------------------------------------------------------------------------
# Statistics


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else math.nan


def eval_result(out_dir: Path, metric: str = "accuracy") -> dict:
    """`posttrain eval`'s summary and per-prompt scores (of the first sample of each prompt)."""
    summary = json.loads((out_dir / "eval.json").read_text())
    per_prompt: dict[int, float] = {}
    for line in (out_dir / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        per_prompt.setdefault(row["index"], row["rewards"].get(metric) or 0.0)
    return {"value": summary[metric], "se": summary.get(f"{metric}/stderr"), "n": summary["prompts"],
            "scores": [per_prompt[i] for i in sorted(per_prompt)], "summary": summary}


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean of after - before over the same problems and its standard error (std of the differences / sqrt(n))."""
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(var / n)


def by_column(scores: list[float], data_file: Path, column: str, limit: int | None) -> dict[str, str]:
    """Accuracy per value of a data column (e.g. the arithmetic `type`), as 'correct/total'."""
    rows = [json.loads(x) for x in data_file.read_text().splitlines()][: limit or None]
    tally: dict[str, list[float]] = {}
    for row, s in zip(rows, scores):
        tally.setdefault(str(row.get(column)), []).append(s)
    return {k: f"{int(sum(v))}/{len(v)}" for k, v in sorted(tally.items())}


def last_metrics(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out: dict = {}
    for r in rows:
        out.update(r)
    out["_train_seconds"] = sum(r.get("step_seconds", 0.0) for r in rows)
    out["_steps"] = max((r["step"] for r in rows if "loss" in r), default=0)
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------------------------
# The rows


@dataclass
class RowResult:
    row: str
    task: str
    target: str
    before: str
    after: list[str]
    met: bool
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def _eval_args(model: str, dataset: str, extra: list[str], out: Path, limit: int | None) -> list[str]:
    args = [f"model={model}", f"dataset={dataset}", f"output_dir={out}", "batch_size=50", *extra]
    return args + ([f"max_samples={limit}"] if limit else [])


def greedy_rl_row(r: Runner, name: str, task: str, target: float, seeds: list[int], quick: bool, *, eval_data: str,
                  eval_extra: list[str], stages: list[tuple[str, str, list[str]]], column: str | None = None,
                  data_file: Path | None = None) -> RowResult:
    """Before-eval, then for each seed: the training stages in order (each starting from the previous stage's
    model), each followed by a greedy eval (only the last one with --final-eval-only); the last stage's eval is
    the row's 'after'."""
    limit = 8 if quick else r.eval_samples  # the first `limit` test problems (all when None)
    base = r.work / "before"
    if r.part != "train":  # (report: reuses it)
        r.run("before", "eval", _eval_args(r.model, eval_data, eval_extra, base, limit), base)
    if r.part == "before":
        return None
    res = RowResult(name, task, f">= {pct(target)}", "", [], True)
    before = eval_result(base) if (base / "eval.json").exists() else None  # a --part train job may run first
    if before:
        res.before = f"{pct(before['value'])} ± {pct(before['se'])}"
        res.details["before"] = {"accuracy": before["value"], "se": before["se"], "n": before["n"]}
        if column and data_file:
            res.details["before"]["by_" + column] = by_column(before["scores"], data_file, column,
                                                              limit)
    if r.overrides:  # a variant: only the last stage changes (the RL step after a warm-up)
        stages = [*stages[:-1], (stages[-1][0], stages[-1][1], [*stages[-1][2], *r.overrides])]
    for seed in seeds:
        model, seed_details, train_wall, train_cpu, rss = r.model, {}, 0.0, 0.0, 0.0
        for i, (stage, command, args) in enumerate(stages):
            # a variant changes only the last stage: the warm-up before it is the plain row's, run once
            folder = r.seed_dir(seed) if i == len(stages) - 1 else r.work / f"seed{seed}"
            run_dir = folder / stage
            extra = ["max_steps=2", "max_samples=16"] if quick else []
            step = r.run(f"{stage} (seed {seed})", command,
                         [*args, f"model={model}", f"seed={seed}", f"output_dir={run_dir}", "progress=false", *extra],
                         run_dir)
            train_wall += step.wall_s
            train_cpu += step.cpu_s
            rss = max(rss, step.peak_rss_gb)
            model = str(run_dir)
            if r.final_eval_only and stage != stages[-1][0]:
                seed_details[stage] = {"wall_s": step.wall_s, "cpu_s": step.cpu_s, "peak_rss_gb": step.peak_rss_gb,
                                       "load": step.load, "steps": last_metrics(run_dir)["_steps"]}
                continue
            ev_dir = folder / f"eval-{stage}"
            r.run(f"eval after {stage} (seed {seed})", "eval", _eval_args(model, eval_data, eval_extra, ev_dir, limit),
                  ev_dir)
            ev = eval_result(ev_dir)
            gain, gain_se = paired_gain(before["scores"], ev["scores"]) if before else (math.nan, math.nan)
            stage_info = {"accuracy": ev["value"], "se": ev["se"], "gain": gain, "gain_se": gain_se,
                          "wall_s": step.wall_s, "cpu_s": step.cpu_s, "peak_rss_gb": step.peak_rss_gb,
                          "load": step.load, "steps": last_metrics(run_dir)["_steps"]}
            if column and data_file:
                stage_info["by_" + column] = by_column(ev["scores"], data_file, column, limit)
            seed_details[stage] = stage_info
        final = seed_details[stages[-1][0]]
        res.task = task.format(n=ev["n"])  # how many test problems were scored (--eval-samples may cut them)
        res.after.append(f"{pct(final['accuracy'])} ± {pct(final['se'])} (seed {seed}; gain {pct(final['gain'])} ± "
                         f"{pct(final['gain_se'])} paired)")
        res.met &= final["accuracy"] >= target
        seed_details.update(train_wall_s=train_wall, train_cpu_s=train_cpu, peak_rss_gb=rss)
        res.details[f"seed{seed}"] = seed_details
    return res


def row_arith(r: Runner, data: Path, seeds: list[int], quick: bool) -> RowResult:
    test = str(data / "arith_test.jsonl")
    stages = [("sft", "sft", ["--config", str(EXAMPLES / "sft_arith.yaml"), f"dataset={data / 'arith_train.jsonl'}"]),
              ("grpo", "grpo", ["--config", str(EXAMPLES / "grpo_arith.yaml"), f"dataset={data / 'arith_train.jsonl'}"])]
    return greedy_rl_row(r, "arith", "arith_train -> arith_test ({n}), greedy", 0.35, seeds, quick, eval_data=test,
                         eval_extra=[f"prompt_suffix={ARITH_SUFFIX}", "max_completion_length=24"], stages=stages,
                         column="type", data_file=data / "arith_test.jsonl")


def row_main(r: Runner, data: Path, seeds: list[int], quick: bool) -> RowResult:
    # `posttrain grpo` with no arguments; output_dir, seed and progress do not change the recipe.
    return greedy_rl_row(r, "main", "`posttrain grpo` (no arguments) -> built-in test split ({n}), greedy", 0.55,
                         seeds, quick, eval_data="arithmetic:split=test",
                         eval_extra=["max_completion_length=16", "reward_funcs=accuracy,format"],
                         stages=[("grpo", "grpo", [])], column=None)


def row_gsm8k(r: Runner, data: Path, seeds: list[int], quick: bool) -> RowResult:
    train = str(data / "gsm8k_train.jsonl")
    stages = [("sft", "sft", ["--config", str(EXAMPLES / "sft_gsm8k.yaml"), f"dataset={train}"]),
              ("grpo", "grpo", ["--config", str(EXAMPLES / "grpo_gsm8k.yaml"), f"dataset={train}"])]
    res = greedy_rl_row(r, "gsm8k", "gsm8k_train -> gsm8k_test ({n}), greedy", 0.0, seeds, quick,
                        eval_data=str(data / "gsm8k_test.jsonl"), eval_extra=["max_completion_length=256"],
                        stages=stages)
    if res is None:  # --part before
        return None
    # The target is a gain beyond 2 paired standard errors over the base model.
    res.target = "gain > 2 SE"
    res.met = all(res.details[f"seed{s}"]["grpo"]["gain"] > 2 * res.details[f"seed{s}"]["grpo"]["gain_se"]
                  for s in seeds)
    return res


def pair_row(r: Runner, name: str, command: str, config: str, data: Path, seeds: list[int], quick: bool,
             metric: str, target: float) -> RowResult:
    """DPO / RM: the run's own final evaluation on all 300 held-out pairs (no eval_max_samples)."""
    if r.part == "before":  # the untrained model's number is known without running it (see row_dpo / row_rm)
        return None
    res = RowResult(name, f"{command} on hh_helpful_train -> hh_helpful_test (300 pairs)", f">= {pct(target)}",
                    "", [], True)
    for seed in seeds:
        run_dir = r.seed_dir(seed) / command
        extra = ["max_steps=2", "max_samples=8", "eval_max_samples=8"] if quick else []
        step = r.run(f"{command} (seed {seed})", command,
                     ["--config", str(EXAMPLES / config), f"model={r.model}", f"dataset={data / 'hh_helpful_train.jsonl'}",
                      f"eval_dataset={data / 'hh_helpful_test.jsonl'}", f"seed={seed}", f"output_dir={run_dir}",
                      "progress=false", *extra, *r.overrides], run_dir)
        m = last_metrics(run_dir)
        acc = m[metric]
        n = 8 if quick else 300
        se = binomial_se(acc, n)
        res.after.append(f"{pct(acc)} ± {pct(se)} (seed {seed})")
        res.met &= acc >= target
        res.details[f"seed{seed}"] = {metric: acc, "se": se, "n": n, "steps": m["_steps"],
                                      "train_seconds_logged": m["_train_seconds"], "wall_s": step.wall_s,
                                      "cpu_s": step.cpu_s, "peak_rss_gb": step.peak_rss_gb, "load": step.load,
                                      "eval_loss": m.get("eval/loss")}
    return res


def row_dpo(r, data, seeds, quick):
    res = pair_row(r, "dpo", "dpo", "dpo_hh.yaml", data, seeds, quick, "eval/rewards/accuracies", 0.62)
    res.before = "50% (policy = reference: every margin is 0)"
    return res


def row_rm(r, data, seeds, quick):
    res = pair_row(r, "rm", "rm", "rm_hh.yaml", data, seeds, quick, "eval/accuracy", 0.65)
    res.before = "46.7% (untrained head, docs/recipes_rm.md)"
    return res


ROWS = {"arith": row_arith, "main": row_main, "dpo": row_dpo, "rm": row_rm, "gsm8k": row_gsm8k}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("row", choices=sorted(ROWS))
    ap.add_argument("--seeds", default="1", help="comma-separated training seeds (RL rows: use at least 2)")
    ap.add_argument("--data", default=str(default_data()), help="the shared data folder")
    ap.add_argument("--work", default=None, help="run folders (default runs/learning/ROW)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the starting model (tests pass a tiny one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every command (1 is much faster on a CPU shared with other jobs)")
    ap.add_argument("--part", choices=["all", "before", "train", "report"], default="all",
                    help="before: only the before-eval; train: only the given seeds' training and evals (no "
                         "report); all: everything, then the report; report: the report from finished steps only")
    ap.add_argument("--resume", action="store_true",
                    help="reuse every step already finished with the same command (NAME.step.json in --work)")
    ap.add_argument("--eval-samples", type=int, default=None,
                    help="greedy rows: evaluate on the first N test problems only (the report says n); default all")
    ap.add_argument("--final-eval-only", action="store_true",
                    help="multi-stage rows: evaluate only after the last stage (GSM8K's evaluations are long)")
    ap.add_argument("--quick", action="store_true", help="a few examples per step: checks the pipeline only")
    ap.add_argument("--json", default=None, help="append the row's result (with every step) to this JSON lines file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a variant of the row: appended to its last training command (repeatable); its last stage "
                         "runs in seedN_KEY=VALUE next to the plain row's seedN, whose before-evaluation and warm-up "
                         "stages it shares (reused with --resume)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.set):
        ap.error(f"--set takes KEY=VALUE, got {next(kv for kv in args.set if '=' not in kv)!r}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work or ROOT / "runs" / "learning" / args.row)
    runner = Runner(work, args.model, args.threads, args.verbose, args.resume, args.part)
    runner.eval_samples, runner.final_eval_only = args.eval_samples, args.final_eval_only
    runner.overrides = list(args.set)
    started = datetime.date.today().isoformat()
    res = ROWS[args.row](runner, Path(args.data), seeds, args.quick)
    if args.part in ("before", "train"):
        print(f"part {args.part} of row {args.row} done: {len(runner.steps)} step(s) in {work}")
        return 0
    train = [s for s in runner.steps if not s.name.startswith(("before", "eval"))]
    wall = sum(s.wall_s for s in train) / len(seeds)
    cpu = sum(s.cpu_s for s in train) / len(seeds)
    rss = max(s.peak_rss_gb for s in runner.steps)
    load = sum(s.load for s in runner.steps) / len(runner.steps)
    if args.set:
        res.row = f"{res.row} ({' '.join(args.set)})"
    line = (f"| {res.row} | {res.task} | {res.before} | {'; '.join(res.after)} | {res.target} | "
            f"{'met' if res.met else 'NOT met'} | {_minutes(wall)} ({_minutes(cpu)} CPU) | {rss:.1f} GB | "
            f"{started} | `{commit()}` | {load:.1f} |")
    print("\n| row | task | before | after | target | | training wall (CPU) per seed | peak RSS | date | commit | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(line)
    print(json.dumps(res.details, indent=1))
    if args.json:
        record = {"row": res.row, "line": line, "date": started, "commit": commit(), "quick": args.quick,
                  "details": res.details, "steps": [s.__dict__ for s in runner.steps]}
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
