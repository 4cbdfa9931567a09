"""The training engine, driven by the SFT algorithm on the tiny model: accumulation invariance, resume,
checkpoints, schedules, metrics, final save, LoRA."""

import json
import math
import os
import pickle
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.algorithms.sft import SFT, Config
from posttrain.config import LoraConfig
from posttrain.data.tokenize import collate, encode_sft_row
from posttrain.engine import Engine, Global, Max, Mean, Min, Prepared, Sum, make_scheduler, reduce_metrics
from posttrain.logprobs import naive_token_logps
from posttrain.models import apply_lora
from posttrain.testing import tiny_model

PAIRS = [
    ("What is 12 + 7?", " The answer is 19."),
    ("Human: How do I bake bread?", " Mix flour, water, salt and yeast, then bake."),
    ("2 + 2 =", " 4"),
    ("Reply with only the final number. 48 + 1 =", " 49"),
    ("Natalia sold clips to 48 of her friends in April.", " She sold 48."),
    ("user", " You are a helpful assistant."),
    ("What is 7 * 3?", " 21"),
    ("the a an", " is of to and in that it for you with on as are"),
]


def examples(tok, pairs=PAIRS):
    return [encode_sft_row(tok, {"prompt": p, "completion": c}, max_length=64, max_prompt_length=None,
                           completion_only=True, assistant_only=True) for p, c in pairs]


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, batch_size=4, micro_batch_size=2, learning_rate=1e-3,
                max_grad_norm=0.0, lr_scheduler="constant", progress=False, seed=0)
    cfg = Config(**{**base, **kw})
    cfg.validate()
    return cfg


def run(cfg, tok, model, exs, algo_cls=SFT, eval_examples=None):
    return Engine(cfg, model, tok, algo_cls(cfg, tok.pad_token_id), exs, eval_examples).train()


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def mean_nll(model, tok, exs):
    b = collate(exs, tok.pad_token_id)
    with torch.no_grad():
        lp = naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask)
    return float(-lp.sum() / b.loss_mask[:, 1:].sum())


def test_gradient_accumulation_invariance(tmp_path, tokenizer):
    """Global batch 4 (examples with 3 to 26 completion tokens, EOS included) as 1x4, 2x2 and 4x1 micro-batches: the
    loss is normalised by the step's global token count, so the steps and weights agree to float error."""
    exs = examples(tokenizer)
    counts = sorted(sum(e.mask) for e in exs)
    assert counts[0] == 3 and counts[-1] == 26  # very unequal lengths: a per-micro-batch mean would differ
    results = {}
    for micro in (1, 2, 4):
        model = tiny_model(tokenizer, seed=0)
        out = tmp_path / f"m{micro}"
        run(config(out, micro_batch_size=micro), tokenizer, model, exs)
        results[micro] = ([r["loss"] for r in metrics(out)], dict(model.named_parameters()))
    losses4, params4 = results[4]
    for micro in (1, 2):
        losses, params = results[micro]
        assert losses == pytest.approx(losses4, abs=1e-6)
        for name, p in params.items():
            assert torch.allclose(p, params4[name], atol=1e-6, rtol=0), (micro, name)
    # The weights did move (2 Adam steps of ~lr each).
    fresh = dict(tiny_model(tokenizer, seed=0).named_parameters())
    assert (params4["model.layers.0.mlp.up_proj.weight"] - fresh["model.layers.0.mlp.up_proj.weight"]).abs().max() > 5e-4


