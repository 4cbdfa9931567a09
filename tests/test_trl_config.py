"""TRL configs run unchanged: TRL's option names (TrainingArguments, the trainer configs, TRL's script and model
arguments) translate into posttrain's keys (`posttrain.trl_compat`), and `posttrain convert-config` prints the
result. The YAMLs below are the examples of TRL 1.16's own scripts and docs (trl/scripts/*.py), written as a
TRL user keeps them in a file. Checking the tables against TRL's classes themselves: tests/parity/."""

import logging
import subprocess
import sys

import pytest
import yaml

from posttrain import cli
from posttrain.algorithms import dpo, grpo, kto, online_dpo, ppo, rm, sft
from posttrain.config import LoraConfig, UserError, load_config
from posttrain.trl_compat import (
    ALIASES,
    IGNORED,
    NATIVE_VALUES,
    THINK_FORMAT_PATTERN,
    UNSUPPORTED,
    Quiet,
    TRLConfigError,
    translate,
)

DPO_FULL = """\
dataset_name: trl-lib/ultrafeedback_binarized
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
learning_rate: 5.0e-7
num_train_epochs: 1
per_device_train_batch_size: 2
max_steps: 1000
gradient_accumulation_steps: 8
eval_strategy: steps
eval_steps: 50
output_dir: Qwen2-0.5B-DPO
remove_unused_columns: false
"""
DPO_LORA = DPO_FULL.replace("5.0e-7", "5.0e-6") + "use_peft: true\nlora_r: 32\nlora_alpha: 16\n"

SFT_FULL = """\
model_name_or_path: Qwen/Qwen2-0.5B
dataset_name: trl-lib/Capybara
learning_rate: 2.0e-5
num_train_epochs: 1
packing: true
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
eos_token: <|im_end|>
eval_strategy: steps
eval_steps: 100
output_dir: Qwen2-0.5B-SFT
push_to_hub: true
"""

KTO_FULL = """\
dataset_name: trl-lib/kto-mix-14k
model_name_or_path: trl-lib/qwen1.5-1.8b-sft
per_device_train_batch_size: 16
num_train_epochs: 1
learning_rate: 5.0e-7
lr_scheduler_type: cosine
gradient_accumulation_steps: 1
eval_steps: 500
output_dir: kto-aligned-model
warmup_steps: 0.1
logging_first_step: true
"""
KTO_QLORA = KTO_FULL + "use_peft: true\nload_in_4bit: true\nlora_target_modules: all-linear\nlora_r: 16\nlora_alpha: 16\n"

REWARD = """\
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
dataset_name: trl-lib/ultrafeedback_binarized
output_dir: Qwen2-0.5B-Reward-LoRA
per_device_train_batch_size: 8
num_train_epochs: 1
learning_rate: 1.0e-4
eval_strategy: steps
eval_steps: 50
max_length: 2048
use_peft: true
lora_task_type: SEQ_CLS
lora_r: 32
lora_alpha: 16
"""

GRPO_DOC = """\
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
dataset_name: trl-lib/DeepMath-103K
reward_funcs: [accuracy_reward, think_format_reward]
output_dir: Qwen2-0.5B-GRPO
learning_rate: 1.0e-6
lr_scheduler_type: constant_with_warmup
warmup_steps: 0.05
per_device_train_batch_size: 8
gradient_accumulation_steps: 4
num_generations: 8
max_completion_length: 1024
beta: 0.0
epsilon_high: 0.28
loss_type: dapo
scale_rewards: false
mask_truncated_completions: true
bf16: true
gradient_checkpointing: true
use_vllm: true
vllm_mode: colocate
logging_steps: 10
save_strategy: steps
save_steps: 100
report_to: none
log_completions: true
"""


def load(cls, text, tmp_path, overrides=(), world_size=1):
    path = tmp_path / "trl.yaml"
    path.write_text(text)
    return load_config(cls, str(path), list(overrides), world_size=world_size)


