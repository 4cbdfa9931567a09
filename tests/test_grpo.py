"""GRPO end to end on the tiny model: the trainer's loss against `policy_loss` on naive full-softmax log-probs,
accumulation invariance, old/reference log-probs, reward failures, dynamic sampling, truncation masking,
seeding and resume, metrics, config errors, real GSM8K rows.

A random tiny model samples near-uniform tokens, so its decoded completions differ in character count and in
which letters they hold: the reward functions below score exactly that, which gives non-zero advantages.
`eos_model` scales the EOS row of the (tied) output matrix so some completions end early and lengths differ.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data
from safetensors.torch import load_file

from posttrain import cli, reference
from posttrain.algorithms import grpo
from posttrain.algorithms.grpo import GRPO, Config, PromptExample
from posttrain.engine import Engine
from posttrain.logprobs import naive_token_logps
from posttrain.losses.policy import group_advantages, k3_kl, policy_loss
from posttrain.reference import Copy
from posttrain.rollout.generate import HFEngine
from posttrain.testing import tiny_model

PROMPTS = ["What is 12 + 7?", "2 + 2 =", "Human: How do I bake bread?", "the a an is of"]
G, L, TEMP = 4, 6, 0.8  # completions per prompt, max_completion_length, sampling/scoring temperature

REWARDS_MODULE = '''
import time

def chars(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def has_e(prompts, completions, **kwargs):
    return [float("e" in c) for c in completions]

def boom(prompts, completions, **kwargs):
    raise RuntimeError("reward server down")

def slow(prompts, completions, **kwargs):
    time.sleep(1.0)
    return [0.0] * len(completions)
'''


# ---------------------------------------------------------------------------------------------- helpers


def chars(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class Recorder:
    """`chars`, remembering every value it returned (the rewards the trainer saw)."""

    def __init__(self):
        self.values = []

    def __call__(self, prompts, completions, **kwargs):
        out = chars(prompts, completions)
        self.values += out
        return out


def examples(tok):
    return [PromptExample(i, p, tok(p)["input_ids"], {"answer": str(i)}) for i, p in enumerate(PROMPTS)]


def make_cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "run"), "num_generations": G, "max_completion_length": L,
            "temperature": TEMP, "batch_size": 2, "micro_batch_size": 2 * G, "learning_rate": 1e-2,
            "max_grad_norm": 0.0, "lr_scheduler": "constant", "progress": False, "seed": 0}
    cfg = Config(**{**base, **kw})
    cfg.validate()
    return cfg


def eos_model(tok, seed=0):
    """The tiny model with EOS made likely (x80 on its output row): completions of 3 to 6 tokens."""
    model = tiny_model(tok, seed=seed)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 80
    return model


def naive_logps(model, mb, temperature=TEMP):
    """Per-row full-softmax log-probs of the micro-batch's completion tokens, one plain prompt + completion
    sequence at a time, aligned with mb.completion_ids."""
    rows = []
    for i in range(len(mb)):
        p = mb.prompts[int(mb.row_prompt[i])]
        ids = torch.tensor([p + mb.completion_ids[i].tolist()])
        scored = torch.cat([torch.zeros(len(p), dtype=torch.long), mb.completion_mask[i].long()])[None]
        rows.append(naive_token_logps(model, ids, torch.ones_like(ids), scored, temperature)[0, len(p):])
    return torch.stack(rows)


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b, rel=1e-5):
    """Every parameter's gradient agrees to `rel` of its largest entry (float32 sums in another order)."""
    assert set(a) == set(b) and len(a) > 5
    assert max(float(g.abs().max()) for g in a.values()) > 1e-4  # not a vacuous comparison of zeros
    for n in a:
        scale = float(b[n].abs().max())
        assert float((a[n] - b[n]).abs().max()) <= rel * scale + 1e-9, (n, float((a[n] - b[n]).abs().max()), scale)


@pytest.fixture
def rollouts(monkeypatch):
    """Every Rollout the trainer samples, in order."""
    seen = []

    class SpyEngine(HFEngine):
        def generate(self, *args, **kwargs):
            seen.append(super().generate(*args, **kwargs))
            return seen[-1]

    monkeypatch.setattr(grpo, "HFEngine", SpyEngine)
    return seen


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "grpo_test_rewards", raising=False)
    return "grpo_test_rewards"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


