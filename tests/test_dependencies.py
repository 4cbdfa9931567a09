"""The library internals posttrain relies on, checked directly: after a dependency release, a failure here
names the package, its version and what changed, instead of surfacing as a wrong number somewhere else.

pyproject.toml caps transformers and peft at the newest versions this suite passed on; raising a cap means
running this file (and the suite) against the new release first.
"""

from importlib.metadata import version

import pytest
import torch

from posttrain.testing import tiny_model


def _expect(ok: bool, package: str, what: str) -> None:
    if not ok:
        pytest.fail(f"{package} {version(package)}: {what}. posttrain relies on it; pin {package} to the last "
                    "version in pyproject.toml's bounds or adapt posttrain to the change.")


def test_swiglu_mlp_layout_the_lean_backward_replaces(tokenizer):
    """models.lean_mlp swaps the forward of modules with gate/up/down Linear layers and a SiLU act_fn, and
    assumes the module computes down(act(gate(x)) * up(x))."""
    layer = tiny_model(tokenizer).model.layers[0].mlp
    parts = [getattr(layer, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
    _expect(all(type(p) is torch.nn.Linear for p in parts), "transformers",
            f"LlamaMLP no longer has plain gate_proj/up_proj/down_proj Linear layers ({[type(p) for p in parts]})")
    act = type(getattr(layer, "act_fn", None))
    _expect(act is torch.nn.SiLU or act.__name__ == "SiLUActivation", "transformers",
            f"LlamaMLP.act_fn is {act}, not SiLU")
    x = torch.randn(3, layer.gate_proj.in_features)
    with torch.no_grad():
        want = layer.down_proj(torch.nn.functional.silu(layer.gate_proj(x)) * layer.up_proj(x))
        _expect(torch.allclose(layer(x), want, atol=1e-6), "transformers",
                "LlamaMLP.forward is no longer down_proj(silu(gate_proj(x)) * up_proj(x))")


def test_kv_cache_api_the_sampler_uses(tokenizer):
    """rollout.generate prefills each prompt once and repeats its cache G times (Cache.batch_repeat_interleave),
    passing and reading the cache under the name the model's forward takes ('cache' from 5.24 on)."""
    import inspect

    from posttrain.rollout.generate import HFEngine

    model = tiny_model(tokenizer).eval()
    engine = HFEngine(model, tokenizer)
    _expect(engine._cache_kw in inspect.signature(model.forward).parameters, "transformers",
            f"the causal LM forward takes neither 'cache' nor 'past_key_values' (found {engine._cache_kw!r})")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out[engine._cache_kw]
    _expect(hasattr(cache, "batch_repeat_interleave"), "transformers",
            f"{type(cache).__name__} has no batch_repeat_interleave")
    cache.batch_repeat_interleave(2)
    with torch.no_grad():
        step = model(input_ids=torch.tensor([[8], [8]]), use_cache=True, **{engine._cache_kw: cache})
        full = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, -1]
    _expect(torch.allclose(step.logits[:, -1], full.expand(2, -1), atol=1e-5), "transformers",
            "decoding on a repeated cache no longer continues the prefilled sequence")


def test_decoder_takes_a_4d_additive_mask(tokenizer):
    """logprobs packs several sequences in one row under a block mask, passed to the decoder as a [B, 1, T, T]
    additive float mask: two packed sequences must give the hidden states each gives alone."""
    from posttrain.logprobs import hidden_states

    model = tiny_model(tokenizer).eval()
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10]])
    row = torch.cat([a, b], 1)
    allowed = torch.zeros(5, 5, dtype=torch.bool)
    allowed[:3, :3] = torch.ones(3, 3).tril().bool()
    allowed[3:, 3:] = torch.ones(2, 2).tril().bool()
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    with torch.no_grad():
        packed = hidden_states(model, row, allowed[None, None], pos)
        alone = torch.cat([hidden_states(model, a, torch.ones_like(a)), hidden_states(model, b, torch.ones_like(b))], 1)
    _expect(torch.allclose(packed, alone, atol=1e-5), "transformers",
            "a 4-D additive attention mask is no longer applied as given (packed sequences see each other)")


def test_peft_lora_layer_layout(tokenizer):
    """models.apply_lora / lean_mlp / the adapter-off reference use peft's wrapped Linear (base_layer, lora_A,
    lora_B, scaling), the disable_adapter() context and get_base_model()."""
    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    model = apply_lora(tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    for attr in ("base_layer", "lora_A", "lora_B", "scaling"):
        _expect(hasattr(q, attr), "peft", f"a LoRA-wrapped Linear has no '{attr}'")
    _expect(type(q.base_layer) is torch.nn.Linear, "peft", "a LoRA layer's base_layer is not the original Linear")
    ids = torch.tensor([[5, 6, 7]])
    torch.nn.init.normal_(q.lora_B["default"].weight)
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    _expect(not torch.allclose(on, off), "peft", "disable_adapter() did not change the output of a non-zero adapter")
