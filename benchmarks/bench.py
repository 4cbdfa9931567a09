"""Side-by-side benchmark: posttrain against Hugging Face TRL on this machine's CPU.

    python benchmarks/bench.py dpo|grpo|logprobs|generate|all|scaling [--steps N] [--quick] [--json FILE]

Every measured run happens in its own child process (this same file, `--child KIND SPEC`), so each peak RSS
belongs to that run alone and one library's allocator state cannot favour or burden the other. The parent only
starts children and prints one table per part. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hh_helpful_train.jsonl"
MODEL = "smollm2-135m-instruct"
RESULT_MARK = "BENCH_RESULT "
TRL_VERSION = "1.16.0"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# DPO configurations: name -> (precompute_ref_log_probs, lora, bf16 autocast)
DPO_CONFIGS = {
    "full": (False, False, False),  # full fine-tuning, frozen reference copy in memory
    "precompute": (True, False, False),  # full fine-tuning, reference log-probs computed once before training
    "lora": (False, True, False),  # LoRA r=16 on q,k,v,o; reference = the same model with the adapter off
    "bf16": (False, False, True),  # "full" under bfloat16 autocast (weights and optimizer float32)
}


# ------------------------------------------------------------------------------------------------------
# Helpers shared by parent and children


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0), so a later peak is one phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


PROFILE_CATEGORIES = ("decoder matmuls", "LM head matmuls", "attention", "softmax / log-softmax", "optimizer",
                      "other ops")


def op_category(name: str, shapes, vocab: int) -> str:
    """The component a profiled torch op belongs to (LM-head matmuls are the ones with a vocabulary-sized input)."""
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear"):
        head = any(vocab in (s or []) for s in (shapes or []))
        return "LM head matmuls" if head else "decoder matmuls"
    if "softmax" in name or "logsumexp" in name:
        return "softmax / log-softmax"
    if "adam" in name.lower():
        return "optimizer"
    return "other ops"


class StepProfiler:
    """torch.profiler around one call; `shares()` is each component's share of the ops' self CPU time. Only
    leaf aten ops are counted (self time), so nothing is counted twice."""

    def __init__(self, vocab: int):
        self.vocab, self.totals = vocab, {}

    def run(self, fn, *args, **kwargs):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = fn(*args, **kwargs)
        for ev in prof.key_averages(group_by_input_shape=True):
            if ev.self_cpu_time_total <= 0 or not ev.key.startswith("aten::"):
                continue
            cat = op_category(ev.key, ev.input_shapes, self.vocab)
            self.totals[cat] = self.totals.get(cat, 0.0) + ev.self_cpu_time_total / 1e6
        return out

    def shares(self) -> dict:
        total = sum(self.totals.values()) or 1.0
        return {k: v / total for k, v in self.totals.items()}


def median_after(values: list[float], warmup: int) -> tuple[float, int]:
    """Median of the values after the first `warmup` (all of them if that would leave none)."""
    kept = values[warmup:] or values
    return statistics.median(kept), len(kept)


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def trl_status() -> str | None:
    """None when TRL is importable, else the reason it is not."""
    if importlib.util.find_spec("trl") is None:
        return f'TRL is not installed (pip install "trl=={TRL_VERSION}"); only the posttrain side runs'
    return None


# ------------------------------------------------------------------------------------------------------
# Children: each prints one line `BENCH_RESULT {json}` on stdout.


def child_matmul(spec: dict) -> dict:
    """float32 (2048 x 2048) @ (2048 x 2048): 2 n^3 FLOPs per product; median of `reps` products."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(spec["reps"]):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return {"gflops": statistics.median(rates) / 1e9, "threads": torch.get_num_threads()}