# The tests that need every completion truncated sample with this seed: the random tiny model puts ~1/320 of its
# mass on EOS, so whether a run of ~100 sampled tokens avoids it depends on the seed (7 of seeds 1-10 do; each
# test asserts it). A change to the sampler can move it.
NO_EOS_SEED = 1


def cli_args(model_dir, data, out, *extra):
    return ["grpo", f"model={model_dir}", f"dataset={data}", f"output_dir={out}", f"num_generations={G}",
            f"max_completion_length={L}", "batch_size=2", "micro_batch_size=4", "progress=false", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    return load_file(str(out / "model.safetensors"))


# ------------------------------------------------------------------------------------ loss = hand loss


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_loss_equals_policy_loss_on_naive_logps(tmp_path, tokenizer, loss_type):
    """One micro-batch holding the whole step: the trainer's loss, gradient and kl equal `policy_loss` applied
    to naive log-probs of the plain concatenated sequences with `group_advantages` of the recorded rewards.
    A reference that differs from the policy (another seed) makes the beta * k3 term non-zero."""
    model, ref = eos_model(tokenizer), tiny_model(tokenizer, seed=1)
    record = Recorder()
    cfg = make_cfg(tmp_path, loss_type=loss_type, beta=0.1)
    algo = GRPO(cfg, tokenizer, [("chars", record)], examples(tokenizer), Copy(ref))
    [mb] = algo.prepare(model, examples(tokenizer)[:2])
    mask = mb.completion_mask.float()
    assert len(record.values) == 2 * G and len(set(mask.sum(-1).tolist())) > 1  # lengths differ
    adv = group_advantages(torch.tensor(record.values), G)
    torch.testing.assert_close(mb.advantages, adv)
    assert int((adv.abs() > 0.1).sum()) >= 4
    # advantages by hand for the first group: (r - mean) / (unbiased std + 1e-4)
    r = torch.tensor(record.values[:G])
    torch.testing.assert_close(adv[:G], (r - r.mean()) / (r.std() + 1e-4))

    loss, m = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)

    logps = naive_logps(model, mb)
    with torch.no_grad():
        ref_logps = naive_logps(ref, mb)
    hand, _ = policy_loss(logps, None, adv, mask, ref_logps=ref_logps, beta=0.1, loss_type=loss_type,
                               max_completion_length=L)
    hand.backward()
    assert_same_grads(g_trainer, grads(model))
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-5)
    kl = ((k3_kl(logps, ref_logps) * mask).sum() / mask.sum()).item()
    assert m["kl"] == pytest.approx(kl, rel=1e-5) and kl > 0.05
    assert m["clip_ratio/region_mean"] == 0.0  # on-policy: ratio exactly 1
    if loss_type == "dapo":  # written out: ratio 1, so per token -A_i + beta * k3, summed / token count
        explicit = ((-adv[:, None] + 0.1 * k3_kl(logps, ref_logps)) * mask).sum() / mask.sum()
        assert float(loss.detach()) == pytest.approx(float(explicit.detach()), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batch_split_does_not_change_the_gradient(tmp_path, tokenizer, loss_type):
    """Same step cut into 1 x 8, 8 x 1 and 3 + 3 + 2 rows (micro-batches spanning two groups): the losses,
    each divided by the step's total num_items as the engine does, add up to the same loss and gradient."""
    model, ref = eos_model(tokenizer), tiny_model(tokenizer, seed=1)
    results = {}
    for size, sizes in [(8, [8]), (1, [1] * 8), (3, [3, 3, 2])]:
        cfg = make_cfg(tmp_path, loss_type=loss_type, micro_batch_size=size, beta=0.05)
        algo = GRPO(cfg, tokenizer, [("chars", chars)], examples(tokenizer), Copy(ref))  # fresh: same seeds
        micro = algo.prepare(model, examples(tokenizer)[:2])
        assert [len(mb) for mb in micro] == sizes
        total = sum(algo.num_items(mb) for mb in micro)
        loss = 0.0
        for mb in micro:
            piece, _ = algo.loss(model, mb, total)
            piece.backward()
            loss += float(piece.detach())
        tokens = sum(int(mb.completion_mask.sum()) for mb in micro)
        # num_items of the step: dapo counts tokens, grpo sequences, dr_grpo sequences x max_completion_length
        assert total == {"dapo": tokens, "grpo": 8, "dr_grpo": 8 * L}[loss_type]
        results[size] = (loss, grads(model))
    for size in (1, 3):
        assert results[size][0] == pytest.approx(results[8][0], rel=1e-5, abs=1e-7)
        assert_same_grads(results[size][1], results[8][1])


# ------------------------------------------------------------------------------- old log-probs, ratio


def test_two_iterations_use_the_rollout_logps_as_old(tmp_path, tokenizer, rollouts):
    """num_iterations=2: old log-probs are the sampler's own (taken from the Rollout, not recomputed); after the
    policy moves, the ratio exp(logp - old) differs from 1 and the loss and clip fractions follow it."""
    model = eos_model(tokenizer)
    algo = GRPO(make_cfg(tmp_path, num_iterations=2), tokenizer, [("chars", chars)], examples(tokenizer))
    [mb] = algo.prepare(model, examples(tokenizer)[:2])
    [r] = rollouts
    assert torch.equal(mb.old_logps, r.logps[:, : mb.completion_ids.shape[1]])
    mask = mb.completion_mask.float()
    # the sampler scored its tokens like a full forward at the same temperature (float error only)
    torch.testing.assert_close(mb.old_logps, naive_logps(model, mb).detach() * mask, atol=1e-5, rtol=1e-5)
    _, m1 = algo.loss(model, mb, algo.num_items(mb))
    assert m1["clip_ratio/region_mean"] == 0.0

    torch.manual_seed(0)
    with torch.no_grad():  # stands in for the first optimizer step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss, m2 = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)
    new = naive_logps(model, mb)
    hand, _ = policy_loss(new, mb.old_logps, mb.advantages, mask, epsilon=0.2, loss_type="dapo")
    hand.backward()
    assert_same_grads(g_trainer, grads(model))
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-5)
    # clip fractions by hand: ratio below 0.8 with A < 0, above 1.2 with A > 0, over scored tokens
    ratio, adv = torch.exp(new.detach() - mb.old_logps), mb.advantages[:, None]
    low = ((ratio < 0.8) & (adv < 0)).float()
    high = ((ratio > 1.2) & (adv > 0)).float()
    assert m2["clip_ratio/low_mean"] == pytest.approx(float((low * mask).sum() / mask.sum()))
    assert m2["clip_ratio/high_mean"] == pytest.approx(float((high * mask).sum() / mask.sum()))
    assert m2["clip_ratio/region_mean"] > 0.05
    on_policy, _ = policy_loss(new.detach(), None, mb.advantages, mask, loss_type="dapo")
    assert abs(float(loss.detach()) - float(on_policy)) > 1e-3


