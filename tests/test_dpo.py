"""The DPO trainer (`posttrain dpo`) end to end on the tiny model.

Reference numbers come from two independent places: `naive_token_logps` (a full float32 log-softmax over
every position, each sequence alone, so no padding at all) fed to the pure loss functions, and values
worked out by hand. The hand values rest on one fact: at the first step the policy IS the reference
(a frozen copy, the adapter-off model, or log-probs precomputed from the starting model), so every
log-ratio is 0 (c = r = h = 0, beta = 0.1) and the reference-based losses take closed forms:
    sigmoid, robust, aot, aot_unpaired, sigmoid_norm   -log sigma(0) = ln 2 = 0.693147
    hinge                                              max(0, 1 - 0) = 1
    ipo                                                (0 - 1/(2 * 0.1))^2 = 25
    sppo_hard                                          (0 - 5)^2 + (0 + 5)^2 = 50
    nca_pair                                           ln 2 + ln 2 / 2 + ln 2 / 2 = 2 ln 2 = 1.386294
    bco_pair (delta 0)                                 ln 2 + ln 2 = 2 ln 2
    apo_zero                                           1 - sigma(0) + sigma(0) = 1
    apo_down                                           sigma(0) + 1 - sigma(0) = 1
    discopop (tau 0.05)                                m = sigma(0) = 1/2:  ln 2 / 2 + e^0 / 2 = 0.846574
    exo_pair (eps 1e-3)                                (ln .5 - ln .999)/2 + (ln .5 - ln .001)/2 = 2.761231
and the rewards are 0, so rewards/accuracies (chosen > rejected, strictly) is 0.
"""

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data

from posttrain import reference
from posttrain.algorithms import dpo
from posttrain.algorithms.dpo import DPO, Config, collate_pairs, encode_preference
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.engine import Engine
from posttrain.logprobs import naive_token_logps
from posttrain.losses.preference import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, ld_logps, preference_loss
from posttrain.models import load_model
from posttrain.reference import Copy
from posttrain.testing import tiny_model

LN2 = math.log(2)

# Pairs of different lengths (so a micro-batch of two is padded), in the tiny tokenizer's vocabulary.
PAIRS = [
    {"prompt": "What is 12 + 7?", "chosen": " The answer is 19.", "rejected": " 20"},
    {"prompt": "Human: How do I bake bread? Assistant:", "chosen": " Mix flour, water, salt and yeast, then bake.",
     "rejected": " I do not know."},
    {"prompt": "Reply with only the final number.", "chosen": " 48",
     "rejected": " the answer is 12 and 36 of her friends in April"},
    {"prompt": "You are a helpful assistant.", "chosen": " Hello! How can I help you?", "rejected": " no"},
]

TRL_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]


# ------------------------------------------------------------------------------------------------- helpers


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    """Train file (4 pairs) and eval file (the first 2)."""
    return write_jsonl(tmp_path / "train.jsonl", PAIRS), write_jsonl(tmp_path / "eval.jsonl", PAIRS[:2])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(path))
    return path


def make_cfg(model_dir, dataset, out, *overrides):
    base = [f"model={model_dir}", f"dataset={dataset}", f"output_dir={out}", "progress=false", "max_length=64",
            "warmup_ratio=0", "lr_scheduler=constant", "learning_rate=1e-2", "batch_size=2"]
    return load_config(Config, None, base + list(overrides))


def run_captured(cfg, monkeypatch) -> Engine:
    """dpo.run(cfg), returning the engine it built (policy, algorithm, encoded examples)."""
    seen = {}

    class Spy(Engine):
        def train(self):
            seen["engine"] = self
            return super().train()

    monkeypatch.setattr(dpo, "Engine", Spy)
    dpo.run(cfg)
    return seen["engine"]


def forbid_reference_models(monkeypatch):
    """Make any attempt of dpo.py to build a second model (copy or load) fail the test."""

    def boom(*a, **k):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(reference, "frozen_copy", boom)
    monkeypatch.setattr(reference, "load_model", boom)


