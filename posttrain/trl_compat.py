"""TRL's option names, accepted by every command (`posttrain convert-config` prints the result).

A YAML written for TRL 1.16 (transformers' TrainingArguments + the trainer's config + TRL's script and model
arguments) runs unchanged: before a config is built, `translate` rewrites its keys into posttrain's own. The
rules are data, in the tables below:

  ALIASES      a TRL name for a posttrain key (num_train_epochs -> num_epochs), with a value map where the
               two spell values differently (lr_scheduler_type: constant_with_warmup -> constant)
  NATIVE_VALUES  posttrain keys that TRL spells the same but whose TRL values need mapping (scale_rewards:
               true -> group)
  DERIVED      TRL keys that combine into posttrain keys (per_device_train_batch_size x
               gradient_accumulation_steps x processes -> batch_size); one small function each
  IGNORED      options that mean nothing here (push_to_hub, dataloader_num_workers, deepspeed, ...): set to
               anything but TRL's default, they cost one warning line each and the run goes on
  UNSUPPORTED  options that would change training in a way posttrain does not implement: accepted at TRL's
               default (which changes nothing), an error naming the key otherwise

A key given under both names with different values (num_train_epochs: 3 and num_epochs: 1 in one file) is an
error naming both. A key=value on the command line beats the file, whatever name either uses. Keys a TRL YAML
leaves out keep posttrain's defaults. `tests/parity/test_trl_config_names.py` checks every field of TRL's
config classes against these tables, so a TRL release that adds an option fails there until it is classified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("posttrain")


class TRLConfigError(Exception):
    """A TRL key posttrain cannot take (unsupported value, contradiction, bad TRL value). `load_config` reports
    it as a UserError (this module imports nothing of posttrain, so config.py can import it)."""



_DROP = object()  # a converted value meaning "as if the key were absent" (TRL's None = "use the default")


def _none_is_default(value):
    return _DROP if value is None else value


class _NoWarmup(str):
    """transformers' "constant": posttrain's constant schedule with the warmup forced off (see _derive)."""


def _lr_scheduler(value):
    kinds = {"linear": "linear", "cosine": "cosine", "constant": _NoWarmup("constant"),
             "constant_with_warmup": "constant"}
    if value not in kinds:
        raise ValueError(f"{value!r} is not supported here (linear, cosine, constant, constant_with_warmup are)")
    return kinds[value]


def _scale_rewards(value):
    return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value


def _resume(value):
    if value is True:
        return "latest"
    return None if value is False else value


def _names(value) -> list:
    """A list, or a string of comma-separated names (key=value on the command line)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of names, got {value!r}")
    return list(value)


def _report_to(value):
    return _names(value)


def _fsdp(value):
    # transformers' fsdp is a list/str of options ("full_shard auto_wrap"); any of them means sharding.
    return "fsdp" if value else _DROP


def _beta(value):
    # OnlineDPOConfig's beta is a list (one per epoch, the last repeated); one value is the same setting.
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{value}: a beta per epoch is not supported; give one beta")
        return value[0]
    return value


def _negate(value):
    return _DROP if value is None else not value


# TRL reward function names (trl/scripts/grpo.py) -> posttrain's. A dotted import path becomes module:function.
TRL_REWARDS = {"accuracy_reward": "accuracy", "think_format_reward": "format", "get_soft_overlong_punishment": "length"}
# TRL's think_format_reward pattern: one <think>...</think> block at the start of the completion.
THINK_FORMAT_PATTERN = r"^<think>(?!.*<think>)(.*?)</think>.*$"


def _reward_funcs(value):
    names = _names(value)
    out = []
    for name in names:
        if name in TRL_REWARDS:
            out.append(TRL_REWARDS[name])
        elif name == "reasoning_accuracy_reward":
            raise ValueError("TRL's reasoning_accuracy_reward is not available here (use accuracy)")
        elif isinstance(name, str) and "." in name and ":" not in name and "/" not in name:
            module, _, attr = name.rpartition(".")
            out.append(f"{module}:{attr}")
        else:
            out.append(name)
    return out