def test_one_iteration_gradient_is_the_policy_gradient(tmp_path, tokenizer):
    """num_iterations=1: no old log-probs are kept (ratio exp(logp - sg(logp)) = 1) and the gradient is that of
    -sum_i A_i sum_t logp_it / (number of scored tokens) (dapo)."""
    model = eos_model(tokenizer)
    algo = GRPO(make_cfg(tmp_path), tokenizer, [("chars", chars)], examples(tokenizer))
    [mb] = algo.prepare(model, examples(tokenizer)[:2])
    assert mb.old_logps is None and mb.ref_logps is None
    loss, _ = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)
    mask = mb.completion_mask.float()
    (-(mb.advantages[:, None] * naive_logps(model, mb) * mask).sum() / mask.sum()).backward()
    assert_same_grads(g_trainer, grads(model))


def test_engine_generates_once_per_two_iterations(tmp_path, tokenizer, rollouts):
    """Through the engine: 4 steps with num_iterations=2 sample twice; the second step on a batch sees a ratio
    away from 1 (clipped tokens), the first one does not."""
    cfg = make_cfg(tmp_path, num_iterations=2, max_steps=4, learning_rate=0.02)
    exs = examples(tokenizer)
    Engine(cfg, tiny_model(tokenizer), tokenizer, GRPO(cfg, tokenizer, [("chars", chars)], exs), exs).train()
    rows = metrics(tmp_path / "run")
    assert len(rollouts) == 2 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["clip_ratio/region_mean"] == 0.0 and rows[2]["clip_ratio/region_mean"] == 0.0
    assert rows[1]["clip_ratio/region_mean"] > 0 and rows[3]["clip_ratio/region_mean"] > 0
    assert rows[0]["generation_seconds"] == rows[1]["generation_seconds"]  # one rollout for both steps
    assert rows[0]["loss"] != rows[1]["loss"]