def test_dpo_example_resolves_to_the_same_batch_schedule_and_loss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        cfg = load(dpo.Config, DPO_FULL, tmp_path)
    # 2 pairs per device x 8 accumulation steps x 1 process = 16 pairs per optimizer step.
    assert (cfg.batch_size, cfg.micro_batch_size) == (16, 2)
    assert (cfg.learning_rate, cfg.num_epochs, cfg.max_steps, cfg.lr_scheduler) == (5e-7, 1, 1000, "linear")
    assert (cfg.model, cfg.dataset, cfg.output_dir) == ("Qwen/Qwen2-0.5B-Instruct", "trl-lib/ultrafeedback_binarized",
                                                        "Qwen2-0.5B-DPO")
    # TRL's script evaluates on dataset[dataset_test_split] (default "test") when eval_strategy is not "no".
    assert (cfg.eval_dataset, cfg.eval_split, cfg.eval_strategy, cfg.eval_steps) == (
        "trl-lib/ultrafeedback_binarized", "test", "steps", 50)
    assert (cfg.loss_type, cfg.beta, cfg.f_divergence, cfg.lora) == (["sigmoid"], 0.1, "reverse_kl", None)
    assert caplog.text == ""  # remove_unused_columns: false is a TRL default too (GRPO's), so no warning
    # Launched on 4 processes, the same file means a 4x larger global batch.
    assert load(dpo.Config, DPO_FULL, tmp_path, world_size=4).batch_size == 64


def test_dpo_lora_example(tmp_path):
    cfg = load(dpo.Config, DPO_LORA, tmp_path)
    assert cfg.lora == LoraConfig(r=32, alpha=16.0) and cfg.learning_rate == 5e-6 and cfg.batch_size == 16


def test_sft_example_warns_once_per_meaningless_option(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        cfg = load(sft.Config, SFT_FULL, tmp_path)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.packing, cfg.learning_rate) == (16, 2, True, 2e-5)
    assert cfg.eval_dataset == "trl-lib/Capybara" and cfg.eval_steps == 100
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].endswith("trl.yaml:8: eos_token: ignored (the chat template's own end-of-turn token ends completions)")
    assert warnings[1].endswith("trl.yaml:12: push_to_hub: ignored (no uploads; the model is saved to output_dir)")


def test_kto_example_and_its_qlora_variant(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        cfg = load(kto.Config, KTO_FULL, tmp_path)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.lr_scheduler, cfg.warmup_steps) == (16, 16, "cosine", 0.1)
    # eval_steps without eval_strategy and without an eval set: TRL evaluates nothing, and neither does posttrain.
    assert cfg.eval_dataset is None and cfg.eval_steps == 500
    assert "logging_first_step: ignored" in caplog.text
    with pytest.raises(UserError, match=r"trl.yaml:13: load_in_4bit: True is not supported by posttrain \(no quantized"):
        load(kto.Config, KTO_QLORA, tmp_path)


def test_reward_example(tmp_path):
    cfg = load(rm.Config, REWARD, tmp_path)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.max_length, cfg.learning_rate) == (8, 8, 2048, 1e-4)
    assert cfg.lora.r == 32 and cfg.lora.alpha == 16 and cfg.lora.merge  # reward models are saved merged


