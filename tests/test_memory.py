"""posttrain memory: parameter counts, the per-layer activation formula against autograd's saved tensors, the
peak logic, hand-computed totals, the budget advice and the command line. The planner against real runs' peak
RSS is benchmarks/memory_validation.py (benchmarks/MEMORY.md), not a test: it takes minutes per run."""

import itertools
import json

import pytest
import torch

from posttrain import cli
from posttrain.activations import Batch, Training, layer_extra_bytes, layer_saved_bytes
from posttrain.config import LoraConfig, UserError
from posttrain.memory import RUNTIME_BYTES, GiB, _packed, estimate, fit_changes, plan, resolve
from posttrain.shapes import PRESETS, Shape, model_shape, shape_from_config

# ------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name,published", [
    ("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400),
    ("llama-3.2-3b", 3_212_749_824), ("qwen2.5-7b", 7_615_616_512), ("llama-2-7b", 6_738_415_616),
    ("llama-3.1-8b", 8_030_261_248), ("llama-2-13b", 13_015_864_320), ("llama-3.1-70b", 70_553_706_496),
])
def test_presets_have_the_published_parameter_counts(name, published):
    assert PRESETS[name].params() == published


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False), ("llama-bias", True)])
def test_shape_params_equal_the_models_own_count(kind, tied):
    """The formula against transformers: tied or not, Qwen2's q/k/v biases, Llama's attention_bias, and a
    reward model's score head instead of the LM head."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        LlamaConfig,
        Qwen2Config,
    )

    common = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": tied}
    config = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common, attention_bias=kind == "llama-bias")
    shape = shape_from_config("t", config)
    lm = AutoModelForCausalLM.from_config(config)
    assert shape.params() == sum(p.numel() for p in lm.parameters())
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config)
    assert shape.params("score") == sum(p.numel() for p in rm.parameters())


def test_lora_trainable_count_equals_peft(tokenizer):
    from posttrain.models import apply_lora
    from posttrain.testing import tiny_model

    model = tiny_model(tokenizer)
    shape = shape_from_config("tiny", model.config)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = apply_lora(model, LoraConfig(r=4, target_modules=targets))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    p = estimate(resolve("sft", ["dataset=x", "lora.r=4", f"lora.target_modules={','.join(targets)}"]), shape)
    assert p.sizes["trainable weights"] == 4 * trained
    assert p.sizes["frozen weights: policy base"] == 4 * shape.params()


def test_model_shape_from_a_folder_an_adapter_folder_and_errors(tmp_path, tiny_model_dir):
    import json as _json

    shape = model_shape(tiny_model_dir)
    from posttrain.models import load_model

    assert shape.params() == sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(_json.dumps({"base_model_name_or_path": tiny_model_dir}))
    assert model_shape(str(adapter)).params() == shape.params()
    assert model_shape("7b") is PRESETS["qwen2.5-7b"] and model_shape("llama-2-7b") is PRESETS["llama-2-7b"]
    with pytest.raises(UserError, match="path not found"):
        model_shape(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        model_shape(str(tmp_path / "empty"))


def test_embedded_preset_matches_the_converted_model():
    from posttrain.models import EMBEDDED_MODEL, cache_dir

    folder = cache_dir() / "models" / EMBEDDED_MODEL
    if not (folder / "config.json").exists():
        pytest.skip("the embedded model is not converted on this machine (the slow tests convert it)")
    assert model_shape(str(folder)).params() == model_shape(EMBEDDED_MODEL).params() == 134_515_008
    assert model_shape(str(folder)).layer_params() == model_shape(EMBEDDED_MODEL).layer_params()


# ------------------------------------------------------------------------------------------- activations


def _layer_capture(tokenizer, t: Training):
    """A tiny 3-layer Llama set up as `t` says (dtype, LoRA targets, lean MLP), the model to run (its PEFT wrapper
    when LoRA), the base model, and a saved-tensor pack hook that records every tensor autograd keeps while the
    middle layer runs (storage -> (bytes, shape, dtype)), the model's own parameters and buffers left out."""
    from posttrain.models import apply_lora, lean_mlp
    from posttrain.testing import tiny_model

    torch.manual_seed(0)
    model = tiny_model(tokenizer, hidden_size=64, num_layers=3).to(torch.float32 if t.weight_bytes == 4 else torch.bfloat16)
    if t.lora_targets:
        model = apply_lora(model, LoraConfig(r=t.lora_r, target_modules=list(t.lora_targets)))
    if t.lean_mlp:
        lean_mlp(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (model, base, *_middle_layer_recorder(model, base))


def _middle_layer_recorder(model, base):
    """A saved-tensor pack hook that records every tensor autograd keeps while `base`'s middle layer (index 1)
    runs (storage -> (bytes, shape, dtype)), the model's own parameters and buffers left out; and that record."""
    own = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    layer, inside, seen = base.model.layers[1], [False], {}
    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(x):
        st = x.untyped_storage()
        if inside[0] and st.data_ptr() not in own:
            seen[st.data_ptr()] = (st.nbytes(), tuple(x.shape), x.dtype)
        return x

    return pack, seen


def _saved_bytes_per_token(tokenizer, t: Training, masked: bool, B=2, T=24):
    """Bytes autograd keeps for one middle decoder layer of a tiny Llama, per token (weights, the rotary tables
    and transformers' float32 mask, which every layer shares, left out)."""
    _, base, pack, seen = _layer_capture(tokenizer, t)

    ids = torch.randint(3, 300, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    if masked:
        attn[1, -3:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16):
        base.model(input_ids=ids, attention_mask=attn)

    def shared(shape, dtype):
        rotary = len(shape) == 4 and shape[:2] == (1, 1)
        mask32 = len(shape) == 4 and shape[1] == 1 and not t.autocast  # transformers' mask, in the weights' dtype
        weight_cast = len(shape) == 2 and shape[0] not in (B * T, B)
        return rotary or mask32 or weight_cast

    return sum(n for n, shape, dtype in seen.values() if not shared(shape, dtype)) / (B * T)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = [  # (lora targets, lean_mlp, bf16 autocast, masked, weight bytes): full fine-tuning, attention-only LoRA,
    # LoRA everywhere, mixed; float32 weights with and without autocast, bfloat16 weights
    ((), True, False, False, 4), ((), False, False, True, 4), ((), True, True, True, 4), ((), False, True, False, 4),
    (("q_proj", "v_proj"), True, False, True, 4), (("q_proj", "v_proj"), True, True, False, 4),
    (ALL, True, False, False, 4), (ALL, False, True, True, 4), (("o_proj", "down_proj"), True, True, True, 4),
    ((), True, False, False, 2), ((), False, False, True, 2), (("q_proj", "v_proj"), True, False, True, 2),
    (ALL, True, False, False, 2), (("o_proj", "down_proj"), False, False, True, 2),
]


@pytest.mark.parametrize("targets,lean,bf16,masked,w", CASES)
def test_layer_saved_bytes_equals_what_autograd_keeps(tokenizer, targets, lean, bf16, masked, w):
    """Every term of the formula is a tensor the layer really saves: the sum equals the saved-tensor hooks'
    count to the byte, for full fine-tuning and LoRA, the lean and the stock MLP, float32 weights with and without
    bf16 autocast, bfloat16 weights, with and without an attention mask (which makes transformers repeat the
    key/value heads)."""
    shape = Shape("tiny", 64, 3, 4, 2, 16, 128, 320, True)
    t = Training(targets, 4 if targets else 0, lean, False, bf16, w)
    per_layer_mask = layer_extra_bytes(shape, t, Batch(48, 0, 2, 24, masked, 0, "")) / 48
    assert _saved_bytes_per_token(tokenizer, t, masked) == layer_saved_bytes(shape, t, masked) + per_layer_mask


def _saved_bytes_of_unit_layout(tokenizer, t: Training, prompts=(12, 20), completions=((9, 14), (14, 9))):
    """Bytes autograd keeps for one middle layer while `shared_prefix_token_logps` scores two prompts with two
    completions each, packed into one row of units (weights, rotary tables and the cached boolean masks, which
    every layer shares, left out)."""
    from posttrain.logprobs import shared_prefix_token_logps

    model, _, pack, seen = _layer_capture(tokenizer, t)

    lengths = [c for cs in completions for c in cs]
    ids = torch.randint(3, 300, (4, max(lengths)))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16):
        shared_prefix_token_logps(model, [torch.randint(3, 300, (p,)).tolist() for p in prompts],
                                  torch.tensor([0, 0, 1, 1]), ids, mask, 0)

    def shared(shape, dtype):
        weight_cast = len(shape) == 2 and set(shape) <= {4, 32, 64, 128}  # [in, out] of a projection or adapter
        return (len(shape) == 4 and shape[:2] == (1, 1)) or dtype == torch.bool or weight_cast

    return sum(n for n, shape, dtype in seen.values() if not shared(shape, dtype)), seen


@pytest.mark.parametrize("targets,bf16,w", [((), False, 4), ((), True, 4), (("q_proj", "v_proj"), False, 4),
                                            (ALL, True, 4), (("o_proj",), False, 4), (("o_proj",), True, 4),
                                            ((), False, 2), (("o_proj", "v_proj"), False, 2)])
def test_unit_layout_saved_bytes_equal_what_autograd_keeps(tokenizer, targets, bf16, w):
    """The packed shared-prefix layout attends one unit at a time: every completion keeps the keys and values it
    sees (prompt + its own) and its mask; the formula plus those per-layer extras equals the saved-tensor count."""
    shape = Shape("tiny", 64, 3, 4, 2, 16, 128, 320, True)
    t = Training(targets, 4 if targets else 0, True, False, bf16, w)
    measured, seen = _saved_bytes_of_unit_layout(tokenizer, t)
    batch = _packed([(12, [9, 14]), (20, [14, 9])], 46, "")
    want = layer_saved_bytes(shape, t, False, units=True) * batch.tokens + layer_extra_bytes(shape, t, batch)
    assert measured == want, sorted(seen.values(), key=lambda v: -v[0])


@pytest.mark.parametrize("prefix,bf16", [(5, False), (0, False), (5, True), (0, True)])
def test_reward_model_packed_pairs_saved_bytes(tokenizer, prefix, bf16):
    """A reward model's pair packed as the shared first tokens once with both continuations (`rm shared_prefix`),
    also when they share nothing (long sequences cut from the start): the formula equals the saved tensors."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.algorithms.rm import packed_rewards
    from posttrain.models import lean_mlp
    from posttrain.testing import tiny_model

    torch.manual_seed(0)
    config = tiny_model(tokenizer, hidden_size=64, num_layers=3).config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    model.config._attn_implementation = "sdpa"
    lean_mlp(model)
    pack, seen = _middle_layer_recorder(model, model)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        packed_rewards(model, [torch.randint(3, 300, (prefix,)).tolist()], torch.randint(3, 300, (2, 14)),
                       torch.tensor([9, 14]))
    rotary_or_weight = lambda shape, dtype: (len(shape) == 4 and shape[:2] == (1, 1)) or dtype == torch.bool or (  # noqa: E731
        len(shape) == 2 and set(shape) <= {4, 32, 64, 128})
    measured = sum(n for n, shape, dtype in seen.values() if not rotary_or_weight(shape, dtype))
    shape, t = Shape("tiny", 64, 3, 4, 2, 16, 128, 320, True), Training(bf16=bf16)
    batch = _packed([(prefix, [9, 14])], 0, "")
    assert measured == layer_saved_bytes(shape, t, False, units=True) * batch.tokens + layer_extra_bytes(shape, t, batch)


def test_layer_saved_bytes_by_hand():
    """SmolLM2-135M (H = A = 576, K = 192 without a mask, I = 1536, 9 heads), full fine-tuning, float32:
      norms 2 x (4 x 576 + 4) = 4616, their normalised inputs 2 x 4 x 576 = 4608,
      projection inputs 4 x 576 (q/k/v) + 4 x 576 (gate/up) = 4608,
      attention 4 x (576 + 2 x 192 + 576) = 6144, log-sum-exp 4 x 9 = 36, lean MLP 2 x 4 x 1536 = 12288
      = 32300 bytes per token per layer (= 4 x 8075 floats, the figure the docstring quotes).
    With a mask K = 576: + 4 x 2 x 384 = 3072 -> 35372. LoRA r=16 on q,k,v,o: no norm inputs (-4608), no MLP input
    (-2304), + 4 x 16 x 4 adapters = 256 -> 25644."""
    s = PRESETS["smollm2-135m"]
    assert layer_saved_bytes(s, Training(), masked=False) == 32300
    assert layer_saved_bytes(s, Training(), masked=True) == 35372
    lora = Training(("q_proj", "k_proj", "v_proj", "o_proj"), 16)
    assert layer_saved_bytes(s, lora, masked=False) == 32300 - 4608 - 2304 + 256


# ------------------------------------------------------------------------------------------- totals


def _plan(command, *settings, **kw):
    return plan(command, ["dataset=x.jsonl", *settings], **kw)


def test_7b_full_dpo_mixed_precision_by_hand():
    """Llama-2-7B (6,738,415,616 parameters: 32 layers of 202,383,360, embeddings and head of 131,072,000 each,
    norm 4096), full DPO with bf16 autocast over float32 weights on one GPU, 1 pair a step of max_length 512,
    reference copy:
      trainable weights  4 x 6,738,415,616 = 26,953,662,464 bytes    reference copy   the same
      AdamW state        8 x 6,738,415,616 = 53,907,324,928          gradients (all)  26,953,662,464
      bf16 weight copies 2 x 32 x (4 x 4096^2 + 2 x 4096 x 11008) = 2 x 32 x 157,286,400 = 10,066,329,600
        (the lean MLP casts down_proj inside its backward: no kept copy of it)
      the pair, worst case: a one-token prompt and two completions of 511 tokens, packed as one unit: 1023
      positions; the two completions attend over 512 positions each (1024 key/value positions copied) under
      [511, 512] masks (523,264 entries)
      per token and layer (e = 2): norms 2 x (4 x 4096 + 4) = 32776 + normalised inputs 2 x 4 x 4096 = 32768
        + bf16 inputs of q, k, v (3 x 2 x 4096) and gate, up (2 x 2 x 4096) = 40960
        + q, v, output 3 x 2 x 4096 = 24576 + log-sum-exp 4 x 32 = 128 + o_proj's own input 2 x 4096 = 8192
        + lean MLP 2 x 2 x 11008 = 44032 = 183,432 bytes
      per layer besides: the prompt's bf16 keys 2 x 4096 x 1 = 8192, the completions' key and value copies
        2 x 2 x 4096 x 1024 = 16,777,216, their masks 2 x 523,264 = 1,046,528 -> 17,831,936
      32 layers x (1023 x 183,432 + 17,831,936) = 32 x 205,482,872 = 6,575,451,904 bytes of activations.
    One micro-batch a step: the head's gradient (4 x 32000 x 4096 = 524,288,000) is written first, each layer's
    (809,533,440 bytes) as its activations (205.5 MB) are freed: the peak is the end of backward with every
    gradient."""
    p = _plan("dpo", "model=llama-2-7b", "bf16=true", "device=gpu", "micro_batch_size=1", "batch_size=1",
              "max_length=512")
    N = 6_738_415_616
    assert p.sizes["trainable weights"] == 4 * N == p.sizes["frozen weights: reference"]
    assert p.sizes["optimizer state (AdamW)"] == 8 * N and p.sizes["gradients"] == 4 * N
    assert p.sizes["bf16 weight copies"] == 10_066_329_600
    assert (p.batch.tokens, p.batch.kv_copies, p.batch.mask_cells, p.batch.units) == (1023, 1024, 523_264, True)
    t = Training(bf16=True)
    assert layer_saved_bytes(PRESETS["llama-2-7b"], t, masked=False, units=True) == 183_432
    assert layer_extra_bytes(PRESETS["llama-2-7b"], t, p.batch) == 17_831_936
    layers = 6_575_451_904
    assert p.sizes["activations"] >= layers and p.sizes["activations"] - layers < 0.01 * layers  # + norm, head inputs
    assert p.components["gradients"] == 4 * N  # the peak holds every gradient
    assert p.components["activations"] < 0.1 * p.sizes["activations"]  # ... and almost no activations
    assert "runtime (Python, torch, tokenizer)" not in p.components  # GPU: allocator-level, no runtime
    assert p.total == sum(p.components.values())
    # 20 bytes a parameter (weights 4, reference 4, gradients 4, AdamW 8) = 134,768,312,320, + the bf16 copies
    # = 144,834,641,920; the rest (final norm, head inputs, logit chunks, one layer's buffers) is under 1 GiB.
    assert 0 < p.total - (20 * N + 10_066_329_600) < GiB


def test_16_bit_weights_halve_weights_gradients_and_adamw():
    """dtype=bfloat16 (pure bf16 training): 2 bytes a weight, a gradient and each AdamW moment; a LoRA adapter stays
    float32 (peft). dtype=auto takes the checkpoint's own: bfloat16 for the presets, float32 for the embedded model."""
    full32, full16 = _plan("sft", "model=1b", "device=gpu"), _plan("sft", "model=1b", "device=gpu", "dtype=bfloat16")
    N = 1_235_814_400
    assert (full16.sizes["trainable weights"], full16.sizes["gradients"], full16.sizes["optimizer state (AdamW)"]) == \
        (2 * N, 2 * N, 4 * N)
    assert full32.sizes["trainable weights"] == 4 * N and full16.sizes["activations"] < full32.sizes["activations"]
    lora = _plan("sft", "model=1b", "device=gpu", "dtype=bfloat16", "lora.r=8")
    assert lora.sizes["frozen weights: policy base"] == 2 * N
    assert lora.sizes["optimizer state (AdamW)"] == 2 * lora.sizes["trainable weights"]  # float32 adapters
    assert _plan("sft", "model=1b", "dtype=auto").sizes["trainable weights"] == 2 * N
    assert _plan("sft", "dtype=auto").sizes["trainable weights"] == 4 * 134_515_008


def test_peak_holds_all_gradients_with_accumulation_and_lora_frees_none():
    """With several micro-batches a step the gradients of the first stay while the second builds its activations,
    so the peak holds both whole, and the first's kept softmax chunks (4 chunks of 256 x 49152 float32 = 192 MiB,
    the KEEP_BYTES cap, of its 4 x 511 scored positions: the engine still references its loss); with one
    micro-batch a step of the small model the activations dominate and only the head's gradient is written at
    the peak."""
    one = _plan("sft", "micro_batch_size=4", "batch_size=4", "max_length=512")
    four = _plan("sft", "micro_batch_size=4", "batch_size=16", "max_length=512")
    assert one.accumulation == 1 and four.accumulation == 4
    assert one.components["gradients"] == 4 * 49152 * 576  # the tied head / embedding gradient only
    assert four.components["gradients"] == four.sizes["gradients"] == 4 * 134_515_008
    assert four.components["previous micro-batch's log-prob chunks"] == 4 * 256 * 49152 * 4 == 192 << 20
    assert "previous micro-batch's log-prob chunks" not in one.components
    assert four.total - one.total == four.sizes["gradients"] - one.components["gradients"] + (192 << 20)
    lora = _plan("sft", "micro_batch_size=4", "batch_size=16", "max_length=512", "lora.r=16")
    assert lora.sizes["trainable weights"] == 4 * 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192))
    assert lora.sizes["optimizer state (AdamW)"] == 2 * lora.sizes["trainable weights"]