def params(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def encode(tok, rows, max_length=64):
    return [encode_preference(tok, r, max_length, None) for r in rows]


def naive_side(model, seqs):
    """Per sequence, each alone (no padding): (sum of completion log-probs, count, per-token logps, full logits)."""
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.input_ids])
            mask = torch.tensor([s.mask])
            per_tok = naive_token_logps(model, ids, torch.ones_like(ids), mask)[0]
            logits = model(input_ids=ids).logits[0].float()
            out.append((per_tok.sum(), float(sum(s.mask[1:])), per_tok, logits))
    return out


def naive_sums(model, pairs):
    """(chosen sums [n], rejected sums [n], chosen lengths [n], rejected lengths [n]) from naive log-probs."""
    c = naive_side(model, [p.chosen for p in pairs])
    r = naive_side(model, [p.rejected for p in pairs])
    return (torch.stack([x[0] for x in c]), torch.stack([x[0] for x in r]),
            torch.tensor([x[1] for x in c]), torch.tensor([x[1] for x in r]))


def varied(model, seed):
    """Redraw the weights at std 0.5: at the default init every next-token distribution is nearly uniform,
    which would make policy and reference agree and every loss sit at its h = 0 value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture
def policy_and_ref(tokenizer):
    return varied(tiny_model(tokenizer), 0), varied(tiny_model(tokenizer), 1)


def cfg_only(*overrides):
    return load_config(Config, None, ["max_length=64", *overrides])


# ------------------------------------------------------------------------------------- 1. trainer math


def test_loss_and_metrics_equal_pure_loss_on_naive_logps(tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    algo = DPO(cfg_only(), tokenizer.pad_token_id, Copy(ref))
    pairs = encode(tokenizer, PAIRS[:2])
    mb = collate_pairs(pairs, tokenizer.pad_token_id)
    assert (mb.attention_mask == 0).any()  # the batch is padded

    loss, metrics = algo.loss(policy, mb, total_items=2.0)
    loss = loss.detach()

    pc, pr, _, _ = naive_sums(policy, pairs)
    rc, rr, _, _ = naive_sums(ref, pairs)
    want = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1)
    assert abs(loss.item() - float(want.losses.mean())) < 1e-5
    # the two pairs disagree with the reference by a visible amount (a test at loss = ln 2 would prove little)
    assert abs(float(want.losses.mean()) - LN2) > 1e-2
    # loss() divides by the GLOBAL item count: 4 items in the step -> half of the micro-batch mean
    half, _ = algo.loss(policy, mb, total_items=4.0)
    assert abs(half.item() - float(want.losses.mean()) / 2) < 1e-5

    assert metrics["rewards/chosen"] == pytest.approx(float(0.1 * (pc - rc).mean()), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(float(0.1 * (pr - rr).mean()), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"], abs=1e-7)
    acc = float(((pc - rc) > (pr - rr)).float().mean())
    assert metrics["rewards/accuracies"] == acc
    assert metrics["logps/chosen"] == pytest.approx(float(pc.mean()), abs=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(float(pr.mean()), abs=1e-4)
    # logits/chosen as TRL: the mean over every chosen completion token's full logit vector (token-weighted)
    for side, key in (("chosen", "logits/chosen"), ("rejected", "logits/rejected")):
        rows = [getattr(p, side) for p in pairs]
        vecs = [x[3][[t - 1 for t in range(1, len(s)) if s.mask[t]]] for s, x in zip(rows, naive_side(policy, rows))]
        assert metrics[key] == pytest.approx(float(torch.cat(vecs).mean()), abs=1e-5)


def test_padding_does_not_change_the_pair_loss(tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    algo = DPO(cfg_only(), tokenizer.pad_token_id, Copy(ref))
    short, long_ = encode(tokenizer, [PAIRS[0], PAIRS[2]])
    alone = collate_pairs([short], tokenizer.pad_token_id)
    padded = collate_pairs([short, long_], tokenizer.pad_token_id)
    assert padded.input_ids.shape[1] > alone.input_ids.shape[1] + 5  # the short pair gets real padding
    loss_alone, _ = algo._compute(policy, alone)
    loss_padded, _ = algo._compute(policy, padded)
    assert abs(loss_alone[0].item() - loss_padded[0].item()) < 1e-5
    lp_alone = algo._sequence_logps(policy, alone, False)[0]
    lp_padded = algo._sequence_logps(policy, padded, False)[0]
    assert torch.allclose(lp_alone, lp_padded[[0, 2]], atol=1e-4)


def test_ld_alpha_and_wpo_weights_match_their_formulas(tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    pairs = encode(tokenizer, PAIRS[:2])
    mb = collate_pairs(pairs, tokenizer.pad_token_id)
    plain, _ = DPO(cfg_only(), tokenizer.pad_token_id, Copy(ref)).loss(policy, mb, 2.0)

    # LD-DPO: the first min(|y_w|, |y_l|) completion tokens count fully, the rest x 0.5, policy AND reference
    def ld(model):
        c, r = naive_side(model, [p.chosen for p in pairs]), naive_side(model, [p.rejected for p in pairs])
        out = []
        for mine, other in ((c, r), (r, c)):
            vals = []
            for (_, _, per_tok, _), (_, n_other, _, _) in zip(mine, other):
                toks = per_tok[per_tok != 0]  # completion tokens in order (no log-prob is exactly 0 here)
                k = int(min(len(toks), n_other))
                vals.append(toks[:k].sum() + 0.5 * toks[k:].sum())
            out.append(torch.stack(vals))
        return out

    (pc, pr), (rc, rr) = ld(policy), ld(ref)
    loss, _ = DPO(cfg_only("ld_alpha=0.5"), tokenizer.pad_token_id, Copy(ref)).loss(policy, mb, 2.0)
    want = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1).losses.mean()
    assert abs(loss.item() - float(want)) < 1e-5
    assert abs(loss.item() - plain.item()) > 1e-3
    # the module's own ld_logps on the naive per-token values agrees with the loop above
    per_tok = torch.stack([torch.nn.functional.pad(x[2], (0, 64 - len(x[2]))) for x in naive_side(policy, [p.chosen for p in pairs])])
    _, _, _, lr = naive_sums(policy, pairs)
    assert torch.allclose(ld_logps(per_tok, (per_tok != 0).float(), lr, 0.5), pc, atol=1e-5)

    # WPO: w = exp(min(a_w + a_l, 0)), a = mean over completion tokens of log p(y_t) - log sum_v p_v^2
    def adjusted(seqs):
        vals = []
        for s, (_, n, per_tok, logits) in zip(seqs, naive_side(policy, seqs)):
            pos = [t for t in range(1, len(s)) if s.mask[t]]
            log_p2 = torch.logsumexp(2 * logits[[t - 1 for t in pos]].log_softmax(-1), -1)
            vals.append((per_tok[pos] - log_p2).sum() / n)
        return torch.stack(vals)

    w = torch.exp((adjusted([p.chosen for p in pairs]) + adjusted([p.rejected for p in pairs])).clamp(max=0))
    assert (w < 0.99).all()  # the weights really weight
    pc, pr, _, _ = naive_sums(policy, pairs)
    rc, rr, _, _ = naive_sums(ref, pairs)
    per_pair = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1).losses
    loss, _ = DPO(cfg_only("use_weighting=true"), tokenizer.pad_token_id, Copy(ref)).loss(policy, mb, 2.0)
    assert abs(loss.item() - float((w * per_pair).mean())) < 1e-5
    assert abs(loss.item() - plain.item()) > 1e-3


# --------------------------------------------------------------------------------- 2. reference strategies


def test_copy_reference_stays_frozen_while_policy_moves(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    eng = run_captured(make_cfg(tiny_model_dir, data[0], out, "max_steps=2"), monkeypatch)
    algo, init = eng.algo, load_model(tiny_model_dir)
    assert algo.reference.strategy == "copy" and algo.reference.model is not eng.model
    start = params(init)
    for name, p in algo.reference.model.named_parameters():
        assert not p.requires_grad
        assert torch.equal(p, start[name]), name
    moved = max(float((p - start[n]).abs().max()) for n, p in params(eng.model).items())
    assert moved > 1e-3
    rows = metric_rows(out)
    # step 1: policy == reference, so loss = ln 2 and both rewards are 0 (see the module docstring)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == rows[0]["rewards/accuracies"] == 0
    assert rows[1]["loss"] != pytest.approx(LN2, abs=1e-4)  # step 2 sees the moved policy


def test_adapter_reference_is_the_base_model_with_no_second_copy(tiny_model_dir, data, tmp_path, monkeypatch):
    forbid_reference_models(monkeypatch)
    eng = run_captured(make_cfg(tiny_model_dir, data[0], tmp_path / "run", "max_steps=2", "lora.r=4"), monkeypatch)
    algo, model = eng.algo, eng.model
    assert algo.reference.strategy == "adapter" and algo.models() == []
    mb = collate_pairs(eng.train_examples, eng.tokenizer.pad_token_id)
    ref = algo.reference_logps(model, mb)
    base = load_model(tiny_model_dir)
    bc, br, _, _ = naive_sums(base, eng.train_examples)
    assert torch.allclose(ref, torch.cat([bc, br]), atol=1e-4)
    with torch.no_grad():
        policy = algo._sequence_logps(model, mb, False)[0]
    assert (policy - ref).abs().max() > 1e-3  # the adapter is on (and trained) outside the reference pass


def test_precomputed_reference_values_cache_and_reuse(tiny_model_dir, data, tmp_path, cache, monkeypatch, caplog):
    forbid_reference_models(monkeypatch)
    cfg = make_cfg(tiny_model_dir, data[0], tmp_path / "run1", "max_steps=1", f"eval_dataset={data[1]}",
                   "precompute_ref_log_probs=true")
    eng = run_captured(cfg, monkeypatch)
    assert eng.algo.reference.strategy == "precomputed" and eng.algo.models() == []

    # the values equal what the copy strategy (a frozen starting model) computes for the same pairs
    pad = eng.tokenizer.pad_token_id
    pairs = eng.train_examples
    stripped = [dpo.Pair(p.chosen, p.rejected) for p in pairs]
    copy_algo = DPO(cfg_only(), pad, Copy(load_model(tiny_model_dir)))
    want = copy_algo.reference_logps(None, collate_pairs(stripped, pad))
    got = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    assert torch.allclose(got, want, atol=1e-5)

    files = sorted((cache / "ref_logps").glob("*.pt"), key=lambda f: torch.load(f).shape[0])
    assert [torch.load(f).shape for f in files] == [(2, 2), (4, 2)]  # eval (2 pairs) and train (4 pairs)

    # a second run reads the cache: shift the stored values by 1000 and the pairs must carry the shift
    for f in files:
        torch.save(torch.load(f) + 1000.0, f)
    caplog.set_level("INFO", logger="posttrain")
    eng2 = run_captured(make_cfg(tiny_model_dir, data[0], tmp_path / "run2", "max_steps=1",
                                 f"eval_dataset={data[1]}", "precompute_ref_log_probs=true"), monkeypatch)
    got2 = torch.tensor([p.ref_chosen for p in eng2.train_examples] + [p.ref_rejected for p in eng2.train_examples])
    assert torch.allclose(got2, want + 1000.0, atol=1e-3)
    assert all(p.ref_chosen is not None for p in eng2.eval_examples)
    assert eng2.eval_examples[0].ref_chosen == pytest.approx(float(want[0]) + 1000.0, abs=1e-3)
    assert "cache" in caplog.text
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 2  # nothing recomputed, nothing new written


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_load_no_reference(tiny_model_dir, data, tmp_path, monkeypatch, loss_type):
    forbid_reference_models(monkeypatch)
    out = tmp_path / "run"
    eng = run_captured(make_cfg(tiny_model_dir, data[0], out, "max_steps=1", f"loss_type={loss_type}",
                                "precompute_ref_log_probs=true"), monkeypatch)
    assert eng.algo.reference.strategy == "none" and eng.algo.models() == []
    assert all(p.ref_chosen is None for p in eng.train_examples)  # nothing precomputed either
    assert math.isfinite(metric_rows(out)[0]["loss"])


@pytest.mark.parametrize("strategy", ["copy", "adapter", "precomputed"])
def test_eval_rewards_use_the_starting_model_as_reference(tiny_model_dir, data, tmp_path, cache, monkeypatch, strategy):
    extra = {"copy": [], "adapter": ["lora.r=4"], "precomputed": ["precompute_ref_log_probs=true"]}[strategy]
    out = tmp_path / "run"
    eng = run_captured(make_cfg(tiny_model_dir, data[0], out, "max_steps=3", f"eval_dataset={data[1]}", *extra),
                       monkeypatch)
    assert eng.algo.reference.strategy == strategy
    final = metric_rows(out)[-1]
    init = load_model(tiny_model_dir)
    eval_pairs = eng.eval_examples
    eng.model.eval()
    pc, pr, _, _ = naive_sums(eng.model, eval_pairs)
    rc, rr, _, _ = naive_sums(init, eval_pairs)
    want_c, want_r = float(0.1 * (pc - rc).mean()), float(0.1 * (pr - rr).mean())
    assert abs(want_c) > 1e-3 and abs(want_r) > 1e-3  # the policy moved, so a policy-as-reference bug shows
    assert final["eval/rewards/chosen"] == pytest.approx(want_c, abs=1e-5)
    assert final["eval/rewards/rejected"] == pytest.approx(want_r, abs=1e-5)
    want_loss = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1).losses.mean()
    assert final["eval/loss"] == pytest.approx(float(want_loss), abs=1e-5)


# ------------------------------------------------------------------------------------------ 3. TR-DPO


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_tr_dpo_soft_and_hard_reference_update(tiny_model_dir, data, tmp_path, monkeypatch, alpha):
    eng = run_captured(make_cfg(tiny_model_dir, data[0], tmp_path / "run", "max_steps=1", "sync_ref_model=true",
                                f"ref_model_mixup_alpha={alpha}", "ref_model_sync_steps=1"), monkeypatch)
    old = params(load_model(tiny_model_dir))
    policy = params(eng.model)
    changed = 0
    for name, ref in eng.algo.reference.model.named_parameters():
        # ref <- alpha * policy + (1 - alpha) * ref: both products are exact for alpha in {0.5, 1}
        assert torch.equal(ref, alpha * policy[name] + (1 - alpha) * old[name]), name
        changed += not torch.equal(ref, old[name])
    assert changed > 0
    assert eng.algo.state_dict()["ref_model"].keys() == eng.algo.reference.model.state_dict().keys()  # saved on checkpoint


def test_tr_dpo_syncs_only_every_n_steps(tiny_model_dir, data, tmp_path, monkeypatch):
    eng = run_captured(make_cfg(tiny_model_dir, data[0], tmp_path / "run", "max_steps=1", "sync_ref_model=true",
                                "ref_model_mixup_alpha=0.5", "ref_model_sync_steps=2"), monkeypatch)
    old = params(load_model(tiny_model_dir))
    assert all(torch.equal(p, old[n]) for n, p in eng.algo.reference.model.named_parameters())


# ------------------------------------------------------------------------------ 4. gradient accumulation


def test_micro_batch_size_does_not_change_training(tiny_model_dir, data, tmp_path, monkeypatch):
    finals = {}
    for micro in (1, 2, 4):
        eng = run_captured(make_cfg(tiny_model_dir, data[0], tmp_path / f"m{micro}", "max_steps=2", "batch_size=4",
                                    f"micro_batch_size={micro}", "learning_rate=1e-3"), monkeypatch)
        finals[micro] = {n: p.clone() for n, p in params(eng.model).items()}
        losses = [r["loss"] for r in metric_rows(tmp_path / f"m{micro}")]
        finals[micro]["_loss"] = torch.tensor(losses)
    start = params(load_model(tiny_model_dir))
    assert max(float((p - start[n]).abs().max()) for n, p in finals[4].items() if n != "_loss") > 1e-4
    for micro in (1, 2):
        # Different micro-batches pack different rows (other matmul shapes, other rounding); Adam's m/sqrt(v)
        # turns that float noise into at most ~1e-6 here, against updates of ~2e-3.
        for name, p in finals[4].items():
            assert torch.allclose(finals[micro][name], p, atol=1e-5, rtol=0), (micro, name)


# ------------------------------------------------------------------------------------------- 5. metrics


def test_metrics_have_trl_names_and_hand_values(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    eng = run_captured(make_cfg(tiny_model_dir, data[0], out, "max_steps=2", "batch_size=4",
                                f"eval_dataset={data[1]}"), monkeypatch)
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 2]  # two train rows, then the final eval row
    for row in rows[:2]:
        assert set(TRL_METRICS) <= set(row)
        assert "nll_loss" not in row
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-6)
    assert {f"eval/{k}" for k in TRL_METRICS} <= set(rows[2])
    assert rows[2]["eval/rewards/margins"] == pytest.approx(
        rows[2]["eval/rewards/chosen"] - rows[2]["eval/rewards/rejected"], abs=1e-6)
    # step 1 (batch = all 4 pairs, policy == reference): loss ln 2, rewards 0, logps = the starting model's
    init = load_model(tiny_model_dir)
    pc, pr, _, _ = naive_sums(init, eng.train_examples)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[0]["rewards/margins"] == rows[0]["rewards/accuracies"] == 0
    assert rows[0]["logps/chosen"] == pytest.approx(float(pc.mean()), abs=1e-4)
    assert rows[0]["logps/rejected"] == pytest.approx(float(pr.mean()), abs=1e-4)
    assert rows[1]["rewards/margins"] > 0  # one step of DPO already separates chosen from rejected


def test_evaluation_batches_by_eval_batch_size(tokenizer, monkeypatch):
    """4 eval pairs with eval_batch_size 3 (micro_batch_size 1): forwards of 3 then 1 pairs."""
    sizes = []
    real = dpo.collate_pairs
    monkeypatch.setattr(dpo, "collate_pairs", lambda pairs, pad: sizes.append(len(pairs)) or real(pairs, pad))
    model = tiny_model(tokenizer)
    algo = DPO(cfg_only("eval_batch_size=3", "micro_batch_size=1"), tokenizer.pad_token_id, Copy(tiny_model(tokenizer)))
    with torch.no_grad():
        out = algo.evaluate(model, encode(tokenizer, PAIRS))
    assert sizes == [3, 1]
    assert out["loss"] == pytest.approx(LN2, abs=1e-6)  # same weights (seed 0) in policy and reference: h = 0


def test_rpo_alpha_adds_the_chosen_nll(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    eng = run_captured(make_cfg(tiny_model_dir, data[0], out, "max_steps=1", "batch_size=4", "rpo_alpha=0.5"),
                       monkeypatch)
    row = metric_rows(out)[0]
    pc, _, lc, _ = naive_sums(load_model(tiny_model_dir), eng.train_examples)
    nll = float((-pc / lc).mean())  # per-pair mean NLL of the chosen completion, averaged over pairs
    assert row["nll_loss"] == pytest.approx(nll, abs=1e-5)
    assert row["loss"] == pytest.approx(LN2 + 0.5 * nll, abs=1e-5)


def test_loss_weights_from_the_command_line_are_numbers(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, data[0], out, "max_steps=1", "batch_size=4", "loss_type=sigmoid,sft",
                   "loss_weights=0.8,0.2")
    assert cfg.loss_weights == [0.8, 0.2]
    eng = run_captured(cfg, monkeypatch)
    row = metric_rows(out)[0]
    pc, _, lc, _ = naive_sums(load_model(tiny_model_dir), eng.train_examples)
    nll = float((-pc / lc).mean())
    assert row["loss"] == pytest.approx(0.8 * LN2 + 0.2 * nll, abs=1e-5)
    assert row["sigmoid_loss"] == pytest.approx(LN2, abs=1e-6) and row["sft_loss"] == pytest.approx(nll, abs=1e-5)


# ------------------------------------------------------------------------------------- 6. config errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["loss_type=nope"], "unknown 'nope'; valid: " + ", ".join(sorted(PREFERENCE_LOSSES))),
        (["loss_type=sigmoid,hinge", "loss_weights=[1.0]"], "loss_weights: 1 weights for 2 loss types"),
        (["loss_type=sigmoid,sft", "loss_weights=a,b"], "loss_weights[0]: expected a number, got 'a'"),
        (["label_smoothing=0.6"], "label_smoothing must be in [0, 0.5)"),
        (["sync_ref_model=true", "lora.r=4"], "sync_ref_model needs a reference copy"),
        (["sync_ref_model=true", "precompute_ref_log_probs=true"], "sync_ref_model needs a reference copy"),
        (["sync_ref_model=true", "loss_type=simpo"], "reference-free"),
        (["loss_type=aot", "f_divergence=js_divergence"], "option 'f_divergence' is not used by loss ['aot']"),
        (["slic_delta=2"], "option 'slic_delta' is not used by loss ['sigmoid']"),
        (["loss_type=hinge", "label_smoothing=0.1"], "option 'label_smoothing' is not used"),
        (["loss_type=exo_pair"], "exo_pair needs label_smoothing in (0, 1)"),
        (["beta=0"], "beta must be > 0"),
        (["ld_alpha=2"], "ld_alpha must be in [0, 1]"),
        (["rpo_alpha=-1"], "rpo_alpha must be >= 0"),
        (["ref_model_mixup_alpha=0"], "ref_model_mixup_alpha must be in (0, 1]"),
        (["f_divergence=kl"], "'kl' is not one of"),
    ],
)
def test_config_errors_exit_2_before_any_model(monkeypatch, capsys, tmp_path, args, message):
    def no_run(cfg):
        raise AssertionError("run() reached: the config error was not caught at validation")

    monkeypatch.setattr(dpo, "run", no_run)
    assert main(["dpo", f"model={tmp_path}/no-such-model", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize("args, warns", [(["beta=5"], True), (["beta=0.005"], True), ([], False),
                                         (["loss_type=simpo"], False), (["beta=1"], False)])
def test_beta_outside_the_usual_range_warns(caplog, args, warns):
    caplog.set_level("WARNING", logger="posttrain")
    cfg = cfg_only(*args)
    assert ("outside the usual range" in caplog.text) == warns
    if args == ["loss_type=simpo"]:
        assert cfg.beta == 2.5  # SimPO's default (the paper's range is 2.0-2.5)
    if not args:
        assert cfg.beta == 0.1


def test_help_lists_the_dpo_keys(capsys):
    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("loss_type", "precompute_ref_log_probs", "sync_ref_model", "rpo_alpha", "use_weighting", "ld_alpha"):
        assert f"  {key} (" in text


# --------------------------------------------------------------------------------- 7. every loss runs

# Loss at step 1, where the policy is the reference (h = 0, beta = 0.1): see the module docstring.
AT_H0 = {
    "sigmoid": LN2, "robust": LN2, "aot": LN2, "aot_unpaired": LN2, "sigmoid_norm": LN2,
    "hinge": 1.0, "ipo": 25.0, "sppo_hard": 50.0, "nca_pair": 2 * LN2, "bco_pair": 2 * LN2,
    "apo_zero": 1.0, "apo_down": 1.0, "discopop": LN2 / 2 + 0.5,
    "exo_pair": 0.5 * (math.log(0.5) - math.log(0.999)) + 0.5 * (math.log(0.5) - math.log(1e-3)),
}
EXTRA = {"exo_pair": ["label_smoothing=0.001"]}


def test_hand_table_covers_every_reference_based_loss():
    assert set(AT_H0) == set(PREFERENCE_LOSSES) - REFERENCE_FREE_LOSSES
    assert AT_H0["discopop"] == pytest.approx(0.846574, abs=1e-6)
    assert AT_H0["exo_pair"] == pytest.approx(2.761231, abs=1e-6)


@pytest.mark.parametrize("loss_type", sorted(PREFERENCE_LOSSES))
def test_every_loss_trains_one_step(tiny_model_dir, data, tmp_path, monkeypatch, loss_type):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, data[0], out, "max_steps=1", f"loss_type={loss_type}", *EXTRA.get(loss_type, []))
    eng = run_captured(cfg, monkeypatch)
    row = metric_rows(out)[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    # the step's batch is 2 of the 4 pairs; the logged loss is the pure loss of the starting model on them
    step_pairs = [eng.train_examples[i] for i in eng.stream.batch(0)]
    pc, pr, lc, lr = naive_sums(load_model(tiny_model_dir), step_pairs)
    ref = (None, None) if loss_type in REFERENCE_FREE_LOSSES else (pc, pr)
    want = preference_loss(loss_type, pc, pr, *ref, chosen_lengths=lc, rejected_lengths=lr, beta=cfg.beta,
                           label_smoothing=cfg.label_smoothing).losses.mean()
    assert row["loss"] == pytest.approx(float(want), abs=1e-5)
    if loss_type in AT_H0:
        assert row["loss"] == pytest.approx(AT_H0[loss_type], abs=1e-5)


def test_use_weighting_and_ld_alpha_run_and_change_the_loss(tiny_model_dir, data, tmp_path, monkeypatch):
    """Through the trainer, 2 steps each. At step 1 the policy is the reference, so ld_alpha (applied to both)
    leaves ln 2 and WPO gives ln 2 x mean(w) < ln 2; at step 2 all three runs differ."""
    runs = {}
    for name, extra in (("plain", []), ("wpo", ["use_weighting=true"]), ("ld", ["ld_alpha=0.3"])):
        run_captured(make_cfg(tiny_model_dir, data[0], tmp_path / name, "max_steps=2", *extra), monkeypatch)
        runs[name] = [r["loss"] for r in metric_rows(tmp_path / name)]
    assert runs["plain"][0] == pytest.approx(LN2, abs=1e-6) and runs["ld"][0] == pytest.approx(LN2, abs=1e-6)
    assert runs["wpo"][0] < LN2 - 1e-4
    assert abs(runs["ld"][1] - runs["plain"][1]) > 1e-5
    assert abs(runs["wpo"][1] - runs["plain"][1]) > 1e-5


# ---------------------------------------------------------------------------------------- 8. real data


@needs_shared_data
@pytest.mark.parametrize("file", ["hh_helpful_train.jsonl", "hh_helpful_standard_sample.jsonl"])
def test_real_preference_data_loss_falls(tiny_model_dir, tmp_path, monkeypatch, file):
    """4 rows, batch 4 in one micro-batch: every step sees the same batch, so 10 steps at lr 1e-3 must fit it."""
    out = tmp_path / "run"
    run_captured(make_cfg(tiny_model_dir, str(SHARED_DATA / file), out, "max_steps=10", "batch_size=4",
                          "micro_batch_size=4", "max_samples=4", "max_length=128", "max_prompt_length=64", "learning_rate=1e-3",
                          "seed=0"), monkeypatch)
    rows = metric_rows(out)
    assert len(rows) == 10
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/accuracies"] == 0
    assert last["loss"] < first["loss"] - 0.1
    assert last["rewards/accuracies"] == 1.0
    assert last["rewards/margins"] > 0.5
