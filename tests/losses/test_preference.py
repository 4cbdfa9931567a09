"""Preference losses against hand-computed numbers.

The running example (from the issue), one pair, beta = 0.1:
    policy    chosen -15.3  rejected -12.8      completion lengths: chosen 10, rejected 8
    reference chosen -16.1  rejected -12.5
    log-ratios c = -15.3 + 16.1 = 0.8,  r = -12.8 + 12.5 = -0.3,  h = c - r = 1.1,  beta h = 0.11
    rewards: beta c = 0.08, beta r = -0.03
Useful values: -log sigma(0.11) = ln(1 + e^-0.11) = ln(1.895834) = 0.639659   (the issue rounds to 0.64)
               -log sigma(-0.11) = 0.639659 + 0.11 = 0.749659
Expected values below are written out with `math` as TRL's formulas read, not by calling the code.
"""

import math

import pytest
import torch

from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    LossTerm,
    PreferenceLossOutput,
    cpo_loss,
    ld_logps,
    orpo_loss,
    preference_loss,
    register_preference_loss,
    simpo_loss,
    wpo_weights,
)

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def example(**overrides):
    """The running example as keyword arguments for preference_loss."""
    kw = {
        "chosen_logps": t(-15.3),
        "rejected_logps": t(-12.8),
        "ref_chosen_logps": t(-16.1),
        "ref_rejected_logps": t(-12.5),
        "chosen_lengths": torch.tensor([10]),
        "rejected_lengths": torch.tensor([8]),
        "beta": 0.1,
    }
    kw.update(overrides)
    return kw


def run(loss_type, **overrides):
    return preference_loss(loss_type, **example(**overrides))


def test_worked_example_from_issue():
    out = run("sigmoid")
    assert isinstance(out, PreferenceLossOutput)
    assert out.chosen_rewards.item() == pytest.approx(0.08)  # 0.1 * (-15.3 + 16.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.03)  # 0.1 * (-12.8 + 12.5)
    assert out.losses.item() == pytest.approx(0.639659, abs=1e-6)  # -log sigma(0.1 * 1.1)
    assert out.losses.requires_grad is False  # inputs here do not require grad
    assert not out.chosen_rewards.requires_grad


