"""The pass-rate curriculum: estimates, band, draw probabilities (worked out by hand in each docstring), seeded
draws, state round trip; and inside GRPO on the tiny model: prompts that are always right stop being drawn,
ranks agree, a resumed run draws what the uninterrupted one drew."""

import json
import math

import pytest
import torch

from posttrain import cli
from posttrain.algorithms import online
from posttrain.algorithms.grpo import GRPO, Config, PromptExample
from posttrain.rollout.curriculum import (
    PassRateCurriculum,
    difficulty_column,
    group_pass_rates,
    informative,
)
from posttrain.testing import tiny_model


def test_informative_is_the_chance_of_a_mixed_group():
    """G = 2: 1 - p^2 - (1-p)^2 = 2p(1-p): 0.5 at p = 0.5, 0.18 at p = 0.1; G = 8 at p = 0.1: 1 - 1e-8 - 0.9^8."""
    p = torch.tensor([0.0, 0.1, 0.5, 1.0])
    torch.testing.assert_close(informative(p, 2), torch.tensor([0.0, 0.18, 0.5, 0.0]))
    assert float(informative(torch.tensor(0.1), 8)) == pytest.approx(1 - 1e-8 - 0.9**8)


def test_estimates_prefer_the_prompt_then_its_difficulty_then_one_half():
    """Prompts 0, 1 are 'easy', 2, 3 'hard', 4 'new'. Prompt 0's group passed 0.75 and prompt 2's 0.25: prompt 1
    (unseen, easy) takes easy's mean 0.75, prompt 3 hard's 0.25, prompt 4 (nothing known) 0.5."""
    c = PassRateCurriculum(["easy", "easy", "hard", "hard", "new"], group_size=4)
    torch.testing.assert_close(c.estimates(), torch.full((5,), 0.5))
    c.update([0, 2], [0.75, 0.25])
    torch.testing.assert_close(c.estimates(), torch.tensor([0.75, 0.75, 0.25, 0.25, 0.5]))
    assert c.level_rates() == {"easy": 0.75, "hard": 0.25, "new": pytest.approx(math.nan, nan_ok=True)}


def test_window_keeps_the_recent_groups_and_rates_are_clamped():
    """window 2: rates 0, 1, 1 of difficulty 'a' leave (1 + 1) / 2 = 1; a reward of 3 counts as 1, -1 as 0, NaN
    (nothing scored) is skipped."""
    c = PassRateCurriculum(["a"] * 4, group_size=2, window=2)
    c.update([0, 1, 2], [0.0, 1.0, 3.0])
    assert c.level_rates() == {"a": 1.0}
    c.update([3, 0], [math.nan, -1.0])
    assert c.level_rates() == {"a": 0.5} and float(c.last[0]) == 0.0 and math.isnan(float(c.last[3]))