# ------------------------------------------------------------------------------------------ reference


def test_beta_with_a_frozen_reference_copy(tmp_path, tiny_model_dir, data, rewards_module, monkeypatch):
    """beta > 0 on a full model: one frozen copy is made; kl is 0 at step 1 (policy = reference) and grows."""
    copies = []
    real = reference.frozen_copy

    def spy(model):
        copies.append((real(model), {n: p.detach().clone() for n, p in model.named_parameters()}))
        return copies[-1][0]

    monkeypatch.setattr(reference, "frozen_copy", spy)
    out = tmp_path / "run"
    assert cli.main(cli_args(tiny_model_dir, data, out, f"reward_funcs={rewards_module}:chars", "beta=0.1",
                             "max_steps=3", "learning_rate=0.05", "temperature=1.5")) == 0
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] > 1e-4
    [(ref, before)] = copies
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    for n, p in ref.named_parameters():  # training moved the policy, never the reference
        assert torch.equal(p, before[n]), n
    trained = final_weights(out)
    assert not torch.equal(trained["model.norm.weight"], before["model.norm.weight"])


def test_beta_with_lora_uses_the_adapter_off_model(tmp_path, tiny_model_dir, data, rewards_module, monkeypatch):
    """LoRA: no copy; the reference is the base model (adapter off). lora_B starts at 0, so kl is 0 at step 1."""
    monkeypatch.setattr(reference, "frozen_copy", lambda model: pytest.fail("LoRA must not copy the model"))
    out = tmp_path / "run"
    assert cli.main(cli_args(tiny_model_dir, data, out, f"reward_funcs={rewards_module}:chars", "beta=0.1",
                             "max_steps=3", "learning_rate=0.05", "temperature=1.5", "lora.r=4")) == 0
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] > 1e-5
    assert (out / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------------- failing rewards


def test_raising_and_hanging_rewards_do_not_stop_training(tmp_path, tiny_model_dir, data, rewards_module):
    out = tmp_path / "run"
    funcs = ",".join(f"{rewards_module}:{f}" for f in ("chars", "boom", "slow"))
    assert cli.main(cli_args(tiny_model_dir, data, out, f"reward_funcs={funcs}", "reward_timeout=0.5",
                             "max_steps=2", "learning_rate=0.01")) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # one failure and one timeout per step; only `chars` scored
        assert r["reward_failures"] == 1.0 and r["reward_timeouts"] == 1.0
        assert r[f"rewards/{rewards_module}:boom/mean"] != r[f"rewards/{rewards_module}:boom/mean"]  # NaN
        assert r["reward"] == r[f"rewards/{rewards_module}:chars/mean"] > 0
        assert r["grad_norm"] > 0


def test_unscorable_group_gets_zero_advantage(tmp_path, tokenizer):
    """Prompt 0's completions are scored by nobody (None from one function, an exception from the other):
    its group's advantages are 0, so its micro-batch has loss 0 and no gradient; prompt 1's group learns."""

    def partial(prompts, completions, **kwargs):
        return [None if p == PROMPTS[0] else float(len(c)) for p, c in zip(prompts, completions)]

    def boom(prompts, completions, **kwargs):
        raise ValueError("no")

    model = eos_model(tokenizer)
    algo = GRPO(make_cfg(tmp_path, micro_batch_size=G), tokenizer, [("partial", partial), ("boom", boom)],
                examples(tokenizer))
    batch = algo.prepare(model, examples(tokenizer)[:2])
    first, second = batch
    m = batch.metrics
    assert m["reward_failures"] == 1.0 and m["reward_timeouts"] == 0.0
    assert first.advantages.tolist() == [0.0] * G and (second.advantages != 0).sum() >= 2
    total = algo.num_items(first) + algo.num_items(second)
    loss, _ = algo.loss(model, first, total)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    algo.loss(model, second, total)[0].backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) > 1e-4


# ----------------------------------------------------------------------------------- dynamic sampling


