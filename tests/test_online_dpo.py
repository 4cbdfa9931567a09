"""Online DPO on the tiny model: pairs chosen by the rewards (ties, unscorable rows, the EOS penalty), the loss
equal to `preference_loss` on naive log-probs of the sampled pairs against a reference copy, one step moving
the policy's margin the right way, dynamic sampling, a step with no pair, the CLI."""

import json

import pytest
import torch
from test_grpo import TEMP, G, chars, eos_model, examples, grads

from posttrain import cli
from posttrain.algorithms import online_dpo
from posttrain.algorithms.online_dpo import Config, OnlineDPO, choose_pairs
from posttrain.engine import Engine
from posttrain.logprobs import naive_token_logps
from posttrain.losses.preference import preference_loss
from posttrain.reference import Copy
from posttrain.rollout.groups import ScoredRollout
from posttrain.testing import tiny_model


def make_cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "run"), "num_generations": G, "max_completion_length": 6,
            "temperature": TEMP, "batch_size": 2, "micro_batch_size": 2, "learning_rate": 1e-2, "beta": 0.1,
            "max_grad_norm": 0.0, "lr_scheduler": "constant", "progress": False, "seed": 0, "dynamic_sampling": False}
    cfg = Config(**{**base, **kw})
    cfg.validate()
    return cfg


def scored_rollout(rewards, truncated=None, groups=2):
    n = len(rewards)
    return ScoredRollout([None] * groups, torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                         torch.zeros(n, 1), torch.tensor(truncated or [False] * n), ["x"] * n,
                         torch.tensor(rewards, dtype=torch.float32))


def test_choose_pairs_best_against_worst():
    nan = float("nan")
    # group 0: totals (1 + 0.5 x 1, 0, 2 + 0, 1) -> best row 2 (2.0), worst row 1 (0.0)
    # group 1: every scorable row totals 1 (row 5 unscorable): no pair
    rewards = [[1, 1], [0, 0], [2, 0], [1, 0], [1, 0], [nan, nan], [0, 2], [1, 0]]
    pairs, totals = choose_pairs(scored_rollout(rewards, groups=2), weights=[1.0, 0.5])
    assert pairs == [(0, 2, 1)]
    assert totals[:4].tolist() == [1.5, 0.0, 2.0, 1.0] and torch.isnan(totals[5])
    # The EOS penalty: the truncated best of group 0 drops below row 0.
    pairs, _ = choose_pairs(scored_rollout(rewards, truncated=[False, False, True] + [False] * 5, groups=2),
                            weights=[1.0, 0.5], missing_eos_penalty=1.0)
    assert pairs == [(0, 0, 1)]
    # Ties: the earlier row is best and the earlier row worst.
    assert choose_pairs(scored_rollout([[1], [0], [1], [0]], groups=1))[0] == [(0, 0, 1)]


def naive_sums(model, mb):
    logps = naive_token_logps(model, mb.input_ids, mb.attention_mask, mb.loss_mask)
    return logps.sum(-1)


def test_loss_is_dpo_on_the_sampled_best_and_worst(tmp_path, tokenizer):
    """The pair of each prompt is its highest- and lowest-reward completion (reward = character count here);
    the loss and its gradient equal `preference_loss` on plain full-softmax log-probs of those sequences, with a
    reference copy that differs from the policy."""
    model, ref = eos_model(tokenizer), tiny_model(tokenizer, seed=1)
    seen = []

    def recording(prompts, completions, **kwargs):
        seen.append(list(completions))
        return chars(prompts, completions)

    cfg = make_cfg(tmp_path)
    algo = OnlineDPO(cfg, tokenizer, [("chars", recording)], examples(tokenizer), Copy(ref))
    [mb] = algo.prepare(model, examples(tokenizer)[:2])
    texts = seen[0]
    B = len(mb)
    assert B == 2
    for i in range(B):
        group = texts[i * G : (i + 1) * G]
        chosen = tokenizer.decode(mb.completion_ids[i][mb.completion_mask[i].bool()], skip_special_tokens=True)
        rejected = tokenizer.decode(mb.completion_ids[B + i][mb.completion_mask[B + i].bool()], skip_special_tokens=True)
        assert len(chosen) == max(len(t) for t in group) > len(rejected) == min(len(t) for t in group)
    loss, m = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)
    logps = naive_sums(model, mb)
    with torch.no_grad():
        ref_logps = naive_sums(ref, mb)
    hand = preference_loss("sigmoid", logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=0.1).losses.sum() / B
    hand.backward()
    g_hand = grads(model)
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-5)
    for n in g_hand:
        assert float((g_trainer[n] - g_hand[n]).abs().max()) <= 1e-4 * float(g_hand[n].abs().max()) + 1e-9, n
    margin = (logps[:B] - ref_logps[:B] - logps[B:] + ref_logps[B:]).detach() * 0.1
    assert float(m["rewards/margins"]) == pytest.approx(float(margin.mean()), rel=1e-4)


