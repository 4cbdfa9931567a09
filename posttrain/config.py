"""Typed configuration: one dataclass per command, the single source of truth for keys, types, defaults
and help text (`posttrain <command> --help` prints it).

Every field carries its documentation in `metadata["help"]`, saying what it counts and its unit. Batch
sizes are *global* (summed over devices and gradient-accumulation steps) unless the name says otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger("posttrain")


class RunError(Exception):
    """The run stopped for a reason that is not a mistake in the input (the CLI prints one line and exits 1):
    its message says why and which checkpoint to resume from."""

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).splitlines()))


class StorageError(RunError):
    """The run directory cannot be written (disk full, quota, read-only)."""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). The CLI prints it as one line and exits 2.

    Always one line, whatever it quotes (a library's message, a key or value with a line break in it)."""

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).splitlines()))


STRATEGIES = ("steps", "epoch", "no")


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field: default + help text (+ the allowed values for a string choice)."""
    meta = {"help": help, "choices": choices}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def preset(cls, name: str, default: Any):
    """Field `name` of the config class `cls` with another default, same help and choices: how a preset (`posttrain
    ppo` on the online-RL config) changes defaults without restating what the key means."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return opt(default, f.metadata["help"], f.metadata["choices"])


# report_to name -> (module to import, how to install it). Names as in TRL / transformers.
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "trackio": ("trackio", "pip install trackio"),
    "wandb": ("wandb", "pip install wandb"),
}
# Integrations transformers knows but posttrain does not log to: a TRL config naming them still runs.
OTHER_INTEGRATIONS = {"azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "mlflow",
                      "neptune", "swanlab"}


def resolve_report_to(names: list, installed_only: bool = True) -> list[str]:
    """TRL's `report_to` -> the trackers to open: 'all' means every supported one that is installed, 'none'
    nothing. Unknown names are an error; integrations posttrain lacks are skipped with a warning."""
    out: list[str] = []
    for raw in names or []:
        name = str(raw).strip().lower()
        if name in ("none", ""):
            continue
        if name == "all":
            out += [n for n, (module, _) in TRACKERS.items() if importlib.util.find_spec(module) is not None]
        elif name in TRACKERS:
            out.append(name)
        elif name in OTHER_INTEGRATIONS:
            if installed_only:
                log.warning(f"report_to: {name} is not supported by posttrain (supported: {', '.join(TRACKERS)}); "
                            "the run goes on without it")
        else:
            raise UserError(f"report_to: unknown tracker {raw!r} (one of: {', '.join(TRACKERS)}, all, none)")
    return list(dict.fromkeys(out))


@dataclass
class LoraConfig:
    """Low-rank adapters through peft. Present in the config (any `lora.*` key) means LoRA is on."""

    r: int = opt(16, "Adapter rank.")
    alpha: float = opt(32.0, "Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = opt(0.0, "Dropout on the adapter input.")
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"],
                               "Module names that get adapters (e.g. q_proj, down_proj), or 'all-linear' for every "
                               "linear layer except the output head (peft's shorthand).")
    merge: bool = opt(False, "Merge the adapter into the base weights when saving the final model.")


@dataclass
class DiagnosticsConfig:
    """Thresholds of the live diagnostics (`posttrain.diagnostics`): rules over the recent metrics that recognise
    the classic ways post-training goes wrong, each printed once with what it means and what to try. Every
    count here is in optimizer steps."""

    window: int = opt(10, "Steps a trend rule looks at: it compares the mean of their later half with the earlier half.")
    sparse_reward_frac: float = opt(0.9, "grpo_sparse_reward: frac_reward_zero_std above this ...")
    sparse_reward_steps: int = opt(5, "... for this many consecutive steps.")
    collapse_loss: float = opt(0.05, "dpo_loss_collapse: DPO-family loss below this (or reward accuracy >= collapse_accuracy) ...")
    collapse_accuracy: float = opt(0.99, "... reward accuracy at or above this ...")
    collapse_within: int = opt(20, "... for 3 consecutive steps within the first N steps, while held-out reward accuracy does not improve.")
    drift_drop: float = opt(5.0, "dpo_beta_drift: chosen AND rejected log-probs (nats per sequence) below their start by this and still falling ...")
    drift_margin: float = opt(40.0, "... or the margin of log-ratios (rewards/margins / beta, nats) above this and still growing.")
    kl_max: float = opt(1.0, "kl_blowup: KL to the reference (per token, online RL) above this ...")
    kl_growth: float = opt(5.0, "... or multiplied by this within `window` steps while above kl_max / 10.")
    implicit_kl_max: float = opt(30.0, "kl_blowup, offline losses: mean |log pi/ref| per sequence (DPO: |rewards| / beta; KTO: kl) above this.")
    length_frac: float = opt(0.9, "length_exploit: mean completion length above this fraction of max_completion_length, rising with the reward ...")
    clipped_max: float = opt(0.5, "... or more than this fraction of completions cut at max_completion_length.")
    entropy_frac: float = opt(0.1, "entropy_collapse: mean entropy fallen below this fraction of its starting value.")
    hacking_saturation: float = opt(0.95, "reward_hacking_format: a secondary reward at this fraction of its best or more ...")
    hacking_drop: float = opt(0.1, "... while the main (highest-weight) reward fell this far below its best window mean.")
    explained_variance_min: float = opt(0.0, "critic_not_learning: the critic's val/explained_variance, averaged over its last `window` rollouts, at or below this ...")
    critic_warmup: int = opt(20, "... at a step past this many (a zero-started value head predicts nothing at first).")