@dataclass(frozen=True)
class Alias:
    target: str  # posttrain key; dotted for a nested block (lora.r)
    convert: Callable[[Any], Any] | None = None  # TRL value -> posttrain value (ValueError: a bad value)


ALIASES: dict[str, Alias] = {
    # TrainingArguments
    "num_train_epochs": Alias("num_epochs"),
    "lr_scheduler_type": Alias("lr_scheduler", _lr_scheduler),
    "per_device_eval_batch_size": Alias("eval_batch_size"),
    "activation_checkpointing": Alias("gradient_checkpointing", _none_is_default),
    "disable_tqdm": Alias("progress", _negate),
    "fsdp": Alias("distributed", _fsdp),
    # TRL script arguments (ScriptArguments, GRPOScriptArguments)
    "model_name_or_path": Alias("model"),
    "dataset_name": Alias("dataset"),
    "dataset_train_split": Alias("dataset_split"),
    "dataset_test_split": Alias("eval_split"),
    "reward_model_name_or_path": Alias("reward_model"),
    "reward_model_path": Alias("reward_model"),  # OnlineDPOConfig
    "max_new_tokens": Alias("max_completion_length"),  # OnlineDPOConfig
    # trainer configs
    "f_divergence_type": Alias("f_divergence"),
    "f_alpha_divergence_coef": Alias("f_alpha"),
    "chat_template_path": Alias("chat_template"),
    # TRL's former PPOConfig (removed from TRL; the names its users know; reward_model_path is above)
    "num_ppo_epochs": Alias("num_iterations"),
    "cliprange": Alias("epsilon"),
    "response_length": Alias("max_completion_length"),
    "sft_model_path": Alias("model"),
    # ModelConfig (LoRA: only with use_peft, see _lora)
    "lora_r": Alias("lora.r"),
    "lora_alpha": Alias("lora.alpha"),
    "lora_dropout": Alias("lora.dropout"),
    "lora_target_modules": Alias("lora.target_modules", _none_is_default),
}

# posttrain keys that TRL spells the same, with TRL values that need mapping.
NATIVE_VALUES: dict[str, Callable[[Any], Any]] = {
    "scale_rewards": _scale_rewards,
    "resume_from_checkpoint": _resume,
    "report_to": _report_to,
    "reward_funcs": _reward_funcs,
    "bf16": _none_is_default,
    "gradient_checkpointing": _none_is_default,
    "completion_only_loss": _none_is_default,
    "eval_steps": _none_is_default,
    "save_total_limit": _none_is_default,
    "metric_for_best_model": _none_is_default,
    "num_completions_to_print": _none_is_default,
    "beta": _beta,
}

# ModelConfig's LoRA defaults: a lora_* key at its default is silent without use_peft (it changes nothing).
LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": None}

# TRL keys combined by the rules in `_derive` (batch arithmetic, LoRA switch, model_init_kwargs).
DERIVED = ("per_device_train_batch_size", "gradient_accumulation_steps", "use_peft", "model_init_kwargs",
           "steps_per_generation")

class Quiet(tuple):
    """Several values that all mean "TRL's default" for an ignored option (trainers override some defaults)."""