def test_metrics_rows_and_first_step_values(tmp_path, tokenizer):
    """Step 1's loss is the mean NLL over every completion token of its 4 examples under the initial
    weights, and its grad_norm is the norm of that loss's gradient (clipping off)."""
    exs = examples(tokenizer)
    model = tiny_model(tokenizer, seed=0)
    engine = Engine(config(tmp_path, max_steps=4, lr_scheduler="linear", warmup_steps=1), model, tokenizer,
                    SFT(config(tmp_path), tokenizer.pad_token_id), exs)
    first = [exs[i] for i in engine.stream.batch(0)]
    ref_model = tiny_model(tokenizer, seed=0)
    expected_loss = mean_nll(ref_model, tokenizer, first)
    b = collate(first, tokenizer.pad_token_id)
    lp = naive_token_logps(ref_model, b.input_ids, b.attention_mask, b.loss_mask)
    (-lp.sum() / b.loss_mask[:, 1:].sum()).backward()
    expected_norm = math.sqrt(sum(float((p.grad**2).sum()) for p in ref_model.parameters()))

    engine.train()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0]  # 8 examples, 4 per step
    for r in rows:
        assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "nll"} <= set(r)
        assert r["tokens_per_second"] > 0
    assert rows[0]["loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert rows[0]["nll"] == pytest.approx(expected_loss, abs=1e-5)
    assert rows[0]["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    # warmup 1 of 4 steps then linear decay: factors (0+1)/(1+1), 1, 1 - 1/3, 1 - 2/3.
    assert [r["learning_rate"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert (tmp_path / "config.yaml").exists()


def test_schedules():
    def lrs(kind, total, warmup):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, kind, total, warmup)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert lrs("constant", 4, 0) == [1, 1, 1, 1]
    assert lrs("linear", 5, 0) == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    # Warmup w steps: (step + 1) / (w + 1), then decay over the remaining total - w steps.
    assert lrs("linear", 6, 2) == pytest.approx([1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25])
    assert lrs("constant", 4, 3) == pytest.approx([0.25, 0.5, 0.75, 1])
    # cosine: 0.5 * (1 + cos(pi * k / 4)) for k = 0..3 after a 1-step warmup of a 5-step run.
    assert lrs("cosine", 5, 1) == pytest.approx([0.5, 1, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])


def test_warmup_ratio_rounds_up(tmp_path, tokenizer):
    # ceil(0.25 * 3) = 1 warmup step: lr factors 1/2, then linear 1, 1/2.
    run(config(tmp_path, max_steps=3, warmup_ratio=0.25, lr_scheduler="linear"), tokenizer,
        tiny_model(tokenizer), examples(tokenizer))
    assert [r["learning_rate"] for r in metrics(tmp_path)] == pytest.approx([5e-4, 1e-3, 5e-4])


class InterruptAtStep2(SFT):
    """Sends the process a SIGINT after step 2, as Ctrl-C would."""

    def on_step_end(self, model, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupt_and_resume_gives_the_same_weights(tmp_path, tokenizer):
    exs = examples(tokenizer)
    straight = tiny_model(tokenizer, seed=0)
    run(config(tmp_path / "a", max_steps=4, lr_scheduler="linear", max_grad_norm=1.0), tokenizer, straight, exs)

    out = tmp_path / "b"
    with pytest.raises(SystemExit) as e:
        run(config(out, max_steps=4, lr_scheduler="linear", max_grad_norm=1.0), tokenizer,
            tiny_model(tokenizer, seed=0), exs, algo_cls=InterruptAtStep2)
    assert e.value.code == 128 + signal.SIGINT
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text()) == {"step": 2, "epoch": 1.0}
    assert not (out / "model.safetensors").exists()  # no final model after an interruption

    # A fresh process: a differently initialised model, a new engine; everything comes from the checkpoint.
    resumed = tiny_model(tokenizer, seed=123)
    result = run(config(out, max_steps=4, lr_scheduler="linear", max_grad_norm=1.0, resume_from_checkpoint="latest"),
                 tokenizer, resumed, exs)
    assert result.steps == 4
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "grad_norm"):
        assert [r[key] for r in metrics(out)] == pytest.approx([r[key] for r in metrics(tmp_path / "a")], abs=1e-6)
    ref = dict(straight.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, ref[name], atol=1e-6, rtol=0), name


def test_save_total_limit(tmp_path, tokenizer):
    run(config(tmp_path, max_steps=4, save_steps=1, save_total_limit=2), tokenizer, tiny_model(tokenizer),
        examples(tokenizer))
    names = sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-3", "checkpoint-4"]  # no leftover .tmp folders either
    files = sorted(p.name for p in (tmp_path / "checkpoint-4").iterdir())
    assert files == ["optimizer.pt", "rng.pt", "scheduler.pt", "trainable.safetensors", "trainer_state.json"]


def test_resume_from_explicit_folder_and_bad_folder(tmp_path, tokenizer):
    from posttrain.config import UserError

    exs = examples(tokenizer)
    run(config(tmp_path, max_steps=2, save_steps=1), tokenizer, tiny_model(tokenizer), exs)
    cfg = config(tmp_path, max_steps=3, resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert run(cfg, tokenizer, tiny_model(tokenizer), exs).steps == 3
    # Resumed at step 1: the old run's step-2 row is dropped, the new steps 2-3 appended.
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    with pytest.raises(UserError, match="is not a checkpoint folder"):
        run(config(tmp_path, resume_from_checkpoint=str(tmp_path)), tokenizer, tiny_model(tokenizer), exs)


def test_final_model_loads_with_plain_transformers(tmp_path, tokenizer):
    exs = examples(tokenizer)
    model = tiny_model(tokenizer, seed=0)
    run(config(tmp_path), tokenizer, model, exs, eval_examples=exs[:3])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = collate(exs, tokenizer.pad_token_id).input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert (tmp_path / "tokenizer.json").exists()
    # The final eval row: mean NLL of the 3 eval examples under the final weights.
    last = metrics(tmp_path)[-1]
    assert last["step"] == 2 and last["eval/loss"] == pytest.approx(mean_nll(model, tokenizer, exs[:3]), abs=1e-5)


def _lora_model(tokenizer, merge):
    model = tiny_model(tokenizer, seed=0)
    cfg = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], merge=merge)
    return apply_lora(model, cfg), cfg


def test_lora_trains_only_adapters_and_saves_the_adapter(tmp_path, tokenizer):
    from peft import PeftModel

    model, lora = _lora_model(tokenizer, merge=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(config(tmp_path, lora=lora, learning_rate=1e-2), tokenizer, model, examples(tokenizer))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable and "lora_B" in n:
            assert not torch.equal(p, before[n]), n  # B starts at zero and moves
        elif n not in trainable:
            assert torch.equal(p, before[n]), n
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_model(tokenizer, seed=0), tmp_path)
    ids = collate(examples(tokenizer), tokenizer.pad_token_id).input_ids
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)


