"""Advantage estimators, GAE, per-token rewards, whitening, the KL controller and the value loss, against numbers
worked out by hand in the docstrings."""

import math

import pytest
import torch

from posttrain.losses import policy_loss
from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    EstimatorOptions,
    adaptive_kl_coef,
    estimate_advantages,
    gae,
    masked_whiten,
    returns_to_go,
    sequence_scores,
    token_kl,
    token_rewards,
)
from posttrain.losses.policy import group_advantages
from posttrain.losses.value import explained_variance, value_loss

NAN = float("nan")
D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, t(expected) if not isinstance(expected, torch.Tensor) else expected,
                               rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


def test_gae_by_hand_with_padding():
    """gamma = 1, lam = 0.95. Row 0 (3 tokens): r = [0, 0, 1], V = [0.5, 0.4, 0.8]
        t=2: delta = 1 + 0 - 0.8 = 0.2                       A2 = 0.2
        t=1: delta = 0 + 0.8 - 0.4 = 0.4                     A1 = 0.4 + 0.95 * 0.2 = 0.59
        t=0: delta = 0 + 0.4 - 0.5 = -0.1                    A0 = -0.1 + 0.95 * 0.59 = 0.4605
        returns = A + V = [0.9605, 0.99, 1.0]
    Row 1 (2 tokens, then padding whose reward 7 and value 9 must be ignored): r = [0, 2], V = [1.0, 1.5]
        t=1: delta = 2 + 0 - 1.5 = 0.5 (the episode ends: no next value)   A1 = 0.5
        t=0: delta = 0 + 1.5 - 1.0 = 0.5                                   A0 = 0.5 + 0.95 * 0.5 = 0.975
        returns = [1.975, 2.0], and 0 on the padding."""
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
    values = t([[0.5, 0.4, 0.8], [1.0, 1.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.4605, 0.59, 0.2], [0.975, 0.5, 0.0]])
    close(ret, [[0.9605, 0.99, 1.0], [1.975, 2.0, 0.0]])


def test_gae_by_hand_with_discount():
    """gamma = lam = 0.5, r = [1, 0, 2], V = [1, 2, 1]:
        t=2: delta = 2 - 1 = 1                      A2 = 1
        t=1: delta = 0 + 0.5 * 1 - 2 = -1.5         A1 = -1.5 + 0.25 * 1 = -1.25
        t=0: delta = 1 + 0.5 * 2 - 1 = 1            A0 = 1 + 0.25 * (-1.25) = 0.6875
        returns = [1.6875, 0.75, 2]"""
    adv, ret = gae(t([[1.0, 0.0, 2.0]]), t([[1.0, 2.0, 1.0]]), t([[1, 1, 1]]), gamma=0.5, lam=0.5)
    close(adv, [[0.6875, -1.25, 1.0]])
    close(ret, [[1.6875, 0.75, 2.0]])


def test_gae_gamma_one_lam_one_is_returns_to_go_minus_values():
    """gamma = lam = 1: the deltas telescope, A_t = sum_{s >= t} r_s - V_t (the Monte-Carlo advantage)."""
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    mask = t([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5, [0] * 6])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    close(adv, (to_go - values) * mask, atol=1e-12)
    close(ret, to_go * mask, atol=1e-12)
    close(returns_to_go(rewards, mask, 1.0), to_go * mask, atol=1e-12)


def test_gae_lam_zero_is_one_step_td():
    """lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, with V after the last token = 0."""
    torch.manual_seed(1)
    rewards, values = torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D)
    mask = t([[1] * 5, [1] * 3 + [0] * 2, [1] * 2 + [0] * 3])
    gamma = 0.9
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    nxt = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(3, 1, dtype=D)], dim=1)
    close(adv, (rewards + gamma * nxt - values) * mask, atol=1e-12)