def test_reference_strategies_and_models_in_memory():
    copy = _plan("dpo")
    pre = _plan("dpo", "precompute_ref_log_probs=true")
    lora = _plan("dpo", "lora.r=16")
    simpo = plan("simpo", ["dataset=x.jsonl"])
    assert copy.sizes["frozen weights: reference"] == 4 * 134_515_008
    for p in (pre, lora, simpo):
        assert "frozen weights: reference" not in p.sizes
    assert dict(copy.models)["reference"] == "a frozen copy of the weights"
    assert "adapter disabled" in dict(lora.models)["reference"]
    assert "precomputed" in dict(pre.models)["reference"] and "reference precompute" in pre.phases
    assert "reference" not in dict(simpo.models)
    assert copy.total - pre.total == 4 * 134_515_008
    kto = plan("kto", ["dataset=x.jsonl", "ref_model=llama-3.2-1b"])
    assert kto.sizes["frozen weights: reference"] == 4 * 1_235_814_400


def test_grpo_generation_kv_cache_and_reference():
    """KV cache = 2 (k, v) x layers x kv_heads x head_dim x 4 bytes x rows x (prompt + completion):
    SmolLM2, 8 prompts x 8 generations, 512 + 64 tokens: 2 x 30 x 3 x 64 x 4 x 64 x 576 = 1,698,693,120."""
    p = _plan("grpo")
    assert p.sizes["KV cache (generation)"] == 2 * 30 * 3 * 64 * 4 * 64 * 576
    assert "generation" in p.phases and "reference" not in dict(p.models)  # beta = 0: no reference
    kl = _plan("grpo", "beta=0.04")
    assert kl.sizes["frozen weights: reference"] == 4 * 134_515_008
    rm = _plan("grpo", "reward_funcs=reward_model", "reward_model=runs/nothing-here")
    assert rm.sizes["frozen weights: reward model"] == 4 * PRESETS["smollm2-135m"].params("score")