def test_band_and_probabilities_by_hand():
    """G = 2, explore 0.2, four prompts. After updates: p = [0 (all wrong), 1 (all right), 0.5, 0.5 (unseen)].
    In-band weights 2p(1-p) = [0, 0, 0.5, 0.5]; probabilities 0.8 * w / 1 + 0.2 / 4 = [0.05, 0.05, 0.45, 0.45].
    A band [0.6, 1] leaves nothing useful: uniform."""
    c = PassRateCurriculum([None] * 4, group_size=2, explore=0.2)
    c.update([0, 1, 2], [0.0, 1.0, 0.5])
    torch.testing.assert_close(c.weights(), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(c.probabilities(), torch.tensor([0.05, 0.05, 0.45, 0.45]))
    # prompt 3 is unseen, and the only bucket's recent mean is (0 + 1 + 0.5) / 3 = 0.5
    assert c.stats() == {"useful_frac": 0.5}
    narrow = PassRateCurriculum([None] * 4, group_size=2, band=(0.6, 1.0))
    narrow.update([0, 1, 2, 3], [0.0, 1.0, 0.5, 0.5])
    torch.testing.assert_close(narrow.probabilities(), torch.full((4,), 0.25))


def test_draws_are_distinct_seeded_and_follow_the_probabilities():
    """Draws of one prompt 20000 times match [0.05, 0.05, 0.45, 0.45] (the test above) to 0.015 (> 4 standard
    errors: sqrt(0.45 * 0.55 / 20000) = 0.0035); k = 3 gives distinct indices; same seed, same draw."""
    c = PassRateCurriculum([None] * 4, group_size=2, explore=0.2)
    c.update([0, 1, 2], [0.0, 1.0, 0.5])
    counts = torch.zeros(4)
    for s in range(20000):
        counts[c.draw(1, seed=s)[0]] += 1
    torch.testing.assert_close(counts / 20000, torch.tensor([0.05, 0.05, 0.45, 0.45]), atol=0.015, rtol=0)
    for s in range(50):
        d = c.draw(3, seed=s)
        assert len(set(d)) == 3 and d == c.draw(3, seed=s)
    assert sorted(c.draw(4, seed=1, exclude=[2])) == [0, 1, 3]  # only three remain


def test_without_exploration_useless_prompts_fill_only_what_useful_ones_cannot():
    """explore 0: prompts 0 and 1 (all wrong, all right) have probability 0. A draw of 2 takes prompts 2 and 3;
    a draw of 3 needs one of them."""
    c = PassRateCurriculum([None] * 4, group_size=2, explore=0.0)
    c.update([0, 1, 2], [0.0, 1.0, 0.5])
    for s in range(20):
        assert sorted(c.draw(2, seed=s)) == [2, 3]
        d = c.draw(3, seed=s)
        assert {2, 3} <= set(d) and len(set(d)) == 3


def test_state_round_trip_and_mismatch():
    c = PassRateCurriculum(["a", "b", "b"], group_size=2, window=3)
    c.update([0, 1], [0.5, 0.25])
    d = PassRateCurriculum(["a", "b", "b"], group_size=2, window=3)
    d.load_state_dict(c.state_dict())
    torch.testing.assert_close(d.estimates(), c.estimates())
    assert d.draw(2, seed=3) == c.draw(2, seed=3)
    with pytest.raises(ValueError, match="other prompts"):
        PassRateCurriculum(["a", "c", "b"], group_size=2).load_state_dict(c.state_dict())


def test_invalid_settings():
    with pytest.raises(ValueError, match="curriculum_band"):
        PassRateCurriculum([None], group_size=2, band=(0.5, 0.5))
    with pytest.raises(ValueError, match="curriculum_explore"):
        PassRateCurriculum([None], group_size=2, explore=1.5)


def test_group_pass_rates_ignore_unscored_rows():
    """G = 3, column 0: group 0 = (1, 0, NaN) -> 1/2; group 1 all NaN -> NaN; group 2 (1, 1, 1) -> 1."""
    nan = math.nan
    r = torch.tensor([[1.0, 9], [0, 9], [nan, 9], [nan, 9], [nan, 9], [nan, 9], [1, 9], [1, 9], [1, 9]])
    rates = group_pass_rates(r, 3, 0)
    assert rates[0] == 0.5 and math.isnan(rates[1]) and rates[2] == 1.0


def test_difficulty_column_auto_explicit_none():
    rows = [{"answer": "1", "type": "add", "level": 2}, {"answer": "2", "type": "mul", "level": 3}]
    assert difficulty_column(rows, "auto") == "level"  # level comes before type
    assert difficulty_column([{"type": "add"}, {"type": "mul"}], "auto") == "type"
    assert difficulty_column([{"type": "add"}, {"answer": "3"}], "auto") is None  # not in every row
    assert difficulty_column(rows, "type") == "type" and difficulty_column(rows, "none") is None
    with pytest.raises(ValueError, match="row 2 has no column 'kind'"):
        difficulty_column([{"kind": 1}, {}], "kind")


# ------------------------------------------------------------------------------------------- inside GRPO

G = 4


def make_examples(tok, n=8):
    """Prompts 0-3 are 'solved' (their reward is always 1), 4-7 'open' (reward varies with the completion)."""
    return [PromptExample(i, f"question {i}", tok(f"question {i}")["input_ids"],
                          {"answer": str(i), "level": "solved" if i < 4 else "open"}) for i in range(n)]


def solved_or_chars(prompts, completions, answer, **kwargs):
    return [1.0 if int(a) < 4 else float(len(c) % 2) for a, c in zip(answer, completions)]


def make_cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "run"), "num_generations": G, "max_completion_length": 4,
            "temperature": 1.0, "batch_size": 2, "micro_batch_size": 2 * G, "learning_rate": 0.0,
            "progress": False, "seed": 0, "curriculum": "pass_rate", "curriculum_explore": 0.0}
    cfg = Config(**{**base, **kw})
    cfg.validate()
    return cfg