def model_flop_counts(path: str) -> dict:
    """Parameter counts that enter matmuls: decoder blocks (no input embedding: a lookup), the LM head
    (counted even when tied to the embedding: it is a real matmul), and the LoRA adapters' own weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not emb and p is not head)
    lora = 0
    for name, m in model.named_modules():
        if name.split(".")[-1] in LORA_TARGETS:
            lora += 16 * (m.in_features + m.out_features)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"matmul_params": body + head.numel(), "lora_params": lora, "vocab": head.shape[0], "params": total}


def child_dpo_posttrain(spec: dict) -> dict:
    from posttrain import reference
    from posttrain.cli import main

    work = Path(spec["workdir"])
    extra: dict = {}
    # A fresh reference-log-prob cache, so the precompute pass is really computed (and timed) in this run.
    reference.cache_dir = lambda: work / "posttrain-cache"
    original = reference.Precomputed.precompute

    def timed_precompute(*args, **kwargs):
        t = time.perf_counter()
        sources = original(*args, **kwargs)
        extra.setdefault("precompute_seconds", time.perf_counter() - t)
        return sources

    reference.Precomputed.precompute = timed_precompute
    prof = profile_last_step(spec)
    out = work / "posttrain-run"
    argv = [
        "dpo", f"model={spec['model']}", f"dataset={spec['data']}", f"max_steps={spec['steps'] + bool(prof)}",
        "batch_size=2", "micro_batch_size=2", f"max_length={spec['max_length']}", f"output_dir={out}",
        "progress=false", "logging_steps=1", "seed=42",
        f"precompute_ref_log_probs={str(spec['precompute']).lower()}", f"bf16={str(spec['bf16']).lower()}",
    ]
    if spec["lora"]:
        argv += ["lora.r=16", "lora.alpha=32", "lora.dropout=0", f"lora.target_modules={','.join(LORA_TARGETS)}"]
    rc = main(argv)
    if rc:
        raise SystemExit(f"posttrain dpo exited with {rc}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r][: spec["steps"]]  # not the profiled extra step
    if prof:
        extra["profile"] = prof.shares()
    return {
        "step_seconds": [r["step_seconds"] for r in rows],
        "tokens": [round(r["tokens_per_second"] * r["step_seconds"]) for r in rows],
        "loss": [r["loss"] for r in rows],
        **extra,
    }


def profile_last_step(spec: dict):
    """With spec["profile"]: a StepProfiler around one extra optimizer step of posttrain's engine after the
    timed ones (the rollout of an online method included), left out of every time reported."""
    if not spec.get("profile"):
        return None
    from posttrain.engine import Algorithm, Engine

    prof = StepProfiler(spec["vocab"])
    calls = {"step": 0, "prepare": 0}
    run_step, train = Engine._run_step, Engine.train

    def profiled_step(self, micro_batches):
        calls["step"] += 1
        if calls["step"] == spec["steps"] + 1:
            return prof.run(run_step, self, micro_batches)
        return run_step(self, micro_batches)

    def profiled_train(self):
        prepare = type(self.algo).prepare

        def profiled_prepare(algo, model, examples):
            calls["prepare"] += 1
            if calls["prepare"] == spec["steps"] + 1:
                return prof.run(prepare, algo, model, examples)
            return prepare(algo, model, examples)

        if prepare is not Algorithm.prepare:
            type(self.algo).prepare = profiled_prepare
        return train(self)

    Engine._run_step, Engine.train = profiled_step, profiled_train
    return prof


def child_dpo_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    ordered = [rows[i] for i in spec["order"]]  # posttrain's batch order, read sequentially below
    prof = StepProfiler(spec["vocab"]) if spec.get("profile") else None
    if prof:  # one more step on the first batch again, profiled and left out of the times
        ordered += ordered[:2]
    extra: dict = {}
    tokens: list[int] = []
    pending = [0]

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            extra.setdefault("precompute_seconds", time.perf_counter() - t)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            if prof and self.state.global_step == spec["steps"]:  # the extra, profiled step
                # the timed steps are done: report them now, so a profiled step that runs out of memory (TRL at
                # max_length 2048 here) loses only the profile
                n = spec["steps"]
                losses = [h["loss"] for h in self.state.log_history if "loss" in h]
                emit_result({"step_seconds": timer.times[:n], "tokens": tokens[:n], "loss": losses[:n], **extra,
                             "peak_rss": peak_rss_bytes(), "partial": "before the profiled step"})
                return prof.run(super().training_step, model, inputs, num_items_in_batch)
            pending[0] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    def end_step():
        tokens.append(pending[0])
        pending[0] = 0

    timer = make_step_timer(end_step)
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-run"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"] + bool(prof),
        max_length=spec["max_length"],
        precompute_ref_log_probs=spec["precompute"],
        precompute_ref_batch_size=8,  # posttrain's eval_batch_size, which its precompute pass uses
        learning_rate=5e-6 if spec["lora"] else 5e-7,  # posttrain's DPO defaults
        warmup_steps=0.1,  # a ratio of the steps (transformers 5), as posttrain's warmup_ratio 0.1
        lr_scheduler_type="linear",
        beta=0.1,
        gradient_checkpointing=False,
        bf16=spec["bf16"],
        use_cpu=spec["bf16"] and not torch.cuda.is_available(),  # transformers refuses bf16 on CPU without it
        report_to="none",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=42,
    )
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    trainer = Timed(model=model, args=args, train_dataset=Dataset.from_list(ordered), processing_class=tok,
                    peft_config=peft_config, callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n = spec["steps"]
    if prof:
        extra["profile"] = prof.shares()
    return {"step_seconds": timer.times[:n], "tokens": tokens[:n], "loss": losses[:n], **extra}


def make_step_timer(on_end=None):
    """A TrainerCallback timing each optimizer step: on_step_begin (before the first micro-batch's forward)
    to on_step_end (after the optimizer step; Trainer logs after that, untimed). Built here so the parent
    process never imports transformers."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)
            if on_end:
                on_end()

    return StepTimer()


def child_grpo_posttrain(spec: dict) -> dict:
    from posttrain.cli import main

    prof = profile_last_step(spec)
    out = Path(spec["workdir"]) / "posttrain-run"
    argv = [
        "grpo", f"model={spec['model']}", f"dataset={spec['data']}", f"max_steps={spec['steps'] + bool(prof)}",
        f"batch_size={spec['prompts']}", f"micro_batch_size={spec['micro']}", f"num_generations={spec['G']}",
        f"max_completion_length={spec['max_new']}", "temperature=1.0", "beta=0", "learning_rate=1e-6",
        "reward_funcs=accuracy", "loss_type=dapo", f"output_dir={out}", "progress=false", "logging_steps=1", "seed=42",
    ]
    rc = main(argv)
    if rc:
        raise SystemExit(f"posttrain grpo exited with {rc}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r][: spec["steps"]]
    # The engine's step_seconds is the optimisation only; the rollout (sampling, rewards, advantages) is
    # `prepare_seconds`, of which `generation_seconds` is sampling + reward scoring.
    return {
        **({"profile": prof.shares()} if prof else {}),
        "step_seconds": [r["prepare_seconds"] + r["step_seconds"] for r in rows],
        "gen_seconds": [r["prepare_seconds"] for r in rows],
        "sampling_seconds": [r["generation_seconds"] for r in rows],
        "reward": [r.get("reward") for r in rows],
    }


def child_grpo_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rollout.rewards import accuracy  # the very reward function posttrain uses

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    gen_times: list[float] = []
    sampling_times: list[float] = []

    prof = StepProfiler(spec["vocab"]) if spec.get("profile") else None

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            if prof and self.state.global_step == spec["steps"]:  # the extra, profiled step
                return prof.run(super()._generate_and_score_completions, inputs)
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            gen_times.append(time.perf_counter() - t)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            if prof and self.state.global_step == spec["steps"]:
                return prof.run(super().training_step, model, inputs, num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch)

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            sampling_times.append(time.perf_counter() - t)
            return out

    completions = spec["prompts"] * spec["G"]
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-run"),
        per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=completions // spec["micro"],
        num_generations=spec["G"],
        max_completion_length=spec["max_new"],
        temperature=1.0,
        beta=0.0,
        learning_rate=1e-6,
        loss_type="dapo",
        max_steps=spec["steps"] + bool(prof),
        gradient_checkpointing=False,
        bf16=False,
        report_to="none",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=42,
    )
    timer = make_step_timer()
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    trainer = Timed(model=model, reward_funcs=accuracy, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=tok, callbacks=[timer])
    trainer.train()
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    n = spec["steps"]
    out = {"step_seconds": timer.times[:n], "gen_seconds": gen_times[:n], "sampling_seconds": sampling_times[:n],
           "reward": rewards[:n]}
    if prof:
        out["profile"] = prof.shares()
    return out


def child_logprobs(spec: dict) -> dict:
    """One log-prob routine, forward + backward into every parameter, on a random Llama at vocab 49152."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.cli import _steady_malloc
    from posttrain.logprobs import naive_token_logps, token_logps

    _steady_malloc()  # as the posttrain CLI does; for every variant, so only the routine differs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=spec["layers"],
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).float()
    B, T = spec["batch"], spec["seq"]
    ids = torch.randint(3, cfg.vocab_size, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.long)
    if spec["variant"] != "chunked_all":
        mask[:, : T // 2] = 0  # completion = the last half (the naive path computes every position anyway)

    def run():
        if spec["variant"] == "naive":
            logps = naive_token_logps(model, ids, attn, mask)
        elif spec["variant"] == "decoder":  # the floor: no LM head at all
            logps = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        else:
            logps = token_logps(model, ids, attn, mask).logps
        logps.sum().backward()
        model.zero_grad(set_to_none=True)

    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    times = []
    for _ in range(spec["warmup"] + spec["reps"]):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    peak = peak_rss_bytes()
    return {"seconds": times, "peak_rss": peak, "baseline_rss": baseline, "peak_reset": reset_ok}


def child_generate(spec: dict) -> dict:
    """posttrain's sampler (HFEngine) and transformers' model.generate on the same prompts and sampling settings,
    alternated in one process so both see the same machine state; tokens = generated tokens up to each row's EOS."""
    import torch

    from posttrain.data.tasks import arithmetic_rows
    from posttrain.data.tokenize import encode_prompt
    from posttrain.models import load_model, load_tokenizer
    from posttrain.rollout.generate import HFEngine

    tok, model = load_tokenizer(spec["model"]), load_model(spec["model"])
    model.eval()
    prompts = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in arithmetic_rows(spec["prompts"], seed=0)]
    G, new = spec["G"], spec["max_new"]
    engine = HFEngine(model, tok)
    eos = set(engine.eos_ids)
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])

    def ours(seed):
        out = engine.generate(prompts, G, max_new_tokens=new, temperature=1.0, seeds=[seed + i for i in range(len(prompts))])
        return int(out.completion_mask.sum())

    def plain(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=new, num_return_sequences=G, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos))
        n = 0
        for row in out[:, L:].tolist():  # up to and including the first EOS, as posttrain counts
            n += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        return n

    times: dict = {"posttrain": [], "generate": []}
    tokens: dict = {"posttrain": [], "generate": []}
    for rep in range(spec["warmup"] + spec["reps"]):
        for name, fn in (("posttrain", ours), ("generate", plain)):
            t = time.perf_counter()
            n = fn(1000 * rep)
            times[name].append(time.perf_counter() - t)
            tokens[name].append(n)
    return {"seconds": times, "tokens": tokens, "prompt_lengths": [len(p) for p in prompts]}


