"""Reading every TRL data format from every file type, and row validation with file:line messages."""

import json

import pandas as pd
import pytest

from posttrain.config import UserError
from posttrain.data.formats import detect_format, load_dataset, report_skipped

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "4"}
B = {"role": "assistant", "content": "5"}

# name -> (rows as written, the kind of command that reads them, detected format, rows after loading)
FORMATS = {
    "text": ([{"text": "The answer is 19."}, {"text": "Bake the bread."}], "sft", "language_modeling", None),
    "messages": ([{"messages": [U, A]}, {"messages": [{"role": "system", "content": "Be brief."}, U, A]}],
                 "sft", "language_modeling", None),
    "prompt_completion": ([{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "3 + 3 =", "completion": " 6"}],
                          "sft", "prompt_completion", None),
    "prompt_completion_conv": ([{"prompt": [U], "completion": [A]}, {"prompt": [U, A, U], "completion": [B]}],
                               "sft", "prompt_completion", None),
    "preference": ([{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}], "preference", "preference", None),
    # Implicit prompt: the shared leading turns of chosen/rejected become the prompt.
    "preference_implicit": ([{"chosen": [U, A], "rejected": [U, B]}], "preference", "preference",
                            [{"prompt": [U], "chosen": [A], "rejected": [B]}]),
    "unpaired": ([{"prompt": "2 + 2 =", "completion": " 4", "label": True},
                  {"prompt": "2 + 2 =", "completion": " 5", "label": False}], "unpaired", "unpaired", None),
    "prompt_only": ([{"prompt": "What is 2 + 2?", "answer": "4", "level": 1}], "prompt", "prompt_only", None),
}