Z = 0.11  # beta * h of the running example
# name, extra options, expected per-example loss (hand formula in the comment)
SINGLE_PAIR_CASES = [
    ("sigmoid", {}, 0.639659),  # -log sigma(0.11)
    ("sigmoid", {"label_smoothing": 0.1}, 0.650659),  # 0.9 * 0.639659 + 0.1 * 0.749659
    ("hinge", {}, 0.89),  # relu(1 - 0.11)
    ("hinge", {"slic_delta": 0.05}, 0.0),  # relu(0.05 - 0.11)
    ("hinge", {"slic_delta": 2.0}, 1.89),  # relu(2 - 0.11)
    # per-token log-ratios: 0.8/10 - (-0.3/8) = 0.08 + 0.0375 = 0.1175; (0.1175 - 1/(2*0.1))^2 = 4.8825^2
    ("ipo", {}, 23.83880625),
    # eps = 1e-3: sigma(.11)(log sigma(.11) - log(.999)) + sigma(-.11)(log sigma(-.11) - log(.001))
    #           = 0.527472 (-0.639659 + 0.001001) + 0.472528 (-0.749659 + 6.907755) = 2.572996
    ("exo_pair", {"label_smoothing": 1e-3}, 2.5729965),
    # -log sigma(0.08) - 0.5 log sigma(-0.08) - 0.5 log sigma(0.03) = 0.653947 + 0.366973 + 0.339130
    ("nca_pair", {}, 1.3600503),
    # (0.9 * 0.639659 - 0.1 * 0.749659) / 0.8
    ("robust", {"label_smoothing": 0.1}, 0.6259089),
    ("robust", {}, 0.639659),  # eps = 0 is DPO
    # -log sigma(0.08) - log sigma(0.03) = 0.653947 + 0.678260
    ("bco_pair", {}, 1.3322066),
    # delta = 0.2: -log sigma(0.08 - 0.2) - log sigma(-(-0.03 - 0.2)) = -log sigma(-0.12) - log sigma(0.23)
    ("bco_pair", {"bco_delta": 0.2}, -log_sigmoid(-0.12) - log_sigmoid(0.23)),
    ("sppo_hard", {}, 39.73),  # (0.8 - 5)^2 + (-0.3 + 5)^2 = 17.64 + 22.09
    ("apo_zero", {}, 0.9725112),  # 1 - sigma(0.08) + sigma(-0.03) = 1 - 0.519989 + 0.492501
    ("apo_down", {}, 0.9925170),  # sigma(0.08) + 1 - sigma(0.11) = 0.519989 + 1 - 0.527472
    # forward KL h = -e^-0.8 + e^0.3 = 0.900530: relu(1 - 0.0900530)
    ("hinge", {"f_divergence": "forward_kl"}, 0.9099470),
    # m = sigma(0.11 / 0.05) = sigma(2.2) = 0.900250; (1 - m) * 0.639659 + m * e^-0.11 (= 0.895834)
    ("discopop", {}, 0.8702805),
    # tau = 1: m = sigma(0.11) = 0.527472
    ("discopop", {"discopop_tau": 1.0}, (1 - sigmoid(0.11)) * 0.639659 + sigmoid(0.11) * math.exp(-0.11)),
    ("sigmoid_norm", {}, 0.6872894),  # -log sigma(0.1 * 0.1175)
    ("sft", {}, 1.53),  # 15.3 / 10
    # averages: -15.3/10 = -1.53, -12.8/8 = -1.6; pure SimPO: -log sigma(0.1 * 0.07 - 0.5) = -log sigma(-0.493)
    ("simpo", {"cpo_alpha": 0.0}, 0.9697255),
    ("simpo", {}, 0.9697255 + 1.53),  # TRL default cpo_alpha = 1 adds the chosen NLL 1.53
    ("simpo", {"cpo_alpha": 0.0, "simpo_gamma": 0.0}, -log_sigmoid(0.007)),
    # -log sigma(0.1 * (-15.3 + 12.8)) + 1.0 * 1.53 = -log sigma(-0.25) + 1.53 = 0.825939 + 1.53
    ("cpo", {}, 2.3559394),
    ("cpo", {"cpo_alpha": 0.0}, 0.8259394),
    # log_odds = 0.07 - (log(1 - e^-1.53) - log(1 - e^-1.6)) = 0.07 - (-0.244030 + 0.225517) = 0.088513
    # loss = 1.53 - 0.1 * log sigma(0.088513) = 1.53 + 0.1 * 0.649870
    ("orpo", {}, 1.5949870),
]


@pytest.mark.parametrize("name, options, expected", SINGLE_PAIR_CASES)
def test_single_pair_values(name, options, expected):
    out = run(name, **options)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)


def test_every_registered_name_has_a_value_test():
    assert {name for name, _, _ in SINGLE_PAIR_CASES} | {"aot", "aot_unpaired"} == set(PREFERENCE_LOSSES)
    assert REFERENCE_FREE_LOSSES == {"simpo", "cpo", "orpo", "sft"}