def child_baseline(spec: dict) -> dict:
    """The RSS a training process starts from: torch, transformers and posttrain imported, no model."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import posttrain.algorithms.dpo  # noqa: F401

    return {}


CHILDREN = {
    "baseline": child_baseline,
    "generate": child_generate,
    "matmul": child_matmul,
    "flops": lambda spec: model_flop_counts(spec["model_path"]),
    "dpo_posttrain": child_dpo_posttrain,
    "dpo_trl": child_dpo_trl,
    "grpo_posttrain": child_grpo_posttrain,
    "grpo_trl": child_grpo_trl,
    "logprobs": child_logprobs,
}


def child_main(kind: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    t = time.perf_counter()
    result = CHILDREN[kind](spec)
    result["wall_seconds"] = time.perf_counter() - t
    result.setdefault("peak_rss", peak_rss_bytes())
    emit_result(result)


def emit_result(result: dict) -> None:
    """The child's result line; a later one replaces an earlier (partial) one."""
    print(RESULT_MARK + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------
# Parent


class Runner:
    def __init__(self, workdir: Path, verbose: bool, on_result=None):
        self.workdir, self.verbose, self.n, self.on_result = workdir, verbose, 0, on_result

    def child(self, kind: str, label: str, **spec) -> dict | None:
        """Run one child; its output goes to a log file (shown on failure). None when it failed."""
        if self.on_result:  # here, not after the child: by now the caller has stored the previous child's result
            self.on_result()
        self.n += 1
        run_dir = self.workdir / f"{self.n:02d}-{kind}"
        run_dir.mkdir()
        spec["workdir"] = str(run_dir)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
                   TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
        log = run_dir / "log.txt"
        print(f"  {label} ...", end="", flush=True, file=sys.stderr)
        t = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], stdout=subprocess.PIPE,
                                  stderr=f, text=True, cwd=ROOT, env=env, check=False)
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_MARK):
                result = json.loads(line[len(RESULT_MARK):])
        took = time.perf_counter() - t
        if proc.returncode != 0 and result is not None and result.get("partial"):
            # its timed steps finished and were reported; what failed after them is only the profiled step
            print(f" {took:.0f} s; then FAILED (exit {proc.returncode}) {result['partial']}: its times are kept, "
                  f"its profile and its peak RSS past that point are not", file=sys.stderr)
            result["failed_after"] = f"exit {proc.returncode}"
            return result
        if proc.returncode != 0 or result is None:
            print(f" FAILED after {took:.0f} s (exit {proc.returncode}); last lines of {log}:", file=sys.stderr)
            tail = (proc.stdout + "\n" + log.read_text()).strip().splitlines()[-25:]
            print("\n".join("    " + line for line in tail), file=sys.stderr)
            return None
        print(f" {took:.0f} s", file=sys.stderr)
        if self.verbose:
            print(log.read_text(), file=sys.stderr)
        return result


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if notes:
        print()
        for n in notes:
            print(f"- {n}")
    sys.stdout.flush()


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def dpo_flops_per_token(config: str, counts: dict) -> tuple[float, str]:
    """Model FLOPs per non-pad token of one DPO step (attention's sequence-length term left out)."""
    n, lora = counts["matmul_params"], counts["lora_params"]
    if config in ("full", "bf16"):
        return 8 * n, "6N (policy fwd+bwd) + 2N (reference fwd)"
    if config == "precompute":
        return 6 * n, "6N (policy fwd+bwd; the reference pass ran before training)"
    # Frozen base weights: forward 2N + input gradients 2N, no weight gradients; adapters 6 x their own weights.
    return 6 * n + 6 * lora, "4N + 6N_lora (policy fwd+bwd, base frozen) + 2N (adapter-off reference fwd)"


