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
import sys
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
    error: str | None = None  # set when the row could not even be parsed (e.g. invalid JSON)


@dataclass
class Dataset:
    rows: list[Row]
    name: str
    format: str
    skipped: Counter = field(default_factory=Counter)


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if suffix == ".jsonl":
        return _read_jsonl(path, raw)
    try:
        # utf-8-sig: a byte-order mark (Windows editors, Excel's "CSV UTF-8") is not part of the first field.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start + 1} of the file)") from None
    return _read_json(path, text) if suffix == ".json" else _read_csv(path, text)


def _read_jsonl(path: Path, raw: bytes) -> list[Row]:
    """One row per non-blank line. A line that cannot be read becomes an error row (skip_invalid skips it
    like any other bad row): invalid JSON, not an object, not UTF-8, or nested too deeply to decode."""
    rows = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if i == 1 and line.startswith(b"\xef\xbb\xbf"):  # byte-order mark
            line = line[3:]
        if not line.strip():
            continue
        src = f"{path}:{i}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(Row({}, src, f"not UTF-8 text (byte {e.start + 1} of the line)"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(Row({}, src, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"))
            continue
        except RecursionError:
            rows.append(Row({}, src, "JSON nested too deeply"))
            continue
        if not isinstance(obj, dict):
            rows.append(Row({}, src, f"expected a JSON object per line, got {_json_type(obj)}"))
            continue
        rows.append(Row(obj, src))
    return rows


def _json_type(obj) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


