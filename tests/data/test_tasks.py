import random
import re

import pytest

from posttrain.data.tasks import (
    ARITHMETIC_INSTRUCTION,
    _problem_key,
    _wrong_answers,
    arithmetic_preference_rows,
    arithmetic_rows,
    arithmetic_sft_rows,
    builtin_task,
    parse_task_name,
)

_PROMPT = re.compile(r"^What is (\d+) ([-+*]) (\d+)\? " + re.escape(ARITHMETIC_INSTRUCTION) + "$")


def _parse(row):
    a, op, b = _PROMPT.match(row["prompt"]).groups()
    return int(a), op, int(b)


def test_deterministic_and_independent_of_global_random_state():
    random.seed(1)
    first = arithmetic_rows(50, seed=3, levels=(1, 2, 3, 4, 5))
    random.seed(2)
    random.random()
    assert arithmetic_rows(50, seed=3, levels=(1, 2, 3, 4, 5)) == first
    assert arithmetic_rows(50, seed=4, levels=(1, 2, 3, 4, 5)) != first
    # a longer request extends, not reshuffles, the shorter one
    assert arithmetic_rows(60, seed=3, levels=(1, 2, 3, 4, 5))[:50] == first


def test_answers_are_correct_and_solution_matches():
    # 47 + 38 = 85 style: evaluate the question with Python and compare with answer and solution
    for row in arithmetic_rows(300, levels=(1, 2, 3, 4, 5)):
        a, op, b = _parse(row)
        expected = eval(f"{a} {op} {b}")
        assert row["answer"] == str(expected)
        assert row["solution"] == f"{a} {op} {b} = {expected}"
        assert expected >= 0  # subtractions put the larger operand first


def test_levels_are_respected():
    def digits(x):
        return len(str(x))

    for level in range(1, 6):
        rows = arithmetic_rows(200, seed=level, levels=(level,))
        assert {r["level"] for r in rows} == {level}
        for r in rows:
            a, op, b = _parse(r)
            if level == 1:
                assert op in "+-" and a <= 9 and b <= 9
            elif level == 2:
                assert op in "+-" and digits(a) == digits(b) == 2
            elif level == 3:
                assert op == "*" and digits(a) in (1, 2) and 2 <= b <= 9 and (digits(a) == 2 or a >= 2)
            elif level == 4:
                assert op in "+-" and digits(a) == digits(b) == 3
            else:
                assert op == "*" and digits(a) == digits(b) == 2
    mixed = arithmetic_rows(600, levels=(1, 3))
    counts = {lv: sum(r["level"] == lv for r in mixed) for lv in (1, 3)}
    assert set(counts) == {1, 3} and min(counts.values()) > 200  # roughly uniform over levels


def test_train_and_test_are_disjoint():
    levels = (1, 2, 3, 4, 5)
    test_keys = {_problem_key(*_parse(r)) for s in range(3) for r in arithmetic_rows(500, seed=s, levels=levels,
                                                                                   split="test")}
    train_keys = {_problem_key(*_parse(r)) for s in range(3) for r in arithmetic_rows(2000, seed=s, levels=levels)}
    assert test_keys and train_keys and not test_keys & train_keys
    # 3 + 5 and 5 + 3 are the same problem, 8 - 3 is not 3 - 8
    assert _problem_key(3, "+", 5) == _problem_key(5, "+", 3) == "3+5"
    assert _problem_key(8, "-", 3) == "8-3"
    # level 1 holds 55 '+' and 55 '-' problems; the test split keeps about a fifth and train the rest
    small_test = {_problem_key(*_parse(r)) for r in arithmetic_rows(3000, levels=(1,), split="test")}
    small_train = {_problem_key(*_parse(r)) for r in arithmetic_rows(3000, levels=(1,))}
    assert len(small_test) + len(small_train) == 110
    assert 10 <= len(small_test) <= 35


