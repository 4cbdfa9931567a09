"""`posttrain ppo` on the tiny model: the critic's values, GAE advantages and value targets against a hand computation
on plain forwards, the loss and every gradient (policy, LoRA adapters, value head, separate critic), mini-batches,
the critic's initialisation and learning rate, one copy of the base weights with LoRA + shared critic, a run whose
rule-based reward rises (shared and separate critic), stop and resume, metric names, config errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import REWARDS_MODULE, chars, grads, metrics, naive_logps
from transformers import AutoModelForSequenceClassification

from posttrain import cli, models, reference
from posttrain.algorithms.ppo import PPO, Config
from posttrain.config import LoraConfig, UserError, load_config
from posttrain.critic import SeparateCritic, SharedCritic
from posttrain.critic import build as build_critic
from posttrain.engine import Engine, make_optimizer
from posttrain.losses.advantages import gae, masked_whiten, token_rewards
from posttrain.losses.policy import policy_loss
from posttrain.losses.value import value_loss
from posttrain.models import ATTACHED, prepare_model, unwrap
from posttrain.rollout.groups import PromptExample

PROMPTS = ["What is 12 + 7?", "2 + 2 =", "Human: How do I bake bread?", "the a an is of"]
L = 6  # max_completion_length


def examples(tok):
    return [PromptExample(i, p, tok(p)["input_ids"], {}) for i, p in enumerate(PROMPTS)]


def make(tmp_path, model_dir, critic="shared", lora=None, **kw):
    """The ppo config, the policy (+ LoRA), its reference and critic, as `posttrain ppo` builds them."""
    base = {"model": model_dir, "output_dir": str(tmp_path / "run"), "critic": critic, "num_generations": 1,
            "max_completion_length": L, "temperature": 1.0, "batch_size": 4, "micro_batch_size": 4,
            "learning_rate": 1e-2, "max_grad_norm": 0.0, "lr_scheduler": "constant", "progress": False, "seed": 0,
            "num_iterations": 1, "kl_coef": 0.1, "chat_prompts": False}
    cfg = Config(**{**base, **kw}, lora=lora)
    cfg.validate()
    tok, model = prepare_model(cfg)
    ref = reference.build(model, needed=cfg.beta > 0 or cfg.kl_coef > 0)
    crit = build_critic(cfg, model)
    return cfg, tok, model, ref, crit


def randomise_heads(critic):
    """A fresh head starts at zero: give it values so the checks below are not checks of zeros."""
    torch.manual_seed(3)
    head = critic.module.linear if isinstance(critic, SharedCritic) else unwrap(critic.module).score
    head = getattr(head, "modules_to_save", {"x": head})
    for h in head.values():
        with torch.no_grad():
            h.weight.normal_(0, 0.5)


def naive_values(critic, policy, mb):
    """V of every completion token from a plain forward of prompt + completion, one row at a time: the head on the
    final hidden state at the position before the token."""
    owner = policy if isinstance(critic, SharedCritic) else critic.module
    base = unwrap(owner)
    head = critic.module if isinstance(critic, SharedCritic) else (lambda h: base.score(h)[..., 0])
    rows = []
    for i in range(len(mb)):
        p = mb.prompts[int(mb.row_prompt[i])]
        ids = torch.tensor([p + mb.completion_ids[i].tolist()])
        h = base.model(input_ids=ids).last_hidden_state[0]
        rows.append(head(h[len(p) - 1 : len(p) - 1 + mb.completion_ids.shape[1]]).float())
    return torch.stack(rows) * mb.completion_mask.float()


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_values_advantages_and_targets_by_hand(tmp_path, tiny_model_dir, critic):
    """kl_coef 0.1 (k1) against a frozen reference copy moved away from the policy: per-token rewards -0.1 (logp -
    ref) + the score on the last token; GAE (gamma 1, lam 0.95) over the critic's values from plain forwards,
    whitened over the batch's tokens; value targets = unwhitened advantages + values."""
    cfg, tok, model, ref, crit = make(tmp_path, tiny_model_dir, critic)
    randomise_heads(crit)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    record = []

    def reward(prompts, completions, **kw):
        record.extend(chars(prompts, completions))
        return record[-len(completions):]

    algo = PPO(cfg, tok, [("chars", reward)], examples(tok), ref, critic=crit)
    batch = algo.prepare(model, examples(tok))
    [mb] = batch
    mask = mb.completion_mask.float()
    values = naive_values(crit, model, mb).detach()
    torch.testing.assert_close(mb.values, values, atol=1e-5, rtol=1e-4)
    assert values.abs().max() > 0.1
    kl = (naive_logps(model, mb, temperature=1.0) - naive_logps(ref.model, mb, temperature=1.0)).detach() * mask
    rewards = token_rewards(torch.tensor(record), mask, -0.1 * kl)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(mb.advantages, masked_whiten(adv, mask), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mb.returns, ret, atol=1e-4, rtol=1e-4)
    assert mb.advantages.shape == mask.shape and float(kl.abs().sum()) > 0.01
    assert batch.metrics["objective/kl"] == pytest.approx(float(kl.sum(-1).mean()), rel=1e-3, abs=1e-5)
    assert batch.metrics["objective/scores"] == pytest.approx(sum(record) / len(record))
    ev = 1 - ((ret - values)[mask > 0]).var(unbiased=False) / ret[mask > 0].var(unbiased=False)
    assert batch.metrics["val/explained_variance"] == pytest.approx(float(ev), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("critic, lora", [("shared", None), ("separate", None), ("shared", 4), ("separate", 4)])
def test_loss_and_every_gradient_equal_the_hand_computation(tmp_path, tiny_model_dir, critic, lora):
    """After the rollout the policy and the critic move (as an earlier update would), so the ratio differs from 1
    and some values leave the clip range. The trainer's loss and the gradient of EVERY trainable parameter (the
    policy or its LoRA adapters, the value head or the separate critic, its adapters and head) equal
    policy_loss(dapo) + 0.1 x value_loss(cliprange 0.2) on plain full-softmax forwards."""
    lora_cfg = LoraConfig(r=lora, target_modules=["q_proj", "v_proj", "down_proj"]) if lora else None
    cfg, tok, model, ref, crit = make(tmp_path, tiny_model_dir, critic, lora_cfg, num_iterations=2)
    randomise_heads(crit)
    algo = PPO(cfg, tok, [("chars", chars)], examples(tok), ref, critic=crit)
    [mb] = algo.prepare(model, examples(tok))
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for an earlier update; lora_B leaves zero, so lora_A gets a gradient too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if p.ndim == 2 and p.shape[0] == 1 else 0.05))
    loss, m = algo.loss(model, mb, algo.num_items(mb))
    loss.backward()
    g_trainer = grads(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(g_trainer) == trainable and all(g.abs().max() > 0 for g in g_trainer.values()), \
        sorted(n for n in trainable if n not in g_trainer or not g_trainer[n].abs().max() > 0)
    assert any(n.startswith(f"{ATTACHED}.critic.") for n in trainable)
    if lora:
        assert any("lora_B" in n and "critic" not in n for n in trainable)
        assert critic == "shared" or any("lora_A" in n and "critic" in n for n in trainable)

    mask = mb.completion_mask.float()
    logps = naive_logps(model, mb, temperature=1.0)
    new_values = naive_values(crit, model, mb)
    pg, _ = policy_loss(logps, mb.old_logps, mb.advantages, mask, loss_type="dapo")
    vf, vm = value_loss(new_values, mb.values, mb.returns, mask, cliprange_value=0.2, loss_type="dapo")
    (pg + 0.1 * vf).backward()
    g_hand = grads(model)
    for n in g_trainer:
        scale = float(g_hand[n].abs().max())
        assert float((g_trainer[n] - g_hand[n]).abs().max()) <= 1e-4 * scale + 1e-7, n
    assert float(loss.detach()) == pytest.approx(float((pg + 0.1 * vf).detach()), rel=1e-5)
    assert m["loss/value_avg"] == pytest.approx(float(vf.detach()), rel=1e-5)
    assert m["loss/policy_avg"] == pytest.approx(float(pg.detach()), rel=1e-4, abs=1e-6)
    assert m["val/clipfrac_avg"] == pytest.approx(float(vm["clipfrac"])) and 0 < m["val/clipfrac_avg"] < 1
    ratio = torch.exp(logps.detach() - mb.old_logps)
    assert m["policy/approxkl_avg"] == pytest.approx(float(0.5 * ((logps.detach() - mb.old_logps) ** 2 * mask).sum()
                                                           / mask.sum()), rel=1e-4)
    assert m["val/ratio"] == pytest.approx(float((ratio * mask).sum() / mask.sum()), rel=1e-5)


def test_mini_batches_and_epochs(tmp_path, tiny_model_dir):
    """batch_size 2, num_mini_batches 2, num_ppo_epochs 2: one rollout of 4 prompts serves 4 optimizer steps, on its
    prompts 0-1, 2-3, 0-1, 2-3; every step's ratio is against the rollout's log-probs (the first step is
    on-policy: ratio 1)."""
    cfg, tok, model, ref, crit = make(tmp_path, tiny_model_dir, num_iterations=2, num_mini_batches=2, max_steps=8,
                                      batch_size=2, micro_batch_size=2)
    assert cfg.generation_batch_size == 4
    seen = []

    class Spy(PPO):
        def loss(self, model, mb, total_items):
            seen.append(mb.completion_ids[:, 0].tolist())
            return super().loss(model, mb, total_items)

    exs = examples(tok)
    Engine(cfg, model, tok, Spy(cfg, tok, [("chars", chars)], exs, ref, critic=crit), exs).train()
    rows = metrics(tmp_path / "run")
    assert len(rows) == 8 and len({r["generation_seconds"] for r in rows}) == 2  # two rollouts
    assert seen[0] == seen[2] != seen[1] == seen[3] and seen[4] == seen[6] != seen[5] == seen[7]
    # (the sampler's log-probs equal a training forward's to float rounding)
    assert rows[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5) and abs(rows[1]["val/ratio"] - 1.0) > 1e-3


def test_critic_initialisation_and_learning_rate(tmp_path, tiny_model_dir, tokenizer):
    """critic: separate starts from reward_model (its trained head kept), from value_model, else from the policy's
    weights with a zero head; critic_learning_rate puts the critic's parameters in groups of their own."""
    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        rm.score.weight.fill_(0.25)
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    _, _, _, _, from_policy = make(tmp_path, tiny_model_dir, "separate")
    assert from_policy.source == tiny_model_dir and unwrap(from_policy.module).score.weight.abs().max() == 0
    for key in ("reward_model", "value_model"):
        cfg, tok, model, _, crit = make(tmp_path, tiny_model_dir, "separate", **{key: str(rm_dir)})
        assert isinstance(crit, SeparateCritic) and crit.source == str(rm_dir)
        assert torch.all(unwrap(crit.module).score.weight == 0.25)
        assert models.attached(model)["critic"] is crit.module
    cfg, tok, model, ref, crit = make(tmp_path, tiny_model_dir, "shared", critic_learning_rate=0.5)
    algo = PPO(cfg, tok, [("chars", chars)], examples(tok), ref, critic=crit)
    opt = make_optimizer(model, cfg, algo.learning_rate_of)
    head = {id(p) for p in crit.module.parameters()}
    lrs = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lrs[id(p)] = group["lr"]
    assert {lrs[i] for i in head} == {0.5} and {lr for i, lr in lrs.items() if i not in head} == {1e-2}
    assert len(lrs) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lora_with_a_shared_critic_holds_one_copy_of_the_base_weights(tmp_path, tiny_model_dir, monkeypatch):
    """LoRA policy + reference = adapter off + critic: shared: one model is loaded, nothing is copied, and every
    parameter in memory is the policy's (base, adapters) or the value head's."""
    loads = []
    real = models.load_model
    monkeypatch.setattr(reference, "frozen_copy", lambda model: pytest.fail("LoRA must not copy the model"))
    import posttrain.critic as critic_module

    monkeypatch.setattr(critic_module, "load_model", lambda *a, **k: pytest.fail("a shared critic loads no model"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    cfg, tok, model, ref, crit = make(tmp_path, tiny_model_dir, "shared", LoraConfig(r=4))
    assert ref.strategy == "adapter" and crit.kind == "shared" and len(loads) == 1
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n and ATTACHED not in n}
    fresh = real(tiny_model_dir)
    assert sum(p.numel() for p in base.values()) == sum(p.numel() for p in fresh.parameters())
    assert crit.footprint().parameters == 33  # hidden size 32 + bias


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    import sys

    (tmp_path / "ppo_test_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ppo_test_rewards", raising=False)
    return "ppo_test_rewards"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def ppo_args(model_dir, data, out, rewards, *extra):
    return ["ppo", f"model={model_dir}", f"dataset={data}", f"output_dir={out}", f"reward_funcs={rewards}:chars",
            f"max_completion_length={L}", "batch_size=4", "micro_batch_size=4", "progress=false",
            "chat_prompts=false", "temperature=1.0", "lr_scheduler=constant", *extra]


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_rule_based_reward_rises(tmp_path, tiny_model_dir, data, rewards_module, critic):
    """The reward counts the completion's characters; the random tiny model writes about 7 in 6 tokens. After 30
    rollouts of 4 completions the mean score of the last 5 is more than twice that of the first 5 (measured: ~30
    and ~48 against ~7 with a separate and a shared critic). The critic is saved beside the policy, which holds
    nothing of it."""
    out = tmp_path / critic
    assert cli.main(ppo_args(tiny_model_dir, data, out, rewards_module, f"critic={critic}", "max_steps=30",
                             "learning_rate=2e-2", "num_iterations=1", "kl_coef=0.01")) == 0
    scores = [r["objective/scores"] for r in metrics(out)]
    assert len(scores) == 30
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > 2 * first, scores
    if critic == "shared":
        assert set(load_file(str(out / "critic.safetensors"))) == {"linear.weight", "linear.bias"}
    else:
        saved = AutoModelForSequenceClassification.from_pretrained(out / "critic")
        assert saved.score.weight.abs().max() > 0  # trained from its zero start
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(Path(tiny_model_dir) / "model.safetensors")))


