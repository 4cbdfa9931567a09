"""`posttrain eval`: greedy accuracy (and pass@k with sampling) of any model on a prompt dataset with a verifier.

    posttrain eval model=PATH dataset=DATA [reward_funcs=accuracy] [max_samples=N] [num_samples=K]

Prints a table and a JSON line; with output_dir also writes eval.json and completions.jsonl there (into its
eval/ subfolder when output_dir holds a training run: none of the run's files is replaced).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import StorageError, UserError, opt
from posttrain.data import load_dataset
from posttrain.rollout.generate import HFEngine
from posttrain.rollout.groups import prompt_examples, prompt_seed, sample, score
from posttrain.rollout.rewards import BUILTIN_FORMAT_PATTERN, load_reward_funcs

log = logging.getLogger("posttrain")


@dataclass
class Config:
    """Evaluate a model on a prompt dataset with a verifier: greedy accuracy, or pass@k when num_samples > 1."""

    model: str = opt("smollm2-135m-instruct", "Model folder, .gguf file, hub id, or the embedded default.")
    tokenizer: str | None = opt(None, "Tokenizer path or hub id; default: the model's own.")
    trust_remote_code: bool = opt(False, "Allow model code from the model folder / hub to run.")
    chat_template: str | None = opt(None, "A Jinja chat template (string or file path) replacing the tokenizer's.")
    dataset: str = opt("arithmetic:split=test", "Prompt data with an `answer` column (file, folder, hub name, built-in task).")
    dataset_split: str = opt("test", "Split to read from hub datasets.")
    skip_invalid: bool = opt(False, "Skip malformed rows instead of stopping.")
    max_samples: int | None = opt(None, "Evaluate only the first N prompts.")
    reward_funcs: list[str] = opt(["accuracy"], "Verifiers / reward functions; the first is the headline metric.")
    format_pattern: str | None = opt(None, "Regex for the `format` reward.")
    reward_model: str | None = opt(None, "Path of a reward model for the reward_model function.")
    max_completion_length: int = opt(64, "Maximum new tokens per completion.")
    max_prompt_length: int | None = opt(512, "Maximum prompt tokens; longer prompts keep their end.")
    prompt_suffix: str | None = opt(None, "Text appended to every prompt (e.g. ' Reply with only the final number.').")
    chat_prompts: bool = opt(True, "Send plain-text prompts as a user message through the chat template (when the tokenizer has one).")
    num_samples: int = opt(1, "Completions per prompt: 1 = greedy; k > 1 samples at `temperature` and reports pass@k.")
    temperature: float = opt(1.0, "Sampling temperature when num_samples > 1.")
    batch_size: int = opt(16, "Prompts generated together.")
    seed: int = opt(0, "Sampling seed.")
    output_dir: str | None = opt(None, "Write eval.json and completions.jsonl here; into its eval/ (eval-2/, ...) "
                                 "subfolder when it holds a training run, so none of the run's files is replaced.")
    overwrite_output_dir: bool = opt(False, "Replace the eval.json and completions.jsonl of an earlier eval in output_dir.")
    command = "eval"

    def validate(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or self.max_completion_length < 1:
            raise UserError("num_samples, batch_size and max_completion_length must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError("max_samples must be >= 1")
        if not self.reward_funcs:
            raise UserError("reward_funcs: give at least one")


def evaluate_prompts(model, tok, examples, funcs, *, max_new_tokens: int, batch_size: int, num_samples: int = 1,
                     temperature: float = 0.0, seed: int = 0, make_engine=HFEngine) -> dict:
    """Generate for every prompt example and score. Returns {"metrics": {...}, "rows": [...]}.

    `examples` are `PromptExample`s (`posttrain.rollout.groups`); `make_engine(model, tok)` builds the
    `GenerationEngine`. Metrics: `<func>` mean reward of each function (for accuracy: the fraction
    correct); with k > 1 samples also `<first func>/pass@k` (a prompt counts when any sample scores > 0).
    """
    engine = make_engine(model, tok)
    k = num_samples
    temp = 0.0 if k == 1 else temperature
    all_rewards, rows = [], []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        rollout = sample(engine, chunk, k, seeds=[prompt_seed(seed, 0, e.index) for e in chunk],
                         max_new_tokens=max_new_tokens, temperature=temp)
        scored = score(funcs, chunk, rollout)
        all_rewards.append(scored.rewards)
        for i, text in enumerate(scored.texts):
            e = chunk[i // k]
            rows.append({"index": e.index, "answer": e.columns.get("answer"), "completion": text,
                         "rewards": {name: _num(scored.rewards[i, j]) for j, (name, _) in enumerate(funcs)}})
    rewards = torch.cat(all_rewards)  # [P*k, R]
    metrics = {}
    for j, (name, _) in enumerate(funcs):
        col = torch.nan_to_num(rewards[:, j], nan=0.0)
        metrics[name] = float(col.mean())
        # The standard error of that mean over prompts (each prompt's k samples averaged first: they are not
        # independent draws from the test distribution): the sample std (n - 1) / sqrt(n).
        per_prompt = col.view(-1, k).mean(-1)
        n = per_prompt.numel()
        metrics[f"{name}/stderr"] = float(per_prompt.std() / math.sqrt(n)) if n > 1 else float("nan")
    if k > 1:
        first = torch.nan_to_num(rewards[:, 0], nan=0.0).view(-1, k)
        metrics[f"{funcs[0][0]}/pass@{k}"] = float((first > 0).any(-1).float().mean())
    return {"metrics": metrics, "rows": rows}


def _num(x: torch.Tensor):
    v = float(x)
    return None if math.isnan(v) else v


def run(cfg: Config) -> int:
    from posttrain.models import load_model, load_tokenizer

    from posttrain.rundir import eval_output_dir

    # Settled before anything loads: a folder holding a training run gets its results in a subfolder.
    out = eval_output_dir(Path(cfg.output_dir), cfg.overwrite_output_dir) if cfg.output_dir else None
    ds = load_dataset(cfg.dataset, "prompt", split=cfg.dataset_split, skip_invalid=cfg.skip_invalid, max_samples=cfg.max_samples)
    builtin = cfg.dataset.split(":")[0] == "arithmetic"
    try:
        funcs = load_reward_funcs(list(cfg.reward_funcs), format_pattern=cfg.format_pattern or (BUILTIN_FORMAT_PATTERN if builtin else None),
                                  max_completion_length=cfg.max_completion_length, reward_model=cfg.reward_model)
    except ValueError as e:
        raise UserError(f"reward_funcs: {e}") from None
    tok = load_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code, cfg.chat_template)
    model = load_model(cfg.model, cfg.trust_remote_code)
    model.eval()
    examples = prompt_examples(ds, tok, cfg)
    t0 = time.time()
    with torch.no_grad():
        report = evaluate_prompts(model, tok, examples, funcs, max_new_tokens=cfg.max_completion_length,
                                  batch_size=cfg.batch_size, num_samples=cfg.num_samples, temperature=cfg.temperature,
                                  seed=cfg.seed)
    seconds = time.time() - t0
    summary = {"model": cfg.model, "dataset": cfg.dataset, "prompts": len(examples), "num_samples": cfg.num_samples,
               "seconds": round(seconds, 1), **{k: round(v, 4) for k, v in report["metrics"].items()}}
    _print_table(summary)
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
            with (out / "completions.jsonl").open("w") as f:
                for row in report["rows"]:
                    f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise StorageError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
        print(f"eval results: {out / 'eval.json'}")
    print(json.dumps(summary))  # the last line: machine-readable
    return 0


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="posttrain eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
