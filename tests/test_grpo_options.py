"""GRPO's TRL options that need algorithm support: top_entropy_quantile, entropy_coef, generation_batch_size
(TRL's steps_per_generation), num_generations_eval, min_p / repetition_penalty / generation_kwargs,
chat_template_kwargs and sync_ref_model. On the tiny model, against naive full-softmax computations."""

import pytest
import torch
from test_grpo import TEMP, G, chars, eos_model, examples, grads, make_cfg, metrics, naive_logps

from posttrain.algorithms import grpo
from posttrain.algorithms.grpo import GRPO, Config
from posttrain.config import UserError
from posttrain.engine import Engine
from posttrain.losses.policy import policy_loss
from posttrain.reference import Sync, build
from posttrain.rollout.generate import HFEngine, filter_logits
from posttrain.rollout.groups import prompt_examples
from posttrain.testing import tiny_model


def naive_entropy(model, mb, temperature=TEMP):
    """Per-token entropy of the tempered predictive distribution, full softmax, plain sequences (with grad)."""
    rows = []
    for i in range(len(mb)):
        p = mb.prompts[int(mb.row_prompt[i])]
        ids = torch.tensor([p + mb.completion_ids[i].tolist()])
        logits = model(input_ids=ids).logits[0].float() / temperature
        logp = logits.log_softmax(-1)
        h = -(logp.exp() * logp).sum(-1)  # position t predicts token t + 1
        rows.append(h[len(p) - 1 : len(p) - 1 + mb.completion_ids.shape[1]])
    return torch.stack(rows) * mb.completion_mask


def assert_close_grads(a, b, rel=1e-4):
    assert set(a) == set(b) and max(float(g.abs().max()) for g in a.values()) > 1e-5
    for n in a:
        assert float((a[n] - b[n]).abs().max()) <= rel * float(b[n].abs().max()) + 1e-9, n


# --------------------------------------------------------------------------------------- entropy


def test_top_entropy_quantile_trains_only_the_top_tokens_of_the_step(tmp_path, tokenizer):
    """rho = 0.3: the threshold is the 0.7 quantile of every completion token's entropy in the step (here three
    micro-batches), so the selection and the gradient do not depend on how the step is split; the policy term of
    the other tokens is 0. Checked against entropies and log-probs from a plain full-softmax forward."""
    model = eos_model(tokenizer)
    results = {}
    for size in (8, 3):
        cfg = make_cfg(tmp_path, micro_batch_size=size, top_entropy_quantile=0.3)
        algo = GRPO(cfg, tokenizer, [("chars", chars)], examples(tokenizer))
        micro = algo.prepare(model, examples(tokenizer)[:2])
        with torch.no_grad():
            entropies = [naive_entropy(model, mb) for mb in micro]
        values = torch.cat([e[mb.completion_mask.bool()] for e, mb in zip(entropies, micro)])
        threshold = torch.quantile(values, 0.7)
        total = sum(algo.num_items(mb) for mb in micro)
        hand = 0.0
        for e, mb in zip(entropies, micro):
            expected = ((e >= threshold) & mb.completion_mask.bool()).long()
            assert int((mb.entropy_mask != expected).sum()) <= 1  # float32 ties at the threshold at most
            loss, _ = algo.loss(model, mb, total)
            loss.backward()
            hand = hand + policy_loss(naive_logps(model, mb), None, mb.advantages, mb.completion_mask.float(),
                                      num_items=total, entropy_mask=mb.entropy_mask, loss_type="dapo")[0]
        kept = sum(int(mb.entropy_mask.sum()) for mb in micro) / len(values)
        assert 0.25 <= kept <= 0.35
        g_trainer = grads(model)
        hand.backward()
        assert_close_grads(g_trainer, grads(model))
        results[size] = (torch.cat([mb.entropy_mask.flatten() for mb in micro]).sum(), g_trainer)
    assert results[3][0] == results[8][0]
    assert_close_grads(results[3][1], results[8][1])


def test_entropy_bonus_gradient_is_the_mean_entropy_gradient(tmp_path, tokenizer):
    """entropy_coef = 0.5: loss = policy loss - 0.5 x (sum of the trained tokens' entropies / their count over
    the step). The entropy's gradient flows through the chunked LM head; checked against autograd on a plain
    full softmax, for the whole step in one micro-batch and in three."""
    model = eos_model(tokenizer)
    for size in (8, 3):
        cfg = make_cfg(tmp_path, micro_batch_size=size, entropy_coef=0.5)
        algo = GRPO(cfg, tokenizer, [("chars", chars)], examples(tokenizer))
        micro = algo.prepare(model, examples(tokenizer)[:2])
        tokens = sum(float(mb.completion_mask.sum()) for mb in micro)
        assert all(mb.entropy_tokens == tokens for mb in micro)
        total = sum(algo.num_items(mb) for mb in micro)
        hand = 0.0
        for mb in micro:
            loss, _ = algo.loss(model, mb, total)
            loss.backward()
            policy = policy_loss(naive_logps(model, mb), None, mb.advantages, mb.completion_mask.float(), num_items=total,
                                 loss_type="dapo")[0]
            hand = hand + policy - 0.5 * naive_entropy(model, mb).sum() / tokens
        g_trainer = grads(model)
        hand.backward()
        assert_close_grads(g_trainer, grads(model))