# Meaningless here: key -> (TRL's default, why). A value other than the default gives one warning line.
IGNORED: dict[str, tuple[Any, str]] = {
    "push_to_hub": (False, "no uploads; the model is saved to output_dir"),
    "hub_token": (None, "no uploads"),
    "hub_private_repo": (None, "no uploads"),
    "hub_model_id": (None, "no uploads"),
    "hub_strategy": ("every_save", "no uploads"),
    "hub_always_push": (False, "no uploads"),
    "hub_revision": (None, "no uploads"),
    "log_completions_hub_repo": (None, "no uploads"),
    "deepspeed": (None, "posttrain shards with FSDP2 (distributed: fsdp) instead of DeepSpeed"),
    "fsdp_config": (None, "FSDP2 is configured by posttrain itself"),
    "accelerator_config": (None, "no accelerate launcher"),
    "parallelism_config": (None, "no accelerate launcher"),
    "ddp_find_unused_parameters": (None, "posttrain's DDP needs no setting"),
    "ddp_bucket_cap_mb": (None, "posttrain's DDP needs no setting"),
    "ddp_broadcast_buffers": (None, "posttrain's DDP needs no setting"),
    "ddp_static_graph": (None, "posttrain's DDP needs no setting"),
    "ddp_backend": (None, "NCCL on GPUs, gloo on CPUs, chosen automatically"),
    "ddp_timeout": (1800, "the process group uses torch's default timeout"),
    "local_rank": (-1, "ranks come from torchrun / srun"),
    "use_cpu": (False, "the device is chosen automatically (CUDA when available)"),
    "dataloader_num_workers": (0, "examples are tokenized up front; batches need no loader workers"),
    "dataloader_pin_memory": (True, "no DataLoader"),
    "dataloader_persistent_workers": (False, "no DataLoader"),
    "dataloader_prefetch_factor": (None, "no DataLoader"),
    "dataloader_drop_last": (False, "no DataLoader; a step always takes batch_size examples"),
    "dataloader_multiprocessing_context": (None, "no DataLoader"),
    "dataloader_in_order": (True, "no DataLoader"),
    "remove_unused_columns": (Quiet((True, False)), "columns are read by name"),
    "label_names": (None, "columns are read by name"),
    "length_column_name": ("length", "no length-grouped sampler"),
    "dataset_num_proc": (None, "tokenization runs in the training process"),
    "pad_to_multiple_of": ("auto", "sequences are packed without padding"),
    "padding_free": (False, "the preference and GRPO forwards always pack without padding; SFT with packing: true"),
    "eval_packing": (None, "evaluation batches like training"),
    "torch_compile": (False, "no torch.compile"),
    "torch_compile_backend": (None, "no torch.compile"),
    "torch_compile_mode": (None, "no torch.compile"),
    "tf32": (None, "matmul precision is torch's default"),
    "use_liger_kernel": (False, "posttrain's own chunked log-prob routine does what the Liger loss does"),
    "liger_kernel_config": (None, "no Liger kernels"),
    "use_cache": (False, "the KV cache is used for generation only, as here"),
    "torch_empty_cache_steps": (None, "no explicit cache emptying"),
    "auto_find_batch_size": (False, "use `posttrain memory` to size batches"),
    "activation_offloading": (False, "no activation offloading (gradient_checkpointing saves memory)"),
    "gradient_checkpointing_kwargs": (None, "checkpointing is always non-reentrant"),
    "activation_checkpointing_kwargs": (None, "checkpointing is always non-reentrant"),
    "logging_first_step": (False, "the first row is written by logging_steps like the others"),
    "logging_nan_inf_filter": (True, "metrics are written as computed"),
    "log_on_each_node": (True, "process 0 logs"),
    "log_level": ("passive", "posttrain logs at INFO"),
    "log_level_replica": ("warning", "only process 0 logs"),
    "include_num_input_tokens_seen": ("no", "tokens_per_second is always logged"),
    "project": ("huggingface", "tracker projects are not configured here"),
    "trackio_space_id": (None, "tracker spaces are not configured here"),
    "trackio_bucket_id": (None, "tracker spaces are not configured here"),
    "trackio_static_space_id": (None, "tracker spaces are not configured here"),
    "prediction_loss_only": (False, "evaluation reports the algorithm's metrics"),
    "eval_do_concat_batches": (True, "evaluation reports the algorithm's metrics"),
    "eval_use_gather_object": (False, "evaluation reports the algorithm's metrics"),
    "eval_accumulation_steps": (None, "evaluation keeps no predictions"),
    "include_for_metrics": ([], "evaluation reports the algorithm's metrics"),
    "batch_eval_metrics": (False, "evaluation reports the algorithm's metrics"),
    "save_only_model": (False, "checkpoints always hold the optimizer state, so a run can resume"),
    "save_on_each_node": (False, "process 0 writes checkpoints to the shared output_dir"),
    "enable_jit_checkpoint": (False, "Ctrl-C / SIGTERM always checkpoint"),
    "ignore_data_skip": (False, "resuming restores the data position exactly"),
    "restore_callback_states_from_checkpoint": (False, "no callbacks"),
    "full_determinism": (False, "runs are seeded"),
    "data_seed": (None, "the data order follows `seed`"),
    "skip_memory_metrics": (True, "no memory metrics"),
    "debug": ("", "no debug modes"),
    "do_train": (False, "the command trains"),
    "do_eval": (False, "evaluation follows eval_strategy"),
    "do_predict": (False, "no prediction"),
    "train_sampling_strategy": (Quiet(("random", "sequential")),
                                "examples are shuffled per epoch by `seed`; KTO's mismatched pairs are fixed"),
    "shuffle_dataset": (Quiet((True, False)), "examples are always shuffled per epoch"),
    "average_tokens_across_devices": (True, "loss normalisers always count over every process"),
    "router_aux_loss_coef": (None, "no MoE auxiliary loss"),
    "pad_token": (None, "the tokenizer's pad token (else EOS) is used; padding is masked out"),
    "eos_token": (None, "the chat template's own end-of-turn token ends completions"),
    "ref_model_init_kwargs": (None, "the reference is a copy of the policy or ref_model"),
    "dataset_kwargs": (None, "data is read by posttrain's loader"),
    "cast_lm_head_to_fp32": (False, "the LM head runs in the weights' dtype"),
    "cache_implementation": (None, "generation uses the default dynamic KV cache"),
    "ds3_gather_for_generation": (True, "no DeepSpeed"),
    "use_vllm": (False, "generation uses posttrain's own engine (vLLM is not installed here)"),
    "vllm_mode": ("colocate", "no vLLM"),
    "vllm_model_impl": ("vllm", "no vLLM"),
    "vllm_enable_sleep_mode": (False, "no vLLM"),
    "vllm_structured_outputs_regex": (None, "no vLLM"),
    "vllm_server_base_url": (None, "no vLLM"),
    "vllm_server_host": ("0.0.0.0", "no vLLM"),
    "vllm_server_port": (8000, "no vLLM"),
    "vllm_server_timeout": (240.0, "no vLLM"),
    "vllm_group_port": (51216, "no vLLM"),
    "vllm_gpu_memory_utilization": (Quiet((0.3, 0.55)), "no vLLM"),
    "vllm_max_model_length": (None, "no vLLM"),
    "vllm_tensor_parallel_size": (1, "no vLLM"),
    "vllm_importance_sampling_correction": (True, "no vLLM: sampling and training log-probs come from one model"),
    "vllm_importance_sampling_mode": ("sequence_mask", "no vLLM"),
    "vllm_importance_sampling_clip_max": (3.0, "no vLLM"),
    "vllm_importance_sampling_clip_min": (None, "no vLLM"),
    "vllm_importance_sampling_cap": (None, "no vLLM"),
    "use_transformers_continuous_batching": (False, "generation uses posttrain's own engine"),
    "transformers_continuous_batching_config": (None, "generation uses posttrain's own engine"),
    "use_transformers_paged": (False, "generation uses posttrain's own engine"),
    "max_tool_calling_iterations": (None, "no tool calling"),
    "log_multimodal": (True, "text models only"),
    "log_unique_prompts": (False, "completions.jsonl holds every completion"),
    "entropy_coef_min": (0.0, "only read by use_adaptive_entropy"),
    "entropy_coef_max": (1.0, "only read by use_adaptive_entropy"),
    "entropy_coef_delta": (0.005, "only read by use_adaptive_entropy"),
    "entropy_target": (0.2, "only read by use_adaptive_entropy"),
    "vespo_k_pos": (2.0, "only read by loss_type=vespo"),
    "vespo_lambda_pos": (3.0, "only read by loss_type=vespo"),
    "vespo_k_neg": (3.0, "only read by loss_type=vespo"),
    "vespo_lambda_neg": (2.0, "only read by loss_type=vespo"),
    "lora_task_type": ("CAUSAL_LM", "set from the command (sequence classification for rm)"),
    "bnb_4bit_quant_type": ("nf4", "no quantized loading"),
    "use_bnb_nested_quant": (False, "no quantized loading"),
    "bnb_4bit_quant_storage": (None, "no quantized loading"),
    "attn_implementation": (None, "transformers' default attention (sdpa) is used"),
    "ignore_bias_buffers": (False, "no bias buffers are broadcast"),
    "force_use_ref_model": (False, "the reference strategy follows the loss and LoRA"),
    "generate_during_eval": (False, "no sample generation during preference evaluation"),
    "use_logits_to_keep": (False, "logits are computed for completion positions only, always"),
}