def test_grpo_example_divides_completions_by_num_generations(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        cfg = load(grpo.Config, GRPO_DOC, tmp_path)
    # TRL counts completions: 8 per device x 4 accumulation steps = 32 completions = 4 prompts x 8 generations.
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.num_generations) == (4, 8, 8)
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.format_pattern == THINK_FORMAT_PATTERN
    assert (cfg.scale_rewards, cfg.loss_type, cfg.epsilon_high, cfg.mask_truncated_completions) == ("none", "dapo", 0.28, True)
    assert (cfg.lr_scheduler, cfg.warmup_steps, cfg.bf16, cfg.report_to) == ("constant", 0.05, True, ["none"])
    assert (cfg.save_strategy, cfg.save_steps, cfg.logging_steps, cfg.log_completions) == ("steps", 100, 10, True)
    assert "use_vllm: ignored" in caplog.text and "vllm_mode" not in caplog.text  # vllm_mode is TRL's default
    assert load(grpo.Config, GRPO_DOC, tmp_path, world_size=2).batch_size == 8
    with pytest.raises(UserError, match=r"trl.yaml:8: per_device_train_batch_size x \S+trl.yaml:9: "
                                        r"gradient_accumulation_steps x 1 process = 12 completions is not divisible by "
                                        r"num_generations 8"):
        load(grpo.Config, GRPO_DOC.replace("gradient_accumulation_steps: 4", "gradient_accumulation_steps: 1")
             .replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 12"), tmp_path)


def test_contradictory_names_are_an_error_naming_both(tmp_path):
    with pytest.raises(UserError) as e:
        load(sft.Config, "num_train_epochs: 3\nseed: 1\nnum_epochs: 1\n", tmp_path)
    assert str(e.value) == (f"{tmp_path}/trl.yaml:1: num_train_epochs = 3 contradicts {tmp_path}/trl.yaml:3: num_epochs = 1 "
                            "(two names for one setting); keep one of them")
    assert load(sft.Config, "num_train_epochs: 2\nnum_epochs: 2.0\n", tmp_path).num_epochs == 2  # agreeing is fine
    with pytest.raises(UserError, match="trl.yaml:3: batch_size = 16 contradicts .*trl.yaml:1: per_device_train_batch_size"
                                        " x .*trl.yaml:2: gradient_accumulation_steps x 1 process = 8 "):
        load(sft.Config, "per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\nbatch_size: 16\n", tmp_path)
    with pytest.raises(UserError, match="use_peft = False contradicts the lora block"):
        load(sft.Config, "use_peft: false\nlora:\n  r: 8\n", tmp_path)


def test_the_command_line_beats_the_file_under_either_name(tmp_path):
    cfg = load(sft.Config, "num_train_epochs: 3\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 4\n",
               tmp_path, ["num_epochs=1", "gradient_accumulation_steps=2"])
    assert (cfg.num_epochs, cfg.batch_size, cfg.micro_batch_size) == (1, 4, 2)
    cfg = load(sft.Config, "num_epochs: 3\nbatch_size: 32\n", tmp_path, ["num_train_epochs=2", "per_device_train_batch_size=4"])
    assert (cfg.num_epochs, cfg.batch_size, cfg.micro_batch_size) == (2, 4, 4)
    # A bad command-line value is reported under its own name, not at the file line of the same key.
    with pytest.raises(UserError) as e:
        load(sft.Config, "learning_rate: 0.1\n", tmp_path, ["learning_rate=fast"])
    assert str(e.value) == "learning_rate: expected a number, got 'fast'"


def test_keys_left_out_keep_posttrain_defaults_and_values_name_the_trl_key(tmp_path):
    cfg = load(dpo.Config, "per_device_train_batch_size: 4\n", tmp_path)
    defaults = load_config(dpo.Config, None, [])
    assert (cfg.batch_size, cfg.micro_batch_size) == (4, 4)
    assert (cfg.learning_rate, cfg.warmup_ratio, cfg.max_length, cfg.beta) == (
        defaults.learning_rate, defaults.warmup_ratio, defaults.max_length, defaults.beta)
    # gradient_accumulation_steps alone multiplies posttrain's own micro_batch_size.
    assert load(sft.Config, "gradient_accumulation_steps: 3\n", tmp_path).batch_size == 3 * sft.Config.micro_batch_size
    with pytest.raises(UserError) as e:
        load(sft.Config, "num_train_epochs: lots\n", tmp_path)
    assert str(e.value) == f"{tmp_path}/trl.yaml:1: num_train_epochs -> num_epochs: expected a number, got 'lots'"
    with pytest.raises(UserError, match=r"trl.yaml:1: lr_scheduler_type: 'polynomial' is not supported here"):
        load(sft.Config, "lr_scheduler_type: polynomial\n", tmp_path)
    with pytest.raises(UserError, match="per_device_train_batch_size: expected a positive integer, got 0"):
        load(sft.Config, "per_device_train_batch_size: 0\n", tmp_path)


def test_trl_constant_schedule_has_no_warmup(tmp_path, caplog):
    """transformers' "constant" ignores warmup_steps; constant_with_warmup warms up. posttrain's constant warms up
    when asked, so a TRL "constant" also turns posttrain's default warmup (DPO: warmup_ratio 0.1) off."""
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        cfg = load(dpo.Config, "lr_scheduler_type: constant\nwarmup_steps: 10\n", tmp_path)
    assert (cfg.lr_scheduler, cfg.warmup_steps, cfg.warmup_ratio) == ("constant", 0, 0)
    assert "lr_scheduler_type: constant ignores warmup_steps 10" in caplog.text
    cfg = load(dpo.Config, "lr_scheduler_type: constant_with_warmup\nwarmup_steps: 10\n", tmp_path)
    assert (cfg.lr_scheduler, cfg.warmup_steps, cfg.warmup_ratio) == ("constant", 10, 0.1)


# Every alias with a TRL value and what it becomes.
ALIAS_CASES = {
    "num_train_epochs": (sft.Config, 2, "num_epochs", 2),
    "lr_scheduler_type": (sft.Config, "cosine", "lr_scheduler", "cosine"),
    "per_device_eval_batch_size": (sft.Config, 16, "eval_batch_size", 16),
    "activation_checkpointing": (sft.Config, True, "gradient_checkpointing", True),
    "disable_tqdm": (sft.Config, True, "progress", False),
    "fsdp": (sft.Config, "full_shard auto_wrap", "distributed", "fsdp"),
    "model_name_or_path": (sft.Config, "my/model", "model", "my/model"),
    "dataset_name": (sft.Config, "my/data", "dataset", "my/data"),
    "dataset_train_split": (sft.Config, "train[:10%]", "dataset_split", "train[:10%]"),
    "dataset_test_split": (sft.Config, "validation", "eval_split", "validation"),
    "reward_model_name_or_path": (grpo.Config, "runs/rm", "reward_model", "runs/rm"),
    "reward_model_path": (online_dpo.Config, "runs/rm", "reward_model", "runs/rm"),
    "max_new_tokens": (online_dpo.Config, 48, "max_completion_length", 48),
    "f_divergence_type": (dpo.Config, "alpha_divergence", "f_divergence", "alpha_divergence"),
    "f_alpha_divergence_coef": (dpo.Config, 0.3, "f_alpha", 0.3),
    "chat_template_path": (sft.Config, "template.jinja", "chat_template", "template.jinja"),
    "lora_r": (sft.Config, 8, "lora", LoraConfig(r=8)),
    "lora_alpha": (sft.Config, 8, "lora", LoraConfig(alpha=8.0)),
    "lora_dropout": (sft.Config, 0.05, "lora", LoraConfig(dropout=0.05)),
    "lora_target_modules": (sft.Config, ["q_proj"], "lora", LoraConfig(target_modules=["q_proj"])),
    "num_ppo_epochs": (ppo.Config, 2, "num_iterations", 2),
    "cliprange": (ppo.Config, 0.1, "epsilon", 0.1),
    "response_length": (ppo.Config, 12, "max_completion_length", 12),
    "sft_model_path": (ppo.Config, "runs/sft", "model", "runs/sft"),
}


def test_every_alias_is_covered():
    assert set(ALIAS_CASES) == set(ALIASES)


@pytest.mark.parametrize("key", sorted(ALIAS_CASES))
def test_alias(key, tmp_path):
    cls, value, target, expected = ALIAS_CASES[key]
    extra = {"use_peft": True} if key.startswith("lora_") else {}
    extra.update({"f_divergence_type": "alpha_divergence"} if key == "f_alpha_divergence_coef" else {})
    (tmp_path / "trl.yaml").write_text(yaml.safe_dump({key: value, **extra}))
    cfg = load_config(cls, str(tmp_path / "trl.yaml"), [], world_size=1)
    assert getattr(cfg, target) == expected
    # The same key on the command line.
    assert getattr(load_config(cls, None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                           for k, v in {key: value, **extra}.items()]), target) == expected