def test_ppo_separate_critic_by_hand():
    """PPO, full fine-tuning of SmolLM2-135M (N = 134,515,008 parameters, tied), a separate critic from the policy's
    weights (a sequence classifier: N - 0 + 576 = 134,515,584 parameters, float32), a reference copy (kl_coef 0.05),
    4 prompts a step of 64 tokens, one completion each of 32, 2 completions a micro-batch (2 per step), on one GPU:
      policy      weights 4N, reference 4N, AdamW 8N, gradients 4N = 20N = 2,690,300,160
      critic      weights, AdamW, gradients 16 x 134,515,584 = 2,152,249,344
      micro-batch two units of a 64-token prompt + a 32-token completion: 192 positions, 64 scored, 192 key/value
                  copies, 2 x 32 x 96 = 6144 mask entries
      per token and layer (float32, the unit layout repeats the key/value heads: K = A = 576): norms
        2 x (4 x 576 + 4) = 4616 + normalised inputs 2 x 4 x 576 = 4608 + the inputs of q/k/v and gate/up 2 x 4 x
        576 = 4608 + q, k, output 3 x 4 x 576 = 6912 + log-sum-exp 4 x 9 = 36 + o_proj's own input 2304 + lean
        MLP 2 x 4 x 1536 = 12288 = 35,372 bytes
      per layer besides: keys 4 x 576 x 192 = 442,368, key/value copies 2 x 4 x 576 x 192 = 884,736, masks
        4 x 6144 = 24,576 -> 1,351,680; 30 layers x (192 x 35,372 + 1,351,680) = 244,293,120
      policy      + rotary 2 x 4 x 64 x 192 = 98,304 + final norm (4 x 576 + 4 + 4 x 576) x 192 = 885,504
                  + head inputs (4 x 576 + 16) x 64 = 148,480 + masks 6144 = 245,431,552
      critic      the same layers, rotary, norm and masks; its score head's inputs (4 x 576 + 8) x 64 = 147,968:
                  245,431,040
      LM head chunks: the 64 positions' softmax kept (4 x 64 x 49152 = 12,582,912) + a chunk and its gradient
        (25,165,824) + the hidden states' gradient 147,456 = 37,896,192; one layer's backward buffers
        4 x 192 x (5 x 1536 + 4 x 576) = 7,667,712
    Two micro-batches a step: the first's gradients (policy's and critic's) are all there while the second's
    activations (policy's and critic's) build up, and so are the first's kept softmax chunks (12,582,912: the
    engine still references its loss), so the peak holds every term above:
    2,690,300,160 + 2,152,249,344 + 245,431,552 + 245,431,040 + 37,896,192 + 7,667,712 + 12,582,912
    = 5,391,558,912."""
    p = _plan("ppo", "device=gpu", "max_prompt_length=64", "max_completion_length=32", "batch_size=4",
              "micro_batch_size=2", "critic=separate")
    N, Nc = 134_515_008, 134_515_584
    assert PRESETS["smollm2-135m"].params("score") == Nc and p.accumulation == 2
    assert (p.batch.tokens, p.batch.scored, p.batch.kv_copies, p.batch.mask_cells) == (192, 64, 192, 6144)
    assert layer_saved_bytes(PRESETS["smollm2-135m"], Training(), masked=False, units=True) == 35_372
    assert layer_extra_bytes(PRESETS["smollm2-135m"], Training(), p.batch) == 1_351_680
    assert p.sizes["frozen weights: reference"] == p.sizes["trainable weights"] == 4 * N
    assert (p.sizes["critic: trainable weights"], p.sizes["critic: optimizer state (AdamW)"],
            p.sizes["critic: gradients"]) == (4 * Nc, 8 * Nc, 4 * Nc)
    assert p.sizes["activations"] == 245_431_552 and p.sizes["critic: activations"] == 245_431_040
    assert p.components["logits / log-prob chunks"] == 37_896_192
    assert p.components["backward buffers (one layer)"] == 7_667_712
    assert p.components["previous micro-batch's log-prob chunks"] == 12_582_912
    assert p.total == 5_391_558_912 and p.peak_phase == "forward and backward"
    assert "every weight trained" in dict(p.models)["critic"] and dict(p.models)["reference"] == \
        "a frozen copy of the weights"
    # KV cache: 2 x 30 layers x 3 x 64 x 4 bytes x 4 rows x (64 + 32) positions
    assert p.sizes["KV cache (generation)"] == 2 * 30 * 3 * 64 * 4 * 4 * 96


