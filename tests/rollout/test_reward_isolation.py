"""reward_isolation: process. Reward functions that segfault, call os._exit, loop forever or allocate without
bound score None (NaN) for that batch, are counted (reward_failures, reward_timeouts), and their worker is
replaced: the next batch is scored normally, and a tiny GRPO run with all four finishes."""

import json
import multiprocessing
import sys

import pytest

from posttrain import cli
from posttrain.rollout.rewards import compute_rewards, load_reward_funcs

FAULTY = '''
import ctypes, os
from pathlib import Path

def _first(name):
    """True on the first call in the whole run (a marker file outlives the worker that crashes)."""
    mark = Path(os.environ["FAULT_DIR"]) / f".{name}.done"
    if mark.exists():
        return False
    mark.write_text("x")
    return True

def segv(prompts, completions, **kw):
    if _first("segv"):
        ctypes.string_at(0)
    return [1.0] * len(completions)

def exits(prompts, completions, **kw):
    if _first("exits"):
        os._exit(3)
    return [2.0] * len(completions)

def loops(prompts, completions, **kw):
    if _first("loops"):
        while True:
            pass
    return [3.0] * len(completions)

def hog(prompts, completions, **kw):
    if _first("hog"):
        held = []
        while True:
            held.append(bytes(10**8))  # address space grows by 100 MB a turn (untouched pages: no RAM used)
    return [4.0] * len(completions)

def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]

def raises(prompts, completions, **kw):
    raise KeyError("no such column")
'''

FAULTS = {"segv": 1.0, "exits": 2.0, "loops": 3.0, "hog": 4.0}


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    (tmp_path / "faulty_rewards.py").write_text(FAULTY)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    monkeypatch.delitem(sys.modules, "faulty_rewards", raising=False)
    monkeypatch.setenv("FAULT_DIR", str(tmp_path))
    return "faulty_rewards"


def test_every_fault_costs_one_batch_and_the_worker_is_replaced(faulty):
    names = [f"{faulty}:{f}" for f in [*FAULTS, "length", "raises"]]
    funcs = load_reward_funcs(names, isolation="process", memory_mb=1024)
    try:
        first = compute_rewards(funcs, ["p", "q"], ["ab", "abc"], {}, timeout=2.0)
        second = compute_rewards(funcs, ["p", "q"], ["ab", "abc"], {}, timeout=2.0)
    finally:
        for _, fn in funcs:
            fn.close()
    # Batch 1: the four faults and the raising function score NaN; only `length` scores.
    assert first.rewards[:, :4].isnan().all() and first.rewards[:, 5].isnan().all()
    assert first.rewards[:, 4].tolist() == [2.0, 3.0]
    assert first.timeouts == {**{n: 0 for n in names}, f"{faulty}:loops": 1}
    assert first.failures == {**{n: 1 for n in names}, f"{faulty}:loops": 0, f"{faulty}:length": 0}
    # Batch 2: each crashed worker was replaced and scores (its fault happens only once).
    assert second.rewards[:, :5].tolist() == [[1.0, 2.0, 3.0, 4.0, 2.0], [1.0, 2.0, 3.0, 4.0, 3.0]]
    assert second.failures == {**{n: 0 for n in names}, f"{faulty}:raises": 1}
    assert sum(second.timeouts.values()) == 0
    assert [fn.replacements for _, fn in funcs] == [1, 1, 1, 1, 0, 0]  # a raising function keeps its worker


def test_grpo_run_with_four_faulty_rewards_finishes(tmp_path, tiny_model_dir, faulty):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ["2 + 2 =", "What is 7?"]))
    out = tmp_path / "run"
    funcs = ",".join(f"{faulty}:{f}" for f in [*FAULTS, "length"])
    rc = cli.main(["grpo", f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={out}", "num_generations=2",
                   "max_completion_length=4", "batch_size=2", "micro_batch_size=4", "max_steps=2", "progress=false",
                   f"reward_funcs={funcs}", "reward_isolation=process", "reward_timeout=2", "reward_memory_mb=1024"])
    assert rc == 0 and (out / "model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    one, two = rows
    assert (one["reward_failures"], one["reward_timeouts"]) == (3.0, 1.0)  # segv, exit, MemoryError; the loop
    assert (two["reward_failures"], two["reward_timeouts"]) == (0.0, 0.0)
    for name, value in FAULTS.items():
        assert one[f"rewards/{faulty}:{name}/mean"] != one[f"rewards/{faulty}:{name}/mean"]  # NaN: not scored
        assert two[f"rewards/{faulty}:{name}/mean"] == value  # the replacement worker scored
    assert one[f"rewards/{faulty}:length/mean"] > 0 and one["grad_norm"] > 0
    assert not multiprocessing.active_children()  # the run closed its workers


def test_worker_load_errors_are_one_line_user_errors(tmp_path, tiny_model_dir, faulty, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "2 + 2 =", "answer": "4"}) + "\n")
    base = ["grpo", f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={tmp_path / 'o'}",
            "reward_isolation=process"]
    assert cli.main([*base, "reward_funcs=no_such_module:f"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain: error: reward_funcs: reward function 'no_such_module:f': cannot import "
                          "'no_such_module' (ModuleNotFoundError") and "\n" not in err
    assert cli.main([*base, f"reward_funcs={faulty}:length", "reward_memory_mb=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"posttrain: error: reward_funcs: reward function '{faulty}:length': reward_memory_mb=1 "
                          "is below the ") and err.endswith("MiB its worker process already takes after loading it")
    assert cli.main([*base.copy()[:-1], f"reward_funcs={faulty}:length", "reward_memory_mb=64"]) == 2
    assert capsys.readouterr().err.strip() == ("posttrain: error: reward_memory_mb must be >= 1 and needs "
                                               "reward_isolation=process")
    assert not multiprocessing.active_children()
