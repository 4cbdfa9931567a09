"""Check `posttrain memory` against the peak RSS of real posttrain runs on this machine.

    python benchmarks/memory_validation.py baseline              # the runtime's own peak RSS (memory.RUNTIME_BYTES)
    python benchmarks/memory_validation.py run                   # every configuration: table on stdout
    python benchmarks/memory_validation.py run --only dpo-copy-256,sft-full-512 --json out.json
    python benchmarks/memory_validation.py replan --json out.json more.json  # the planner column again, same measurements

`run` writes data that fills the length limits into a temporary folder (long texts cut from
/work/shared/data/hh_helpful_train.jsonl, so every sequence is truncated at max_length and every GRPO prompt
at max_prompt_length: the run's micro-batches are then the planner's worst case), runs each configuration as
`/usr/bin/time -v python -m posttrain COMMAND dataset=... SETTINGS max_steps=2` (the peak is reached in the
second step, once AdamW's state exists), and puts the planner's total for the same settings beside the
measured "Maximum resident set size". benchmarks/MEMORY.md holds the table it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
HERE = Path(__file__).resolve().parent
SHARED = next((p for p in (HERE.parent.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()), None)

# name, command, settings (the data set is added by the script). Together they cover SFT/DPO/KTO/RM/GRPO/PPO,
# full fine-tuning and LoRA, a reference copy vs precomputed vs adapter-off, max_length 256/512/1024, micro-batches
# of 1 to 8 and gradient accumulation.
CONFIGS = [
    ("sft-full-512", "sft", ["max_length=512", "micro_batch_size=4", "batch_size=4"]),
    ("sft-lora-1024", "sft", ["max_length=1024", "micro_batch_size=2", "batch_size=4", "lora.r=16"]),
    ("dpo-copy-256", "dpo", ["max_length=256", "micro_batch_size=2", "batch_size=2"]),
    ("dpo-copy-512-ckpt", "dpo", ["max_length=512", "micro_batch_size=2", "batch_size=2", "gradient_checkpointing=true"]),
    ("dpo-precompute-512", "dpo", ["max_length=512", "micro_batch_size=2", "batch_size=4", "precompute_ref_log_probs=true"]),
    ("dpo-lora-512", "dpo", ["max_length=512", "micro_batch_size=4", "batch_size=4", "lora.r=16"]),
    ("kto-copy-256", "kto", ["max_length=256", "micro_batch_size=4", "batch_size=4"]),
    ("kto-lora-precompute-512", "kto", ["max_length=512", "micro_batch_size=2", "batch_size=4", "lora.r=16",
                                        "precompute_ref_log_probs=true"]),
    ("rm-full-512", "rm", ["max_length=512", "micro_batch_size=2", "batch_size=2"]),
    ("rm-lora-256", "rm", ["max_length=256", "micro_batch_size=4", "batch_size=4", "lora.r=16"]),
    ("grpo-full", "grpo", ["max_prompt_length=64", "max_completion_length=32", "num_generations=4", "batch_size=4",
                           "micro_batch_size=8", "reward_funcs=accuracy"]),
    ("grpo-lora-kl", "grpo", ["max_prompt_length=128", "max_completion_length=32", "num_generations=8", "batch_size=2",
                              "micro_batch_size=16", "reward_funcs=accuracy", "lora.r=16", "beta=0.04"]),
    # PPO: LoRA with a shared critic (the reference is the adapter switched off), and full fine-tuning with a
    # separate critic (a second trained model) and a reference copy, two micro-batches a step.
    ("ppo-lora-shared", "ppo", ["max_prompt_length=128", "max_completion_length=32", "batch_size=8",
                                "micro_batch_size=8", "reward_funcs=accuracy", "lora.r=16", "critic=shared"]),
    ("ppo-full-separate", "ppo", ["max_prompt_length=64", "max_completion_length=32", "batch_size=4",
                                  "micro_batch_size=2", "reward_funcs=accuracy", "critic=separate"]),
]


def _long_texts(n: int, chars: int) -> list[str]:
    """n texts of at least `chars` characters, each a run of consecutive HH replies (real words, no repetition
    within a text)."""
    rows = [json.loads(line) for line in (SHARED / "hh_helpful_train.jsonl").open()]
    replies = [r["chosen"][-1]["content"] for r in rows] + [r["rejected"][-1]["content"] for r in rows]
    out, i = [], 0
    for _ in range(n):
        parts = []
        while sum(len(p) + 1 for p in parts) < chars:
            parts.append(replies[i % len(replies)])
            i += 1
        out.append(" ".join(parts))
    return out


def write_data(folder: Path, n: int = 32) -> dict[str, Path]:
    """Pairs, prompt-completion rows and prompts whose texts are far longer than any length limit used here."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = _long_texts(3 * n, 12000)  # ~2500 tokens each: every completion and prompt gets truncated
    files = {"pairs": folder / "pairs.jsonl", "sft": folder / "sft.jsonl", "prompts": folder / "prompts.jsonl"}
    with files["pairs"].open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}:", "chosen": texts[2 * i], "rejected": texts[2 * i + 1]}) + "\n")
    with files["sft"].open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}:", "completion": texts[i]}) + "\n")
    with files["prompts"].open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": texts[2 * n + i] + " Continue the text:", "answer": "0"}) + "\n")
    return files