# --------------------------------------------------------------------------- generation_batch_size


def test_one_generation_serves_several_steps(tmp_path, tokenizer, monkeypatch):
    """generation_batch_size = 2 x (batch_size x G): every generation samples two steps' prompts at once; the two
    steps train on different prompts, the second one off-policy (ratios against the sampling log-probs)."""
    seen = []

    class Spy(HFEngine):
        def generate(self, prompt_ids, *args, **kwargs):
            seen.append(prompt_ids)
            return super().generate(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(grpo, "HFEngine", Spy)
    cfg = make_cfg(tmp_path, batch_size=1, micro_batch_size=G, generation_batch_size=2 * G, max_steps=4,
                   learning_rate=0.05)
    exs = examples(tokenizer)
    algo = GRPO(cfg, tokenizer, [("chars", chars)], exs)
    assert (algo.parts_per_batch, algo.steps_per_batch) == (2, 2)
    trained = []
    loss = algo.loss

    def spy_loss(model, mb, total):
        trained.append(tuple(mb.prompts[0]))
        return loss(model, mb, total)

    algo.loss = spy_loss
    Engine(cfg, eos_model(tokenizer), tokenizer, algo, exs).train()
    assert len(seen) == 2 and all(len(p) == 2 for p in seen)  # 2 generations of 2 prompts for 4 steps
    assert trained == [tuple(p) for batch in seen for p in batch]  # each step its own prompt, in order
    rows = metrics(tmp_path / "run")
    assert rows[0]["clip_ratio/region_mean"] == 0.0 and rows[1]["clip_ratio/region_mean"] > 0
    assert rows[0]["generation_seconds"] == rows[1]["generation_seconds"] != rows[2]["generation_seconds"]
    # One epoch of the 4 prompts: 4 steps, whatever the generation size.
    cfg = make_cfg(tmp_path, batch_size=1, micro_batch_size=G, generation_batch_size=2 * G,
                   output_dir=str(tmp_path / "epoch"))
    assert Engine(cfg, tiny_model(tokenizer), tokenizer, GRPO(cfg, tokenizer, [("chars", chars)], exs), exs).total_steps == 4


# ------------------------------------------------------------------------------------- sampling


def test_min_p_filter_values():
    """p = (0.5, 0.3, 0.15, 0.05); min_p = 0.2 keeps p >= 0.1: the first three."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = filter_logits(logits, min_p=0.2)
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]
    assert torch.equal(out[0, :3], logits[0, :3])


def test_repetition_penalty_and_recorded_logps(tokenizer):
    """A huge penalty (greedy): no generated token repeats one of its prompt or its completion; the recorded
    log-probs are still the policy's own (no penalty), as a ratio against the trained policy needs."""
    model = tiny_model(tokenizer)
    prompt = tokenizer("What is 12 + 7?")["input_ids"]
    out = HFEngine(model, tokenizer).generate([prompt], 1, max_new_tokens=12, temperature=0.0,
                                              repetition_penalty=1e6)
    ids = out.completion_ids[0, : int(out.completion_mask[0].sum())].tolist()
    assert len(set(ids)) == len(ids) and not set(ids) & set(prompt)
    plain = HFEngine(model, tokenizer).generate([prompt], 1, max_new_tokens=12, temperature=0.0)
    assert plain.completion_ids[0].tolist() != out.completion_ids[0].tolist()  # the penalty changed the text
    full = torch.tensor([prompt + ids])
    logp = model(input_ids=full).logits[0, len(prompt) - 1 : -1].log_softmax(-1).gather(1, torch.tensor(ids)[:, None])
    torch.testing.assert_close(out.logps[0, : len(ids)], logp[:, 0], atol=1e-5, rtol=1e-5)


def test_generation_kwargs_override_and_reach_the_sampler(tmp_path, tokenizer, monkeypatch):
    got = {}

    class Spy(HFEngine):
        def generate(self, *args, **kwargs):
            got.update(kwargs)
            return super().generate(*args, **kwargs)

    monkeypatch.setattr(grpo, "HFEngine", Spy)
    cfg = make_cfg(tmp_path, min_p=0.05, generation_kwargs={"temperature": 0.5, "repetition_penalty": 1.2})
    algo = GRPO(cfg, tokenizer, [("chars", chars)], examples(tokenizer))
    algo.prepare(eos_model(tokenizer), examples(tokenizer)[:2])
    assert (got["temperature"], got["min_p"], got["repetition_penalty"], got["top_p"]) == (0.5, 0.05, 1.2, 1.0)
    assert algo._temp() == 0.5  # the scoring temperature follows the sampling one
    with pytest.raises(UserError, match="generation_kwargs: num_beams not supported"):
        make_cfg(tmp_path, generation_kwargs={"num_beams": 4})
    with pytest.raises(UserError, match="min_p must be in"):
        make_cfg(tmp_path, generation_kwargs={"min_p": 2.0})


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if think %} <think>{% endif %}{% if add_generation_prompt %} A:{% endif %}")
    from posttrain.data.formats import Dataset, Row

    ds = Dataset([Row({"prompt": "2 + 2 =", "answer": "4"}, "x")], "x", "prompt")
    plain = prompt_examples(ds, tokenizer, Config())[0].prompt_ids
    thinking = prompt_examples(ds, tokenizer, Config(chat_template_kwargs={"think": True}))[0].prompt_ids
    assert tokenizer.decode(plain) == "2 + 2 = A:" and tokenizer.decode(thinking) == "2 + 2 = <think> A:"