def test_lora_merge_saves_a_plain_model(tmp_path, tokenizer):
    model, lora = _lora_model(tokenizer, merge=True)
    ids = collate(examples(tokenizer), tokenizer.pad_token_id).input_ids
    captured = {}

    class Capture(SFT):
        def on_step_end(self, m, step):
            if step == 2:
                with torch.no_grad():
                    captured["logits"] = m(ids).logits

    run(config(tmp_path, lora=lora, learning_rate=1e-2), tokenizer, model, examples(tokenizer), algo_cls=Capture)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, captured["logits"], atol=1e-5)


# ------------------------------------------------------------------------------------ declared metrics


def test_declared_metrics_reduce_by_their_kind():
    """Two micro-batches' metrics by hand: a pair-weighted mean, a sum, the extremes, a step-wide value; a mean
    over nothing (weight 0) adds nothing, and a name whose weights are all 0 is left out."""
    parts = [
        {"acc": Mean(0.5, 2), "n": Sum(2), "lo": Min(-1.0), "hi": Max(3.0), "z": Global(0.25), "d": Mean(4.0, 0)},
        {"acc": Mean(1.0, 6), "n": Sum(6), "lo": Min(-4.0), "hi": Max(1.0), "z": Global(0.25), "d": Mean(2.0, 1),
         "none": Mean(9.0, 0)},
    ]
    assert reduce_metrics(parts) == {"acc": (0.5 * 2 + 1.0 * 6) / 8, "n": 8.0, "lo": -4.0, "hi": 3.0, "z": 0.25,
                                     "d": 2.0}
    # A metric is a number to whoever reads it, and survives a checkpoint with its reduction.
    m = Mean(0.5, 2)
    assert m == 0.5 and m + 1 == 1.5 and pytest.approx(0.5) == m
    back = pickle.loads(pickle.dumps(Prepared([1, 2], {"m": m, "s": Sum(3)})))
    assert back == [1, 2] and back.metrics["m"].weight == 2.0 and back.metrics["s"].kind == "sum"
    with pytest.raises(TypeError, match="does not declare its reduction"):
        reduce_metrics([{"plain": 0.5}])
    with pytest.raises(TypeError, match="reduced as sum and as max"):
        reduce_metrics([{"x": Sum(1)}, {"x": Max(2)}])


