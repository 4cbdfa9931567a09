"""KTO and reward models: posttrain's `kto_loss` / `kl_estimate` and `bradley_terry_loss` against TRL 1.16's
`KTOTrainer._compute_loss` and `RewardTrainer.compute_loss` on bare trainers with stub models (float64), values
and gradients to 1e-6 relative.

KTO with the KL term (loss_type="kto": z0 from the mismatched pairs, clamped at 0 when negative) and without it
(loss_type="apo_zero_unpaired"), with class weights, precomputed and live references."""

from __future__ import annotations

import pytest
import torch
from trl import KTOTrainer, RewardTrainer

from posttrain.losses.kto import kl_estimate, kto_loss
from posttrain.losses.reward import bradley_terry_loss

from .conftest import StubModel, bare_trainer, close


def kto_batch(seed, b=8, prompt=2, width=9, kl_shift=0.0):
    g = torch.Generator().manual_seed(seed)

    def sequences():
        lengths = torch.randint(1, width - prompt + 1, (b,), generator=g)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            mask[i, prompt : prompt + n] = 1
        shift = mask[:, 1:].double()
        policy = -torch.rand(b, width - 1, generator=g, dtype=torch.float64) * 2 * shift
        ref = (policy + torch.randn(b, width - 1, generator=g, dtype=torch.float64) * 0.5) * shift
        return mask, shift, policy, ref

    mask, shift, policy, ref = sequences()
    kl_mask, kl_shift_mask, kl_policy, kl_ref = sequences()
    kl_policy = kl_policy + kl_shift * kl_shift_mask  # moves z0 = mean(KL policy - KL ref) up or down
    labels = torch.tensor([True, False] * (b // 2))
    return {"mask": mask, "shift": shift, "policy": policy, "ref": ref, "kl_mask": kl_mask, "kl_shift": kl_shift_mask,
                "kl_policy": kl_policy, "kl_ref": kl_ref, "labels": labels}


def trl_kto(data, loss_type, precompute, beta=0.2, desirable_weight=1.0, undesirable_weight=1.0):
    leaf = data["policy"].clone().requires_grad_(True)
    ids, kl_ids = torch.zeros_like(data["mask"]), torch.ones_like(data["kl_mask"])
    zeros = torch.zeros_like(leaf)
    policy = StubModel(outputs={id(ids): {"log_probs": leaf, "entropy": zeros, "mean_logits": zeros},
                                id(kl_ids): {"log_probs": data["kl_policy"]}})
    ref = StubModel(outputs={id(ids): {"log_probs": data["ref"]}, id(kl_ids): {"log_probs": data["kl_ref"]}})
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": data["mask"],
              "label": data["labels"]}
    calculate_kl = loss_type == "kto"
    if calculate_kl:
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids), KL_completion_mask=data["kl_mask"])
    if precompute:
        inputs["ref_logps"] = data["ref"].sum(-1)
        if calculate_kl:
            inputs["ref_KL_logps"] = data["kl_ref"].sum(-1)
    trainer = bare_trainer(KTOTrainer, model=policy, ref_model=None if precompute else ref, loss_type=loss_type,
                           calculate_KL=calculate_kl, beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight, precompute_ref_logps=precompute,
                           args=type("Args", (), {"gradient_checkpointing_kwargs": None})())
    loss = KTOTrainer._compute_loss(trainer, policy, inputs, False)
    loss.backward()
    return loss.detach(), leaf.grad * data["shift"], trainer._metrics["train"]


def ours_kto(data, loss_type, beta=0.2, **weights):
    leaf = data["policy"].clone().requires_grad_(True)
    z0 = kl_estimate(data["kl_policy"].sum(-1), data["kl_ref"].sum(-1)) if loss_type == "kto" else 0.0
    out = kto_loss((leaf * data["shift"]).sum(-1), data["ref"].sum(-1), data["labels"], z0, beta=beta,
                   loss_type=loss_type, **weights)
    loss = out.losses.mean()
    loss.backward()
    return loss.detach(), leaf.grad, out


@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("kl_shift", [0.3, -0.3])  # z0 > 0, and a negative mean clamped to 0
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [{}, {"desirable_weight": 1.5, "undesirable_weight": 0.8}])
def test_kto(loss_type, kl_shift, precompute, weights):
    data = kto_batch(seed=int(kl_shift * 10) + 3, kl_shift=kl_shift)
    expected, expected_grad, metrics = trl_kto(data, loss_type, precompute, **weights)
    loss, grad, out = ours_kto(data, loss_type, **weights)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")
    if loss_type == "kto":
        close(out.metrics["kl"], metrics["kl"][0], name="kl (z0)")
        assert (out.metrics["kl"] > 0) == (kl_shift > 0)  # the negative estimate is clamped to 0 in both
    close(out.metrics["rewards/chosen_sum"] / out.metrics["count/chosen"], metrics["rewards/chosen"][0],
          name="rewards/chosen")


def trl_reward(chosen, rejected, margin=None, center=None):
    leaf = torch.cat([chosen, rejected])[:, None].clone().requires_grad_(True)
    trainer = bare_trainer(RewardTrainer, model=StubModel(logits=leaf),
                           args=type("Args", (), {"center_rewards_coefficient": center})())
    inputs = {"input_ids": torch.zeros(leaf.shape[0], 3, dtype=torch.long),
              "attention_mask": torch.ones(leaf.shape[0], 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, trainer.model, inputs)
    loss.backward()
    return loss.detach(), leaf.grad[:, 0], trainer._metrics["train"]


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_model(margin, center):
    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(7, generator=g, dtype=torch.float64) * 2, torch.randn(7, generator=g, dtype=torch.float64)
    m = torch.rand(7, generator=g, dtype=torch.float64) if margin else None
    expected, expected_grad, metrics = trl_reward(chosen, rejected, m, center)
    leaf = torch.cat([chosen, rejected]).clone().requires_grad_(True)
    losses, ours_metrics = bradley_terry_loss(leaf[:7], leaf[7:], m, center)
    losses.mean().backward()
    close(losses.mean(), expected, name="loss")
    close(leaf.grad, expected_grad, name="gradient")
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        close(ours_metrics[key], metrics[key][0], name=key)