def test_ppo_shared_critic_lora_reward_model_and_mini_batches():
    """LoRA with a shared critic: one copy of the base weights (reference = the adapter off), the critic only a
    float32 value head of H + 1 parameters (weights, gradient, two AdamW moments: 16 bytes each). A separate
    critic with LoRA has the base weights once more (float32) and its own adapter and score head; a reward
    model is one more frozen model; num_mini_batches samples that many steps' prompts in one generation."""
    base = ["max_prompt_length=64", "max_completion_length=32", "batch_size=4", "micro_batch_size=4", "lora.r=16"]
    shared = _plan("ppo", *base, "critic=shared")
    assert shared.sizes["critic: value head + gradient + AdamW"] == 16 * 577
    assert "adapter disabled" in dict(shared.models)["reference"] and "value head" in dict(shared.models)["critic"]
    assert "frozen weights: reference" not in shared.sizes and "critic: trainable weights" not in shared.sizes
    sep = _plan("ppo", *base, "critic=separate")
    adapters = 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192))  # q, o and k, v: r x (in + out) per layer
    assert sep.sizes["critic: frozen weights"] == 4 * 134_515_584
    assert sep.sizes["critic: trainable weights"] == 4 * (adapters + 576)
    assert sep.sizes["trainable weights"] == 4 * adapters
    rm = _plan("ppo", *base, "critic=separate", "reward_model=runs/no-rm-here")
    assert rm.sizes["frozen weights: reward model"] == rm.sizes["critic: frozen weights"] == 4 * 134_515_584
    assert dict(rm.models)["critic"].startswith("134.5M parameters (1.84M trained): value model from runs/no-rm-here")
    two = _plan("ppo", *base, "critic=shared", "num_mini_batches=2")
    assert two.sizes["KV cache (generation)"] == 2 * shared.sizes["KV cache (generation)"]
    none = _plan("ppo", *base, "critic=shared", "kl_coef=0")
    assert "reference" not in dict(none.models)
    # The budget advice: LoRA first, then a shared critic instead of a second model.
    changes = fit_changes("ppo", ["dataset=x.jsonl", "critic=separate", *base[:-1]], 2 * GiB)
    assert [c.setting for c in changes][:2] == ["lora.r=16", "critic=shared"]