def test_aot_sorts_margins_across_the_batch():
    """Two pairs. Pair 1 is the running example; pair 2: policy -16 / -11, reference -16 / -10.5.
    aot: policy margins [-2.5, -5] sort to [-5, -2.5]; reference margins [-3.6, -5.5] sort to [-5.5, -3.6];
         deltas [0.5, 1.1] -> [-log sigma(0.05), -log sigma(0.11)] = [0.668460, 0.639659]
         (pairing unsorted would give [1.1, 0.5], sorting one side only [-1.4, 3.0] or [3.0, -1.4]).
    aot_unpaired: chosen log-ratios [0.8, 0] sort to [0, 0.8]; rejected [-0.3, -0.5] to [-0.5, -0.3];
         deltas [0.5, 1.1] -> the same two values (one side sorted only: [0.3, 1.3] or [1.3, 0.3])."""
    kw = {
        "chosen_logps": t(-15.3, -16.0),
        "rejected_logps": t(-12.8, -11.0),
        "ref_chosen_logps": t(-16.1, -16.0),
        "ref_rejected_logps": t(-12.5, -10.5),
        "beta": 0.1,
    }
    expected = t(0.6684596, 0.6396589)
    torch.testing.assert_close(preference_loss("aot", **kw).losses, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(preference_loss("aot_unpaired", **kw).losses, expected, atol=1e-6, rtol=0)
    # label smoothing 0.1 on the first ranked pair: 0.9 * (-log sigma(0.05)) + 0.1 * (-log sigma(-0.05))
    smoothed = preference_loss("aot", label_smoothing=0.1, **kw).losses[0].item()
    assert smoothed == pytest.approx(0.6734596, abs=1e-6)


def test_reference_free_rewards_are_the_losses_own():
    # simpo / orpo: beta * average log-prob; cpo: beta * summed log-prob (TRL's CPO/ORPO trainers)
    for name in ("simpo", "orpo"):
        out = run(name)
        assert out.chosen_rewards.item() == pytest.approx(-0.153)  # 0.1 * -15.3 / 10
        assert out.rejected_rewards.item() == pytest.approx(-0.16)  # 0.1 * -12.8 / 8
    out = run("cpo")
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.53, -1.28))
    # reference-free losses run without a reference
    out = preference_loss("simpo", **example(ref_chosen_logps=None, ref_rejected_logps=None))
    assert out.losses.item() == pytest.approx(0.9697255 + 1.53, abs=1e-6)


def test_orpo_metrics_and_trl_formula():
    """TRL's odds_ratio_loss written out: log_odds = (a_w - a_l) - (log1p(-exp(a_w)) - log1p(-exp(a_l)));
    ratio = logsigmoid(log_odds); loss = nll - beta * ratio; logs mean(ratio) as log_odds_ratio and
    mean(log_odds) as log_odds_chosen."""
    chosen, rejected = t(-15.3, -3.0), t(-12.8, -9.0)
    lc, lr = torch.tensor([10, 4]), torch.tensor([8, 3])
    out = orpo_loss(chosen, rejected, lc, lr, beta=0.25)
    for i in range(2):
        aw, al = chosen[i].item() / lc[i].item(), rejected[i].item() / lr[i].item()
        lo = (aw - al) - (math.log1p(-math.exp(aw)) - math.log1p(-math.exp(al)))
        assert out.metrics["log_odds_chosen"][i].item() == pytest.approx(lo, abs=1e-12)
        assert out.metrics["log_odds_ratio"][i].item() == pytest.approx(log_sigmoid(lo), abs=1e-12)
        assert out.metrics["nll_loss"][i].item() == pytest.approx(-aw, abs=1e-12)
        assert out.losses[i].item() == pytest.approx(-aw - 0.25 * log_sigmoid(lo), abs=1e-12)
    assert out.metrics["log_odds_chosen"][0].item() == pytest.approx(0.0885127, abs=1e-6)  # as in the table


def test_orpo_is_finite_when_a_completion_is_certain():
    # average log-prob exactly 0 would give log(1 - e^0) = -inf; it is capped at -eps instead
    c = t(0.0, -2.0).requires_grad_()
    out = orpo_loss(c, t(-3.0, -3.0), torch.tensor([4, 4]), torch.tensor([3, 3]))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(c.grad).all()