@pytest.mark.parametrize(
    "cls, text, key, expected",
    [
        (grpo.Config, "scale_rewards: true", "scale_rewards", "group"),
        (grpo.Config, "scale_rewards: false", "scale_rewards", "none"),
        (grpo.Config, "scale_rewards: batch", "scale_rewards", "batch"),
        (sft.Config, "resume_from_checkpoint: true", "resume_from_checkpoint", "latest"),
        (sft.Config, "resume_from_checkpoint: false", "resume_from_checkpoint", None),
        (sft.Config, "report_to: wandb", "report_to", ["wandb"]),
        (sft.Config, "report_to: all", "report_to", ["all"]),
        (sft.Config, "report_to: none", "report_to", ["none"]),
        (sft.Config, "report_to: [tensorboard, wandb]", "report_to", ["tensorboard", "wandb"]),
        (grpo.Config, "reward_funcs: [accuracy_reward, get_soft_overlong_punishment, my_lib.rewards.score]",
         "reward_funcs", ["accuracy", "length", "my_lib.rewards:score"]),
        (sft.Config, "bf16: null", "bf16", False),
        (sft.Config, "gradient_checkpointing: null", "gradient_checkpointing", False),
        (sft.Config, "completion_only_loss: null", "completion_only_loss", True),
        (sft.Config, "eval_steps: null", "eval_steps", 0),
        (sft.Config, "save_total_limit: null", "save_total_limit", None),
        (sft.Config, "metric_for_best_model: null", "metric_for_best_model", None),
        (grpo.Config, "num_completions_to_print: null", "num_completions_to_print", 4),
        (dpo.Config, "beta: [0.2]", "beta", 0.2),
    ],
)
def test_trl_values_of_posttrain_keys(cls, text, key, expected, tmp_path):
    assert getattr(load(cls, text + "\n", tmp_path), key) == expected