def test_cpu_total_includes_the_runtime_and_distributed_settings_shard():
    cpu = _plan("dpo", "device=cpu")
    gpu = _plan("dpo", "device=gpu")
    assert cpu.components["runtime (Python, torch, tokenizer)"] == RUNTIME_BYTES
    assert cpu.total - gpu.total == RUNTIME_BYTES
    fsdp = _plan("dpo", "model=8b", "device=gpu", "distributed=fsdp", "nproc=8")
    one = _plan("dpo", "model=8b", "device=gpu")
    assert fsdp.sizes["optimizer state (AdamW)"] == one.sizes["optimizer state (AdamW)"] // 8
    assert fsdp.sizes["frozen weights: reference"] == one.sizes["frozen weights: reference"]  # held whole
    ddp = _plan("dpo", "model=8b", "device=gpu", "nproc=8")
    assert ddp.sizes["DDP gradient buckets"] == one.sizes["gradients"]


def test_fit_changes_in_order_until_it_fits():
    """LoRA first, then (for a copied reference) precompute, checkpointing, a smaller micro-batch, FSDP; each
    added to the ones before; the list stops at the first change that fits."""
    settings = ["dataset=x.jsonl", "model=8b", "device=gpu", "micro_batch_size=8", "max_length=2048"]
    changes = fit_changes("dpo", settings, 24 * GiB)
    names = [c.setting for c in changes]
    assert names[0] == "lora.r=16"
    assert changes[-1].fits and not any(c.fits for c in changes[:-1])
    totals = [c.total for c in changes]
    assert totals == sorted(totals, reverse=True)
    assert fit_changes("dpo", ["dataset=x.jsonl", "ref_model=llama-3.2-1b", "lora.r=8"], 1 * GiB)[0].setting == \
        "precompute_ref_log_probs=true"
    never = fit_changes("dpo", ["dataset=x.jsonl", "model=70b", "device=gpu", "lora.r=16"], 1 * GiB)
    assert not never[-1].fits and never[-1].setting == "distributed=fsdp nproc=1024"