def test_wrappers_match_the_dispatcher():
    kw = example()
    a = simpo_loss(
        kw["chosen_logps"],
        kw["rejected_logps"],
        kw["chosen_lengths"],
        kw["rejected_lengths"],
        beta=0.1,
        simpo_gamma=0.3,
        cpo_alpha=0.0,
    )
    b = run("simpo", simpo_gamma=0.3, cpo_alpha=0.0)
    torch.testing.assert_close(a.losses, b.losses)
    # -log sigma(0.1 * 0.07 - 0.3) = -log sigma(-0.293)
    assert a.losses.item() == pytest.approx(-log_sigmoid(-0.293), abs=1e-12)
    c = cpo_loss(kw["chosen_logps"], kw["rejected_logps"], kw["chosen_lengths"], cpo_alpha=0.5)
    assert c.losses.item() == pytest.approx(0.8259394 + 0.5 * 1.53, abs=1e-6)
    assert c.metrics["nll_loss"].item() == pytest.approx(1.53)
    assert cpo_loss(kw["chosen_logps"], kw["rejected_logps"], cpo_alpha=0.0).losses.item() == pytest.approx(
        0.8259394, abs=1e-6
    )


# ---------------------------------------------------------------- f-divergences


def test_f_divergence_values():
    """Scores replace the log-ratios c = 0.8, r = -0.3 (TRL >= 1.0):
    forward_kl: -e^-0.8 + e^0.3 = -0.449329 + 1.349859 = 0.900530 -> -log sigma(0.0900530) = 0.649134
    js:         log sigma(0.8) - log sigma(-0.3) = -0.371101 + 0.854355 = 0.483255 -> 0.669276
    alpha 0.5:  (e^(-0.5*0.8) - e^(0.5*0.3)) / (-0.5) = (0.670320 - 1.161834) / -0.5 = 0.983028 -> 0.645203"""
    assert run("sigmoid", f_divergence="forward_kl").losses.item() == pytest.approx(0.6491340, abs=1e-6)
    assert run("sigmoid", f_divergence="js_divergence").losses.item() == pytest.approx(0.6692763, abs=1e-6)
    assert run("sigmoid", f_divergence="alpha_divergence").losses.item() == pytest.approx(0.6452032, abs=1e-6)


def test_alpha_divergence_limits():
    torch.manual_seed(0)
    c, r = torch.randn(6, dtype=D) * 3 - 20, torch.randn(6, dtype=D) * 3 - 20
    rc, rr = c + torch.randn(6, dtype=D), r + torch.randn(6, dtype=D)
    kw = {"ref_chosen_logps": rc, "ref_rejected_logps": rr, "beta": 0.5}
    reverse = preference_loss("sigmoid", c, r, **kw).losses
    forward = preference_loss("sigmoid", c, r, f_divergence="forward_kl", **kw).losses
    alpha = lambda a: (
        preference_loss("sigmoid", c, r, f_divergence="alpha_divergence", f_alpha=a, **kw).losses
    )
    # expm1((a-1)x)/(a-1) = x + (a-1) x^2/2 + ...: the difference to reverse KL shrinks linearly in (1 - a)
    assert (alpha(1 - 1e-3) - reverse).abs().max() < 1e-3
    assert (alpha(1 - 1e-5) - reverse).abs().max() < 1e-5
    torch.testing.assert_close(alpha(1.0), reverse)  # exactly 1: TRL's reverse-KL fallback
    torch.testing.assert_close(alpha(0.0), forward)  # a = 0: expm1(-x)/(-1) = forward KL's 1 - exp(-x)
    # TRL 0.x parametrised by the paper's alpha' = 1 - a: logits = (exp(-a' r) - exp(-a' c)) / a'
    a_paper = 0.3
    cl, rl = c - rc, r - rr
    trl0 = -torch.nn.functional.logsigmoid(
        0.5 * (torch.exp(-a_paper * rl) - torch.exp(-a_paper * cl)) / a_paper
    )
    torch.testing.assert_close(alpha(1 - a_paper), trl0)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_have_no_length_preference_at_the_reference(name, f_divergence):
    """At the reference policy (every log-ratio 0) the score f'(1) is 0 under every divergence, so a loss that
    divides each side by its length sees the same zero margin as DPO, whatever the lengths (10 vs 3 tokens). With
    f'(1) = k != 0 the margin would be k (1/10 - 1/3), a push towards one length before any learning."""
    zero = t(-5.0, -7.0)
    kw = dict(ref_chosen_logps=zero, ref_rejected_logps=zero, chosen_lengths=t(10, 10), rejected_lengths=t(3, 3))
    reverse = preference_loss(name, zero, zero, **kw).losses
    other = preference_loss(name, zero, zero, f_divergence=f_divergence, **kw).losses
    torch.testing.assert_close(other, reverse, rtol=0, atol=1e-15)
    # Away from the reference the scores differ from the log-ratios (the divergence does something).
    moved = preference_loss(name, zero + 0.5, zero - 0.5, f_divergence=f_divergence, **kw).losses
    assert (moved - preference_loss(name, zero + 0.5, zero - 0.5, **kw).losses).abs().min() > 1e-4