def usable_pairs(n: int, max_length: int) -> list[dict]:
    """The first n rows of the data that keep a completion token at max_length. Both libraries drop rows whose
    prompt alone fills max_length; filtering here keeps posttrain's batch order equal to the one TRL is fed."""
    from posttrain.algorithms.dpo import encode_preference
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    rows = []
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        if encode_preference(tok, row, max_length, None) is not None:
            rows.append(row)
        if len(rows) == n:
            return rows
    raise SystemExit(f"{DATA}: only {len(rows)} usable pairs, {n} needed")


def executed_positions(rows: list[dict], order: list[int], steps: int, max_length: int) -> list[int]:
    """Positions posttrain's decoder runs per step: each prompt once, then both completions (its packed
    shared-prefix layout, no padding). Counted from the same encoding the training run uses."""
    from posttrain.algorithms.dpo import encode_preference
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    pairs = [encode_preference(tok, r, max_length, None) for r in rows]
    out = []
    for s in range(steps):
        n = 0
        for i in order[2 * s : 2 * s + 2]:
            p = pairs[i]
            start = p.chosen.mask.index(1) if 1 in p.chosen.mask else len(p.chosen)
            n += len(p.chosen) + len(p.rejected) - start  # the shared prompt counted once
        out.append(n)
    return out


SHAPES = {
    "hh": "HH helpful pairs (long multi-turn prompts, short replies)",
    "short": "synthetic short-prompt pairs (prompt 40-80 tokens, completions 120-180)",
}


def dpo_rows(shape: str, n: int, max_length: int) -> list[dict]:
    """The pairs of one data shape: `hh` (the usable HH pairs), `short` (the seeded synthetic short-prompt
    shape) or `scaled` (synthetic pairs filling half to all of max_length)."""
    if shape == "hh":
        return usable_pairs(n, max_length)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import SHORT, scaled_shape, synthetic_pairs

    from posttrain.models import load_tokenizer

    return synthetic_pairs(load_tokenizer(MODEL), n, seed=0, shape=SHORT if shape == "short" else scaled_shape(max_length))


def static_memory(config: str, counts: dict) -> float:
    """Bytes of float32 state a DPO run must hold whatever its activations: weights, gradients and AdamW's two
    moments of the trainable parameters, and a reference copy (full and bf16 only)."""
    p = counts["params"]
    trainable = counts["lora_params"] if config == "lora" else p
    reference = p if config in ("full", "bf16") else 0
    return 4 * (p + trainable + 2 * trainable + reference)


def bench_dpo(runner: Runner, args, have_trl: bool, model_path: str, results: dict) -> None:
    mm = runner.child("matmul", "float32 matmul peak (2048 x 2048)", reps=10)
    counts = runner.child("flops", "parameter counts", model_path=model_path)
    base = runner.child("baseline", "runtime baseline (imports, no model)")
    results["matmul"], results["counts"], results["baseline"] = mm, counts, base
    for shape in args.shapes:
        bench_dpo_shape(runner, args, have_trl, model_path, results, shape, mm, counts, base)


