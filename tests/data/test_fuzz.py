"""Property-based fuzzing of every loader (JSONL, JSON, CSV, Parquet, folders) and every format.

Valid datasets of each format are generated, written in each file type, then damaged: a field dropped, renamed,
added, or given a wrong type, an empty or blank string, odd Unicode (a lone surrogate, NUL, bidi controls), a
huge or deeply nested value; or the file's bytes truncated, a non-UTF-8 byte inserted, a value nested thousands
deep. Each input must end either in a dataset whose every row is exactly what the file says (checked against an
independent statement of each format's rules, `expected_row`) or in ONE line naming the file and the line of the
bad row (and the field, when one field is at fault): never a traceback, never a silently wrong or lost row. Rows
that load are tokenized too, as the command that reads them would.

By default a fixed set of 60 examples per property is replayed (derandomized, so CI is not flaky); run with
HYPOTHESIS_PROFILE=fuzz for a random search of 3000 per property.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from posttrain.algorithms.dpo import encode_preference
from posttrain.algorithms.grpo import Config as GRPOConfig
from posttrain.rollout.groups import prompt_examples
from posttrain.algorithms.kto import encode_examples, unpair
from posttrain.config import TrainConfig, UserError
from posttrain.data import encode_dataset
from posttrain.data.formats import ROLES, load_dataset
from posttrain.data.tokenize import encode_sft_row
from posttrain.testing import tiny_tokenizer

# Settings per test (a global profile would also change the other modules' property tests).
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FUZZED = settings(max_examples=3000 if FUZZ else 60, derandomize=not FUZZ, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.function_scoped_fixture])

TOK = tiny_tokenizer()

# ------------------------------------------------------------------------------------------ valid rows

TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(lambda t: t.strip())


def msg(role):
    return st.fixed_dictionaries({"role": st.just(role), "content": TEXT})


ANY_MSG = st.sampled_from(sorted(ROLES)).flatmap(msg)
CONVERSATION = st.tuples(st.lists(ANY_MSG, max_size=3), msg("assistant")).map(lambda t: [*t[0], t[1]])

# format name -> (the command kind that reads it, a strategy of valid rows)
FORMATS = {
    "text": ("sft", st.fixed_dictionaries({"text": TEXT})),
    "messages": ("sft", st.fixed_dictionaries({"messages": CONVERSATION})),
    "prompt_completion": ("sft", st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT})),
    "prompt_completion_conv": ("sft", st.fixed_dictionaries({"prompt": st.lists(msg("user"), min_size=1, max_size=2),
                                                             "completion": st.lists(msg("assistant"), min_size=1,
                                                                                    max_size=1)})),
    "preference": ("preference", st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT})),
    "preference_conv": ("preference", st.fixed_dictionaries({"prompt": st.lists(msg("user"), min_size=1, max_size=1),
                                                             "chosen": st.lists(msg("assistant"), min_size=1, max_size=1),
                                                             "rejected": st.lists(msg("assistant"), min_size=1,
                                                                                  max_size=1)})),
    "preference_implicit": ("preference", st.tuples(msg("user"), msg("assistant"), msg("assistant")).map(
        lambda t: {"chosen": [t[0], t[1]], "rejected": [t[0], t[2]]})),
    "unpaired": ("unpaired", st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT, "label": st.booleans()})),
    "prompt_only": ("prompt", st.fixed_dictionaries({"prompt": TEXT, "answer": TEXT})),
}

# ------------------------------------------------------------------------------- the format rules, restated


def _unicode_ok(s: str) -> bool:
    return not re.search("[\ud800-\udfff]", s)


def _text_ok(v) -> bool:
    return isinstance(v, str) and bool(v.strip()) and _unicode_ok(v)


def _messages_ok(v) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] in ROLES and isinstance(m.get("content"), str) and _unicode_ok(m["content"])
        for m in v)


def _text_or_messages(v) -> bool:
    return _text_ok(v) or _messages_ok(v)


def _fields_say(data: dict) -> str | None:
    """Which format a row's field names announce (the precedence of posttrain/data/formats.py's docstring)."""
    keys = {k for k, v in data.items()}
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "messages" in keys or "text" in keys:
        return "language_modeling"
    if "prompt" in keys:
        return "prompt_only"
    return None


FAMILY = {"text": "language_modeling", "messages": "language_modeling", "prompt_completion": "prompt_completion",
          "prompt_completion_conv": "prompt_completion", "preference": "preference",
          "preference_conv": "preference", "preference_implicit": "preference", "unpaired": "unpaired",
          "prompt_only": "prompt_only"}


def expected_row(data: dict, family: str) -> dict | None:
    """The row as a correct loader returns it, or None when the row is invalid for a file of `family` rows."""
    data = {k: v for k, v in data.items() if v is not None}  # null is missing (Parquet cannot tell them apart)
    if _fields_say(data) != family:
        return None
    own = {"prompt_completion": ("completion",), "unpaired": ("completion",), "preference": ("chosen", "rejected")}
    same_kind = all(isinstance(data.get("prompt"), list) == isinstance(data[k], list)
                    for k in own.get(family, ()) if k in data and "prompt" in data)
    if family == "language_modeling":
        if "messages" in data:
            ok = _messages_ok(data["messages"]) and any(m["role"] == "assistant" for m in data["messages"])
        else:
            ok = _text_ok(data["text"])
        return data if ok else None
    if family == "prompt_only":
        return data if _text_or_messages(data["prompt"]) else None
    if family in ("prompt_completion", "unpaired"):
        ok = _text_or_messages(data["prompt"]) and _text_or_messages(data["completion"]) and same_kind
        if family == "unpaired":
            ok = ok and isinstance(data["label"], bool)
        return data if ok else None
    # preference
    if not (_text_or_messages(data["chosen"]) and _text_or_messages(data["rejected"])):
        return None
    if "prompt" in data:
        if not (_text_or_messages(data["prompt"]) and same_kind):
            return None
    else:  # implicit prompt: the shared leading turns, leaving each side at least its last turn
        c, r = data["chosen"], data["rejected"]
        if not (isinstance(c, list) and isinstance(r, list)):
            return None
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        if n == 0:
            return None
        data = {**data, "prompt": c[:n], "chosen": c[n:], "rejected": r[n:]}
    if any(isinstance(data[k], list) and data[k][-1]["role"] != "assistant" for k in ("chosen", "rejected")):
        return None
    return data


# ---------------------------------------------------------------------------------------------- writing


def _csv_cell(key, value):
    """What a CSV cell written from `value` reads back as, by the documented CSV conventions."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    stripped = text.strip()
    if stripped[:1] in "[{" and stripped:
        try:
            obj = json.loads(stripped)
        except (ValueError, RecursionError):
            return text
        if isinstance(obj, dict) or (isinstance(obj, list) and obj and all(isinstance(m, dict) for m in obj)):
            return obj
        return text
    if key == "label" and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return text


