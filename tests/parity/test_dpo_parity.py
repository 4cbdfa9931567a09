"""DPO family: posttrain's `preference_loss` against TRL 1.16's `DPOTrainer._compute_loss`, run on a bare
DPOTrainer whose policy and reference are stub models returning random per-token log-probs (float64; float32
for alpha_divergence, whose clamp table in TRL has no float64 entry). Values and gradients with respect to the
policy's per-token log-probs must agree to 1e-6 relative (1e-5 for exo_pair).

Every loss_type TRL knows (read from TRL's own source) x every f_divergence_type (alpha with two alphas) x
label_smoothing in {0, 0.1}; loss mixtures with loss_weights; ld_alpha; use_weighting. Where posttrain
deliberately differs (see the README's loss table), the test says so and checks the difference exactly."""

from __future__ import annotations

import inspect
import re
import zlib

import pytest
import torch
from trl import DPOTrainer

from posttrain.losses.preference import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, ld_logps, preference_loss

from .conftest import StubModel, bare_trainer, close

SOURCE = inspect.getsource(DPOTrainer._compute_loss)
TRL_LOSSES = sorted(set(re.findall(r'loss_type == "(\w+)"', SOURCE)))
TRL_F_DIV_LOSSES = set(re.findall(r'"(\w+)"', re.search(r"f_divergence_loss_types = \{([^}]*)\}",
                                                        inspect.getsource(DPOTrainer.__init__)).group(1)))
F_DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                 ("alpha_divergence", 0.7)]
# TRL >= 1.0 reads label_smoothing in these losses only (robust, exo_pair, aot, aot_unpaired).
TRL_SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}


def batch(seed=0, b=6, prompt=3, width=12, dtype=torch.float64, equal_chosen=False):
    """[chosen; rejected] rows: prompt positions, then a completion of random length, then padding. Per-token
    log-probs are 0 outside the (shifted) completion mask, as TRL's fused head returns them."""
    g = torch.Generator().manual_seed(seed)
    room = width - prompt
    lengths = torch.randint(1, room + 1, (2 * b,), generator=g)
    if equal_chosen:
        lengths[:b] = room - 1
    mask = torch.zeros(2 * b, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, prompt : prompt + n] = 1
    shift = mask[:, 1:].to(dtype)
    policy = (-torch.rand(2 * b, width - 1, generator=g, dtype=torch.float64) * 2).to(dtype) * shift
    ref = (policy + torch.randn(2 * b, width - 1, generator=g, dtype=torch.float64).to(dtype) * 0.4) * shift
    sq = (policy + 0.25 + torch.randn(2 * b, width - 1, generator=g, dtype=torch.float64).to(dtype) * 0.1) * shift
    return {"mask": mask, "shift": shift, "policy": policy, "ref": ref, "log_sum_sq_probs": sq}


def trl_loss(data, loss_type, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5,
             loss_weights=None, ld_alpha=None, use_weighting=False, discopop_tau=0.05, swap=False, backward=True):
    """TRL's loss (and its gradient with respect to the policy's per-token log-probs) on `data`; `swap`
    exchanges chosen and rejected."""
    policy, ref, mask, sq = data["policy"], data["ref"], data["mask"], data["log_sum_sq_probs"]
    if swap:
        b = policy.shape[0] // 2
        policy, ref, mask, sq = (torch.cat([x[b:], x[:b]]) for x in (policy, ref, mask, sq))
    leaf = policy.clone().requires_grad_(True)
    zeros = torch.zeros_like(policy)
    outputs = {'log_probs': leaf, 'entropy': zeros, 'mean_logits': zeros, 'is_top1': zeros.bool(), 'log_sum_sq_probs': sq}
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = bare_trainer(
        DPOTrainer, model=StubModel(**outputs), ref_model=StubModel(log_probs=ref), beta=beta,
        precompute_ref_logps=False, loss_types=types, loss_weights=loss_weights or [1.0] * len(types),
        ld_alpha=ld_alpha, f_divergence_type=f_divergence, f_alpha_divergence_coef=f_alpha,
        label_smoothing=label_smoothing, use_weighting=use_weighting,
        args=type("Args", (), {"discopop_tau": discopop_tau, "gradient_checkpointing_kwargs": None})(),
    )
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    if loss.requires_grad and backward:
        loss.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    if swap:
        b = grad.shape[0] // 2
        grad = torch.cat([grad[b:], grad[:b]])
    # TRL sums every position (the fused head returns 0 where labels are -100, a constant there); only the
    # completion positions carry a gradient of the real model.
    return loss.detach(), grad * data["shift"], trainer._metrics["train"]


