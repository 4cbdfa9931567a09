"""The run directory: a second run never mixes with or replaces the first (refused unless resuming or
overwrite_output_dir; with no output_dir a fresh numbered folder), `posttrain eval` never replaces a training
run's files, and a full disk or an unwritable folder stops the run in one line with the last checkpoint intact."""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli, engine

ROWS = [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def sft(model_dir, data, *extra):
    return ["sft", f"model={model_dir}", f"dataset={data}", "max_steps=3", "batch_size=2", "micro_batch_size=2",
            "learning_rate=1e-3", "progress=false", *extra]


def rows(out, name="metrics.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def error(capsys) -> str:
    """The error line of the last failed command (earlier runs' progress output is skipped)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("posttrain: error:")]
    assert len(err) == 1, err
    return err[0]


def test_a_second_run_into_a_finished_run_is_refused(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "save_steps=1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "learning_rate=1e-2")) == 2
    assert error(capsys) == (f"posttrain: error: output_dir {out} already holds a finished sft run (checkpoint-3); "
                             "resume it with resume_from_checkpoint=latest, set overwrite_output_dir=true to replace "
                             "it, or choose another output_dir")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched

    # overwrite_output_dir: the old run's checkpoints, logs and model go first; nothing of it mixes in.
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "overwrite_output_dir=true", "max_steps=2")) == 0
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert not list(out.glob("checkpoint-*"))  # a stale checkpoint-3 would be what `latest` resumes
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_unfinished_runs_saved_models_and_foreign_files(tmp_path, tiny_model_dir, data, capsys):
    unfinished = tmp_path / "killed"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("# posttrain dpo: the resolved config of this run\nseed: 1\n")
    (unfinished / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={unfinished}")) == 2
    assert error(capsys) == (f"posttrain: error: output_dir {unfinished} already holds an unfinished dpo run; set "
                             "overwrite_output_dir=true to replace it, or choose another output_dir")
    # Training into the folder of the model it starts from would replace that model.
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={tiny_model_dir}")) == 2
    assert "already holds a saved model;" in error(capsys)
    # Files that are not a run's are left alone, and do not stop a run.
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={notes}")) == 0
    assert (notes / "notes.txt").read_text() == "keep me" and (notes / "model.safetensors").exists()
    capsys.readouterr()

    # resume_from_checkpoint=latest in a run killed before its first checkpoint: it starts over there
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={unfinished}", "resume_from_checkpoint=latest")) == 0
    assert [r["step"] for r in rows(unfinished)] == [1, 2, 3]  # the killed run's row is gone
    # ... but a finished run without checkpoints is not started over by it
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={unfinished}", "resume_from_checkpoint=latest")) == 2
    assert error(capsys) == (f"posttrain: error: output_dir {unfinished} already holds a finished sft run; set "
                             "overwrite_output_dir=true to replace it, or choose another output_dir")


def test_no_output_dir_gives_a_fresh_numbered_folder(tmp_path, tiny_model_dir, data, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="posttrain")
    for expected in ("runs/sft", "runs/sft-2", "runs/sft-3"):
        caplog.clear()
        assert cli.main(sft(tiny_model_dir, data, "save_steps=2")) == 0
        assert f"output_dir not set: this run writes to {expected}" in caplog.text
        assert [r["step"] for r in rows(tmp_path / expected)] == [1, 2, 3]  # each its own run, never mixed
    # resume_from_checkpoint=latest without output_dir continues the newest of them
    caplog.clear()
    assert cli.main(sft(tiny_model_dir, data, "save_steps=2", "max_steps=4", "resume_from_checkpoint=latest")) == 0
    assert "output_dir not set: this run writes to runs/sft-3" in caplog.text
    assert [r["step"] for r in rows(tmp_path / "runs/sft-3")] == [1, 2, 3, 4]
    assert not (tmp_path / "runs/sft-4").exists()


def test_eval_into_a_training_run_writes_a_subfolder(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(3)))
    run = tmp_path / "run"
    run.mkdir()
    for name, text in [("config.yaml", "# posttrain grpo: the resolved config of this run\n"),
                       ("metrics.jsonl", '{"step": 1}\n'), ("completions.jsonl", '{"step": 1, "completion": "x"}\n')]:
        (run / name).write_text(text)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    args = ["eval", f"model={tiny_model_dir}", f"dataset={prompts}", "max_completion_length=4", f"output_dir={run}"]
    for sub in ("eval", "eval-2"):
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        assert f"eval results: {run / sub / 'eval.json'}" in out
        assert len((run / sub / "completions.jsonl").read_text().splitlines()) == 3
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # the run's files untouched

    plain = tmp_path / "evals"
    assert cli.main([*args[:-1], f"output_dir={plain}"]) == 0
    capsys.readouterr()
    assert cli.main([*args[:-1], f"output_dir={plain}"]) == 2
    assert error(capsys) == (f"posttrain: error: output_dir {plain} already holds an evaluation (eval.json); set "
                             "overwrite_output_dir=true to replace it, or choose another output_dir")
    assert cli.main([*args[:-1], f"output_dir={plain}", "overwrite_output_dir=true"]) == 0


def test_unwritable_output_dir_is_one_line_before_anything_loads(tmp_path, data, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # The model path does not even exist: the folder is checked first.
    assert cli.main(sft(tmp_path / "no-model", data, f"output_dir={blocker / 'run'}")) == 2
    assert error(capsys) == f"posttrain: error: output_dir {blocker / 'run'}: cannot write there (Not a directory)"
    assert cli.main(sft(tmp_path / "no-model", data, f"output_dir={blocker}")) == 2
    assert error(capsys) == f"posttrain: error: output_dir {blocker}: a file, not a folder"


def _disk_full_on(monkeypatch, target, name, where: str):
    """Make `target.name(obj, path, ...)` raise ENOSPC for paths containing `where`."""
    real = getattr(target, name)

    def full(obj, path, *args, **kwargs):
        if where in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(target, name, full)


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, data, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={straight}", "max_steps=4")) == 0
    out = tmp_path / "run"
    # The disk fills while checkpoint-2 is written.
    _disk_full_on(monkeypatch, torch, "save", ".checkpoint-2.tmp")
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "max_steps=4", "save_steps=1")) == 1
    msg = error(capsys)
    assert msg.startswith("posttrain: error: cannot write ") and msg.endswith(
        f": No space left on device; the run stopped, the last good checkpoint is {out / 'checkpoint-1'} "
        "(resume with resume_from_checkpoint=latest)")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no partial one
    assert not (out / "model.safetensors").exists()
    monkeypatch.undo()
    # Space again: the resumed run ends exactly where the uninterrupted one did.
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "max_steps=4", "save_steps=1",
                        "resume_from_checkpoint=latest")) == 0
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(straight)]


def test_disk_full_while_logging_and_saving_the_model(tmp_path, tiny_model_dir, data, monkeypatch, capsys):
    out = tmp_path / "run"
    real_step = engine.RunLog.step

    def half_row_then_full(self, row, write=True):
        if row.get("step") == 3 and write:  # the disk fills in the middle of the row
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write('{"step": 3, "lo')
            raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "metrics.jsonl"))
        return real_step(self, row, write)

    monkeypatch.setattr(engine.RunLog, "step", half_row_then_full)
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "save_steps=2")) == 1
    assert error(capsys) == (f"posttrain: error: cannot write {out / 'metrics.jsonl'}: No space left on device; the "
                             f"run stopped, the last good checkpoint is {out / 'checkpoint-2'} (resume with "
                             "resume_from_checkpoint=latest)")
    monkeypatch.undo()
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out}", "save_steps=2", "resume_from_checkpoint=latest")) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3]  # the cut row is gone, step 3 logged once

    # The final model cannot be written: no half model that would make the run look finished.
    out2 = tmp_path / "run2"
    from transformers import modeling_utils

    _disk_full_on(monkeypatch, modeling_utils, "safe_save_file", ".final.tmp")
    assert cli.main(sft(tiny_model_dir, data, f"output_dir={out2}", "save_steps=3")) == 1
    assert "No space left on device; the run stopped, the last good checkpoint is" in error(capsys)
    assert not (out2 / "model.safetensors").exists() and not (out2 / ".final.tmp").exists()
    assert (out2 / "checkpoint-3" / "trainable.safetensors").exists()