def constant_for_first(prompts, completions, **kwargs):
    return [1.0 if p == PROMPTS[0] else float(len(c)) for p, c in zip(prompts, completions)]


def test_dynamic_sampling_drops_zero_std_groups_and_resamples(tmp_path, tokenizer, rollouts):
    """Prompt 0 always scores 1 (std 0). Round 1 keeps prompt 1's group only; round 2 draws two other distinct
    prompts, at least one of them informative, which fills the batch: 2 rounds, every kept group varies."""
    exs = examples(tokenizer)
    algo = GRPO(make_cfg(tmp_path, dynamic_sampling=True), tokenizer, [("r", constant_for_first)], exs)
    batch = algo.prepare(tiny_model(tokenizer), exs[:2])
    [mb], m = batch, batch.metrics
    assert m["sampling_rounds"] == 2.0 and len(rollouts) == 2
    assert m["frac_reward_zero_std"] == 0.0 and len(mb) == 2 * G
    assert exs[0].prompt_ids not in mb.prompts and mb.prompts[0] == exs[1].prompt_ids
    assert len(rollouts[1].prompt_ids) == 2 and rollouts[1].prompt_ids[0] != rollouts[1].prompt_ids[1]
    for g in range(2):
        assert mb.advantages[g * G : (g + 1) * G].abs().sum() > 0


def test_dynamic_sampling_gives_up_after_max_rounds(tmp_path, tokenizer, rollouts):
    exs = examples(tokenizer)
    algo = GRPO(make_cfg(tmp_path, dynamic_sampling=True, max_sampling_rounds=3), tokenizer,
                [("one", lambda prompts, completions, **kw: [1.0] * len(completions))], exs)
    batch = algo.prepare(tiny_model(tokenizer), exs[:2])
    [mb], m = batch, batch.metrics
    assert m["sampling_rounds"] == 3.0 and len(rollouts) == 3
    assert m["frac_reward_zero_std"] == 1.0 and len(mb) == 2 * G and mb.advantages.abs().sum() == 0


def test_dynamic_sampling_judges_the_weighted_total(tmp_path, tokenizer, rollouts):
    """Two rewards that always add up to 1 ((1, 0) for an even character count, (0, 1) for odd): unweighted the
    groups look constant, but with weights (1, 0.5) the totals are 1 and 0.5, which is signal: one round."""

    def even(prompts, completions, **kwargs):
        return [float(len(c) % 2 == 0) for c in completions]

    def odd(prompts, completions, **kwargs):
        return [float(len(c) % 2 == 1) for c in completions]

    exs = examples(tokenizer)
    algo = GRPO(make_cfg(tmp_path, dynamic_sampling=True, reward_weights=[1.0, 0.5], seed=2), tokenizer,
                [("even", even), ("odd", odd)], exs)
    batch = algo.prepare(tiny_model(tokenizer), exs[:2])
    [mb] = batch
    parity = [len(t) % 2 for t in rollouts[0].texts]
    assert 0 < sum(parity[:G]) < G and 0 < sum(parity[G:]) < G  # both groups mix even and odd
    assert batch.metrics["sampling_rounds"] == 1.0
    assert batch.metrics["reward"] == pytest.approx(1 - 0.5 * sum(parity) / (2 * G))
    assert (mb.advantages > 0).tolist() == [p == 0 for p in parity]  # weighted total 1 (even) beats 0.5 (odd)


# ------------------------------------------------------------------------------------ truncation mask


def test_mask_truncated_completions(tmp_path, tokenizer, rollouts):
    """Rows that hit max_completion_length without EOS get an all-zero mask: the gradient is that of the
    non-truncated rows alone (dapo: divided by their token count)."""
    model = eos_model(tokenizer)
    algo = GRPO(make_cfg(tmp_path, mask_truncated_completions=True), tokenizer, [("chars", chars)],
                examples(tokenizer))
    batch = algo.prepare(model, examples(tokenizer)[:2])
    [mb] = batch
    truncated = rollouts[0].truncated
    assert 0 < int(truncated.sum()) < 2 * G
    assert batch.metrics["completions/clipped_ratio"] == pytest.approx(float(truncated.float().mean()))
    assert (mb.completion_mask[truncated] == 0).all() and (mb.completion_mask[~truncated].sum(-1) > 0).all()
    loss, _ = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)
    keep = (~truncated).float()[:, None] * rollouts[0].completion_mask[:, : mb.completion_ids.shape[1]].float()
    (-(mb.advantages[:, None] * naive_logps(model, mb) * keep).sum() / keep.sum()).backward()
    assert_same_grads(g_trainer, grads(model))