def test_every_native_value_map_is_covered():
    keys = {c[2] for c in test_trl_values_of_posttrain_keys.pytestmark[0].args[1]}
    assert keys == set(NATIVE_VALUES)


def test_derived_keys(tmp_path, caplog):
    cfg = load(grpo.Config, "reward_model_name_or_path: runs/rm\nreward_funcs: [accuracy_reward]\n", tmp_path)
    assert cfg.reward_model == "runs/rm" and cfg.reward_funcs == ["reward_model", "accuracy"]
    cfg = load(sft.Config, "model_init_kwargs:\n  dtype: bfloat16\n  attn_implementation: eager\n", tmp_path)
    assert cfg.dtype == "bfloat16" and "model_init_kwargs.attn_implementation: ignored" in caplog.text
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        cfg = load(sft.Config, "lora_r: 8\n", tmp_path)
    assert cfg.lora is None and "lora_r: ignored without use_peft: true (as in TRL)" in caplog.text
    assert load(sft.Config, "use_peft: true\n", tmp_path).lora == LoraConfig()
    # eval_strategy=steps without eval_steps evaluates every logging_steps (transformers' rule).
    assert load(sft.Config, "eval_strategy: steps\nlogging_steps: 25\n", tmp_path).eval_steps == 25
    # eval_strategy=no: TRL's script passes no eval set.
    cfg = load(sft.Config, "dataset_name: a/b\neval_strategy: 'no'\n", tmp_path)
    assert cfg.eval_dataset is None and cfg.eval_strategy == "no"


@pytest.mark.parametrize("key", sorted(IGNORED))
def test_ignored_option_warns_only_when_set_to_something(key, tmp_path, caplog):
    default, why = IGNORED[key]
    cls = grpo.Config
    quiet = list(default) if isinstance(default, Quiet) else [default]
    changed = "something" if len(quiet) > 1 or default in (None, "", [], "nf4") else (
        not default if isinstance(default, bool) else (default + 1 if isinstance(default, (int, float)) else "x"))
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        for value in quiet:
            load(cls, yaml.safe_dump({key: value}), tmp_path)
        assert caplog.text == ""
        load(cls, yaml.safe_dump({key: changed}), tmp_path)
    assert caplog.text.count("\n") == 1 and f"trl.yaml:1: {key}: ignored ({why})" in caplog.text


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_unsupported_option_is_accepted_at_trl_default_only(key, tmp_path):
    accepted, why = UNSUPPORTED[key]
    load(sft.Config, yaml.safe_dump({key: accepted[0]}), tmp_path)  # sft has none of these keys itself
    with pytest.raises(UserError) as e:
        load(sft.Config, yaml.safe_dump({key: "something-else"}), tmp_path)
    assert str(e.value) == f"{tmp_path}/trl.yaml:1: {key}: 'something-else' is not supported by posttrain ({why})"


