"""GRPO-family advantages and clipped policy loss, against numbers worked out by hand in the comments."""

import math

import pytest
import torch

from posttrain.losses.policy import (
    AGGREGATIONS,
    LOSS_TYPES,
    group_advantages,
    group_stats,
    k3_kl,
    loss_denominator,
    policy_loss,
)

NAN = float("nan")
D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ---------------------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------------------


def test_grpo_advantages_unbiased_std():
    # mean = 0.55, deviations (0.35, 0.15, -0.15, -0.35), sum of squares 0.29,
    # unbiased std = sqrt(0.29 / 3) = 0.3109126; eps = 1e-4 -> 0.3110126
    # 0.35 / 0.3110126 = 1.1253562, 0.15 / 0.3110126 = 0.4822955
    adv = group_advantages(t([0.9, 0.7, 0.4, 0.2]), group_size=4)
    torch.testing.assert_close(adv, t([1.1253562, 0.4822955, -0.4822955, -1.1253562]), rtol=0, atol=1e-7)
    # with a negligible eps: 0.35 / 0.3109126 = 1.1257, 0.15 / 0.3109126 = 0.4825
    adv = group_advantages(t([0.9, 0.7, 0.4, 0.2]), group_size=4, eps=1e-12)
    torch.testing.assert_close(adv, t([1.1257, 0.4825, -0.4825, -1.1257]), rtol=0, atol=1e-4)