def test_a_step_raises_the_chosen_over_the_rejected(tmp_path, tokenizer):
    """Through the engine, one optimizer step on the sampled pairs: the policy's log-ratio margin of those pairs
    (chosen - rejected, against the frozen start) grows from 0, i.e. the pairs are oriented by the reward."""
    model = eos_model(tokenizer)
    start = eos_model(tokenizer)
    cfg = make_cfg(tmp_path, max_steps=1, learning_rate=3e-3)
    captured = []
    algo = OnlineDPO(cfg, tokenizer, [("chars", chars)], examples(tokenizer), Copy(start))
    prepare = algo.prepare

    def spy(m, ex):
        captured.append(prepare(m, ex))
        return captured[-1]

    algo.prepare = spy
    Engine(cfg, model, tokenizer, algo, examples(tokenizer)).train()
    [mb] = captured[0]
    B = len(mb)
    with torch.no_grad():
        after = naive_sums(model, mb) - naive_sums(start, mb)
    assert float((after[:B] - after[B:]).mean()) > 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["pairs"] == 2 and rows[0]["scores/margin"] > 0 and rows[0]["rewards/margins"] == 0.0


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def test_no_pair_trains_nothing_and_dynamic_sampling_fills_the_batch(tmp_path, tokenizer):
    model = eos_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = make_cfg(tmp_path, max_steps=1)
    Engine(cfg, model, tokenizer, OnlineDPO(cfg, tokenizer, [("one", constant)], examples(tokenizer), Copy(tiny_model(tokenizer))),
           examples(tokenizer)).train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every reward equal: no pair
    [row] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["pairs"] == 0 and row["frac_prompts_without_pair"] == 1.0 and row["loss"] == 0.0

    def first_prompt_flat(prompts, completions, **kwargs):  # prompt 0's completions all score 0
        return [0.0 if p == "What is 12 + 7?" else float(len(c)) for p, c in zip(prompts, completions)]

    cfg = make_cfg(tmp_path, dynamic_sampling=True, max_sampling_rounds=3)
    algo = OnlineDPO(cfg, tokenizer, [("r", first_prompt_flat)], examples(tokenizer), Copy(tiny_model(tokenizer)))
    micro = algo.prepare(eos_model(tokenizer), examples(tokenizer)[:2])
    assert sum(len(mb) for mb in micro) == 2 and algo._round == 2  # a second round found the missing pair
    assert micro.metrics["sampling_rounds"] == 2


def test_cli_runs_and_checks_its_config(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(
        ["What is 12 + 7?", "2 + 2 =", "the a an", "Human: hi"])))
    module = tmp_path / "od_rewards.py"
    module.write_text("def chars(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        code = cli.main(["online-dpo", f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={tmp_path}/run",
                         "reward_funcs=od_rewards:chars", "num_generations=3", "max_completion_length=5", "batch_size=2",
                         "micro_batch_size=2", "max_steps=2", "progress=false", "learning_rate=1e-4",
                         "log_completions=true"])
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("rewards/accuracies" in r for r in rows if r["pairs"])
    assert (tmp_path / "run" / "model.safetensors").exists()
    # log_completions: every completion of every step, with its score and its part in a pair.
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) >= 2 * 2 * 3 and {r["step"] for r in logged} == {1, 2}
    for r in logged:
        assert r["score"] == pytest.approx(float(len(r["completion"])))
    for step in (1, 2):
        mine = [r for r in logged if r["step"] == step]
        chosen = [r for r in mine if r["pair"] == "chosen"]
        rejected = [r for r in mine if r["pair"] == "rejected"]
        assert len(chosen) == len(rejected) == next(r["pairs"] for r in rows if r["step"] == step)
        for c, w in zip(chosen, rejected):
            assert c["prompt_index"] == w["prompt_index"] and c["score"] > w["score"]
    capsys.readouterr()
    assert cli.main(["online-dpo", "num_generations=1"]) == 2
    assert "num_generations must be >= 2" in capsys.readouterr().err
    assert cli.main(["online-dpo", "loss_type=nope"]) == 2
    assert "loss_type: unknown 'nope'" in capsys.readouterr().err


def test_trl_online_dpo_names(tmp_path):
    from posttrain.config import load_config

    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: m\nreward_model_path: runs/rm\nmax_new_tokens: 53\nmissing_eos_penalty: 1.0\n"
                    "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nloss_type: ipo\nbeta: 0.2\n")
    cfg = load_config(online_dpo.Config, str(path), [], world_size=1)
    assert (cfg.reward_model, cfg.reward_funcs, cfg.max_completion_length) == ("runs/rm", ["reward_model"], 53)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.loss_type, cfg.beta) == (8, 4, ["ipo"], 0.2)