# ---------------------------------------------------------------- gradients and limits

PAIRWISE = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "cpo",
    "orpo",
]


@pytest.mark.parametrize("name", PAIRWISE + ["apo_down"])
def test_gradient_signs(name):
    """At the running example every pairwise loss falls when chosen log-prob rises (except apo_down, which
    lowers the chosen likelihood by design) and rises with the rejected log-prob."""
    c, r = t(-15.3).requires_grad_(), t(-12.8).requires_grad_()
    options = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    out = preference_loss(name, **example(chosen_logps=c, rejected_logps=r, **options))
    out.losses.sum().backward()
    if name != "apo_down":
        assert c.grad.item() < 0
    assert r.grad.item() > 0


def test_sigmoid_gradient_value():
    # d/dc -log sigma(beta h) = -beta (1 - sigma(0.11)) = -0.1 * 0.472528
    c, r = t(-15.3).requires_grad_(), t(-12.8).requires_grad_()
    run("sigmoid", chosen_logps=c, rejected_logps=r).losses.sum().backward()
    assert c.grad.item() == pytest.approx(-0.0472528, abs=1e-7)
    assert r.grad.item() == pytest.approx(0.0472528, abs=1e-7)


def test_sft_gradient_is_minus_one_over_length():
    c, r = t(-15.3).requires_grad_(), t(-12.8).requires_grad_()
    run("sft", chosen_logps=c, rejected_logps=r).losses.sum().backward()
    assert c.grad.item() == pytest.approx(-0.1)  # d(-c/10)/dc
    assert r.grad is None  # the rejected completion plays no part


def test_robust_with_zero_flip_rate_is_dpo():
    torch.manual_seed(1)
    c, r, rc, rr = (torch.randn(8, dtype=D) - 10 for _ in range(4))
    a = preference_loss("robust", c, r, rc, rr, beta=0.3).losses
    b = preference_loss("sigmoid", c, r, rc, rr, beta=0.3).losses
    torch.testing.assert_close(a, b)


def test_simpo_without_margin_is_reference_free_dpo_on_averages():
    """gamma = 0, cpo_alpha = 0: -log sigma(beta (c/L - r/L)) = DPO on average log-probs with a zero reference."""
    torch.manual_seed(2)
    c, r = torch.randn(5, dtype=D) - 20, torch.randn(5, dtype=D) - 20
    lengths = torch.full((5,), 7)
    simpo = preference_loss(
        "simpo",
        c,
        r,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
        beta=2.0,
        simpo_gamma=0.0,
        cpo_alpha=0.0,
    ).losses
    zeros = torch.zeros(5, dtype=D)
    dpo = preference_loss("sigmoid", c / 7, r / 7, zeros, zeros, beta=2.0).losses
    torch.testing.assert_close(simpo, dpo)


# ---------------------------------------------------------------- combinations and weights


