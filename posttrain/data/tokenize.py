"""Tokenization with exact loss masks, and collation into typed batches.

Prompt and completion are rendered with the chat template, then tokenized *separately* and concatenated:
a BPE merge across the boundary could otherwise move the first completion token into the prompt and
shift the mask. Truncation keeps the end of the prompt and the start of the completion; an example that
would keep no completion token is dropped and counted, never trained on silently.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from posttrain.config import UserError


@dataclass
class Encoded:
    """One tokenized sequence. `mask[i] = 1` when token i is trained on / scored."""

    input_ids: list[int]
    mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def is_conversation(value) -> bool:
    return isinstance(value, list)


def _ids(tok, text: str, *, first: bool) -> list[int]:
    # Only the very first segment of a sequence may get the tokenizer's BOS.
    return tok(text, add_special_tokens=first and tok.bos_token_id is not None)["input_ids"]


def _render(tok, messages, *, add_generation_prompt: bool, template_kwargs: dict | None = None) -> str:
    if not tok.chat_template:
        raise UserError("conversational data needs a tokenizer with a chat template (set chat_template)")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                   **(template_kwargs or {}))


def _strip_after_eos(tok, ids: list[int]) -> list[int]:
    """End a completion at its EOS (templates often add a newline after it) or append EOS if absent."""
    eos = tok.eos_token_id
    if eos is None:
        return ids
    if eos in ids:
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids + [eos]


def encode_prompt(tok, prompt, template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids ready for generation (chat template with the generation prompt for conversations).
    `template_kwargs`: extra variables for the chat template (e.g. {"enable_thinking": False})."""
    if is_conversation(prompt):
        return _ids(tok, _render(tok, prompt, add_generation_prompt=True, template_kwargs=template_kwargs), first=True)
    return _ids(tok, prompt, first=True)


def encode_pair(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) for one prompt-completion pair, tokenized separately."""
    if is_conversation(prompt) or is_conversation(completion):
        if not (is_conversation(prompt) and is_conversation(completion)):
            raise UserError("prompt and completion must both be text or both be conversations")
        prompt_text = _render(tok, prompt, add_generation_prompt=True)
        full_text = _render(tok, prompt + completion, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise UserError("the chat template renders the prompt differently when a reply follows; cannot mask it")
        completion_text = full_text[len(prompt_text) :]
    else:
        prompt_text, completion_text = prompt, completion
    prompt_ids = _ids(tok, prompt_text, first=True)
    completion_ids = _strip_after_eos(tok, _ids(tok, completion_text, first=False))
    return prompt_ids, completion_ids


TRUNCATION_MODES = ("keep_start", "keep_end")


def truncate_pair(prompt_ids, completion_ids, max_length: int, max_prompt_length: int | None,
                  mode: str = "keep_start"):
    """Keep the prompt's end (max_prompt_length), then fit prompt + completion into max_length: keep_start
    keeps the completion's start (None if no completion token survives); keep_end (TRL's deprecated mode)
    keeps the sequence's last max_length tokens, cutting the prompt from the left first but keeping its last
    token, which predicts the first completion token."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if mode == "keep_end":
        excess = len(prompt_ids) + len(completion_ids) - max_length
        if excess > 0:
            cut = min(excess, len(prompt_ids) - 1)
            prompt_ids, completion_ids = prompt_ids[cut:], completion_ids[excess - cut :]
        return (prompt_ids, completion_ids) if completion_ids else None
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None
    return prompt_ids, completion_ids[:room]


def encode_conversation(tok, messages, assistant_only: bool) -> Encoded:
    """Multi-turn SFT: render turn by turn, tokenize each piece separately, mask assistant replies."""
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            header = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
            if not header.startswith(rendered):
                raise UserError("the chat template is not prefix-stable across turns; cannot build an assistant mask")
            piece = header[len(rendered) :]
            if piece:
                ids += _ids(tok, piece, first=not ids)
                mask += [0] * (len(ids) - len(mask))
            rendered = header
        text = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(rendered):
            raise UserError("the chat template is not prefix-stable across turns; cannot build an assistant mask")
        piece_ids = _ids(tok, text[len(rendered) :], first=not ids)
        if msg["role"] == "assistant":
            # Train on the reply up to and including EOS; the template's newline after EOS stays in the
            # sequence (so later turns render exactly) but is not a target.
            kept = _strip_after_eos(tok, piece_ids)
            tail = piece_ids[len(kept) :]  # empty when EOS had to be appended
            piece_ids, piece_mask = kept + tail, [1] * len(kept) + [0] * len(tail)
        else:
            piece_mask = [0 if assistant_only else 1] * len(piece_ids)
        ids += piece_ids
        mask += piece_mask
        rendered = text
    if not assistant_only:
        mask = [1] * len(ids)  # every token is a target (TRL's assistant_only_loss=False)
    return Encoded(ids, mask)


