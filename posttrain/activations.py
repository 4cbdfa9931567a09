"""Activation memory of one decoder layer, per token: what autograd keeps between forward and backward for the
layouts posttrain runs (right-padded rows, masks, the packed unit layout of shared prefixes), for full
fine-tuning and LoRA, float32 or 16-bit weights, with or without bf16 autocast. Every term is a tensor the layer
saves; tests/test_memory.py checks the sums against torch's saved-tensor hooks to the byte."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.shapes import LINEARS, Shape


@dataclass(frozen=True)
class Training:
    """The settings that decide the per-token and per-parameter costs."""

    lora_targets: tuple = ()  # projections with adapters; () = full fine-tuning
    lora_r: int = 0
    lean_mlp: bool = True
    checkpointing: bool = False
    bf16: bool = False  # bf16 autocast over float32 weights
    weight_bytes: int = 4  # the `dtype` the weights are loaded in: 4 (float32) or 2 (bfloat16 / float16)

    @property
    def full(self) -> bool:
        return not self.lora_targets

    @property
    def autocast(self) -> bool:
        """bf16 autocast over float32 weights (with 16-bit weights autocast casts nothing)."""
        return self.bf16 and self.weight_bytes == 4

    @property
    def e(self) -> int:
        """Bytes of an activation element: 2 under autocast or with 16-bit weights, else 4."""
        return 2 if (self.bf16 or self.weight_bytes == 2) else 4

    def trains(self, module: str) -> bool:
        """Does `module`'s input have to be kept for a weight (or adapter) gradient?"""
        return self.full or module in self.lora_targets

    def lean(self) -> bool:
        """The lean SwiGLU backward applies unless down_proj carries an adapter (posttrain.models.lean_mlp: gate and
        up are called as modules, adapters included; a wrapped down_proj takes the stock forward)."""
        return self.lean_mlp and "down_proj" not in self.lora_targets


@dataclass(frozen=True)
class Batch:
    """The forward of one micro-batch on one device (its worst case).

    tokens    positions the decoder runs over (padding included)
    scored    positions the LM head scores (0 for a reward model's score head)
    rows, width  the rows of the forward and the longest one
    masked    right-padded rows of different lengths: transformers then passes SDPA a [rows, 1, width, width] mask
              and repeats the key/value heads instead of using grouped-query attention natively
    mask_bytes  bytes of attention masks kept for backward, shared by every layer
    what      the layout in words
    units     a packed row of units (a prompt and the completions that continue it), attended one unit at a time
              (posttrain.logprobs.unit_attention): per layer each completion keeps its own copy of the keys and
              values it sees, `kv_copies` positions in all (sum of prompt + completion lengths), and its
              [completion, prompt + completion] mask converted to the query's dtype, `mask_cells` entries in all;
              `prompt_tokens` of the positions are prompts
    """

    tokens: int
    scored: int
    rows: int
    width: int
    masked: bool
    mask_bytes: int
    what: str
    units: bool = False
    kv_copies: int = 0
    mask_cells: int = 0
    prompt_tokens: int = 0