def bench_dpo_shape(runner, args, have_trl, model_path, results, shape, mm, counts, base) -> None:
    from posttrain.engine import BatchStream

    steps, warmup = args.steps or (2 if args.quick else 12), args.warmup
    max_length = 128 if args.quick else 512
    rows = dpo_rows(shape, 2 * steps, max_length)
    data = runner.workdir / f"dpo_pairs_{shape}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = BatchStream(len(rows), 2, 42)  # posttrain's data order at seed 42; TRL reads the same order
    order = [i for s in range(steps) for i in stream.batch(s)]
    executed = executed_positions(rows, order, steps, max_length)

    peak = mm["gflops"] * 1e9 if mm else None
    table, notes, formulas = [], [], []
    for name in args.dpo_configs:
        precompute, lora, bf16 = DPO_CONFIGS[name]
        spec = {"model": MODEL, "model_path": model_path, "data": str(data), "order": order, "steps": steps,
                "max_length": max_length, "precompute": precompute, "lora": lora, "bf16": bf16}
        res = results[f"dpo_{shape}_{name}"] = {}  # filled in place, so each result is saved before the next child
        if args.side != "trl":
            res["posttrain"] = runner.child("dpo_posttrain", f"dpo {shape} {name}: posttrain", **spec)
        if have_trl:
            res["trl"] = runner.child("dpo_trl", f"dpo {shape} {name}: TRL", **spec)
        fpt, formula = dpo_flops_per_token(name, counts) if counts else (None, "")
        formulas.append(f"{name}: {formula}")
        static = gb(static_memory(name, counts) + (base["peak_rss"] if base else 0)) if counts else "-"
        summary = {}
        for side in ("posttrain", "trl"):
            r = res.get(side)
            if not r:
                continue
            s, n = median_after(r["step_seconds"], warmup)
            tok = statistics.mean(r["tokens"][warmup:] or r["tokens"])
            tps = tok / s
            mfu = f"{fpt * tps / 1e9:.0f} ({100 * fpt * tps / peak:.0f}%)" if fpt and peak else "-"
            done = "-"
            if side == "posttrain" and fpt and peak:
                pps = statistics.mean(executed[warmup:steps] or executed) / s
                done = f"{fpt * pps / 1e9:.0f} ({100 * fpt * pps / peak:.0f}%)"
            pre = f"{r['precompute_seconds']:.1f}" if "precompute_seconds" in r else "-"
            dloss = "-"
            full_run = results.get(f"dpo_{shape}_full", {}).get(side)
            if bf16 and full_run and r.get("loss") and full_run.get("loss"):
                # Same weights, batches and learning rates as the float32 "full" run of the same library.
                dloss = f"{max(abs(a - b) for a, b in zip(r['loss'], full_run['loss'])):.4f}"
            summary[side] = (s, tps, r["peak_rss"])
            table.append([name, side, f"{tok:.0f}", f"{s:.2f}", f"{tps:.0f}", gb(r["peak_rss"]), static, mfu, done, pre,
                          dloss, str(n)])
        if res.get("posttrain") and res.get("trl"):
            # Same pairs in the same order: TRL's sequences are longer only by the template's newline after
            # <|im_end|> (one token per sequence, 4 per step), which it keeps and posttrain does not.
            for step, (a, b) in enumerate(zip(res["posttrain"]["tokens"], res["trl"]["tokens"]), 1):
                if abs(a - b) > 8:
                    print(f"WARNING: dpo {shape} {name} step {step}: posttrain saw {a} tokens, TRL {b}: not the same batch",
                          file=sys.stderr)
        if "posttrain" in summary and "trl" in summary:
            p, t = summary["posttrain"], summary["trl"]
            table.append([name, "**posttrain/TRL**", "", ratio(p[0], t[0]), ratio(p[1], t[1]), ratio(p[2], t[2]), "", "",
                          "", "", "", ""])
    header = ["config", "side", "tokens/step", "s/step", "tokens/s", "peak RSS", "static estimate",
              "model GFLOP/s (of peak)", "executed GFLOP/s (of peak)", "precompute s", "bf16 max Δloss", "steps timed"]
    if mm:
        notes.append(f"float32 matmul peak: {mm['gflops']:.0f} GFLOP/s (2048x2048, median of 10; {mm['threads']} threads)")
    if counts:
        notes.append(f"N = {counts['matmul_params'] / 1e6:.1f}M matmul parameters (decoder + LM head), "
                     f"N_lora = {counts['lora_params'] / 1e6:.2f}M; model FLOP/s = FLOPs/token x tokens/s, "
                     "FLOPs/token: " + "; ".join(formulas) + " (attention's T^2 term not counted)")
        notes.append("static estimate = float32 weights + gradients + AdamW moments of the trainable parameters + "
                     "a reference copy (full, bf16) + the runtime baseline (the RSS of a process that imported torch, "
                     f"transformers and posttrain: {gb(base['peak_rss']) if base else '?'}); peak RSS above it is "
                     "activations, allocator slack and temporary buffers")
    notes.append("model GFLOP/s counts every non-pad token of chosen and rejected (the prompt twice), as the "
                 "targets do; executed GFLOP/s counts the positions posttrain's decoder really runs (each prompt "
                 f"once, no padding: {sum(executed[warmup:steps]) / max(1, len(executed[warmup:steps])):.0f} per step "
                 "on average against the tokens/step column)")
    notes.append("bf16 max Δloss: the largest absolute per-step loss difference between the bf16 run and the same "
                 "library's float32 `full` run (same batches, same schedule)")
    source = f"first {len(rows)} usable pairs of {DATA.name}" if shape == "hh" else f"{len(rows)} pairs of benchmarks/synthetic.py (seed 0)"
    notes.append(f"SmolLM2-135M-Instruct float32, {SHAPES[shape]}: {source}, chat template, "
                 f"max_length {max_length}, 2 pairs per step, {steps} steps, median after {warmup} warm-up steps")
    print_table(f"DPO on {SHAPES[shape].split(' (')[0]}: posttrain vs TRL " + TRL_VERSION, header, table, notes)