def test_list_loss_is_weighted_sum_of_singles():
    """MPO: 0.8 * sigmoid + 0.2 * bco_pair + 1.0 * sft = 0.8*0.639659 + 0.2*1.332207 + 1.53 = 2.3281683"""
    out = run(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert out.losses.item() == pytest.approx(0.8 * 0.6396589 + 0.2 * 1.3322066 + 1.53, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.08)  # from the first term
    assert out.metrics["bco_pair_loss"].item() == pytest.approx(1.3322066, abs=1e-6)
    assert out.metrics["nll_loss"].item() == pytest.approx(1.53)
    # default weights are 1; order decides whose rewards are reported
    out = run(["simpo", "sigmoid"], cpo_alpha=0.0)
    assert out.losses.item() == pytest.approx(0.9697255 + 0.6396589, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-0.153)


def test_rpo_alpha_adds_the_chosen_nll():
    out = run("sigmoid", rpo_alpha=0.5)
    assert out.losses.item() == pytest.approx(0.6396589 + 0.5 * 1.53, abs=1e-6)
    assert out.metrics["nll_loss"].item() == pytest.approx(1.53)
    assert out.chosen_rewards.item() == pytest.approx(0.08)


def test_per_example_weights_and_wpo_weights():
    # a_w + a_l = -0.5 - 0.7 = -1.2 -> e^-1.2 = 0.301194; 0.4 + 0.1 = 0.5 > 0 -> clamped to e^0 = 1
    w = wpo_weights(t(-0.5, 0.4), t(-0.7, 0.1))
    torch.testing.assert_close(w, t(math.exp(-1.2), 1.0))
    kw = example(
        chosen_logps=t(-15.3, -15.3),
        rejected_logps=t(-12.8, -12.8),
        ref_chosen_logps=t(-16.1, -16.1),
        ref_rejected_logps=t(-12.5, -12.5),
        chosen_lengths=torch.tensor([10, 10]),
        rejected_lengths=torch.tensor([8, 8]),
    )
    out = preference_loss("sigmoid", weights=w, rpo_alpha=1.0, **kw)
    # the weight multiplies the whole per-example loss, NLL included (as TRL)
    torch.testing.assert_close(out.losses, (0.6396589 + 1.53) * t(math.exp(-1.2), 1.0), atol=1e-6, rtol=0)


def test_ld_logps():
    """Row 1: completion tokens -1 -2 -3 -4, paired completion has 2 tokens, alpha 0.5:
        (-1 - 2) + 0.5 * (-3 - 4) = -6.5
    Row 2: a prompt token (mask 0, log-prob -9 ignored) then completion -1 -2; paired length 5 > 2:
        plain sum -3 (the length counts completion tokens only)."""
    logps = t(-1, -2, -3, -4).unsqueeze(0).repeat(2, 1)
    logps[1] = t(-9, -1, -2, 0)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    out = ld_logps(logps, mask, torch.tensor([2, 5]), 0.5)
    torch.testing.assert_close(out, t(-6.5, -3.0))
    torch.testing.assert_close(ld_logps(logps, mask, torch.tensor([2, 5]), 1.0), t(-10.0, -3.0))
    torch.testing.assert_close(ld_logps(logps, mask, torch.tensor([0, 1]), 0.0), t(0.0, -1.0))
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_logps(logps, mask, torch.tensor([2, 5]), 1.5)


def test_losses_are_differentiable_rewards_detached():
    c = t(-15.3).requires_grad_()
    for name in PREFERENCE_LOSSES:
        options = {"label_smoothing": 0.1} if name == "exo_pair" else {}
        out = run(name, chosen_logps=c, **options)
        assert out.losses.requires_grad, name
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad, name
        assert all(not v.requires_grad for v in out.metrics.values()), name


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "loss_type, options, message",
    [
        ("dpo", {}, "unknown preference loss.*valid names.*sigmoid"),
        (["sigmoid", "nope"], {}, "unknown preference loss"),
        ([], {}, "empty"),
        ("hinge", {"label_smoothing": 0.1}, "'label_smoothing' is not used by loss \\['hinge'\\]"),
        ("aot", {"f_divergence": "js_divergence"}, "'f_divergence' is not used"),
        ("apo_down", {"f_divergence": "js_divergence"}, "'f_divergence' is not used by loss \\['apo_down'\\].*"
         "chosen-minus-rejected"),
        ("nca_pair", {"f_divergence": "forward_kl"}, "'f_divergence' is not used"),
        ("bco_pair", {"f_divergence": "alpha_divergence"}, "'f_divergence' is not used"),
        ("sppo_hard", {"f_divergence": "js_divergence"}, "'f_divergence' is not used"),
        ("apo_zero", {"f_divergence": "forward_kl"}, "'f_divergence' is not used"),
        ("simpo", {"f_divergence": "forward_kl"}, "'f_divergence' is not used"),
        ("sigmoid", {"f_divergence": "chi2"}, "unknown f_divergence"),
        ("sigmoid", {"f_alpha": 0.3}, "f_alpha=0.3 is only read with f_divergence='alpha_divergence'"),
        ("sigmoid", {"simpo_gamma": 1.0}, "'simpo_gamma' is not used.*losses that use it: \\['simpo'\\]"),
        ("sigmoid", {"gamma": 1.0}, "unknown loss option"),
        ("sigmoid", {"ref_chosen_logps": None}, "needs ref_chosen_logps"),
        ("ipo", {"chosen_lengths": None}, "needs chosen_lengths"),
        ("orpo", {"rejected_lengths": None}, "needs rejected_lengths"),
        ("sigmoid", {"rpo_alpha": 1.0, "chosen_lengths": None}, "needs chosen_lengths"),
        ("cpo", {"chosen_lengths": None}, "cpo_alpha != 0 needs chosen_lengths"),
        (["sigmoid", "sft"], {"loss_weights": [1.0]}, "loss_weights has 1 entries for 2"),
        ("robust", {"label_smoothing": 0.5}, "robust needs label_smoothing"),
        ("exo_pair", {}, "exo_pair needs label_smoothing in \\(0, 1\\)"),
        ("sigmoid", {"chosen_logps": t(-1.0, -2.0)}, "must both be \\[B\\]"),
    ],
)
def test_errors(loss_type, options, message):
    with pytest.raises(ValueError, match=message):
        run(loss_type, **options)


