"""posttrain audit: counts on small files built to hold each defect, the similarity measures on hand-computed
cases, the exit codes, and a run over the shared data."""

import json

from conftest import SHARED_DATA, needs_shared_data

from posttrain import cli
from posttrain.audit import edit_similarity, near_duplicate_groups, overlap_bound, percentiles


def test_percentiles_and_similarities_by_hand():
    """percentiles of 1..10 take the next value up (method "higher"): p50 -> 6 (rank 4.5 -> 5th index), p90 -> 10
    (rank 8.1), p99 -> 10; the mean is 5.5.
    [1, 2, 3, 4] vs [1, 2, 4]: one deletion, similarity 1 - 1/4 = 0.75; the multiset overlap {1, 2, 4} gives the
    bound 3/4. [1, 2] vs [2, 1]: two substitutions (or a deletion and an insertion), 1 - 2/2 = 0, while the
    overlap bound is 1: it only bounds from above."""
    assert percentiles(list(range(1, 11))) == {"mean": 5.5, "p50": 6, "p90": 10, "p99": 10, "max": 10}
    assert edit_similarity([1, 2, 3, 4], [1, 2, 4]) == 0.75 == overlap_bound([1, 2, 3, 4], [1, 2, 4])
    assert edit_similarity([1, 2], [2, 1]) == 0.0 and overlap_bound([1, 2], [2, 1]) == 1.0
    assert edit_similarity([], []) == 1.0 and edit_similarity([5], []) == 0.0
    assert edit_similarity(list(range(40)), list(range(40))) == 1.0