def bench_grpo(runner: Runner, args, have_trl: bool, model_path: str, results: dict) -> None:
    from posttrain.data.tasks import arithmetic_rows

    steps, warmup = args.steps or (2 if args.quick else 5), args.warmup
    prompts, max_new, G, micro = (2, 8, 4, 8) if args.quick else (8, 32, 4, 8)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in arithmetic_rows(prompts, seed=0)]
    data = runner.workdir / "grpo_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"model": MODEL, "model_path": model_path, "data": str(data), "steps": steps, "prompts": prompts, "G": G,
            "max_new": max_new, "micro": micro, "vocab": 49152}
    res = results["grpo"] = {}
    if args.side != "trl":
        res["posttrain"] = runner.child("grpo_posttrain", "grpo: posttrain", **spec)
    if have_trl:
        res["trl"] = runner.child("grpo_trl", "grpo: TRL", **spec)
    table, summary = [], {}
    for side in ("posttrain", "trl"):
        r = res.get(side)
        if not r:
            continue
        total, n = median_after(r["step_seconds"], warmup)
        gen, _ = median_after(r["gen_seconds"], warmup)
        samp, _ = median_after(r["sampling_seconds"], warmup)
        summary[side] = (total, gen, total - gen, r["peak_rss"])
        table.append([side, f"{total:.2f}", f"{gen:.2f}", f"{samp:.2f}", f"{total - gen:.2f}", gb(r["peak_rss"]), str(n)])
    if len(summary) == 2:
        p, t = summary["posttrain"], summary["trl"]
        table.append(["**posttrain/TRL**", ratio(p[0], t[0]), ratio(p[1], t[1]), "", ratio(p[2], t[2]), ratio(p[3], t[3]), ""])
    header = ["side", "s/step", "rollout s", "of which sampling s", "training s", "peak RSS", "steps timed"]
    notes = [
        (f"{prompts} arithmetic prompts (posttrain's built-in task, as a user turn), G={G}, {max_new} new tokens, "
         f"temperature 1, beta 0, loss dapo, {micro} completions per micro-batch, reward = posttrain's `accuracy`; "
         f"{steps} steps, median after {warmup} warm-up steps"),
        ("rollout = everything before the gradient work (sampling, rewards, advantages); sampling = the generate call "
         "(posttrain: generate + reward scoring, its `generation_seconds`); training = s/step - rollout"),
    ]
    print_table("GRPO: posttrain vs TRL " + TRL_VERSION, header, table, notes)


def bench_generate(runner: Runner, args, results: dict) -> None:
    prompts, G, max_new = (2, 4, 8) if args.quick else (8, 4, 32)
    reps = 1 if args.quick else 3
    r = runner.child("generate", "generation: posttrain vs model.generate", model=MODEL, prompts=prompts, G=G,
                     max_new=max_new, warmup=1, reps=reps)
    results["generate"] = r
    if not r:
        return
    table, rate = [], {}
    for name, label in (("posttrain", "posttrain HFEngine.generate"), ("generate", "transformers model.generate")):
        s, n = median_after(r["seconds"][name], 1)
        tok = statistics.mean(r["tokens"][name][1:] or r["tokens"][name])
        rate[name] = tok / s
        table.append([label, f"{tok:.0f}", f"{s:.2f}", f"{tok / s:.0f}", str(n)])
    table.append(["**posttrain / model.generate**", "", "", ratio(rate["posttrain"], rate["generate"]), ""])
    notes = [(f"{prompts} arithmetic prompts through the chat template ({min(r['prompt_lengths'])}-"
              f"{max(r['prompt_lengths'])} tokens), G={G} samples each, up to {max_new} new tokens, temperature 1, "
              "top_p 1, top_k 0 (model.generate: do_sample, num_return_sequences=G); tokens = generated tokens up to "
              "and including each row's EOS; both in one process, alternated, medians after 1 warm-up round")]
    print_table("Generation: posttrain's sampler vs transformers' model.generate", ["sampler", "tokens", "s (median)",
                "tokens/s", "rounds timed"], table, notes)


def top_components(profile: dict | None, k: int = 2, failed_after: str | None = None) -> str:
    if failed_after:
        return f"- (profiled step: {failed_after})"
    if not profile:
        return "-"
    ranked = sorted(profile.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in ranked)


def growth_note(label: str, xs: list[float], rss: list[float], unit: str) -> str:
    """Peak RSS added per unit of work between consecutive sizes: constant when memory grows linearly."""
    parts = [f"{(b - a) / (y - x) * 1000 / 1e6:.0f} MB" for (x, a), (y, b) in zip(zip(xs, rss), zip(xs[1:], rss[1:])) if y > x]
    return f"{label}: peak RSS added per 1000 {unit} between consecutive sizes: {', '.join(parts) or '-'}"


