"""The chunked, fused log-prob routine against a plain full-vocabulary log-softmax."""

import pytest
import torch

from posttrain.data.tokenize import Encoded, collate, collate_packed, pack
from posttrain.logprobs import _HeadLogProb, naive_token_logps, sequence_logps, token_logps
from posttrain.testing import tiny_model
from posttrain.testing import assert_close_to_scale

TEXTS = ["What is 12 + 7? The answer is 19.", "Human: How do I bake bread?", "the a an is of to and"]


def batch(tok):
    examples = []
    for i, text in enumerate(TEXTS):
        t = tok(text)["input_ids"]
        # Score the second half of each sequence (a "completion"), like prompt-completion data.
        examples.append(Encoded(t, [0] * (len(t) // 2 + i) + [1] * (len(t) - len(t) // 2 - i)))
    return collate(examples, tok.pad_token_id)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("keep_chunks", [0, 2, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_parameter_gradients_match_naive(tokenizer, temperature, keep_chunks, monkeypatch):
    """Every chunk recomputed in backward (0), the first two kept from forward and the rest recomputed (2), and
    all kept (100): the same values and gradients as the full log-softmax, also from a second backward."""
    import posttrain.logprobs as lp

    model = tiny_model(tokenizer, seed=1)
    monkeypatch.setattr(lp, "KEEP_BYTES", keep_chunks * 5 * model.config.vocab_size * 4)
    b = batch(tokenizer)
    assert int(b.loss_mask[:, 1:].sum()) > 15  # chunk_size 5 below: several chunks, the last partial
    weights = torch.linspace(0.5, 2.0, b.input_ids.numel()).view_as(b.input_ids)  # an arbitrary upstream gradient

    out = token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, temperature=temperature, chunk_size=5)
    calls, real = [], lp._chunk_logits
    monkeypatch.setattr(lp, "_chunk_logits", lambda *a: calls.append(1) or real(*a))
    (out.logps * weights).sum().backward(retain_graph=True)
    chunks = -(-int(b.loss_mask[:, 1:].sum()) // 5)
    assert len(calls) == max(chunks - keep_chunks, 0)  # backward recomputes exactly the chunks not kept
    g_chunked = grads(model)
    model.zero_grad()
    (out.logps * weights).sum().backward()  # kept chunks are not consumed by the first backward
    for name, g in grads(model).items():
        assert_close_to_scale(g, g_chunked[name], rtol=1e-6, name=name)
    model.zero_grad()
    ref = naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, temperature=temperature)
    (ref * weights).sum().backward()
    g_naive = grads(model)

    assert torch.allclose(out.logps, ref, atol=1e-5, rtol=0)
    assert torch.equal(out.mask, torch.cat([torch.zeros(3, 1), b.loss_mask[:, 1:].float()], 1))
    assert (out.logps[out.mask == 0] == 0).all() and (out.logps[out.mask == 1] < 0).all()
    assert set(g_chunked) == set(g_naive) and len(g_naive) > 5
    for name in g_naive:
        assert_close_to_scale(g_chunked[name], g_naive[name], name=name)


def test_sequence_logps_and_no_grad_path(tokenizer, model):
    b = batch(tokenizer)
    ref = naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask)
    sums, counts = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask, chunk_size=4)
    assert torch.allclose(sums, ref.sum(-1), atol=1e-5)
    assert counts.tolist() == b.loss_mask[:, 1:].sum(-1).float().tolist()
    with torch.no_grad():
        out = token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, chunk_size=4)
    assert not out.logps.requires_grad
    assert torch.allclose(out.logps, ref, atol=1e-5)


def test_stats_match_full_logits(tokenizer, model):
    b = batch(tokenizer)
    with torch.no_grad():
        out = token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, chunk_size=3, with_stats=True)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    m = out.mask[:, 1:].bool()
    assert torch.allclose(out.entropy[:, 1:][m], -(logp.exp() * logp).sum(-1)[m], atol=1e-5)
    assert torch.allclose(out.logits_mean[:, 1:][m], logits[:, :-1].mean(-1)[m], atol=1e-5)
    assert torch.allclose(out.log_p2[:, 1:][m], torch.log((logp.exp() ** 2).sum(-1))[m], atol=1e-5)
    assert (out.entropy[out.mask == 0] == 0).all()
    # Only the statistics asked for are computed, with the same values; unknown names are refused.
    with torch.no_grad():
        some = token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, chunk_size=3, with_stats=("log_p2",))
    assert some.entropy is None and some.logits_mean is None
    torch.testing.assert_close(some.log_p2, out.log_p2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(some.logps, out.logps, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown statistics"):
        token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, with_stats=("entropy", "kl"))


def test_head_function_with_bias_and_hidden_gradient():
    torch.manual_seed(0)
    h = torch.randn(7, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 5, 5, 1, 2])
    upstream = torch.randn(7)
    logp, _ = _HeadLogProb.apply(h, w, bias, targets, 0.5, 3, ())
    (logp * upstream).sum().backward()
    got = [t.grad.clone() for t in (h, w, bias)]
    for t in (h, w, bias):
        t.grad = None
    ref = torch.log_softmax((h @ w.T + bias) / 0.5, -1).gather(1, targets[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    assert torch.allclose(logp, ref, atol=1e-5)
    for g, t in zip(got, (h, w, bias)):
        assert_close_to_scale(g, t.grad)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_separate_sequences(tokenizer, attn):
    """A packed row (positions restart, block-diagonal mask) scores each example exactly as if alone; the
    eager kernel adds the mask, so this also checks the boolean mask is turned into an additive one."""
    model = tiny_model(tokenizer, seed=2)
    model.set_attn_implementation(attn)
    examples = []
    for text in TEXTS:
        t = tokenizer(text)["input_ids"]
        examples.append(Encoded(t, [0] + [1] * (len(t) - 1)))
    rows = pack(examples, max_length=32)
    assert [len(r.lengths) for r in rows] == [2, 1]  # two examples share the first row
    packed = collate_packed(rows, tokenizer.pad_token_id)
    out = token_logps(model, packed.input_ids, packed.attention_mask, packed.loss_mask, packed.position_ids)
    for i, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            alone = collate([Encoded(row.input_ids[start : start + n], row.mask[start : start + n])], 0)
            ref = naive_token_logps(model, alone.input_ids, alone.attention_mask, alone.loss_mask)[0]
            assert torch.allclose(out.logps[i, start : start + n], ref, atol=1e-5)
            start += n


def _saved_bytes(fn) -> int:
    """Bytes of distinct tensor storages autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack_hook(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn()
    return sum(storages.values())


def test_memory_long_completion_large_vocab(tokenizer):
    """Vocab 49152 (SmolLM2's), 2048 tokens all scored: the naive path keeps the full float32
    log-softmax for backward, 2048 x 49152 x 4 B = 402,653,184 B. The chunked path keeps the hidden states
    (2047 x 32 x 4 B = 262 KB), the head weight (49152 x 32 x 4 B = 6.3 MB), targets and one log-sum-exp
    per token; with the decoder's own saved tensors it stays far below."""
    model = tiny_model(tokenizer, hidden_size=32, vocab_size=49152)
    T = 2048
    ids = torch.randint(0, 49152, (1, T), generator=torch.Generator().manual_seed(0))
    attn, mask = torch.ones_like(ids), torch.ones_like(ids)
    naive = _saved_bytes(lambda: naive_token_logps(model, ids, attn, mask))
    chunked = _saved_bytes(lambda: token_logps(model, ids, attn, mask, chunk_size=256))
    assert naive > 2048 * 49152 * 4
    assert chunked < 30_000_000
    assert chunked < naive / 4


def test_head_stays_float32_under_bf16_autocast():
    """bf16 autocast (`bf16: true`) runs the decoder in bf16, but the LM head, the log-softmax and their
    gradients stay float32: the head's values and gradients are the ones computed without autocast."""
    torch.manual_seed(0)
    h = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))

    def run(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, _ = _HeadLogProb.apply(h, w, None, targets, 1.0, 3, ())
        assert logp.dtype == torch.float32
        gh, gw = torch.autograd.grad(logp.sum(), (h, w))
        return logp, gh, gw

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast would have given: visibly different
        bf16 = torch.log_softmax(torch.nn.functional.linear(h, w), -1).float().gather(1, targets[:, None]).squeeze(1)
    assert (bf16 - run(False)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("keep_chunks", [0, 2, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_with_a_gradient_matches_autograd_on_the_full_softmax(tokenizer, temperature, keep_chunks,
                                                                      monkeypatch):
    """grad_entropy: the entropy statistic carries dH/dlogits = -p (log p + H) through the chunked head's own
    backward, together with the log-prob's gradient, from recomputed chunks (0), some kept (2) or all kept (100);
    every parameter's gradient equals autograd on the plain full softmax, and without grad_entropy the entropy
    stays detached."""
    import posttrain.logprobs as lp

    model = tiny_model(tokenizer, seed=2)
    monkeypatch.setattr(lp, "KEEP_BYTES", keep_chunks * 5 * model.config.vocab_size * 4)
    b = batch(tokenizer)
    w_logp = torch.linspace(0.5, 2.0, b.input_ids.numel()).view_as(b.input_ids)
    w_ent = torch.linspace(-1.0, 1.0, b.input_ids.numel()).view_as(b.input_ids)
    out = token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, temperature=temperature, chunk_size=5,
                      with_stats=("logits_mean", "entropy"), grad_entropy=True)
    ((out.logps * w_logp).sum() + (out.entropy * w_ent).sum()).backward()
    g_chunked = grads(model)
    model.zero_grad()
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()[:, :-1] / temperature
    logp = logits.log_softmax(-1)
    mask = b.loss_mask[:, 1:].float()
    entropy = torch.cat([torch.zeros_like(mask[:, :1]), -(logp.exp() * logp).sum(-1) * mask], dim=1)
    ref = naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, temperature=temperature)
    assert_close_to_scale(out.entropy, entropy, name="entropy")
    ((ref * w_logp).sum() + (entropy * w_ent).sum()).backward()
    g_naive = grads(model)
    assert set(g_chunked) == set(g_naive) == {n for n, _ in model.named_parameters()}
    for n in g_naive:
        assert_close_to_scale(g_chunked[n], g_naive[n], rtol=1e-4, name=n)
    plain = token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, with_stats=("entropy",))
    assert not plain.entropy.requires_grad and plain.logps.requires_grad