def test_gae_skips_positions_inside_the_mask():
    """A masked-out position inside a completion (e.g. a tool's output) is neither a step nor a value: its reward
    (5) and value (7) are skipped. gamma = lam = 1, r = [0, ., 1], V = [0.2, ., 0.5]:
    A2 = 1 - 0.5 = 0.5; A0 = (0 + 0.5 - 0.2) + 0.5 = 0.8 = (sum of rewards) - V0."""
    adv, ret = gae(t([[0.0, 5.0, 1.0]]), t([[0.2, 7.0, 0.5]]), t([[1, 0, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[0.8, 0.0, 0.5]])
    close(ret, [[1.0, 0.0, 1.0]])


def test_returns_to_go_discounted():
    """gamma = 0.5, r = [-0.1, -0.1, 0.9]: G2 = 0.9, G1 = -0.1 + 0.45 = 0.35, G0 = -0.1 + 0.175 = 0.075."""
    close(returns_to_go(t([[-0.1, -0.1, 0.9]]), t([[1, 1, 1]]), 0.5), [[0.075, 0.35, 0.9]])


# ---------------------------------------------------------------------------------------------------------
# Whitening, scores, rewards per token, KL
# ---------------------------------------------------------------------------------------------------------


def test_masked_whiten():
    """Entries 1, 2, 3, 4 under the mask: mean 2.5, Bessel variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std
    1.2909944: -1.1618950, -0.3872983, 0.3872983, 1.1618950; the masked-out entries (9s) give 0."""
    x = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    close(masked_whiten(x, mask), [[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]])
    close(masked_whiten(x, t([[0, 0, 0], [1, 0, 0]])), torch.zeros(2, 3, dtype=D))  # one entry: nothing to compare


def test_sequence_scores_penalty_and_clip():
    """weights (1, 0.2), missing_eos_penalty 1 on truncated rows, clip to (-0.5, 1.05):
    row 0: 1 + 0.1 = 1.1 -> 1.05;  row 1 (truncated): 0.2 - 1 = -0.8 -> -0.5;  row 2: unscored -> NaN;
    row 3 (truncated): 0 - 1 -> -0.5."""
    rewards = t([[1.0, 0.5], [NAN, 1.0], [NAN, NAN], [0.0, 0.0]])
    scores = sequence_scores(rewards, [1.0, 0.2], truncated=torch.tensor([False, True, False, True]),
                             missing_eos_penalty=1.0, clip_range=(-0.5, 1.05))
    close(scores[[0, 1, 3]], [1.05, -0.5, -0.5])
    assert math.isnan(scores[2])
    # the plain weighted sum is computed exactly as group_advantages computes it
    plain = sequence_scores(rewards, [1.0, 0.2])
    assert torch.equal(plain[[0, 1, 3]], torch.nansum(rewards * t([1.0, 0.2]), dim=1)[[0, 1, 3]])


def test_token_rewards():
    """The score lands on each row's last completion token, the non-score reward on every completion token; an
    unscorable row keeps only its KL terms; an empty row gets nothing."""
    r = token_rewards(t([2.0, NAN, 1.0]), t([[1, 1, 0], [1, 0, 0], [0, 0, 0]]),
                      non_score=t([[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6], [-0.7, -0.8, -0.9]]))
    close(r, [[-0.1, 1.8, 0.0], [-0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_token_kl_estimators():
    """k1 = logp - ref: -1 - (-2) = 1, -2 - (-1) = -1 (k1 can be negative); k3 = e^d - d - 1 with d = ref - logp:
    d = -1: 0.3678794; d = 1: 0.7182818."""
    logps, ref = t([-1.0, -2.0]), t([-2.0, -1.0])
    close(token_kl(logps, ref, "k1"), [1.0, -1.0])
    close(token_kl(logps, ref, "k3"), [0.3678794, 0.7182818])
    with pytest.raises(ValueError, match="unknown kl_estimator 'k2'"):
        token_kl(logps, ref, "k2")


def test_adaptive_kl_controller():
    """Ziegler et al.: target 6 nats, horizon 10000, a rollout of 256 completions.
    KL 9: error clip(9/6 - 1 = 0.5) = 0.2, kl_coef 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512.
    KL 5.4: error -0.1, 0.1 * (1 - 0.1 * 0.0256) = 0.099744.  KL 0: error clipped at -0.2: 0.1 * 0.99488."""
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 256) == pytest.approx(0.100512, abs=1e-12)
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 256) == pytest.approx(0.099744, abs=1e-12)
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 10000, 256) == pytest.approx(0.099488, abs=1e-12)
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 256) == 0.1


# ---------------------------------------------------------------------------------------------------------
# The estimators
# ---------------------------------------------------------------------------------------------------------

FULL = t([[1, 1], [1, 1], [1, 1], [1, 1]])


def run(name, scores, mask=FULL, **kw):
    options = kw.pop("options", EstimatorOptions())
    return estimate_advantages(name, AdvantageInputs(t(scores), mask, **kw), options)


def test_rloo_by_hand():
    """G = 4, scores [1, 0, 1, 1]: A_i = r_i - mean of the other three: 1 - 2/3 = 1/3, 0 - 1 = -1, 1/3, 1/3."""
    out = run("rloo", [1.0, 0.0, 1.0, 1.0], group_size=4)
    close(out.advantages, [1 / 3, -1.0, 1 / 3, 1 / 3])
    assert out.advantages.shape == (4,) and out.returns is None


def test_rloo_unscorable_and_lonely_completions():
    """Groups of 3. [2, NaN, 0]: the baseline is the other SCORABLE completion: 2 - 0 = 2, 0 - 2 = -2, unscorable
    0. [NaN, 5, NaN]: a single scorable completion has no baseline: all 0."""
    out = run("rloo", [2.0, NAN, 0.0, NAN, 5.0, NAN], mask=t([[1]] * 6), group_size=3)
    close(out.advantages, [2.0, 0.0, -2.0, 0.0, 0.0, 0.0])


def test_rloo_with_kl_in_the_reward_and_whitening():
    """Returns = score + sum of the non-score rewards: [1 - 0.2, 0 - 0.3] = [0.8, -0.3]: A = [1.1, -1.1].
    whiten (TRL's normalize_advantages): mean 0, unbiased std of (1.1, -1.1) = 1.5556349: +-1.1 / (1.5556349 +
    1e-4) = +-0.7070613."""
    x = AdvantageInputs(t([1.0, 0.0]), t([[1, 1], [1, 0]]), 2, non_score=t([[-0.1, -0.1], [-0.3, -9.0]]))
    close(estimate_advantages("rloo", x).advantages, [1.1, -1.1])
    close(estimate_advantages("rloo", x, EstimatorOptions(whiten=True)).advantages, [0.7070613, -0.7070613])


def test_reinforce_plus_plus_by_hand():
    """gamma 1, scores [1, 0], KL penalty -0.1 per token; row 1 has 2 tokens.
    rewards: [-0.1, -0.1, 0.9] and [-0.1, -0.1]  ->  returns-to-go [0.7, 0.8, 0.9] and [-0.2, -0.1].
    Whitened over the 5 tokens: mean 0.42, Bessel variance (0.28^2 + 0.38^2 + 0.48^2 + 0.62^2 + 0.52^2) / 4
    = 0.277, std 0.5263079: [0.5320079, 0.7220108, 0.9120137], [-1.1780175, -0.9880147]."""
    mask = t([[1, 1, 1], [1, 1, 0]])
    out = run("reinforce_plus_plus", [1.0, 0.0], mask=mask, non_score=t([[-0.1] * 3, [-0.1] * 3]))
    close(out.advantages, [[0.5320079, 0.7220108, 0.9120137], [-1.1780175, -0.9880147, 0.0]])


def test_reinforce_plus_plus_baseline_by_hand():
    """G = 2, scores [1, 0 | 1, 1]; row 1 has 1 token. Group means 0.5 and 1: centred [0.5, -0.5 | 0, 0], on every
    token: 0.5, 0.5, -0.5, 0, 0, 0, 0 (7 tokens). Mean 1/14 = 0.0714286, Bessel variance 0.7142857 / 6 =
    0.1190476, std 0.3450328: row 0 -> 1.2421180, row 1 -> -1.6561573, rows 2-3 -> -0.2070197."""
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    out = run("reinforce_plus_plus_baseline", [1.0, 0.0, 1.0, 1.0], mask=mask, group_size=2)
    a, b, c = 1.2421180, -1.6561573, -0.2070197
    close(out.advantages, [[a, a], [b, 0.0], [c, c], [c, c]])


def test_remax_by_hand():
    """Baseline: the greedy completion's score 0.5 (both rows continue the same prompt).
    No KL: returns-to-go [1, 1] and [0] minus 0.5: [0.5, 0.5], [-0.5, 0].
    KL penalty -0.1 per token: rewards [-0.1, 0.9] and [-0.1]: returns-to-go [0.8, 0.9] and [-0.1]; minus 0.5:
    [0.3, 0.4] and [-0.6, 0]."""
    mask = t([[1, 1], [1, 0]])
    out = run("remax", [1.0, 0.0], mask=mask, group_size=2, baseline=t([0.5, 0.5]))
    close(out.advantages, [[0.5, 0.5], [-0.5, 0.0]])
    out = run("remax", [1.0, 0.0], mask=mask, group_size=2, baseline=t([0.5, 0.5]), non_score=t([[-0.1] * 2] * 2))
    close(out.advantages, [[0.3, 0.4], [-0.6, 0.0]])
    # an unscorable greedy completion leaves its prompt without a baseline: no signal
    close(run("remax", [1.0, 0.0], mask=mask, group_size=2, baseline=t([NAN, NAN])).advantages, torch.zeros(2, 2, dtype=D))


def test_gae_estimator_whitens_and_skips_unscorable_rows():
    """The gae entry: rewards per token from the scores, `gae`, then whitening over the scorable rows' tokens.
    Row 2 is unscorable: advantage 0 and its value targets are its own values (the critic learns nothing)."""
    mask = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    values = t([[0.5, 0.4, 0.8], [1.0, 1.5, 0.0], [3.0, 0.0, 0.0]])
    x = AdvantageInputs(t([1.0, 2.0, NAN]), mask, values=values)
    raw, ret = gae(token_rewards(x.scores, mask), values, mask, 1.0, 0.95)
    plain = estimate_advantages("gae", x, EstimatorOptions(whiten=False))
    rows = mask * t([1, 1, 0])[:, None]
    close(plain.advantages, raw * rows)
    out = estimate_advantages("gae", x)  # whitened by default
    close(out.advantages, masked_whiten(raw, rows))
    valid = out.advantages[rows > 0]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-9) and float(valid.std()) == pytest.approx(1.0, abs=1e-6)
    close(out.returns, torch.cat([ret[:2], values[2:] * mask[2:]]))
    # row 0 by hand (test_gae_by_hand_with_padding): the score 1 sits on its last token
    close(plain.advantages[0], [0.4605, 0.59, 0.2])