# Would change training in a way posttrain does not implement: key -> (accepted values, what to do instead).
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "fp16": ((False, None), "float16 mixed precision needs loss scaling; use bf16: true"),
    "fp16_full_eval": ((False,), "use bf16"),
    "bf16_full_eval": ((False,), "evaluation runs like training (bf16: true autocasts both)"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "posttrain trains with torch's AdamW"),
    "optim_args": ((None, ""), "posttrain trains with torch's AdamW"),
    "optim_target_modules": ((None,), "posttrain trains with torch's AdamW"),
    "lr_scheduler_kwargs": ((None, {}, ""), "the schedules take no extra arguments"),
    "label_smoothing_factor": ((0, 0.0), "SFT without label smoothing"),
    "neftune_noise_alpha": ((None,), "no NEFTune embedding noise"),
    "eval_delay": ((0, 0.0), "evaluation follows eval_strategy from the first step"),
    "eval_on_start": ((False,), "the first evaluation follows eval_strategy"),
    "model_revision": (("main", None), "give a local folder or the hub id of the revision"),
    "dataset_streaming": ((False,), "datasets are read whole"),
    "datasets": ((None, []), "dataset mixtures: concatenate the files into one folder and give its path"),
    "load_in_8bit": ((False,), "no quantized (QLoRA) loading"),
    "load_in_4bit": ((False,), "no quantized (QLoRA) loading"),
    "use_rslora": ((False,), "plain LoRA scaling alpha / r"),
    "use_dora": ((False,), "plain LoRA"),
    "lora_target_parameters": ((None, []), "adapters on modules (lora_target_modules)"),
    "lora_modules_to_save": ((None, []), "only the adapters train"),
    "dataset_text_field": (("text",), "name the text column `text` (or use messages / prompt-completion)"),
    "packing_strategy": (("bfd",), "packing here is best-fit without splitting examples (TRL's bfd)"),
    "use_adaptive_entropy": ((False,), "a fixed entropy_coef"),
    "off_policy_mask_threshold": ((None,), "no off-policy sequence masking"),
    "loss_type": (("nll",), "SFT trains on the negative log-likelihood (TRL's dft is not implemented)"),
    "sync_ref_model": ((False,), "a fixed reference here (TR-DPO reference updates: posttrain dpo and grpo)"),
    "ref_model_mixup_alpha": ((0.6,), "a fixed reference here (TR-DPO reference updates: posttrain dpo and grpo)"),
    "ref_model_sync_steps": ((512,), "a fixed reference here (TR-DPO reference updates: posttrain dpo and grpo)"),
}