def test_near_duplicates_keep_operators_and_link_groups():
    texts = ["Compute 53 + 39.", "Compute 53 * 39.", "The cat sat on the mat and looked at the door all day long.",
             "the cat sat on the mat and looked at the door all day long!", "Something else entirely, nothing alike.",
             "The cat sat on the mat and looked at the door all day long today."]
    groups = near_duplicate_groups(texts, 0.8)
    assert groups == [[2, 3, 5]]  # case is ignored; punctuation and operators are tokens of their own
    assert near_duplicate_groups(texts, 0.95) == []  # "... long." vs "... long!": 11 of 13 word 3-grams shared
    assert near_duplicate_groups(texts[:3] + [texts[2]], 1.0) == [[2, 3]]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _audit(capsys, *argv):
    code = cli.main(["audit", *argv, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out else None), out.err


def test_preference_defects_are_counted_and_named(tmp_path, tiny_model_dir, capsys):
    long = "the answer is " + "very " * 200 + "long"
    rows = [
        {"prompt": "What is two plus two?", "chosen": "It is four, because two and two make four.", "rejected": "Five."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue."},  # identical
        {"prompt": "Name a fruit.", "chosen": "An apple is a round fruit that grows on the old apple trees in the "
         "orchard behind the farm house every single year.", "rejected": "An apple is a round fruit that grows on the "
         "old apple trees in the orchard behind the farm house each year."},  # near-identical
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue."},  # a repeated row
        {"prompt": "Tell me a story.", "chosen": long, "rejected": "No."},  # truncated at max_length 160
        {"prompt": "Why? " * 200, "chosen": "Because.", "rejected": "No."},  # the prompt fills max_length: dropped
        {"prompt": "Broken row", "chosen": "yes"},  # invalid
    ]
    data = _write(tmp_path / "pairs.jsonl", rows)
    code, r, _ = _audit(capsys, data, f"model={tiny_model_dir}", "max_length=160")
    assert code == 0 and r["format"] == "preference" and r["command"] == "dpo" and r["rows"] == 7
    assert r["invalid"] == [[f"{data}:7", "missing field 'rejected' (this file is in preference format)"]]
    assert r["pairs"]["identical"] == 2 and r["pairs"]["identical_examples"] == [f"{data}:2", f"{data}:4"]
    assert r["pairs"]["near_identical"] == 1 and r["pairs"]["near_identical_examples"] == [f"{data}:3"]
    assert r["duplicates"]["duplicate_rows"] == 1 and r["duplicates"]["examples"] == [f"{data}:4 = {data}:2"]
    assert r["truncated"] == [f"{data}:5"] and r["dropped"] == [f"{data}:6"]
    from posttrain.data.tokenize import encode_pair
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    sides = [[len(encode_pair(tok, x["prompt"], x[k])[1]) for k in ("chosen", "rejected")] for x in rows[:6]]
    assert r["length_bias"]["chosen_longer"] == round(sum(c > j for c, j in sides) / 6, 4) == round(4 / 6, 4)
    assert r["lengths"]["chosen"]["max"] == max(c for c, _ in sides)
    warnings = " | ".join(r["warnings"])
    for phrase in ("1 invalid rows", "identical chosen and rejected", "near-identical", "repeat an earlier row",
                   "would be dropped", "length bias"):
        assert phrase in warnings, phrase
    assert {g["method"] for g in r["guide"]} >= {"DPO", "length-normalised DPO / LD-DPO", "reward model (Bradley-Terry)"}
    assert all("preference" in g["formats"] for g in r["guide"])
    assert sorted(r["signals"]) == ["length_bias", "near_identical_pairs"]
    assert cli.main(["audit", data, f"model={tiny_model_dir}", "max_length=160"]) == 0
    text = capsys.readouterr().out
    assert "LD-DPO (" in text and "<- this data: length bias" in text and "<- this data: near-identical pairs" in text
    assert cli.main(["audit", data, f"model={tiny_model_dir}", "max_length=160", "--strict"]) == 1
    capsys.readouterr()
    _, same, _ = _audit(capsys, f"dataset={data}", f"model={tiny_model_dir}", "max_length=160")  # DATA as dataset=
    assert same["pairs"] == r["pairs"] and same["rows"] == 7
    # The same pairs read for a reward model: RM keeps every row (truncating from the start), drops none.
    _, rm, _ = _audit(capsys, data, f"model={tiny_model_dir}", "max_length=160", "command=rm")
    assert rm["command"] == "rm" and rm["dropped"] == [] and f"{data}:6" in rm["truncated"]


def test_kto_balance_and_the_weights_that_restore_it(tmp_path, tiny_model_dir, capsys):
    """30 desirable, 10 undesirable: (1 x 30) / (1 x 10) = 3 > 4/3, so undesirable_weight = 30 / (10 x 4/3) = 2.25
    brings the ratio to 4/3. The other way round (10 / 30 = 1/3 < 1): desirable_weight = 30 / 10 = 3."""
    def rows(n_good, n_bad):
        return [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i < n_good} for i in range(n_good + n_bad)]

    _, r, _ = _audit(capsys, _write(tmp_path / "a.jsonl", rows(30, 10)), f"model={tiny_model_dir}")
    assert r["labels"]["suggested"] == "undesirable_weight=2.25" and r["labels"]["weighted_ratio"] == 3.0
    assert r["signals"] == ["label_imbalance"]
    _, r, _ = _audit(capsys, _write(tmp_path / "b.jsonl", rows(10, 30)), f"model={tiny_model_dir}")
    assert r["labels"]["suggested"] == "desirable_weight=3"
    _, r, _ = _audit(capsys, _write(tmp_path / "b.jsonl", rows(10, 30)), f"model={tiny_model_dir}",
                     "desirable_weight=3")
    assert "suggested" not in r["labels"] and r["labels"]["weighted_ratio"] == 1.0 and not r["warnings"]
    _, r, _ = _audit(capsys, _write(tmp_path / "c.jsonl", rows(5, 0)), f"model={tiny_model_dir}")
    assert any("needs both desirable and undesirable" in w for w in r["warnings"])


def test_prompt_only_answers_pass_rate_and_eval_overlap(tmp_path, tiny_model_dir, capsys):
    """Prompts without answers are named; with model= the tiny random model never answers 2 + 2 correctly, so the
    task is flagged too hard (every group all wrong); eval prompts found in the training data are named."""
    train = _write(tmp_path / "train.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
                   + [{"prompt": "What is the capital of France?"}])
    evals = _write(tmp_path / "eval.jsonl", [{"prompt": "What is 3 + 3?", "answer": "6"},
                                             {"prompt": "What is 40 + 40?", "answer": "80"}])
    code, r, _ = _audit(capsys, train, f"model={tiny_model_dir}", "pass_rate_prompts=3", "num_generations=2",
                        "max_completion_length=4", f"eval_dataset={evals}")
    assert code == 0 and r["command"] == "grpo" and r["format"] == "prompt_only"
    assert r["prompts"]["with_answer"] == 6 and r["prompts"]["without_answer"] == 1
    q = r["prompts"]["pass_rate"]
    assert q["prompts"] == 3 and q["generations"] == 2 and q["groups_all_wrong"] == 1.0
    assert r["eval_overlap"] == {"eval_rows": 2, "exact": 1, "near": 0, "examples": [f"{evals}:1"]}
    warnings = " | ".join(r["warnings"])
    assert "1 prompts have no answer" in warnings and "too hard for GRPO" in warnings and "overlaps" in warnings
    assert {g["method"] for g in r["guide"]} >= {"GRPO", "DAPO settings", "2-GRPO"}
    assert r["signals"] == ["sparse_reward"]


def test_prompt_only_for_ppo(tmp_path, tiny_model_dir, capsys):
    """command=ppo audits prompt-only data with PPO's own settings: one sample per prompt (its default
    num_generations) and the warning names PPO."""
    train = _write(tmp_path / "train.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)])
    code, r, _ = _audit(capsys, train, "command=ppo", f"model={tiny_model_dir}", "pass_rate_prompts=4",
                        "max_completion_length=4")
    assert code == 0 and r["command"] == "ppo" and r["format"] == "prompt_only"
    q = r["prompts"]["pass_rate"]
    assert q["prompts"] == 4 and q["generations"] == 1 and q["groups_all_wrong"] == 1.0
    assert any("too hard for PPO" in w and "nothing to tell apart" in w for w in r["warnings"])


def test_audit_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    for argv, msg in (([str(tmp_path / "none.jsonl")], "file not found"),
                      ([data, "max_lenght=5"], "did you mean 'max_length'"),
                      ([data, "command=ppx"], "is not one of"),
                      ([data, "pair_similarity=2"], "pair_similarity must be in (0, 1]"),
                      ([data, "command=dpo", f"model={tiny_model_dir}"], "prompt-completion format; posttrain dpo needs preference"),
                      ([], "usage: posttrain audit")):
        assert cli.main(["audit", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)


@needs_shared_data
def test_audit_of_the_shared_data(tiny_model_dir, capsys):
    """Every shared file reads as training reads it: the HH pairs, the KTO sample, GSM8K (prompt-only with answers
    and a solution column), with nothing invalid."""
    expected = {"hh_helpful_test.jsonl": ("preference", "dpo", 300), "hh_helpful_kto_sample.jsonl": ("unpaired", "kto", 200),
                "gsm8k_test.jsonl": ("prompt_only", "grpo", 500)}
    for name, (fmt, command, n) in expected.items():
        code, r, _ = _audit(capsys, str(SHARED_DATA / name), f"model={tiny_model_dir}", "pass_rate_prompts=0")
        assert code == 0 and (r["format"], r["command"], r["rows"]) == (fmt, command, n) and not r["invalid"], name
    assert r["prompts"]["has_solution_column"] and r["prompts"]["without_answer"] == 0
