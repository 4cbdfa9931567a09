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


def test_a_child_killed_after_its_partial_result_keeps_its_times(tmp_path, monkeypatch):
    """A child that reported its timed steps and was then killed (out of memory in the profiled extra step) gives
    those times, marked; a child killed before any partial result, or one whose only result is not partial, is
    a failure (None)."""
    B = load_bench()
    partial = B.RESULT_MARK + json.dumps({"step_seconds": [3.0], "partial": "before the profiled step"})
    whole = B.RESULT_MARK + json.dumps({"step_seconds": [4.0]})
    outcomes = iter([(-9, partial), (-9, ""), (1, whole), (0, partial + "\n" + whole)])

    def fake_run(argv, **kwargs):
        rc, out = next(outcomes)
        return subprocess.CompletedProcess(argv, rc, stdout=out + "\n", stderr="")

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    (tmp_path / "work").mkdir()
    runner = B.Runner(tmp_path / "work", verbose=False)
    got = runner.child("dpo_trl", "killed in its profile")
    assert got["step_seconds"] == [3.0] and got["failed_after"] == "exit -9"
    assert runner.child("dpo_trl", "killed early") is None
    assert runner.child("dpo_trl", "failed after a whole result") is None
    assert runner.child("dpo_trl", "finished: the last line wins") == {"step_seconds": [4.0]}
    assert B.top_components(None, failed_after="exit -9") == "- (profiled step: exit -9)"


def test_the_trl_child_reports_its_timed_steps_before_profiling():
    """The partial result is printed inside the profiled step's branch, before the profiler runs."""
    src = (ROOT / "benchmarks" / "bench.py").read_text()
    branch = src[src.index("def child_dpo_trl"):src.index("def make_step_timer")]
    assert branch.index('"partial": "before the profiled step"') < branch.index("return prof.run(super().training_step")