def bench_scaling(runner: Runner, args, have_trl: bool, model_path: str, results: dict) -> None:
    """DPO (full, reference copy, float32) at growing max_length and GRPO at growing G, both libraries, each with
    one profiled extra step that says which component dominates."""
    counts = runner.child("flops", "parameter counts", model_path=model_path)
    vocab = counts["vocab"] if counts else 49152
    steps, warmup = args.steps or (2 if args.quick else 4), args.warmup
    sides = [s for s in ("posttrain", "trl") if (s == "trl" and have_trl) or (s == "posttrain" and args.side != "trl")]
    from posttrain.engine import BatchStream

    table, xs, rss = [], {s: [] for s in sides}, {s: [] for s in sides}
    for max_length in args.sizes:
        rows = dpo_rows("scaled", 2 * steps, max_length)
        data = runner.workdir / f"dpo_scaled_{max_length}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        stream = BatchStream(len(rows), 2, 42)
        order = [i for s in range(steps) for i in stream.batch(s)]
        spec = {"model": MODEL, "model_path": model_path, "data": str(data), "order": order, "steps": steps,
                "max_length": max_length, "precompute": False, "lora": False, "bf16": False, "profile": True,
                "vocab": vocab}
        res = results[f"scaling_dpo_{max_length}"] = {}
        for side in sides:
            res[side] = runner.child(f"dpo_{side}", f"scaling dpo {max_length}: {side}", **spec)
        row, speed = [str(max_length)], {}
        for side in ("posttrain", "trl"):
            r = res.get(side)
            if not r:
                row += ["-"] * 4
                continue
            s, _ = median_after(r["step_seconds"], warmup)
            tok = statistics.mean(r["tokens"][warmup:] or r["tokens"])
            speed[side] = (tok / s, r["peak_rss"])
            xs[side].append(tok)
            rss[side].append(r["peak_rss"])
            row += [f"{tok:.0f}", f"{tok / s:.0f}", gb(r["peak_rss"]) + (" (timed steps)" if r.get("failed_after") else ""),
                    top_components(r.get("profile"), failed_after=r.get("failed_after"))]
        both = len(speed) == 2
        row += [ratio(speed["posttrain"][0], speed["trl"][0]) if both else "-",
                ratio(speed["posttrain"][1], speed["trl"][1]) if both else "-"]
        table.append(row)
    header = ["max_length", "posttrain tokens/step", "posttrain tokens/s", "posttrain peak RSS", "posttrain top components",
              "TRL tokens/step", "TRL tokens/s", "TRL peak RSS", "TRL top components", "tokens/s ratio", "RSS ratio"]
    notes = [(f"DPO full fine-tuning with a reference copy, float32, 2 pairs per step, {steps} steps (median after "
              f"{warmup}); pairs from benchmarks/synthetic.py scaled to each max_length (prompt 10-20% of it, each "
              "completion 45-75%, seed 0)"),
             ("top components: share of the profiled step's op time (one extra step after the timed ones, "
              "torch.profiler self CPU time of aten ops; TRL: forward + backward only, posttrain: the whole step incl. "
              "the optimizer)")]
    notes += [growth_note(side, xs[side], rss[side], "tokens/step") for side in sides]
    if args.sizes:
        print_table("Scaling: DPO tokens/s and peak RSS against max_length", header, table, notes)

    from posttrain.data.tasks import arithmetic_rows

    prompts, max_new, micro = (2, 8, 8) if args.quick else (8, 32, 8)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in arithmetic_rows(prompts, seed=0)]
    data = runner.workdir / "grpo_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, xs, rss = [], {s: [] for s in sides}, {s: [] for s in sides}
    for G in args.groups:
        spec = {"model": MODEL, "model_path": model_path, "data": str(data), "steps": steps, "prompts": prompts, "G": G,
                "max_new": max_new, "micro": min(micro, prompts * G), "profile": True, "vocab": vocab}
        res = results[f"scaling_grpo_{G}"] = {}
        for side in sides:
            res[side] = runner.child(f"grpo_{side}", f"scaling grpo G={G}: {side}", **spec)
        row, step = [str(G)], {}
        for side in ("posttrain", "trl"):
            r = res.get(side)
            if not r:
                row += ["-"] * 4
                continue
            total, _ = median_after(r["step_seconds"], warmup)
            gen, _ = median_after(r["gen_seconds"], warmup)
            step[side] = (total, r["peak_rss"])
            xs[side].append(prompts * G)
            rss[side].append(r["peak_rss"])
            row += [f"{total:.2f}", f"{gen:.2f}", gb(r["peak_rss"]), top_components(r.get("profile"))]
        both = len(step) == 2
        row += [ratio(step["posttrain"][0], step["trl"][0]) if both else "-",
                ratio(step["posttrain"][1], step["trl"][1]) if both else "-"]
        table.append(row)
    header = ["G", "posttrain s/step", "posttrain rollout s", "posttrain peak RSS", "posttrain top components",
              "TRL s/step", "TRL rollout s", "TRL peak RSS", "TRL top components", "s/step ratio", "RSS ratio"]
    notes = [(f"GRPO as in the GRPO table ({prompts} prompts, {max_new} new tokens, temperature 1, beta 0, {micro} "
              f"completions per micro-batch) at each G; {steps} steps (median after {warmup}); top components as "
              "above, over the rollout and the training of the profiled step")]
    notes += [growth_note(side, xs[side], rss[side], "completions") for side in sides]
    if args.groups:
        print_table("Scaling: GRPO step time and peak RSS against G", header, table, notes)


