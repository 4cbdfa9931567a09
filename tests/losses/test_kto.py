"""KTO loss, KL reference point and class-balance warning, against hand-computed numbers."""

import pytest
import torch

from posttrain.losses.kto import desirable_ratio_warning, kl_estimate, kto_loss

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# log-ratios r = policy - ref = (2, -3, -3); labels (desirable, undesirable, desirable)
POLICY = t([-10.0, -20.0, -13.0])
REF = t([-12.0, -17.0, -10.0])
LABELS = torch.tensor([True, False, True])


def test_kto_hand_values():
    # beta = 0.1, z0 = 0.5
    # row 0 desirable   r=2:  1 - sigmoid(0.1 * (2 - 0.5))  = 1 - sigmoid(0.15)  = 0.4625702
    # row 1 undesirable r=-3: 1 - sigmoid(0.1 * (0.5 + 3))  = 1 - sigmoid(0.35)  = 0.4133824
    # row 2 desirable   r=-3: 1 - sigmoid(0.1 * (-3 - 0.5)) = 1 - sigmoid(-0.35) = 0.5866176
    out = kto_loss(POLICY, REF, LABELS, t(0.5), beta=0.1)
    torch.testing.assert_close(out.losses, t([0.4625702, 0.4133824, 0.5866176]), rtol=0, atol=1e-7)
    # rewards are beta * r, split by label in input order
    torch.testing.assert_close(out.chosen_rewards, t([0.2, -0.3]))
    torch.testing.assert_close(out.rejected_rewards, t([-0.3]))


def test_kto_zero_reference_point():
    # z0 = 0: desirable r=2 -> 1 - sigmoid(0.2) = 0.4501660; undesirable r=2 -> 1 - sigmoid(-0.2) = 0.5498340
    out = kto_loss(t([2.0, 2.0]), t([0.0, 0.0]), torch.tensor([1, 0]), 0.0, beta=0.1)
    torch.testing.assert_close(out.losses, t([0.4501660, 0.5498340]), rtol=0, atol=1e-7)


def test_kto_class_weights():
    # desirable_weight 2, undesirable_weight 0.5 scale the rows of test_kto_hand_values:
    # 2 * 0.4625702 = 0.9251403, 0.5 * 0.4133824 = 0.2066912, 2 * 0.5866176 = 1.1732352
    out = kto_loss(POLICY, REF, LABELS, 0.5, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(out.losses, t([0.9251403, 0.2066912, 1.1732352]), rtol=0, atol=1e-7)


def test_kto_gradient_and_detached_reference_point():
    # d/dpolicy of 1 - sigmoid(beta (r - z0)) = -beta * s (1 - s), s = sigmoid(0.15) = 0.5374298
    # -> -0.1 * 0.5374298 * 0.4625702 = -0.0248599
    policy = t([-10.0]).requires_grad_(True)
    z0 = t(0.5).requires_grad_(True)
    out = kto_loss(policy, t([-12.0]), torch.tensor([True]), z0, beta=0.1)
    out.losses.sum().backward()
    torch.testing.assert_close(policy.grad, t([-0.0248599]), rtol=0, atol=1e-7)
    assert z0.grad is None  # z0 is a constant of the loss
    assert not out.chosen_rewards.requires_grad


def test_kto_metrics_partition_labels():
    out = kto_loss(POLICY, REF, LABELS, t(0.5), beta=0.1)
    m = out.metrics
    assert m["count/chosen"].item() == 2 and m["count/rejected"].item() == 1
    torch.testing.assert_close(m["rewards/chosen_sum"], t(-0.1))  # 0.2 - 0.3
    torch.testing.assert_close(m["rewards/rejected_sum"], t(-0.3))
    torch.testing.assert_close(m["logps/chosen_sum"], t(-23.0))  # -10 - 13
    torch.testing.assert_close(m["logps/rejected_sum"], t(-20.0))
    torch.testing.assert_close(m["kl"], t(0.5))


def test_kto_single_class_batch():
    out = kto_loss(t([1.0, 2.0]), t([0.0, 0.0]), torch.tensor([False, False]), 0.0)
    assert out.chosen_rewards.numel() == 0 and out.losses.shape == (2,)
    assert out.metrics["count/chosen"].item() == 0


def test_kl_estimate_mean_and_clamp():
    # diffs (1, 2) -> mean 1.5
    torch.testing.assert_close(kl_estimate(t([-1.0, -1.0]), t([-2.0, -3.0])), t(1.5))
    # diffs (1, 0, -1) -> mean 0
    torch.testing.assert_close(kl_estimate(t([-1.0, -2.0, -3.0]), t([-2.0, -2.0, -2.0])), t(0.0))
    # diff -1 -> clamped at 0
    torch.testing.assert_close(kl_estimate(t([-5.0]), t([-4.0])), t(0.0))
    policy = t([-1.0]).requires_grad_(True)
    assert not kl_estimate(policy, t([-2.0])).requires_grad
    assert kl_estimate(t([]), t([])).item() == 0.0


def test_desirable_ratio_warning():
    assert desirable_ratio_warning(1, 1) is None  # ratio 1
    assert desirable_ratio_warning(4, 3) is None  # ratio 4/3, the upper edge
    assert desirable_ratio_warning(1, 2, desirable_weight=2.0) is None  # (2*1)/(1*2) = 1
    text = desirable_ratio_warning(3, 2)  # 1.5 > 4/3
    # fix either weight: desirable_weight in [2/3, 8/9] or undesirable_weight in [1.125, 1.5]
    assert "1.500" in text and "[0.667, 0.889]" in text and "[1.125, 1.500]" in text
    assert "0.500" in desirable_ratio_warning(1, 2)  # 0.5 < 1
    assert desirable_ratio_warning(0, 5) is not None


def test_apo_zero_unpaired_hand_values():
    """TRL's KTO loss_type="apo_zero_unpaired": desirable 1 - sigma(beta r), undesirable sigma(beta r), no z0.
    r = (-10 + 12, -10 + 9) = (2, -1), beta 0.5: 1 - sigma(1) = 0.268941; sigma(-0.5) = 0.377541, then the
    class weights 2 and 3. The reference point is not read: kl=5 changes nothing."""
    out = kto_loss(t([-10.0, -10.0]), t([-12.0, -9.0]), torch.tensor([True, False]), kl=5.0, beta=0.5,
                   desirable_weight=2.0, undesirable_weight=3.0, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(out.losses, t([2 * 0.2689414, 3 * 0.3775407]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, t([1.0]))  # beta * r, as for kto
    with pytest.raises(ValueError, match="unknown KTO loss_type 'bco'"):
        kto_loss(t([-1.0]), t([-1.0]), torch.tensor([True]), 0.0, loss_type="bco")
