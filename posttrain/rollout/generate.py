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
    ) -> Rollout: ...


def pad_cat(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """[N_i, T_i] tensors stacked along rows, each right-padded with `value` to the widest T."""
    width = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.size(1)), value=value) for t in tensors])


def filter_logits(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus, Holtzman et al. 2020) set to -inf; always keep the best."""
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


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` [B, V] (rows of non-negative weights), by inverse CDF on one uniform per row.

    The same distribution as torch.multinomial(probs, 1), which on the CPU draws an exponential for every
    vocabulary entry: ~3 ms a call at vocab 49152, 0.8 s of a 32-token GRPO rollout of 32 rows. A cumsum and
    a binary search cost a fraction of that. Zero-weight entries are never drawn."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


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
    ) -> Rollout:
        """Sample ``num_generations`` completions for each prompt (temperature 0 = greedy).

        ``logps`` are log-softmax(logits / temperature) of the chosen tokens, taken before top-k/top-p filtering
        (as TRL records them); with temperature 0 they are the plain log-softmax(logits).
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
                                         top_p, top_k, None if seeds is None else seeds[i:i + step])
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

    def _generate_chunk(self, prompts, G, max_new_tokens, temperature, top_p, top_k, seeds):
        device = next(self.model.parameters()).device
        P, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((P, L), self.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros((P, L), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            input_ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            attn[i, L - len(p):] = 1
        # positions count real tokens only, so a left-padded prompt sees the same positions as unpadded
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True, **extra)
        logits = out.logits[:, -1].float()
        cache = out[self._cache_kw]
        if hasattr(cache, "batch_repeat_interleave"):  # prefill once, then copy each prompt's cache G times
            cache.batch_repeat_interleave(G)
        else:  # a cache without the method (custom models): prefill the repeated batch instead
            out = self.model(input_ids=input_ids.repeat_interleave(G, 0), attention_mask=attn.repeat_interleave(G, 0),
                             position_ids=position_ids.repeat_interleave(G, 0), use_cache=True, **extra)
            cache = out[self._cache_kw]
        logits = logits.repeat_interleave(G, 0)
        attn = attn.repeat_interleave(G, 0)
        next_pos = position_ids[:, -1:].repeat_interleave(G, 0) + 1
        generators = None
        if seeds is not None:
            generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        eos = torch.tensor(self.eos_ids, device=device)

        B = P * G
        tokens, token_logps = [], []
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            scaled = logits / temperature if temperature > 0 else logits
            logp_all = scaled.log_softmax(-1)
            if temperature > 0:
                filtered = top_p < 1.0 or (top_k and top_k < scaled.size(-1))
                probs = filter_logits(scaled, top_p, top_k).softmax(-1) if filtered else logp_all.exp()
                if generators is None:
                    nxt = sample(probs)
                else:
                    nxt = torch.cat([sample(probs[g * G:(g + 1) * G], gen) for g, gen in enumerate(generators)])
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            token_logps.append(torch.where(finished, 0.0, logp_all.gather(-1, nxt[:, None]).squeeze(-1)))
            just_ended = ~finished & torch.isin(nxt, eos)
            lengths = torch.where(just_ended, t + 1, lengths)
            finished |= just_ended
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
            out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos,
                             use_cache=True, **{self._cache_kw: cache})
            cache, logits, next_pos = out[self._cache_kw], out.logits[:, -1].float(), next_pos + 1
        ids = torch.stack(tokens, 1)
        mask = (torch.arange(ids.size(1), device=device)[None] < lengths[:, None]).long()
        return ids, mask, torch.stack(token_logps, 1), ~finished
