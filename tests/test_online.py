"""The online-RL algorithm with each critic-free advantage estimator, on the tiny model: grpo bit for bit as
before, rloo, reinforce_plus_plus with the KL in the reward, remax's greedy baseline, the score's shaping
(missing_eos_penalty, reward_clip_range), the adaptive KL coefficient, config errors.

The helpers come from tests/test_grpo.py (same tiny model, prompts and reward functions)."""

import pytest
import torch
from test_grpo import (
    PROMPTS,
    TEMP,
    G,
    assert_same_grads,
    chars,
    eos_model,
    examples,
    grads,
    make_cfg,
    metrics,
    naive_logps,
)

from posttrain import cli
from posttrain.algorithms import grpo
from posttrain.algorithms.grpo import GRPO
from posttrain.engine import Engine
from posttrain.losses.advantages import masked_whiten, returns_to_go, token_rewards
from posttrain.losses.policy import group_advantages, policy_loss
from posttrain.reference import Copy
from posttrain.rollout.generate import HFEngine
from posttrain.testing import tiny_model


class Recorder:
    """A reward function remembering what it returned."""

    def __init__(self, fn):
        self.fn, self.values = fn, []

    def __call__(self, prompts, completions, **kwargs):
        out = self.fn(prompts, completions)
        self.values += out
        return out


def has_e(prompts, completions, **kwargs):
    return [float("e" in c) for c in completions]


@pytest.fixture
def rollouts(monkeypatch):
    """Every Rollout sampled, with the temperature it was asked for."""
    seen = []

    class SpyEngine(HFEngine):
        def generate(self, *args, **kwargs):
            seen.append((kwargs["temperature"], super().generate(*args, **kwargs)))
            return seen[-1][1]

    monkeypatch.setattr(grpo, "HFEngine", SpyEngine)
    return seen


def test_grpo_estimator_gives_todays_advantages_bit_for_bit(tmp_path, tokenizer):
    """advantage_estimator=grpo (the default) with two weighted reward functions: the micro-batch advantages are
    exactly `group_advantages` of the recorded rewards, as GRPO computed them before the registry existed."""
    a, b = Recorder(chars), Recorder(has_e)
    cfg = make_cfg(tmp_path, reward_weights=[1.0, 0.2])
    algo = GRPO(cfg, tokenizer, [("chars", a), ("has_e", b)], examples(tokenizer))
    [mb] = algo.prepare(eos_model(tokenizer), examples(tokenizer)[:2])
    rewards = torch.tensor([a.values, b.values]).T
    assert torch.equal(mb.advantages, group_advantages(rewards, G, reward_weights=[1.0, 0.2]))
    assert mb.advantages.shape == (2 * G,) and mb.advantages.abs().sum() > 1


def test_rloo_through_prepare(tmp_path, tokenizer):
    """rloo: each completion's score minus the mean of the other G - 1 of its prompt, written out."""
    record = Recorder(chars)
    algo = GRPO(make_cfg(tmp_path, advantage_estimator="rloo"), tokenizer, [("chars", record)], examples(tokenizer))
    [mb] = algo.prepare(eos_model(tokenizer), examples(tokenizer)[:2])
    r = record.values
    expected = [r[i] - (sum(r[g * G:(g + 1) * G]) - r[i]) / (G - 1) for g in range(2) for i in range(g * G, (g + 1) * G)]
    torch.testing.assert_close(mb.advantages, torch.tensor(expected), rtol=0, atol=1e-5)
    assert len(set(r)) > 2


def test_reinforce_plus_plus_with_the_kl_in_the_reward(tmp_path, tokenizer, rollouts):
    """reinforce_plus_plus, one completion per prompt, kl_coef 0.1 (k1) against a reference of another seed:
    r_t = -0.1 (logp_t - ref_t) on every token + the score on the last; returns-to-go whitened over the batch's
    tokens. Built here from the sampler's log-probs and the reference's full-softmax log-probs; the trainer's
    loss and gradient are then `policy_loss` on those per-token advantages."""
    model, ref = eos_model(tokenizer), tiny_model(tokenizer, seed=1)
    record = Recorder(chars)
    cfg = make_cfg(tmp_path, advantage_estimator="reinforce_plus_plus", num_generations=1, kl_coef=0.1, batch_size=4)
    exs = examples(tokenizer)
    algo = GRPO(cfg, tokenizer, [("chars", record)], exs, Copy(ref))
    batch = algo.prepare(model, exs)
    [mb] = batch
    [(_, r)] = rollouts
    mask = mb.completion_mask.float()
    width = mask.shape[1]
    assert mb.ref_logps is None  # beta = 0: the reference served the reward only
    ref_logps = naive_logps(ref, mb).detach()
    kl = (r.logps[:, :width] - ref_logps) * mask
    rewards = token_rewards(torch.tensor(record.values), mask, -0.1 * kl)
    expected = masked_whiten(returns_to_go(rewards, mask, 1.0), mask)
    torch.testing.assert_close(mb.advantages, expected, rtol=0, atol=1e-4)
    assert mb.advantages.shape == (4, width) and len(set(mask.sum(-1).tolist())) > 1
    assert batch.metrics["objective/kl"] == pytest.approx(float(kl.sum(-1).mean()), rel=1e-4)
    assert batch.metrics["objective/non_score_reward"] == pytest.approx(-0.1 * float(kl.sum(-1).mean()), rel=1e-4)

    loss, _ = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)
    hand, _ = policy_loss(naive_logps(model, mb), None, mb.advantages, mask, loss_type="dapo")
    hand.backward()
    assert_same_grads(g_trainer, grads(model))
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-5)


