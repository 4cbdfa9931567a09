"""The guard every model patch must pass: a patched path (lean MLP backward, chunked LM-head log-probs, the packed
shared-prefix forward with its per-unit attention kernel or the eager block mask, packed SFT rows) must give the
same numbers with gradients enabled as without, the same numbers and gradients as the plain model's full
log-softmax, and a non-zero gradient to EVERY trainable parameter, LoRA adapters on every linear layer included.

This is the test that would have caught lean MLP reading `down_proj.weight` under LoRA (the adapter was skipped
while training and used while generating). A new patch adds one entry to PATHS (and a new way of wrapping
the model one entry to SETUPS); the matrix does the rest.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import LoraConfig
from posttrain.data.tokenize import Encoded, Packed, collate, collate_packed
from posttrain.logprobs import naive_token_logps, shared_prefix_token_logps, token_logps
from posttrain.models import apply_lora, enable_checkpointing, lean_mlp
from posttrain.testing import assert_close_to_scale, tiny_model

EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]

# name -> (lean_mlp, gradient checkpointing, lora target_modules or None, attention kernel). SDPA runs the
# packed rows through `unit_attention` (posttrain's per-unit kernel), eager through a block mask.
SETUPS = {
    "full": (True, False, None, "sdpa"),
    "full-eager": (True, False, None, "eager"),
    "lora-all-linear": (True, False, "all-linear", "sdpa"),
    "lora-every-linear-and-head": (True, False, EVERY_LINEAR, "sdpa"),
    "lora-every-linear-eager": (True, False, EVERY_LINEAR, "eager"),
    "lora-mlp-only-checkpointed": (True, True, ["gate_proj", "up_proj", "down_proj"], "sdpa"),
    "lora-down-proj": (True, False, ["q_proj", "down_proj"], "sdpa"),  # the reported bug
}


def build(tokenizer, setup: str, patched: bool):
    """The tiny model of a setup, patched (lean MLP and the rest, as prepare_model does it) or stock. Both get
    the same weights, and every LoRA B a non-zero value, so an adapter that is skipped changes the output."""
    lean, checkpointing, targets, attention = SETUPS[setup]
    model = tiny_model(tokenizer, seed=3)
    model.config._attn_implementation = attention
    if patched and lean:
        assert lean_mlp(model) == 2
    if checkpointing:
        enable_checkpointing(model)
    if targets is not None:
        model = apply_lora(model, LoraConfig(r=4, alpha=8.0, target_modules=targets))
        if checkpointing:
            model.enable_input_require_grads()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.train()
    return model


def _sequences(tokenizer):
    texts = [("What is 12 + 7?", " The answer is 19."), ("2 + 2 =", " 4"), ("Human: bake bread?", " Mix flour, water")]
    return [(tokenizer(p)["input_ids"], tokenizer(c)["input_ids"]) for p, c in texts]


def _padded(pairs, pad_id):
    """Right-padded prompt + completion rows with the completion scored."""
    return collate([Encoded(p + c, [0] * len(p) + [1] * len(c)) for p, c in pairs], pad_id)


def path_logits(model, tokenizer):
    """The model's own forward (lean MLP inside) and a full log-softmax: what generation and eval see."""
    b = _padded(_sequences(tokenizer), tokenizer.pad_token_id)
    return naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask)


def path_chunked(model, tokenizer):
    """The chunked, fused LM-head routine (chunks of 3 rows, so several chunks run)."""
    b = _padded(_sequences(tokenizer), tokenizer.pad_token_id)
    return token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, chunk_size=3, with_stats=True).logps


def path_shared_prefix(model, tokenizer):
    """Packed shared-prefix layout: two completions share prompt 0; aligned back to [rows, completion]."""
    pairs = _sequences(tokenizer)
    prompts = [p for p, _ in pairs]
    comps = [pairs[0][1], pairs[1][1], pairs[2][1], pairs[1][1][::-1]]
    row_prompt = torch.tensor([0, 1, 2, 0])
    T = max(len(c) for c in comps)
    ids = torch.full((len(comps), T), tokenizer.pad_token_id)
    mask = torch.zeros(len(comps), T, dtype=torch.long)
    for i, c in enumerate(comps):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    return shared_prefix_token_logps(model, prompts, row_prompt, ids, mask, tokenizer.pad_token_id,
                                     with_stats=("entropy",)).logps


def path_packed_rows(model, tokenizer):
    """SFT packing: two examples in one row (positions restart, block mask), one alone."""
    ex = [Encoded(p + c, [0] * len(p) + [1] * len(c)) for p, c in _sequences(tokenizer)]
    b = collate_packed([Packed([ex[0], ex[1]]), Packed([ex[2]])], tokenizer.pad_token_id)
    return token_logps(model, b.input_ids, b.attention_mask, b.loss_mask, b.position_ids).logps