def test_every_completion_truncated_gives_zero_loss_not_nan(tmp_path, tiny_model_dir, data, rewards_module):
    """The random model never ends a 6-token completion: with masking, the step has 0 scored tokens. Its dapo
    loss is 0 (it was 0/0 = NaN before) and the weights do not move."""
    out = tmp_path / "run"
    assert cli.main(cli_args(tiny_model_dir, data, out, f"reward_funcs={rewards_module}:chars",
                             "mask_truncated_completions=true", "max_steps=2", "learning_rate=0.01",
                             f"seed={NO_EOS_SEED}")) == 0
    rows = metrics(out)
    assert [(r["loss"], r["grad_norm"], r["completions/clipped_ratio"]) for r in rows] == [(0.0, 0.0, 1.0)] * 2
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = final_weights(out)
    assert all(torch.equal(before[n], after[n]) for n in before)


# ------------------------------------------------------------------------------- seeding and resuming


def test_same_seed_same_run_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data, rewards_module):
    """Same seed twice: identical completions and final weights; another seed: other completions. Resuming from
    the step-1 checkpoint of a 2-step run ends on the same weights (the sampling round is checkpointed: the
    resumed run samples step 2 with the seeds of the uninterrupted one)."""
    base = [f"reward_funcs={rewards_module}:chars", "max_steps=2", "learning_rate=0.02", "log_completions=true"]
    a, b, c, d = (tmp_path / x for x in "abcd")
    assert cli.main(cli_args(tiny_model_dir, data, a, *base, "save_steps=1")) == 0
    assert cli.main(cli_args(tiny_model_dir, data, b, *base)) == 0
    assert cli.main(cli_args(tiny_model_dir, data, c, *base, "seed=7")) == 0
    done_a = (a / "completions.jsonl").read_text()
    assert len(done_a.splitlines()) == 2 * 2 * G
    assert done_a == (b / "completions.jsonl").read_text() != (c / "completions.jsonl").read_text()
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)

    (d / "checkpoint-1").mkdir(parents=True)
    for f in (a / "checkpoint-1").iterdir():
        (d / "checkpoint-1" / f.name).write_bytes(f.read_bytes())
    assert cli.main(cli_args(tiny_model_dir, data, d, *base, "resume_from_checkpoint=latest")) == 0
    # the resumed run logged the completions of step 2 only: the last half of the uninterrupted log
    assert (d / "completions.jsonl").read_text().splitlines() == done_a.splitlines()[2 * G :]
    wd = final_weights(d)
    assert all(torch.equal(wa[n], wd[n]) for n in wa)
    assert [r["step"] for r in metrics(d)] == [2]
    assert [r["loss"] for r in metrics(d)] == [r["loss"] for r in metrics(a)][1:]


# ----------------------------------------------------------------------------------- metrics, logging


