"""benchmarks/learning.py: its statistics by hand, and one row run end to end on the tiny model (--quick)."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, needs_shared_data

ROOT = Path(__file__).resolve().parents[1]


def load_learning():
    spec = importlib.util.spec_from_file_location("learning_bench", ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_paired_gain_and_binomial_se_by_hand():
    """before (1, 0, 0, 1), after (1, 1, 0, 0): differences (0, 1, 0, -1), mean 0, sample variance 2/3, SE
    sqrt(2/3 / 4). after (1, 1, 1, 1): differences (0, 1, 1, 0): mean 0.5, variance 1/3, SE sqrt(1/12)."""
    L = load_learning()
    assert L.paired_gain([1, 0, 0, 1], [1, 1, 0, 0]) == pytest.approx((0.0, math.sqrt(2 / 3 / 4)))
    assert L.paired_gain([1, 0, 0, 1], [1, 1, 1, 1]) == pytest.approx((0.5, math.sqrt(1 / 12)))
    assert L.binomial_se(0.6, 300) == pytest.approx(math.sqrt(0.24 / 300))


def test_time_v_parsing():
    L = load_learning()
    text = ("\tUser time (seconds): 75.96\n\tSystem time (seconds): 26.14\n"
            "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:05:18.72\n\tMaximum resident set size (kbytes): 1126672\n")
    t = L._parse_time_v(text)
    assert t["wall_s"] == pytest.approx(3600 + 5 * 60 + 18.72)
    assert t["cpu_s"] == pytest.approx(102.1) and t["peak_rss_gb"] == pytest.approx(1126672 * 1024 / 1e9)


def test_by_column_counts_per_type(tmp_path):
    L = load_learning()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"type": t}) + "\n" for t in ["add", "mul", "add", "add"]))
    assert L.by_column([1.0, 0.0, 0.0, 1.0], data, "type", None) == {"add": "2/3", "mul": "0/1"}


@pytest.mark.slow
@needs_shared_data
def test_arith_row_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    """--quick: before-eval, SFT, eval, GRPO, eval on 8 test problems with the tiny model; the printed line and the
    JSON record hold the accuracies (0: random text), their standard errors and the measured costs."""
    L = load_learning()
    out = tmp_path / "rows.jsonl"
    rc = L.main(["arith", "--quick", "--model", str(tiny_model_dir), "--work", str(tmp_path / "work"),
                 "--data", str(SHARED_DATA), "--json", str(out), "--seeds", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["row"] == "arith" and record["quick"] and record["line"] in printed
    d = record["details"]
    assert d["before"]["n"] == 8 and d["before"]["accuracy"] == 0.0
    for stage in ("sft", "grpo"):
        s = d["seed3"][stage]
        assert s["accuracy"] == 0.0 and s["gain"] == 0.0 and s["steps"] == 2 and s["peak_rss_gb"] > 0
    assert "NOT met" in record["line"] and "0.0% ± 0.0%" in record["line"]
    assert [s["name"] for s in record["steps"]] == ["before", "sft (seed 3)", "eval after sft (seed 3)",
                                                    "grpo (seed 3)", "eval after grpo (seed 3)"]


@pytest.mark.slow
def test_row_in_parts_then_assembled_reuses_every_step(tmp_path, tiny_model_dir, capsys):
    """--part before, then --part train per seed (separate queue jobs), then --part report: the report
    runs nothing again (every step is 'reused' with its recorded cost) and holds both seeds; a step whose command
    changed (another model) is not reused."""
    L = load_learning()
    common = ["main", "--quick", "--model", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--resume"]
    assert L.main([*common, "--part", "before"]) == 0
    assert sorted(p.name for p in (tmp_path / "work").glob("*.step.json")) == ["before.step.json"]
    for seed in ("1", "2"):
        assert L.main([*common, "--part", "train", "--seeds", seed]) == 0
    assert (tmp_path / "work" / "seed2" / "grpo.step.json").exists()
    capsys.readouterr()
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit, match=r"grpo \(seed 3\): no finished step"):  # --part report runs nothing
        L.main([*common, "--seeds", "1,3", "--part", "report"])
    assert not (tmp_path / "work" / "seed3").exists()
    capsys.readouterr()
    assert L.main([*common, "--seeds", "1,2", "--part", "report", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": reused (") == 5 and ": posttrain " not in printed
    record = json.loads(out.read_text())
    assert [s["name"] for s in record["steps"]] == ["before", "grpo (seed 1)", "eval after grpo (seed 1)",
                                                    "grpo (seed 2)", "eval after grpo (seed 2)"]
    assert all(s["wall_s"] > 0 for s in record["steps"])
    assert record["details"]["seed2"]["grpo"]["gain"] == pytest.approx(0.0)
    # another starting model is another command: nothing is reused
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    assert L.main(["main", "--quick", "--model", str(other), "--work", str(tmp_path / "work"), "--resume",
                   "--part", "before"]) == 0
    assert ": reused (" not in capsys.readouterr().out


def test_every_example_yaml_loads_with_its_command():
    """Each recipe in examples/ (the learning table's rows) is a valid config of the command its name starts
    with: no unknown key, no bad value."""
    import importlib

    from posttrain.config import load_config

    modules = {"online_dpo": "online_dpo", "dpo": "dpo", "rm": "rm", "sft": "sft", "grpo": "grpo", "ppo": "ppo"}
    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert {f.name for f in files} >= {"grpo_arith.yaml", "sft_arith.yaml", "dpo_hh.yaml", "rm_hh.yaml",
                                       "sft_gsm8k.yaml", "grpo_gsm8k.yaml"}
    for f in files:
        prefix = next(p for p in modules if f.stem.startswith(p + "_"))
        module = importlib.import_module(f"posttrain.algorithms.{modules[prefix]}")
        cfg = load_config(module.Config, str(f), [])
        assert cfg.output_dir.startswith("runs/"), f.name


@pytest.mark.slow
@needs_shared_data
def test_final_eval_only_skips_the_warm_up_eval(tmp_path, tiny_model_dir):
    """--final-eval-only (the GSM8K row): SFT then GRPO with one evaluation, after GRPO; the SFT stage keeps its
    cost in the record and the row's 'after' is the GRPO model's."""
    L = load_learning()
    out = tmp_path / "rows.jsonl"
    assert L.main(["arith", "--quick", "--final-eval-only", "--model", str(tiny_model_dir), "--work",
                   str(tmp_path / "work"), "--data", str(SHARED_DATA), "--json", str(out), "--seeds", "1"]) == 0
    record = json.loads(out.read_text())
    assert [s["name"] for s in record["steps"]] == ["before", "sft (seed 1)", "grpo (seed 1)",
                                                    "eval after grpo (seed 1)"]
    sft = record["details"]["seed1"]["sft"]
    assert "accuracy" not in sft and sft["steps"] == 2 and sft["wall_s"] > 0
    assert record["details"]["seed1"]["grpo"]["accuracy"] == 0.0


@pytest.mark.slow
def test_set_makes_a_variant_of_the_last_training_stage(tmp_path, tiny_model_dir, capsys):
    """--set KEY=VALUE reaches the row's training command (and the run's saved config), not its evaluations,
    and the table line names the variant; a malformed --set is refused before anything runs."""
    L = load_learning()
    out = tmp_path / "rows.jsonl"
    assert L.main(["main", "--quick", "--model", str(tiny_model_dir), "--work", str(tmp_path / "work"),
                   "--set", "curriculum=pass_rate", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    by_name = {s["name"]: s for s in record["steps"]}
    assert "curriculum=pass_rate" in by_name["grpo (seed 1)"]["argv"]
    assert not any("curriculum=pass_rate" in s["argv"] for s in record["steps"] if s["name"] != "grpo (seed 1)")
    assert record["line"].startswith("| main (curriculum=pass_rate) |")
    run_dir = tmp_path / "work" / "seed1_curriculum=pass_rate" / "grpo"  # beside the plain row's seed1
    saved = (run_dir / "config.yaml").read_text()
    assert "curriculum: pass_rate" in saved
    with pytest.raises(SystemExit):
        L.main(["main", "--quick", "--model", str(tiny_model_dir), "--work", str(tmp_path / "w2"), "--set", "oops"])
    assert not (tmp_path / "w2").exists()
    # the plain row in the same folder reuses the variant's before-evaluation and trains apart from it
    capsys.readouterr()
    assert L.main(["main", "--quick", "--model", str(tiny_model_dir), "--work", str(tmp_path / "work"),
                   "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "before: reused (" in printed and (tmp_path / "work" / "seed1" / "grpo" / "config.yaml").exists()
    assert "curriculum: pass_rate" not in (tmp_path / "work" / "seed1" / "grpo" / "config.yaml").read_text()


@pytest.mark.slow
@needs_shared_data
def test_a_variant_of_a_two_stage_row_reuses_the_warm_up(tmp_path, tiny_model_dir, capsys):
    """arith with --set: the SFT warm-up is the plain row's (reused, not run again); only GRPO runs anew, from
    that warm-up's model, in its own folder."""
    L = load_learning()
    common = ["arith", "--quick", "--final-eval-only", "--resume", "--model", str(tiny_model_dir), "--work",
              str(tmp_path / "work"), "--data", str(SHARED_DATA)]
    assert L.main(common) == 0
    capsys.readouterr()
    out = tmp_path / "rows.jsonl"
    assert L.main([*common, "--set", "learning_rate=1e-6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "before: reused (" in printed and "sft (seed 1): reused (" in printed
    assert "grpo (seed 1): posttrain grpo" in printed
    grpo = next(s for s in json.loads(out.read_text())["steps"] if s["name"] == "grpo (seed 1)")
    assert f"model={tmp_path / 'work' / 'seed1' / 'sft'}" in grpo["argv"]
    assert f"output_dir={tmp_path / 'work' / 'seed1_learning_rate=1e-6' / 'grpo'}" in grpo["argv"]
