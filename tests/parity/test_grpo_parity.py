"""GRPO family: posttrain's `group_advantages` + `policy_loss` against TRL 1.16's GRPOTrainer, end to end from
rewards to loss. TRL's own `_generate_and_score_completions` runs on a bare trainer whose `_generate` returns
fixed token lists (its reward functions return fixed numbers, None for "cannot score"), so TRL's code computes
the masks, the old and reference log-probs through its `_get_per_token_logps_and_entropies` (a stub model
returns the log-probs) and the advantages; then TRL's `_compute_loss` turns that batch into the loss. posttrain
gets the same rewards and log-probs. Advantages agree to 1e-6 relative (float32, as TRL computes them), losses
and gradients with respect to the per-token log-probs to 1e-6 relative.

Every loss_type x importance_sampling_level x scale_rewards, off-policy (num_iterations = 2, so the ratios are
not 1), with beta > 0, epsilon_high, delta, truncated completions masked, unscorable rows, GDPO."""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from posttrain.losses.policy import LOSS_TYPES, entropy_bonus, group_advantages, policy_loss, top_entropy_mask

from .conftest import StubModel, bare_trainer, close

G, PROMPTS, EOS, PAD = 4, 3, 7, 0


def rollout(seed, width=6, unscorable=False):
    """Token lists of PROMPTS x G completions (some end in EOS, some are cut at `width`), their per-token
    log-probs now / at sampling / under the reference, and two reward columns (NaN = the function said None)."""
    g = torch.Generator().manual_seed(seed)
    n = PROMPTS * G
    prompt_ids = [[5] * int(torch.randint(2, 5, (1,), generator=g)) for _ in range(PROMPTS) for _ in range(G)]
    completions = []
    for i in range(n):
        # The first completion fills `width`, so TRL's padded width is `width` too.
        length = width if i == 0 else int(torch.randint(1, width + 1, (1,), generator=g))
        ids = [9] * length
        if length < width or i % 3 == 0:
            ids[-1] = EOS
        completions.append(ids)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, c in enumerate(completions):
        mask[i, : len(c)] = 1
    current = -torch.rand(n, width, generator=g, dtype=torch.float64) * 2
    old = current + torch.randn(n, width, generator=g, dtype=torch.float64) * 0.3
    ref = current + torch.randn(n, width, generator=g, dtype=torch.float64) * 0.3
    entropy = torch.rand(n, width, generator=g, dtype=torch.float64) * 3
    rewards = torch.randint(0, 3, (n, 2), generator=g).float()
    rewards[:, 1] = torch.rand(n, generator=g) * 2
    rewards[1, 1] = float("nan")  # one function declines one completion
    if unscorable:
        rewards[5] = float("nan")  # every function declines: no signal, advantage 0
    return {"prompt_ids": prompt_ids, "completions": completions, "mask": mask, "current": current, "old": old, "ref": ref,
                "entropy": entropy, "rewards": rewards}


def _padded_left(x, prompt_width):
    # TRL's model returns one value per position of prompt + completion and keeps the last `logits_to_keep`.
    return torch.cat([torch.zeros(x.shape[0], prompt_width, dtype=x.dtype), x], dim=1)


def trl_grpo(data, loss_type="dapo", importance_sampling_level="token", scale_rewards="group", num_iterations=2,
             beta=0.04, epsilon=0.2, epsilon_high=0.28, delta=None, mask_truncated_completions=False,
             multi_objective_aggregation="sum_then_normalize", reward_weights=(1.0, 0.5),
             use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
             top_entropy_quantile=1.0, entropy_coef=0.0):
    n, width = data["mask"].shape
    prompt_width = max(len(p) for p in data["prompt_ids"])
    columns = data["rewards"].tolist()

    def reward(i):
        def fn(prompts, completions, completion_ids, row, **kwargs):
            return [None if v[i] != v[i] else v[i] for v in (columns[r] for r in row)]
        fn.__name__ = f"r{i}"
        return fn

    policy = StubModel(log_probs=_padded_left(data["old"], prompt_width), entropy=None)
    ref_model = StubModel(log_probs=_padded_left(data["ref"], prompt_width))
    args = SimpleNamespace(per_device_train_batch_size=n, per_device_eval_batch_size=n, steps_per_generation=1,
                           gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None, report_to=[],
                           delta=delta, use_bias_correction_kl=use_bias_correction_kl,
                           sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg)
    trainer = bare_trainer(
        GRPOTrainer, model=policy, ref_model=ref_model, args=args, environment_factories=None, tools=None,
        environments=None, _tokenizer=SimpleNamespace(pad_token_id=PAD), pad_to_multiple_of=None,
        mask_truncated_completions=mask_truncated_completions, eos_token_ids=[EOS], num_iterations=num_iterations,
        use_vllm=False, vllm_importance_sampling_correction=False, beta=beta,
        multi_objective_aggregation=multi_objective_aggregation, reward_weights=torch.tensor(reward_weights),
        scale_rewards=scale_rewards, num_generations=G, num_generations_eval=G, reward_funcs=[reward(0), reward(1)],
        reward_processing_classes=[None, None], reward_func_names=["r0", "r1"], chat_template_kwargs={},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list), "images": []},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None, importance_sampling_level=importance_sampling_level, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon_high, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        max_completion_length=width,
    )
    trainer._generate = lambda prompts: (data["prompt_ids"], data["completions"], None, ["text"] * n, None, {},
                                         None, None)
    batch = trainer._generate_and_score_completions([{"prompt": f"p{i // G}", "row": i} for i in range(n)])
    assert ("old_per_token_logps" in batch) == (num_iterations > 1)
    leaf = data["current"].clone().requires_grad_(True)
    entropy = data["entropy"].clone().requires_grad_(True)
    policy.fields = {"log_probs": _padded_left(leaf, prompt_width), "entropy": _padded_left(entropy, prompt_width)}
    loss = trainer._compute_loss(policy, batch)
    loss.backward()
    mask = batch["completion_mask"]
    entropy_grad = entropy.grad * mask if entropy.grad is not None else torch.zeros_like(entropy)
    return {"loss": loss.detach(), "grad": leaf.grad * mask, "entropy_grad": entropy_grad,
            "advantages": batch["advantages"], "mask": mask, "metrics": trainer._metrics["train"]}


