"""Reference-free preference losses: posttrain's simpo / cpo / orpo against TRL 1.16's CPOTrainer and ORPOTrainer
(trl.experimental), whose `get_batch_loss_metrics` runs on a bare trainer and a stub model returning random
float64 logits. TRL computes the log-probs from the logits itself (its get_batch_logps / cross-entropy); the
posttrain side gathers log-softmax at the labels and calls `preference_loss`. Values and gradients with respect
to the logits agree to 1e-6 relative.

Deliberate differences, checked exactly here and listed in the README: posttrain's NLL term is each chosen
completion's own token mean averaged over pairs (TRL: one mean over every chosen token of the batch, so the two
agree when chosen lengths are equal), and ORPO's NLL covers the completion only (TRL's also the prompt)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from posttrain.losses.preference import preference_loss

from .conftest import StubModel, bare_trainer, close

VOCAB = 11


def pairs(seed=0, b=5, prompt=3, width=10, equal_chosen=True):
    """TRL's tokenized pair batch: input ids, attention masks, labels (-100 on prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        # Without a prompt the first token is never scored, so a completion needs 2 tokens to have one.
        lengths = torch.randint(1 if prompt else 2, width - prompt + 1, (b,), generator=g)
        if side == "chosen" and equal_chosen:
            lengths[:] = width - prompt - 1
        ids = torch.randint(1, VOCAB, (b, width), generator=g)
        attention = torch.zeros(b, width, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            attention[i, : prompt + n] = 1
        labels = ids.masked_fill(attention == 0, -100)
        labels[:, :prompt] = -100
        ids = ids.masked_fill(attention == 0, 0)
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    logits = torch.randn(2 * b, width, VOCAB, generator=g, dtype=torch.float64) * 2
    return out, logits


def ours(batch, logits, loss_type, **kwargs):
    leaf = logits.clone().requires_grad_(True)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    mask = (labels != -100).to(leaf.dtype)
    per_token = torch.log_softmax(leaf[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    sums, lengths = per_token.sum(-1), mask.sum(-1)
    b = sums.shape[0] // 2
    out = preference_loss(loss_type, sums[:b], sums[b:], chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                          **kwargs)
    loss = out.losses.mean()
    loss.backward()
    return loss.detach(), leaf.grad, out


def trl_cpo(batch, logits, **args):
    leaf = logits.clone().requires_grad_(True)
    trainer = bare_trainer(CPOTrainer, model=StubModel(logits=leaf), is_encoder_decoder=False, pad_token_id=0,
                           alpha=0.0, **args)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo(cpo_alpha, label_smoothing):
    batch, logits = pairs(seed=int(cpo_alpha * 10 + label_smoothing * 100))
    expected, expected_grad, metrics = trl_cpo(batch, logits, loss_type="sigmoid", beta=0.2, cpo_alpha=cpo_alpha,
                                               label_smoothing=label_smoothing, simpo_gamma=0.5)
    loss, grad, out = ours(batch, logits, "cpo", beta=0.2, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")
    close(out.chosen_rewards.mean(), metrics["rewards/chosen"], name="rewards/chosen")
    if cpo_alpha:
        close(out.metrics["nll_loss"].mean(), metrics["nll_loss"], name="nll_loss")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("simpo_gamma", [0.5, 1.2])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo(cpo_alpha, simpo_gamma, label_smoothing):
    batch, logits = pairs(seed=3)
    expected, expected_grad, metrics = trl_cpo(batch, logits, loss_type="simpo", beta=2.0, cpo_alpha=cpo_alpha,
                                               label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    loss, grad, out = ours(batch, logits, "simpo", beta=2.0, cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma,
                           label_smoothing=label_smoothing)
    close(loss, expected, name="loss")
    close(grad, expected_grad, name="gradient")
    close(out.chosen_rewards.mean(), metrics["rewards/chosen"], name="rewards/chosen (beta x average log-prob)")


def test_cpo_nll_is_per_example():
    """Unequal chosen lengths: TRL's NLL is one token mean over the batch's chosen tokens, posttrain's the mean of
    per-completion token means. The preference terms still agree (cpo_alpha = 0 above); the NLL terms are each
    checked against their own definition on the same log-probs."""
    batch, logits = pairs(seed=4, equal_chosen=False)
    labels = batch["chosen_labels"][:, 1:]
    mask = (labels != -100).double()
    nll = -torch.log_softmax(logits[: labels.shape[0], :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    _, _, metrics = trl_cpo(batch, logits, loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.0,
                            simpo_gamma=0.5)
    close(metrics["nll_loss"], (nll * mask).sum() / mask.sum(), name="TRL: batch token mean")
    _, _, out = ours(batch, logits, "cpo", beta=0.1)
    close(out.metrics["nll_loss"].mean(), ((nll * mask).sum(-1) / mask.sum(-1)).mean(), rtol=1e-12,
          name="posttrain: mean of per-example means")


def trl_orpo(batch, logits, beta):
    leaf = logits.clone().requires_grad_(True)
    trainer = bare_trainer(ORPOTrainer, model=StubModel(logits=leaf), is_encoder_decoder=False, padding_value=0,
                           beta=beta)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


# TRL's odds_ratio_loss casts the log-probs to float32 first, so its ORPO numbers carry float32 rounding; the
# log-odds is a difference of nearby terms, so these comparisons use 1e-5 (everything else here is float64).
ORPO_RTOL = 1e-5


def test_orpo_without_prompt_tokens():
    """With no prompt tokens both NLLs cover the same tokens, and with equal chosen lengths TRL's batch token mean
    is posttrain's mean of per-example means: the whole loss and its gradient agree."""
    batch, logits = pairs(seed=6, prompt=0)
    expected, expected_grad, metrics = trl_orpo(batch, logits, beta=0.3)
    loss, grad, out = ours(batch, logits, "orpo", beta=0.3)
    close(loss, expected, rtol=ORPO_RTOL, name="loss")
    close(grad, expected_grad, rtol=ORPO_RTOL, name="gradient")
    close(out.metrics["log_odds_ratio"].mean(), metrics["log_odds_ratio"], rtol=ORPO_RTOL, name="log_odds_ratio")
    close(out.metrics["log_odds_chosen"].mean(), metrics["log_odds_chosen"], rtol=ORPO_RTOL, name="log_odds_chosen")


def test_orpo_with_an_unscored_completion_trl_is_nan():
    """A rejected completion with no scored token: TRL's average log-prob is 0/0, so its loss is NaN. posttrain
    counts at least one token (average 0, capped below 0 for the odds) and stays finite."""
    batch, logits = pairs(seed=6, prompt=0)
    batch["rejected_attention_mask"][0, 1:] = 0
    batch["rejected_labels"][0, 1:] = -100
    assert torch.isnan(trl_orpo(batch, logits, beta=0.3)[0])
    loss, grad, _ = ours(batch, logits, "orpo", beta=0.3)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_orpo_odds_ratio_term_with_prompts():
    """With prompts TRL's NLL also covers the prompt tokens (posttrain: the completion only, the conditional
    likelihood of the ORPO paper's L_SFT); the odds-ratio term, TRL's nll_loss - loss, agrees exactly."""
    batch, logits = pairs(seed=8, equal_chosen=False)
    expected, _, metrics = trl_orpo(batch, logits, beta=0.3)
    _, _, out = ours(batch, logits, "orpo", beta=0.3)
    close(-0.3 * out.metrics["log_odds_ratio"].mean(), expected - metrics["nll_loss"], rtol=ORPO_RTOL,
          name="odds-ratio term")
    close(out.metrics["log_odds_chosen"].mean(), metrics["log_odds_chosen"], rtol=ORPO_RTOL, name="log_odds_chosen")
    full = F.cross_entropy(logits[:5, :-1].reshape(-1, VOCAB), batch["chosen_input_ids"][:, 1:].reshape(-1),
                           reduction="none").view(5, -1) * batch["chosen_attention_mask"][:, 1:]
    close(metrics["nll_loss"], full.sum() / batch["chosen_attention_mask"][:, 1:].sum(),
          name="TRL's NLL: prompt and completion tokens")
