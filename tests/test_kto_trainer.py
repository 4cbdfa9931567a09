"""`posttrain kto`: the trainer's loss against `kto_loss` on naive log-probs, KL pairs, reference strategies,
metrics, CLI, real data. (Named test_kto_trainer.py: tests/losses/test_kto.py owns the module name.)"""

import copy
import itertools
import json
import logging

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data

from posttrain import cli
from posttrain.algorithms import kto as K
from posttrain.data.formats import Dataset, Row
from posttrain.data.tokenize import collate
from posttrain.engine import reduce_metrics
from posttrain.logprobs import naive_token_logps
from posttrain.losses.kto import kl_estimate, kto_loss
from posttrain.models import apply_lora
from posttrain.reference import AdapterOff, Copy, Precomputed
from posttrain.testing import tiny_model
from posttrain.testing import assert_close_to_scale

PAIRS = [
    {"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 21"},
    {"prompt": "What is 3 * 4?", "chosen": " 12", "rejected": " 7"},
    {"prompt": "Say hello.", "chosen": " hello", "rejected": " no"},
]


def pref_dataset(pairs=PAIRS):
    return Dataset([Row(dict(p), f"mem:{i + 1}") for i, p in enumerate(pairs)], "mem", "preference")


def make_cfg(**kw):
    cfg = K.Config(**kw)
    cfg.validate()
    return cfg


def naive_sums(model, seqs):
    b = collate(seqs, 0)
    with torch.no_grad():
        return naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask).sum(-1)


def trainer_loss(algo, model, examples):
    """The step's loss as the engine computes it: sum of the micro-batch losses, each / the global count; its
    metrics reduced over the micro-batches as the engine does (`reduce_metrics`, then `derived_metrics`)."""
    total, parts = 0.0, []
    for mb in algo.prepare(model, examples):
        loss, m = algo.loss(model, mb, float(len(examples)))
        total = total + loss
        parts.append(m)
    metrics = reduce_metrics(parts)
    metrics.update(algo.derived_metrics(metrics))
    return total, metrics


def test_unpair_gives_desirable_then_undesirable_per_pair():
    ds = K.unpair(pref_dataset(PAIRS[:2]))
    assert ds.format == "unpaired"
    assert [(r.data["prompt"], r.data["completion"], r.data["label"]) for r in ds.rows] == [
        ("What is 12 + 7?", " 19", True),
        ("What is 12 + 7?", " 21", False),
        ("What is 3 * 4?", " 12", True),
        ("What is 3 * 4?", " 7", False),
    ]
    assert ds.rows[1].source == "mem:1 (rejected)"
    unpaired = Dataset([Row({"prompt": "p", "completion": "c", "label": True}, "f:1")], "f", "unpaired")
    assert K.unpair(unpaired) is unpaired


def test_kl_pairs_rotate_past_rows_of_the_same_prompt():
    # Unpaired pairs: prompts A A B B C C. Shift 1 would pair row 1 (A) with row 0's completion (also A's),
    # so the shift is 2: row i gets the completion of row i - 2 (rows 0, 1 take rows 4, 5).
    A, B, C = [1, 2], [3], [4, 5, 6]
    pieces = [
        (A, [10], True),
        (A, [11], False),
        (B, [12], True),
        (B, [13], False),
        (C, [14, 15], True),
        (C, [16], False),
    ]
    assert K.kl_shift([p for p, _, _ in pieces]) == 2
    ex = K.build_examples(pieces, max_length=512, max_prompt_length=None)
    assert [e.kl_seq.input_ids for e in ex] == [
        A + [14, 15],
        A + [16],
        B + [10],
        B + [11],
        C + [12],
        C + [13],
    ]
    assert ex[0].kl_seq.mask == [0, 0, 1, 1] and ex[0].seq.input_ids == A + [10] and ex[0].label
    # Distinct prompts: the TRL rotation by one (row 0 takes the last row's completion).
    distinct = [([1], [10], True), ([2], [11], False), ([3], [12], True)]
    assert [e.kl_seq.input_ids for e in K.build_examples(distinct, 512, None)] == [[1, 12], [2, 10], [3, 11]]
    # The mismatched sequence is truncated like any other sequence (max_length 3 keeps 2 completion tokens).
    long = [([1], [10, 11, 12], True), ([2], [13], False)]
    assert [(e.seq.input_ids, e.kl_seq.input_ids) for e in K.build_examples(long, 3, None)] == [
        ([1, 10, 11], [1, 13]),
        ([2, 13], [2, 10, 11]),
    ]