def ours(data, loss_type, ld_alpha=None, use_weighting=False, **kwargs):
    """posttrain's loss and gradient on the same per-token log-probs (the trainer sums them the same way)."""
    leaf = data["policy"].clone().requires_grad_(True)
    shift, ref = data["shift"], data["ref"]
    b = shift.shape[0] // 2
    lengths = shift.sum(-1)
    if ld_alpha is None:
        logps, ref_logps = (leaf * shift).sum(-1), (ref * shift).sum(-1)
    else:
        other = torch.cat([lengths[b:], lengths[:b]])
        logps, ref_logps = ld_logps(leaf, shift, other, ld_alpha), ld_logps(ref, shift, other, ld_alpha)
    weights = None
    if use_weighting:
        from posttrain.losses.preference import wpo_weights

        adjusted = ((data["policy"] - data["log_sum_sq_probs"]) * shift).sum(-1) / lengths
        weights = wpo_weights(adjusted[:b], adjusted[b:])
    out = preference_loss(loss_type, logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], chosen_lengths=lengths[:b],
                          rejected_lengths=lengths[b:], weights=weights, **kwargs)
    loss = out.losses.mean()
    loss.backward()
    return loss.detach(), leaf.grad, out


def test_trl_losses_are_all_covered():
    """Every loss TRL's DPOTrainer computes exists here, and the f-divergence applies to the same set (posttrain's
    sft term reads no f-divergence; TRL lists it because it ignores the option there)."""
    assert set(TRL_LOSSES) == set(PREFERENCE_LOSSES) - {"simpo", "cpo", "orpo"}
    f_readers = {n for n, fn in PREFERENCE_LOSSES.items() if "f_divergence" in fn.uses}
    assert f_readers == TRL_F_DIV_LOSSES - {"sft"}


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("f_divergence, f_alpha", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", TRL_LOSSES)
def test_every_loss_divergence_and_smoothing(loss_type, f_divergence, f_alpha, label_smoothing):
    dtype = torch.float32 if f_divergence == "alpha_divergence" else torch.float64
    # TRL's sft term is one mean over every chosen token of the batch; posttrain's is a per-example mean (RPO's
    # form). Equal chosen lengths make the two the same number; test_sft_term_is_per_example shows the difference.
    data = batch(seed=zlib.crc32(f"{loss_type}{f_divergence}{f_alpha}{label_smoothing}".encode()) % 1000, dtype=dtype,
                 equal_chosen=loss_type == "sft")
    kw = {'beta': 0.1, 'f_divergence': f_divergence, 'f_alpha': f_alpha}
    mine_kw = dict(kw, **({"f_alpha": 0.5} if f_divergence != "alpha_divergence" else {}))
    # 1e-5 for exo_pair (the tolerance) and for float32 (alpha divergence: TRL has no float64 path there,
    # and discopop's z / tau magnifies float32 rounding past 1e-6).
    rtol = 1e-5 if loss_type == "exo_pair" or dtype == torch.float32 else 1e-6
    if f_divergence != "reverse_kl" and loss_type not in TRL_F_DIV_LOSSES:
        # TRL refuses this combination in DPOTrainer.__init__ (the set checked above), and so does posttrain.
        with pytest.raises(ValueError, match="is not used by loss"):
            ours(data, loss_type, label_smoothing=label_smoothing, **mine_kw)
        return
    if f_divergence != "reverse_kl" and loss_type == "sft":
        # TRL accepts an f-divergence with sft alone and ignores it (same value); posttrain refuses an option that
        # no selected loss reads.
        close(trl_loss(data, loss_type, **kw)[0], trl_loss(data, loss_type, beta=0.1)[0], rtol=1e-12, name="TRL")
        with pytest.raises(ValueError, match="'f_divergence' is not used"):
            ours(data, loss_type, **mine_kw)
        return
    if loss_type == "exo_pair" and label_smoothing == 0:
        # TRL's value is log(0) = inf here (its __init__ refuses exo_pair without label_smoothing); so does
        # posttrain, with a message.
        assert not torch.isfinite(trl_loss(data, loss_type, label_smoothing=0.0, **kw)[0])
        with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
            ours(data, loss_type, label_smoothing=0.0, **mine_kw)
        return
    reads = loss_type in TRL_SMOOTHED or loss_type == "sigmoid"
    if label_smoothing and not reads:
        # TRL ignores label_smoothing in this loss (its value is unchanged); posttrain refuses an option no loss reads.
        same = trl_loss(data, loss_type, label_smoothing=label_smoothing, **kw)[0]
        close(same, trl_loss(data, loss_type, **kw)[0], rtol=1e-12, name="TRL ignores label_smoothing")
        with pytest.raises(ValueError, match="'label_smoothing' is not used"):
            ours(data, loss_type, label_smoothing=label_smoothing, **mine_kw)
        return
    if loss_type == "sigmoid" and label_smoothing:
        # Deliberate: posttrain keeps conservative DPO (Mitchell 2023) for sigmoid, (1-eps) L(h) + eps L(-h), which
        # TRL >= 1.0 dropped. Both halves are TRL's own sigmoid loss, the second on swapped chosen/rejected.
        loss_w, grad_w, _ = trl_loss(data, "sigmoid", **kw)
        loss_l, grad_l, _ = trl_loss(data, "sigmoid", swap=True, **kw)
        expected, expected_grad = (1 - label_smoothing) * loss_w + label_smoothing * loss_l, \
            (1 - label_smoothing) * grad_w + label_smoothing * grad_l
    else:
        expected, expected_grad, metrics = trl_loss(data, loss_type, label_smoothing=label_smoothing, **kw)
    loss, grad, out = ours(data, loss_type, label_smoothing=label_smoothing, **mine_kw)
    close(loss, expected, rtol=rtol, name="loss")
    close(grad, expected_grad, rtol=rtol, name="gradient")
    if not (loss_type == "sigmoid" and label_smoothing):
        close(out.chosen_rewards.mean(), metrics["rewards/chosen"][0], rtol=rtol, name="rewards/chosen")
        close((out.chosen_rewards - out.rejected_rewards).mean(), metrics["rewards/margins"][0], rtol=rtol,
              name="rewards/margins")


@pytest.mark.parametrize(
    "loss_type, loss_weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
        (["hinge", "ipo"], [1.0, 0.5]),
        (["sigmoid", "sft"], [1.0, 0.3]),
        (["apo_zero", "nca_pair", "sigmoid_norm"], [0.5, 0.25, 2.0]),
    ],
)
def test_loss_mixtures(loss_type, loss_weights):
    data = batch(seed=7, equal_chosen="sft" in loss_type)
    expected, expected_grad, _ = trl_loss(data, loss_type, loss_weights=loss_weights, beta=0.2)
    loss, grad, _ = ours(data, loss_type, loss_weights=loss_weights, beta=0.2)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")


