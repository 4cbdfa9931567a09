"""posttrain.reference: which strategy `build` picks, what each strategy's `logps` runs on, TR-DPO's sync and
its checkpoint state, what each keeps in memory, the precompute cache, and that a reference model used only to
precompute is gone once training starts (DPO and KTO with `ref_model: PATH`)."""

import gc
import json
import os
import types
import weakref

import pytest
import torch

from posttrain import reference
from posttrain.algorithms import dpo, kto
from posttrain.config import LoraConfig, load_config
from posttrain.data.tokenize import Encoded, collate
from posttrain.engine import Engine
from posttrain.logprobs import naive_token_logps, token_logps
from posttrain.models import apply_lora, load_model
from posttrain.reference import AdapterOff, Copy, Precomputed, Reference, Sync, build, choose
from posttrain.testing import save_tiny, tiny_model

SEQS = [Encoded([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), Encoded([11, 12, 13], [0, 1, 1])]


def batch():
    return collate(SEQS, 0)


def sums(model, b=None):
    """The kind of score an algorithm passes: summed completion log-probs of the batch (DPO, KTO)."""
    b = b or batch()
    return token_logps(model, b.input_ids, b.attention_mask, b.loss_mask).sums()


def naive(model):
    b = batch()
    with torch.no_grad():
        return naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask).sum(-1)


