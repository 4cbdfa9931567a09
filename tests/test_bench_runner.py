"""benchmarks/bench.py's parent: a run stopped inside a child keeps every result measured before that child."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_results_saved_before_each_child(tmp_path, monkeypatch):
    """Two children succeed, the third is killed (a queue time limit): the JSON on disk holds the first two."""
    B = load_bench()
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a timeout's SIGTERM/SIGINT does to the parent mid-child
        out = B.RESULT_MARK + json.dumps({"step_seconds": [float(len(calls))]})
        return subprocess.CompletedProcess(argv, 0, stdout=out + "\n", stderr="")

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    path = tmp_path / "partial.json"
    results = {"args": {}}
    runner = B.Runner(tmp_path / "work", verbose=False, on_result=lambda: path.write_text(json.dumps(results)))
    (tmp_path / "work").mkdir()
    res = results["dpo_hh_full"] = {}
    res["posttrain"] = runner.child("dpo_posttrain", "a")
    res["trl"] = runner.child("dpo_trl", "b")
    try:
        results["grpo"] = {"posttrain": runner.child("grpo_posttrain", "c")}
    except KeyboardInterrupt:
        pass
    saved = json.loads(path.read_text())
    assert saved["dpo_hh_full"] == {"posttrain": {"step_seconds": [1.0]}, "trl": {"step_seconds": [2.0]}}
    assert "grpo" not in saved
