"""Model shapes for the memory planner: what it needs of a config.json, from a local folder, a hub id, or a preset
of the common sizes (published shapes; `Shape.params` reproduces transformers' own parameter count)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A dense decoder (Llama, Qwen2, Mistral, SmolLM...): what the planner needs of its config.json."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: tuple = ()  # projections with a bias (Qwen2: q, k, v; Llama attention_bias: q, k, v, o)
    mlp_bias: bool = False
    dtype: str = "bfloat16"  # the checkpoint's own dtype (what `dtype: auto` loads)

    def dims(self, module: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        H, q, kv, inter = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H),
                "lm_head": (H, self.vocab)}[module]

    def layer_params(self) -> int:
        n = 2 * self.hidden  # the two RMSNorm weights
        for m in LINEARS:
            i, o = self.dims(m)
            n += i * o + (o if m in self.attention_bias or (self.mlp_bias and m in LINEARS[4:]) else 0)
        return n

    def params(self, head: str = "lm") -> int:
        """Every parameter of the model: embeddings, decoder layers, final norm, and the LM head (none when tied
        to the embeddings) or a reward model's one-output score head."""
        own_head = {"lm": 0 if self.tied else self.vocab * self.hidden, "score": self.hidden}[head]
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + own_head

    def describe(self) -> str:
        return (f"{self.name}: {self.params() / 1e9:.3g}B parameters, {self.layers} layers, hidden {self.hidden}, "
                f"{self.heads} heads ({self.kv_heads} key/value), MLP {self.intermediate}, vocab {self.vocab}"
                f"{', tied embeddings' if self.tied else ''}")


def _preset(name, hidden, layers, heads, kv, head_dim, inter, vocab, tied, bias=()):
    return Shape(name, hidden, layers, heads, kv, head_dim, inter, vocab, tied, bias)  # published in bfloat16


# The common sizes, with the shapes of their published config.json files.
PRESETS = {s.name: s for s in (
    _preset("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, True),
    _preset("qwen2.5-0.5b", 896, 24, 14, 2, 64, 4864, 151936, True, ("q_proj", "k_proj", "v_proj")),
    _preset("llama-3.2-1b", 2048, 16, 32, 8, 64, 8192, 128256, True),
    _preset("llama-3.2-3b", 3072, 28, 24, 8, 128, 8192, 128256, True),
    _preset("qwen2.5-7b", 3584, 28, 28, 4, 128, 18944, 152064, False, ("q_proj", "k_proj", "v_proj")),
    _preset("llama-2-7b", 4096, 32, 32, 32, 128, 11008, 32000, False),
    _preset("llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256, False),
    _preset("llama-2-13b", 5120, 40, 40, 40, 128, 13824, 32000, False),
    _preset("llama-3.1-70b", 8192, 80, 64, 8, 128, 28672, 128256, False),
)}
SIZE_ALIASES = {"135m": "smollm2-135m", "0.5b": "qwen2.5-0.5b", "1b": "llama-3.2-1b", "3b": "llama-3.2-3b",
                "7b": "qwen2.5-7b", "8b": "llama-3.1-8b", "13b": "llama-2-13b", "70b": "llama-3.1-70b"}


def shape_from_config(name: str, cfg) -> Shape:
    """A Shape from a transformers config object (its defaults included)."""
    cfg = getattr(cfg, "text_config", None) or cfg
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in needed if getattr(cfg, k, None) is None]
    if missing or getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        raise UserError(f"model: {name}: the planner knows dense decoders with gate/up/down MLPs (Llama, Qwen2, "
                        f"Mistral, SmolLM); this config ({getattr(cfg, 'model_type', '?')}) is not one")
    heads = cfg.num_attention_heads
    bias = ()
    if getattr(cfg, "attention_bias", False):
        bias = ("q_proj", "k_proj", "v_proj", "o_proj")
    elif getattr(cfg, "model_type", "") == "qwen2":
        bias = ("q_proj", "k_proj", "v_proj")
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").replace("torch.", "")
    return Shape(name, cfg.hidden_size, cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                 getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.intermediate_size, cfg.vocab_size,
                 bool(getattr(cfg, "tie_word_embeddings", False)), bias, bool(getattr(cfg, "mlp_bias", False)),
                 dtype if dtype in DTYPE_BYTES else "float32")


def model_shape(name: str, trust_remote_code: bool = False) -> Shape:
    """The shape of `model=`: a preset name or size (7b), the embedded default, a local folder or .gguf already
    converted, or a hub id (its config.json only; needs internet or the hub cache)."""
    from posttrain.models import EMBEDDED_MODEL, cache_dir, gguf_cache_name

    key = name.lower()
    if key in (EMBEDDED_MODEL, "default"):
        return dataclasses.replace(PRESETS["smollm2-135m"], name=EMBEDDED_MODEL, dtype="float32")  # de-quantized GGUF
    path = Path(name).expanduser()
    if not path.exists() and (key in PRESETS or key in SIZE_ALIASES):
        return PRESETS[SIZE_ALIASES.get(key, key)]
    from transformers import AutoConfig

    if path.suffix == ".gguf":
        if not path.exists():
            raise UserError(f"model: {name}: GGUF file not found")
        converted = cache_dir() / "models" / gguf_cache_name(path)
        if not (converted / "config.json").exists():
            raise UserError(f"model: {name}: not converted yet; run any command with it once, or give its shape "
                            f"as a preset ({', '.join(SIZE_ALIASES)})")
        path = converted
    if path.is_dir():
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise UserError(f"model: {name}: adapter_config.json does not name its base model")
            return dataclasses.replace(model_shape(base, trust_remote_code), name=name)
        if not (path / "config.json").exists():
            raise UserError(f"model: {name}: folder has no config.json")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model: {name}: path not found (presets: {', '.join(sorted(PRESETS))}; sizes: "
                        f"{', '.join(SIZE_ALIASES)})")
    try:
        if path.exists():
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        else:  # a hub id: the local hub cache first, then the network
            try:
                config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True)
            except OSError:
                config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model: {name}: no config.json ({str(e).splitlines()[0]}); presets: "
                        f"{', '.join(sorted(PRESETS))}; sizes: {', '.join(SIZE_ALIASES)}") from None
    return shape_from_config(name, config)
