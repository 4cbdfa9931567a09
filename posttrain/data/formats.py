"""Reading data and recognising its format, with row-level validation.

Formats (the ones TRL users already have):
  language modeling     {"text": str} or {"messages": [{"role", "content"}, ...]}
  prompt-completion     {"prompt": str | messages, "completion": str | messages}
  preference            {"prompt", "chosen", "rejected"}, or {"chosen", "rejected"} conversations whose
                        shared leading turns are the (implicit) prompt
  unpaired preference   {"prompt", "completion", "label": bool}
  prompt-only           {"prompt", ...extra columns (e.g. "answer") that reward functions read}

Every row keeps its origin (file and line) so a bad value is reported as `file:line: field 'x': problem`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import UserError

log = logging.getLogger("posttrain")

ROLES = {"system", "user", "assistant", "tool", "developer"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# What each command consumes, and which formats can be turned into it.
KINDS = {
    "sft": ("language_modeling", "prompt_completion"),
    "preference": ("preference",),
    "unpaired": ("unpaired", "preference"),
    "prompt": ("prompt_only", "prompt_completion", "preference", "unpaired"),
}


@dataclass
class Row:
    data: dict
    source: str  # "file:line" for messages


@dataclass
class Dataset:
    rows: list[Row]
    name: str
    format: str
    skipped: Counter = field(default_factory=Counter)


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
                rows.append(Row(obj, f"{path}:{i}"))
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]} / {"train": [...]}
        if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
            raise UserError(f"{path}: expected a JSON list of objects")
        return [Row(o, f"{path}:item {i}") for i, o in enumerate(obj, 1)]
    if suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
        records = frame.to_dict(orient="records")
        offset = 2 if suffix == ".csv" else 1  # csv line numbers count the header line
        return [Row(_plain(r), f"{path}:{'line' if suffix == '.csv' else 'row'} {i + offset}") for i, r in enumerate(records)]
    raise UserError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")


def _plain(obj: Any) -> Any:
    """numpy arrays/scalars from parquet -> lists and Python scalars."""
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def read_rows(spec: str, split: str = "train", kind: str = "sft") -> list[Row]:
    """Rows from a file, a folder of files, a built-in task, or a hub dataset (needs internet)."""
    from posttrain.data.tasks import builtin_task

    rows = builtin_task(spec, "preference" if kind == "unpaired" else kind)
    if rows is not None:
        return [Row(r, f"{spec}:row {i}") for i, r in enumerate(rows, 1)]
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise UserError(f"{spec}: folder has no {', '.join(FILE_SUFFIXES)} files")
        return [r for p in files for r in _read_file(p)]
    if path.suffix.lower() in FILE_SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"{spec}: file not found")
    try:
        import datasets

        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's input problem here
        raise UserError(f"{spec}: not a file, folder, built-in task, or loadable hub dataset ({str(e).splitlines()[0]})") from None
    return [Row(_plain(r), f"{spec}[{split}]:row {i}") for i, r in enumerate(ds, 1)]


def detect_format(data: dict) -> str | None:
    keys = set(data)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "messages" in keys:
        return "language_modeling"
    if "text" in keys:
        return "language_modeling"
    if "prompt" in keys:
        return "prompt_only"
    return None


def _check_text_or_messages(value: Any, name: str, src: str, *, allow_empty: bool = False) -> None:
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise UserError(f"{src}: field '{name}': empty text")
        return
    if isinstance(value, list):
        if not value:
            raise UserError(f"{src}: field '{name}': empty list of messages")
        for j, m in enumerate(value):
            where = f"{src}: field '{name}[{j}]'"
            if not isinstance(m, dict):
                raise UserError(f"{where}: expected a message object with 'role' and 'content'")
            if "role" not in m or "content" not in m:
                missing = "role" if "role" not in m else "content"
                raise UserError(f"{where}: missing '{missing}'")
            if m["role"] not in ROLES:
                raise UserError(f"{where}: unknown role {m['role']!r} (expected one of {', '.join(sorted(ROLES))})")
            if not isinstance(m["content"], str):
                raise UserError(f"{where}.content: expected a string, got {type(m['content']).__name__}")
        return
    raise UserError(f"{src}: field '{name}': expected a string or a list of messages, got {type(value).__name__}")


def validate_row(data: dict, fmt: str, src: str) -> dict:
    """Return the row in canonical form or raise UserError naming file:line and field."""
    required = {
        "language_modeling": (),
        "prompt_completion": ("prompt", "completion"),
        "preference": ("chosen", "rejected"),
        "unpaired": ("prompt", "completion", "label"),
        "prompt_only": ("prompt",),
    }[fmt]
    for key in required:
        if key not in data or data[key] is None:
            raise UserError(f"{src}: missing field '{key}' (this file is in {fmt.replace('_', '-')} format)")
    if fmt == "language_modeling":
        if "messages" in data:
            _check_text_or_messages(data["messages"], "messages", src)
            if not isinstance(data["messages"], list):
                raise UserError(f"{src}: field 'messages': expected a list of messages")
            if not any(m["role"] == "assistant" for m in data["messages"]):
                raise UserError(f"{src}: field 'messages': no assistant turn to train on")
        elif "text" in data:
            if not isinstance(data["text"], str):
                raise UserError(f"{src}: field 'text': expected a string, got {type(data['text']).__name__}")
            _check_text_or_messages(data["text"], "text", src)
        else:
            raise UserError(f"{src}: missing field 'text' or 'messages'")
        return data
    for key in ("prompt", "completion", "chosen", "rejected"):
        if key in data and key in required + ("prompt",):
            _check_text_or_messages(data[key], key, src)
    if fmt == "unpaired" and not isinstance(data["label"], bool):
        raise UserError(f"{src}: field 'label': expected true or false, got {data['label']!r}")
    if fmt == "preference":
        data = dict(data)
        if "prompt" not in data:
            data["prompt"], data["chosen"], data["rejected"] = split_implicit_prompt(data["chosen"], data["rejected"], src)
        for key in ("chosen", "rejected"):
            if isinstance(data[key], list) and data[key][-1]["role"] != "assistant":
                raise UserError(f"{src}: field '{key}': the last message must be an assistant turn")
    return data


def split_implicit_prompt(chosen, rejected, src):
    """Conversations whose shared leading turns are the prompt (TRL's implicit-prompt preference format)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise UserError(f"{src}: missing field 'prompt' (needed unless chosen/rejected are conversations)")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UserError(f"{src}: fields 'chosen'/'rejected': no shared leading turns to use as the prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def load_dataset(spec: str, kind: str, *, split: str = "train", skip_invalid: bool = False, max_samples: int | None = None) -> Dataset:
    """Read, detect the format from the first row, validate every row.

    `kind` says what the command consumes (see KINDS); a file in another format is a one-line error.
    """
    rows = read_rows(spec, split, kind)
    if not rows:
        raise UserError(f"{spec}: no rows")
    fmt = detect_format(rows[0].data)
    if fmt is None:
        raise UserError(
            f"{rows[0].source}: cannot tell the data format from fields {sorted(rows[0].data)} "
            "(expected text/messages, prompt+completion, prompt+chosen+rejected, prompt+completion+label, or prompt)"
        )
    if fmt not in KINDS[kind]:
        raise UserError(f"{spec}: data is in {fmt.replace('_', '-')} format; this command needs {' or '.join(k.replace('_', '-') for k in KINDS[kind])}")
    good, skipped = [], Counter()
    for row in rows:
        try:
            row_fmt = detect_format(row.data)
            if row_fmt != fmt and not (fmt == "language_modeling" and row_fmt == "language_modeling"):
                raise UserError(f"{row.source}: row is in {str(row_fmt).replace('_', '-')} format but the file is {fmt.replace('_', '-')}")
            good.append(Row(validate_row(row.data, fmt, row.source), row.source))
        except UserError as e:
            if not skip_invalid:
                raise
            skipped[str(e).split(": ", 1)[1]] += 1
        if max_samples and len(good) >= max_samples:
            break
    if skipped:
        log.warning(f"{spec}: skipped {sum(skipped.values())} invalid rows")
    if not good:
        raise UserError(f"{spec}: every row is invalid")
    return Dataset(good, spec, fmt, skipped)


def report_skipped(ds: Dataset) -> list[str]:
    """Human-readable lines: how many rows were skipped and why (grouped by reason)."""
    return [f"{ds.name}: skipped {n} row(s): {reason}" for reason, n in ds.skipped.most_common()]
