"""`posttrain convert-config TRL.yaml > posttrain.yaml`: a TRL config in posttrain's own names.

The translation itself is `posttrain.trl_compat` (every command runs TRL configs as they are); this prints its
result, so a user can see and keep what their TRL file means here.
"""

from __future__ import annotations

import importlib

import yaml

from posttrain.cli import COMMANDS, ToolArgs, ToolSpec
from posttrain.config import UserError, config_to_dict, load_config, read_yaml
from posttrain.trl_compat import ALIASES, applies, fields_of

TRAINERS = ("sft", "dpo", "kto", "rm", "grpo", "online-dpo")
INFERRED = ("sft", "dpo", "kto", "rm", "grpo")  # online-dpo shares its keys with dpo and grpo: name it with --command

TOOL = ToolSpec(
    usage="posttrain convert-config TRL.yaml [--command sft|dpo|kto|rm|grpo|online-dpo] [--processes N] [--full]",
    positionals=(1, 1),
    flags={"--command": str, "--processes": int, "--full": bool},
    help="""
Print a TRL config (TrainingArguments + trainer config + script/model arguments) in posttrain's own names,
as YAML on stdout; the options it ignores are listed on stderr. Without --command the trainer is inferred
from keys only one trainer has. --processes: how many processes TRL ran with (the global batch is
per_device_train_batch_size x gradient_accumulation_steps x processes; default: WORLD_SIZE or 1).
--full prints every key of the resolved config, defaults included. key=value settings apply on top.
""",
)


def _command_keys(cls) -> set[str]:
    fields = fields_of(cls)
    keys = set(fields)
    keys |= {k for k, a in ALIASES.items() if applies(a.target, fields)}
    return keys


def infer_command(values: dict) -> str:
    """The trainer whose config alone has some of `values`' keys (in posttrain's or TRL's names)."""
    configs = {name: importlib.import_module(COMMANDS[name][0]).Config for name in INFERRED}
    keys = {name: _command_keys(cls) for name, cls in configs.items()}
    candidates = []
    for name, own in keys.items():
        others = set().union(*(k for n, k in keys.items() if n != name))
        if set(values) & (own - others):
            candidates.append(name)
    if len(candidates) != 1:
        found = f"keys of {', '.join(candidates)}" if candidates else "no trainer-specific key"
        raise UserError(f"cannot tell which trainer this config is for ({found}); add --command sft|dpo|kto|rm|grpo")
    return candidates[0]


def main(args: ToolArgs) -> int:
    path = args.positionals[0]
    values, _ = read_yaml(path)
    command = args.flags["--command"] or infer_command(values)
    if command not in TRAINERS:
        raise UserError(f"--command: {command!r} is not a training command ({', '.join(TRAINERS)})")
    cls = importlib.import_module(COMMANDS[command][0]).Config
    world = args.flags["--processes"]
    if world is not None and world < 1:
        raise UserError("--processes must be >= 1")
    cfg, translated = load_config(cls, path, args.settings, world_size=world, with_translated=True)
    out = config_to_dict(cfg) if args.flags["--full"] else translated
    print(f"# posttrain {command} --config THIS_FILE   (converted from {path})")
    print(yaml.safe_dump(out, sort_keys=False).rstrip())
    return 0
