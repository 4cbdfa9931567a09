"""`shared_prefix_token_logps` (each prompt laid out once with its completions in a padding-free packed row, a
block mask keeping each completion to its own prompt) against `token_logps` and the naive full log-softmax on
the plain concatenated prompt + completion sequences."""

import pytest
import torch

from posttrain.config import LoraConfig
from posttrain.logprobs import naive_token_logps, shared_prefix_token_logps, token_logps
from posttrain.models import apply_lora
from posttrain.testing import tiny_model
from posttrain.testing import assert_close_to_scale

PROMPTS = ["What is 12 + 7?", "2 + 2 =", "Human: How do I bake bread? Assistant:"]
COMPLETIONS = [" The answer is 19.", " 4 and 5", " Mix flour, water", " 19", " bake it then"]
ROW_PROMPT = [2, 0, 1, 0, 2]  # rows out of prompt order, prompt 0 and 2 shared by two rows each


def case(tok):
    """Prompts of different lengths, right-padded completions, and a completion mask with trailing zeros
    (row 1 scores only 2 of its tokens, row 4 none at all: a masked-out truncated completion)."""
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    comps = [tok(c)["input_ids"] for c in COMPLETIONS]
    assert len({len(p) for p in prompts}) == 3
    T = max(len(c) for c in comps)
    ids = torch.full((len(comps), T), tok.pad_token_id)
    mask = torch.zeros(len(comps), T, dtype=torch.long)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    mask[1, 2:] = 0
    mask[4] = 0
    assert mask.sum(-1).tolist()[1] == 2 and int(mask.sum()) > 8
    return prompts, torch.tensor(ROW_PROMPT), ids, mask


