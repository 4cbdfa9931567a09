import json
import logging
import math
import time

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data

from posttrain.rollout.rewards import (
    ARITHMETIC_FORMAT_PATTERN,
    RewardModelReward,
    RewardResult,
    accuracy,
    compute_rewards,
    extract_answer,
    format_reward,
    is_correct,
    last_boxed,
    last_number,
    length_reward,
    load_reward_funcs,
)


def _rows(name):
    return [json.loads(line) for line in (SHARED_DATA / name).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ accuracy


def test_number_and_box_extraction():
    assert last_number("47 + 38 = 85.") == "85"
    assert last_number("It costs $1,234,567 in total") == "1234567"
    assert last_number("5-3") == "3"  # a hyphen after a digit is a minus sign, not a sign
    assert last_number("x = -7") == "-7"
    assert last_number("pi is about 3.14, e .5") == ".5"
    assert last_number("no digits") is None
    assert last_boxed(r"so \boxed{\frac{\sqrt{3}}{2}} done") == r"\frac{\sqrt{3}}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{\{2, 3\}}") == r"\{2, 3\}"  # the last box; escaped braces
    assert last_boxed(r"\fbox{4}") == "4"
    assert last_boxed(r"\boxed 7 apples") == "7"
    assert last_boxed(r"\boxed {8} apples") == "8"
    assert last_boxed(r"\boxed{unclosed") is None
    assert extract_answer(r"3 and 6, but \boxed{7}") == "7"  # a box wins over a later number
    assert extract_answer(r"\boxed{12} so 13") == "12"


def test_accuracy_hand_cases():
    golds = ["85", "-7", "1234", "0.5", "2", r"\frac{14}{3}", r"\frac{1}{2}", r"\frac{\sqrt{3}}{2}", "18", "19", "4", None]
    replies = [
        "The answer is 85.",  # last number
        "x = -7",  # negative
        "It costs $1,234 in total",  # thousands separator
        "about 0.50",  # decimals compare as numbers: 0.50 == 0.5
        "5-3",  # "5-3" ends in the number 3, not -3 and not 2
        r"so \boxed{\frac{14}{3}}",  # identical LaTeX
        r"\boxed{0.5}",  # LaTeX equivalence through math_verify
        r"$\boxed{\dfrac{\sqrt{3}}{2}}$",  # nested braces, \dfrac
        "#### 18",
        "no number here",
        [{"role": "assistant", "content": "It is 4"}],  # conversational completion
        "42",  # no gold: None
    ]
    assert accuracy(None, replies, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, None]
    assert accuracy(None, ["1", "2"]) == [None, None]  # no answer column at all
    assert not is_correct("85", "84") and not is_correct(r"\frac{14}{3}", r"\boxed{\frac{3}{14}}")


@needs_shared_data
def test_math500_reference_solutions_grade_as_correct():
    rows = _rows("math500_test.jsonl")
    scores = accuracy([r["prompt"] for r in rows], [r["solution"] for r in rows], answer=[r["answer"] for r in rows])
    misses = [(r["answer"], extract_answer(r["solution"])) for r, s in zip(rows, scores) if s != 1.0]
    print(f"MATH-500: {len(rows) - len(misses)}/{len(rows)} reference solutions graded correct; misses: {misses}")
    assert len(rows) == 400 and len(misses) <= 0.02 * len(rows)
    # and no false positives: each solution against the NEXT row's answer is correct only where the two
    # answers are the same string (in rows 300..399 that happens once: rows 359 and 360 both answer "5")
    sols, shifted = [r["solution"] for r in rows[300:399]], [r["answer"] for r in rows[301:400]]
    same = [a == b for a, b in zip([r["answer"] for r in rows[300:399]], shifted)]
    assert accuracy(None, sols, answer=shifted) == [float(s) for s in same] and sum(same) == 1


@needs_shared_data
def test_gsm8k_solutions_end_in_their_answer():
    rows = _rows("gsm8k_test.jsonl")
    # "#### 18" closes every solution, so the last number is the answer (commas already removed in answer)
    assert all(last_number(r["solution"]) == r["answer"] for r in rows)
    assert accuracy(None, [r["solution"] for r in rows], answer=[r["answer"] for r in rows]) == [1.0] * len(rows)


