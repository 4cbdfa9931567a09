"""posttrain.rollout.groups: the typed steps from prompts to scored groups (sample, score, filter_groups) and
the ScoredRollout they pass along, checked on hand-made rollouts and the tiny model."""

import math

import torch

from posttrain.rollout.generate import HFEngine, Rollout
from posttrain.rollout.groups import PromptExample, ScoredRollout, filter_groups, prompt_seed, sample, score
from posttrain.testing import tiny_model

NAN = math.nan


def prompts(n):
    return [PromptExample(i, f"p{i}", [10 + i, 20 + i], {"answer": str(i)}) for i in range(n)]


def scored(n_prompts, G, width, rewards, failures=0):
    """A hand-made rollout: ids 100, 101, ... row by row, every token generated, logps -0.5."""
    rows = n_prompts * G
    ids = torch.arange(rows * width).view(rows, width) + 100
    return ScoredRollout(prompts(n_prompts), ids,
                         torch.ones(rows, width, dtype=torch.long), torch.full((rows, width), -0.5),
                         torch.zeros(rows, dtype=torch.bool), [f"t{i}" for i in range(rows)],
                         torch.tensor(rewards, dtype=torch.float32).view(rows, -1), failures, 0)


def test_select_and_cat_keep_groups_whole_and_pad_to_one_width():
    a = scored(2, 2, 3, [1, 2, 3, 4], failures=1)  # groups: rows 0-1, rows 2-3
    b = scored(1, 2, 5, [7, 7], failures=2)
    picked = a.select([1])
    assert picked.prompts == [a.prompts[1]] and picked.texts == ["t2", "t3"]
    assert torch.equal(picked.completion_ids, a.completion_ids[2:4]) and picked.rewards.flatten().tolist() == [3, 4]
    both = ScoredRollout.cat([picked, b], pad_id=0)
    assert len(both) == 2 and both.group_size == 2 and both.completion_ids.shape == (4, 5)
    assert both.completion_ids[:2, 3:].eq(0).all() and both.completion_mask[:2, 3:].eq(0).all()  # padding
    assert both.logps[:2, 3:].eq(0).all() and both.logps[:2, :3].eq(-0.5).all()
    assert torch.equal(both.completion_ids[2:], b.completion_ids)
    assert both.failures == 3  # every reward call that scored the kept rows' rounds


def test_filter_groups_keeps_groups_whose_weighted_reward_varies():
    # 4 groups of 2, rewards (r1, r2): equal, (1,0) vs (0,1) (equal unweighted sum), varying, one unscorable row
    rewards = [[1, 1], [1, 1], [1, 0], [0, 1], [0, 0], [1, 0], [NAN, NAN], [1, 1]]
    s = scored(4, 2, 2, rewards)
    assert [p.index for p in filter_groups(s).prompts] == [2]
    assert [p.index for p in filter_groups(s, weights=[1.0, 0.5]).prompts] == [1, 2]
    assert [p.index for p in filter_groups(s, per_reward=True).prompts] == [1, 2]  # GDPO: any reward varies


def test_sample_then_score_passes_the_columns_reward_functions_read(tokenizer):
    model = tiny_model(tokenizer)
    ps = [PromptExample(i, p, tokenizer(p)["input_ids"], {"answer": a}) for i, (p, a) in
          enumerate([("What is 2 + 2?", "4"), ("2 + 2 =", "5")])]
    seen = {}

    def record(prompts, completions, answer, completion_lengths, truncated, **kwargs):
        seen.update(prompts=prompts, answer=answer, lengths=completion_lengths, truncated=truncated)
        return [float(len(c)) for c in completions]

    seeds = [prompt_seed(3, 0, p.index) for p in ps]
    rollout = sample(HFEngine(model, tokenizer), ps, 3, seeds=seeds, max_new_tokens=4, temperature=1.0)
    assert isinstance(rollout, Rollout) and rollout.completion_ids.shape[0] == 6
    out = score([("len", record)], ps, rollout)
    assert seen["prompts"] == [ps[0].prompt] * 3 + [ps[1].prompt] * 3 and seen["answer"] == ["4"] * 3 + ["5"] * 3
    assert seen["lengths"] == rollout.completion_lengths.tolist() and seen["truncated"] == rollout.truncated.tolist()
    assert out.rewards[:, 0].tolist() == [float(len(t)) for t in rollout.texts] and out.group_size == 3
    assert (out.failures, out.timeouts) == (0, 0)
    # Seeds make a prompt's samples its own: the same prompt alone draws the same completions.
    alone = sample(HFEngine(model, tokenizer), ps[1:], 3, seeds=seeds[1:], max_new_tokens=4, temperature=1.0)
    assert alone.texts == rollout.texts[3:]
