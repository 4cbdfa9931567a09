"""`posttrain eval` on the tiny model: greedy accuracy, pass@k, output files, printed table and JSON line.

A random model with tied input/output embeddings predicts, greedily, the token it was just fed (its hidden
state stays close to that token's embedding, and the logit of a token is the dot product with its embedding),
so with plain prompts (chat_prompts=false) each greedy completion repeats the prompt's last token:
"What is 12 + 7?" -> "??????". That makes the greedy answers known in advance; the test still checks them
against transformers' own greedy `generate`.
(The reference MATH-500 solutions grading as correct is tested in tests/rollout/test_rewards.py.)
"""

import json
import sys

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import cli
from posttrain.algorithms.grpo import PromptExample
from posttrain.evaluate import evaluate_prompts

# prompt, gold answer, what greedy decoding repeats (the prompt's last token)
ROWS = [
    ("What is 12 + 7?", "?", "?"),
    ("2 + 2 =", "=", "="),
    ("Human: How do I bake bread?", "!", "?"),
    ("the a an is of", "of", " of"),
    ("Reply with only the final number.", "5", "."),
    ("What is 7 * 3?", "?", "?"),
]
L = 6

VERIFIERS = '''
def contains(prompts, completions, answer, **kwargs):
    return [float(a in c) for a, c in zip(answer, completions)]

def has_e(prompts, completions, **kwargs):
    return [float("e" in c) for c in completions]
'''


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a, _ in ROWS))
    return path


@pytest.fixture
def verifiers(tmp_path, monkeypatch):
    (tmp_path / "eval_test_verifiers.py").write_text(VERIFIERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "eval_test_verifiers", raising=False)
    return "eval_test_verifiers"


def run_eval(capsys, *args):
    rc = cli.main(["eval", *args])
    out = capsys.readouterr().out
    return rc, out


def rows_of(out_dir):
    return [json.loads(line) for line in (out_dir / "completions.jsonl").read_text().splitlines()]


def test_greedy_accuracy_equals_hand_count(tmp_path, tiny_model_dir, data, verifiers, capsys):
    out_dir = tmp_path / "out"
    rc, out = run_eval(capsys, f"model={tiny_model_dir}", f"dataset={data}", f"reward_funcs={verifiers}:contains",
                       f"max_completion_length={L}", "chat_prompts=false", f"output_dir={out_dir}")
    assert rc == 0
    # Greedy completions repeat the last prompt token; `contains` finds the gold in rows 0, 1, 3, 5 (row 2
    # repeats "?" but its gold is "!", row 4 repeats "." for gold "5"): accuracy 4/6.
    rows = rows_of(out_dir)
    assert [r["completion"] for r in rows] == [rep * L if rep != " of" else " of" * L for _, _, rep in ROWS]
    assert [r["rewards"][f"{verifiers}:contains"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["index"] for r in rows] == list(range(6)) and [r["answer"] for r in rows] == [a for _, a, _ in ROWS]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # independent greedy decoding
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for (prompt, _, _), r in zip(ROWS, rows):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, do_sample=False, max_new_tokens=L)
        assert tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == r["completion"]

    summary = json.loads((out_dir / "eval.json").read_text())
    assert summary[f"{verifiers}:contains"] == pytest.approx(4 / 6, abs=1e-4)
    # sample std of (1, 1, 0, 1, 0, 1): sqrt((4 (1/3)^2 + 2 (2/3)^2) / 5) = sqrt(4/15); / sqrt(6)
    assert summary[f"{verifiers}:contains/stderr"] == pytest.approx((4 / 15) ** 0.5 / 6**0.5, abs=1e-4)
    assert summary["prompts"] == 6 and summary["num_samples"] == 1
    assert not any("pass@" in k for k in summary)
    # printed: a table titled "posttrain eval" with the metric, then the same summary as one JSON line
    lines = out.strip().splitlines()
    assert "posttrain eval" in lines[0] and any(f"{verifiers}:contains" in x and "0.6667" in x for x in lines)
    assert json.loads(lines[-1]) == summary