class _Counting(SFT):
    """SFT plus a metric of every kind, a prepared-batch metric and a derived one."""

    def prepare(self, model, examples):
        return Prepared(super().prepare(model, examples), {"prepared_examples": Sum(len(examples))})

    def loss(self, model, mb, total_items):
        loss, m = super().loss(model, mb, total_items)
        lengths = mb.attention_mask.sum(-1).float()
        return loss, {**m, "rows": Sum(len(lengths)), "shortest": Min(lengths.min()), "longest": Max(lengths.max()),
                      "mean_length": Mean(lengths.mean(), len(lengths))}

    def derived_metrics(self, step):
        return {"rows_per_prepared_example": step["rows"] / step["prepared_examples"]}


def test_engine_reduces_declared_metrics_once_per_step(tmp_path, tokenizer):
    """4 examples a step in micro-batches of 1: every logged value is the step's, not the last micro-batch's."""
    exs = examples(tokenizer)
    cfg = config(tmp_path, micro_batch_size=1, max_steps=1)
    run(cfg, tokenizer, tiny_model(tokenizer), exs, algo_cls=_Counting)
    [row] = metrics(tmp_path)
    step = Engine(cfg, tiny_model(tokenizer), tokenizer, SFT(cfg, 0), exs)._step_examples(0)
    lengths = [len(e.input_ids) for e in step]
    assert row["rows"] == row["prepared_examples"] == 4 and row["rows_per_prepared_example"] == 1.0
    assert (row["shortest"], row["longest"]) == (min(lengths), max(lengths)) and min(lengths) != max(lengths)
    assert row["mean_length"] == pytest.approx(sum(lengths) / 4)
    assert row["loss"] > 0 and "nll" in row


# ---------------------------------------------------------------------------------------------------
# TRL's run-management options: fractions of the run, strategies, the best checkpoint, dtype