def test_num_generations_eval_samples_and_reports_pass_at_k(tmp_path, tokenizer):
    model = eos_model(tokenizer)
    greedy = GRPO(make_cfg(tmp_path), tokenizer, [("chars", chars)], examples(tokenizer)).evaluate(model, examples(tokenizer))
    sampled = GRPO(make_cfg(tmp_path, num_generations_eval=3), tokenizer, [("chars", chars)],
                   examples(tokenizer)).evaluate(model, examples(tokenizer))
    assert set(greedy) == {"chars", "chars/stderr"} and set(sampled) == {"chars", "chars/stderr", "chars/pass@3"}
    assert sampled["chars"] != greedy["chars"]


# ------------------------------------------------------------------------------------ reference


def test_sync_ref_model_moves_the_reference(tmp_path, tokenizer):
    """beta > 0 with sync_ref_model, alpha 1 every 2 steps: after step 2 the reference is a copy of the policy;
    between syncs it stays where it was."""
    cfg = make_cfg(tmp_path, beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=2,
                   max_steps=3, learning_rate=0.05)
    model = eos_model(tokenizer)
    ref = build(model, needed=True, sync=Sync(cfg.ref_model_sync_steps, cfg.ref_model_mixup_alpha))
    start = {k: v.clone() for k, v in ref.model.state_dict().items()}
    algo = GRPO(cfg, tokenizer, [("chars", chars)], examples(tokenizer), ref)
    after = {}
    step_end = algo.on_step_end

    def spy(m, step):
        step_end(m, step)
        after[step] = ({k: v.clone() for k, v in ref.model.state_dict().items()},
                       {k: v.clone() for k, v in m.state_dict().items()})

    algo.on_step_end = spy
    Engine(cfg, model, tokenizer, algo, examples(tokenizer)).train()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(after[1][0][name], start[name])  # not synced yet
    assert torch.equal(after[2][0][name], after[2][1][name]) and not torch.equal(after[2][0][name], start[name])
    assert torch.equal(after[3][0][name], after[2][0][name]) and not torch.equal(after[3][1][name], after[3][0][name])
    with pytest.raises(UserError, match="sync_ref_model moves a reference copy: it needs beta or kl_coef > 0"):
        make_cfg(tmp_path, sync_ref_model=True)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"generation_batch_size": 12},
         "generation_batch_size 12 \\(completions\\) must be a multiple of batch_size x num_generations = 8"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must be in \\[0, 1\\]"),
        ({"entropy_coef": -1.0}, "entropy_coef must be >= 0"),
        ({"num_generations_eval": 0}, "num_generations_eval must be >= 1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ],
)
def test_option_errors(tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        make_cfg(tmp_path, **kw)


def test_trl_names_of_these_options(tmp_path):
    """TRL's steps_per_generation counts per-device micro-batches of completions: 8 per device x 4 steps x 1
    process = 32 completions per generation = 2 steps of 2 prompts x 8 generations."""
    from posttrain.config import load_config

    path = tmp_path / "trl.yaml"
    path.write_text("per_device_train_batch_size: 8\ngradient_accumulation_steps: 2\nsteps_per_generation: 4\n"
                    "num_generations: 8\ntop_entropy_quantile: 0.2\nentropy_coef: 0.01\nmin_p: 0.1\n"
                    "generation_kwargs: {top_k: 50}\nnum_generations_eval: 4\nsync_ref_model: true\nbeta: 0.04\n")
    cfg = load_config(Config, str(path), [], world_size=1)
    assert (cfg.batch_size, cfg.generation_batch_size, cfg.top_entropy_quantile, cfg.entropy_coef) == (2, 32, 0.2, 0.01)
    assert cfg.sampling()["top_k"] == 50 and cfg.num_generations_eval == 4 and cfg.sync_ref_model
    # Fewer micro-steps per generation than per optimizer step is TRL generating twice with the same weights:
    # the default here.
    path.write_text("per_device_train_batch_size: 8\ngradient_accumulation_steps: 2\nsteps_per_generation: 1\n")
    assert load_config(Config, str(path), [], world_size=1).generation_batch_size is None
