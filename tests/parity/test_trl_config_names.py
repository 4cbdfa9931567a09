"""TRL's config classes themselves against `posttrain.trl_compat`'s tables: every option of TrainingArguments,
each trainer config, ModelConfig and the script arguments (TRL 1.16) is classified (a posttrain key of that
command, an alias, a derived key, ignored or unsupported), loads at TRL's default value, and the defaults the
tables record are TRL's. The schedule and step-fraction rules are checked against transformers' own code."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from transformers import TrainingArguments
from transformers.optimization import get_scheduler
from trl import DPOConfig, GRPOConfig, KTOConfig, ModelConfig, RewardConfig, ScriptArguments, SFTConfig
from trl.experimental.online_dpo import OnlineDPOConfig
from trl.scripts.grpo import GRPOScriptArguments

from posttrain.algorithms import dpo, grpo, kto, online_dpo, rm, sft
from posttrain.config import UserError, load_config
from posttrain.engine import make_scheduler
from posttrain.trl_compat import ALIASES, DERIVED, IGNORED, LORA_DEFAULTS, UNSUPPORTED, Quiet, applies

TRAINERS = {DPOConfig: dpo.Config, GRPOConfig: grpo.Config, KTOConfig: kto.Config, RewardConfig: rm.Config,
            SFTConfig: sft.Config, OnlineDPOConfig: online_dpo.Config}
SHARED = (ModelConfig, ScriptArguments)


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def cases():
    for trl_cls, ours in TRAINERS.items():
        classes = (trl_cls, *SHARED, *((GRPOScriptArguments,) if trl_cls is GRPOConfig else ()))
        for cls in classes:
            for f in dataclasses.fields(cls):
                yield pytest.param(ours, f, id=f"{trl_cls.__name__}.{f.name}")


def kind(ours, name):
    fields = {f.name for f in dataclasses.fields(ours)}
    if name in fields:
        return "posttrain"
    if name in ALIASES and applies(ALIASES[name].target, fields):
        return "alias"
    for table, label in ((DERIVED, "derived"), (IGNORED, "ignored"), (UNSUPPORTED, "unsupported")):
        if name in table:
            return label
    return None


@pytest.mark.parametrize("ours, field", list(cases()))
def test_every_trl_option_is_classified_and_loads_at_its_default(ours, field, tmp_path, caplog):
    assert kind(ours, field.name) is not None, f"{field.name}: not in posttrain.trl_compat's tables"
    value = _default(field)
    if value is dataclasses.MISSING or field.name in ("output_dir",):
        return
    if hasattr(value, "value"):  # enums (SchedulerType, IntervalStrategy, ...) are strings in a YAML
        value = value.value
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({field.name: value}))
    try:
        load_config(ours, str(path), [], world_size=1)
    except UserError as e:
        # The only defaults posttrain cannot take are TRL's None for a posttrain number (no truncation, ...).
        assert value is None and "expected" in str(e), str(e)
    assert "ignored" not in caplog.text  # a TRL default never warns


def test_recorded_defaults_are_trls():
    defaults = {}
    for cls in (TrainingArguments, *TRAINERS, *SHARED, GRPOScriptArguments):
        for f in dataclasses.fields(cls):
            value = _default(f)
            value = getattr(value, "value", value)
            if f.name in defaults and cls in TRAINERS and defaults[f.name] != value:
                continue  # a trainer overriding TrainingArguments' default (e.g. logging_steps): keep the first
            defaults.setdefault(f.name, value)
    overridden = {f.name: getattr(_default(f), "value", _default(f)) for c in TRAINERS for f in dataclasses.fields(c)}
    for name, (default, _) in IGNORED.items():
        if name in defaults:
            quiet = default if isinstance(default, Quiet) else (default,)
            assert defaults[name] in quiet and overridden.get(name, defaults[name]) in quiet, name
    for name, default in LORA_DEFAULTS.items():
        assert defaults[name] == default, name
    for name, (accepted, _) in UNSUPPORTED.items():
        if name in defaults and name != "loss_type":
            assert defaults[name] in accepted, f"UNSUPPORTED[{name!r}] does not accept TRL's default {defaults[name]!r}"


@pytest.mark.parametrize("kind_name, warmup", [("linear", 3), ("cosine", 2), ("linear", 0), ("cosine", 0)])
def test_schedules_decay_as_transformers(kind_name, warmup):
    """After warmup posttrain's linear and cosine schedules are transformers' (get_scheduler) step for step.
    Deliberate difference during warmup: transformers' factor is step / warmup (the first step at lr 0),
    posttrain's (step + 1) / (warmup + 1) (every step moves the weights); both reach the peak after `warmup`."""
    total = 12

    def lrs(scheduler, optimizer):
        out = []
        for _ in range(total):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    opt_a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt_b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = lrs(make_scheduler(opt_a, kind_name, total, warmup), opt_a)
    theirs = lrs(get_scheduler(kind_name, opt_b, num_warmup_steps=warmup, num_training_steps=total), opt_b)
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)
    assert ours[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])
    assert theirs[:warmup] == pytest.approx([s / warmup for s in range(warmup)])


@pytest.mark.parametrize("fraction, total", [(0.1, 95), (0.05, 10), (0.5, 7), (0.33, 100)])
def test_step_fractions_round_as_transformers(fraction, total, tmp_path, tokenizer):
    from posttrain.algorithms.sft import SFT
    from posttrain.engine import Engine

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=fraction, report_to="none")
    cfg = sft.Config(max_steps=total, output_dir=str(tmp_path))
    engine = Engine(cfg, torch.nn.Linear(1, 1), tokenizer, SFT(cfg, 0), [0])
    assert engine.steps_of(fraction) == args.get_warmup_steps(total) == math.ceil(fraction * total)