def test_trainer_specific_names_stay_unknown_elsewhere(tmp_path):
    with pytest.raises(UserError, match="f_divergence_type: unknown key for 'sft'"):
        load(sft.Config, "f_divergence_type: forward_kl\n", tmp_path)
    with pytest.raises(UserError, match="per_device_train_batchsize: unknown key for 'sft' \\(did you mean"):
        load(sft.Config, "per_device_train_batchsize: 2\n", tmp_path)


def test_translate_reports_contradictions_within_one_source_only():
    values = translate(sft.Config, {"num_epochs": 3}, {"num_train_epochs": 1}, {}, world_size=1)
    assert values == {"num_epochs": 1}
    with pytest.raises(TRLConfigError, match="num_train_epochs = 2 contradicts num_epochs = 1"):
        translate(sft.Config, {}, {"num_train_epochs": 2, "num_epochs": 1}, {}, world_size=1)


def test_trl_style_command_line_flags():
    assert cli.parse_args(["dpo", "--per_device_train_batch_size", "4", "--use_peft", "--no_remove_unused_columns",
                           "--lora_r=8", "--config", "x.yaml"]) == (
        "dpo", "x.yaml", ["per_device_train_batch_size=4", "use_peft=true", "remove_unused_columns=false", "lora_r=8"],
        False)


# ---------------------------------------------------------------------------------------------------
# posttrain convert-config


def test_convert_config_prints_a_config_that_resolves_the_same(tmp_path, capsys):
    trl = tmp_path / "trl.yaml"
    trl.write_text(DPO_LORA + "f_divergence_type: js_divergence\n")
    assert cli.main(["convert-config", str(trl)]) == 0  # dpo inferred from its own keys
    out = capsys.readouterr().out
    assert out.startswith(f"# posttrain dpo --config THIS_FILE   (converted from {trl})\n")
    converted = yaml.safe_load(out)
    assert converted["batch_size"] == 16 and converted["lora"] == {"r": 32, "alpha": 16}
    assert not set(converted) & (set(ALIASES) | {"per_device_train_batch_size", "use_peft"})  # posttrain names only
    mine = tmp_path / "posttrain.yaml"
    mine.write_text(out)
    assert load_config(dpo.Config, str(mine), []) == load_config(dpo.Config, str(trl), [], world_size=1)
    # --processes: the global batch of the run TRL was launched with; --full: every key.
    assert cli.main(["convert-config", str(trl), "--processes", "8", "--full", "seed=3"]) == 0
    full = yaml.safe_load(capsys.readouterr().out)
    assert full["batch_size"] == 128 and full["seed"] == 3 and "adam_beta1" in full


def test_convert_config_errors(tmp_path, capsys):
    trl = tmp_path / "trl.yaml"
    trl.write_text("learning_rate: 1.0e-5\nnum_train_epochs: 1\n")
    assert cli.main(["convert-config", str(trl)]) == 2
    assert "cannot tell which trainer this config is for (no trainer-specific key); add --command" in capsys.readouterr().err
    assert cli.main(["convert-config", str(trl), "--command", "sft"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"learning_rate": 1e-5, "num_epochs": 1}
    trl.write_text("f_divergence_type: js_divergence\nnum_generations: 4\n")
    assert cli.main(["convert-config", str(trl)]) == 2
    assert "cannot tell which trainer this config is for (keys of dpo, grpo)" in capsys.readouterr().err


def test_a_trl_config_runs_unchanged_end_to_end(tmp_path, tiny_model_dir):
    """`posttrain sft --config trl.yaml` in a real process, a TRL file with TRL names only: it trains, says which
    options it ignored, and the run's resolved config.yaml holds posttrain's names."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "{i} + 1 =", "completion": " {i + 1}"}}\n' for i in range(8)))
    trl = tmp_path / "trl.yaml"
    trl.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\nper_device_train_batch_size: 2\n"
                   f"gradient_accumulation_steps: 2\nmax_steps: 2\nlearning_rate: 1.0e-4\noutput_dir: {tmp_path}/run\n"
                   "dataloader_num_workers: 2\ndisable_tqdm: true\nlogging_steps: 1\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain", "sft", "--config", str(trl)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{trl}:8: dataloader_num_workers: ignored" in proc.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (resolved["batch_size"], resolved["micro_batch_size"], resolved["max_steps"]) == (4, 2, 2)
    assert (tmp_path / "run" / "model.safetensors").exists()