def concatenated(prompts, row_prompt, ids, mask, pad_id):
    """The same rows as plain right-padded prompt + completion sequences, and where completion j of row i sits."""
    seqs = [prompts[int(p)] + ids[i].tolist() for i, p in enumerate(row_prompt)]
    L = max(len(s) for s in seqs)
    full = torch.full((len(seqs), L), pad_id)
    attn = torch.zeros(len(seqs), L, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        start = len(prompts[int(row_prompt[i])])
        full[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss_mask[i, start : start + ids.shape[1]] = mask[i]
    offsets = [len(prompts[int(p)]) for p in row_prompt]
    return full, attn, loss_mask, offsets


def realign(values, offsets, T):
    """[N, L] values aligned with the concatenated sequence -> [N, T] aligned with the completion."""
    return torch.stack([values[i, o : o + T] for i, o in enumerate(offsets)])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check(model, tok, temperature, **kw):
    prompts, row_prompt, ids, mask = case(tok)
    N, T = ids.shape
    # An arbitrary upstream gradient, different for every token, so a misplaced value changes the gradient.
    weights = torch.linspace(0.5, 2.0, N * T).view(N, T)

    shared = shared_prefix_token_logps(model, prompts, row_prompt, ids, mask, tok.pad_token_id,
                                       temperature=temperature, chunk_size=3, with_stats=True, **kw)
    (shared.logps * weights).sum().backward()
    g_shared = grads(model)
    model.zero_grad()

    full, attn, loss_mask, offsets = concatenated(prompts, row_prompt, ids, mask, tok.pad_token_id)
    plain = token_logps(model, full, attn, loss_mask, temperature=temperature, with_stats=True)
    plain_logps = realign(plain.logps, offsets, T)
    (plain_logps * weights).sum().backward()
    g_plain = grads(model)
    model.zero_grad()
    with torch.no_grad():
        naive = realign(naive_token_logps(model, full, attn, loss_mask, temperature=temperature), offsets, T)

    assert torch.equal(shared.mask, mask.float())
    assert (shared.logps[mask == 0] == 0).all() and (shared.logps[mask == 1] < 0).all()
    torch.testing.assert_close(shared.logps, plain_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.logps, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy, realign(plain.entropy, offsets, T), atol=1e-5, rtol=1e-5)
    assert set(g_shared) == set(g_plain) and len(g_plain) >= 4
    for name in g_plain:
        assert g_plain[name].abs().max() > 0, name
        assert_close_to_scale(g_shared[name], g_plain[name], name=name)
    return shared


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_equals_concatenated_sequences(tokenizer, temperature):
    model = tiny_model(tokenizer, seed=3)
    out = check(model, tokenizer, temperature)
    # Rows 1 and 3 continue prompt 0 with completions that start with the same token (" "): the one
    # gathered prompt state predicts both, so the two first log-probs are the same number.
    comps = [tokenizer(c)["input_ids"] for c in COMPLETIONS]
    assert comps[1][0] == comps[3][0] and comps[1][1] != comps[3][1]
    assert out.logps[1, 0] == out.logps[3, 0] and out.logps[1, 1] != out.logps[3, 1]


def test_shared_prefix_with_lora(tokenizer):
    model = apply_lora(tiny_model(tokenizer, seed=4), LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero (no gradient reaches lora_A then): give it a value
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    check(model, tokenizer, 0.7)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_no_grad_path_and_single_prompt(tokenizer, model):
    """All rows of one prompt (one GRPO group) and the no-grad path used for reference log-probs."""
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    comps = [tokenizer(c)["input_ids"][:3] for c in COMPLETIONS[:3]]
    ids = torch.tensor(comps)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        shared = shared_prefix_token_logps(model, [prompt], torch.zeros(3, dtype=torch.long), ids, mask,
                                           tokenizer.pad_token_id)
        full = torch.tensor([prompt + c for c in comps])
        lm = torch.cat([torch.zeros(3, len(prompt), dtype=torch.long), mask], 1)
        naive = naive_token_logps(model, full, torch.ones_like(full), lm)[:, len(prompt):]
    assert not shared.logps.requires_grad
    torch.testing.assert_close(shared.logps, naive, atol=1e-5, rtol=1e-5)



def test_pack_units_layout_by_hand():
    """Prompts [1 2 3] and [4 5]; rows continue prompt 1, 0, 1 with 2, 3 and 0 tokens. Layout: prompt 0 at 0-2,
    row 1 at 3-5, prompt 1 at 6-7, row 0 at 8-9, row 2 (empty) at 10."""
    from posttrain.logprobs import pack_units

    layout, index = pack_units([[1, 2, 3], [4, 5]], torch.tensor([1, 0, 1]), [2, 3, 0])
    assert layout.units == [(0, 3, [(3, 3)]), (6, 2, [(8, 2)])] and layout.length == 10
    expected = {"prompt_ids": [1, 2, 3, 4, 5], "prompt_at": [0, 1, 2, 6, 7], "prompt_pos": [0, 1, 2, 0, 1],
                "row_start": [8, 3, 10], "prompt_end": [7, 2, 7], "row_offset": [2, 3, 2]}
    assert {k: v.tolist() for k, v in index.items()} == expected
    dense = layout.dense_mask("cpu")[0, 0]
    assert dense[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # row 1's 2nd token: its prompt, itself causally
    assert dense[9].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]  # row 0's 2nd token: prompt 1 and row 0 only


def test_unit_attention_runs_per_unit_and_leaves_other_forwards_alone(tokenizer, monkeypatch):
    """An SDPA model gets the per-unit attention: one causal kernel call per prompt and one per non-empty
    completion per layer, never an [L, L] mask; a forward without a layout (generation) gives the same logits as
    before the switch; and grad-enabled and no-grad packed forwards agree."""
    import torch.nn.functional as F

    import posttrain.logprobs as lp

    model = tiny_model(tokenizer, seed=5)
    ids = torch.tensor([tokenizer("What is 12 + 7? The answer")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    prompts, row_prompt, comp, mask = case(tokenizer)
    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.shape[2], k.shape[2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        quiet = shared_prefix_token_logps(model, prompts, row_prompt, comp, mask, tokenizer.pad_token_id)
    assert model.config._attn_implementation == lp.UNIT_ATTENTION
    units = len(prompts) + int((mask.sum(-1) > 0).sum()) + 1  # row 4 scores nothing but still has a token
    assert len(shapes) == units * model.config.num_hidden_layers
    layout, _ = lp.pack_units(prompts, row_prompt, (comp != tokenizer.pad_token_id).sum(-1).tolist())
    longest = max(p + max([c for _, c in comps], default=0) for _, p, comps in layout.units)
    assert all(m is None or m == (q, k) for q, k, m in shapes)  # masks only [c, p + c], per completion
    assert max(k for _, k, _ in shapes) == longest < layout.length / 2
    loud = shared_prefix_token_logps(model, prompts, row_prompt, comp, mask, tokenizer.pad_token_id)
    torch.testing.assert_close(loud.logps.detach(), quiet.logps, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_kernels_and_gradient_checkpointing(tokenizer, attn):
    """The block mask reaches both attention kernels as an additive mask, and packed rows need no KV cache,
    so checkpointed layers take the same path."""
    model = tiny_model(tokenizer, seed=6)
    model.config._attn_implementation = attn
    check(model, tokenizer, 1.0)
    from posttrain.models import enable_checkpointing

    enable_checkpointing(model)
    model.train()
    check(model, tokenizer, 1.0)


def test_kernels_without_masks_score_the_concatenated_sequences(tokenizer, monkeypatch):
    """An attention kernel that takes no arbitrary mask (flash-attention) gets the plain sequences instead.
    Stood in for by a custom kernel name that runs SDPA: the fallback is taken and gives the same numbers."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import posttrain.logprobs as lp

    AttentionInterface.register("posttrain_test_kernel", sdpa_attention_forward)
    model = tiny_model(tokenizer, seed=7)
    prompts, row_prompt, ids, mask = case(tokenizer)
    with torch.no_grad():
        packed = shared_prefix_token_logps(model, prompts, row_prompt, ids, mask, tokenizer.pad_token_id)
        calls = []
        real = lp._concatenated_token_logps
        monkeypatch.setattr(lp, "_concatenated_token_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
        model.config._attn_implementation = "posttrain_test_kernel"
        plain = shared_prefix_token_logps(model, prompts, row_prompt, ids, mask, tokenizer.pad_token_id)
    assert calls == [1]
    torch.testing.assert_close(plain.logps, packed.logps, atol=1e-5, rtol=1e-5)


def test_unit_attention_is_not_saved_with_the_model(tokenizer, tmp_path):
    """The switch to the per-unit attention lives in memory only: a saved model loads anywhere with plain SDPA."""
    import json

    from transformers import AutoModelForCausalLM

    from posttrain.logprobs import UNIT_ATTENTION, use_unit_attention

    model = tiny_model(tokenizer, seed=8)
    assert use_unit_attention(model) and model.config._attn_implementation == UNIT_ATTENTION
    model.save_pretrained(tmp_path)
    assert UNIT_ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    eager = tiny_model(tokenizer, seed=8)
    eager.config._attn_implementation = "eager"
    assert not use_unit_attention(eager) and eager.config._attn_implementation == "eager"  # left alone
