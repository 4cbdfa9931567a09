"""`posttrain memory COMMAND [key=value ...] [--json] [--budget GB]`: what a training run holds in memory, per
device, before it runs: every component, which models are loaded and why, the total, and what would make it fit.

The settings are the training command's own (`load_config` on its Config), so the defaults are the ones the run
would use. Three settings belong to the planner: `nproc` (devices the run is spread over), `device` (cpu or gpu)
and `lengths`. The micro-batch is the largest the run can meet: its data's longest examples together, tokenized
and truncated as training does (`lengths=data`, when the data is a local file or built-in task and the
tokenizer is at hand), else every sequence at the length limits (`max_length`; GRPO: prompts at
`max_prompt_length`, completions at `max_completion_length`).

How the numbers are made (posttrain keeps weights, gradients and AdamW state in float32; `bf16` is autocast):
- weights, gradients and optimizer state: 4, 4 and 8 bytes per parameter; the parameter counts come from the
  model's shape (`Shape.params` reproduces transformers' own count).
- activations: what autograd keeps between forward and backward, per token and per decoder layer
  (`layer_saved_bytes`: each term is a tensor the layer saves, verified against autograd's saved tensors in
  tests/test_memory.py), plus the final norm, the scored positions of the chunked LM head, the rotary tables
  and the attention masks.
- the peak is the largest of the run's phases: the backward of the largest micro-batch (gradients
  are written while activations are freed, so both are counted only as far as they coexist), the optimizer
  step, generation (GRPO, PPO: the KV cache of one generation's prompts) and the precompute pass of the reference.
- PPO's critic: `critic=shared` is a value head on the policy (H + 1 float32 parameters, trained with it);
  `critic=separate` a second model (from value_model, else reward_model, else the policy's weights) in float32
  with its own trained weights or adapter, gradients, AdamW state and activations of its forward.
- on CPU the total includes the runtime itself (Python, torch, transformers, the tokenizer, threads), measured
  here (`RUNTIME_BYTES`), so it compares directly with a process's peak RSS (benchmarks/MEMORY.md). On GPUs the
  same formulas are allocator-level estimates (what torch.cuda.max_memory_allocated would report), not
  measured in this repository; the CUDA context comes on top.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.activations import Batch, Training, bf16_weight_copies, layer_extra_bytes, layer_saved_bytes
from posttrain.cli import ToolArgs, ToolSpec
from posttrain.config import UserError, load_config
from posttrain.shapes import DTYPE_BYTES, LINEARS, PRESETS, SIZE_ALIASES, Shape, model_shape

GiB = 1 << 30

# Peak RSS of a process that has imported posttrain, torch, transformers and peft, loaded a tokenizer and run
# its first forward/backward on a tiny model: the part of every run's peak that is not tensors. Measured on
# this machine with `python benchmarks/memory_validation.py baseline` (0.378 GiB; benchmarks/MEMORY.md).
RUNTIME_BYTES = int(0.38 * GiB)


def auto_chunk(vocab: int) -> int:
    from posttrain.logprobs import auto_chunk as chunk

    return chunk(vocab)


# ---------------------------------------------------------------------------------------------------------
# Commands: how each training command uses memory. A new command is one entry of RECIPES.


@dataclass(frozen=True)
class Generation:
    """Sampling before the step (online methods): `rows` sequences of `length` tokens in the KV cache."""

    rows: int
    length: int
    prompts: int  # unique prompts prefilled at once
    prompt_length: int


@dataclass(frozen=True)
class Extra:
    """A frozen model besides the policy and its reference (a reward model, a critic)."""

    name: str
    params: int
    why: str


@dataclass(frozen=True)
class Recipe:
    """A training command as the planner sees it.

    module      where the command's Config lives
    unit        what micro_batch_size counts
    batch       cfg, shape, data -> the largest micro-batch (Batch); data: per-example lengths or None
    reference   cfg -> reference strategy: none, precomputed, adapter or copy (posttrain/reference.py)
    head        "lm" (a causal LM) or "score" (a reward model)
    generation  cfg, nproc, data -> Generation or None
    extras      cfg, shape -> frozen models besides policy and reference (a reward model; PPO's critic)
    """

    module: str
    unit: str
    batch: Callable
    reference: Callable = lambda cfg: "none"
    head: str = "lm"
    generation: Callable = lambda cfg, nproc, data=None: None
    extras: Callable = lambda cfg, shape: []

    def accumulation(self, cfg, nproc: int) -> int:
        """Micro-batches per optimizer step on one device."""
        per_device = cfg.batch_size // max(nproc, 1)
        if self.unit == "completions":
            per_device *= cfg.num_generations
        return max(1, math.ceil(per_device / cfg.micro_batch_size))


def _padded(rows: int, width: int, scored: int, what: str, uneven: bool = True) -> Batch:
    """Right-padded rows. Rows of different lengths carry a padding mask (transformers: [rows, 1, width, width] in
    the weights' dtype, here in float32 bytes, kept for backward, and the key/value heads repeated); rows all of one length get none, which only
    data whose every example has one length guarantees (`uneven` False)."""
    masked = rows > 1 and uneven
    return Batch(rows * width, scored, rows, width, masked, 4 * rows * width * width if masked else 0, what)


def _packed(units: list[tuple[int, list[int]]], scored: int, what: str) -> Batch:
    """Units (a prompt and the completions that continue it) packed into one row and attended one unit at a time
    (posttrain.logprobs.shared_prefix_token_logps). Its cached [c, p + c] boolean masks are shared by the layers."""
    tokens = sum(p + sum(cs) for p, cs in units)
    copies = sum(p + c for p, cs in units for c in cs)
    cells = sum(c * (p + c) for p, cs in units for c in cs)
    return Batch(tokens, scored, 1, tokens, False, cells, what, units=True, kv_copies=copies, mask_cells=cells,
                 prompt_tokens=sum(p for p, _ in units))


def _longest(values: list, n: int, key=None) -> list:
    return sorted(values, key=key, reverse=True)[:n]


# Each batch function gives the worst micro-batch: at the length limits (`data` None), or the longest examples of
# the run's own data together (`data`: per-example lengths after truncation, from `data_lengths`).


def sft_batch(cfg, s: Shape, data: list | None = None) -> Batch:
    B, T = cfg.micro_batch_size, cfg.max_length
    if cfg.packing:  # packed rows fill max_length whatever the data
        b = _padded(B, T, B * (T - 1), f"{B} packed rows x {T} tokens")
        return dataclasses.replace(b, masked=True, mask_bytes=5 * B * T * T)  # boolean block mask + its additive copy
    if data:
        top = _longest(data, B)
        return _padded(len(top), top[0], sum(top) - len(top), f"the {len(top)} longest sequences, padded to {top[0]}",
                       len(set(data)) > 1)
    return _padded(B, T, B * (T - 1), f"{B} sequences x {T} tokens")


def dpo_batch(cfg, s: Shape, data: list | None = None) -> Batch:
    B, T = cfg.micro_batch_size, cfg.max_length
    if data:  # (prompt, chosen, rejected) tokens kept
        if cfg.shared_prefix:
            top = _longest(data, B, key=sum)
            return _packed([(p, [c, r]) for p, c, r in top], sum(c + r for _, c, r in top),
                           f"the {len(top)} longest pairs, each prompt once with both completions: "
                           f"{sum(map(sum, top))} positions")
        top = _longest(data, B, key=lambda x: x[0] + max(x[1:]))
        width = max(p + max(c, r) for p, c, r in top)
        return _padded(2 * len(top), width, sum(c + r for _, c, r in top),
                       f"the {len(top)} longest pairs = {2 * len(top)} sequences padded to {width}")
    if cfg.shared_prefix:
        # Worst case: a one-token prompt, so each side keeps T - 1 completion tokens: 2T - 1 positions a pair.
        return _packed([(1, [T - 1, T - 1])] * B, 2 * B * (T - 1),
                       f"{B} pairs, each prompt once with both completions: {B} x {2 * T - 1} positions")
    return _padded(2 * B, T, 2 * B * (T - 1), f"{B} pairs = {2 * B} sequences x {T} tokens")


def kto_batch(cfg, s: Shape, data: list | None = None) -> Batch:
    B, T = cfg.micro_batch_size, cfg.max_length
    if data:
        top = _longest(data, B)
        return _padded(len(top), top[0], sum(top) - len(top), f"the {len(top)} longest examples, padded to {top[0]}",
                       len(set(data)) > 1)
    return _padded(B, T, B * (T - 1), f"{B} examples x {T} tokens")


def rm_batch(cfg, s: Shape, data: list | None = None) -> Batch:
    """Pairs of whole sequences. shared_prefix (the default): the tokens chosen and rejected share run once, both
    continuations packed after them (posttrain.algorithms.rm.packed_rewards, the unit layout); else 2B padded rows."""
    B, T = cfg.micro_batch_size, cfg.max_length
    packed = getattr(cfg, "shared_prefix", False)
    if data:  # (chosen, rejected, shared) tokens kept
        if packed:
            top = _longest(data, B, key=lambda x: x[0] + x[1] - x[2])
            return _packed([(p, [c - p, r - p]) for c, r, p in top], 0,
                           f"the {len(top)} longest pairs, the shared first tokens once with both continuations: "
                           f"{sum(c + r - p for c, r, p in top)} positions")
        top = _longest(data, B, key=lambda x: max(x[:2]))
        width = max(max(x[:2]) for x in top)
        flat = [v for x in data for v in x[:2]]
        return _padded(2 * len(top), width, 0, f"the {len(top)} longest pairs = {2 * len(top)} sequences padded to "
                       f"{width}", len(set(flat)) > 1)
    if packed:  # worst case: one shared token, then T - 1 of each sequence's own
        return _packed([(1, [T - 1, T - 1])] * B, 0, f"{B} pairs, the shared first token once with both "
                       f"continuations: {B} x {2 * T - 1} positions")
    return _padded(2 * B, T, 0, f"{B} pairs = {2 * B} sequences x {T} tokens")


def _group_counts(N: int, G: int) -> list[int]:
    """Completions per prompt in the worst micro-batch of N rows cut from groups of G: micro-batch j starts at
    row j * N, i.e. at offset j * N mod G into a group, a multiple of gcd(N, G); the latest start, G - gcd, spans
    the most prompts."""
    offset = G - math.gcd(N, G)
    counts, left = [min(N, G - offset)], N - min(N, G - offset)
    while left:
        counts.append(min(G, left))
        left -= counts[-1]
    return counts


def grpo_batch(cfg, s: Shape, data: list | None = None) -> Batch:
    N, G, C = cfg.micro_batch_size, cfg.num_generations, cfg.max_completion_length
    counts = _group_counts(N, G)
    prompts = _longest(data, len(counts)) if data else [cfg.max_prompt_length or cfg.max_length] * len(counts)
    units = [(p, [C] * k) for p, k in zip(prompts, sorted(counts, reverse=True))]
    what = "the longest prompts" if data else "prompts"
    sizes = ", ".join(map(str, prompts)) if len(set(prompts)) > 1 and len(prompts) <= 8 else \
        (f"{prompts[0]}" if len(set(prompts)) == 1 else f"{max(prompts)} down to {min(prompts)}")
    return _packed(units, N * C, f"{N} completions x {C} tokens after {len(counts)} of {what} ({sizes} tokens)")


def grpo_generation(cfg, nproc: int, data: list | None = None) -> Generation:
    """One generation samples every prompt of it at once (posttrain.rollout.generate.HFEngine): batch_size prompts,
    or generation_batch_size / num_generations (PPO: num_mini_batches x batch_size) when one generation serves
    several optimizer steps."""
    per_generation = (cfg.generation_batch_size // cfg.num_generations) if getattr(cfg, "generation_batch_size", None) \
        else cfg.batch_size
    prompts = max(1, per_generation // max(nproc, 1))
    P = max(data) if data else (cfg.max_prompt_length or cfg.max_length)
    return Generation(prompts * cfg.num_generations, P + cfg.max_completion_length, prompts, P)


def data_lengths(command: str, cfg) -> tuple[list | None, str]:
    """Per-example token counts of the run's own data after truncation, tokenized as training tokenizes it
    (posttrain.data.lengths.tokenize), or None and why not (no readable data, no tokenizer for a preset model)."""
    from posttrain.data.lengths import read_valid, tokenize
    from posttrain.data.tasks import builtin_task
    from posttrain.models import load_tokenizer

    # With no dataset, every training command trains on its built-in task (arithmetic).
    spec = cfg.dataset or getattr(importlib.import_module(RECIPES[command].module), "DEFAULT_DATASET", "arithmetic")
    local = Path(spec).expanduser().exists()
    try:
        builtin = not local and builtin_task(spec, "prompt", split="train") is not None
    except ValueError:
        builtin = False
    if not (local or builtin):  # hub datasets are not downloaded to plan
        return None, f"lengths at the limits ({spec} is not a local file, folder or built-in task)"
    tokenizer = cfg.tokenizer or cfg.model
    if not Path(tokenizer).expanduser().exists() and tokenizer.lower() in {**PRESETS, **SIZE_ALIASES}:
        return None, f"lengths at the limits (the preset {tokenizer} has no tokenizer here; tokenizer=PATH reads the data)"
    try:
        fmt, rows, _ = read_valid(spec, command, cfg.dataset_split, cfg.max_samples)
        tok = load_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code, cfg.chat_template)
    except (UserError, OSError) as e:
        return None, f"lengths at the limits ({str(e).splitlines()[0][:120]})"
    items, _ = tokenize(command, fmt, rows, tok, cfg)
    out = []
    for it in items:
        k = it.kept
        if k is None:  # dropped by the limits: training never sees it
            continue
        if command in ("grpo", "online-dpo", "ppo"):
            out.append(k["prompt"])
        elif command == "rm":
            out.append((k["chosen_sequence"], k["rejected_sequence"], it.shared_prefix or 0))
        elif command == "dpo":
            out.append((k["prompt"], k["chosen"], k["rejected"]))
        elif "chosen" in k:  # kto on pairs: two examples
            out += [k["prompt"] + k["chosen"], k["prompt"] + k["rejected"]]
        else:
            out.append(k.get("sequence", k.get("prompt", 0) + k.get("completion", 0)))
    if not out:
        return None, "lengths at the limits (no example survives truncation)"
    return out, f"lengths from {spec} ({len(items)} rows, tokenized as training does)"


def _offline_reference(cfg) -> str:
    from posttrain.reference import choose

    needed = not getattr(cfg, "reference_free", lambda: False)()
    return choose(needed=needed, path=cfg.ref_model, precompute=cfg.precompute_ref_log_probs, lora=cfg.lora is not None)


def _online_dpo_reference(cfg) -> str:
    from posttrain.reference import choose

    needed = not cfg.reference_free()
    return choose(needed=needed, path=getattr(cfg, "ref_model", None), lora=cfg.lora is not None)


def _grpo_reference(cfg) -> str:
    """The online methods load a reference when a KL needs one: beta (in the loss) or kl_coef (in the reward)."""
    from posttrain.reference import choose

    needed = cfg.beta > 0 or getattr(cfg, "kl_coef", 0) > 0
    return choose(needed=needed, path=getattr(cfg, "ref_model", None), lora=cfg.lora is not None)


def head_bytes(scored: int, vocab: int, hidden: int, w: int, wrapped: bool = False) -> int:
    """The LM head over `scored` positions at the start of backward (posttrain.logprobs): the softmax chunks kept
    from forward, up to KEEP_BYTES (chunk by chunk, in order), the chunk being worked on and its gradient, and
    the hidden states' gradient. A head carrying a LoRA adapter runs as a module instead: [scored, vocab] float32
    logits at once, with the softmax autograd keeps beside them."""
    if wrapped:
        return 3 * 4 * scored * vocab + w * hidden * scored
    c = min(auto_chunk(vocab), scored)
    return head_kept_bytes(scored, vocab) + 2 * 4 * c * vocab + w * hidden * scored


def head_kept_bytes(scored: int, vocab: int) -> int:
    """The softmax chunks the chunked LM head keeps from forward for backward (up to logprobs.KEEP_BYTES, whole
    chunks in order). They hang on the autograd node, not in its saved tensors, so backward does not free them:
    they live while the micro-batch's loss is referenced, which the engine's loop does until the next
    micro-batch's forward has returned (measured: benchmarks/MEMORY.md)."""
    from posttrain.logprobs import KEEP_BYTES

    c = min(auto_chunk(vocab), scored) if scored else 0
    kept, budget = 0, KEEP_BYTES
    for start in range(0, scored, max(c, 1)):
        size = 4 * min(c, scored - start) * vocab
        if size > budget:
            break
        kept, budget = kept + size, budget - size
    return kept


def _grpo_extras(cfg, s: Shape) -> list[Extra]:
    funcs = cfg.reward_funcs or (["reward_model"] if cfg.reward_model else [])
    if "reward_model" not in funcs or not cfg.reward_model or getattr(cfg, "reward_isolation", "thread") == "process":
        return []  # reward_isolation=process: it lives in a worker process of its own
    why = f"scores completions (reward_model={cfg.reward_model})"
    if Path(cfg.reward_model).expanduser().exists():
        rm = model_shape(cfg.reward_model, cfg.trust_remote_code)
    else:  # not trained yet (or on another machine): a reward model is usually trained from the policy's base
        rm, why = s, why + " (not found here: the policy's shape assumed)"
    return [Extra("reward model", rm.params("score"), why)]


@dataclass(frozen=True)
class CriticModel:
    """A separate critic (posttrain.critic.SeparateCritic): a sequence-classification model of its own, loaded in
    float32 whatever `dtype` says, with the policy's LoRA settings (an adapter of its own, its score head trained
    in full) or trained in full; the same optimizer trains it. A shared critic is only a value head (H + 1
    float32 parameters) on the policy's backbone and is counted with the policy's trained parameters."""

    shape: Shape
    training: Training
    trainable: int
    frozen: int
    why: str


def _critic(cfg, s: Shape, t: Training) -> CriticModel | None:
    if getattr(cfg, "critic", "none") != "separate":
        return None
    from posttrain.critic import choose

    source = choose("separate", value_model=cfg.value_model, reward_model=cfg.reward_model, model=cfg.model)
    why = f"value model from {source}"
    if source == cfg.model:
        shape = s
        why = "value model from the policy's weights (its head starts at 0)"
    elif Path(source).expanduser().exists() or source.lower() in {**PRESETS, **SIZE_ALIASES}:
        shape = model_shape(source, cfg.trust_remote_code)
    else:  # a reward model not trained yet: usually trained from the policy's base
        shape, why = s, why + " (not found here: the policy's shape assumed)"
    ct = dataclasses.replace(t, weight_bytes=4)  # posttrain.critic.build loads it in float32
    n = shape.params("score")
    if ct.full:
        return CriticModel(shape, ct, n, 0, why + "; every weight trained")
    adapters = shape.layers * sum(ct.lora_r * sum(shape.dims(m)) for m in ct.lora_targets if m in LINEARS)
    return CriticModel(shape, ct, adapters + shape.hidden, n, why + f"; a LoRA r={ct.lora_r} adapter of its own and its "
                       "head trained")


def online_dpo_batch(cfg, s: Shape, data: list | None = None) -> Batch:
    """Pairs of sampled completions (the best and the worst of each prompt's group), laid out as DPO lays out
    pairs: each prompt once with both completions, every completion at max_completion_length."""
    B, C = cfg.micro_batch_size, cfg.max_completion_length
    prompts = _longest(data, B) if data else [cfg.max_prompt_length or cfg.max_length] * B
    return _packed([(p, [C, C]) for p in prompts], 2 * B * C,
                   f"{B} sampled pairs x 2 x {C} tokens after {'the longest ' if data else ''}prompts of "
                   f"{max(prompts)} tokens")


RECIPES: dict[str, Recipe] = {
    "sft": Recipe("posttrain.algorithms.sft", "sequences", sft_batch),
    "dpo": Recipe("posttrain.algorithms.dpo", "pairs", dpo_batch, _offline_reference),
    "kto": Recipe("posttrain.algorithms.kto", "examples", kto_batch, _offline_reference),
    "rm": Recipe("posttrain.algorithms.rm", "pairs", rm_batch, head="score"),
    "grpo": Recipe("posttrain.algorithms.grpo", "completions", grpo_batch, _grpo_reference,
                   generation=grpo_generation, extras=_grpo_extras),
    "online-dpo": Recipe("posttrain.algorithms.online_dpo", "pairs", online_dpo_batch, _online_dpo_reference,
                         generation=grpo_generation, extras=_grpo_extras),
    # PPO is the online core with a critic: GRPO's micro-batches (num_generations 1 by default) and generation.
    "ppo": Recipe("posttrain.algorithms.ppo", "completions", grpo_batch, _grpo_reference,
                  generation=grpo_generation, extras=_grpo_extras),
}
# The reference-free preference losses, by name: `posttrain memory simpo` is `posttrain memory dpo loss_type=simpo`.
ALIASES = {"simpo": ("dpo", "loss_type=simpo"), "cpo": ("dpo", "loss_type=cpo"), "orpo": ("dpo", "loss_type=orpo")}

REFERENCE_NOTES = {
    "none": "no reference model",
    "precomputed": "precomputed log-probs (one pass before training, cached on disk): no reference model in memory",
    "adapter": "the policy with its LoRA adapter disabled: no second copy of the weights",
    "copy": "a frozen copy of the weights",
}


# ---------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """Memory of one run on one device. `components` hold what is live at the peak (they add up to `total`);
    `sizes` the full size of each; `phases` the total of every phase, the peak being the largest."""

    command: str
    shape: Shape
    device: str
    nproc: int
    settings: list
    models: list  # (name, why)
    batch: Batch
    accumulation: int
    components: dict
    sizes: dict
    phases: dict
    peak_phase: str
    notes: list = field(default_factory=list)
    lengths: str = ""  # where the micro-batch's lengths come from
    data: list | None = field(default=None, repr=False)  # the per-example lengths used (data_lengths)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def to_json(self) -> dict:
        return {
            "command": self.command, "model": self.shape.name, "parameters": self.shape.params(),
            "device": self.device, "nproc": self.nproc, "settings": self.settings,
            "total_bytes": self.total, "components": self.components, "sizes": self.sizes,
            "peak_phase": self.peak_phase, "phases": self.phases,
            "models": [{"name": n, "why": w} for n, w in self.models],
            "micro_batch": {**dataclasses.asdict(self.batch), "accumulation": self.accumulation,
                            "lengths": self.lengths},
            "notes": self.notes,
        }


@dataclass
class Run:
    """`posttrain memory COMMAND settings` resolved: the training command's config and the planner's own keys."""

    command: str
    recipe: Recipe
    cfg: object
    nproc: int = 1
    device: str = "cpu"
    lengths: str = "data"  # "data": the run's own data when it can be read and tokenized; "limits": max_length


PLANNER_KEYS = ("nproc", "device", "lengths")


def resolve(command: str, settings: list[str], config_file: str | None = None) -> Run:
    if command in ALIASES:
        command, extra = ALIASES[command]
        settings = [extra] + list(settings)
    if command not in RECIPES:
        names = ", ".join(list(RECIPES) + list(ALIASES))
        raise UserError(f"memory: unknown command '{command}' (one of: {names})")
    own, rest = {}, []
    for item in settings:
        key, _, value = item.partition("=")
        if key in PLANNER_KEYS:
            own[key] = value
        else:
            rest.append(item)
    try:
        nproc = int(own.get("nproc", "1"))
    except ValueError:
        raise UserError(f"nproc: expected an integer, got {own['nproc']!r}") from None
    if nproc < 1:
        raise UserError("nproc must be >= 1")
    device = own.get("device") or _default_device()
    if device not in ("cpu", "gpu"):
        raise UserError(f"device: {device!r} is not one of cpu, gpu")
    lengths = own.get("lengths", "data")
    if lengths not in ("data", "limits"):
        raise UserError(f"lengths: {lengths!r} is not one of data, limits")
    recipe = RECIPES[command]
    cfg = load_config(importlib.import_module(recipe.module).Config, config_file, rest)
    return Run(command, recipe, cfg, nproc, device, lengths)


def _default_device() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def plan(command: str, settings: list[str], config_file: str | None = None, shape: Shape | None = None) -> Plan:
    run = resolve(command, settings, config_file)
    shape = shape or model_shape(run.cfg.model, run.cfg.trust_remote_code)
    data, source = None, "worst case at the length limits"
    if run.lengths == "data":
        data, source = data_lengths(run.command, run.cfg)
    p = estimate(run, shape, data, settings)
    p.lengths, p.data = source, data
    return p


def training_of(cfg, shape: Shape) -> Training:
    dtype = getattr(cfg, "dtype", "float32")
    w = DTYPE_BYTES[shape.dtype if dtype == "auto" else dtype]
    if cfg.lora is None:
        return Training(lean_mlp=cfg.lean_mlp, checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16, weight_bytes=w)
    targets = cfg.lora.target_modules
    targets = [targets] if isinstance(targets, str) else list(targets)
    if [str(m).lower() for m in targets] == ["all-linear"]:
        targets = list(LINEARS)  # peft's shorthand: every linear layer but the output head
    unknown = [m for m in targets if m not in (*LINEARS, "lm_head")]
    if unknown:
        raise UserError(f"lora.target_modules: {', '.join(map(str, unknown))} not found in the model (it has "
                        f"{', '.join(LINEARS)}, lm_head)")
    return Training(tuple(targets), cfg.lora.r, cfg.lean_mlp, cfg.gradient_checkpointing, cfg.bf16, w)


def estimate(run: Run, s: Shape, data: list | None = None, settings: list | None = None) -> Plan:
    """Every component of the run's memory on one device, by phase (see the module docstring). `data`: per-example
    lengths of the run's data (`data_lengths`); None: every sequence at the length limits."""
    command, recipe, cfg, nproc, device = run.command, run.recipe, run.cfg, run.nproc, run.device
    t = training_of(cfg, s)
    w, e = t.weight_bytes, t.e
    fsdp = nproc > 1 and cfg.distributed == "fsdp"
    shard = nproc if fsdp else 1
    N = s.params(recipe.head)
    H, V, L = s.hidden, s.vocab, s.layers

    # --- parameters ----------------------------------------------------------------------------------
    # Full fine-tuning trains the weights in their dtype (AdamW keeps its two moments in it too); peft keeps
    # LoRA adapters in float32 whatever the base.
    if t.full:
        trainable, frozen, tw = N, 0, w
    else:
        tw = 4
        per_layer = sum(t.lora_r * sum(s.dims(m)) for m in t.lora_targets if m in LINEARS)
        head = t.lora_r * (H + V) if "lm_head" in t.lora_targets else 0
        trainable = L * per_layer + head + (2 * H if recipe.head == "score" else 0)  # peft: the score head trains (+ its saved copy)
        frozen = N
    models = [("policy", f"{N / 1e6:,.1f}M parameters, " + (
        "every one trained (full fine-tuning)" if t.full else
        f"frozen, with LoRA r={t.lora_r} on {', '.join(t.lora_targets)} ({trainable / 1e6:,.2f}M trained)"))]
    strategy = recipe.reference(cfg)
    ref_params = 0
    if strategy == "copy":
        ref_params = model_shape(cfg.ref_model, cfg.trust_remote_code).params() if getattr(cfg, "ref_model", None) else N
        why = f"ref_model={cfg.ref_model}" if getattr(cfg, "ref_model", None) else REFERENCE_NOTES["copy"]
        if not t.full and not getattr(cfg, "ref_model", None):
            why += " of the base model"
        models.append(("reference", why + ("; held whole on every device" if fsdp else "")))
    elif strategy != "none":
        models.append(("reference", REFERENCE_NOTES[strategy]))
    extras = recipe.extras(cfg, s)
    models += [(x.name, f"{x.params / 1e6:,.1f}M parameters, frozen: {x.why}") for x in extras]
    critic = _critic(cfg, s, t)
    if critic is not None:
        models.append(("critic", f"{critic.shape.params('score') / 1e6:,.1f}M parameters ({critic.trainable / 1e6:,.2f}M "
                                 f"trained): {critic.why}"))
    elif getattr(cfg, "critic", "none") == "shared":
        models.append(("critic", f"a value head on the policy's backbone ({H + 1:,} parameters, trained with the "
                                 "policy): no second model"))

    sizes: dict[str, int] = {}
    sizes["trainable weights"] = tw * trainable // shard
    if frozen:
        sizes["frozen weights: policy base"] = w * frozen // shard
    if ref_params:
        sizes["frozen weights: reference"] = w * ref_params
    for x in extras:
        sizes[f"frozen weights: {x.name}"] = 4 * x.params  # loaded in float32 by the reward function
    sizes["optimizer state (AdamW)"] = 2 * tw * trainable // shard
    grads = tw * trainable // shard
    sizes["gradients"] = grads
    # Autocast keeps a bf16 cast of every weight it multiplies, full size even when FSDP shards the weights; FSDP
    # on GPUs gathers them in bf16 already (MixedPrecisionPolicy), so there is nothing left to cast.
    weight_copies = 0 if (fsdp and device == "gpu") else bf16_weight_copies(s, t)
    if weight_copies:
        sizes["bf16 weight copies"] = weight_copies
    if fsdp:
        # One block gathered for compute and the next prefetched, plus the root unit (embeddings, final norm,
        # head) while it runs; in bf16 on GPUs the gathers are bf16.
        g = 2 if (cfg.bf16 and device == "gpu") else w
        root = V * H * (1 if s.tied or recipe.head == "score" else 2) + H
        sizes["FSDP gathered parameters"] = g * (2 * s.layer_params() + root)
    if getattr(cfg, "critic", "none") == "shared":
        sizes["critic: value head + gradient + AdamW"] = 16 * (H + 1)  # float32
    grads_c = 0
    if critic is not None:  # attached to the policy: the same optimizer, sharding and wrappers
        sizes["critic: trainable weights"] = 4 * critic.trainable // shard
        if critic.frozen:
            sizes["critic: frozen weights"] = 4 * critic.frozen // shard
        sizes["critic: optimizer state (AdamW)"] = 8 * critic.trainable // shard
        grads_c = 4 * critic.trainable // shard
        sizes["critic: gradients"] = grads_c
        copies_c = 0 if (fsdp and device == "gpu") else bf16_weight_copies(critic.shape, critic.training)
        if copies_c:
            sizes["critic: bf16 weight copies"] = copies_c
        if nproc > 1 and not fsdp:
            sizes["DDP gradient buckets"] = sizes.get("DDP gradient buckets", 0) + grads_c
    if nproc > 1 and not fsdp and trainable:
        sizes["DDP gradient buckets"] = sizes.get("DDP gradient buckets", 0) + grads  # DDP's own flat buckets
    static = {k: v for k, v in sizes.items() if k not in ("gradients", "critic: gradients")}

    # --- one micro-batch -----------------------------------------------------------------------------
    batch = recipe.batch(cfg, s, data)
    acc = recipe.accumulation(cfg, nproc)
    T, S = batch.tokens, batch.scored
    per_layer = layer_saved_bytes(s, t, batch.masked, batch.units) * T + layer_extra_bytes(s, t, batch)
    if t.checkpointing:
        kept, recomputed = w * H * T, per_layer  # each layer keeps its input; backward rebuilds one layer at a time
    else:
        kept, recomputed = per_layer, 0
    rotary = 2 * w * s.head_dim * T  # cos and sin, in the hidden states' dtype
    final_norm = (4 * H + 4 + (w * H if t.full else 0)) * T
    head_in = (w * H + 16) * S  # the scored positions' hidden states, their log-sum-exp, target and log-prob
    masks = batch.mask_bytes if batch.units else batch.mask_bytes * w // 4  # a padding mask in the weights' dtype
    other = rotary + final_norm + head_in + masks
    activations = L * kept + recomputed + other
    sizes["activations"] = activations
    chunks = head_bytes(S, V, H, w, "lm_head" in t.lora_targets) if S else 0
    if chunks:
        sizes["logits / log-prob chunks"] = chunks
    # Gradient buffers flowing through one layer's backward: the lean MLP rebuilds its activation and four
    # [tokens, MLP] gradients; attention its q/k/v gradients.
    working = e * T * (5 * s.intermediate + 4 * H)
    acts_c = 0
    if critic is not None:
        # The critic's own forward over the same packed micro-batch (posttrain.algorithms.online._forward): its
        # layers, final norm and score head over the scored positions; no LM head.
        cs, ct = critic.shape, critic.training
        per_layer_c = layer_saved_bytes(cs, ct, batch.masked, batch.units) * T + layer_extra_bytes(cs, ct, batch)
        kept_c, recomputed_c = (4 * cs.hidden * T, per_layer_c) if ct.checkpointing else (per_layer_c, 0)
        other_c = (2 * 4 * cs.head_dim * T + (4 * cs.hidden + 4 + (4 * cs.hidden if ct.full else 0)) * T
                   + (4 * cs.hidden + 8) * S + batch.mask_bytes)
        acts_c = cs.layers * kept_c + recomputed_c + other_c
        sizes["critic: activations"] = acts_c
        working = max(working, ct.e * T * (5 * cs.intermediate + 4 * cs.hidden))
    sizes["backward buffers (one layer)"] = working

    # Gradients by where they are written: the LM head first (tied: the embedding matrix), then layer by layer.
    head_trainable = t.full and recipe.head == "lm"
    g_head = w * V * H // shard if head_trainable else 0
    g_layer = (grads - g_head) / L if trainable else 0
    phases: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    if acc > 1 or not trainable:
        # From the second micro-batch of a step on, every gradient exists while activations build up.
        live_grads, live_acts = grads, activations
    else:
        # One micro-batch a step: each layer's gradients are written as its activations are freed, so the peak
        # holds L x max(kept, layer gradients) (at the start of backward when activations are the larger).
        if kept >= g_layer:
            live_grads, live_acts = g_head, activations
        else:
            live_grads, live_acts = grads, recomputed + other
    train_phase = {**static, "gradients": int(live_grads), "activations": int(live_acts),
                   "logits / log-prob chunks": chunks, "backward buffers (one layer)": working}
    if acc > 1 and chunks and "lm_head" not in t.lora_targets:
        # The previous micro-batch's kept softmax chunks are still referenced (see head_kept_bytes).
        previous = head_kept_bytes(S, V)
        sizes["previous micro-batch's log-prob chunks"] = previous
        train_phase["previous micro-batch's log-prob chunks"] = previous
    if critic is not None:
        # The critic's forward runs after the policy's, so backward reaches it first: its activations are freed
        # (and its gradients written) while the policy's are all still live.
        if acc > 1:
            train_phase["critic: gradients"], train_phase["critic: activations"] = grads_c, acts_c
        elif live_acts == activations:  # the policy's peak is at the start of its backward
            train_phase["critic: gradients" if grads_c >= acts_c else "critic: activations"] = max(grads_c, acts_c)
        else:
            train_phase["critic: gradients"] = grads_c
    phases["forward and backward"] = train_phase
    step = {**static, "gradients": grads, "critic: gradients": grads_c}
    if trainable and t.full and s.tied and recipe.head == "lm":
        step["backward buffers (one layer)"] = w * V * H // shard  # the embedding's dense gradient, added to the head's
    phases["optimizer step"] = step

    gen = recipe.generation(cfg, nproc, data)
    if gen is not None:
        kv = 2 * L * s.kv_heads * s.head_dim * w * gen.rows * gen.length  # generation runs without autocast
        sizes["KV cache (generation)"] = kv
        # Prefill: one layer's no-grad temporaries over the prompts; decoding: a few [rows, vocab] float32 tensors.
        prefill = w * gen.prompts * gen.prompt_length * (3 * s.intermediate + 2 * s.heads * s.head_dim + 2 * H)
        sampling = 5 * 4 * gen.rows * V
        phases["generation"] = {**static, "KV cache (generation)": kv, "backward buffers (one layer)": max(prefill, sampling)}
    if strategy == "precomputed" and device == "gpu":
        notes.append("the reference precompute pass runs before training, on the host's CPU: it needs the whole "
                     "model there (plus the reference model if ref_model is set)")
    elif strategy == "precomputed":
        # Before training: no optimizer state yet; the reference scores eval_batch_size examples at a time.
        rows = (getattr(cfg, "precompute_ref_batch_size", None) or cfg.eval_batch_size) * (2 if command == "dpo" else 1)
        fwd = w * rows * cfg.max_length * (3 * s.intermediate + 4 * H) + 3 * 4 * auto_chunk(V) * V
        pre = {k: v for k, v in static.items() if not k.startswith("optimizer")}
        if getattr(cfg, "ref_model", None):
            pre["frozen weights: reference"] = w * model_shape(cfg.ref_model, cfg.trust_remote_code).params()
        pre["backward buffers (one layer)"] = fwd
        phases["reference precompute"] = pre

    runtime = RUNTIME_BYTES if device == "cpu" else 0
    for p in phases.values():
        if runtime:
            p["runtime (Python, torch, tokenizer)"] = runtime
    if runtime:
        sizes["runtime (Python, torch, tokenizer)"] = runtime
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    components = {k: int(v) for k, v in phases[peak_phase].items() if v}
    if device == "gpu":
        notes.append("GPU figures are allocator-level estimates (torch.cuda.max_memory_allocated), not measured in this "
                     "repository; the CUDA context (~0.5 GiB) comes on top")
    return Plan(command, s, device, nproc, list(settings or []), models, batch, acc,
                components, {k: int(v) for k, v in sizes.items()},
                {k: int(sum(v.values())) for k, v in phases.items()}, peak_phase, notes)


# ---------------------------------------------------------------------------------------------------------
# What would make it fit


@dataclass
class Change:
    setting: str  # key=value (or several) added to the run's settings
    cost: str
    total: int
    fits: bool


def fit_changes(command: str, settings: list[str], budget_bytes: int, config_file: str | None = None,
                shape: Shape | None = None, data: list | None = None) -> list[Change]:
    """The changes that bring the run under `budget_bytes`, in order (LoRA, precompute, checkpointing, a
    smaller micro-batch, FSDP over more devices), each added to those before it; stops at the first that fits."""
    run = resolve(command, settings, config_file)
    command, recipe, cfg, nproc = run.command, run.recipe, run.cfg, run.nproc
    shape = shape or model_shape(cfg.model, cfg.trust_remote_code)
    if data is None and run.lengths == "data":
        data = data_lengths(command, cfg)[0]  # none of the changes below changes the lengths
    current = list(settings)
    out: list[Change] = []

    def total(extra: list[str]):
        r = resolve(command, current + extra, config_file)
        return estimate(r, shape, data if r.lengths == "data" else None).total, r.cfg

    def add(extra: list[str], cost: str) -> bool:
        t, _ = total(extra)
        current.extend(extra)
        out.append(Change(" ".join(extra), cost, t, t <= budget_bytes))
        return t <= budget_bytes

    if cfg.lora is None and add(["lora.r=16"], "trains low-rank adapters instead of every weight"):
        return out
    _, cfg = total([])
    if getattr(cfg, "critic", "none") == "separate" and add(
            ["critic=shared"], "a value head on the policy instead of a second model (the value loss then also "
            "trains the policy's weights)"):
        return out
    if recipe.reference(cfg) == "copy" and hasattr(cfg, "precompute_ref_log_probs") and add(
            ["precompute_ref_log_probs=true"], "same result; one scoring pass before training, no reference kept"):
        return out
    if not cfg.gradient_checkpointing and add(["gradient_checkpointing=true"], "same result; about 30% slower"):
        return out
    mb = cfg.micro_batch_size
    if mb > 1:
        sizes = [mb // 2 ** k for k in range(1, mb.bit_length()) if mb // 2 ** k >= 1]
        pick = next((m for m in sizes if total([f"micro_batch_size={m}"])[0] <= budget_bytes), sizes[-1])
        if add([f"micro_batch_size={pick}"], f"same result (more accumulation, batch_size stays {cfg.batch_size}); slower"):
            return out
    start = max(2, 2 * nproc) if cfg.distributed == "fsdp" else 2
    n = start
    while n <= 1024:
        t, _ = total(["distributed=fsdp", f"nproc={n}"])
        if t <= budget_bytes or n == 1024:
            add(["distributed=fsdp", f"nproc={n}"], f"weights, gradients and AdamW state sharded over {n} devices")
            break
        n *= 2
    return out


# ---------------------------------------------------------------------------------------------------------
# The command


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 or n == 0 else f"{n / 2**20:.1f} MiB"


def render(p: Plan, changes: list[Change] | None = None, budget: float | None = None) -> str:
    where = "the CPU" if p.device == "cpu" else "one GPU"
    devices = f"one process on {where}" if p.nproc == 1 else f"per device, {p.nproc} processes ({'GPUs' if p.device == 'gpu' else 'CPU'})"
    per_step = f"{p.accumulation} micro-batch{'es' if p.accumulation > 1 else ''} per optimizer step"
    lines = [f"posttrain memory {p.command}: {p.shape.describe()}",
             f"{devices}; {per_step}; the largest micro-batch: {p.batch.what}", f"({p.lengths})", "",
             "models in memory"]
    lines += [f"  {name:<13}{why}" for name, why in p.models]
    lines += ["", f"  {'component':<40}{'at peak':>12}{'full size':>13}"]
    for name, size in p.sizes.items():
        live = p.components.get(name, 0)
        lines.append(f"  {name:<40}{_gib(live):>12}{_gib(size):>13}")
    for name, live in p.components.items():
        if name not in p.sizes:
            lines.append(f"  {name:<40}{_gib(live):>12}{'':>13}")
    lines.append(f"  {'total':<40}{_gib(p.total):>12}   peak phase: {p.peak_phase}")
    lines.append("  phases: " + ", ".join(f"{k} {_gib(v)}" for k, v in p.phases.items()))
    lines += [f"  note: {n}" for n in p.notes]
    if budget is not None:
        lines += ["", f"budget {budget:g} GiB: " + ("fits as it is" if p.total <= budget * GiB else
                                                   "does not fit; what would make it fit (each change added to those above it):")]
        for c in changes or []:
            lines.append(f"  {c.setting:<40}{_gib(c.total):>12}   {'fits' if c.fits else '':<5} {c.cost}")
        if changes and not changes[-1].fits:
            lines.append("  still over the budget: the model itself is too large for one device of this size")
    return "\n".join(lines)


TOOL = ToolSpec(
    usage="posttrain memory COMMAND [key=value ...] [--json] [--budget GB]",
    positionals=(1, 1),
    flags={"--json": bool, "--budget": float},
    help=f"""COMMAND: {', '.join(list(RECIPES) + list(ALIASES))} (simpo, cpo, orpo: dpo with that loss_type).
Settings are the training command's own keys, with its defaults (model=, lora.r=16, micro_batch_size=2,
max_length=1024, bf16=true, gradient_checkpointing=true, precompute_ref_log_probs=true, distributed=fsdp, ...),
plus three of the planner's:
  nproc=N        devices the run is spread over (default 1)
  device=cpu|gpu where it runs (default: gpu when CUDA is available); on the CPU the total includes the
                 runtime's own memory, so it compares with a process's peak RSS
  lengths=data|limits  the largest micro-batch from the run's own data (default, when it is a local file or a
                 built-in task and the tokenizer is at hand), or every sequence at the length limits
model= takes a local folder, a converted .gguf, a hub id (its config.json), or a preset:
  {', '.join(sorted(PRESETS))}
  (sizes: {', '.join(f'{k}={v}' for k, v in SIZE_ALIASES.items())})
--json     one JSON object: total_bytes, components (name -> bytes live at the peak), sizes, phases, models
--budget GB  the memory of one device, in GiB: if the run does not fit, the changes that would make it fit""",
)


def main(args: ToolArgs) -> int:
    command = args.positionals[0]
    p = plan(command, args.settings, args.config_file)
    budget = args.flags.get("--budget")
    changes = None
    if budget is not None:
        if budget <= 0:
            raise UserError("--budget: expected a positive number of GiB")
        changes = [] if p.total <= budget * GiB else fit_changes(command, args.settings, int(budget * GiB),
                                                                 args.config_file, p.shape, p.data)
    if args.flags.get("--json"):
        out = p.to_json()
        if budget is not None:
            out["budget"] = {"bytes": int(budget * GiB), "fits": p.total <= budget * GiB,
                             "changes": [dataclasses.asdict(c) for c in changes or []]}
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(render(p, changes, budget))
    return 0