def test_step_counts_below_one_are_fractions_of_the_run(tmp_path, tokenizer):
    """transformers 5: warmup_steps / logging_steps / eval_steps / save_steps below 1 are a fraction of the run's
    optimizer steps, rounded up. 10 steps: warmup ceil(0.15 x 10) = 2, a row every 3 (and the last), an eval every
    5 (the last one is the final eval), a checkpoint every ceil(0.4 x 10) = 4."""
    exs = examples(tokenizer)
    cfg = config(tmp_path, max_steps=10, lr_scheduler="linear", warmup_steps=0.15, logging_steps=0.3, eval_steps=0.5,
                 save_steps=0.4)
    engine = Engine(cfg, tiny_model(tokenizer), tokenizer, SFT(cfg, tokenizer.pad_token_id), exs, exs[:2])
    assert [engine.steps_of(x) for x in (0.15, 0.3, 0.5, 0.4, 3, 0)] == [2, 3, 5, 4, 3, 0]
    engine.train()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [3, 5, 6, 9, 10, 10]
    assert [r["step"] for r in rows if "eval/loss" in r] == [5, 10]
    # 2 warmup steps, then linear decay over 8: step 3 at the peak, step 6 three decay steps later.
    assert [r["learning_rate"] for r in rows[:3]] == pytest.approx([1e-3, 1e-3 * (1 - 2 / 8), 1e-3 * (1 - 3 / 8)])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_epoch_and_no_strategies(tmp_path, tokenizer):
    """8 examples, 4 a step: epochs end after steps 2, 4 and 6."""
    exs = examples(tokenizer)
    run(config(tmp_path / "a", max_steps=6, logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch"),
        tokenizer, tiny_model(tokenizer), exs, eval_examples=exs[:2])
    rows = metrics(tmp_path / "a")
    assert [(r["step"], "eval/loss" in r) for r in rows] == [(2, True), (4, True), (6, False), (6, True)]
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    run(config(tmp_path / "b", max_steps=3, logging_strategy="no", eval_strategy="no", eval_steps=1, save_strategy="no",
               save_steps=1), tokenizer, tiny_model(tokenizer), exs, eval_examples=exs[:2])
    assert [r["step"] for r in metrics(tmp_path / "b")] == [3]  # the last step only, no eval at all
    assert not list((tmp_path / "b").glob("checkpoint-*"))


def test_load_best_model_at_end_exports_the_best_checkpoint(tmp_path, tokenizer):
    """Ranked by the largest eval loss (greater_is_better: true), the best eval is the first one, at step 2: the
    exported model must hold exactly checkpoint-2's weights, not the last step's; save_total_limit keeps it."""
    exs = examples(tokenizer)
    cfg = config(tmp_path, max_steps=6, eval_steps=2, eval_dataset="given", load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=True, save_steps=1, save_total_limit=1)
    model = tiny_model(tokenizer)
    run(cfg, tokenizer, model, exs, eval_examples=exs[:4])
    losses = {r["step"]: r["eval/loss"] for r in metrics(tmp_path) if "eval/loss" in r}
    assert list(losses) == [2, 4, 6] and max(losses, key=losses.get) == 2  # training lowers the eval loss
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best"] == {"metric": pytest.approx(losses[2]), "step": 2}
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-6" / "trainable.safetensors"))
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path).named_parameters())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(exported[name], best[name]) and not torch.equal(best[name], last[name])
    # The exported model scores the best eval loss again.
    assert mean_nll(AutoModelForCausalLM.from_pretrained(tmp_path), tokenizer, exs[:4]) == pytest.approx(losses[2], abs=1e-5)

    # The default ranking (lower eval loss is better) keeps the last evaluation: no checkpoint is needed for it.
    out = tmp_path / "default"
    run(config(out, max_steps=4, eval_steps=2, eval_dataset="given", load_best_model_at_end=True), tokenizer,
        tiny_model(tokenizer), exs, eval_examples=exs[:4])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_best_model_options_are_checked(tmp_path, tokenizer):
    from posttrain.config import UserError

    with pytest.raises(UserError, match="load_best_model_at_end needs an eval_dataset"):
        config(tmp_path, load_best_model_at_end=True)
    with pytest.raises(UserError, match="save_strategy=best needs an eval_dataset"):
        config(tmp_path, save_strategy="best")
    cfg = config(tmp_path, eval_steps=1, eval_dataset="given", metric_for_best_model="rewards/accuracies",
                 save_strategy="best")
    with pytest.raises(UserError, match="metric_for_best_model: 'rewards/accuracies' is not an eval metric of this run "
                                        r"\(it reports: loss\)"):
        run(cfg, tokenizer, tiny_model(tokenizer), examples(tokenizer), eval_examples=examples(tokenizer)[:2])
    assert config(tmp_path, metric_for_best_model="eval/rewards/accuracies").best_metric() == ("eval/rewards/accuracies", True)
    assert config(tmp_path).best_metric() == ("eval/loss", False)


def test_dtype_bfloat16_loads_trains_and_saves_bfloat16(tmp_path, tiny_model_dir):
    """dtype: bfloat16 (TRL's model argument): the weights are loaded, updated and saved in bfloat16, and training
    lowers the loss."""
    from posttrain.algorithms import sft as sft_module
    from posttrain.config import load_config

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    cfg = load_config(sft_module.Config, None, [f"model={tiny_model_dir}", f"dataset={data}", "dtype=bfloat16",
                                                "max_steps=6", "batch_size=8", "micro_batch_size=8", "learning_rate=3e-3",
                                                f"output_dir={tmp_path}/run", "progress=false", "warmup_ratio=0"])
    sft_module.run(cfg)
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert {p.dtype for p in original.parameters()} == {torch.float32}