def test_metric_names_and_completion_log(tmp_path, tiny_model_dir, data, rewards_module):
    out = tmp_path / "run"
    assert cli.main(cli_args(tiny_model_dir, data, out, f"reward_funcs={rewards_module}:has_e", "beta=0.04",
                             "max_steps=2", "log_completions=true", f"seed={NO_EOS_SEED}")) == 0
    rows = metrics(out)
    names = {"reward", "reward_std", f"rewards/{rewards_module}:has_e/mean", "frac_reward_zero_std",
             "completions/mean_length", "completions/clipped_ratio", "kl", "entropy", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "generation_seconds", "sampling_rounds",
             "reward_failures", "reward_timeouts", "loss", "grad_norm", "learning_rate"}
    assert len(rows) == 2 and all(names <= set(r) for r in rows)
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 2 * G
    assert set(logged[0]) == {"step", "prompt_index", "completion", "rewards", "advantage"}
    for step, r in enumerate(rows):
        part = logged[step * 2 * G : (step + 1) * 2 * G]
        assert {x["step"] for x in part} == {step + 1}
        scores = [float("e" in x["completion"]) for x in part]
        assert [x["rewards"] for x in part] == [[s] for s in scores]
        assert r["reward"] == pytest.approx(sum(scores) / len(scores))
        assert r[f"rewards/{rewards_module}:has_e/mean"] == r["reward"]
        torch.testing.assert_close(torch.tensor([x["advantage"] for x in part]),
                                   group_advantages(torch.tensor(scores), G))
        # a random model over a ~320-token vocabulary: the entropy is close to ln(320) = 5.77 nats
        assert r["entropy"] == pytest.approx(5.77, abs=0.1) and r["completions/mean_length"] == L


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("args, message", [
    (["num_generations=1"], "num_generations must be >= 2"),
    (["loss_type=ppo"], "'ppo' is not one of grpo, bnpo, dr_grpo, dapo"),
    (["reward_funcs=acuracy"], "unknown reward function 'acuracy'"),
    (["reward_funcs=no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["reward_funcs=accuracy,format", "reward_weights=[1.0]"], "reward_weights: 1 weights for 2 reward functions"),
    (["reward_weights=[1.0, 0.5]"], "reward_weights: 2 weights for 1 reward functions"),
    (["multi_objective_aggregation=normalize_then_sum", "scale_rewards=batch"], "needs scale_rewards=group"),
])
def test_config_errors_exit_2_before_loading_a_model(tmp_path, data, capsys, args, message):
    """The model path does not exist: reaching the model would print 'model path not found' instead."""
    rc = cli.main(["grpo", "model=./no/such/model", f"dataset={data}", f"output_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "model path not found" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- real data


@needs_shared_data
def test_two_steps_on_gsm8k(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    rc = cli.main(["grpo", f"model={tiny_model_dir}", f"dataset={SHARED_DATA / 'gsm8k_train.jsonl'}",
                   "max_samples=4", "batch_size=2", "num_generations=2", "max_completion_length=8",
                   "micro_batch_size=4", "max_steps=2", f"output_dir={out}", "progress=false", f"seed={NO_EOS_SEED}"])
    assert rc == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # the gold `answer` column reached the accuracy reward (NaN otherwise); random text is wrong
        assert r["rewards/accuracy/mean"] == 0.0 and r["reward"] == 0.0 and r["frac_reward_zero_std"] == 1.0
        assert r["completions/clipped_ratio"] == 1.0 and r["loss"] == 0.0


def test_resume_mid_batch_finishes_the_same_rollouts(tmp_path, tiny_model_dir, data, rewards_module):
    """num_iterations=2, checkpoint after step 1 (half-way through the first batch): the resumed run takes
    step 2 on the saved rollouts (no new sampling) and step 3 on a new batch, ending on the uninterrupted
    run's weights."""
    base = [f"reward_funcs={rewards_module}:chars", "max_steps=3", "learning_rate=0.02", "num_iterations=2",
            "log_completions=true"]
    a, d = tmp_path / "a", tmp_path / "d"
    assert cli.main(cli_args(tiny_model_dir, data, a, *base, "save_steps=1")) == 0
    # tensors + JSON, nothing pickled: a checkpoint swapped in by someone else cannot run code on resume
    assert {f.name for f in (a / "checkpoint-1").glob("prepared-0.*")} == {"prepared-0.json", "prepared-0.safetensors"}
    (d / "checkpoint-1").mkdir(parents=True)
    for f in (a / "checkpoint-1").iterdir():
        (d / "checkpoint-1" / f.name).write_bytes(f.read_bytes())
    assert cli.main(cli_args(tiny_model_dir, data, d, *base, "resume_from_checkpoint=latest")) == 0
    # only the second batch (step 3) was sampled after resuming
    assert (d / "completions.jsonl").read_text().splitlines() == (a / "completions.jsonl").read_text().splitlines()[2 * G :]
    wa, wd = final_weights(a), final_weights(d)
    assert all(torch.equal(wa[n], wd[n]) for n in wa)
    assert [r["loss"] for r in metrics(d)] == [r["loss"] for r in metrics(a)][1:]
    # The rollout's metrics are saved with its batch: the resumed step 2 logs them as the uninterrupted run did.
    for key in ("reward", "reward_std", "completions/mean_length", "sampling_rounds"):
        assert [r[key] for r in metrics(d)] == [r[key] for r in metrics(a)][1:], key