def test_stop_and_resume_mid_rollout_equals_uninterrupted(tmp_path, tiny_model_dir, data, rewards_module):
    """num_iterations 2 x num_mini_batches 2 = 4 steps a rollout, an adaptive kl_coef, a separate critic: resumed
    from checkpoint-2 (the middle of the first rollout), the run ends on the uninterrupted run's policy AND critic,
    logging the same losses."""
    base = ["critic=separate", "max_steps=6", "learning_rate=1e-2", "num_iterations=2", "num_mini_batches=2",
            "batch_size=2",
            "kl_target=0.5", "kl_coef=0.05", "kl_estimator=k3"]
    a, d = tmp_path / "a", tmp_path / "d"
    assert cli.main(ppo_args(tiny_model_dir, data, a, rewards_module, *base, "save_steps=2")) == 0
    (d / "checkpoint-2").mkdir(parents=True)
    for f in (a / "checkpoint-2").iterdir():
        (d / "checkpoint-2" / f.name).write_bytes(f.read_bytes())
    assert cli.main(ppo_args(tiny_model_dir, data, d, rewards_module, *base, "resume_from_checkpoint=latest")) == 0
    for name in ("model.safetensors", "critic/model.safetensors"):
        wa, wd = load_file(str(a / name)), load_file(str(d / name))
        assert wa.keys() == wd.keys() and all(torch.equal(wa[k], wd[k]) for k in wa), name
    ra, rd = metrics(a), metrics(d)
    assert [r["step"] for r in rd] == [3, 4, 5, 6]
    for key in ("loss", "loss/value_avg", "objective/kl_coef", "objective/scores"):
        assert [r[key] for r in rd] == [r[key] for r in ra][2:], key


