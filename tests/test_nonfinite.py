"""A NaN/Inf loss or gradient skips the update (weights and optimizer state untouched), is counted in
nonfinite_skipped, is warned about once, and stops the run with a checkpoint after max_nonfinite_steps in a row."""

import copy
import json
import logging

import pytest
import torch
from test_engine import config, examples

from posttrain import cli
from posttrain.algorithms.sft import SFT
from posttrain.config import RunError
from posttrain.engine import Engine
from posttrain.testing import tiny_model


def nan_on(steps, how="loss", micro_batch=None):
    """SFT whose loss (or, with how="grad", only its gradient) is NaN on the given optimizer steps (1-based);
    on every micro-batch of those steps, or on one."""

    class NaNSFT(SFT):
        calls = 0

        def loss(self, model, mb, total_items):
            loss, metrics = super().loss(model, mb, total_items)
            NaNSFT.calls += 1
            step = (NaNSFT.calls - 1) // self.micro_per_step + 1
            which = (NaNSFT.calls - 1) % self.micro_per_step
            if step in steps and micro_batch in (None, which):
                if how == "loss":
                    loss = loss * float("nan")
                else:  # a finite loss whose gradient is NaN: d sqrt(x)/dx at 0 is inf, times 0
                    p = next(q for q in model.parameters() if q.requires_grad)
                    loss = loss + torch.sqrt((p * 0).sum().abs())
            return loss, metrics

    return NaNSFT


class Snapshots:
    """Weights and optimizer state after every step (the engine's, through the on_step_end hook)."""

    def __init__(self):
        self.by_step = {}

    def wrap(self, algo_cls, engine_box):
        snaps = self

        class Watched(algo_cls):
            def on_step_end(self, model, step):
                super().on_step_end(model, step)
                snaps.by_step[step] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                                       copy.deepcopy(engine_box[0].optimizer.state_dict()["state"]))

        return Watched


def train(tmp_path, tokenizer, algo_cls, **kw):
    cfg = config(tmp_path, **{"max_steps": 5, "micro_batch_size": 2, **kw})
    box, snaps = [], Snapshots()
    cls = snaps.wrap(algo_cls, box)
    algo = cls(cfg, tokenizer.pad_token_id)
    algo.micro_per_step = cfg.batch_size // cfg.micro_batch_size
    eng = Engine(cfg, tiny_model(tokenizer, seed=0), tokenizer, algo, examples(tokenizer))
    box.append(eng)
    return eng, snaps


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("how,micro_batch", [("loss", None), ("loss", 1), ("grad", None)])
def test_skipped_steps_leave_weights_and_optimizer_untouched(tmp_path, tokenizer, caplog, how, micro_batch):
    caplog.set_level(logging.WARNING, logger="posttrain")
    eng, snaps = train(tmp_path, tokenizer, nan_on({2, 3}, how, micro_batch))
    eng.train()
    logged = rows(tmp_path)
    assert [r["nonfinite_skipped"] for r in logged] == [0.0, 1.0, 1.0, 0.0, 0.0]
    w1, opt1 = snaps.by_step[1]
    for step in (2, 3):  # exactly the state after step 1: no weight moved, no Adam moment or count changed
        w, opt = snaps.by_step[step]
        assert same(w, w1) and same(opt, opt1), step
    w4, opt4 = snaps.by_step[4]
    assert not same(w4, w1) and all(int(s["step"]) == 2 for s in opt4.values())  # two real updates so far
    assert all(torch.isfinite(p).all() for p in snaps.by_step[5][0].values())
    # the learning rate still follows the step (constant schedule here) and the loss logged is the NaN
    assert logged[1]["loss"] != logged[1]["loss"] or how == "grad"
    warnings = [r for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("step 2: the loss or gradient is not finite")


def test_stops_after_max_nonfinite_steps_in_a_row_with_a_checkpoint(tmp_path, tokenizer):
    eng, snaps = train(tmp_path, tokenizer, nan_on(set(range(2, 100))), max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(RunError) as e:
        eng.train()
    assert str(e.value) == (
        f"stopped at step 4: the loss or gradient was not finite for 3 steps in a row (max_nonfinite_steps); the "
        f"weights of step 1 are saved in {tmp_path / 'checkpoint-4'}. Lower learning_rate, check the data for "
        "extreme rows, or raise max_nonfinite_steps")
    assert [r["nonfinite_skipped"] for r in rows(tmp_path)] == [0.0, 1.0, 1.0, 1.0]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-4" / "trainable.safetensors"))
    w1, _ = snaps.by_step[1]
    assert all(torch.equal(saved[n], w1[n]) for n in saved)
    assert not (tmp_path / "model.safetensors").exists()


def test_nonfinite_streaks_reset_and_zero_means_never_stop(tmp_path, tokenizer):
    eng, _ = train(tmp_path / "a", tokenizer, nan_on({2, 3, 5, 6}), max_steps=7, max_nonfinite_steps=3)
    eng.train()  # two streaks of 2 < 3: finishes
    assert sum(r["nonfinite_skipped"] for r in rows(tmp_path / "a")) == 4
    eng, _ = train(tmp_path / "b", tokenizer, nan_on(set(range(1, 100))), max_steps=4, max_nonfinite_steps=0)
    eng.train()
    assert [r["nonfinite_skipped"] for r in rows(tmp_path / "b")] == [1.0] * 4


def test_cli_exit_1_on_a_diverged_run(tmp_path, monkeypatch, capsys):
    import posttrain.algorithms.sft as sft

    def diverge(cfg):
        raise RunError("stopped at step 4: the loss or gradient was not finite for 3 steps in a row")

    monkeypatch.setattr(sft, "run", diverge)
    assert cli.main(["sft", f"output_dir={tmp_path / 'o'}"]) == 1
    assert capsys.readouterr().err == ("posttrain: error: stopped at step 4: the loss or gradient was not finite for "
                                       "3 steps in a row\n")
