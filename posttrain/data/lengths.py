"""A dataset read and tokenized exactly as a training command reads it, with every row's token lengths before and
after the command's length limits (cut by training's own functions). The data audit reports on it; the memory
planner takes the largest micro-batch of a run from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from posttrain.config import UserError
from posttrain.data.formats import (
    KINDS,
    Dataset,
    Row,
    _format_mismatch,
    detect_format,
    read_rows,
    sft_view,
    validate_row,
)
from posttrain.data.tokenize import encode_pair, encode_sft_row, row_errors, truncate_pair

# What each training command reads (posttrain.data.formats.KINDS), and where its Config lives.
KIND = {"sft": "sft", "dpo": "preference", "rm": "preference", "kto": "unpaired", "grpo": "prompt",
        "online-dpo": "prompt", "ppo": "prompt"}
MODULES = {"sft": "posttrain.algorithms.sft", "dpo": "posttrain.algorithms.dpo", "rm": "posttrain.algorithms.rm",
           "kto": "posttrain.algorithms.kto", "grpo": "posttrain.algorithms.grpo",
           "online-dpo": "posttrain.algorithms.online_dpo", "ppo": "posttrain.algorithms.ppo"}


@dataclass
class Item:
    """One valid row, tokenized as its training command tokenizes it (lengths in tokens)."""

    source: str
    prompt_text: str  # the prompt (or the whole text of language-modeling rows), for duplicate checks
    lengths: dict  # column -> tokens: prompt, completion / chosen / rejected, sequence
    kept: dict | None = None  # the same columns after the length limits (None: the row is dropped)
    truncated: bool = False
    dropped: bool = False
    chosen_ids: list | None = None
    rejected_ids: list | None = None
    label: bool | None = None
    answer: object = None
    shared_prefix: int | None = None  # rm: the first tokens the kept chosen and rejected sequences share


def text_of(value) -> str:
    """A prompt as one string (a conversation as role: content lines), for comparing prompts."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)


def read_valid(spec: str, command: str, split: str, max_samples: int | None):
    """(format, valid rows, invalid (source, reason)) with training's own validation, every bad row listed."""

    kind = KIND[command]
    rows = read_rows(spec, split, kind)
    if kind == "sft":
        rows = [Row(sft_view(r.data), r.source, r.error) for r in rows]
    parsed = [r for r in rows if r.error is None]
    if not parsed:
        raise UserError(f"{rows[0].source}: {rows[0].error}" if rows else f"{spec}: no rows")
    fmt = detect_format(parsed[0].data)
    if fmt not in KINDS[kind]:
        raise UserError(f"{spec}: data is in {str(fmt).replace('_', '-')} format; posttrain {command} needs "
                        f"{' or '.join(k.replace('_', '-') for k in KINDS[kind])}")
    good, bad = [], []
    for r in rows:
        try:
            if r.error is not None:
                raise UserError(f"{r.source}: {r.error}")
            if detect_format(r.data) != fmt:
                _format_mismatch(r, detect_format(r.data), fmt, parsed[0])  # raises training's own message
            good.append(Row(validate_row(r.data, fmt, r.source), r.source))
        except UserError as e:
            bad.append((r.source, str(e).split(": ", 1)[-1]))
        if max_samples and len(good) >= max_samples:
            break
    return fmt, good, bad


def tokenize(command: str, fmt: str, rows: list, tok, cfg) -> tuple[list[Item], list]:
    """Items with their token lengths before and after the limits, cut by training's own functions
    (`truncate_pair`, `encode_sft_row`, `encode_for_reward`, `prompt_examples`); rows the tokenizer or the chat
    template rejects are invalid (source, reason)."""
    from posttrain.rollout.groups import prompt_examples

    items, bad = [], []
    L, P, mode = cfg.max_length, cfg.max_prompt_length, getattr(cfg, "truncation_mode", "keep_start")

    def cut(p: list, c: list) -> tuple[int, int] | None:
        kept = truncate_pair(p, c, L, P, mode)
        return None if kept is None else (len(kept[0]), len(kept[1]))

    for r in rows:
        d = r.data
        try:
            with row_errors(r.source):
                if fmt == "preference":
                    p, c = encode_pair(tok, d["prompt"], d["chosen"])
                    _, j = encode_pair(tok, d["prompt"], d["rejected"])
                    lengths = {"prompt": len(p), "chosen": len(c), "rejected": len(j)}
                    shared = None
                    if command == "rm":  # the reward model reads the whole rendered sequence, cut from its start
                        from posttrain.algorithms.rm import _common_prefix, encode_for_reward

                        full = [len(encode_for_reward(tok, d["prompt"], d[k], 10**9)) for k in ("chosen", "rejected")]
                        lengths.update(chosen_sequence=full[0], rejected_sequence=full[1])
                        seqs = [encode_for_reward(tok, d["prompt"], d[k], L, P) for k in ("chosen", "rejected")]
                        kept = {"chosen_sequence": len(seqs[0]), "rejected_sequence": len(seqs[1])}
                        shared = _common_prefix(*seqs)  # what shared_prefix runs once
                    else:
                        a, b = cut(p, c), cut(p, j)
                        kept = None if a is None or b is None else {"prompt": a[0], "chosen": a[1], "rejected": b[1]}
                    it = Item(r.source, text_of(d["prompt"]), lengths, kept=kept, chosen_ids=c, rejected_ids=j,
                              shared_prefix=shared)
                elif fmt in ("unpaired", "prompt_completion"):
                    p, c = encode_pair(tok, d["prompt"], d["completion"])
                    a = cut(p, c)
                    it = Item(r.source, text_of(d["prompt"]), {"prompt": len(p), "completion": len(c)},
                              kept=None if a is None else {"prompt": a[0], "completion": a[1]}, label=d.get("label"))
                elif fmt == "language_modeling":
                    opts = {"max_prompt_length": P, "completion_only": True, "assistant_only": cfg.assistant_only_loss,
                            "truncation_mode": mode}
                    whole = encode_sft_row(tok, d, max_length=10**9, **opts)
                    enc = encode_sft_row(tok, d, max_length=L, **opts)
                    it = Item(r.source, text_of(d.get("messages", d.get("text"))),
                              {"sequence": len(whole.input_ids) if whole else 0},
                              kept=None if enc is None else {"sequence": len(enc.input_ids)})
                else:  # prompt-only, as the online methods build their prompts (chat template, prompt_suffix)
                    ex = prompt_examples(Dataset([r], "", fmt), tok, dataclasses.replace(cfg, max_prompt_length=None))[0]
                    n = len(ex.prompt_ids)
                    it = Item(r.source, text_of(d["prompt"]), {"prompt": n}, kept={"prompt": min(n, P) if P else n},
                              answer=d.get("answer"))
        except UserError as e:
            bad.append((r.source, str(e).removeprefix(f"{r.source}: ")))
            continue
        it.dropped = it.kept is None
        it.truncated = it.dropped or any(it.kept[k] != it.lengths[k] for k in it.kept)
        if "prompt" in it.lengths and fmt in ("preference", "unpaired", "prompt_completion"):
            it.lengths["sequence"] = it.lengths["prompt"] + max(v for k, v in it.lengths.items() if k != "prompt")
        items.append(it)
    return items, bad