def test_metric_names_are_trls_ppo_names(tmp_path, tiny_model_dir, data, rewards_module):
    out = tmp_path / "run"
    assert cli.main(ppo_args(tiny_model_dir, data, out, rewards_module, "max_steps=2", "critic=shared")) == 0
    names = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/clipfrac_avg", "val/num_eos_tokens", "val/explained_variance", "policy/entropy_avg", "loss",
             "completions/mean_length", f"rewards/{rewards_module}:chars/mean"}
    rows = metrics(out)
    assert all(names <= set(r) for r in rows)
    assert not {"reward", "frac_reward_zero_std", "entropy"} & set(rows[0])  # GRPO's names stay GRPO's
    assert rows[0]["objective/rlhf_reward"] == pytest.approx(rows[0]["objective/scores"] + rows[0]["objective/non_score_reward"],
                                                            rel=1e-5, abs=1e-6)


def test_trl_ppo_names_are_accepted(tmp_path):
    cfg = load_config(Config, None, ["num_ppo_epochs=3", "cliprange=0.1", "response_length=12", f"output_dir={tmp_path}"])
    assert (cfg.num_iterations, cfg.epsilon, cfg.max_completion_length) == (3, 0.1, 12)
    cfg = load_config(Config, None, [f"output_dir={tmp_path}", "dataset=prompts.jsonl"])
    assert (cfg.advantage_estimator, cfg.critic, cfg.num_generations, cfg.kl_coef, cfg.num_iterations, cfg.lora) == \
        ("gae", "separate", 1, 0.05, 4, None)
    # No dataset: the built-in task with the README's PPO run (LoRA, shared critic).
    cfg = load_config(Config, None, [f"output_dir={tmp_path}"])
    assert (cfg.critic, cfg.lora.r, cfg.batch_size, cfg.max_steps) == ("shared", 16, 32, 80)
    assert load_config(Config, None, [f"output_dir={tmp_path}"]).lora is not cfg.lora  # each run its own block


@pytest.mark.parametrize("args, message", [
    (["critic=none"], "advantage_estimator=gae needs a critic"),
    (["advantage_estimator=rloo", "num_generations=4"], "critic: separate trains a value model"),
    (["critic=shared", "value_model=x"], "value_model is where a separate critic starts from"),
    (["critic_learning_rate=0"], "critic_learning_rate must be > 0"),
    (["num_mini_batches=0"], "num_mini_batches must be >= 1"),
    (["cliprange_value=0"], "cliprange_value > 0"),
    (["critic=sharde"], "'sharde' is not one of none, shared, separate"),
])
def test_config_errors_exit_2_before_loading_a_model(tmp_path, data, capsys, args, message):
    rc = cli.main(["ppo", "model=./no/such/model", f"dataset={data}", f"output_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "model path not found" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_vocabulary_mismatch_is_a_user_error(tmp_path, tiny_model_dir):
    from posttrain.testing import tiny_model, tiny_tokenizer

    other = tmp_path / "small"
    tok = tiny_tokenizer()
    tiny_model(tok, vocab_size=100).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="has a vocabulary of 100 tokens, the policy"):
        make(tmp_path, tiny_model_dir, "separate", value_model=str(other))
