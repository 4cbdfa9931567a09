"""The one log-prob routine every algorithm uses.

The decoder runs over the whole sequence, but the LM head and log-softmax run only on the positions that
predict scored (completion) tokens, in chunks, fused with the gather of the target token. The full
`[batch, seq, vocab]` float32 logits never exist: a custom autograd function keeps each chunk's softmax for
backward while they fit KEEP_BYTES and recomputes the chunks beyond it in backward (the trade of fused
linear-cross-entropy kernels: one extra head matmul for O(vocab) less memory per token), so memory stays
bounded however many tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.models import unwrap
from posttrain.parallel import routed

CHUNK_BYTES = 64 << 20  # one [chunk, vocab] float32 buffer; forward and backward hold two or three at once
# Softmax chunks kept from forward for backward, up to this many bytes; chunks beyond it are recomputed in
# backward (one more head matmul each). A DPO or GRPO micro-batch scores a few hundred to ~1000 tokens (50-200 MB
# at vocab 49152): all kept, no recompute. Long every-token scoring keeps its first 1024 rows (four 256-row
# chunks) and stays bounded: at 4 x 1024 scored tokens 256 MiB measured 0.32x the naive routine's extra peak.
KEEP_BYTES = 192 << 20


def auto_chunk(vocab_size: int) -> int:
    """Rows per LM-head chunk: a power of two whose logits fill about CHUNK_BYTES (256 rows at vocab 49152,
    64 MiB; 128 at least, so the head matmul stays efficient). Measured at vocab 49152: 1024-row chunks
    were ~3% faster and held ~0.6 GB more."""
    rows = CHUNK_BYTES // (4 * vocab_size)
    return max(128, min(4096, 1 << max(rows, 1).bit_length() - 1))


def _chunk_logits(h, weight, bias, temperature):
    # In the weights' own dtype even under bf16 autocast: bf16 logits carry errors of ~0.4% of their size (0.05 on
    # a logit of 12), larger than what a DPO step at learning rate 5e-7 changes in them.
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = F.linear(h.to(weight.dtype), weight, bias).float()
    return logits / temperature if temperature != 1.0 else logits


class _HeadLogProb(torch.autograd.Function):
    """logp[n] = log_softmax(h[n] @ W^T + b)[target[n]], chunked over n.

    Also returns detached per-token statistics of the same logits while the chunk is in memory, one row per
    name in `want_stats` (a tuple of STATS): `entropy`, `logits_mean` (mean logit over the vocabulary, TRL's
    `logits/*` metrics) and `log_p2` (log sum_v p_v^2, WPO's weight adjustment). Each costs passes over the
    [chunk, vocab] logits, so an algorithm asks only for those it reports: all three took ~0.5 s of a 3.7 s
    DPO step on the benchmark. With `grad_entropy` the entropy row is differentiable (GRPO's entropy bonus):
    backward adds dH/dz = -p (log p + H) per chunk, from the kept softmax or recomputed like the log-prob's.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, want_stats, grad_entropy=False):
        n = hidden.shape[0]
        chunk_size = chunk_size or auto_chunk(weight.shape[0])
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        stats = torch.empty((len(want_stats), n), dtype=torch.float32, device=hidden.device)
        # Softmax chunks kept for backward while they fit KEEP_BYTES (only when a backward will come).
        kept, budget = [], 0 if isinstance(ctx, _NoCtx) else KEEP_BYTES
        for s in range(0, n, chunk_size):
            logits = _chunk_logits(hidden[s : s + chunk_size], weight, bias, temperature)
            picked = logits.gather(1, targets[s : s + chunk_size, None]).squeeze(1)
            if not want_stats:  # the logits are not needed again: exp in place, no second [rows, vocab] buffer
                top = logits.amax(-1, keepdim=True)
                total = logits.sub_(top).exp_().sum(-1, keepdim=True)
                lse = (top + total.log()).squeeze(1)
                lse_all[s : s + chunk_size], logp[s : s + chunk_size] = lse, picked - lse
                if budget >= logits.numel() * 4:  # what is left in the buffer is the softmax, up to a scale
                    budget -= logits.numel() * 4
                    kept.append(logits.div_(total))
                continue
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[s : s + chunk_size] = lse
            logp[s : s + chunk_size] = picked - lse
            probs = None
            if want_stats:
                with torch.no_grad():
                    probs = (logits - lse[:, None]).exp_() if {"entropy", "log_p2"} & set(want_stats) else None
                    for row, name in enumerate(want_stats):
                        if name == "entropy":  # H = lse - sum_v p_v logit_v
                            value = lse - torch.linalg.vecdot(probs, logits)
                        elif name == "logits_mean":
                            value = logits.mean(-1)
                        else:  # log_p2
                            value = torch.linalg.vecdot(probs, probs).log()
                        stats[row, s : s + chunk_size] = value
            if budget >= logits.numel() * 4:
                budget -= logits.numel() * 4
                kept.append(probs if probs is not None else logits.sub_(lse[:, None]).exp_())
        ctx.entropy_row = want_stats.index("entropy") if grad_entropy and "entropy" in want_stats else None
        entropy = stats[ctx.entropy_row] if ctx.entropy_row is not None else lse_all[:0]
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all, entropy)
        ctx.temperature, ctx.chunk_size, ctx.kept = temperature, chunk_size, kept
        if ctx.entropy_row is None:
            ctx.mark_non_differentiable(stats)
        return logp, stats

    @staticmethod
    def backward(ctx, grad_logp, grad_stats):
        hidden, weight, bias, targets, lse_all, entropy = ctx.saved_tensors
        grad_entropy = None
        if ctx.entropy_row is not None and grad_stats is not None:
            grad_entropy = grad_stats[ctx.entropy_row]
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None  # the first chunk writes it, later ones add to it: no [vocab, hidden] zero fill
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        cs = ctx.chunk_size
        for i, s in enumerate(range(0, hidden.shape[0], cs)):
            h = hidden[s : s + cs]
            if i < len(ctx.kept):  # the softmax kept from forward (not modified: a second backward finds it intact)
                p = ctx.kept[i]
                g = p * -grad_logp[s : s + cs, None]
                if grad_entropy is not None:  # dH/dz = -(p log p + p H); xlogy: 0 where p underflowed to 0
                    g.sub_((torch.xlogy(p, p) + p * entropy[s : s + cs, None]) * grad_entropy[s : s + cs, None])
            else:  # recomputed: one more head matmul instead of holding [rows, vocab] since forward
                logits = _chunk_logits(h, weight, bias, ctx.temperature)
                logp_v = logits.sub_(lse_all[s : s + cs, None])  # in place: log p over the vocabulary
                ent = None
                if grad_entropy is not None:  # dH/dz = -p (log p + H), before logp_v becomes p below
                    ent = -logp_v.exp() * (logp_v + entropy[s : s + cs, None]) * grad_entropy[s : s + cs, None]
                g = logp_v.exp_().mul_(-grad_logp[s : s + cs, None])  # in place
                if ent is not None:
                    g.add_(ent)
            # d logp / d logits = onehot(target) - softmax; scaled by the upstream gradient and 1/T.
            g.scatter_add_(1, targets[s : s + cs, None], grad_logp[s : s + cs, None].float())
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            if grad_h is not None:
                grad_h[s : s + cs] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = g.t() @ h.float() if grad_w is None else grad_w.addmm_(g.t(), h.float())
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        if grad_w is None and ctx.needs_input_grad[1]:  # no scored token at all
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


@dataclass
class TokenLogps:
    """Per-token results aligned with input positions: entry [b, t] is about token t (0 where unscored).

    logps        [B, T] float32, log p(token_t | tokens_<t)
    mask         [B, T] float32, 1 where scored
    entropy      [B, T] float32 or None, entropy of the predictive distribution at t (detached unless `grad_entropy`)
    logits_mean  [B, T] float32 or None, mean logit over the vocabulary at t (detached)
    log_p2       [B, T] float32 or None, log sum_v p_v^2 at t (detached; WPO)
    values       [B, T] float32 or None, a value head on the hidden state that predicts token t (a critic's V_t;
                 with gradient), when the routine was given `value_head`
    logps is None when the routine was told not to run the LM head (`logps=False`: a critic's values only).
    """

    logps: torch.Tensor | None
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    logits_mean: torch.Tensor | None = None
    log_p2: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def sums(self) -> torch.Tensor:
        return self.logps.sum(-1)

    def counts(self) -> torch.Tensor:
        return self.mask.sum(-1)


@routed  # under DDP/FSDP: through the wrapper's forward (posttrain.parallel)
def hidden_states(model, input_ids, attention_mask, position_ids=None, units: UnitLayout | None = None):
    """Final-layer hidden states [B, T, H] (after the last norm) from the model's decoder. `units`: the layout of
    a packed row for `unit_attention` (the model must use it: `use_unit_attention`)."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.dtype == torch.bool:
        # Packed rows' [B, 1, T, T] block mask: transformers passes 4-D masks straight to the attention
        # kernel, and the eager kernel *adds* the mask, so a boolean one would be silently wrong there.
        # The additive form (0 = attend, dtype minimum = blocked) is exact for eager and SDPA alike.
        dtype = base.get_input_embeddings().weight.dtype
        attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill_(
            ~attention_mask, torch.finfo(dtype).min
        )
    extra = {}
    if units is not None:
        # transformers hands extra keyword arguments down to the attention function. The 4-D placeholder
        # stops it from building a mask of its own (a 4-D mask is taken as given); unit_attention ignores it.
        extra = {"posttrain_units": units}
        attention_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra)
    return out.last_hidden_state


@routed
def token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_stats: bool | tuple[str, ...] = False,
    grad_entropy: bool = False,
    value_head=None,
    logps: bool = True,
) -> TokenLogps:
    """Log-probs of the tokens where `loss_mask` is 1, computed only there (see module docstring).
    `with_stats`: True for every per-token statistic of STATS, or the names of those wanted; `grad_entropy`:
    the entropy statistic carries a gradient (for an entropy term in a loss). `value_head`: a module mapping
    hidden states [n, H] to values [n], applied to the same hidden states (PPO's critic); `logps=False` skips
    the LM head (values only)."""
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)
    mask = loss_mask.clone()
    mask[:, 0] = 0  # the first token has no prediction
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    h = hidden[b_idx, t_idx - 1]  # position t-1 predicts token t
    targets = input_ids[b_idx, t_idx]
    return _score(unwrap(model), h, targets, (b_idx, t_idx), mask.float(), temperature, chunk_size, with_stats,
                  grad_entropy, value_head, logps)


STATS = ("entropy", "logits_mean", "log_p2")


def _stat_names(with_stats) -> tuple[str, ...]:
    """`with_stats`: False, True (all of STATS) or an iterable of names from STATS."""
    if with_stats is True:
        return STATS
    names = tuple(with_stats or ())
    unknown = set(names) - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STATS}")
    return names


def _score(base, h, targets, index, mask, temperature, chunk_size, with_stats, grad_entropy=False, value_head=None,
           logps: bool = True) -> TokenLogps:
    """The LM head on the hidden states `h` of the scored positions (`index` into `mask`'s shape), with
    gradients when anything needs them, scattered back to a TokenLogps shaped like `mask`; `value_head` on the
    same states when given; no LM head when not `logps`."""

    def scatter(values):
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).index_put(index, values)

    values = None if value_head is None else scatter(value_head(h).float())
    if not logps:
        return TokenLogps(None, mask, values=values)
    head = base.get_output_embeddings()
    names = _stat_names(with_stats)
    if type(head) is not torch.nn.Linear:
        # A wrapped head (LoRA on lm_head): its `.weight` is only the frozen base weight, so the fused kernel
        # would silently drop the adapter. Call the module itself on the scored positions instead.
        flat, stats = _module_head_logprob(head, h, targets, temperature, names, grad_entropy)
    elif torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        flat, stats = _HeadLogProb.apply(h, head.weight, head.bias, targets, temperature, chunk_size, names,
                                         grad_entropy)
    else:
        with torch.no_grad():
            flat, stats = _HeadLogProb.forward(_NoCtx(), h, head.weight, head.bias, targets, temperature, chunk_size,
                                               names)
    out = TokenLogps(scatter(flat), mask, values=values)
    for row, name in enumerate(names):
        setattr(out, name, scatter(stats[row]))
    return out


def _module_head_logprob(head, h, targets, temperature, names, grad_entropy=False):
    """Plain autograd through `head(h)`: [n, vocab] logits at once (only for the scored positions)."""
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    flat = logits.gather(1, targets[:, None]).squeeze(1) - lse
    with torch.set_grad_enabled(grad_entropy and torch.is_grad_enabled()):  # stats detached but for that case
        probs = (logits - lse[:, None]).exp()
        entropy = lse - torch.linalg.vecdot(probs, logits)
    with torch.no_grad():
        rows = {"entropy": lambda: entropy if grad_entropy else entropy.detach(),
                "logits_mean": lambda: logits.mean(-1), "log_p2": lambda: torch.linalg.vecdot(probs, probs).log()}
        values = [rows[n]() for n in names]
    stats = torch.stack(values) if names else logits.new_empty((0, h.shape[0]))
    return flat, stats


class _NoCtx:
    """Stand-in autograd context for the no-grad path (reference passes, generation scoring)."""

    def save_for_backward(self, *args):
        pass

    def mark_non_differentiable(self, *args):
        pass


def sequence_logps(model, input_ids, attention_mask, completion_mask, position_ids=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of completion-token log-probs [B] and the number of completion tokens [B]."""
    out = token_logps(model, input_ids, attention_mask, completion_mask, position_ids, **kw)
    return out.sums(), out.counts()


def naive_token_logps(model, input_ids, attention_mask, loss_mask, temperature: float = 1.0) -> torch.Tensor:
    """Reference implementation (full float32 log-softmax over every position); for tests and benchmarks."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    mask = loss_mask.clone().float()
    mask[:, 0] = 0
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1) * mask


@dataclass
class UnitLayout:
    """Where each unit (a prompt and the completions that continue it) sits in a packed row, for the attention.

    units   per unit: (prompt start, prompt length, [(completion start, completion length), ...])
    length  the packed row's length (the sum of every segment)
    A prompt attends causally to itself; a completion to its prompt and causally to itself. Nothing crosses a
    unit, and no completion sees another completion of its unit."""

    units: list
    length: int
    _masks: dict | None = None

    def completion_mask(self, p: int, c: int, device) -> torch.Tensor:
        """[c, p + c] bool: a completion's queries against its prompt's keys, then its own (causal)."""
        if self._masks is None:
            self._masks = {}
        key = (p, c, str(device))
        if key not in self._masks:
            self._masks[key] = torch.cat([torch.ones(c, p, dtype=torch.bool, device=device),
                                          torch.ones(c, c, dtype=torch.bool, device=device).tril()], dim=1)
        return self._masks[key]

    def dense_mask(self, device) -> torch.Tensor:
        """The same pattern as one [1, 1, L, L] boolean mask, for attention kernels that only take a mask (eager)."""
        mask = torch.zeros(self.length, self.length, dtype=torch.bool, device=device)
        for ps, p, comps in self.units:
            mask[ps : ps + p, ps : ps + p] = torch.ones(p, p, dtype=torch.bool, device=device).tril()
            for cs, c in comps:
                mask[cs : cs + c, cs : cs + c] = torch.ones(c, c, dtype=torch.bool, device=device).tril()
                mask[cs : cs + c, ps : ps + p] = True
        return mask[None, None]


def unit_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, posttrain_units=None,
                   **kwargs):
    """Attention over a packed row, one unit at a time (block-diagonal): each prompt with a causal kernel call,
    each completion against [its prompt's keys, its own keys] with a [c, p + c] mask. The work is
    sum(p^2 / 2 + c * (p + c)) per unit instead of the L^2 of one dense mask over the row, whose cross-unit and
    cross-completion blocks would be computed and thrown away. Without a layout (generation, plain forwards) it is
    transformers' SDPA attention, unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if posttrain_units is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    sdpa = F.scaled_dot_product_attention
    pieces = []
    for ps, p, comps in posttrain_units.units:
        kp, vp = key[:, :, ps : ps + p], value[:, :, ps : ps + p]
        pieces.append(sdpa(query[:, :, ps : ps + p], kp, vp, is_causal=True, dropout_p=dropout, scale=scaling))
        for cs, c in comps:
            k = torch.cat([kp, key[:, :, cs : cs + c]], dim=2)
            v = torch.cat([vp, value[:, :, cs : cs + c]], dim=2)
            mask = posttrain_units.completion_mask(p, c, query.device)
            pieces.append(sdpa(query[:, :, cs : cs + c], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling))
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


UNIT_ATTENTION = "posttrain_units"


def use_unit_attention(base) -> bool:
    """Give an SDPA model `unit_attention` (registered with transformers under UNIT_ATTENTION; it is plain SDPA
    for every call without a unit layout, so generation and other forwards are unchanged). The switch is kept,
    not undone after the call: a layer recomputed in backward (gradient checkpointing) must find the same
    attention. False where it does not apply: another kernel (eager, flash-attention) or an older transformers."""
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == UNIT_ATTENTION:
        return True
    if impl != "sdpa":
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    if UNIT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(UNIT_ATTENTION, unit_attention)
        AttentionMaskInterface.register(UNIT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = UNIT_ATTENTION
    return True


def pack_units(prompts: list[list[int]], row_prompt: torch.Tensor, lengths: list[int]):
    """The packed layout as index tensors, built on the host with tensor operations (no Python loop over rows).

    Segments run [prompt 0, its rows..., prompt 1, its rows...]; row r brings its first lengths[r] tokens.
    Returns (UnitLayout, index) where index holds int64 host tensors:
      prompt_ids, prompt_at, prompt_pos  every prompt token (prompt order), its flat position and position id
      row_start [N]    flat position of each row's first token
      prompt_end [N]   flat position of the last token of the row's prompt (it predicts the row's first token)
      row_offset [N]   the row's prompt length: the position id of its first token"""
    P, N = len(prompts), len(lengths)
    p_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    r_len = torch.tensor(lengths, dtype=torch.long)
    rp = row_prompt.cpu().long()
    # Segment order: each prompt, then its rows in row order (sort key: prompt, then 0 / 1 + row index).
    order = torch.cat([torch.arange(P) * (N + 1), rp * (N + 1) + 1 + torch.arange(N)]).argsort()
    seg_len = torch.cat([p_len, r_len])[order]
    seg_start = torch.empty(P + N, dtype=torch.long)
    seg_start[order] = seg_len.cumsum(0) - seg_len
    p_start, r_start = seg_start[:P], seg_start[P:]
    within = torch.arange(int(p_len.sum())) - torch.repeat_interleave(p_len.cumsum(0) - p_len, p_len)
    index = {
        "prompt_ids": torch.tensor([t for p in prompts for t in p], dtype=torch.long),
        "prompt_at": torch.repeat_interleave(p_start, p_len) + within,
        "prompt_pos": within,
        "row_start": r_start,
        "prompt_end": p_start[rp] + p_len[rp] - 1,
        "row_offset": p_len[rp],
    }
    # The attention's slices: one (start, length) per segment, walked once in layout order.
    units, owner = [], (order - P).tolist()  # segment k in layout order: a prompt (< 0) or row owner[k]
    for k, (start, n) in enumerate(zip(torch.sort(seg_start).values.tolist(), seg_len.tolist())):
        if owner[k] < 0:
            units.append((start, n, []))
        elif n:
            units[-1][2].append((start, n))
    return UnitLayout(units, int(seg_len.sum())), index


@routed
def shared_prefix_token_logps(
    model,
    prompts: list[list[int]],
    row_prompt: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_stats: bool | tuple[str, ...] = False,
    grad_entropy: bool = False,
    value_head=None,
    logps: bool = True,
) -> TokenLogps:
    """Completion log-probs when many rows share a prompt (a GRPO group, a DPO pair), packed without padding.

    Each prompt is laid out once, followed by every completion that continues it, all in one packed row. The
    attention keeps each completion to its own prompt and its own earlier tokens (`unit_attention`; a block mask
    for the eager kernel), and its position ids continue from the prompt's end, so every scored token gets
    exactly the context it has in the plain prompt + completion sequence, while the prompt is computed once and no
    FLOP goes to padding. On the HH pairs of the benchmark this computes 37% fewer positions than right-padded
    pairs with a shared prefix.

    prompts          unique prompts (token ids, unpadded)
    row_prompt       [N] long: which prompt each row continues
    completion_ids   [N, Tc] right-padded; completion_mask [N, Tc] marks the scored tokens
    Returns TokenLogps aligned with `completion_ids` (entry [i, j] is about completion token j). Equal to
    `token_logps` on the concatenated sequences within float tolerance (tested). `value_head` and `logps` as in
    `token_logps`: a critic's values from the same forward (shared) or from its own model (separate).

    The layout is index arithmetic on the host from the prompt lengths and the rows' lengths (one read of the
    [N] lengths from the device), sent to the device in one transfer; the completion tokens themselves are
    gathered on the device.
    """
    base = unwrap(model)
    units = use_unit_attention(base)
    if not units and getattr(base.config, "_attn_implementation", "sdpa") != "eager":
        # Kernels such as flash-attention take no arbitrary mask: score the concatenated sequences instead.
        return _concatenated_token_logps(model, prompts, row_prompt, completion_ids, completion_mask, pad_id,
                                         temperature=temperature, chunk_size=chunk_size, with_stats=with_stats,
                                         grad_entropy=grad_entropy, value_head=value_head, logps=logps)
    device = completion_ids.device
    N, Tc = completion_ids.shape
    lengths = (_prefix_ones(completion_mask) | (completion_mask > 0).long()).sum(-1).tolist()
    layout, index = pack_units(prompts, row_prompt, lengths)
    L = layout.length
    # One host -> device transfer for every index of the layout.
    dev = torch.cat(list(index.values())).to(device).split([t.numel() for t in index.values()])
    idx = dict(zip(index, dev))
    j = torch.arange(Tc, device=device)
    valid = j[None] < torch.as_tensor(lengths, dtype=torch.long).to(device)[:, None]
    where = idx["row_start"][:, None] + j[None]  # flat position of completion token [r, j] (where valid)
    ids = torch.full((L,), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros(L, dtype=torch.long, device=device)
    ids[idx["prompt_at"]] = idx["prompt_ids"]
    pos[idx["prompt_at"]] = idx["prompt_pos"]
    ids[where[valid]] = completion_ids[valid]
    pos[where[valid]] = (idx["row_offset"][:, None] + j[None]).expand(N, Tc)[valid]
    # The hidden state at flat position prev[r, j] predicts completion token [r, j].
    prev = torch.where(j[None] == 0, idx["prompt_end"][:, None], where - 1)
    if units:
        hidden = hidden_states(model, ids[None], None, pos[None], units=layout)
    else:
        hidden = hidden_states(model, ids[None], layout.dense_mask(device), pos[None])
    mask = completion_mask.float()
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    h = hidden[0][prev[b_idx, t_idx]]
    return _score(base, h, completion_ids[b_idx, t_idx], (b_idx, t_idx), mask, temperature, chunk_size, with_stats,
                  grad_entropy, value_head, logps)


def _prefix_ones(mask: torch.Tensor) -> torch.Tensor:
    """1 on every position up to a row's last scored token (unscored tokens inside a completion still attend)."""
    last = torch.where(mask.any(-1), mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1), torch.zeros_like(mask[:, 0]))
    return (torch.arange(mask.shape[1], device=mask.device)[None] <= last[:, None]).long()


def _concatenated_token_logps(model, prompts, row_prompt, completion_ids, completion_mask, pad_id, **kw) -> TokenLogps:
    """The plain path behind `shared_prefix_token_logps`: prompt + completion per row, then re-aligned."""
    N, Tc = completion_ids.shape
    lengths = [len(prompts[int(r)]) for r in row_prompt]
    width = max(lengths) + Tc
    ids = torch.full((N, width), pad_id, dtype=torch.long, device=completion_ids.device)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    valid = _prefix_ones(completion_mask) | (completion_mask > 0).long()
    for i, (r, L) in enumerate(zip(row_prompt.tolist(), lengths)):
        n = int(valid[i].sum())
        ids[i, :L] = torch.tensor(prompts[r], device=ids.device)
        ids[i, L : L + n] = completion_ids[i, :n]
        attn[i, : L + n] = 1
        mask[i, L : L + Tc] = completion_mask[i]
    out = token_logps(model, ids, attn, mask, **kw)
    idx = torch.tensor(lengths, device=ids.device)[:, None] + torch.arange(Tc, device=ids.device)[None]

    def take(x):
        return None if x is None else x.gather(1, idx)

    return TokenLogps(take(out.logps), take(out.mask), take(out.entropy), take(out.logits_mean), take(out.log_p2),
                      take(out.values))