def test_grpo_stops_drawing_solved_prompts(tmp_path, tokenizer):
    """With explore 0: once a 'solved' prompt's group has passed (4 of 4), its level's recent rate is 1, outside
    the band, so after the first step that sampled the solved level no solved prompt is drawn again while open
    ones remain useful. The logged pass rate of 'solved' is 1."""
    exs = make_examples(tokenizer)
    algo = GRPO(make_cfg(tmp_path), tokenizer, [("r", solved_or_chars)], exs)
    model = tiny_model(tokenizer)
    drawn = []
    for _ in range(6):
        batch = algo.prepare(model, exs[:2])
        drawn.append(sorted({int(mb_prompt) for mb_prompt in _prompt_indices(algo, batch, exs)}))
    first_solved = next(i for i, d in enumerate(drawn) if any(j < 4 for j in d))
    assert all(j >= 4 for d in drawn[first_solved + 1 :] for j in d), drawn
    assert batch.metrics["curriculum/pass_rate/solved"] == 1.0
    assert 0.0 < batch.metrics["curriculum/useful_frac"] <= 0.5


def _prompt_indices(algo, batch, exs):
    by_ids = {tuple(e.prompt_ids): e.index for e in exs}
    return [by_ids[tuple(p)] for mb in batch for p in mb.prompts]


def test_choose_splits_one_global_draw_over_ranks(tmp_path, tokenizer, monkeypatch):
    """Two ranks with the same curriculum state draw the same global batch of 4 and take halves: disjoint."""
    exs = make_examples(tokenizer)
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(online, "rank_world", lambda rank=rank: (rank, 2))
        algo = GRPO(make_cfg(tmp_path, batch_size=4, curriculum_explore=0.5), tokenizer, [("r", solved_or_chars)], exs)
        halves.append([e.index for e in algo.choose(exs[:2])])
    assert len(halves[0]) == len(halves[1]) == 2 and not set(halves[0]) & set(halves[1])


def test_curriculum_config_errors_and_resume(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i), "level": i % 2}) + "\n" for i in range(6)))
    common = ["grpo", f"model={tiny_model_dir}", f"dataset={data}", "num_generations=2", "max_completion_length=3",
              "batch_size=2", "micro_batch_size=4", "progress=false", "curriculum=pass_rate", "log_completions=true"]
    for bad, msg in [("curriculum_band=[0.5,0.2]", "curriculum_band must be"),
                     ("curriculum_column=kind", "row 1 has no column 'kind'")]:
        assert cli.main([*common, f"output_dir={tmp_path / 'x'}", bad]) == 2
        assert msg in capsys.readouterr().err
    a, d = tmp_path / "a", tmp_path / "d"
    assert cli.main([*common, f"output_dir={a}", "max_steps=3", "save_steps=1"]) == 0
    (d / "checkpoint-2").mkdir(parents=True)
    for f in (a / "checkpoint-2").iterdir():
        (d / "checkpoint-2" / f.name).write_bytes(f.read_bytes())
    assert cli.main([*common, f"output_dir={d}", "max_steps=3", "resume_from_checkpoint=latest"]) == 0
    # The resumed run drew step 3's prompts from the restored curriculum: the same prompts and completions.
    assert (d / "completions.jsonl").read_text().splitlines() == (a / "completions.jsonl").read_text().splitlines()[8:]
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert {"curriculum/useful_frac", "curriculum/pass_rate/0", "curriculum/pass_rate/1"} <= set(rows[-1])