def _plain_logps(model, pairs, pad_id):
    """Per-row lists of the scored completion tokens' log-probs, from the stock full log-softmax."""
    b = _padded(pairs, pad_id)
    lp = naive_token_logps(model, b.input_ids, b.attention_mask, b.loss_mask)
    return [lp[i, len(p) : len(p) + len(c)] for i, (p, c) in enumerate(pairs)]


def reference_logits(model, tokenizer):
    return path_logits(model, tokenizer)


def reference_shared_prefix(model, tokenizer):
    pairs = _sequences(tokenizer)
    rows = [pairs[0], pairs[1], pairs[2], (pairs[0][0], pairs[1][1][::-1])]
    per_row = _plain_logps(model, rows, tokenizer.pad_token_id)
    T = max(len(r) for r in per_row)
    return torch.stack([torch.nn.functional.pad(r, (0, T - len(r))) for r in per_row])


def reference_packed_rows(model, tokenizer):
    pairs = _sequences(tokenizer)
    per_row = _plain_logps(model, pairs, tokenizer.pad_token_id)
    rows = [[(pairs[0], per_row[0]), (pairs[1], per_row[1])], [(pairs[2], per_row[2])]]
    T = max(sum(len(p) + len(c) for (p, c), _ in r) for r in rows)
    out = torch.zeros(len(rows), T)
    for i, row in enumerate(rows):
        at = 0
        for (p, c), lp in row:
            out[i, at + len(p) : at + len(p) + len(c)] = lp
            at += len(p) + len(c)
    return out


# name -> (patched path, the same quantity computed the plain way on the stock model)
PATHS = {
    "logits": (path_logits, reference_logits),
    "chunked": (path_chunked, reference_logits),
    "shared_prefix": (path_shared_prefix, reference_shared_prefix),
    "packed_rows": (path_packed_rows, reference_packed_rows),
}


def _backward(model, logps):
    model.zero_grad(set_to_none=True)
    # An uneven upstream gradient, so a wrong term in any element shows.
    (logps * torch.linspace(-1.0, 2.0, logps.numel()).view_as(logps)).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # LoRA on the tied lm_head: intended
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("path", list(PATHS))
def test_patched_path_trains_what_it_evaluates(tokenizer, setup, path):
    run, reference = PATHS[path]
    model = build(tokenizer, setup, patched=True)
    stock = build(tokenizer, setup, patched=False)

    with torch.no_grad():
        no_grad = run(model, tokenizer)
    train = run(model, tokenizer)
    plain = reference(stock, tokenizer)
    assert train.shape == no_grad.shape == plain.shape
    assert train.abs().sum() > 0
    assert_close_to_scale(train, no_grad, name=f"{path}: grad-enabled vs no-grad forward")
    assert_close_to_scale(train, plain, name=f"{path}: patched vs stock")

    if path == "shared_prefix":  # the per-unit kernel (SDPA) or the block mask (eager) really ran
        from posttrain.logprobs import UNIT_ATTENTION
        from posttrain.models import unwrap

        expected_kernel = UNIT_ATTENTION if SETUPS[setup][3] == "sdpa" else "eager"
        assert unwrap(model).config._attn_implementation == expected_kernel

    grads = _backward(model, train)
    plain_grads = _backward(stock, plain)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and set(grads) == set(plain_grads)
    if SETUPS[setup][2] is not None:
        assert all("lora_" in n for n in trainable)
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
        expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        targets = SETUPS[setup][2]
        expected = expected if targets == "all-linear" else set(targets)
        assert adapted == expected  # the adapters sit where asked, and nowhere else
    for n in trainable:
        assert grads[n] is not None and grads[n].abs().max() > 0, f"{path}/{setup}: {n} gets no gradient"
        assert_close_to_scale(grads[n], plain_grads[n], rtol=1e-4, name=f"{path}/{setup}: {n}")


def test_lora_on_down_proj_changes_the_training_output(tokenizer):
    """The reported case, stated directly: adapters on q_proj and down_proj with lean_mlp on. The training
    forward moves with down_proj's adapter (it was ignored before the fix)."""
    model = build(tokenizer, "lora-down-proj", patched=True)
    ids = _padded(_sequences(tokenizer), tokenizer.pad_token_id).input_ids
    before = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "down_proj.lora_B" in n:
                p.mul_(3.0)
    after = model(input_ids=ids).logits.detach()
    assert (after - before).abs().max() > 1e-3
