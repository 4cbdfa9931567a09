import math

import pytest
import torch

from posttrain.rollout.generate import HFEngine, Rollout, filter_logits
from posttrain.testing import tiny_model

PROMPTS = ["What is 12 + 7?", "Human: How do I bake bread?", "the a"]


@pytest.fixture
def model(tokenizer):
    """The tiny model with weights redrawn at std 0.5: at its default init greedy decoding just repeats the last
    prompt token, which would hide position or padding bugs; these weights give varied, context-dependent text."""
    m = tiny_model(tokenizer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _prompt_ids(tokenizer, texts=PROMPTS):
    return [tokenizer(t)["input_ids"] for t in texts]


def _hf_greedy(model, tokenizer, prompt_ids, max_new_tokens):
    """Reference: transformers' own generate on the same left-padded batch."""
    L = max(map(len, prompt_ids))
    ids = torch.tensor([[tokenizer.pad_token_id] * (L - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return out[:, L:]


def _teacher_forced_logps(model, prompt, completion, temperature):
    """log-softmax(logits / T) of each completion token, from one unpadded forward of prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_greedy_matches_transformers_generate(model, tokenizer):
    prompts = _prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) == 3  # different lengths, so left padding is exercised
    ref = _hf_greedy(model, tokenizer, prompts, 12)
    ro = HFEngine(model, tokenizer).generate(prompts, 1, max_new_tokens=12, temperature=0.0)
    assert isinstance(ro, Rollout)
    assert ro.completion_ids.shape == ref.shape == (3, 12)
    assert torch.equal(ro.completion_ids, ref)
    # the random tiny model never says <|im_end|> in 12 greedy tokens: every row is truncated and fully masked
    assert ro.truncated.tolist() == [True, True, True]
    assert ro.completion_mask.tolist() == [[1] * 12] * 3
    assert ro.texts == tokenizer.batch_decode(ref, skip_special_tokens=True)
    assert ro.prompt_ids == prompts
    # unbatched greedy gives the same tokens as the left-padded batch
    for i, p in enumerate(prompts):
        alone = HFEngine(model, tokenizer).generate([p], 1, max_new_tokens=12, temperature=0.0)
        assert torch.equal(alone.completion_ids[0], ro.completion_ids[i])


def test_g_fold_grouping_and_chunking(model, tokenizer):
    prompts = _prompt_ids(tokenizer)
    single = HFEngine(model, tokenizer).generate(prompts, 1, max_new_tokens=6, temperature=0.0)
    grouped = HFEngine(model, tokenizer, batch_prompts=2).generate(prompts, 3, max_new_tokens=6, temperature=0.0)
    assert grouped.completion_ids.shape == (9, 6)
    # rows 0-2 belong to prompt 0, 3-5 to prompt 1, 6-8 to prompt 2 (greedy: all G copies agree)
    assert torch.equal(grouped.completion_ids, single.completion_ids.repeat_interleave(3, 0))
    assert torch.allclose(grouped.logps, single.logps.repeat_interleave(3, 0), atol=1e-6)


def test_recorded_logps_equal_teacher_forced_forward(model, tokenizer):
    prompts = _prompt_ids(tokenizer)
    T = 0.7
    ro = HFEngine(model, tokenizer).generate(prompts, 2, max_new_tokens=8, temperature=T, seeds=[1, 2, 3])
    for row in range(6):
        n = int(ro.completion_mask[row].sum())
        completion = ro.completion_ids[row, :n].tolist()
        ref = _teacher_forced_logps(model, prompts[row // 2], completion, T)
        assert torch.allclose(ro.logps[row, :n].double(), ref, atol=1e-5)
        assert ro.logps[row, n:].abs().sum() == 0  # padding holds 0
    assert (ro.logps[ro.completion_mask.bool()] < 0).all()
    # top-k / top-p change what is sampled, not what is recorded: logps stay at the plain temperature
    ro = HFEngine(model, tokenizer).generate(prompts[:1], 2, max_new_tokens=5, temperature=T, top_k=5, top_p=0.9,
                                             seeds=[4])
    for row in range(2):
        ref = _teacher_forced_logps(model, prompts[0], ro.completion_ids[row].tolist(), T)
        assert torch.allclose(ro.logps[row].double(), ref, atol=1e-5)


def test_eos_stops_a_row_and_masks_the_rest(model, tokenizer):
    prompts = _prompt_ids(tokenizer)
    # G = 1 with one seed per prompt: every row has its own generator, so declaring a token an EOS changes
    # nothing in a row before that token is drawn, and the expected stops can be read off a first run.
    kw = {"max_new_tokens": 10, "temperature": 1.0, "seeds": [1, 2, 3]}
    first = HFEngine(model, tokenizer).generate(prompts, 1, **kw).completion_ids
    assert first.shape == (3, 10)
    # a token row 0 draws at step t >= 2 for the first time becomes an extra EOS id (through the model's
    # generation_config, as for models with several EOS ids)
    t0 = next(t for t in range(2, 10) if int(first[0, t]) not in first[0, :t].tolist())
    stop = int(first[0, t0])
    stops = [next((t for t in range(10) if first[r, t] == stop), None) for r in range(3)]
    assert stops[0] == t0
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    engine = HFEngine(model, tokenizer)
    assert engine.eos_ids == sorted([tokenizer.eos_token_id, stop])
    ro = engine.generate(prompts, 1, **kw)
    for r in range(3):
        s = stops[r]
        n = 10 if s is None else s + 1  # the EOS itself is part of the completion
        assert ro.completion_mask[r].tolist() == [1] * n + [0] * (ro.completion_ids.size(1) - n)
        assert ro.truncated[r].item() == (s is None)
        assert (ro.completion_ids[r, n:] == tokenizer.pad_token_id).all()
        assert (ro.logps[r, n:] == 0).all()
        assert torch.equal(ro.completion_ids[r, :n], first[r, :n])
    assert ro.texts[0] == tokenizer.decode(first[0, :t0 + 1], skip_special_tokens=True)
    # when every row stops the loop ends early: the tensor is only as wide as the longest completion
    alone = engine.generate(prompts[:1], 1, max_new_tokens=10, temperature=1.0, seeds=[1])
    assert alone.completion_ids.shape == (1, t0 + 1) and not alone.truncated.any()
    assert alone.completion_lengths.tolist() == [t0 + 1]


def test_seeded_groups_do_not_depend_on_batch_mates(model, tokenizer):
    a, b, c = _prompt_ids(tokenizer)
    engine = HFEngine(model, tokenizer)
    kw = {"max_new_tokens": 8, "temperature": 1.0}
    together = engine.generate([a, b], 4, seeds=[11, 22], **kw)
    alone = engine.generate([a], 4, seeds=[11], **kw)
    assert torch.equal(together.completion_ids[:4], alone.completion_ids)
    # b is still reproduced next to a different neighbour, and in a separate chunk
    other = HFEngine(model, tokenizer, batch_prompts=1).generate([c, b], 4, seeds=[5, 22], **kw)
    assert torch.equal(other.completion_ids[4:], together.completion_ids[4:])
    # the G samples of a group differ from each other, and a different seed gives different samples
    assert len({tuple(r) for r in alone.completion_ids.tolist()}) > 1
    assert not torch.equal(engine.generate([a], 4, seeds=[12], **kw).completion_ids, alone.completion_ids)


def test_restores_train_mode_and_top_k_1_is_greedy(model, tokenizer):
    prompts = _prompt_ids(tokenizer)
    model.train()
    greedy = HFEngine(model, tokenizer).generate(prompts, 1, max_new_tokens=6, temperature=0.0)
    assert model.training
    model.eval()
    top1 = HFEngine(model, tokenizer).generate(prompts, 2, max_new_tokens=6, temperature=1.0, top_k=1)
    assert not model.training
    assert torch.equal(top1.completion_ids, greedy.completion_ids.repeat_interleave(2, 0))


def test_filter_logits_hand_numbers():
    logits = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.3)]], dtype=torch.float64)
    ninf = float("-inf")
    # top-p 0.6: 0.5 alone does not cover 0.6, so 0.3 is also kept; 0.5 + 0.3 = 0.8 >= 0.6 drops 0.2
    assert filter_logits(logits, top_p=0.6)[0, 1] == ninf and torch.isfinite(filter_logits(logits, top_p=0.6)[0, [0, 2]]).all()
    # top-p 0.5: 0.5 already covers it, only the best token stays
    assert torch.isinf(filter_logits(logits, top_p=0.5)[0, 1:]).all() and filter_logits(logits, top_p=0.5)[0, 0] == logits[0, 0]
    # top-k 2 keeps 0.5 and 0.3
    assert filter_logits(logits, top_k=2).tolist()[0] == [math.log(0.5), ninf, math.log(0.3)]
    assert torch.equal(filter_logits(logits), logits)


def test_rejects_bad_arguments(model, tokenizer):
    engine = HFEngine(model, tokenizer)
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(_prompt_ids(tokenizer), 2, max_new_tokens=4, seeds=[1])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], 2, max_new_tokens=4)


def test_works_with_a_peft_model(model, tokenizer):
    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    prompts = _prompt_ids(tokenizer)
    base = HFEngine(model, tokenizer).generate(prompts, 2, max_new_tokens=6, temperature=1.0, seeds=[1, 2, 3])
    # a fresh LoRA adapter starts with B = 0, so the wrapped model samples exactly what the base model samples
    peft_model = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    engine = HFEngine(peft_model, tokenizer)
    assert engine._logits_to_keep
    wrapped = engine.generate(prompts, 2, max_new_tokens=6, temperature=1.0, seeds=[1, 2, 3])
    assert torch.equal(wrapped.completion_ids, base.completion_ids)
    assert torch.allclose(wrapped.logps, base.logps, atol=1e-6)


def test_sample_draws_from_the_distribution():
    """The inverse-CDF sampler: empirical frequencies match the probabilities (a 6-sigma band for 40k draws),
    zero-probability entries never come up, and a seeded generator repeats its draws."""
    from posttrain.rollout.generate import sample

    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0, 1e-3])
    p = p / p.sum()
    n = 40_000
    draws = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / n
    assert (freq[p == 0] == 0).all()
    band = 6 * (p * (1 - p) / n).sqrt() + 1e-9
    assert ((freq - p).abs() <= band).all(), (freq, p)
    again = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # rows that are not normalised (filtered logits' softmax is, but weights need not be)
    w = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    assert sample(w).tolist() == [1, 0]


CHAT = ["What is 12 + 7?", "2 + 2 =", "Human: How do I bake bread?"]


def _chat_prompt_ids(tokenizer):
    """Prompts through the chat template with a system turn: a common start of well over PREFIX_MIN tokens."""
    from posttrain.data.tokenize import encode_prompt

    return [encode_prompt(tokenizer, [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": t}]) for t in CHAT]


def test_shared_prompt_prefix_runs_once_and_changes_nothing(model, tokenizer, monkeypatch):
    """A common chat-template start is prefilled once for all prompts: the same tokens (greedy: transformers' own
    generate; sampled: the plain path with the same seeds) and the same recorded log-probs, and the prefix forward
    really has a batch of one row."""
    from posttrain.rollout import generate as gen

    prompts = _chat_prompt_ids(tokenizer)
    assert gen._common_prefix(prompts) >= gen.PREFIX_MIN
    assert gen._common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # one token of each prompt stays for the prompt pass
    batches = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["input_ids"].shape), with_kwargs=True)
    greedy = HFEngine(model, tokenizer).generate(prompts, 2, max_new_tokens=10, temperature=0.0)
    hook.remove()
    assert batches[0] == (1, gen._common_prefix(prompts)) and batches[1][0] == 3 and batches[2] == (6, 1)
    assert torch.equal(greedy.completion_ids[::2], _hf_greedy(model, tokenizer, prompts, 10))
    kw = {"max_new_tokens": 10, "temperature": 1.0, "seeds": [3, 4, 5]}
    shared = HFEngine(model, tokenizer).generate(prompts, 4, **kw)
    monkeypatch.setattr(gen, "PREFIX_MIN", 10**6)  # the plain path: every prompt prefilled whole
    plain = HFEngine(model, tokenizer).generate(prompts, 4, **kw)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.allclose(shared.logps, plain.logps, atol=1e-5)
    for row in (0, 5, 11):  # and the recorded log-probs are the model's own, token by token
        n = int(shared.completion_mask[row].sum())
        ref = _teacher_forced_logps(model, prompts[row // 4], shared.completion_ids[row, :n].tolist(), 1.0)
        assert torch.allclose(shared.logps[row, :n].double(), ref, atol=1e-4)


def test_preallocated_cache_layers_write_in_place():
    """The preallocated layer returns what concatenation would, without reallocating its buffer, and grows past
    its reserved length when it must."""
    from transformers import DynamicCache

    from posttrain.rollout.generate import preallocate

    cache = DynamicCache()
    k0, v0 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache.update(k0, v0, 0)
    assert preallocate(cache, 7)
    layer = cache.layers[0]
    buffer = layer._k.data_ptr()
    ks, vs = [k0], [v0]
    for step in range(4):  # the 7 reserved positions, then two past them
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update(k, v, 0)
        assert torch.equal(keys, torch.cat(ks, -2)) and torch.equal(values, torch.cat(vs, -2))
        assert cache.get_seq_length() == 6 + step
        if step < 2:
            assert layer._k.data_ptr() == buffer
    assert not preallocate(object(), 7)  # not a transformers cache: left alone


def test_ended_rows_leave_the_decode_batch_without_changing_any_sample(model, tokenizer, monkeypatch):
    """With many tokens counted as EOS, rows end at different steps and the decode batch shrinks (the ended rows'
    KV cache dropped); every row's tokens and log-probs are those of the run that keeps all rows to the end."""
    from posttrain.rollout import generate as gen

    prompts = _chat_prompt_ids(tokenizer)
    calls = []
    real = gen._select_rows
    monkeypatch.setattr(gen, "_select_rows", lambda cache, keep: calls.append(keep.numel()) or real(cache, keep))

    def run(compact):
        monkeypatch.setattr(gen, "COMPACT", compact)
        engine = HFEngine(model, tokenizer)
        engine.eos_ids = list(range(0, len(tokenizer), 7))  # ~1 token in 7 ends a row
        return engine.generate(prompts, 4, max_new_tokens=12, temperature=1.0, seeds=[3, 4, 5])

    shrunk = run(0.75)
    assert calls and calls == sorted(calls, reverse=True) and calls[-1] < 12  # compacted, more than once maybe
    n = len(calls)
    kept = run(0.0)
    assert len(calls) == n  # never compacts
    lengths = shrunk.completion_lengths
    assert len(set(lengths.tolist())) > 2 and not shrunk.truncated.all()
    assert torch.equal(shrunk.completion_ids, kept.completion_ids)
    assert torch.equal(shrunk.completion_mask, kept.completion_mask)
    torch.testing.assert_close(shrunk.logps, kept.logps, atol=1e-5, rtol=0)
    assert torch.equal(shrunk.truncated, kept.truncated)
    for row in range(12):  # the recorded log-probs are the model's own, token by token
        k = int(lengths[row])
        ref = _teacher_forced_logps(model, prompts[row // 4], shrunk.completion_ids[row, :k].tolist(), 1.0)
        assert torch.allclose(shrunk.logps[row, :k].double(), ref, atol=1e-4)


def test_repetition_penalty_greedy_matches_transformers_generate(tokenizer):
    """repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit divided by the
    penalty when positive, multiplied when negative; seen = the prompt and the completion so far): greedy tokens
    equal transformers' own generate of each prompt alone (alone: transformers would also penalise the padding
    token of a left-padded batch), here from one batch of three prompts of different lengths. The tiny model at
    its default init repeats one token greedily, which the penalty must break."""
    model = tiny_model(tokenizer)
    prompts = _prompt_ids(tokenizer)
    ro = HFEngine(model, tokenizer).generate(prompts, 1, max_new_tokens=12, temperature=0.0, repetition_penalty=2.0)
    plain = HFEngine(model, tokenizer).generate(prompts, 1, max_new_tokens=12, temperature=0.0)
    assert not torch.equal(ro.completion_ids, plain.completion_ids)  # the penalty changes the text
    for i, p in enumerate(prompts):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, repetition_penalty=2.0,
                             pad_token_id=tokenizer.pad_token_id)[0, len(p):]
        assert ro.completion_ids[i].tolist() == ref.tolist()


def test_repetition_penalty_and_min_p_survive_the_decode_batch_shrinking(model, tokenizer, monkeypatch):
    """The per-row record of seen tokens follows the rows when ended ones leave the decode batch: sampled with
    repetition_penalty and min_p, every row is what it is when the batch never shrinks."""
    from posttrain.rollout import generate as gen

    prompts = _chat_prompt_ids(tokenizer)
    calls = []
    real = gen._select_rows
    monkeypatch.setattr(gen, "_select_rows", lambda cache, keep: calls.append(keep.numel()) or real(cache, keep))

    def run(compact):
        monkeypatch.setattr(gen, "COMPACT", compact)
        engine = HFEngine(model, tokenizer)
        engine.eos_ids = list(range(0, len(tokenizer), 7))
        return engine.generate(prompts, 4, max_new_tokens=12, temperature=1.0, seeds=[3, 4, 5],
                               repetition_penalty=1.5, min_p=0.01)

    shrunk = run(0.75)
    assert calls
    kept = run(0.0)
    assert torch.equal(shrunk.completion_ids, kept.completion_ids)
    torch.testing.assert_close(shrunk.logps, kept.logps, atol=1e-4, rtol=0)
    plain = HFEngine(model, tokenizer)
    plain.eos_ids = list(range(0, len(tokenizer), 7))
    assert not torch.equal(plain.generate(prompts, 4, max_new_tokens=12, temperature=1.0, seeds=[3, 4, 5]).completion_ids,
                           shrunk.completion_ids)