@pytest.mark.parametrize("swap", [False, True])
def test_loss_equals_kto_loss_on_naive_logps(tokenizer, swap):
    """6 examples (3 pairs), micro-batches of 4 and 2. By hand: naive summed log-probs of the policy and the
    reference on each example and on its mismatched sequence; z0 = kl_estimate(...) over all 6 mismatched
    pairs; loss = kto_loss(...).losses.sum() / 6. Swapping policy and reference flips the sign of the mean KL
    log-ratio, which covers both z0 > 0 and the clamp to 0."""
    a, b = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=3)
    policy, ref = (b, a) if swap else (a, b)
    cfg = make_cfg(beta=0.5, desirable_weight=1.5, undesirable_weight=0.7, micro_batch_size=4)
    examples = K.encode_examples(tokenizer, K.unpair(pref_dataset()), cfg)
    algo = K.KTO(cfg, tokenizer.pad_token_id, Copy(ref))

    kl_diff = naive_sums(policy, [e.kl_seq for e in examples]) - naive_sums(ref, [e.kl_seq for e in examples])
    z0 = kl_estimate(
        naive_sums(policy, [e.kl_seq for e in examples]), naive_sums(ref, [e.kl_seq for e in examples])
    )
    if swap:
        assert kl_diff.mean() < 0 and z0 == 0  # clamped
    else:
        assert kl_diff.mean() > 0.1 and torch.isclose(z0, kl_diff.mean())
    pol, rf = naive_sums(policy, [e.seq for e in examples]), naive_sums(ref, [e.seq for e in examples])
    labels = torch.tensor([e.label for e in examples])
    expected = kto_loss(pol, rf, labels, z0, beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)

    mbs = algo.prepare(policy, examples)
    assert [len(mb) for mb in mbs] == [4, 2] and all(
        mb.z0 == pytest.approx(float(z0), abs=1e-6) for mb in mbs
    )
    loss, metrics = trainer_loss(algo, policy, examples)
    torch.testing.assert_close(loss.detach(), expected.losses.sum() / 6, rtol=0, atol=1e-5)

    r = 0.5 * (pol - rf)  # beta * log-ratio
    assert metrics["kl"] == pytest.approx(float(z0), abs=1e-6)
    assert metrics["count/desirable"] == 3 and metrics["count/undesirable"] == 3
    assert metrics["rewards/chosen"] == pytest.approx(float(r[labels].mean()), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(float(r[~labels].mean()), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(float(r[labels].mean() - r[~labels].mean()), abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(float(pol[labels].mean()), abs=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(float(pol[~labels].mean()), abs=1e-4)


def test_gradient_does_not_depend_on_micro_batch_size(tokenizer):
    """z0 is one estimate per step, so micro-batches of 1 and one micro-batch of 6 give the same gradient."""
    grads = []
    for size in (1, 6):
        policy = tiny_model(tokenizer, seed=0)
        cfg = make_cfg(micro_batch_size=size)
        examples = K.encode_examples(tokenizer, K.unpair(pref_dataset()), cfg)
        algo = K.KTO(cfg, tokenizer.pad_token_id, Copy(tiny_model(tokenizer, seed=3)))
        loss, _ = trainer_loss(algo, policy, examples)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    assert grads[0].abs().max() > 0
    assert_close_to_scale(grads[0], grads[1], rtol=1e-5)


def test_lora_reference_is_the_adapter_off_model(tokenizer):
    base = tiny_model(tokenizer, seed=0)
    original = copy.deepcopy(base)
    from posttrain.config import LoraConfig

    cfg = make_cfg(lora=LoraConfig(r=4), micro_batch_size=6)
    model = apply_lora(base, cfg.lora)
    examples = K.encode_examples(tokenizer, K.unpair(pref_dataset()), cfg)
    algo = K.KTO(cfg, tokenizer.pad_token_id, AdapterOff())
    assert algo.reference.strategy == "adapter"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # move the adapter away from its zero start
        loss, _ = trainer_loss(algo, model, examples)
        loss.backward()
        opt.step()
        opt.zero_grad()
    batch = collate([e.seq for e in examples], tokenizer.pad_token_id)
    torch.testing.assert_close(
        algo.reference_sums(model, batch), naive_sums(original, [e.seq for e in examples]), rtol=0, atol=1e-5
    )
    with torch.no_grad():
        policy_sums = K._sums(model, batch)
    assert (
        policy_sums - naive_sums(original, [e.seq for e in examples])
    ).abs().max() > 1e-3  # the policy moved


def test_precompute_equals_live_reference_and_is_cached(tokenizer, tiny_model_dir, monkeypatch, tmp_path):
    """Precomputed reference log-probs (examples and their mismatched KL sequences) give the same loss and
    metrics as the frozen copy; a second run reads them from the disk cache."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    from posttrain.models import load_model

    cfg_live = make_cfg(model=tiny_model_dir, micro_batch_size=4)
    cfg_pre = make_cfg(model=tiny_model_dir, micro_batch_size=4, precompute_ref_log_probs=True)
    results = []
    for cfg in (cfg_live, cfg_pre):
        policy = load_model(tiny_model_dir)
        torch.manual_seed(0)
        with torch.no_grad():  # move the policy off the reference so the log-ratios are not all zero
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        examples = K.encode_examples(tokenizer, K.unpair(pref_dataset()), cfg)
        if cfg.precompute_ref_log_probs:
            algo = K.KTO(cfg, tokenizer.pad_token_id, Precomputed(tiny_model_dir, path=tiny_model_dir))
            assert algo.precompute_reference(policy, examples)[0].startswith("computed")
            assert algo.precompute_reference(policy, examples)[0].startswith("cache")
            assert algo.reference.strategy == "precomputed" and examples[0].ref_kl_logp is not None
        else:
            algo = K.KTO(cfg, tokenizer.pad_token_id, Copy(load_model(tiny_model_dir).requires_grad_(False)))
        results.append(trainer_loss(algo, policy, examples))
    (loss_live, m_live), (loss_pre, m_pre) = results
    assert m_live["kl"] > 0
    torch.testing.assert_close(loss_pre, loss_live, rtol=0, atol=1e-6)
    assert m_pre == pytest.approx(m_live, abs=1e-6)


def test_class_balance_warning_is_logged_once(tiny_model_dir, tmp_path, caplog):
    rows = [
        {"prompt": f"Q{i}?", "completion": f" A{i}", "label": i != 3} for i in range(4)
    ]  # 3 desirable, 1 not
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"model={tiny_model_dir}", f"dataset={data}", "max_steps=1", "batch_size=4", "progress=false"]
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert cli.main(["kto", *args, f"output_dir={tmp_path / 'a'}"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "class balance" in r.getMessage()]
    # (1 * 3) / (1 * 1) = 3 is outside [1, 4/3]
    assert len(warnings) == 1 and "= 3.000" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="posttrain"):  # weights 1/3 : 1 make the ratio 1
        assert cli.main(["kto", *args, "desirable_weight=0.3333334", f"output_dir={tmp_path / 'b'}"]) == 0
    assert not [r for r in caplog.records if "class balance" in r.getMessage()]


def test_cli_end_to_end_writes_trl_named_metrics(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    code = cli.main(
        [
            "kto",
            f"model={tiny_model_dir}",
            "dataset=arithmetic:n=4",
            "eval_dataset=arithmetic:n=2",
            "max_steps=2",
            "batch_size=4",
            "micro_batch_size=2",
            "learning_rate=1e-3",
            "progress=false",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = {
        "loss",
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "count/desirable",
        "count/undesirable",
    }
    assert names <= set(rows[0]) and rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # ref = policy at step 1
    assert rows[0]["count/desirable"] + rows[0]["count/undesirable"] == 4
    assert {f"eval/{n}" for n in names} <= set(rows[-1])
    assert rows[-1]["eval/count/desirable"] == 2 and rows[-1]["eval/count/undesirable"] == 2
    assert (out / "model.safetensors").exists()


def test_config_checks():
    for bad in ({"beta": 0}, {"desirable_weight": 0}, {"undesirable_weight": -1}):
        with pytest.raises(cli.UserError):
            make_cfg(**bad)
    assert make_cfg().learning_rate == 5e-7
    from posttrain.config import LoraConfig

    assert make_cfg(lora=LoraConfig()).learning_rate == 5e-6


@needs_shared_data
def test_real_data_kto_loss_falls(tiny_model_dir, tmp_path):
    """8 HH rows (conversational, unpaired, 4 desirable), the same 8 examples every step: the loss starts at
    exactly 0.5 (policy = reference: every log-ratio and z0 are 0, each loss is 1 - sigmoid(0)) and falls
    every step as the policy separates desirable from undesirable completions (measured: 0.5 -> 0.11)."""
    out = tmp_path / "hh"
    code = cli.main(
        [
            "kto",
            f"model={tiny_model_dir}",
            f"dataset={SHARED_DATA / 'hh_helpful_kto_sample.jsonl'}",
            "max_samples=8",
            "batch_size=8",
            "micro_batch_size=4",
            "max_length=128",
            "max_prompt_length=96",
            "max_steps=6",
            "learning_rate=1e-3",
            "warmup_ratio=0",
            "lr_scheduler=constant",
            "beta=0.5",
            "progress=false",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert rows[0]["count/desirable"] == 4 and rows[0]["count/undesirable"] == 4
    assert losses[0] == pytest.approx(0.5, abs=1e-6)
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < 0.25, losses