# ------------------------------------------------------------------------------------------------------


@dataclass
class _Set:
    """One assignment of a posttrain key: its value, the name(s) the user wrote it under, and where."""

    value: Any
    label: str  # "run.yaml:3: num_train_epochs", or the key itself for a command-line setting
    cli: bool  # given on the command line (beats the file)
    name: str = ""  # the key as written (a TRL name or posttrain's)
    raw: Any = None  # the value as written, before any TRL value map


def world_size_from_env() -> int:
    """Processes the run will have (torchrun's WORLD_SIZE, or srun's task count), read before they start."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return max(1, int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return max(1, int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1))
    return 1


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _block_fields(cls) -> dict[str, type]:
    """Fields holding a nested config block (lora): their keys are flattened to `lora.r` while translating."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name in fields_of(cls):
        for arg in typing.get_args(hints[name]) or (hints[name],):
            if dataclasses.is_dataclass(arg):
                out[name] = arg
    return out


def _flatten(values: dict, blocks: dict) -> dict:
    out = {}
    for key, value in values.items():
        if key in blocks and isinstance(value, dict):
            out[key] = True  # the block is present (LoRA on), its keys follow
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def applies(target: str, fields: dict) -> bool:
    return target.split(".")[0] in fields


def _is_training(cls) -> bool:
    return "batch_size" in fields_of(cls) and "micro_batch_size" in fields_of(cls)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def _warn_once(message: str, seen: set) -> None:
    if message not in seen:
        seen.add(message)
        if int(os.environ.get("RANK", "0")) == 0:  # the config is read by every process of a launch
            log.warning(message)