def test_grpo_entry_is_group_advantages_bit_for_bit():
    """advantage_estimator=grpo is today's `group_advantages` on the weighted sum of the rewards, exactly (two
    reward functions, an unscorable row, every scale and std), and GDPO's per-function path."""
    rewards = t([[1.0, 0.0], [0.0, 1.0], [NAN, NAN], [1.0, 1.0], [0.5, 0.0], [0.0, 0.0], [1.0, NAN], [0.2, 1.0]])
    weights = [1.0, 0.2]
    mask = torch.ones(8, 3, dtype=D)
    for scale in ("group", "batch", "none"):
        for std in ("unbiased", "population"):
            x = AdvantageInputs(sequence_scores(rewards, weights), mask, 4, rewards=rewards, weights=weights)
            got = estimate_advantages("grpo", x, EstimatorOptions(scale_rewards=scale, std=std)).advantages
            assert torch.equal(got, group_advantages(rewards, 4, scale, std, reward_weights=weights)), (scale, std)
    x = AdvantageInputs(sequence_scores(rewards, weights), mask, 4, rewards=rewards, weights=weights)
    gdpo = EstimatorOptions(aggregation="normalize_then_sum")
    expected = group_advantages(rewards, 4, aggregation="normalize_then_sum", reward_weights=weights)
    assert torch.equal(estimate_advantages("grpo", x, gdpo).advantages, expected)