def test_rpo_alpha_is_trls_sft_term_with_that_weight():
    """posttrain's rpo_alpha=a is TRL 1.x's loss_type=[sigmoid, sft], loss_weights=[1, a]."""
    data = batch(seed=3, equal_chosen=True)
    expected, expected_grad, _ = trl_loss(data, ["sigmoid", "sft"], loss_weights=[1.0, 0.4])
    loss, grad, _ = ours(data, "sigmoid", rpo_alpha=0.4)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "aot"])
def test_ld_alpha(loss_type):
    data = batch(seed=11)
    expected, expected_grad, _ = trl_loss(data, loss_type, ld_alpha=0.5)
    loss, grad, _ = ours(data, loss_type, ld_alpha=0.5)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")


def test_use_weighting_with_hinge_where_trls_backward_fails():
    """TRL 1.16 multiplies hinge's relu output in place by the WPO weights, so its backward raises; the value is
    still TRL's to compare. The expected gradient is TRL's unweighted hinge gradient times each pair's weight
    (the weights are constants of the loss)."""
    data = batch(seed=5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        trl_loss(data, "hinge", use_weighting=True)
    expected = trl_loss(data, "hinge", use_weighting=True, backward=False)[0]
    _, unweighted_grad, _ = trl_loss(data, "hinge")
    _, grad, out = ours(data, "hinge", use_weighting=True)
    close(out.losses.mean(), expected, name="loss")
    adjusted = ((data["policy"] - data["log_sum_sq_probs"]) * data["shift"]).sum(-1) / data["shift"].sum(-1)
    b = adjusted.shape[0] // 2
    weights = torch.exp(adjusted[:b] + adjusted[b:]).repeat(2)[:, None]
    close(grad, unweighted_grad * weights, name="gradient")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_use_weighting(loss_type):
    """WPO weights exp(a_w + a_l) are below 1 on this data (a = mean of logp - log sum p^2 < 0), where TRL 1.16 and
    posttrain agree. Deliberate: posttrain caps the weight at 1 as the WPO authors' code does (TRL 0.x did too,
    TRL 1.x dropped it); above 1 posttrain's loss is then TRL's unweighted loss, which the second half checks."""
    data = batch(seed=5)
    adjusted = ((data["policy"] - data["log_sum_sq_probs"]) * data["shift"]).sum(-1) / data["shift"].sum(-1)
    b = adjusted.shape[0] // 2
    assert (adjusted[:b] + adjusted[b:]).max() < 0
    expected, expected_grad, _ = trl_loss(data, loss_type, use_weighting=True)
    loss, grad, _ = ours(data, loss_type, use_weighting=True)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")

    data["log_sum_sq_probs"] = (data["policy"] - 0.3) * data["shift"]  # a = +0.3 on every completion
    expected, expected_grad, _ = trl_loss(data, loss_type)
    loss, grad, _ = ours(data, loss_type, use_weighting=True)
    close(loss, expected, name="loss at weight 1")
    close(grad, expected_grad, name="gradient at weight 1")
    assert trl_loss(data, loss_type, use_weighting=True)[0] > 1.5 * expected  # TRL: exp(0.6) ~ 1.8x


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_discopop_tau(tau):
    data = batch(seed=2)
    expected, expected_grad, _ = trl_loss(data, "discopop", discopop_tau=tau, beta=0.5)
    loss, grad, _ = ours(data, "discopop", beta=0.5, discopop_tau=tau)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")


def test_sft_term_is_per_example():
    """Deliberate: TRL's sft term is -mean over every chosen token of the batch; posttrain's is the mean over pairs
    of each chosen completion's own token mean (the RPO paper's NLL / |y|), so a long completion weighs as much as
    a short one and the term splits over micro-batches and devices like every other loss. Both are checked."""
    data = batch(seed=9)
    shift, policy = data["shift"], data["policy"]
    b = shift.shape[0] // 2
    assert len(set(shift[:b].sum(-1).tolist())) > 1  # unequal chosen lengths
    per_example = -((policy * shift).sum(-1) / shift.sum(-1))[:b].mean()
    batch_token_mean = -(policy * shift)[:b].sum() / shift[:b].sum()
    close(ours(data, "sft")[0], per_example, rtol=1e-12, name="posttrain")
    close(trl_loss(data, "sft")[0], batch_token_mean, rtol=1e-12, name="TRL")
    assert abs(float(per_example - batch_token_mean)) > 1e-3


def test_reference_free_losses_are_not_trl_dpo_losses():
    assert REFERENCE_FREE_LOSSES - {"sft"} == {"simpo", "cpo", "orpo"}  # their parity test is test_cpo_orpo_parity