def translate(cls, file_values: dict, cli_values: dict, lines: dict, world_size: int | None = None,
              warned: set | None = None) -> dict:
    """TRL or posttrain keys (a YAML file's and key=value overrides, dotted for nested blocks) -> posttrain keys.

    `lines` maps a file key to "file:line: ", and gets an entry for every translated key so that errors about
    its value name the key the user wrote. Raises UserError for contradictions, unsupported values and bad
    TRL values; warns once per ignored option."""
    fields = fields_of(cls)
    blocks = _block_fields(cls)
    training = _is_training(cls)
    warned = set() if warned is None else warned
    sets: dict[str, list[_Set]] = {}
    derived_raw: dict[str, tuple[Any, str, bool]] = {}

    written = dict(lines)  # where each key of the file is, before translated keys get entries

    def label(key: str, cli: bool) -> str:
        return key if cli else f"{written.get(key, '')}{key}"

    def assign(target: str, value, lab: str, cli: bool, origin: str | None = None, raw=None) -> None:
        if value is _DROP:
            return
        sets.setdefault(target, []).append(_Set(value, lab, cli, origin or target, raw))
        if origin is not None and origin != target and not cli:
            lines[target] = f"{lines.get(origin, '')}{origin} -> "

    for source, cli in ((file_values, False), (cli_values, True)):
        for key, value in _flatten(source, blocks).items():
            lab = label(key, cli)
            top = key.split(".")[0]
            if top in fields:
                converted = _convert(NATIVE_VALUES[key], value, lab) if key in NATIVE_VALUES else value
                assign(key, converted, lab, cli, raw=value)
            elif key in ALIASES and applies(ALIASES[key].target, fields):
                alias = ALIASES[key]
                converted = _convert(alias.convert, value, lab) if alias.convert else value
                assign(alias.target, converted, lab, cli, origin=key, raw=value)
            elif key in DERIVED and training:
                derived_raw[key] = (value, lab, cli)  # the command line beats the file
            elif key in IGNORED and training:
                default, why = IGNORED[key]
                if not any(_same(value, d) for d in (default if isinstance(default, Quiet) else (default,))):
                    _warn_once(f"{lab}: ignored ({why})", warned)
            elif key in UNSUPPORTED and training:
                accepted, why = UNSUPPORTED[key]
                if not any(_same(value, a) for a in accepted):
                    raise TRLConfigError(f"{lab}: {value!r} is not supported by posttrain ({why})")
            else:
                assign(key, value, lab, cli)  # unknown: build_dataclass names it with a did-you-mean

    if training:
        _derive(cls, fields, derived_raw, sets, assign, lines, warned,
                world_size_from_env() if world_size is None else world_size)
    for key in sets:
        if _winner(sets, key).cli:
            lines.pop(key, None)  # errors about a command-line value must not point into the file
    return _resolve(sets, blocks)


def _convert(fn, value, lab: str):
    try:
        return fn(value)
    except (ValueError, TypeError) as e:  # a value of the wrong type for the rule (found by tests/test_config_fuzz)
        raise TRLConfigError(f"{lab}: {e}") from None


def _given(sets: dict, key: str):
    """The value a key resolves to so far (the command line wins), or None."""
    chosen = _winner(sets, key)
    return None if chosen is None else chosen.value