def test_pass_at_k_from_samples(tmp_path, tiny_model_dir, data, verifiers, capsys):
    """num_samples=3 samples at temperature 1: the headline is the mean over all 18 completions, pass@3 the share
    of prompts with at least one success among their 3, recomputed here from completions.jsonl."""
    out_dir = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={data}", f"reward_funcs={verifiers}:has_e,{verifiers}:contains",
            f"max_completion_length={L}", "chat_prompts=false", "num_samples=3", "seed=3"]
    rc, _ = run_eval(capsys, *args, f"output_dir={out_dir}")
    assert rc == 0
    rows = rows_of(out_dir)
    assert len(rows) == 18 and [r["index"] for r in rows] == [i for i in range(6) for _ in range(3)]
    scores = [float("e" in r["completion"]) for r in rows]
    assert [r["rewards"][f"{verifiers}:has_e"] for r in rows] == scores
    per_prompt = [max(scores[3 * i : 3 * i + 3]) for i in range(6)]
    summary = json.loads((out_dir / "eval.json").read_text())
    mean = sum(scores) / 18
    assert summary[f"{verifiers}:has_e"] == pytest.approx(mean, abs=1e-4)
    assert summary[f"{verifiers}:has_e/pass@3"] == pytest.approx(sum(per_prompt) / 6, abs=1e-4)
    # the standard error is over the 6 prompts' own means of 3 samples, not over 18 draws
    prompt_means = torch.tensor([sum(scores[3 * i : 3 * i + 3]) / 3 for i in range(6)])
    assert summary[f"{verifiers}:has_e/stderr"] == pytest.approx(float(prompt_means.std() / 6**0.5), abs=1e-4)
    assert 0 < mean < summary[f"{verifiers}:has_e/pass@3"]  # some prompts mix successes and failures
    assert len({r["completion"] for r in rows}) == 18  # sampled, not greedy
    # the same seed samples the same completions
    rc, _ = run_eval(capsys, *args, f"output_dir={tmp_path / 'again'}")
    assert rc == 0 and rows_of(tmp_path / "again") == rows


def test_evaluate_prompts_counts_unscored_rows_as_failures(tokenizer, model):
    """The library call GRPO's eval uses: a row a verifier did not score (None, or the function crashed) counts
    as not correct, so a broken verifier can only lower the reported accuracy, never raise it."""

    def half(prompts, completions, **kwargs):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def boom(prompts, completions, **kwargs):
        raise RuntimeError("down")

    exs = [PromptExample(i, p, tokenizer(p)["input_ids"], {"answer": a}) for i, (p, a, _) in enumerate(ROWS)]
    report = evaluate_prompts(model, tokenizer, exs, [("half", half), ("boom", boom)], max_new_tokens=3,
                              batch_size=4)
    # two batches (4 + 2 prompts), each scoring rows 0, 2 (, ...) of the batch: 2 + 1 = 3 of 6
    assert report["metrics"] == {"half": 0.5, "boom": 0.0, "half/stderr": pytest.approx((0.3) ** 0.5 / 6**0.5),
                                 "boom/stderr": 0.0}
    assert [r["rewards"]["half"] for r in report["rows"]] == [1.0, None, 1.0, None, 1.0, None]
    assert all(r["rewards"]["boom"] is None for r in report["rows"])


def test_unknown_verifier_exits_2_before_loading_a_model(data, capsys):
    rc = cli.main(["eval", "model=./no/such/model", f"dataset={data}", "reward_funcs=acuracy"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown reward function 'acuracy'" in err and "model path not found" not in err


@needs_shared_data
def test_eval_on_math500_rows(tmp_path, tiny_model_dir, capsys):
    out_dir = tmp_path / "out"
    rc, out = run_eval(capsys, f"model={tiny_model_dir}", f"dataset={SHARED_DATA / 'math500_test.jsonl'}",
                       "max_samples=3", "max_completion_length=4", f"output_dir={out_dir}")
    assert rc == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["prompts"] == 3 and summary["accuracy"] == 0.0  # random text is never the answer
    gold = [json.loads(line)["answer"] for line in (SHARED_DATA / "math500_test.jsonl").read_text().splitlines()[:3]]
    assert [r["answer"] for r in rows_of(out_dir)] == gold
    assert all(r["rewards"]["accuracy"] == 0.0 for r in rows_of(out_dir))