def test_option_used_by_one_term_of_a_list_is_accepted():
    # label smoothing is read by sigmoid (cDPO) even though bco_pair and sft ignore it
    out = run(["sigmoid", "bco_pair", "sft"], label_smoothing=0.1)
    assert out.metrics["sigmoid_loss"].item() == pytest.approx(0.6506589, abs=1e-6)


def test_registry_declares_lengths_and_refuses_a_second_registration():
    both = ("chosen", "rejected")
    declared = {name: fn.lengths for name, fn in PREFERENCE_LOSSES.items() if fn.lengths}
    assert declared == {"ipo": both, "sigmoid_norm": both, "simpo": both, "orpo": both, "sft": ("chosen",)}
    assert {name for name, fn in PREFERENCE_LOSSES.items() if fn.reference_free} == REFERENCE_FREE_LOSSES
    for name in ("sigmoid", "sft"):
        with pytest.raises(ValueError, match=f"preference loss '{name}' is already registered"):
            register_preference_loss(name)(lambda x: None)
    with pytest.raises(ValueError, match="not completion sides"):
        register_preference_loss("mine", lengths=("prompt",))(lambda x: None)
    # A new entry declares its needs once, and preference_loss checks them (no list kept anywhere else).
    try:

        @register_preference_loss("_probe", lengths=("rejected",), reference_free=True)
        def _probe(x):  # -logp_w / |y_l|: reads the rejected length only
            n = x.rejected_lengths.to(x.chosen_logps.dtype)
            return LossTerm(-x.chosen_logps / n, x.chosen_logps.detach(), x.rejected_logps.detach(), {})

        free = {"ref_chosen_logps": None, "ref_rejected_logps": None}
        assert run("_probe", **free).losses.item() == pytest.approx(15.3 / 8)
        assert run("_probe", **free, chosen_lengths=None).losses.item() == pytest.approx(15.3 / 8)
        with pytest.raises(ValueError, match=r"loss \['_probe'\] needs rejected_lengths"):
            run("_probe", **free, rejected_lengths=None)
    finally:
        PREFERENCE_LOSSES.pop("_probe", None)
        REFERENCE_FREE_LOSSES.discard("_probe")
