"""Batched sampling of G completions per prompt for online RL (GRPO family), with a KV cache.

``GenerationEngine`` is the seam between the trainers and whatever produces completions: GRPO and
``evaluate_prompts`` take ``make_engine(model, tokenizer)``, ``HFEngine`` by default, which runs any
transformers causal LM (a peft model too) in-process. A vLLM engine would be another class with the same
``generate`` method: it would push the policy weights to the vLLM worker before sampling, call
``LLM.generate`` with ``SamplingParams(n=G, temperature, top_p, top_k, max_tokens, seed)`` and
``logprobs=0`` (the sampled token's log-prob) and pack the outputs into the same ``Rollout``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # the P unique prompts, unpadded
    completion_ids: torch.Tensor  # [P*G, T] right-padded with pad_token_id; the G rows of a prompt are contiguous
    completion_mask: torch.Tensor  # [P*G, T] 1 on generated tokens up to and including EOS
    logps: torch.Tensor | None  # [P*G, T] sampling-policy log-probs of the chosen tokens, 0 on padding
    truncated: torch.Tensor  # [P*G] bool: reached max_new_tokens without EOS
    texts: list[str]  # decoded completions, special tokens skipped

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


class GenerationEngine(Protocol):
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_generations: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seeds: list[int] | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
    ) -> Rollout: ...


def pad_cat(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """[N_i, T_i] tensors stacked along rows, each right-padded with `value` to the widest T."""
    width = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.size(1)), value=value) for t in tensors])


def filter_logits(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus, Holtzman et al. 2020) / min-p set to -inf; always keep the
    best. min-p (Nguyen et al. 2024, arXiv:2407.01082) keeps the tokens with p >= min_p x the largest p."""
    if min_p:
        logp = logits.log_softmax(-1)
        logits = logits.masked_fill(logp < logp.max(-1, keepdim=True).values + math.log(min_p), float("-inf"))
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p (so the best one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """One index per row of `probs` [B, V] (rows of non-negative weights), by inverse CDF on one uniform per row.

    The same distribution as torch.multinomial(probs, 1), which on the CPU draws an exponential for every
    vocabulary entry: ~3 ms a call at vocab 49152, 0.8 s of a 32-token GRPO rollout of 32 rows. A cumsum and
    a binary search cost a fraction of that. Zero-weight entries are never drawn.
    `generator`: one for every row, or a list of k generators that own k equal contiguous blocks of rows (a
    prompt's G samples then depend only on that prompt's generator)."""
    B = probs.shape[0]
    if isinstance(generator, (list, tuple)):
        size = B // len(generator)
        u = torch.cat([torch.rand((size, 1), generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand((B, 1), generator=generator, device=probs.device)
    return inverse_cdf(probs, u)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index whose CDF interval holds u [B, 1] (uniform in [0, 1)) in each row of the weights `probs` [B, V]."""
    cdf = probs.float().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# Drop ended rows from the decode batch once the running ones are at most this share of it (each compaction
# copies the KV cache of the rows kept, so not after every single row that ends).
COMPACT = 0.75


def _select_rows(cache, keep: torch.Tensor) -> None:
    """Keep only the batch rows `keep` of a transformers cache, in place."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(lay, "select_rows") for lay in layers):
        for lay in layers:
            lay.select_rows(keep)
    else:
        cache.batch_select_indices(keep)


_PREALLOCATED = None


def _preallocated_layer_class():
    """A transformers cache layer whose keys and values are views into buffers sized for the whole generation.

    transformers' DynamicLayer appends each token with torch.cat, copying the layer's whole cache every token:
    at 32 rows x 90 positions that is ~4.5 MB per layer, ~135 MB per decoded token on a 30-layer model, which
    grows with the sequence. Here each token is one in-place write. Built on first use (None when the installed
    transformers has no DynamicLayer: the cache then keeps its own update)."""
    global _PREALLOCATED
    if _PREALLOCATED is None:
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:
            _PREALLOCATED = False
            return None

        class PreallocatedLayer(DynamicLayer):
            def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
                super().__init__()
                n = keys.shape[-2]
                self._k = keys.new_empty((*keys.shape[:-2], max(capacity, n), keys.shape[-1]))
                self._v = values.new_empty((*values.shape[:-2], max(capacity, n), values.shape[-1]))
                self._k[..., :n, :] = keys
                self._v[..., :n, :] = values
                self.keys, self.values, self.n = self._k[..., :n, :], self._v[..., :n, :], n
                self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

            def update(self, key_states, value_states, *args, **kwargs):
                m = self.n + key_states.shape[-2]
                if m > self._k.shape[-2]:  # past the reserved length: grow (never in HFEngine, which reserves all)
                    self.__init__(torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2), 2 * m)
                    return self.keys, self.values
                self._k[..., self.n : m, :] = key_states
                self._v[..., self.n : m, :] = value_states
                self.keys, self.values, self.n = self._k[..., :m, :], self._v[..., :m, :], m
                return self.keys, self.values

            def select_rows(self, keep):
                self._k, self._v = self._k[keep], self._v[keep]
                self.keys, self.values = self._k[..., : self.n, :], self._v[..., : self.n, :]

        _PREALLOCATED = PreallocatedLayer
    return _PREALLOCATED or None


def preallocate(cache, capacity: int) -> bool:
    """Move a filled transformers DynamicCache into preallocated layers of `capacity` positions, in place. False
    (the cache untouched) for caches of another kind: sliding-window, quantized, older transformers."""
    layer_cls = _preallocated_layer_class()
    layers = getattr(cache, "layers", None)
    if layer_cls is None or not layers:
        return False
    from transformers.cache_utils import DynamicLayer

    if any(type(lay) is not DynamicLayer or not lay.is_initialized for lay in layers):
        return False
    for i, lay in enumerate(layers):
        layers[i] = layer_cls(lay.keys, lay.values, capacity)
    return True


PREFIX_MIN = 8  # shorter common prefixes are not worth a separate forward call


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix all prompts share, keeping at least one token of each prompt."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update([config_eos] if isinstance(config_eos, int) else config_eos)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token")
    return sorted(ids)


class HFEngine:
    """Sampling with a transformers causal LM: one prefill per unique prompt, the KV cache repeated G times.

    ``batch_prompts`` caps how many unique prompts are decoded together (memory); None = all at once.
    Outputs live on the model's device. With ``seeds`` (one per prompt) each prompt's G samples come from
    that prompt's own ``torch.Generator``, so they do not depend on the other prompts in the batch.
    """

    def __init__(self, model, tokenizer, *, batch_prompts: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_prompts = batch_prompts
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        # only the last prompt position's logits are needed; skip the full [B, L, V] tensor when we can
        self._logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.24 names the KV cache `cache` (input and output) and warns on `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def generate(
        self,
        prompt_ids: list[list[int]],
        num_generations: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seeds: list[int] | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
    ) -> Rollout:
        """Sample ``num_generations`` completions for each prompt (temperature 0 = greedy).

        ``repetition_penalty`` (CTRL, Keskar et al. 2019; transformers' definition): before the temperature, the
        logit of every token already in the prompt or the completion so far is divided by it when positive,
        multiplied when negative. ``min_p``, ``top_k``, ``top_p`` then filter.
        ``logps`` are log-softmax(logits / temperature) of the chosen tokens, taken before the penalty and the
        filters (as TRL records them: the policy's own probabilities, which a ratio against the trained policy
        needs); with temperature 0 they are the plain log-softmax(logits).
        """
        if num_generations < 1 or max_new_tokens < 1:
            raise ValueError("num_generations and max_new_tokens must be >= 1")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt")
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompt_ids)} prompts")
        step = self.batch_prompts or max(len(prompt_ids), 1)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                parts = [
                    self._generate_chunk(prompt_ids[i:i + step], num_generations, max_new_tokens, temperature,
                                         top_p, top_k, None if seeds is None else seeds[i:i + step], min_p,
                                         repetition_penalty)
                    for i in range(0, len(prompt_ids), step)
                ]
        finally:
            self.model.train(was_training)
        ids = pad_cat([p[0] for p in parts], self.pad_id)
        mask = pad_cat([p[1] for p in parts], 0)
        logps = pad_cat([p[2] for p in parts], 0.0)
        truncated = torch.cat([p[3] for p in parts])
        texts = self.tokenizer.batch_decode(
            [row[: int(n)].tolist() for row, n in zip(ids, mask.sum(-1))], skip_special_tokens=True)
        return Rollout([list(p) for p in prompt_ids], ids, mask, logps, truncated, texts)

    def _prefill(self, prompts, G):
        """Run the P prompts once; returns (last-position logits [P*G, V], the cache with each prompt's rows repeated
        G times, the attention mask [P, L] and position ids [P, L] of the prompt layout).

        Chat prompts share a long start (the template's system turn: ~30 of the ~47 tokens of the built-in task's
        prompts), so a common token prefix of at least PREFIX_MIN tokens runs once, for one row, and only the
        rest of each prompt runs per prompt. Rows are laid out as [shared prefix | left padding | rest]; padding
        is masked and positions count real tokens only, so every row sees exactly its own prompt."""
        device = next(self.model.parameters()).device
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        P = len(prompts)
        c = _common_prefix(prompts)
        c = c if c >= PREFIX_MIN and P > 1 else 0
        rest = [p[c:] for p in prompts]
        L = max(len(r) for r in rest)
        input_ids = torch.full((P, L), self.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros((P, c + L), dtype=torch.long, device=device)
        attn[:, :c] = 1
        for i, r in enumerate(rest):  # left padding: every prompt ends at the last column
            input_ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
            attn[i, c + L - len(r):] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if c:
            out = self.model(input_ids=torch.tensor([prompts[0][:c]], device=device), use_cache=True, **extra)
            cache = out[self._cache_kw]
            if not hasattr(cache, "batch_repeat_interleave"):
                return self._prefill_plain(prompts, G)
            cache.batch_repeat_interleave(P)
            kw = {self._cache_kw: cache}
        else:
            kw = {}
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids[:, c:], use_cache=True,
                         **extra, **kw)
        logits, cache = out.logits[:, -1].float(), out[self._cache_kw]
        if hasattr(cache, "batch_repeat_interleave"):  # each prompt's cache copied G times
            cache.batch_repeat_interleave(G)
            return logits.repeat_interleave(G, 0), cache, attn, position_ids
        return self._prefill_plain(prompts, G)

    def _prefill_plain(self, prompts, G):
        """A cache without batch_repeat_interleave (custom models): prefill the repeated batch, left-padded."""
        device = next(self.model.parameters()).device
        P, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((P * G, L), self.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros((P * G, L), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            input_ids[i * G:(i + 1) * G, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            attn[i * G:(i + 1) * G, L - len(p):] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True, **extra)
        return out.logits[:, -1].float(), out[self._cache_kw], attn[::G], position_ids[::G]

    def _generate_chunk(self, prompts, G, max_new_tokens, temperature, top_p, top_k, seeds, min_p=None,
                        repetition_penalty=1.0):
        device = next(self.model.parameters()).device
        P = len(prompts)
        logits, cache, attn, position_ids = self._prefill(prompts, G)
        L = attn.shape[1]
        B = P * G
        preallocate(cache, L + max_new_tokens)
        # The attention mask and position ids for every step, made once: step t reads a view, no per-token cat.
        attn = torch.cat([attn.repeat_interleave(G, 0), attn.new_ones(B, max_new_tokens)], dim=1)
        positions = position_ids[:, -1:].repeat_interleave(G, 0) + torch.arange(1, max_new_tokens + 1, device=device)
        generators = None
        if seeds is not None:
            generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        eos = torch.tensor(self.eos_ids, device=device)

        ids = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        token_logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        pad = torch.full((B,), self.pad_id, dtype=torch.long, device=device)
        filtered = temperature > 0 and (top_p < 1.0 or bool(top_k and top_k < logits.size(-1)) or bool(min_p))
        seen = None
        if repetition_penalty != 1.0:  # [B, V]: the tokens of each row's prompt, then of its completion so far
            seen = torch.zeros(B, logits.size(-1), dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                seen[i * G : (i + 1) * G, torch.tensor(sorted(set(p)), device=device)] = True
        steps = max_new_tokens
        rows = torch.arange(B, device=device)  # the rows still decoded (ids into the full batch), ascending
        running = B
        for t in range(max_new_tokens):
            scaled = logits / temperature if temperature > 0 else logits
            logp_all = scaled.log_softmax(-1)
            chosen_from = logits
            if seen is not None:
                penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
                chosen_from = torch.where(seen[rows], penalized, logits)
            if temperature > 0:
                tempered = chosen_from / temperature if seen is not None else scaled
                if filtered:
                    probs = filter_logits(tempered, top_p, top_k, min_p).softmax(-1)
                else:
                    probs = logp_all.exp() if seen is None else tempered.softmax(-1)
                if generators is None:
                    u = torch.rand((rows.numel(), 1), device=device)
                else:  # every group draws for all its G rows, ended or not: its samples never depend on others
                    u = torch.cat([torch.rand((G, 1), generator=g, device=device) for g in generators])[rows]
                nxt = inverse_cdf(probs, u)
            else:
                nxt = chosen_from.argmax(-1)
            done = finished[rows]
            nxt = torch.where(done, pad[: rows.numel()], nxt)
            ids[rows, t] = nxt
            if seen is not None:
                seen[rows, nxt] = True
            token_logps[rows, t] = logp_all.gather(-1, nxt[:, None]).squeeze(-1).masked_fill_(done, 0.0)
            just_ended = ~done & torch.isin(nxt, eos)
            lengths[rows] = torch.where(just_ended, t + 1, lengths[rows])
            finished[rows] |= just_ended
            left = int(B - finished.sum())  # the one host sync per token: the early exit and the compaction below
            if t == max_new_tokens - 1 or left == 0:
                steps = t + 1
                break
            if left <= running * COMPACT:
                # Rows that have ended stop costing compute: keep only the running ones in the batch.
                keep = (~finished[rows]).nonzero().squeeze(1)
                rows, nxt, running = rows[keep], nxt[keep], left
                _select_rows(cache, keep)
            out = self.model(input_ids=nxt[:, None], attention_mask=attn[rows, : L + t + 1],
                             position_ids=positions[rows, t : t + 1], use_cache=True, **{self._cache_kw: cache})
            cache, logits = out[self._cache_kw], out.logits[:, -1].float()
        ids, token_logps = ids[:, :steps], token_logps[:, :steps]
        mask = (torch.arange(steps, device=device)[None] < lengths[:, None]).long()
        return ids, mask, token_logps, ~finished