def test_no_repeats_while_the_space_allows():
    rows = arithmetic_rows(300, levels=(2, 4, 5))
    assert len({_problem_key(*_parse(r)) for r in rows}) == 300


def test_sft_rows_complete_with_the_bare_answer():
    rows = arithmetic_sft_rows(20, seed=5, levels=(2,))
    ref = arithmetic_rows(20, seed=5, levels=(2,))
    assert rows == [{"prompt": r["prompt"], "completion": r["answer"]} for r in ref]


def test_wrong_answers_hand_examples():
    # 47 + 38 = 85: +-1 -> 84, 86; +-10 -> 75, 95; carry dropped: 7+8 -> 5, 4+3 -> 7 -> 75; swap -> 58
    assert _wrong_answers(47, "+", 38) == [58, 75, 84, 86, 95]
    # 52 - 38 = 14: 13, 15, 4, 24; borrow error |2-8|=6, 5-3=2 -> 26; swap -> 41
    assert _wrong_answers(52, "-", 38) == [4, 13, 15, 24, 26, 41]
    # 3 - 3 = 0: negatives are dropped, so 1 and 10 remain (carry error gives 0 = correct, dropped)
    assert _wrong_answers(3, "-", 3) == [1, 10]
    # 12 * 4 = 48: 47, 49, 38, 58, partial products 60 and 36, swap 84
    assert _wrong_answers(12, "*", 4) == [36, 38, 47, 49, 58, 60, 84]


def test_preference_rows_reject_a_wrong_answer():
    rows = arithmetic_preference_rows(400, seed=2, levels=(1, 2, 3, 4, 5))
    base = arithmetic_rows(400, seed=2, levels=(1, 2, 3, 4, 5))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in base]
    for r, b in zip(rows, base):
        assert r["chosen"] == b["answer"]
        assert r["rejected"] != r["chosen"] and int(r["rejected"]) >= 0
        assert int(r["rejected"]) in _wrong_answers(*_parse(b))
    assert arithmetic_preference_rows(400, seed=2, levels=(1, 2, 3, 4, 5)) == rows


def test_name_parser():
    assert parse_task_name("arithmetic") == ("arithmetic", {})
    assert parse_task_name("arithmetic:level=1-3,n=2000,split=test") == (
        "arithmetic", {"levels": (1, 2, 3), "n": 2000, "split": "test"})
    assert parse_task_name("arithmetic:levels=1+3+5, seed=7") == ("arithmetic", {"levels": (1, 3, 5), "seed": 7})
    assert parse_task_name("arithmetic:level=4") == ("arithmetic", {"levels": (4,)})
    with pytest.raises(ValueError, match="unknown option 'foo'"):
        parse_task_name("arithmetic:foo=1")
    with pytest.raises(ValueError, match="not key=value"):
        parse_task_name("arithmetic:n")


def test_builtin_task_resolver():
    assert builtin_task("data/train.jsonl", "sft") is None
    assert builtin_task("gsm8k", "prompt") is None
    rows = builtin_task("arithmetic:level=2,n=7,split=test,seed=3", "prompt")
    assert rows == arithmetic_rows(7, seed=3, levels=(2,), split="test")
    assert len(builtin_task("arithmetic", "prompt")) == 2000
    assert len(builtin_task("arithmetic:split=test", "prompt")) == 500
    # opts are defaults; the name's own options win
    assert builtin_task("arithmetic:n=3", "sft", n=10, seed=1) == arithmetic_sft_rows(3, seed=1)
    assert builtin_task("arithmetic", "preference", n=4, level=(5,)) == arithmetic_preference_rows(4, levels=(5,))
    with pytest.raises(ValueError, match="kind"):
        builtin_task("arithmetic", "kto")
    with pytest.raises(ValueError, match="levels"):
        builtin_task("arithmetic:level=0-2", "prompt")
    with pytest.raises(ValueError, match="split"):
        builtin_task("arithmetic:split=valid", "prompt")