def test_remax_baseline_is_the_greedy_completions_score(tmp_path, tokenizer, rollouts):
    """remax: after the G samples each prompt gets one greedy completion (temperature 0); its score is the baseline
    of the prompt's samples: A_t = score - baseline on every token (no KL in the reward)."""
    record = Recorder(chars)
    algo = GRPO(make_cfg(tmp_path, advantage_estimator="remax"), tokenizer, [("chars", record)], examples(tokenizer))
    [mb] = algo.prepare(eos_model(tokenizer), examples(tokenizer)[:2])
    (t_sampled, _), (t_greedy, greedy) = rollouts
    assert (t_sampled, t_greedy) == (TEMP, 0.0) and len(greedy.texts) == 2
    baseline = torch.tensor([float(len(greedy.texts[g])) for g in range(2)]).repeat_interleave(G)
    scores = torch.tensor(record.values[: 2 * G])  # the samples were scored first, then the greedy completions
    assert record.values[2 * G:] == baseline[::G].tolist()
    mask = mb.completion_mask.float()
    torch.testing.assert_close(mb.advantages, (scores - baseline)[:, None] * mask)
    assert (scores != baseline).any()


def test_missing_eos_penalty_and_reward_clip_range(tmp_path, tokenizer, rollouts):
    """The score of a completion cut at the length limit loses missing_eos_penalty, then scores are clamped to
    reward_clip_range; rloo's advantages (no normalisation) show the shaped scores exactly."""
    record = Recorder(chars)
    cfg = make_cfg(tmp_path, advantage_estimator="rloo", missing_eos_penalty=5.0, reward_clip_range=[-3.0, 12.0])
    algo = GRPO(cfg, tokenizer, [("chars", record)], examples(tokenizer))
    [mb] = algo.prepare(eos_model(tokenizer), examples(tokenizer)[:2])
    [(_, r)] = rollouts
    assert 0 < int(r.truncated.sum()) < 2 * G
    s = (torch.tensor(record.values) - 5.0 * r.truncated.float()).clamp(-3.0, 12.0)
    expected = torch.cat([s[g * G:(g + 1) * G] - (s[g * G:(g + 1) * G].sum() - s[g * G:(g + 1) * G]) / (G - 1)
                          for g in range(2)])
    torch.testing.assert_close(mb.advantages, expected, rtol=0, atol=1e-5)
    assert (s != torch.tensor(record.values)).any()


def test_adaptive_kl_coefficient_moves_towards_the_target_and_is_saved(tmp_path, tokenizer):
    """kl_target far below the KL per completion: after each rollout kl_coef grows by the clipped 20% x n / horizon
    (Ziegler et al.; k3, never negative); the coefficient a step logs is the one its rollout used; it travels with the run's state."""
    cfg = make_cfg(tmp_path, advantage_estimator="rloo", kl_coef=0.1, kl_estimator="k3", kl_target=1e-3, kl_horizon=40, max_steps=2,
                   learning_rate=1e-3, temperature=1.5)
    exs = examples(tokenizer)
    model = tiny_model(tokenizer)
    algo = GRPO(cfg, tokenizer, [("chars", chars)], exs, Copy(tiny_model(tokenizer, seed=1)))
    Engine(cfg, model, tokenizer, algo, exs).train()
    rows = metrics(tmp_path / "run")
    n = 2 * G  # completions per rollout
    assert rows[0]["objective/kl_coef"] == 0.1 and rows[0]["objective/kl"] > 1e-3
    assert rows[1]["objective/kl_coef"] == pytest.approx(0.1 * (1 + 0.2 * n / 40))
    assert algo.state_dict()["kl_coef"] == pytest.approx(0.1 * (1 + 0.2 * n / 40) ** 2)
    fresh = GRPO(cfg, tokenizer, [("chars", chars)], exs, Copy(tiny_model(tokenizer, seed=1)))
    fresh.load_state_dict(algo.state_dict())
    assert fresh.kl_coef == algo.kl_coef


@pytest.mark.parametrize("args, message", [
    (["advantage_estimator=ppo"], "'ppo' is not one of gae, grpo, rloo"),
    (["advantage_estimator=rloo", "num_generations=1"], "num_generations must be >= 2 (advantage_estimator=rloo"),
    (["whiten_advantages=true"], "advantage_estimator=grpo has no such option"),
    (["kl_target=6"], "kl_target adapts kl_coef"),
    (["reward_clip_range=[1, 0]"], "reward_clip_range: expected [min, max] with min < max"),
    (["multi_objective_aggregation=normalize_then_sum", "kl_coef=0.1"], "kl_coef, missing_eos_penalty and reward_clip_range"),
    (["kl_estimator=k2"], "'k2' is not one of k1, k3"),
    (["gamma=1.5"], "gamma and lam must be in [0, 1]"),
])
def test_config_errors_exit_2_before_loading_a_model(tmp_path, capsys, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "%s", "answer": "1"}\n' % PROMPTS[0])
    rc = cli.main(["grpo", "model=./no/such/model", f"dataset={data}", f"output_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "model path not found" not in err, err
    assert len(err.strip().splitlines()) == 1