def bench_logprobs(runner: Runner, args, results: dict) -> None:
    batch, seq, layers = (1, 256, 2) if args.quick else (4, 1024, 2)
    reps = 2 if args.quick else 5
    table, times = [], {}
    variants = [("naive", "naive full log-softmax", "all (computes every position)"),
                ("chunked_half", "posttrain token_logps", "last half"),
                ("chunked_all", "posttrain token_logps", "all"),
                ("decoder", "decoder only (no LM head)", "-")]
    for key, label, scored in variants:
        r = runner.child("logprobs", f"logprobs: {key}", variant=key, batch=batch, seq=seq, layers=layers,
                         warmup=1, reps=reps)
        results[f"logprobs_{key}"] = r
        if not r:
            continue
        s, n = median_after(r["seconds"], 1)
        times[key] = (s, r["peak_rss"] - r["baseline_rss"])
        table.append([label, scored, f"{s:.3f}", gb(r["peak_rss"] - r["baseline_rss"]), gb(r["peak_rss"]), str(n)])
    if "naive" in times:
        for key in ("chunked_half", "chunked_all"):
            if key in times:
                table.append([f"**{key} / naive**", "", ratio(times[key][0], times["naive"][0]),
                              ratio(times[key][1], times["naive"][1]), "", ""])
                if "decoder" in times:  # the LM head's own share: time and memory above the decoder floor
                    f_s, f_m = times["decoder"]
                    table.append([f"**{key} / naive, above the decoder floor**", "",
                                  ratio(times[key][0] - f_s, times["naive"][0] - f_s),
                                  ratio(times[key][1] - f_m, times["naive"][1] - f_m), "", ""])
    header = ["routine", "scored tokens", "fwd+bwd s (median)", "extra peak RSS", "peak RSS", "reps timed"]
    notes = [
        (f"random LlamaForCausalLM: vocab 49152, hidden 576, {layers} layers, tied head, float32; batch {batch} x {seq} "
         "tokens; forward + backward of sum(log-probs) into every parameter"),
        ("extra peak RSS = the process's peak resident memory during the timed calls (peak mark reset after the "
         "model and inputs were built) minus its resident memory just before them; each routine in its own process, "
         "all with the glibc mmap threshold the posttrain CLI sets; `decoder only` is the floor every routine "
         "shares (the decoder's forward + backward and the parameter gradients, no LM head)"),
    ]
    print_table("Log-prob routine: chunked vs naive", header, table, notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["dpo", "grpo", "logprobs", "generate", "all", "scaling"],
                   help="all = dpo, grpo, logprobs and generate; scaling runs on its own (it is long)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per DPO/GRPO run (default 12 DPO, 5 GRPO)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 2; 1 with --quick)")
    p.add_argument("--dpo-configs", default="full,precompute,lora,bf16",
                   help="comma-separated subset of full,precompute,lora,bf16")
    p.add_argument("--shapes", default="hh,short", help="DPO data shapes: a subset of hh,short")
    p.add_argument("--sizes", default="256,512,1024,2048", help="scaling: DPO max_length values")
    p.add_argument("--groups", default="4,8,16", help="scaling: GRPO num_generations values")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny runs that only check everything works")
    p.add_argument("--side", choices=["both", "posttrain", "trl"], default="both", help="which library to run (default both)")
    p.add_argument("--json", help="also write every raw measurement to this file")
    p.add_argument("--verbose", action="store_true", help="print each child's log")
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child_main(sys.argv[i + 1], sys.argv[i + 2])
        return
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or args.part == "scaling" else 2)
    args.dpo_configs = [c.strip() for c in args.dpo_configs.split(",") if c.strip()]
    bad = [c for c in args.dpo_configs if c not in DPO_CONFIGS]
    if bad:
        p.error(f"--dpo-configs: unknown {bad}; choose from {', '.join(DPO_CONFIGS)}")
    args.shapes = [c.strip() for c in args.shapes.split(",") if c.strip()]
    if set(args.shapes) - set(SHAPES):
        p.error(f"--shapes: unknown {sorted(set(args.shapes) - set(SHAPES))}; choose from {', '.join(SHAPES)}")
    try:
        # Empty skips that half of `scaling`, so its DPO sizes and GRPO groups can run as separate jobs.
        args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        args.groups = [int(x) for x in args.groups.split(",") if x.strip()]
    except ValueError:
        p.error("--sizes and --groups take comma-separated integers")
    if args.quick and args.part == "scaling":
        args.sizes, args.groups = args.sizes[:2], args.groups[:1]
    sys.path.insert(0, str(ROOT))

    have_trl = args.side != "posttrain"
    if have_trl and (reason := trl_status()):
        print(f"NOTE: {reason}", file=sys.stderr)
        have_trl = False
    trl_version = "not run"
    if have_trl:
        from importlib.metadata import version

        trl_version = version("trl")
        if trl_version != TRL_VERSION:
            print(f"NOTE: TRL {trl_version} is installed; the reference numbers are for {TRL_VERSION}", file=sys.stderr)
    model_path = ""
    if args.part in ("dpo", "grpo", "all", "scaling", "generate"):
        from posttrain.models import resolve_model_path

        model_path = resolve_model_path(MODEL)
    import torch
    import transformers

    print(f"posttrain benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"TRL {trl_version}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads{' (QUICK smoke run: numbers mean nothing)' if args.quick else ''}")
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "child"}}
    t0 = time.perf_counter()
    def save() -> None:
        # Rewritten before every child and at the end, so a run stopped halfway (a time limit, a crash) keeps
        # every result measured before the child it was stopped in.
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as tmp:
        runner = Runner(Path(tmp), args.verbose, on_result=save)
        if args.part in ("dpo", "all"):
            bench_dpo(runner, args, have_trl, model_path, results)
        if args.part in ("grpo", "all"):
            bench_grpo(runner, args, have_trl, model_path, results)
        if args.part in ("logprobs", "all"):
            bench_logprobs(runner, args, results)
        if args.part in ("generate", "all"):
            bench_generate(runner, args, results)
        if args.part == "scaling":
            bench_scaling(runner, args, have_trl, model_path, results)
    save()
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