@dataclass
class TrainConfig:
    """Keys shared by every training command."""

    # Model
    model: str = opt(
        "smollm2-135m-instruct",
        "A local Hugging Face model folder, a .gguf file, a hub id, or 'smollm2-135m-instruct' (the "
        "embedded default, converted once and cached).",
    )
    tokenizer: str | None = opt(None, "Tokenizer path or hub id; default: the model's own.")
    trust_remote_code: bool = opt(False, "Allow model code from the model folder / hub to run.")
    chat_template: str | None = opt(None, "A Jinja chat template (string or file path) replacing the tokenizer's.")
    dtype: str = opt(
        "float32",
        "dtype the weights are loaded and trained in (TRL's model argument). float32 keeps full-precision weights "
        "and optimizer state; bfloat16 halves their memory (pure bf16 training); auto takes the checkpoint's own.",
        ("float32", "bfloat16", "float16", "auto"),
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: less memory, ~30% slower.")
    bf16: bool = opt(False, "bfloat16 autocast for forward/backward (weights and optimizer keep `dtype`).")
    lean_mlp: bool = opt(True, "SwiGLU MLPs keep two of their four [tokens, intermediate] activations for backward "
                         "and recompute the rest (same numbers, no extra matmul).")
    disable_dropout: bool = opt(True, "Turn off every dropout layer in the model (and the reference).")
    lora: LoraConfig | None = opt(None, "LoRA block (r, alpha, dropout, target_modules, merge); absent = full fine-tuning.")
    # Data
    dataset: str | None = opt(
        None,
        "Training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a hub dataset name, or a "
        "built-in task ('arithmetic', 'arithmetic:levels=1-2,n=500'). Default: the command's built-in task.",
    )
    dataset_config: str | None = opt(None, "Configuration (subset) name of a hub dataset, as datasets.load_dataset's `name`.")
    dataset_split: str = opt("train", "Split to read from hub datasets.")
    eval_dataset: str | None = opt(None, "Evaluation data, same forms as `dataset`.")
    eval_split: str = opt("test", "Split to read from hub datasets for evaluation.")
    skip_invalid: bool = opt(False, "Skip malformed rows (reported with counts at the end) instead of stopping.")
    max_length: int = opt(1024, "Maximum tokens per sequence (prompt + completion); completions are cut at the end.")
    max_prompt_length: int | None = opt(None, "Maximum prompt tokens; longer prompts keep their end.")
    max_samples: int | None = opt(None, "Use only the first N rows of the training data.")
    eval_max_samples: int | None = opt(None, "Use only the first N rows of the evaluation data.")
    # Optimisation
    output_dir: str | None = opt(None, "Run directory (config, metrics, checkpoints, final model). Default: runs/<command>, "
                                 "or the first free runs/<command>-2, -3, ... when that holds a run (the run prints "
                                 "where it went). A folder that already holds a run is refused unless resuming or "
                                 "overwrite_output_dir.")
    overwrite_output_dir: bool = opt(False, "Start afresh in an output_dir that holds another run: its logs, checkpoints "
                                     "and model are deleted first (other files stay). Not needed to resume.")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 means derive from num_epochs.")
    num_epochs: float = opt(1.0, "Passes over the training data (used when max_steps is -1).")
    batch_size: int = opt(8, "GLOBAL batch: examples per optimizer step, over all devices and accumulation steps.")
    micro_batch_size: int = opt(
        2, "Examples per forward/backward on ONE device; batch_size / (micro_batch_size x devices) is the accumulation."
    )
    learning_rate: float = opt(2e-5, "Peak learning rate of AdamW.")
    lr_scheduler: str = opt("linear", "Learning-rate decay after warmup.", ("linear", "cosine", "constant"))
    warmup_ratio: float = opt(0.0, "Fraction of the optimizer steps spent warming up linearly from 0.")
    warmup_steps: float = opt(0, "Warmup steps (overrides warmup_ratio when > 0); below 1: a fraction of the run's steps.")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    max_nonfinite_steps: int = opt(5, "A step whose loss or gradient is NaN/Inf is skipped (weights and optimizer state "
                                   "unchanged; counted in the nonfinite_skipped metric). After this many in a row "
                                   "the run stops with a checkpoint; 0: never stop.")
    seed: int = opt(42, "Seed for initialisation, data order, dropout and sampling.")
    # Run management
    logging_strategy: str = opt("steps", "When to write a metrics.jsonl row: every logging_steps, at each epoch's end, "
                                "or no (only the last step).", STRATEGIES)
    logging_steps: float = opt(1, "Write a metrics.jsonl row every N optimizer steps; below 1: a fraction of the run.")
    eval_strategy: str = opt("steps", "When to evaluate (with an eval set): every eval_steps, at each epoch's end, or "
                             "no (never, not even at the end).", STRATEGIES)
    eval_steps: float = opt(0, "Evaluate every N optimizer steps (0: only at the end, when an eval set is given); "
                            "below 1: a fraction of the run.")
    eval_batch_size: int = opt(8, "Examples per forward during evaluation, per device.")
    save_strategy: str = opt("steps", "When to write a checkpoint: every save_steps, at each epoch's end, when the "
                             "eval metric improves (best), or no.", STRATEGIES + ("best",))
    save_steps: float = opt(0, "Write a checkpoint every N optimizer steps (0: none until the end); below 1: a "
                            "fraction of the run.")
    save_total_limit: int | None = opt(None, "Keep at most this many checkpoints (oldest are deleted; the best is kept).")
    load_best_model_at_end: bool = opt(False, "After training, load the checkpoint with the best metric_for_best_model "
                                       "and save it as the final model (a checkpoint is written at every eval that "
                                       "improves it).")
    metric_for_best_model: str | None = opt(None, "Eval metric that ranks checkpoints: loss, rewards/accuracies, "
                                            "accuracy, ... (eval_ or eval/ prefix optional). Default: loss.")
    greater_is_better: bool | None = opt(None, "Whether a larger metric_for_best_model is better (default: false for "
                                         "metrics ending in loss, true otherwise).")
    resume_from_checkpoint: str | None = opt(None, "'latest' (the newest in output_dir) or a checkpoint folder.")
    progress: bool = opt(True, "Show a progress bar on the console.")
    report_to: list = opt([], "Trackers that get every metrics.jsonl row under the same names: tensorboard (in "
                          "output_dir/tensorboard), trackio, wandb; 'all' (those installed) or 'none' as in TRL.")
    run_name: str | None = opt(None, "Name of the run in trackers and in report overlays (default: output_dir's folder name).")
    diagnostics: DiagnosticsConfig | None = opt(
        DiagnosticsConfig(), "Live failure diagnostics (thresholds below); false turns them off.")
    distributed: str = opt(
        "ddp",
        "Under torchrun with several processes: ddp replicates weights and optimizer state on every device; "
        "fsdp shards them (FSDP2), for models whose training state does not fit one device. One process: unused.",
        ("ddp", "fsdp"),
    )

    command = "train"

    def validate(self) -> None:
        """Check values before any model is loaded; raise UserError with the key name."""
        checks = [
            (self.learning_rate >= 0, "learning_rate must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
            (self.max_steps == -1 or self.max_steps >= 1, "max_steps must be -1 or >= 1"),
            (self.num_epochs > 0, "num_epochs must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.max_nonfinite_steps >= 0, "max_nonfinite_steps must be >= 0"),
            (self.logging_steps > 0, "logging_steps must be > 0"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1"),
            (self.max_samples is None or self.max_samples >= 1, "max_samples must be >= 1"),
            (self.eval_max_samples is None or self.eval_max_samples >= 1, "eval_max_samples must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        for key in ("warmup_steps", "logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, key)
            if value < 0 or (value >= 1 and not float(value).is_integer()):
                raise UserError(f"{key} must be a whole number of steps, or a fraction of the run in [0, 1); got {value}")
        if self.lora is not None and self.lora.r < 1:
            raise UserError("lora.r must be >= 1")
        resolve_report_to(self.report_to, installed_only=False)  # names are checked before any model loads
        d = self.diagnostics
        if d is not None and (d.window < 2 or d.sparse_reward_steps < 1 or d.collapse_within < 1):
            raise UserError("diagnostics: window must be >= 2, sparse_reward_steps and collapse_within >= 1")
        if self.save_strategy == "best" and not self.eval_dataset:
            raise UserError("save_strategy=best needs an eval_dataset to rank checkpoints by")
        if self.load_best_model_at_end and (not self.eval_dataset or self.eval_strategy == "no"):
            raise UserError("load_best_model_at_end needs an eval_dataset and an eval_strategy other than 'no'")

    def resolved_output_dir(self) -> str:
        return self.output_dir or f"runs/{self.command}"

    def best_metric(self) -> tuple[str, bool]:
        """(the eval metric's key in metrics.jsonl, whether larger is better) for the best checkpoint."""
        name = self.metric_for_best_model or "loss"
        for prefix in ("eval/", "eval_"):
            name = name.removeprefix(prefix)
        greater = self.greater_is_better if self.greater_is_better is not None else not name.endswith("loss")
        return f"eval/{name}", greater


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: next-token loss on completions (prompt-completion data) or assistant turns
    (conversations), or on every token of plain text."""

    packing: bool = opt(False, "Concatenate examples into rows of max_length (no padding); attention stays per example.")
    completion_only_loss: bool = opt(True, "Prompt-completion data: loss on completion tokens only.")
    truncation_mode: str = opt("keep_start", "Sequences over max_length keep their first tokens (keep_start) or their "
                               "last (keep_end).", ("keep_start", "keep_end"))
    assistant_only_loss: bool = opt(True, "Conversations: loss on assistant turns only.")
    prompt_suffix: str | None = opt(None, "Prompt-completion data: text appended to every prompt (as `posttrain grpo` "
                                    "and `posttrain eval` append it, so a warm-up trains on the prompts RL will see).")
    chat_prompts: bool = opt(False, "Prompt-completion data with text fields: send the prompt as a user turn and the "
                             "completion as the assistant's reply through the chat template (as `posttrain grpo` "
                             "and `posttrain eval` send prompts); off: the texts are concatenated as they are (TRL).")
    command = "sft"


# ---------------------------------------------------------------------------------------------------
# Building a config from YAML + key=value overrides, with typed checking and line-numbered errors.


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _coerce(value: Any, tp, where: str, name: str = "", lines: dict | None = None):
    """Check/convert one value to the field's type; YAML already parsed scalars. `name` (dotted key) and
    `lines` let a nested block report its own keys' lines."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        if value is False and type(None) in args and any(dataclasses.is_dataclass(a) for a in args):
            return None  # `diagnostics: false`: an optional block turned off
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, name, lines)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build_dataclass(tp, value, prefix=(name or where) + ".", lines=lines)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan in YAML: no setting means that, and training would diverge
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, str):
            # "0.8,0.2" on the command line: each item parsed like a YAML scalar (numbers stay numbers).
            value = [_scalar(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        item = (typing.get_args(tp) or (None,))[0]
        return value if item is None else [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _scalar(text: str):
    """A command-line value read as YAML would read it; text that is not valid YAML stays text."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text


def config_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)]


def build_dataclass(cls, values: dict, prefix: str = "", lines: dict | None = None):
    """Instantiate `cls` from a (nested) dict, failing on unknown keys with a did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in config_fields(cls)}
    kwargs = {}
    for key, value in values.items():
        key = key if isinstance(key, str) else str(key)  # YAML keys may be numbers or dates
        name = prefix + key
        where = (lines or {}).get(name, "") + name
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}: unknown key for '{getattr(cls, 'command', cls.__name__)}'{hint}")
        choices = names[key].metadata.get("choices")
        if isinstance(value, bool) and choices:
            # YAML reads no / off / yes / on as booleans; a choice spelled that way (TRL's `eval_strategy: no`) is meant
            spelled = [c for c in choices if isinstance(c, str) and _scalar(c) is value]
            value = spelled[0] if spelled else value
        kwargs[key] = _coerce(value, hints[key], where, name, lines)
        if choices and kwargs[key] not in choices and kwargs[key] is not None:
            raise UserError(f"{where}: {kwargs[key]!r} is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


def _yaml_key_lines(path: str, text: str) -> dict[str, str]:
    """Map dotted keys to 'file:line: ' so errors point at the line the user wrote."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                name = prefix + str(k.value)
                if name in out and k.value != "<<":
                    # PyYAML keeps the last value without a word; setting a key twice is a mistake to report.
                    first = out[name].rsplit(":", 2)[-2]
                    raise UserError(f"{path}:{k.start_mark.line + 1}: {name}: set twice (first on line {first})")
                out[name] = f"{path}:{k.start_mark.line + 1}: "
                walk(v, name + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return out


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        cur = d.get(p)
        if cur is None or cur is True:  # `lora: true` / absent: an empty block the override fills
            cur = d[p] = {}
        if not isinstance(cur, dict):
            raise UserError(f"{dotted}: {'.'.join(parts[: i + 1])} is a single value, not a block of keys")
        d = cur
    d[parts[-1]] = value


def read_yaml(config_file: str) -> tuple[dict, dict[str, str]]:
    """A YAML config file -> (its mapping, dotted key -> 'file:line: ')."""
    try:
        text = open(config_file, encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"{config_file}: cannot read config ({e.strerror})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.reader.ReaderError as e:  # a control character, e.g. binary data in the file
        line = text.count("\n", 0, e.position) + 1
        raise UserError(f"{config_file}:{line}: invalid YAML (character {e.character!r} is not allowed)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{config_file}:{mark.line + 1}" if mark else config_file
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"{loc}: invalid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{config_file}: YAML nested too deeply") from None
    if not isinstance(values, dict):
        raise UserError(f"{config_file}:1: the config must be a mapping of key: value")
    return _str_keys(values), _yaml_key_lines(config_file, text)


def _str_keys(value):
    """YAML keys may be numbers or dates (`2020-01-01: x`); as names they are their text."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _str_keys(v) for k, v in value.items()}
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """`key=value` strings (dotted keys for nested blocks), each value parsed like a YAML scalar."""
    values: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"argument '{item}': expected key=value")
        key, raw = item.split("=", 1)
        value = _scalar(raw) if raw.strip() else ""
        _set_dotted(values, key.strip(), value)
    return values


def load_config(cls: type, config_file: str | None, overrides: list[str], *, world_size: int | None = None,
                with_translated: bool = False):
    """YAML file (optional) + `key=value` overrides (dotted keys for nested blocks) -> validated config.

    Either may use TRL's names (`posttrain.trl_compat`); `world_size` (default: from the launcher's
    environment) turns TRL's per-device batch into the global one. With `with_translated`, also returns the
    given keys in posttrain's names (what `posttrain convert-config` prints)."""
    from posttrain.trl_compat import TRLConfigError, translate

    file_values, lines = read_yaml(config_file) if config_file else ({}, {})
    try:
        values = translate(cls, file_values, parse_overrides(overrides), lines, world_size=world_size)
    except TRLConfigError as e:
        raise UserError(str(e)) from None
    cfg = build_dataclass(cls, values, lines=lines)
    demo = getattr(cls, "demo", None)
    if demo and getattr(cfg, "dataset", "") is None:
        # No dataset given: the command's built-in task with settings that finish in minutes on a CPU,
        # except for the keys the user set.
        for key, value in demo.items():
            if key not in values:
                setattr(cfg, key, copy.deepcopy(value))  # a block (lora) is the run's own
    cfg.validate()
    return (cfg, values) if with_translated else cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls) -> str:
    """Help text: every field with its type, default and documentation."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in config_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "on" if dataclasses.is_dataclass(default) else repr(default)  # a block: its keys follow
        choices = f.metadata.get("choices")
        extra = f" (one of: {', '.join(choices)})" if choices else ""
        rows.append(f"  {f.name} ({_type_name(hints[f.name])}, default {shown}){extra}\n      {f.metadata.get('help', '')}")
        sub = hints[f.name]
        for a in typing.get_args(sub) or (sub,):
            if dataclasses.is_dataclass(a):
                for g in config_fields(a):
                    gd = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                    gt = _type_name(typing.get_type_hints(a)[g.name])
                    rows.append(f"    {f.name}.{g.name} ({gt}, default {gd!r})\n        {g.metadata.get('help', '')}")
    return "\n".join(rows)