def layer_saved_bytes(s: Shape, t: Training, masked: bool, units: bool = False) -> int:
    """Bytes one decoder layer keeps for backward, per token (no checkpointing).

    Each term is a tensor autograd saves (tests/test_memory.py compares the sum with torch's saved-tensor hooks,
    for float32 and bf16 weights, autocast, LoRA, the lean and the stock MLP, masks and the unit layout).
    e = bytes of an activation (4; 2 under autocast or with 16-bit weights), w = bytes of a weight, H = hidden,
    A = heads x head_dim, K = key/value width (kv_heads x head_dim, or A when a mask or the unit layout makes
    transformers repeat the key/value heads), I = MLP width:
      norms        each of the two norms keeps its input in float32 (4H: with 16-bit weights a float32 copy) and
                   1/rms (4); with full fine-tuning also its normalised input in the weights' dtype (wH), for the
                   norm weight's gradient
      projection inputs  what a trained projection needs for its weight or adapter gradient (`_inputs`): one
                   tensor shared by the projections that read it (float32 weights, no autocast); under autocast
                   each trained projection's own bf16 cast (2 x in); with 16-bit weights the shared input for
                   trained weights, but each adapter (kept in float32 by peft) its own float32 cast (4 x in)
      attention    q (eA), k and v (eK each), the output (eA, also o_proj's input), log-sum-exp (4 x heads); the
                   unit layout keeps o_proj's input apart (the per-unit outputs are concatenated) and its keys are
                   counted by `layer_extra_bytes`
      LoRA         each adapter's low-rank activation (r, in the adapter's float32 unless autocast casts it)
      MLP          lean backward: gate and up outputs (2 x eI); stock module: gate output, SiLU(gate), up
                   output (3 x eI), and down_proj's input as the projection inputs above say
    Example, SmolLM2-135M (H = A = 576, K = 192, I = 1536, 9 heads), full fine-tuning, float32, no mask:
      4 x (6 x 576 + 2 + 576 + 2 x 192 + 576 + 9 + 2 x 1536) = 4 x 8075 = 32300 bytes per token per layer.
    """
    e, w = t.e, t.weight_bytes
    H, A, inter = s.hidden, s.heads * s.head_dim, s.intermediate
    K = A if (masked or units) else s.kv_heads * s.head_dim
    n = 2 * (4 * H + 4)  # the two norms' float32 inputs and their 1/rms factors
    if t.full:
        n += 2 * w * H  # normalised inputs, for the norm weights' gradients
    n += _inputs(t, ("q_proj", "k_proj", "v_proj"), H) + _inputs(t, ("gate_proj", "up_proj"), H)
    n += e * (A + (0 if units else K) + K + A) + 4 * s.heads
    # o_proj reads the attention output: the same tensor unless a cast (autocast for an adapter, 16-bit weights for
    # an adapter) or the unit layout's concatenation makes a new one.
    if t.trains("o_proj") and (units or "o_proj" in t.lora_targets):
        shared = not units and not t.autocast and t.weight_bytes == 4
        n += 0 if shared else _inputs(t, ("o_proj",), A)
    lora_e = 2 if t.autocast else 4
    n += lora_e * t.lora_r * len([m for m in t.lora_targets if m in LINEARS])
    if t.lean():
        n += 2 * e * inter
    else:
        n += 3 * e * inter + _inputs(t, ("down_proj",), inter)
    return n


def _inputs(t: Training, mods: tuple, width: int) -> int:
    """Bytes per token a group of projections reading one input keeps of it (see layer_saved_bytes)."""
    trained = [m for m in mods if t.trains(m)]
    if not trained:
        return 0
    if t.autocast:
        return 2 * width * len(trained)  # each projection's own bf16 cast
    adapters = [m for m in trained if m in t.lora_targets]
    if t.weight_bytes == 2 and adapters:
        return 4 * width * len(adapters)  # each adapter's float32 cast
    return t.e * width  # shared


def layer_extra_bytes(s: Shape, t: Training, batch: Batch) -> int:
    """Bytes one decoder layer keeps for backward beyond its per-token terms: under autocast SDPA casts a padding
    mask to bf16 in every layer and each layer keeps its cast. The unit layout keeps, per completion, the keys and
    values it attends over (2 x e x A per position) and its mask in the query's dtype (e per entry); and the keys
    (repeated to A) whole, or under autocast only the bf16 casts of the prompts' keys (rotary embeddings leave
    the keys in float32; each attention call casts the slice it reads). With no prompt tokens at all the whole
    keys and values are not kept (only the per-completion copies)."""
    e, A = t.e, s.heads * s.head_dim
    if batch.units:
        if not batch.prompt_tokens:
            # No unit has a prompt (a reward model's pairs that share no first token): the empty prompt slices
            # keep nothing, so neither the whole keys nor the whole values (counted per token) are kept.
            keys = -e * A * batch.tokens
        else:
            keys = 2 * A * batch.prompt_tokens if t.autocast else e * A * batch.tokens
        return keys + 2 * e * A * batch.kv_copies + e * batch.mask_cells
    return 2 * batch.rows * batch.width * batch.width if (t.autocast and batch.masked) else 0


def bf16_weight_copies(s: Shape, t: Training) -> int:
    """Under autocast every projection's weight is cast to bf16 and the cast kept for backward (2 bytes per
    weight), trained or frozen; the lean MLP casts down_proj inside its own backward instead."""
    if not t.autocast:
        return 0
    per_layer = sum(2 * i * o for i, o in (s.dims(m) for m in LINEARS if m != "down_proj" or not t.lean()))
    per_layer += sum(2 * t.lora_r * sum(s.dims(m)) for m in t.lora_targets)  # the adapters' own casts
    return s.layers * per_layer