def _derive(cls, fields, raw, sets, assign, lines, warned, world_size: int) -> None:
    """The rules that combine several TRL keys into posttrain keys."""

    def positive_int(key):
        value, lab, _ = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TRLConfigError(f"{lab}: expected a positive integer, got {value!r}")
        return value

    # Batch arithmetic: TRL counts per device and per accumulation step; posttrain's batch_size is global.
    if "per_device_train_batch_size" in raw or "gradient_accumulation_steps" in raw:
        per_device = positive_int("per_device_train_batch_size") if "per_device_train_batch_size" in raw else None
        accumulation = positive_int("gradient_accumulation_steps") if "gradient_accumulation_steps" in raw else 1
        keys = [k for k in ("per_device_train_batch_size", "gradient_accumulation_steps") if k in raw]
        cli = any(raw[k][2] for k in keys)
        lab = " x ".join(raw[k][1] for k in keys)
        if per_device is not None:
            assign("micro_batch_size", per_device, raw["per_device_train_batch_size"][1],
                   raw["per_device_train_batch_size"][2], origin="per_device_train_batch_size")
        micro = per_device if per_device is not None else _given(sets, "micro_batch_size")
        if micro is None:
            micro = fields_of(cls)["micro_batch_size"].default
        total = micro * accumulation * world_size
        where = f"{lab} x {world_size} process{'es' if world_size > 1 else ''}"
        if getattr(cls, "trl_batch_counts_completions", False):
            # GRPO: TRL's batch counts completions; posttrain's batch_size counts prompts.
            generations = _given(sets, "num_generations") or fields_of(cls)["num_generations"].default
            if total % generations:
                raise TRLConfigError(f"{where} = {total} completions is not divisible by num_generations {generations}")
            total //= generations
            where += f" / num_generations {generations}"
        sets.setdefault("batch_size", []).append(_Set(total, where, cli, "per_device_train_batch_size"))
        if not cli and keys:
            lines["batch_size"] = f"{lines.get(keys[0], '')}{' x '.join(keys)} -> "

    # GRPO: TRL's steps_per_generation counts per-device micro-batches of completions per generation.
    if "steps_per_generation" in raw and "generation_batch_size" in fields:
        value, lab, cli = raw["steps_per_generation"]
        if value is not None:
            steps = positive_int("steps_per_generation")
            if "generation_batch_size" in sets:
                raise TRLConfigError(f"{lab} and {sets['generation_batch_size'][-1].label}: give one of them (as TRL)")
            per_device = raw["per_device_train_batch_size"][0] if "per_device_train_batch_size" in raw else (
                _given(sets, "micro_batch_size") or fields_of(cls)["micro_batch_size"].default)
            accumulation = raw["gradient_accumulation_steps"][0] if "gradient_accumulation_steps" in raw else 1
            completions, per_step = per_device * world_size * steps, per_device * world_size * accumulation
            # Fewer micro-steps per generation than per optimizer step: TRL generates several times within one
            # step, with unchanged weights, which is one generation of the step's batch here (the default).
            if not (completions < per_step and per_step % completions == 0):
                sets["generation_batch_size"] = [_Set(completions, f"{lab} x per-device batch x {world_size} "
                                                      "process(es)", cli, "steps_per_generation")]
    elif "steps_per_generation" in raw and raw["steps_per_generation"][0] is not None:
        raise TRLConfigError(f"{raw['steps_per_generation'][1]}: unknown key for "
                             f"'{getattr(cls, 'command', cls.__name__)}'")

    # LoRA: TRL's lora_* keys count only with use_peft: true.
    if "lora" in fields:
        use_peft = raw.get("use_peft")
        if use_peft is not None and use_peft[0] is True:
            assign("lora", True, use_peft[1], use_peft[2], origin="use_peft")
        else:
            for key in [k for k in sets if k.startswith("lora.")]:
                trl = [s for s in sets[key] if s.name.startswith("lora_")]
                for s in trl:
                    if not _same(s.raw, LORA_DEFAULTS.get(s.name)):
                        _warn_once(f"{s.label}: ignored without use_peft: true (as in TRL)", warned)
                sets[key] = [s for s in sets[key] if s not in trl]
                if not sets[key]:
                    del sets[key]
            if use_peft is not None and use_peft[0] is False and _given(sets, "lora") not in (None, False):
                raise TRLConfigError(f"{use_peft[1]} = False contradicts the lora block; keep one of them")

    # model_init_kwargs: its dtype is the model dtype; the rest means nothing here.
    if "model_init_kwargs" in raw:
        value, lab, cli = raw["model_init_kwargs"]
        for k, v in (value or {}).items():
            if k in ("dtype", "torch_dtype") and "dtype" in fields:
                assign("dtype", v, f"{lab}.{k}", cli)
            else:
                _warn_once(f"{lab}.{k}: ignored (posttrain loads the model itself)", warned)

    # transformers: "constant" has no warmup at all, whatever warmup_steps says.
    chosen = _winner(sets, "lr_scheduler")
    if chosen is not None and isinstance(chosen.value, _NoWarmup):
        warm = _given(sets, "warmup_steps")
        if warm:
            _warn_once(f"{chosen.label}: constant ignores warmup_steps {warm} (as in transformers; "
                       f"constant_with_warmup warms up)", warned)
        for key in ("warmup_steps", "warmup_ratio"):
            sets[key] = [_Set(0, chosen.label, True, chosen.name)]
        chosen.value = "constant"

    # TRL's scripts evaluate on dataset[dataset_test_split] whenever eval_strategy is not "no".
    if "eval_dataset" in fields and _given(sets, "eval_dataset") is None:
        name_sets = [s for s in sets.get("dataset", []) if s.name == "dataset_name"]
        strategy = _given(sets, "eval_strategy")
        if name_sets and strategy not in (None, "no"):
            assign("eval_dataset", name_sets[-1].value, name_sets[-1].label, name_sets[-1].cli)

    # transformers: eval_strategy=steps without eval_steps evaluates every logging_steps.
    if _given(sets, "eval_strategy") == "steps" and "eval_steps" not in sets and "logging_steps" in sets:
        s = sets["logging_steps"][-1]
        sets["eval_steps"] = [_Set(s.value, s.label, s.cli, s.name)]

    # GRPO script: reward_model_name_or_path adds the reward model to the reward functions; TRL's
    # think_format_reward is the format reward with TRL's <think> pattern.
    if "reward_funcs" in fields:
        if any(s.name in ("reward_model_name_or_path", "reward_model_path") for s in sets.get("reward_model", [])):
            funcs = list(_given(sets, "reward_funcs") or [])
            if "reward_model" not in funcs:
                s = sets["reward_model"][-1]
                sets["reward_funcs"] = [_Set(["reward_model", *funcs], s.label, s.cli, s.name)]
        funcs = _winner(sets, "reward_funcs")
        if funcs is not None and "think_format_reward" in str(funcs.raw) and _given(sets, "format_pattern") is None:
            sets["format_pattern"] = [_Set(THINK_FORMAT_PATTERN, funcs.label, funcs.cli, funcs.name)]


def _winner(sets: dict, key: str) -> _Set | None:
    got = sets.get(key)
    if not got:
        return None
    cli = [s for s in got if s.cli]
    return (cli or got)[-1]


def _resolve(sets: dict, blocks: dict) -> dict:
    """One value per key: the command line beats the file; two different values from one source are an error."""
    out: dict = {}
    for key, got in sets.items():
        cli = [s for s in got if s.cli]
        pool = cli or got
        first = pool[0]
        for other in pool[1:]:
            if not _same(other.value, first.value):
                raise TRLConfigError(f"{first.label} = {first.value!r} contradicts {other.label} = {other.value!r} "
                                f"(two names for one setting); keep one of them")
        value = pool[-1].value
        if "." in key and key.split(".")[0] in blocks:
            block, sub = key.split(".", 1)
            if not isinstance(out.get(block), dict):
                out[block] = {}
            out[block][sub] = value
        elif key in blocks and value is True:
            out.setdefault(key, {})
        else:
            out[key] = value
    return out