def write(path: Path, rows: list[dict], how: str) -> tuple[Path, list[dict]]:
    """Write rows as `how`; return the path to load and the rows as the file type can hold them."""
    if how == "jsonl":
        path = path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, rows
    if how in ("json", "json_wrapped"):
        path = path / "d.json"
        path.write_text(json.dumps(rows if how == "json" else {"data": rows}, indent=2))
        return path, rows
    if how == "csv":
        path = path / "d.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[json.dumps(r[k]) if isinstance(r.get(k), (list, dict)) else r.get(k) for k in columns] for r in rows]
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            csv.writer(f).writerows([columns, *cells])  # minimal quoting; pandas leaves a lone \r unquoted
        return path, [{k: _csv_cell(k, r.get(k)) for k in columns} for r in rows]
    if how == "parquet":
        path = path / "d.parquet"
        try:
            pd.DataFrame(rows).to_parquet(path)
        except Exception:  # noqa: BLE001 - pyarrow cannot store every mix of types in one column
            assume(False)
        from posttrain.data.formats import _plain

        return path, [_plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
    if how == "folder":  # two files of different types; rows are read in file-name order
        (path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
        (path / "b.json").write_text(json.dumps(rows[2:]))
        return path, rows
    raise AssertionError(how)


LOADERS = ["jsonl", "json", "json_wrapped", "csv", "parquet", "folder"]

# ------------------------------------------------------------------------------------------ corruption

ODD_VALUES = [
    None, 0, -1.5, True, False, "", "   \n\t", [], {}, [1, 2], {"a": 1}, [[[]]], "x" * 100_000, "\ud800",
    "a\udfffb", "\x00", "\u202e\u200bRTL", "\U0001f600", "\u2028line\u2029", "\r\n", "\\", '"', "{", "[{",
    [{"role": "bot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}], [{"content": "x"}],
    [{"role": "user", "content": "\ud800"}], ["plain"], [{"role": "assistant", "content": ""}],
    "[{\"role\": \"user\", \"content\": \"hi\"}]",
]


@st.composite
def corrupted(draw, how):
    """(rows as generated, the rows after one object-level corruption of one row, that row's index)."""
    name = draw(st.sampled_from(sorted(FORMATS)))
    _, row = FORMATS[name]
    rows = draw(st.lists(row, min_size=3, max_size=5))
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(rows)]  # first column: survives a cut last cell
    i = draw(st.integers(0, len(rows) - 1))
    bad = dict(rows[i])
    fields = [k for k in bad if k != "id"]
    op = draw(st.sampled_from(["drop", "rename", "add", "retype", "message"]))
    key = draw(st.sampled_from(fields))
    if op == "drop":
        del bad[key]
    elif op == "rename":
        bad[key[:-1] + "_" + key[-1]] = bad.pop(key)
    elif op == "add":
        extra = draw(st.sampled_from(["label", "completion", "chosen", "messages", "text", "prompt", "margin", "zz"]))
        bad[extra] = draw(st.sampled_from(ODD_VALUES + ["ok text"]))
    elif op == "retype":
        bad[key] = draw(st.sampled_from(ODD_VALUES))
    else:  # inside a conversation: a message's role or content
        lists = [k for k in fields if isinstance(bad[k], list) and bad[k]]
        assume(lists)
        k = draw(st.sampled_from(lists))
        j = draw(st.integers(0, len(bad[k]) - 1))
        m = dict(bad[k][j])
        m[draw(st.sampled_from(["role", "content"]))] = draw(st.sampled_from(ODD_VALUES + ["bot", "user", "assistant"]))
        bad[k] = [*bad[k][:j], m, *bad[k][j + 1:]]
    damaged = [*rows[:i], bad, *rows[i + 1:]]
    return name, damaged, i


# ------------------------------------------------------------------------------------------- checking

WHOLE_FILE = ("cannot read parquet", "JSON nested too deeply", "expected a JSON list of objects", ": no rows",
              "every row is invalid", "format; this command needs", "no usable examples", "every example was dropped")


def check_error(e: UserError, root: Path) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    assert msg.startswith(str(root)), f"does not name the file: {msg}"
    located = re.match(rf"{re.escape(str(root))}[^:]*:(\d+|row \d+|item \d+)", msg)
    assert located or any(w in msg for w in WHOLE_FILE), f"names no line: {msg}"
    return msg


def tokenize(ds, kind: str) -> None:
    """The command's own tokenization of the loaded rows: only UserErrors may come out."""
    if kind == "sft":
        encode_dataset(ds, lambda d: encode_sft_row(TOK, d, max_length=1024, max_prompt_length=None,
                                                     completion_only=True, assistant_only=True))
    elif kind == "preference":
        encode_dataset(ds, lambda d: encode_preference(TOK, d, 1024, None))
    elif kind == "unpaired":
        encode_examples(TOK, unpair(ds), TrainConfig(max_length=1024))
    else:
        prompt_examples(ds, TOK, GRPOConfig())


def load(path, kind, **kw):
    try:
        return load_dataset(str(path), kind, **kw), None
    except UserError as e:
        return None, e


def _canon(rows):
    """Comparable form: null fields dropped (see expected_row), id-keyed."""
    return {r["id"]: {k: v for k, v in r.items() if v is not None} for r in rows if isinstance(r.get("id"), str)}


@FUZZED
@given(how=st.sampled_from(LOADERS), data=st.data())
def test_fuzzed_rows(tmp_path_factory, how, data):
    root = tmp_path_factory.mktemp("fuzz")
    name, rows, bad_index = data.draw(corrupted(how))
    kind = FORMATS[name][0]
    path, as_stored = write(root, rows, how)
    family = FAMILY[name]
    expected = [expected_row(r, family) for r in as_stored]

    ds, err = load(path, kind)
    if how == "csv" and re.search(rb"\xed[\xa0-\xbf]", path.read_bytes()):
        # A lone surrogate written raw makes the CSV file itself invalid UTF-8: a file error naming the line.
        assert err is not None and "not UTF-8 text" in check_error(err, root)
        return
    if err is not None:
        msg = check_error(err, root)
        # Only the damaged row may be at fault, and the error must point at it.
        assert expected[bad_index] is None, f"a valid row was rejected: {msg}"
        if how in ("jsonl", "json", "json_wrapped", "csv"):
            row_id = f"r{bad_index}"
            assert re.match(rf"{re.escape(str(path))}:\d+", msg), msg
            line = int(re.match(rf"{re.escape(str(path))}:(\d+)", msg).group(1))
            # Physical lines as the CSV reader counts them (\r, \n or \r\n; JSON writes neither raw).
            text = re.split(r"\r\n|\r|\n", path.read_text(encoding="utf-8", errors="surrogateescape"))
            # The named line is the damaged row's (for JSON, where its object starts; CSV: where its record starts).
            start = next(k for k, t in enumerate(text, 1) if f'"{row_id}"' in t or t.startswith(f"{row_id},"))
            assert line == start or (how.startswith("json") and line == start - 1), (msg, start)
    else:
        assert all(e is not None for e in expected), f"an invalid row was accepted: {as_stored[bad_index]}"
        assert _canon([r.data for r in ds.rows]) == _canon(expected)
        try:
            tokenize(ds, kind)
        except UserError as e:
            check_error(e, root)

    # skip_invalid: every row is either loaded (exactly as written) or counted as skipped; none vanish.
    ds, err = load(path, kind, skip_invalid=True)
    if err is not None:
        check_error(err, root)
        return
    assert len(ds.rows) + sum(ds.skipped.values()) == len(rows)
    assert _canon([r.data for r in ds.rows]) == _canon([e for e in expected if e is not None])


@st.composite
def damaged_bytes(draw):
    name = draw(st.sampled_from(sorted(FORMATS)))
    rows = draw(st.lists(FORMATS[name][1], min_size=3, max_size=5))
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(rows)]
    how = draw(st.sampled_from(["jsonl", "json", "csv", "parquet"]))
    op = draw(st.sampled_from(["truncate", "non_utf8", "deep"] if how != "parquet" else ["truncate"]))
    return name, rows, how, op, draw(st.floats(0, 1))


@FUZZED
@given(case=damaged_bytes())
def test_fuzzed_bytes(tmp_path_factory, case):
    name, rows, how, op, where = case
    kind = FORMATS[name][0]
    root = tmp_path_factory.mktemp("fuzzb")
    path, as_stored = write(root, rows, how)
    raw = path.read_bytes()
    at = int(where * len(raw))
    if op == "truncate":
        raw = raw[:at]
    elif op == "non_utf8":
        raw = raw[:at] + b"\xff" + raw[at:]
    else:  # a value nested thousands deep in place of the first row's id
        deep = b"[" * 50_000 + b"]" * 50_000
        raw = raw.replace(b"\nr0,", b"\n" + deep + b",", 1) if how == "csv" else raw.replace(b'"r0"', deep, 1)
    path.write_bytes(raw)
    originals = _canon([expected_row(r, FAMILY[name]) for r in as_stored])
    for skip in (False, True):
        ds, err = load(path, kind, skip_invalid=skip)
        if err is not None:
            msg = check_error(err, root)
            if op == "non_utf8":
                assert "not UTF-8" in msg, msg
            continue
        got = _canon([r.data for r in ds.rows])
        last = list(got)[-1] if got else None
        for rid, row in got.items():
            if row == originals.get(rid) or (op == "deep" and rid not in originals):
                continue  # (a CSV cell of brackets is text, as any cell that is not a JSON list of objects)
            # The one unavoidable case: a CSV cut inside the last row's unquoted cells reads as shorter texts
            # (and empty cells), exactly as a file without a final newline would.
            assert how == "csv" and op == "truncate" and rid == last, (rid, row)
            orig = originals[rid]
            assert set(row) <= set(orig) and all(orig[k] == v or str(orig[k]).startswith(str(v)) for k, v in row.items())
        if op == "non_utf8" and how == "jsonl":  # every line is loaded or counted (the damaged one skipped)
            assert len(ds.rows) + sum(ds.skipped.values()) == len([x for x in raw.split(b"\n") if x.strip()])


@FUZZED
@given(name=st.sampled_from(sorted(FORMATS)), how=st.sampled_from(LOADERS), data=st.data())
def test_fuzz_harness_round_trip(tmp_path_factory, name, how, data):
    """The harness itself: undamaged rows of every format load back exactly, so the oracle and the writers
    agree with the loader on valid input (and the damage tests test the damage)."""
    kind, strategy = FORMATS[name]
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(data.draw(st.lists(strategy, min_size=3, max_size=4)))]
    path, as_stored = write(tmp_path_factory.mktemp("rt"), rows, how)
    expected = [expected_row(r, FAMILY[name]) for r in as_stored]
    assert all(e is not None for e in expected), as_stored
    ds = load_dataset(str(path), kind)
    assert _canon([r.data for r in ds.rows]) == _canon(expected)
    tokenize(ds, kind)


BAD_FILES = {  # name -> (file content, the one line expected after "posttrain: error: <path>")
    "d.csv": ("prompt,completion\nHello, world,x\n", ":2: 3 cells for 2 columns (prompt, completion); quote texts "
                                                      "that contain commas"),
    "d.jsonl": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a\\ud800", "completion": "b"}\n',
                ":2: field 'prompt': invalid Unicode (a lone surrogate '\\ud800' at character 2)"),
    "deep.jsonl": ('{"prompt": "a", "completion": "b"}\n{"prompt": ' + "[" * 5000 + "]" * 5000 + "}\n",
                   ":2: JSON nested too deeply"),
    "stray.jsonl": ('{"prompt": "a", "completion": "b", "text": 5}\n', None),  # a stray column: trains on the pair
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_cli_bad_rows_exit_2_with_one_line(tmp_path, tiny_model_dir, capsys, name):
    from posttrain import cli

    text, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    rc = cli.main(["sft", f"model={tiny_model_dir}", f"dataset={path}", f"output_dir={tmp_path / 'out'}",
                   "max_steps=1", "batch_size=1", "micro_batch_size=1", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    if expected is None:
        assert rc == 0
    else:
        assert rc == 2 and err == [f"posttrain: error: {path}{expected}"]


def test_a_stray_column_never_replaces_the_rows_own_fields():
    """Found by the fuzzer: a prompt-completion row with an extra `text` (or `messages`) column was tokenized
    as that text. The fields of the row's format win."""
    pair = {"prompt": "2 + 2 =", "completion": " 4"}
    plain = encode_sft_row(TOK, pair, max_length=64, max_prompt_length=None, completion_only=True, assistant_only=True)
    for stray in ({"text": "something else entirely"}, {"messages": [{"role": "assistant", "content": "x"}]}):
        enc = encode_sft_row(TOK, {**pair, **stray}, max_length=64, max_prompt_length=None, completion_only=True,
                             assistant_only=True)
        assert (enc.input_ids, enc.mask) == (plain.input_ids, plain.mask)