DATA_OF = {"sft": "sft", "dpo": "pairs", "kto": "pairs", "rm": "pairs", "grpo": "prompts", "ppo": "prompts"}


def peak_rss(argv: list[str], env=None) -> tuple[int, float, str]:
    """(peak RSS in bytes, wall seconds, output tail) of `argv` run under /usr/bin/time -v."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env, check=False)
    wall = time.time() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(m.group(1)) * 1024, wall, proc.stderr[-2000:]


BASELINE_SCRIPT = """
import torch
import posttrain.cli, posttrain.algorithms.dpo, posttrain.algorithms.grpo, posttrain.algorithms.kto, posttrain.algorithms.rm
from posttrain.models import load_tokenizer
from posttrain.testing import tiny_model
tok = load_tokenizer("smollm2-135m-instruct")
model = tiny_model()
model(input_ids=torch.randint(3, 300, (2, 16))).logits.sum().backward()
"""


def baseline() -> int:
    """Peak RSS of a process that imports everything a run imports, loads the tokenizer and runs a first
    forward/backward (thread pools, kernels), with no model of any size."""
    rss, _, _ = peak_rss([sys.executable, "-c", BASELINE_SCRIPT])
    return rss


def _commit() -> str:
    """The commit measured: POSTTRAIN_COMMIT when set (a run from an exported copy of the tree, which has no .git,
    so that edits to the working tree cannot change the code under a measurement that takes hours), else HEAD."""
    if os.environ.get("POSTTRAIN_COMMIT"):
        return os.environ["POSTTRAIN_COMMIT"]
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                          check=True).stdout.strip()


def _fresh_cache(folder: Path) -> Path:
    """A posttrain cache with no reference log-probs, so a precompute_ref_log_probs run always includes its scoring
    pass as a first run does (an earlier measurement's cached values would skip it), sharing the converted
    embedded model (converting it again would be a different run)."""
    from posttrain.models import cache_dir

    folder.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    (folder / "models").symlink_to(cache_dir() / "models")
    return folder


def run(names: list[str] | None, json_out: str | None) -> list[dict]:
    from posttrain.memory import plan

    commit = _commit()
    base = baseline()
    print(f"runtime baseline (peak RSS, no model): {base / GiB:.3f} GiB", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="posttrain-memval-") as tmp:
        files = write_data(Path(tmp) / "data")
        for name, command, settings in CONFIGS:
            if names and name not in names:
                continue
            full = [f"dataset={files[DATA_OF[command]]}", *settings]
            predicted = plan(command, full)
            argv = [sys.executable, "-m", "posttrain", command, *full, "max_steps=2", "progress=false",
                    f"output_dir={tmp}/runs/{name}", "logging_steps=1"]
            rss, wall, _ = peak_rss(argv, env={**os.environ, "POSTTRAIN_CACHE": str(_fresh_cache(Path(tmp) / name))})
            err = predicted.total / rss - 1
            row = {"name": name, "command": f"posttrain {command} {' '.join(settings)}", "planner_bytes": predicted.total,
                   "peak_rss_bytes": rss, "error": err, "wall_s": round(wall, 1), "peak_phase": predicted.peak_phase,
                   "components": predicted.components}
            results.append(row)
            print(f"{name:<26} planner {predicted.total / GiB:6.2f} GiB  measured {rss / GiB:6.2f} GiB  "
                  f"{err:+6.1%}  ({wall:.0f} s)", flush=True)
            shutil.rmtree(f"{tmp}/runs/{name}", ignore_errors=True)
    print()
    print(f"measured on {time.strftime('%Y-%m-%d')} at commit {commit}; runtime baseline {base / GiB:.2f} GiB; "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print("| configuration | settings | planner | peak RSS | planner / measured - 1 | within 15% |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | `{r['command']}` | {r['planner_bytes'] / GiB:.2f} GiB | {r['peak_rss_bytes'] / GiB:.2f} GiB "
              f"| {r['error']:+.1%} | {'yes' if abs(r['error']) <= 0.15 else '**no**'} |")
    if json_out:
        Path(json_out).write_text(json.dumps({"commit": commit, "date": time.strftime("%Y-%m-%d"),
                                              "baseline_bytes": base, "results": results}, indent=1))
    return results


def replan(json_in: list[str]) -> None:
    """The planner column again with the code checked out now, beside the peak RSS stored in the files `run`
    wrote (one per configuration or several in one; valid while the training code is the one the runs measured:
    compare `git diff MEASURED_COMMIT -- posttrain/`). Prints the table with each row's measured commit."""
    from posttrain.memory import plan

    measured = []
    for path in json_in:
        old = json.loads(Path(path).read_text())
        measured += [(r, old["commit"], old["date"]) for r in old["results"]]
    order = {name: i for i, (name, _, _) in enumerate(CONFIGS)}
    measured.sort(key=lambda x: order.get(x[0]["name"], len(order)))
    commit = _commit()
    configs = {name: (command, settings) for name, command, settings in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="posttrain-memval-") as tmp:
        files = write_data(Path(tmp) / "data")
        print(f"planner at {commit}")
        print()
        print("| configuration | settings | planner | peak RSS | planner / measured - 1 | within 15% | measured at |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r, at, date in measured:
            command, settings = configs[r["name"]]
            total = plan(command, [f"dataset={files[DATA_OF[command]]}", *settings]).total
            err = total / r["peak_rss_bytes"] - 1
            print(f"| {r['name']} | `{r['command']}` | {total / GiB:.2f} GiB | {r['peak_rss_bytes'] / GiB:.2f} GiB "
                  f"| {err:+.1%} | {'yes' if abs(err) <= 0.15 else '**no**'} | `{at}`, {date}, {r['wall_s']:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["baseline", "run", "replan"])
    ap.add_argument("--only", help="comma-separated configuration names")
    ap.add_argument("--json", nargs="+", help="run: write every result (with the planner's components) to this "
                                              "file; replan: the files runs wrote")
    args = ap.parse_args()
    if SHARED is None:
        sys.exit("the shared data folder (../shared/data or /work/shared/data) is needed for the long texts")
    if args.what == "baseline":
        print(f"{baseline() / GiB:.3f} GiB")
    elif args.what == "replan":
        replan(args.json)
    else:
        run(args.only.split(",") if args.only else None, args.json[0] if args.json else None)


if __name__ == "__main__":
    main()