def moved(model, seed=1, scale=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# -------------------------------------------------------------------------------------------- build


def test_build_picks_one_strategy_by_one_rule(tokenizer, tiny_model_dir, monkeypatch):
    # The rule alone, as the memory planner asks it before loading anything.
    assert choose(needed=False, path="p", precompute=True, lora=True) == "none"
    assert choose(path="p", precompute=True) == choose(precompute=True, lora=True) == "precomputed"
    assert choose(path="p", lora=True) == choose(path="p") == choose() == "copy"
    assert choose(lora=True) == "adapter"

    policy = tiny_model(tokenizer)
    assert type(build(policy, needed=False, path=tiny_model_dir, precompute=True)) is Reference
    pre = build(policy, path=tiny_model_dir, model_path="unused", precompute=True)
    assert isinstance(pre, Precomputed) and pre.model_path == tiny_model_dir and pre._model is None  # loaded lazily
    assert isinstance(build(policy, model_path="m", precompute=True), Precomputed)

    from_path = build(policy, path=tiny_model_dir)
    assert isinstance(from_path, Copy) and not from_path.model.training
    assert all(not p.requires_grad for p in from_path.model.parameters())

    lora = apply_lora(tiny_model(tokenizer), LoraConfig(r=4))
    monkeypatch.setattr(reference, "frozen_copy", lambda m: pytest.fail("LoRA must not copy the model"))
    assert isinstance(build(lora), AdapterOff)
    monkeypatch.undo()

    sync = Sync(every=2, alpha=0.5)
    copy = build(policy, sync=sync)
    assert isinstance(copy, Copy) and copy.sync == sync and copy.model is not policy
    start = dict(policy.named_parameters())
    assert all(torch.equal(p, start[n]) and not p.requires_grad for n, p in copy.model.named_parameters())


# ---------------------------------------------------------------------------------------------- logps


def test_each_strategy_scores_the_true_reference_without_gradients(tokenizer):
    base = tiny_model(tokenizer)
    want = naive(base)

    assert Reference().logps(base, sums) is None

    got = Copy(tiny_model(tokenizer)).logps(moved(tiny_model(tokenizer)), sums)  # the copy, not the policy
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not got.requires_grad

    policy = apply_lora(tiny_model(tokenizer), LoraConfig(r=4))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # the adapter now changes the outputs
    got = AdapterOff().logps(policy, sums)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not got.requires_grad
    assert (sums(policy) - want).abs().max() > 1e-3  # the adapter is back on afterwards

    stored = torch.tensor([-1.5, -2.5])
    pre = Precomputed("m")
    assert pre.logps(policy, lambda m: pytest.fail("a precomputed reference runs no model"), stored=stored) is stored
    with pytest.raises(RuntimeError, match="no precomputed values"):
        pre.logps(policy, sums)


def test_per_token_scores_pass_through(tokenizer):
    """GRPO / PPO ask for per-token log-probs: the strategy returns whatever the score returns, [B, T]."""
    ref = tiny_model(tokenizer)
    b = batch()

    def per_token(model):
        return token_logps(model, b.input_ids, b.attention_mask, b.loss_mask).logps

    got = Copy(ref).logps(tiny_model(tokenizer, seed=3), per_token)
    with torch.no_grad():
        want = naive_token_logps(ref, b.input_ids, b.attention_mask, b.loss_mask)
    assert got.shape == b.input_ids.shape
    mask = b.loss_mask.bool()
    mask[:, 0] = False  # the first token is never predicted
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- TR-DPO sync


def test_sync_every_n_steps_and_its_checkpoint_state(tokenizer):
    policy = moved(tiny_model(tokenizer))
    ref = Copy(tiny_model(tokenizer), Sync(every=2, alpha=0.5))
    old = {n: p.clone() for n, p in ref.model.named_parameters()}
    now = dict(policy.named_parameters())

    ref.on_step_end(policy, 1)  # not a multiple of 2: nothing moves
    assert all(torch.equal(p, old[n]) for n, p in ref.model.named_parameters())
    ref.on_step_end(policy, 2)  # ref <- 0.5 * policy + 0.5 * ref (exact in float for alpha 0.5)
    for n, p in ref.model.named_parameters():
        assert torch.equal(p, 0.5 * now[n].detach() + 0.5 * old[n]), n

    state = ref.state_dict()
    assert state.keys() == {"ref_model"}  # the key algorithm.pt has always used
    fresh = Copy(tiny_model(tokenizer), Sync(every=2, alpha=0.5))
    fresh.load_state_dict(state)
    assert all(torch.equal(p, dict(ref.model.named_parameters())[n]) for n, p in fresh.model.named_parameters())

    frozen = Copy(tiny_model(tokenizer))
    frozen.on_step_end(policy, 2)
    assert frozen.state_dict() == {}  # a frozen reference is rebuilt from the config, never saved
    assert all(torch.equal(p, old[n]) for n, p in frozen.model.named_parameters())


# ------------------------------------------------------------------------------------------ footprint


def test_footprint_says_what_stays_in_memory(tokenizer):
    model = tiny_model(tokenizer)
    n = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    copy = Copy(model).footprint()
    assert (copy.strategy, copy.parameters, copy.bytes, copy.stored_values) == ("copy", n, size, 0)
    assert n > 10_000 and size >= 4 * n  # float32 weights (plus the rotary buffers)
    for ref, name in ((Reference(), "none"), (AdapterOff(), "adapter"), (Precomputed("m"), "precomputed")):
        f = ref.footprint()
        assert (f.strategy, f.parameters, f.bytes, f.stored_values) == (name, 0, 0, 0) and f.note


# ------------------------------------------------------------------------------------------ precompute


def precompute(ref, policy, examples, settings=None):
    """The reference's precompute as an algorithm calls it, with one value per example (its sequence's sum)."""
    stored = {}

    def score(model, chunk):
        return sums(model, collate([e for e in chunk], 0))[:, None]

    sources = ref.precompute(policy, [examples], name="test", settings=settings or {"x": 1},
                             sequences=lambda e: (e,), score=score, store=lambda e, v: stored.__setitem__(id(e), v),
                             size=1)
    return sources, torch.tensor([stored[id(e)] for e in examples])


def test_precompute_scores_once_caches_and_keys_on_what_changes_the_values(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    ref_dir = save_tiny(tmp_path / "ref", seed=5)
    policy = tiny_model(tokenizer)
    loads = []
    real = reference.load_model

    def counting(*a, **k):
        loads.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(reference, "load_model", counting)
    ref = Precomputed(ref_dir, path=ref_dir)
    [source], values = precompute(ref, policy, SEQS)
    assert source.startswith("computed") and loads == [ref_dir]
    torch.testing.assert_close(values[:, 0], naive(load_model(ref_dir)), rtol=0, atol=1e-5)  # the path's model
    assert ref._model is None and ref.footprint().stored_values == 2  # released after precomputing

    # Same weights, settings and sequences: read from the cache, no model loaded.
    again = Precomputed(ref_dir, path=ref_dir)
    [source], cached = precompute(again, policy, SEQS)
    assert source.startswith("cache") and loads == [ref_dir] and torch.equal(cached, values)
    files = list((tmp_path / "cache" / "ref_logps").glob("test-*.pt"))
    assert len(files) == 1

    # Anything that changes the values is another file: settings, a token, a mask, the weights.
    precompute(Precomputed(ref_dir, path=ref_dir), policy, SEQS, settings={"x": 2})
    precompute(Precomputed(ref_dir, path=ref_dir), policy, [SEQS[0], Encoded([11, 12, 14], [0, 1, 1])])
    precompute(Precomputed(ref_dir, path=ref_dir), policy, [SEQS[0], Encoded([11, 12, 13], [0, 0, 1])])
    weights = next(iter((tmp_path / "ref").glob("*.safetensors")))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    precompute(Precomputed(ref_dir, path=ref_dir), policy, SEQS)
    assert len(list((tmp_path / "cache" / "ref_logps").glob("test-*.pt"))) == 5 and len(loads) == 5


def test_precompute_without_a_path_scores_the_starting_policy_adapter_off(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    base = tiny_model(tokenizer)
    want = naive(base)
    policy = apply_lora(base, LoraConfig(r=4))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    policy.train()
    monkeypatch.setattr(reference, "load_model", lambda *a, **k: pytest.fail("no reference model to load"))
    _, values = precompute(Precomputed("tiny-policy"), policy, SEQS)  # a name: no weight files to key on
    torch.testing.assert_close(values[:, 0], want, rtol=0, atol=1e-5)
    assert policy.training  # its mode is restored


# ------------------------------------------------------------- issue 11: nothing of the reference is left


def _pairs_file(path):
    rows = [{"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 21"},
            {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("module", [dpo, kto])
def test_precompute_with_ref_model_path_keeps_no_reference_model_while_training(module, tmp_path, monkeypatch):
    """`precompute_ref_log_probs: true` + `ref_model: PATH`: the model loaded from PATH scores the data, then
    nothing holds it: at the first training step it has been garbage-collected, and no module reachable from
    the engine (policy, algorithm, reference, examples) is the reference model."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    policy_dir, ref_dir = save_tiny(tmp_path / "policy"), save_tiny(tmp_path / "ref", seed=4)
    ref_embedding = load_model(ref_dir).get_input_embeddings().weight.detach().clone()
    loaded = []
    real = reference.load_model

    def tracked(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    seen = []
    step = Engine._run_step

    def first_step(self, micro_batches):
        gc.collect()
        seen.append(([r() for r in loaded], _modules_reachable_from(self)))
        return step(self, micro_batches)

    monkeypatch.setattr(reference, "load_model", tracked)
    monkeypatch.setattr(Engine, "_run_step", first_step)
    args = [f"model={policy_dir}", f"ref_model={ref_dir}", "precompute_ref_log_probs=true", "batch_size=2",
            f"dataset={_pairs_file(tmp_path / 'pairs.jsonl')}", "max_steps=1", "progress=false",
            f"output_dir={tmp_path / 'run'}"]
    module.run(load_config(module.Config, None, args))
    [(alive, modules)] = seen
    assert len(loaded) == 1 and alive == [None]  # loaded once, freed before training
    embeddings = [m.weight for m in modules if isinstance(m, torch.nn.Embedding)]
    assert embeddings and not any(torch.equal(w, ref_embedding) for w in embeddings)  # the policy's only


def _modules_reachable_from(root) -> list:
    """Every torch module reachable from `root` through attributes and containers."""
    found, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.Tensor, type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
        if isinstance(obj, dict):
            todo += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo += list(obj)
        if hasattr(obj, "__dict__"):
            todo += list(vars(obj).values())
    return found