def ours(data, loss_type="dapo", importance_sampling_level="token", scale_rewards="group", num_iterations=2,
         beta=0.04, epsilon=0.2, epsilon_high=0.28, delta=None, mask_truncated_completions=False,
         multi_objective_aggregation="sum_then_normalize", reward_weights=(1.0, 0.5), advantages=None,
         top_entropy_quantile=1.0, entropy_coef=0.0, **kwargs):
    if advantages is None:
        advantages = group_advantages(data["rewards"], G, scale=scale_rewards, aggregation=multi_objective_aggregation,
                                      reward_weights=list(reward_weights))
    mask = data["mask"]
    if mask_truncated_completions:
        truncated = torch.tensor([c[-1] != EOS for c in data["completions"]])
        mask = mask * (~truncated).long()[:, None]
    leaf = data["current"].clone().requires_grad_(True)
    entropy = data["entropy"].clone().requires_grad_(True)
    selected = top_entropy_mask(entropy.detach(), mask, top_entropy_quantile) if top_entropy_quantile < 1 else None
    loss, metrics = policy_loss(
        leaf, data["old"] if num_iterations > 1 else None, advantages, mask, ref_logps=data["ref"], beta=beta,
        epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, importance_sampling_level=importance_sampling_level,
        loss_type=loss_type, max_completion_length=mask.shape[1], entropy_mask=selected, **kwargs)
    if entropy_coef:
        loss = loss - entropy_coef * entropy_bonus(entropy, mask if selected is None else selected)
    loss.backward()
    entropy_grad = entropy.grad * mask if entropy.grad is not None else torch.zeros_like(entropy)
    return {"loss": loss.detach(), "grad": leaf.grad, "entropy_grad": entropy_grad, "advantages": advantages,
            "mask": mask, "metrics": metrics}


def check(data, **settings):
    """Advantages from the same rewards agree to float32 precision (both are float32, as TRL's rewards are). The
    loss is then checked on TRL's advantages: a GRPO loss is a sum of terms of both signs that nearly cancel, so
    float32 rounding of the advantages would show as a large *relative* error of a near-zero loss."""
    theirs, mine = trl_grpo(data, **settings), ours(data, **settings)
    assert torch.equal(mine["mask"], theirs["mask"].to(mine["mask"].dtype))
    close(mine["advantages"], theirs["advantages"], name="advantages")
    mine = ours(data, **settings, advantages=theirs["advantages"])
    close(mine["loss"], theirs["loss"], name="loss")
    close(mine["grad"], theirs["grad"], name="gradient")
    if theirs["entropy_grad"].abs().max() > 0:
        close(mine["entropy_grad"], theirs["entropy_grad"], name="gradient through the entropies")
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"):
        if key in theirs["metrics"]:
            close(mine["metrics"][key], theirs["metrics"][key][0], name=key)
    return theirs, mine


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_every_loss_type_level_and_scale(loss_type, importance_sampling_level, scale_rewards):
    """Off-policy (num_iterations = 2: the sampling log-probs differ from the current ones), beta = 0.04 with
    TRL's ratio-corrected KL; cispo with its ratio cap epsilon_high = 1.3 (ratios up to ~2 here)."""
    data = rollout(seed=zlib.crc32(f"{loss_type}{importance_sampling_level}{scale_rewards}".encode()) % 997)
    check(data, loss_type=loss_type, importance_sampling_level=importance_sampling_level, scale_rewards=scale_rewards,
          epsilon_high=1.3 if loss_type == "cispo" else 0.28)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_on_policy_two_sided_clip_and_no_kl(loss_type):
    """num_iterations = 1: no old log-probs anywhere (the ratio is exactly 1); delta (INTELLECT-2's dual clip)
    only acts off-policy, so it is checked off-policy too; beta = 0."""
    data = rollout(seed=21)
    check(data, loss_type=loss_type, num_iterations=1, beta=0.0)
    check(data, loss_type=loss_type, delta=1.4, epsilon_high=0.25)


def test_masks_unscorable_rows_and_plain_kl():
    data = rollout(seed=5, unscorable=True)
    theirs, mine = check(data, mask_truncated_completions=True, use_bias_correction_kl=False)
    assert mine["advantages"][5] == 0 and theirs["advantages"][5] == 0
    assert (mine["mask"].sum(-1) == 0).any()  # a truncated completion is out of the loss
    check(data, loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3)


def test_gdpo_normalize_then_sum():
    check(rollout(seed=8), multi_objective_aggregation="normalize_then_sum", reward_weights=(1.0, 2.0))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
@pytest.mark.parametrize(("rho", "coef"), [(0.2, 0.0), (1.0, 0.05), (0.3, 0.05), (0.0, 0.0)])
def test_top_entropy_quantile_and_entropy_bonus(loss_type, rho, coef):
    """One micro-batch holding the step, so TRL's per-micro-batch quantile is posttrain's per-step one. The
    gradient through the entropies (the bonus) is compared too."""
    check(rollout(seed=13), loss_type=loss_type, top_entropy_quantile=rho, entropy_coef=coef,
          epsilon_high=1.3 if loss_type == "cispo" else 0.28)