def test_grpo_advantages_population_std():
    # population std = sqrt(0.29 / 4) = 0.2692582 (+1e-4 = 0.2693582)
    # 0.35 / 0.2693582 = 1.2993848, 0.15 / 0.2693582 = 0.5568792
    adv = group_advantages(t([0.9, 0.7, 0.4, 0.2]), group_size=4, std="population")
    torch.testing.assert_close(adv, t([1.2993848, 0.5568792, -0.5568792, -1.2993848]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_equal_rewards_give_zero_not_nan(eps):
    adv = group_advantages(t([0.3, 0.3, 0.3, 1.0, 0.0, 1.0]), group_size=3, eps=eps)
    assert not torch.isnan(adv).any()
    # first group: all equal -> 0. second group: mean 2/3, devs (1/3, -2/3, 1/3), unbiased std
    # sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3) = 0.5773503
    s = math.sqrt(1 / 3) + eps
    torch.testing.assert_close(adv, t([0, 0, 0, (1 / 3) / s, (-2 / 3) / s, (1 / 3) / s]))


def test_unscorable_row_left_out_and_zero():
    # row 1 is unscorable; the statistics use (1, 0, 1): mean 2/3, std sqrt(1/3) = 0.5773503 (+1e-4)
    # advantages: (1/3)/0.5774503 = 0.5772503, (-2/3)/0.5774503 = -1.1545006
    adv = group_advantages(t([1.0, NAN, 0.0, 1.0]), group_size=4)
    torch.testing.assert_close(adv, t([0.5772503, 0.0, -1.1545006, 0.5772503]), rtol=0, atol=1e-7)


def test_all_nan_group_is_zero_and_does_not_touch_other_groups():
    # group 2: mean 0.75, devs (.25, -.75, .25, .25), unbiased var 0.75/3 = 0.25, std 0.5 (+1e-4)
    adv = group_advantages(t([NAN] * 4 + [1.0, 0.0, 1.0, 1.0]), group_size=4)
    torch.testing.assert_close(
        adv, t([0, 0, 0, 0, 0.25 / 0.5001, -0.75 / 0.5001, 0.25 / 0.5001, 0.25 / 0.5001])
    )


def test_two_grpo_groups_of_two():
    # (1, 0): mean 0.5, unbiased std |1-0|/sqrt(2) = 0.7071068 -> +-0.5/0.7072068 = +-0.7070068 (= 1/sqrt 2)
    # (1, 1): equal -> 0
    adv = group_advantages(t([1.0, 0.0, 1.0, 1.0]), group_size=2)
    torch.testing.assert_close(adv, t([0.7070068, -0.7070068, 0.0, 0.0]), rtol=0, atol=1e-7)
    adv = group_advantages(t([1.0, 0.0, 1.0, 1.0]), group_size=2, eps=1e-12)
    torch.testing.assert_close(adv, t([1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0]))


def test_scale_none_and_batch():
    r = t([1.0, 0.0, 1.0, 1.0])
    # Dr. GRPO: r - group mean only
    torch.testing.assert_close(group_advantages(r, 2, scale="none"), t([0.5, -0.5, 0.0, 0.0]))
    # batch std of (1, 0, 1, 1): mean .75, unbiased var .75/3 -> std 0.5; group-mean-centred / 0.5001
    torch.testing.assert_close(
        group_advantages(r, 2, scale="batch"), t([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0])
    )


def test_multiple_reward_functions_weighted_nansum():
    # weights (1, 2): row sums 1+1=2, 0+1=1, 1 (NaN entry skipped), unscorable (all NaN)
    # stats over (2, 1, 1): mean 4/3, devs (2/3, -1/3, -1/3), unbiased std sqrt((6/9)/2) = 0.5773503
    # advantages (2/3)/0.5774503 = 1.1545006, (-1/3)/0.5774503 = -0.5772503, ..., 0
    rewards = t([[1.0, 0.5], [0.0, 0.5], [1.0, NAN], [NAN, NAN]])
    adv = group_advantages(rewards, group_size=4, reward_weights=[1.0, 2.0])
    torch.testing.assert_close(adv, t([1.1545006, -0.5772503, -0.5772503, 0.0]), rtol=0, atol=1e-7)


def test_gdpo_normalize_then_sum():
    # Two rewards, groups of 2. Per reward, per group: (1,0) -> (+z, -z) with z = 0.5/(0.7071068+1e-4)
    # = 0.7070068; (1,1) -> (0, 0).
    #   r1 = (1,0 | 1,1) -> (+z,-z | 0,0);  r2 = (0,1 | 1,0) -> (-z,+z | +z,-z)
    #   sums = (0, 0, +z, -z); batch mean 0, unbiased std sqrt(2 z^2 / 3) = 0.5772686
    #   advantages (0, 0, +-z/(0.5772686+1e-4)) = (0, 0, +-1.2245327)
    rewards = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv = group_advantages(rewards, group_size=2, aggregation="normalize_then_sum")
    torch.testing.assert_close(adv, t([0.0, 0.0, 1.2245327, -1.2245327]), rtol=0, atol=1e-7)
    # GRPO on the same rewards sums first: (1, 1 | 2, 1) -> (0, 0 | +-0.7070068)
    adv = group_advantages(rewards, group_size=2)
    torch.testing.assert_close(adv, t([0.0, 0.0, 0.7070068, -0.7070068]), rtol=0, atol=1e-7)


def test_gdpo_unscorable_row_is_zero():
    rewards = t([[1.0, 0.0], [0.0, 1.0], [NAN, NAN], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    adv = group_advantages(rewards, group_size=3, aggregation="normalize_then_sum")
    assert torch.isfinite(adv).all() and adv[2] == 0


def test_group_stats():
    # rewards (1,1 | 0,1): mean .75, unbiased std .5; group stds (0, 0.7071) -> half the rows have zero std
    stats = group_stats(t([1.0, 1.0, 0.0, 1.0]), group_size=2)
    torch.testing.assert_close(stats["reward"], t(0.75))
    torch.testing.assert_close(stats["reward_std"], t(0.5))
    torch.testing.assert_close(stats["frac_reward_zero_std"], t(0.5))
    assert group_stats(t([1.0, 1.0, 0.0, 1.0]), 2, scale="none")["frac_reward_zero_std"] == 0.5
    # scale="batch" normalises by the batch std (0.5), which is not zero (TRL's definition)
    assert group_stats(t([1.0, 1.0, 0.0, 1.0]), 2, scale="batch")["frac_reward_zero_std"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": "global"}, "group, batch, none"),
        ({"std": "sample"}, "unbiased, population"),
        ({"aggregation": "mean"}, "sum_then_normalize, normalize_then_sum"),
        ({"group_size": 3}, "groups of 3"),
        ({"reward_weights": [1.0, 2.0]}, "1 entries"),
        ({"aggregation": "normalize_then_sum", "scale": "none"}, "scale must be 'group'"),
    ],
)
def test_advantage_argument_errors(kwargs, message):
    args = {"group_size": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        group_advantages(t([1.0, 0.0, 1.0, 1.0]), **args)


# ---------------------------------------------------------------------------------------------------------
# k3 and the clipped loss
# ---------------------------------------------------------------------------------------------------------


def test_k3_kl_values():
    # d = ref - logp; k3 = e^d - d - 1.  d=-1: e^-1 = 0.3678794;  d=+1: e - 2 = 0.7182818;  d=0: 0
    torch.testing.assert_close(
        k3_kl(t([-1.0, -2.0, -1.0]), t([-2.0, -1.0, -1.0])), t([0.3678794, 0.7182818, 0.0]), rtol=0, atol=1e-7
    )


# (ratio, advantage, epsilon_high, delta, expected loss, expected d loss / d logp)
# loss = -min(r A, clip(r, 0.8, 1 + eps_high) A); where the unclipped branch wins the gradient is -r A, else 0
CLIP_CASES = [
    (1.1, +1, None, None, -1.1, -1.1),  # inside the clip range
    (1.1, -1, None, None, 1.1, 1.1),
    (1.5, +1, None, None, -1.2, 0.0),  # above: clipped for A > 0
    (1.5, -1, None, None, 1.5, 1.5),  # above: A < 0 keeps the (pessimistic) unclipped term
    (0.5, +1, None, None, -0.5, -0.5),  # below: A > 0 keeps the unclipped term
    (0.5, -1, None, None, 0.8, 0.0),  # below: clipped for A < 0
    (1.25, +1, None, None, -1.2, 0.0),  # symmetric eps = 0.2 clips 1.25 ...
    (1.25, +1, 0.28, None, -1.25, -1.25),  # ... clip-higher (DAPO) lets it through
    (0.75, -1, 0.28, None, 0.8, 0.0),  # epsilon_high leaves the lower bound at 1 - 0.2
    (5.0, -1, None, None, 5.0, 5.0),  # no dual clip: loss grows with the ratio
    (5.0, -1, None, 3.0, 3.0, 0.0),  # dual clip caps it at delta = 3 (and stops the gradient)
    (5.0, +1, None, 3.0, -1.2, 0.0),  # delta changes nothing for A > 0
]


@pytest.mark.parametrize("ratio, adv, eps_high, delta, expected, grad", CLIP_CASES)
def test_clipped_loss_single_token(ratio, adv, eps_high, delta, expected, grad):
    logps = torch.full((1, 1), math.log(ratio), dtype=D, requires_grad=True)
    loss, metrics = policy_loss(
        logps, torch.zeros(1, 1, dtype=D), t([adv]), torch.ones(1, 1), epsilon_high=eps_high, delta=delta
    )
    loss.backward()
    torch.testing.assert_close(loss, t(expected))
    torch.testing.assert_close(logps.grad, t([[grad]]))
    # clip metrics: low = ratio < 0.8 with A < 0; high = ratio > 1 + eps_high with A > 0
    high = float(ratio > 1 + (eps_high or 0.2) and adv > 0)
    low = float(ratio < 0.8 and adv < 0)
    assert metrics["clip_ratio/high_mean"].item() == high
    assert metrics["clip_ratio/low_mean"].item() == low
    assert metrics["clip_ratio/region_mean"].item() == max(high, low)


MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "loss_type, expected_loss, expected_grad",
    [
        # ratio 1, A = (2, -1). grpo: -A_i / (n_i * B): -2/(2*2) = -0.5, 1/(1*2) = 0.5; loss -(2 - 1)/2
        ("grpo", -0.5, [[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0]]),
        # bnpo / dapo: -A_i / 3 tokens; loss -(2 + 2 - 1)/3 = -1
        ("bnpo", -1.0, [[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]),
        ("dapo", -1.0, [[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]),
        # dr_grpo with L = 4: -A_i / (B * L) = -2/8, 1/8; loss -(2 + 2 - 1)/8
        ("dr_grpo", -0.375, [[-0.25, -0.25, 0.0], [0.125, 0.0, 0.0]]),
    ],
)
@pytest.mark.parametrize("on_policy_as_none", [False, True])
def test_on_policy_gradient_is_minus_advantage_times_grad_logp(
    loss_type, expected_loss, expected_grad, on_policy_as_none
):
    logps = t([[-0.5, -1.5, -9.0], [-2.0, -7.0, -3.0]]).requires_grad_(True)
    old = None if on_policy_as_none else logps.detach()
    loss, metrics = policy_loss(
        logps, old, t([2.0, -1.0]), MASK, loss_type=loss_type, max_completion_length=4
    )
    loss.backward()
    torch.testing.assert_close(loss, t(expected_loss))
    torch.testing.assert_close(logps.grad, t(expected_grad))
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_sequence_level_ratio_gspo():
    # sequence 0: log-ratios (0.3, 0.1, [5.0 masked]) -> s = exp(0.2) = 1.2214028, one ratio for its tokens
    # sequence 1: log-ratio (0, [masked], [masked]) -> s = 1
    # A = (1, 1), eps = 0.2: s0 is clipped to 1.2 -> grpo loss = mean(-1.2, -1) = -1.1, no gradient for seq 0
    logps = t([[0.3, 0.1, 5.0], [0.0, 2.0, 2.0]]).requires_grad_(True)
    old = torch.zeros(2, 3, dtype=D)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, metrics = policy_loss(logps, old, t([1.0, 1.0]), mask, importance_sampling_level="sequence")
    loss.backward()
    torch.testing.assert_close(loss, t(-1.1))
    torch.testing.assert_close(logps.grad, t([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.0]]))
    # the clip fraction is per sequence: 1 of 2 sequences
    assert metrics["clip_ratio/high_mean"].item() == 0.5

    # epsilon_high = 0.3 keeps s0 = 1.2214028: loss = mean(-1.2214028, -1) = -1.1107014
    # d s0 / d logp_t = s0 / 2 for its two tokens, times -A / B = -1/2: -1.2214028 / 4 = -0.3053507
    logps.grad = None
    loss, metrics = policy_loss(
        logps, old, t([1.0, 1.0]), mask, importance_sampling_level="sequence", epsilon_high=0.3
    )
    loss.backward()
    torch.testing.assert_close(loss, t(-1.1107014), rtol=0, atol=1e-7)
    torch.testing.assert_close(
        logps.grad, t([[-0.3053507, -0.3053507, 0.0], [-0.5, 0.0, 0.0]]), rtol=0, atol=1e-7
    )
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def test_kl_penalty_and_metric():
    # A = 0, so only beta * k3 remains: k3(logp=-1, ref=-2) = e^-1 = 0.3678794; beta = 0.1 -> 0.0367879
    # Plain k3: d/dlogp of beta*k3 = beta * (1 - e^(ref - logp)) = 0.1 * (1 - 0.3678794) = 0.0632121
    logps = t([[-1.0]]).requires_grad_(True)
    loss, metrics = policy_loss(logps, None, t([0.0]), torch.ones(1, 1), ref_logps=t([[-2.0]]), beta=0.1,
                                use_bias_correction_kl=False)
    loss.backward()
    torch.testing.assert_close(loss, t(0.0367879), rtol=0, atol=1e-7)
    torch.testing.assert_close(logps.grad, t([[0.0632121]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(metrics["kl"], t(0.3678794), rtol=0, atol=1e-7)
    # With the ratio correction (the default, as TRL): w = exp(logp - sg(logp)) is 1 in value, so the loss and the
    # metric do not change, but the gradient gains beta * k3 * dw/dlogp = 0.0367879:
    # beta (1 - e^d) + beta (e^d - d - 1) = -beta d = beta (logp - ref) = 0.1, the exact gradient of
    # beta * KL(pi || ref) = beta E_pi[logp - ref] per sampled token (score-function form).
    logps.grad = None
    loss, metrics = policy_loss(logps, None, t([0.0]), torch.ones(1, 1), ref_logps=t([[-2.0]]), beta=0.1)
    loss.backward()
    torch.testing.assert_close(loss, t(0.0367879), rtol=0, atol=1e-7)
    torch.testing.assert_close(logps.grad, t([[0.1]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics["kl"], t(0.3678794), rtol=0, atol=1e-7)
    # Off-policy (old logp -1.5, so w = e^0.5): value and metric are w * k3.
    loss, metrics = policy_loss(logps, t([[-1.5]]), t([0.0]), torch.ones(1, 1), ref_logps=t([[-2.0]]), beta=0.1)
    torch.testing.assert_close(loss, t(math.exp(-1) * 0.1 * math.exp(0.5)), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, None, t([0.0]), torch.ones(1, 1), beta=0.1)


# ---------------------------------------------------------------------------------------------------------
# Aggregations and the global denominator
# ---------------------------------------------------------------------------------------------------------

PTL = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, 2.75),  # sequence means (1+2)/2 = 1.5 and 4/1 = 4, mean 2.75
        ("grpo", {"num_items": 4}, 1.375),  # (1.5 + 4) / 4
        ("bnpo", {}, 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("bnpo", {"num_items": 100}, 7 / 3),  # per micro-batch: num_items is ignored
        ("dr_grpo", {"max_completion_length": 4}, 0.875),  # 7 / (2 * 4)
        ("dr_grpo", {"num_items": 14}, 0.5),  # 7 / 14
        ("dapo", {}, 7 / 3),  # 7 / 3 tokens in this batch
        ("dapo", {"num_items": 10}, 0.7),  # 7 / 10 tokens in the whole step
    ],
)
def test_aggregation_values(loss_type, kwargs, expected):
    torch.testing.assert_close(AGGREGATIONS[loss_type](PTL, MASK.to(D), **kwargs), t(expected))


def test_grpo_aggregation_empty_sequence_counts_zero():
    # sequence 0 has no tokens: contributes 0 (not NaN); (0 + 4) / 2 = 2
    torch.testing.assert_close(AGGREGATIONS["grpo"](PTL, t([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])), t(2.0))


@pytest.mark.parametrize(
    "eps_max, adv, expected, grad",
    [
        # r = e^(-1 - (-1.5)) = e^0.5 = 1.648721 is above the cap 1.2: -1.2 * 2 * logp(-1) = 2.4, d/dlogp = -2.4
        (1.2, 2.0, 2.4, -2.4),
        # cap 5: the weight is r itself: 1.648721 * 2 = 3.297443 (value and minus the gradient)
        (5.0, 2.0, 3.297443, -3.297443),
        # negative advantage: the cap acts on the weight only, the sign comes from A: -1.2 * -1 * -1 = -1.2
        (1.2, -1.0, -1.2, 1.2),
    ],
)
def test_cispo_single_token(eps_max, adv, expected, grad):
    """CISPO: -sg(min(r, eps_max)) A logp. The weight is detached, so the gradient is -min(r, eps_max) A even
    where PPO's clip would have zeroed it."""
    logps = t([[-1.0]]).requires_grad_(True)
    loss, metrics = policy_loss(logps, t([[-1.5]]), t([adv]), torch.ones(1, 1), epsilon_high=eps_max, loss_type="cispo")
    loss.backward()
    torch.testing.assert_close(loss, t(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(logps.grad, t([[grad]]), rtol=0, atol=1e-6)
    assert metrics["cispo_clip_ratio"].item() == float(eps_max < 1.648721 and adv > 0)
    with pytest.raises(ValueError, match="cispo' needs epsilon_high"):
        policy_loss(logps, None, t([adv]), torch.ones(1, 1), loss_type="cispo")


def test_sapo_single_token_and_on_policy_gradient():
    """SAPO: -(4/tau) sigma(tau (r - 1)) A with r = e^0.5 = 1.648721.
    A = 2, tau_pos = 1: -8 sigma(0.648721) = -5.253778; d/dlogp = -8 sigma (1 - sigma) r = -2.973477.
    A = -1, tau_neg = 1.05: (4/1.05) sigma(0.681157) = 2.529512; d/dlogp = 4 sigma (1 - sigma) r = 1.471352.
    On-policy (r = 1) the gradient is the policy gradient -A, as for the clipped objective."""
    for adv, expected, grad in ((2.0, -5.253778, -2.973477), (-1.0, 2.529512, 1.471352)):
        logps = t([[-1.0]]).requires_grad_(True)
        loss, metrics = policy_loss(logps, t([[-1.5]]), t([adv]), torch.ones(1, 1), loss_type="sapo")
        loss.backward()
        torch.testing.assert_close(loss, t(expected), rtol=0, atol=1e-6)
        torch.testing.assert_close(logps.grad, t([[grad]]), rtol=0, atol=1e-6)
        assert "clip_ratio/region_mean" not in metrics
    logps = t([[-1.0, -2.0]]).requires_grad_(True)
    policy_loss(logps, None, t([0.7]), torch.ones(1, 2), loss_type="sapo")[0].backward()
    torch.testing.assert_close(logps.grad, t([[-0.35, -0.35]]), rtol=0, atol=1e-12)  # -A / 2 tokens (grpo mean)


def test_loss_types_pair_an_objective_with_an_aggregation():
    """cispo aggregates like dapo (token sum / the step's token count), sapo like grpo (sequence means)."""
    logps, old, _, mask, adv = _batch()
    cispo, _ = policy_loss(logps, old, adv, mask, epsilon_high=1.3, loss_type="cispo", num_items=20.0)
    per_token = -torch.clamp(torch.exp(logps - old), max=1.3) * adv[:, None] * logps
    torch.testing.assert_close(cispo, (per_token * mask).sum() / 20.0)
    sapo, _ = policy_loss(logps, old, adv, mask, loss_type="sapo")
    tau = torch.where(adv > 0, 1.0, 1.05)[:, None].to(D)
    per_token = -torch.sigmoid(tau * (torch.exp(logps - old) - 1)) * 4 / tau * adv[:, None]
    torch.testing.assert_close(sapo, ((per_token * mask).sum(-1) / mask.sum(-1)).mean())
    assert loss_denominator("cispo", MASK).item() == 3 and loss_denominator("sapo", MASK).item() == 2


def test_registry_and_unknown_loss_type():
    assert set(AGGREGATIONS) == {"grpo", "bnpo", "dr_grpo", "dapo"}
    assert LOSS_TYPES == {"grpo": ("clip", "grpo"), "bnpo": ("clip", "bnpo"), "dr_grpo": ("clip", "dr_grpo"),
                          "dapo": ("clip", "dapo"), "cispo": ("cispo", "dapo"), "sapo": ("sapo", "grpo")}
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo, cispo, sapo"):
        policy_loss(t([[0.0]]), None, t([1.0]), torch.ones(1, 1), loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(t([[0.0]]), None, t([1.0]), torch.ones(1, 1), loss_type="dr_grpo")


def test_loss_denominator():
    assert loss_denominator("grpo", MASK).item() == 2  # sequences
    assert loss_denominator("dr_grpo", MASK, max_completion_length=4).item() == 8  # sequences * L
    assert loss_denominator("dapo", MASK).item() == 3  # unmasked tokens
    assert loss_denominator("bnpo", MASK) is None


def _batch(seed=0, b=4, tt=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, tt, generator=g, dtype=D) * 3
    old = logps + torch.randn(b, tt, generator=g, dtype=D) * 0.3  # ratios both inside and outside the clip
    ref = logps + torch.randn(b, tt, generator=g, dtype=D) * 0.3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=D)
    adv = torch.randn(b, generator=g, dtype=D)
    return logps, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("micro", [4, 2, 1])  # 1 x 4, 2 x 2, 4 x 1 split of a batch of 4
def test_micro_batch_split_gives_same_loss_and_gradient(loss_type, level, micro):
    logps, old, ref, mask, adv = _batch()
    kw = {
        "ref_logps": ref,
        "beta": 0.04,
        "epsilon_high": 1.3 if loss_type == "cispo" else 0.28,
        "delta": 2.0,
        "importance_sampling_level": level,
        "loss_type": loss_type,
        "max_completion_length": 5,
    }

    whole = logps.clone().requires_grad_(True)
    full_loss, _ = policy_loss(whole, old, adv, mask, **kw)
    full_loss.backward()

    split = logps.clone().requires_grad_(True)
    chunks = [slice(i, i + micro) for i in range(0, 4, micro)]
    num_items = sum(loss_denominator(loss_type, mask[c], max_completion_length=5) for c in chunks)
    total = 0.0
    for c in chunks:
        part, _ = policy_loss(
            split[c], old[c], adv[c], mask[c], **(kw | {"ref_logps": ref[c]}), num_items=num_items
        )
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full_loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, rtol=0, atol=1e-12)


def test_bnpo_is_per_micro_batch():
    # bnpo normalises by this micro-batch's tokens, so with unequal token counts two halves averaged do not
    # equal the whole batch: documented behaviour, not a global-denominator loss.
    logps, old, _ref, mask, adv = _batch()
    full, _ = policy_loss(logps, old, adv, mask, loss_type="bnpo")
    halves = [
        policy_loss(logps[s], old[s], adv[s], mask[s], loss_type="bnpo")[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert not torch.allclose(full, (halves[0] + halves[1]) / 2)