def _read_json(path: Path, text: str) -> list[Row]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {_json_type(obj)}")
    lines = _json_item_lines(text, len(obj))
    rows = []
    for i, (o, line) in enumerate(zip(obj, lines), 1):
        src = f"{path}:{line}" if line else f"{path}:item {i}"
        if isinstance(o, dict):
            rows.append(Row(o, src))
        else:  # an error row, so skip_invalid can skip it
            rows.append(Row({}, src, f"expected a JSON object for each item of the list, got {_json_type(o)}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pandas as pd

    try:
        records = pd.read_parquet(path).to_dict(orient="records")
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise UserError(f"{path}: cannot read parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return [Row(_plain(r), f"{path}:row {i}") for i, r in enumerate(records, 1)]


def _json_item_lines(text: str, n: int) -> list[int | None]:
    """Line number where each item of the JSON array starts: a top-level array, or the one array of a
    {"data": [...]} wrapper (None for other layouts)."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if text[i : i + 1] == "{":  # the wrapper: skip `{ "key" :` to the array
        i += 1
        while text[i] in " \t\r\n":
            i += 1
        i = decoder.raw_decode(text, i)[1]
        while text[i] in " \t\r\n:":
            i += 1
    if text[i : i + 1] != "[":
        return [None] * n
    i += 1
    lines: list[int | None] = []
    while len(lines) < n:
        while text[i] in " \t\r\n,":
            i += 1
        lines.append(text.count("\n", 0, i) + 1)
        i = decoder.raw_decode(text, i)[1]
    return lines


def _read_csv(path: Path, text: str) -> list[Row]:
    """CSV rows with the physical line each starts on (quoted cells may span lines).

    CSV cells are strings, so three conventions make every format expressible: an empty cell is a missing
    field, a cell holding a JSON list of objects or a JSON object (e.g. a conversation,
    `[{"role": "user", ...}]`) is decoded, and a `label` column of true/false (any case) becomes a boolean. A row with more or fewer cells than the header is an
    error row: usually an unquoted comma inside a text, which would otherwise shift text into other fields.
    """
    import csv
    import io

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # default 128 KiB: long documents are legitimate cells
    # strict: a quote left open (a truncated file) or stray text after a closing quote is an error, not a
    # cell silently cut short or glued together.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise UserError(f"{path}:1: invalid CSV header ({e})") from None
    if header is None:
        return []
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"{path}:1: column {dupes[0]!r} appears more than once in the header")
    rows = []
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(Row({}, f"{path}:{start}", f"invalid CSV ({e})"))
            start = reader.line_num + 1
            continue
        src = f"{path}:{start}"
        start = reader.line_num + 1
        if not cells:
            continue
        if len(cells) != len(header):
            rows.append(Row({}, src, f"{len(cells)} cells for {len(header)} columns ({', '.join(header)}); "
                                     "quote texts that contain commas"))
            continue
        rows.append(Row({k: _csv_cell(k, v) for k, v in zip(header, cells)}, src))
    return rows


def _csv_cell(key: str, value: str | None):
    text = (value or "").strip()
    if not value:
        return None  # an empty cell is the only way CSV can leave a field out
    if text[:1] in ("[", "{"):
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # not JSON (or absurdly nested): the cell is text
            return value
        # Only message lists / objects: a text cell such as "[1, 2]" stays text.
        if isinstance(obj, dict) or (isinstance(obj, list) and obj and all(isinstance(m, dict) for m in obj)):
            return obj
        return value
    if key == "label" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return value


def _plain(obj: Any) -> Any:
    """numpy arrays/scalars from parquet -> lists and Python scalars; NaN (pandas' missing value) -> None."""
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def read_rows(spec: str, split: str = "train", kind: str = "sft", config: str | None = None) -> list[Row]:
    """Rows from a file, a folder of files, a built-in task, or a hub dataset (needs internet)."""
    from posttrain.data.tasks import builtin_task

    try:
        # The config's split is the default; a split written in the task name wins.
        rows = builtin_task(spec, "preference" if kind == "unpaired" else kind, split=split if split in ("train", "test") else "train")
    except ValueError as e:  # a bad option in a built-in task name is the user's input problem
        raise UserError(f"{spec}: {e}") from None
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

        ds = datasets.load_dataset(spec, name=config, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's input problem here
        raise UserError(f"{spec}: not a file, folder, built-in task, or loadable hub dataset ({str(e).splitlines()[0]})") from None
    return [Row(_plain(r), f"{spec}[{split}]:row {i}") for i, r in enumerate(ds, 1)]


def sft_view(data: dict) -> dict:
    """For SFT only: a row with `prompt` and `solution` but no `completion` (GSM8K/MATH-style rows such as
    ../shared/data/gsm8k_train.jsonl) trains on the solution, i.e. `completion` = `solution`."""
    if "prompt" in data and "solution" in data and "completion" not in data and not {"chosen", "rejected"} & set(data):
        return {**data, "completion": data["solution"]}
    return data


def detect_format(data: dict, nulls: bool = False) -> str | None:
    """The format a row's fields announce. A null field is a missing one (Parquet and hub datasets give every
    row every column, null where absent) unless `nulls`: what the row would be with its nulls filled."""
    keys = {k for k, v in data.items() if nulls or v is not None}
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


def _check_unicode(text: str, where: str) -> None:
    """JSON may spell lone UTF-16 surrogates (\\ud800); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: invalid Unicode (a lone surrogate {text[e.start]!a} at character {e.start + 1})") from None


def _check_text_or_messages(value: Any, name: str, src: str, *, allow_empty: bool = False) -> None:
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise UserError(f"{src}: field '{name}': empty text")
        _check_unicode(value, f"{src}: field '{name}'")
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
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise UserError(f"{where}: unknown role {m['role']!r} (expected one of {', '.join(sorted(ROLES))})")
            if not isinstance(m["content"], str):
                raise UserError(f"{where}.content: expected a string, got {type(m['content']).__name__}")
            _check_unicode(m["content"], f"{where}.content")
        return
    raise UserError(f"{src}: field '{name}': expected a string or a list of messages, got {type(value).__name__}")


def validate_row(data: dict, fmt: str, src: str) -> dict:
    """Return the row in canonical form or raise UserError naming file:line and field. Null fields are dropped
    (null is missing, see detect_format), so later stages never meet a None where a value should be."""
    data = {k: v for k, v in data.items() if v is not None}
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
    # Text and conversations cannot be mixed within a row: the prompt would be rendered with the chat
    # template and the reply not, or the other way round.
    if "prompt" in data:
        for key in ("completion", "chosen", "rejected"):
            if key in required and isinstance(data["prompt"], list) != isinstance(data[key], list):
                kinds = {True: "a conversation", False: "text"}
                raise UserError(
                    f"{src}: field '{key}': is {kinds[isinstance(data[key], list)]} but 'prompt' is "
                    f"{kinds[isinstance(data['prompt'], list)]}; both must be text or both conversations"
                )
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


def load_dataset(spec: str, kind: str, *, split: str = "train", skip_invalid: bool = False, max_samples: int | None = None,
                 config: str | None = None) -> Dataset:
    """Read, detect the format (the one most rows have), validate every row.

    `kind` says what the command consumes (see KINDS); a file in another format is a one-line error.
    """
    rows = read_rows(spec, split, kind, config)
    if kind == "sft":
        rows = [Row(sft_view(r.data), r.source, r.error) for r in rows]
    parsed = [r for r in rows if r.error is None]
    if not parsed:
        if rows and not skip_invalid:
            raise UserError(f"{rows[0].source}: {rows[0].error}")
        raise UserError(f"{spec}: no rows")
    # The format most rows have (the earliest on a tie), so one broken row, even the first, is reported as
    # that row's problem rather than as the whole file being in another format.
    fmt = _majority_format(parsed)
    if fmt not in KINDS[kind] and _majority_format(parsed, nulls=True) in KINDS[kind]:
        # {"prompt": "a", "completion": null}: a prompt-completion row missing its completion, not prompt-only data.
        fmt = _majority_format(parsed, nulls=True)
    first = next((r for r in parsed if detect_format(r.data, nulls=True) == fmt), parsed[0])
    if fmt is None:
        raise UserError(
            f"{first.source}: cannot tell the data format from fields {sorted(first.data)} "
            "(expected text/messages, prompt+completion, prompt+chosen+rejected, prompt+completion+label, or prompt)"
        )
    if fmt not in KINDS[kind]:
        raise UserError(f"{spec}: data is in {fmt.replace('_', '-')} format; this command needs {' or '.join(k.replace('_', '-') for k in KINDS[kind])}")
    good, skipped = [], Counter()
    for row in rows:
        try:
            if row.error is not None:
                raise UserError(f"{row.source}: {row.error}")
            row_fmt = detect_format(row.data)
            if row_fmt != fmt:
                _format_mismatch(row, row_fmt, fmt, first)
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


def _majority_format(rows: list[Row], nulls: bool = False) -> str | None:
    formats = Counter(f for f in (detect_format(r.data, nulls) for r in rows) if f is not None)
    return max(formats, key=formats.get) if formats else None  # max keeps the earliest of equal counts


def _format_mismatch(row: Row, row_fmt: str | None, fmt: str, first: Row) -> None:
    """A row whose fields say another format: name the missing field when that explains it."""
    needed = {"prompt_completion": ("prompt", "completion"), "preference": ("chosen", "rejected"),
              "unpaired": ("prompt", "completion", "label"), "prompt_only": ("prompt",),
              "language_modeling": ("messages",) if "messages" in first.data else ("text",)}[fmt]
    missing = [k for k in needed if row.data.get(k) is None]
    # Missing when the row has none of the recognised fields, or part of the file format's fields.
    if missing and (row_fmt is None or len(missing) < len(needed)):
        raise UserError(f"{row.source}: missing field '{missing[0]}' (this file is in {fmt.replace('_', '-')} format)")
    raise UserError(
        f"{row.source}: fields {sorted(row.data)} are {row_fmt.replace('_', '-')} format, but most rows "
        f"(as {first.source}) are {fmt.replace('_', '-')}; mixed formats in one dataset"
    )


def report_skipped(ds: Dataset) -> list[str]:
    """Human-readable lines: how many rows were skipped and why (grouped by reason)."""
    return [f"{ds.name}: skipped {n} row(s): {reason}" for reason, n in ds.skipped.most_common()]