# ------------------------------------------------------------------------------------------- the command


def test_memory_cli_json_table_budget_and_errors(capsys):
    assert cli.main(["memory", "dpo", "dataset=x.jsonl", "lora.r=16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] == sum(out["components"].values()) > 0
    assert {"trainable weights", "activations", "runtime (Python, torch, tokenizer)"} <= set(out["components"])
    assert out["micro_batch"]["tokens"] == 2 * (2 * 512 - 1)
    assert cli.main(["memory", "grpo", "--budget", "1.5"]) == 0
    text = capsys.readouterr().out
    assert "KV cache (generation)" in text and "what would make it fit" in text and "lora.r=16" in text
    assert cli.main(["memory", "sft", "--budget", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] == {"bytes": 100 * GiB, "fits": True, "changes": []}
    for argv, msg in ((["memory", "ppx"], "unknown command 'ppx'"), (["memory", "dpo", "lr=1"], "unknown key"),
                      (["memory", "dpo", "model=/no/such/folder"], "path not found"),
                      (["memory", "dpo", "nproc=0"], "nproc must be >= 1"), (["memory"], "usage: posttrain memory"),
                      (["memory", "dpo", "--budget", "-1"], "positive number")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)


def test_memory_for_every_command_and_setting_combination():
    """Every command under each switch that changes the layout: totals are positive and add up."""
    for command, extra in itertools.product(["sft", "dpo", "kto", "rm", "grpo", "ppo", "orpo"],
                                            [[], ["lora.r=8"], ["gradient_checkpointing=true"], ["bf16=true"]]):
        p = _plan(command, *extra)
        assert p.total == sum(p.components.values()) > RUNTIME_BYTES, (command, extra)
    ckpt, plain = _plan("sft", "gradient_checkpointing=true"), _plan("sft")
    assert ckpt.sizes["activations"] < plain.sizes["activations"] / 5
    assert _plan("sft", "packing=true").batch.masked and not _plan("sft", "micro_batch_size=1").batch.masked