def write(path, rows):
    """Write rows in the file type named by the suffix (CSV: conversations as JSON cells)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif suffix == ".csv":
        cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(cells).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_loads_from_every_file_type(tmp_path, name, suffix):
    rows, kind, fmt, expected = FORMATS[name]
    ds = load_dataset(str(write(tmp_path / f"data{suffix}", rows)), kind)
    assert ds.format == fmt
    got = [r.data for r in ds.rows]
    if suffix == ".csv":
        # CSV cells are strings: numbers stay text (the label column is the one converted to bool).
        expected_rows = [{k: (str(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in r.items()}
                         for r in (expected or rows)]
    else:
        expected_rows = expected or rows
    assert got == expected_rows
    assert all(isinstance(r.data.get("label", True), bool) for r in ds.rows)


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_loads_from_a_folder(tmp_path, name):
    rows, kind, fmt, expected = FORMATS[name]
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    write(folder / "a.jsonl", rows)
    write(folder / "sub" / "b.parquet", rows)
    (folder / "README.md").write_text("ignored: not a data file")
    ds = load_dataset(str(folder), kind)
    assert ds.format == fmt
    # Files are read in sorted path order: a.jsonl, then sub/b.parquet.
    assert [r.data for r in ds.rows] == (expected or rows) * 2
    assert ds.rows[0].source.endswith("a.jsonl:1")
    assert ds.rows[len(rows)].source.endswith("b.parquet:row 1")


def test_detect_format_rules():
    assert detect_format({"text": "x"}) == "language_modeling"
    assert detect_format({"messages": []}) == "language_modeling"
    assert detect_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}) == "preference"
    assert detect_format({"chosen": [U, A], "rejected": [U, B]}) == "preference"
    assert detect_format({"prompt": "p", "completion": "c", "label": True}) == "unpaired"
    assert detect_format({"prompt": "p", "answer": "4"}) == "prompt_only"
    assert detect_format({"question": "p"}) is None


# ---------------------------------------------------------------------------------------------------
# Validation messages: every one names file:line and the field.


def _error(tmp_path, lines: list[str], kind="sft", name="bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(UserError) as e:
        load_dataset(str(path), kind)
    return str(e.value)


def test_invalid_json_line(tmp_path):
    msg = _error(tmp_path, ['{"text": "ok"}', '{"text": "a",}'])
    # Column 14 is the '}' after the trailing comma; the wording between comes from Python's json module.
    assert msg.startswith(f"{tmp_path}/bad.jsonl:2: invalid JSON (") and msg.endswith(" at column 14)")


def test_invalid_json_first_line(tmp_path):
    assert _error(tmp_path, ["not json"]).startswith(f"{tmp_path}/bad.jsonl:1: invalid JSON")


def test_missing_field(tmp_path):
    msg = _error(tmp_path, ['{"prompt": "a", "completion": "b"}', '{"prompt": "c"}'])
    assert msg == f"{tmp_path}/bad.jsonl:2: missing field 'completion' (this file is in prompt-completion format)"


def test_missing_label_in_unpaired_file(tmp_path):
    rows = ['{"prompt": "a", "completion": "b", "label": true}', '{"prompt": "a", "completion": "b"}']
    msg = _error(tmp_path, rows, kind="unpaired")
    assert msg == f"{tmp_path}/bad.jsonl:2: missing field 'label' (this file is in unpaired format)"


def test_null_counts_as_missing(tmp_path):
    msg = _error(tmp_path, ['{"prompt": "a", "completion": null}'])
    assert msg == f"{tmp_path}/bad.jsonl:1: missing field 'completion' (this file is in prompt-completion format)"


def test_wrong_type(tmp_path):
    assert _error(tmp_path, ['{"text": 5}']) == f"{tmp_path}/bad.jsonl:1: field 'text': expected a string, got int"
    msg = _error(tmp_path, ['{"prompt": "a", "completion": 3}'])
    assert msg == f"{tmp_path}/bad.jsonl:1: field 'completion': expected a string or a list of messages, got int"
    msg = _error(tmp_path, ['{"messages": [{"role": "user", "content": 7}]}'])
    assert msg == f"{tmp_path}/bad.jsonl:1: field 'messages[0]'.content: expected a string, got int"


def test_empty_text(tmp_path):
    msg = _error(tmp_path, ['{"text": "fine"}', '{"text": "fine"}', '{"text": "   "}'])
    assert msg == f"{tmp_path}/bad.jsonl:3: field 'text': empty text"


def test_unknown_role(tmp_path):
    msg = _error(tmp_path, [json.dumps({"messages": [U, {"role": "bot", "content": "4"}]})])
    assert msg.startswith(f"{tmp_path}/bad.jsonl:1: field 'messages[1]': unknown role 'bot' (expected one of ")


def test_label_not_bool(tmp_path):
    msg = _error(tmp_path, ['{"prompt": "a", "completion": "b", "label": "yes"}'], kind="unpaired")
    assert msg == f"{tmp_path}/bad.jsonl:1: field 'label': expected true or false, got 'yes'"


def test_mixed_formats(tmp_path):
    msg = _error(tmp_path, ['{"text": "a"}', '{"prompt": "b", "completion": "c"}'])
    assert msg == (
        f"{tmp_path}/bad.jsonl:2: fields ['completion', 'prompt'] are prompt-completion format, but most rows "
        f"(as {tmp_path}/bad.jsonl:1) are language-modeling; mixed formats in one dataset"
    )


def test_text_prompt_with_conversational_completion(tmp_path):
    msg = _error(tmp_path, [json.dumps({"prompt": "2 + 2 =", "completion": [A]})])
    assert msg == (f"{tmp_path}/bad.jsonl:1: field 'completion': is a conversation but 'prompt' is text; "
                   "both must be text or both conversations")


def test_messages_without_assistant_turn(tmp_path):
    msg = _error(tmp_path, [json.dumps({"messages": [U]})])
    assert msg == f"{tmp_path}/bad.jsonl:1: field 'messages': no assistant turn to train on"


def test_format_not_accepted_by_command(tmp_path):
    msg = _error(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "c"}'], kind="sft")
    assert msg == f"{tmp_path}/bad.jsonl: data is in preference format; this command needs language-modeling or prompt-completion"


def test_json_errors_point_at_the_line_of_the_item(tmp_path):
    # Items start on lines 2 and 3 of the file (line 1 is the opening bracket).
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "ok"},\n  {"text": ""}\n]\n')
    with pytest.raises(UserError, match=rf"^{tmp_path}/bad.json:3: field 'text': empty text$"):
        load_dataset(str(path), "sft")


def test_csv_errors_count_physical_lines(tmp_path):
    # Header on line 1; the first record spans lines 2-3 (quoted newline), so the bad record is on line 4.
    path = tmp_path / "bad.csv"
    path.write_text('prompt,completion\n"two\nlines",ok\nfine,\n')
    with pytest.raises(UserError) as e:
        load_dataset(str(path), "sft")
    # An empty cell is a missing field (CSV has no other way to leave one out).
    assert str(e.value) == f"{tmp_path}/bad.csv:4: missing field 'completion' (this file is in prompt-completion format)"


def test_csv_label_parsing(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\na,b,TRUE\nc,d,false\ne,f,maybe\n")
    with pytest.raises(UserError) as e:
        load_dataset(str(path), "unpaired")
    assert str(e.value) == f"{tmp_path}/u.csv:4: field 'label': expected true or false, got 'maybe'"


def test_csv_text_that_looks_like_json_stays_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text\n"[1, 2] is a list"\n"[1, 2]"\n[not json\n')
    assert [r.data["text"] for r in load_dataset(str(path), "sft").rows] == ["[1, 2] is a list", "[1, 2]", "[not json"]


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame([{"text": "a"}, {"text": ""}]).to_parquet(path)
    with pytest.raises(UserError, match=rf"^{tmp_path}/bad.parquet:row 2: field 'text': empty text$"):
        load_dataset(str(path), "sft")


def test_unreadable_files(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{tmp_path}/latin1.jsonl:2: not UTF-8 text \(byte 14 of the line\)$"):
        load_dataset(str(tmp_path / "latin1.jsonl"), "sft")
    assert len(load_dataset(str(tmp_path / "latin1.jsonl"), "sft", skip_invalid=True).rows) == 1
    (tmp_path / "latin1.csv").write_bytes('text\nok\ncaf\u00e9\n'.encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{tmp_path}/latin1.csv:3: not UTF-8 text \(byte 12 of the file\)$"):
        load_dataset(str(tmp_path / "latin1.csv"), "sft")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=rf"^{tmp_path}/broken.parquet: cannot read parquet \("):
        load_dataset(str(tmp_path / "broken.parquet"), "sft")


def test_missing_file_and_bad_builtin_task(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_dataset(str(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(UserError, match="^arithmetic:level=9: "):
        load_dataset("arithmetic:level=9", "sft")


# ---------------------------------------------------------------------------------------------------


def test_skip_invalid_skips_and_counts_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"text": "good one"}\n'
        '{"text": \n'  # invalid JSON
        '{"text": ""}\n'  # empty
        '{"text": "good two"}\n'
        '{"text": " "}\n'  # empty
        '{"prompt": "p", "completion": "c"}\n'  # other format
    )
    ds = load_dataset(str(path), "sft", skip_invalid=True)
    assert [r.data["text"] for r in ds.rows] == ["good one", "good two"]
    assert [r.source for r in ds.rows] == [f"{path}:1", f"{path}:4"]
    assert sum(ds.skipped.values()) == 4
    assert ds.skipped["field 'text': empty text"] == 2
    report = report_skipped(ds)
    assert report[0] == f"{path}: skipped 2 row(s): field 'text': empty text"
    assert any(line.startswith(f"{path}: skipped 1 row(s): invalid JSON (") for line in report)
    assert any("mixed formats" in line for line in report)


def test_skip_invalid_with_nothing_valid(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="every row is invalid"):
        load_dataset(str(path), "sft", skip_invalid=True)


def test_max_samples(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(10)])
    assert [r.data["text"] for r in load_dataset(str(path), "sft", max_samples=3).rows] == ["row 0", "row 1", "row 2"]


def test_solution_is_the_sft_completion(tmp_path):
    """GSM8K-style rows {prompt, answer, solution}: SFT trains on the solution; RL keeps the prompt-only row."""
    row = {"prompt": "What is 47 + 385?", "answer": "432", "solution": "47 + 385 = 432"}
    path = write(tmp_path / "g.jsonl", [row])
    ds = load_dataset(str(path), "sft")
    assert ds.format == "prompt_completion"
    assert ds.rows[0].data == {**row, "completion": "47 + 385 = 432"}
    ds = load_dataset(str(path), "prompt")
    assert ds.format == "prompt_only" and ds.rows[0].data == row
    # An explicit completion wins over the solution.
    path = write(tmp_path / "h.jsonl", [{**row, "completion": "432"}])
    assert load_dataset(str(path), "sft").rows[0].data["completion"] == "432"