def test_registry_declares_needs_and_names_on_a_miss():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                         "remax"}
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_baseline] == ["remax"]
    with pytest.raises(ValueError, match="unknown advantage_estimator 'ppo'; expected one of gae, grpo, rloo"):
        run("ppo", [1.0])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        run("rloo", [1.0, 0.0], mask=FULL[:2], group_size=1)
    with pytest.raises(ValueError, match="needs the critic's values"):
        run("gae", [1.0, 0.0], mask=FULL[:2])


# ---------------------------------------------------------------------------------------------------------
# Value loss, explained variance, per-token advantages in the policy loss
# ---------------------------------------------------------------------------------------------------------

# (new value, old value, target, expected loss, expected d loss / d V, clipped term larger); cliprange 0.2
VALUE_CASES = [
    (1.1, 1.0, 2.0, 0.5 * 0.81, -0.9, 0.0),  # inside the range: 0.5 (V - R)^2, gradient V - R
    (1.5, 1.0, 2.0, 0.5 * 0.64, 0.0, 1.0),  # moved 0.5 towards R: clipped to 1.2, (1.2 - 2)^2 = 0.64 wins, no gradient
    (0.5, 1.0, 2.0, 0.5 * 2.25, -1.5, 0.0),  # moved away from R: the unclipped (larger) term wins
    (1.5, 2.0, 1.0, 0.5 * 0.64, 0.0, 1.0),  # towards R from above: clipped to 1.8, (1.8 - 1)^2 = 0.64
    (2.5, 2.0, 1.0, 0.5 * 2.25, 1.5, 0.0),  # away from R, above: (2.5 - 1)^2 = 2.25 beats (2.2 - 1)^2
]