# ------------------------------------------------------------------------------------------ format, length


def test_format_reward():
    replies = [r"so \boxed{7}", "7", " 42\n", "-3", "The answer is 42", r"\boxed{}"]
    assert format_reward(None, replies) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward(None, replies, format_pattern=ARITHMETIC_FORMAT_PATTERN) == [0, 1, 1, 1, 0, 0]
    # two patterns: half credit for either one
    two = [r"<think>.*</think>", r"\\boxed\{.+\}"]
    assert format_reward(None, ["<think>hm</think> \\boxed{1}", "<think>a</think>", r"\boxed{2}", "no"],
                         format_pattern=two) == [1.0, 0.5, 0.5, 0.0]


def test_length_reward_dapo_hand_numbers():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then (6 - L) / 4, -1 past 10
    got = length_reward(None, [""] * 6, completion_lengths=[3, 6, 7, 8, 10, 11], max_completion_length=10,
                        overlong_buffer=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # default L_cache = L_max // 5 = 4 for L_max 20: 18 tokens -> (16 - 18) / 4 = -0.5
    assert length_reward(None, ["", ""], completion_lengths=torch.tensor([16, 18]), max_completion_length=20) == [0.0, -0.5]
    assert length_reward(None, [""], completion_lengths=[11], max_completion_length=10, overlong_buffer=0) == [-1.0]
    with pytest.raises(ValueError, match="max_completion_length"):
        length_reward(None, [""], completion_lengths=[1])


# ------------------------------------------------------------------------------------------------ loading


def test_load_builtins_with_options():
    funcs = dict(load_reward_funcs(["accuracy", "format", "length"], format_pattern=ARITHMETIC_FORMAT_PATTERN,
                                   max_completion_length=10, overlong_buffer=4, reward_model=None))
    assert list(funcs) == ["accuracy", "format", "length"]
    assert funcs["format"](None, ["12", r"\boxed{12}"]) == [1.0, 0.0]  # the arithmetic pattern is bound
    assert funcs["length"](None, ["", ""], completion_lengths=[7, 12]) == [-0.25, -1.0]
    assert funcs["accuracy"](None, ["12"], answer=["12"]) == [1.0]
    with pytest.raises(ValueError, match="unknown reward function 'bogus'"):
        load_reward_funcs(["bogus"])
    with pytest.raises(ValueError, match="unknown reward options"):
        load_reward_funcs(["format"], format_patern="x")
    with pytest.raises(ValueError, match="needs the reward_model option"):
        load_reward_funcs(["reward_model"])


def test_load_user_function_from_cwd_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_t1.py").write_text(
        "def score(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\nNOT_FN = 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.py").write_text("def neg(prompts, completions, **kw):\n    return [-1.0] * len(completions)\n")
    (tmp_path / "broken_t1.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.chdir(tmp_path)
    (name, fn), (name2, fn2) = load_reward_funcs(["my_rewards_t1:score", "sub/other.py:neg"])
    assert name == "my_rewards_t1:score" and fn(None, ["ab", "abcd"]) == [2.0, 4.0]
    assert name2 == "sub/other.py:neg" and fn2(None, ["x"]) == [-1.0]
    with pytest.raises(ValueError, match=r"'no_such_module_t1:f'.*cannot import"):
        load_reward_funcs(["no_such_module_t1:f"])
    with pytest.raises(ValueError, match=r"'broken_t1:f'.*does_not_exist_anywhere"):
        load_reward_funcs(["broken_t1:f"])
    with pytest.raises(ValueError, match=r"'my_rewards_t1:NOT_FN'.*no callable 'NOT_FN'"):
        load_reward_funcs(["my_rewards_t1:NOT_FN"])
    with pytest.raises(ValueError, match=r"'missing.py:f'.*cannot import"):
        load_reward_funcs(["missing.py:f"])


# ------------------------------------------------------------------------------------------- reward model


@pytest.fixture
def reward_model_dir(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # so rewards differ visibly between texts
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm", model.eval()


def test_reward_model_scores_match_a_single_forward(reward_model_dir, tokenizer):
    path, ref_model = reward_model_dir
    rm = RewardModelReward(path, batch_size=2)
    prompts = ["What is 12 + 7?", "Human: How do I bake bread?", "the a"]
    completions = [" 19", " Mix flour, water, salt and yeast, then bake.", " is"]
    scores = rm(prompts, completions)

    def single(text):  # one unpadded sequence: the score at its last token
        with torch.no_grad():
            return ref_model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits[0, 0].item()

    # text data is scored as `posttrain rm` trains it: prompt + completion + EOS
    expected = [single(p + c + tokenizer.eos_token) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)  # right padding in the batches of 2 changes nothing
    assert len({round(s, 4) for s in scores}) == 3
    # conversations go through the chat template
    conv = [[{"role": "user", "content": "What is 12 + 7?"}]]
    text = tokenizer.apply_chat_template(conv[0] + [{"role": "assistant", "content": "19"}], tokenize=False)
    assert rm(conv, ["19"]) == pytest.approx([single(text)], abs=1e-5)
    (name, fn), = load_reward_funcs(["reward_model"], reward_model=str(path))
    assert name == "reward_model" and fn(prompts, completions) == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------ running


def test_compute_rewards_values_weights_and_columns():
    def exact(prompts, completions, answer):  # no **kwargs: receives only the column it names
        return [float(c == a) if a is not None else None for c, a in zip(completions, answer)]

    def long(prompts, completions, completion_lengths, truncated, **kw):
        return [-1.0 if t else 0.1 * n for n, t in zip(completion_lengths, truncated)]

    funcs = [("exact", exact), ("long", long)]
    columns = {"answer": ["7", "8", None], "completion_lengths": [2, 5, 9], "truncated": [False, False, True]}
    res = compute_rewards(funcs, ["p"] * 3, ["7", "9", "x"], columns, weights=[1.0, 0.5])
    assert isinstance(res, RewardResult)
    expected = torch.tensor([[1.0, 0.2], [0.0, 0.5], [math.nan, -1.0]])
    assert torch.allclose(res.rewards, expected, equal_nan=True)
    # total = nansum(w * r): 1 + 0.1, 0 + 0.25, (NaN skipped) - 0.5
    assert torch.allclose(res.total, torch.tensor([1.1, 0.25, -0.5]))
    assert res.failures == {"exact": 0, "long": 0} and res.timeouts == {"exact": 0, "long": 0}


def test_compute_rewards_survives_raising_and_hanging_functions(caplog):
    def ok(prompts, completions, **kw):
        return [1.0] * len(completions)

    def boom(prompts, completions, **kw):
        raise RuntimeError("bad gold\nsecond line of the message")

    def hang(prompts, completions, **kw):
        time.sleep(3)
        return [0.0] * len(completions)

    def short(prompts, completions, **kw):
        return [1.0]

    funcs = [("ok", ok), ("boom", boom), ("hang", hang), ("short", short)]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="posttrain.rollout.rewards"):
        res = compute_rewards(funcs, ["p", "q"], ["a", "b"], {}, timeout=0.3)
    elapsed = time.monotonic() - start
    assert elapsed < 1.5  # about the one timeout, not the 3 s sleep
    assert res.rewards[:, 0].tolist() == [1.0, 1.0] and torch.isnan(res.rewards[:, 1:]).all()
    assert res.failures == {"ok": 0, "boom": 1, "hang": 0, "short": 1}
    assert res.timeouts == {"ok": 0, "boom": 0, "hang": 1, "short": 0}
    assert res.total.tolist() == [1.0, 1.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and not any("\n" in m for m in messages)  # one line each, no traceback
    assert "RuntimeError: bad gold" in messages[0] and "second line" not in messages[0]
    assert "'hang' timed out" in messages[1] and "returned 1 values for 2" in messages[2]


def test_math_verify_runs_inside_the_worker_thread():
    # compute_rewards calls accuracy in a thread, where math_verify's signal-based timeout would raise
    funcs = load_reward_funcs(["accuracy"])
    res = compute_rewards(funcs, ["p", "q"], [r"\boxed{0.5}", r"\boxed{\frac{2}{3}}"],
                          {"answer": [r"\frac{1}{2}", r"\frac{3}{2}"]}, timeout=30)
    assert res.rewards[:, 0].tolist() == [1.0, 0.0] and res.failures == {"accuracy": 0}
