"""Bradley-Terry reward-model loss against hand-computed numbers."""

import pytest
import torch

from posttrain.losses.reward import bradley_terry_loss

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


CHOSEN = t([1.0, 0.5, 2.0])
REJECTED = t([0.0, 1.0, 2.0])  # gaps r_c - r_r = (1, -0.5, 0)


def test_plain_loss_and_metrics():
    # -log sigmoid(1) = 0.3132617, -log sigmoid(-0.5) = 0.9740770, -log sigmoid(0) = log 2 = 0.6931472
    losses, m = bradley_terry_loss(CHOSEN, REJECTED)
    torch.testing.assert_close(losses, t([0.3132617, 0.9740770, 0.6931472]), rtol=0, atol=1e-7)
    torch.testing.assert_close(m["accuracy"], t(1 / 3))  # the tie does not count as correct
    torch.testing.assert_close(m["margin"], t(0.5 / 3))  # mean gap (1 - 0.5 + 0) / 3
    torch.testing.assert_close(m["mean_reward"], t(6.5 / 6))  # (1 + .5 + 2 + 0 + 1 + 2) / 6
    assert m["min_reward"].item() == 0.0 and m["max_reward"].item() == 2.0


def test_margin():
    # gaps minus margin (0.5, 0.25, 0): (0.5, -0.75, 0) -> 0.4740770, 1.1368710, 0.6931472
    losses, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=t([0.5, 0.25, 0.0]))
    torch.testing.assert_close(losses, t([0.4740770, 1.1368710, 0.6931472]), rtol=0, atol=1e-7)
    # a scalar margin of 1: gaps (0, -1.5, -1) -> 0.6931472, 1.7014132, 1.3132617
    losses, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=1.0)
    torch.testing.assert_close(losses, t([0.6931472, 1.7014132, 1.3132617]), rtol=0, atol=1e-7)


def test_center_rewards():
    # (r_c + r_r)^2 = (1, 2.25, 16); coefficient 0.01 adds (0.01, 0.0225, 0.16) per pair, so the mean is
    # TRL's mean(-logsigmoid) + 0.01 * mean((r_c + r_r)^2)
    losses, _ = bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.01)
    torch.testing.assert_close(losses, t([0.3232617, 0.9965770, 0.8531472]), rtol=0, atol=1e-7)


def test_gradient():
    # d/dr_c of -log sigmoid(r_c - r_r) = -(1 - sigmoid(1)) = -0.2689414 at gap 1; +0.2689414 for r_r
    chosen = t([1.0]).requires_grad_(True)
    rejected = t([0.0]).requires_grad_(True)
    losses, m = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    torch.testing.assert_close(chosen.grad, t([-0.2689414]), rtol=0, atol=1e-7)
    torch.testing.assert_close(rejected.grad, t([0.2689414]), rtol=0, atol=1e-7)
    assert not any(v.requires_grad for v in m.values())


def test_column_shaped_rewards_do_not_broadcast():
    # a [B, 1] head output with a [B] margin must give [B] losses, not [B, B]
    losses, _ = bradley_terry_loss(CHOSEN[:, None], REJECTED[:, None], margin=t([0.5, 0.25, 0.0]))
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, t([0.4740770, 1.1368710, 0.6931472]), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        bradley_terry_loss(CHOSEN, REJECTED[:2])
    with pytest.raises(ValueError):
        bradley_terry_loss(CHOSEN, REJECTED, margin=t([1.0, 2.0]))