@pytest.mark.parametrize("v, old, ret, expected, grad, clipped", VALUE_CASES)
def test_clipped_value_loss_single_token(v, old, ret, expected, grad, clipped):
    values = torch.full((1, 1), v, dtype=D, requires_grad=True)
    loss, m = value_loss(values, t([[old]]), t([[ret]]), torch.ones(1, 1, dtype=D), cliprange_value=0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)
    assert float(values.grad) == pytest.approx(grad, abs=1e-12)
    assert float(m["clipfrac"]) == clipped


def test_value_loss_aggregation_and_no_clip():
    """dapo: token sum / token count. Row 0: (V-R)^2 = 1 and 4, row 1: 9 (its padding ignored): 0.5 * 14 / 3.
    grpo: per-row means (0.5 * 2.5 and 0.5 * 9), averaged: 2.875. No clipping: the plain squared error."""
    values, ret = t([[1.0, 2.0, 0.0], [3.0, 5.0, 5.0]]), t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    loss, _ = value_loss(values, values, ret, mask, cliprange_value=None, loss_type="dapo")
    assert float(loss) == pytest.approx(0.5 * 14 / 3)
    loss, _ = value_loss(values, values, ret, mask, cliprange_value=None, loss_type="grpo")
    assert float(loss) == pytest.approx(2.875)
    loss, _ = value_loss(values, values, ret, mask, cliprange_value=None, loss_type="dapo", num_items=7.0)
    assert float(loss) == pytest.approx(0.5 * 14 / 7)  # the step's global token count


def test_explained_variance():
    """V = [1, 2, 3], R = [1, 2, 4]: Var(R) = 14/9, Var(R - V) = Var([0, 0, 1]) = 2/9: 1 - 1/7 = 6/7."""
    assert float(explained_variance(t([1.0, 2.0, 3.0]), t([1.0, 2.0, 4.0]), t([1, 1, 1]))) == pytest.approx(6 / 7)
    assert math.isnan(float(explained_variance(t([1.0, 2.0]), t([3.0, 3.0]), t([1, 1]))))


def test_policy_loss_takes_per_token_advantages():
    """[B] advantages and the same values on every token as [B, T] give the same loss and gradient; per-token
    values weight each token's log-prob: on-policy dapo, loss = -sum A_t logp_t / tokens, gradient -A_t / 3."""
    logps = t([[-1.0, -2.0, -3.0], [-1.5, -0.5, -9.0]]).requires_grad_()
    mask = t([[1, 1, 0], [1, 0, 0]])
    a, _ = policy_loss(logps, None, t([1.0, -2.0]), mask)
    (ga,) = torch.autograd.grad(a, logps)
    b, _ = policy_loss(logps, None, t([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]]), mask)
    (gb,) = torch.autograd.grad(b, logps)
    assert float(a.detach()) == float(b.detach()) and torch.equal(ga, gb)
    c, m = policy_loss(logps, None, t([[0.5, -1.0, 7.0], [2.0, 7.0, 7.0]]), mask, loss_type="dapo")
    (gc,) = torch.autograd.grad(c, logps)
    close(gc, [[-0.5 / 3, 1.0 / 3, 0.0], [-2.0 / 3, 0.0, 0.0]])
    assert float(m["clip_ratio/region_mean"]) == 0.0