def encode_sft_row(tok, data: dict, *, max_length: int, max_prompt_length: int | None, completion_only: bool,
                   assistant_only: bool, truncation_mode: str = "keep_start") -> Encoded | None:
    """One SFT example; None when truncation would leave no trainable token. truncation_mode: keep the first
    (keep_start) or the last (keep_end) max_length tokens. The fields used are those of the row's format
    (`detect_format`): a prompt-completion row with a stray `text` column trains on the pair."""
    from posttrain.data.formats import detect_format

    keep = slice(-max_length, None) if truncation_mode == "keep_end" else slice(None, max_length)
    fmt = detect_format(data)
    if fmt == "language_modeling" and data.get("messages") is not None:
        enc = encode_conversation(tok, data["messages"], assistant_only)
        enc = Encoded(enc.input_ids[keep], enc.mask[keep])
    elif fmt == "language_modeling":
        ids = _strip_after_eos(tok, _ids(tok, data["text"], first=True))[keep]
        enc = Encoded(ids, [0] + [1] * (len(ids) - 1))
    else:
        pair = truncate_pair(*encode_pair(tok, data["prompt"], data["completion"]), max_length, max_prompt_length,
                             truncation_mode)
        if pair is None:
            return None
        p, c = pair
        enc = Encoded(p + c, [0 if completion_only else 1] * len(p) + [1] * len(c))
    # The first token is never predicted (nothing precedes it).
    enc.mask[0] = 0
    return enc if sum(enc.mask) > 0 else None


@contextmanager
def row_errors(source: str):
    """Errors while tokenizing a row name its file and line: our own (a template that is not prefix-stable)
    and the chat template's (a Jinja template that raises, e.g. on roles that do not alternate)."""
    from jinja2 import TemplateError

    try:
        yield
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except TemplateError as e:
        raise UserError(f"{source}: the chat template refused this row ({(str(e).splitlines() or [''])[0]})") from None


def encode_rows(rows, encode_fn) -> tuple[list, Counter]:
    """Apply `encode_fn(row.data)`; rows it returns None for are counted as dropped (too long)."""
    out, dropped = [], Counter()
    for row in rows:
        with row_errors(row.source):
            enc = encode_fn(row.data)
        if enc is None:
            dropped["prompt fills max_length, no completion token left"] += 1
            continue
        out.append(enc)
    if not out:
        raise UserError("every example was dropped by truncation: raise max_length or lower max_prompt_length")
    return out, dropped


# ------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class LMBatch:
    """Right-padded token batch.

    input_ids       [B, T] long
    attention_mask  [B, T] long, 1 on real tokens
    loss_mask       [B, T] float/long, 1 where token t is scored (predicted from position t-1)
    position_ids    [B, T] long or None; set for packed rows (positions restart per example)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        if self.attention_mask.ndim == 4:  # packed: a real token attends to itself, padding to nothing
            return int(self.attention_mask[:, 0].diagonal(dim1=-2, dim2=-1).sum())
        return int(self.attention_mask.sum())


def collate(examples: list[Encoded], pad_id: int) -> LMBatch:
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.mask)
    return LMBatch(ids, attn, mask)


def first_fit(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of `sizes` put, in the given order, into the first bin that still has room under `budget`
    (an item larger than the budget gets a bin of its own)."""
    bins: list[list[int]] = []
    totals: list[int] = []
    for i, size in enumerate(sizes):
        for j, total in enumerate(totals):
            if total + size <= budget:
                bins[j].append(i)
                totals[j] += size
                break
        else:
            bins.append([i])
            totals.append(size)
    return bins


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Greedy first-fit packing (longest first) into rows of at most max_length tokens; keeps the per-example
    split (positions restart) through `Packed.boundaries`."""
    ordered = sorted(examples, key=len, reverse=True)
    return [Packed([ordered[i] for i in b]) for b in first_fit([len(e) for e in ordered], max_length)]


class Packed(Encoded):
    """Several examples in one row; position ids restart at each example (no cross-example positions)."""

    def __init__(self, parts: list[Encoded]):
        super().__init__([t for p in parts for t in p.input_ids], [m for p in parts for m in p.mask])
        self.lengths = [len(p) for p in parts]


def collate_packed(rows: list[Packed], pad_id: int) -> LMBatch:
    """Packed rows: position ids restart per example, and a document-id mask keeps attention inside each
    example (passed to the model as a 4-D boolean mask)."""
    batch = collate(rows, pad_id)
    B, T = batch.input_ids.shape
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        start = 0
        for d, n in enumerate(r.lengths):
            pos[i, start : start + n] = torch.arange(n)
            doc[i, start : start + n] = d
            start += n
    batch.position_ids = pos
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    batch.attention_mask = (causal[None] & same_doc)[:, None]  # [B, 1, T, T]
    return batch
