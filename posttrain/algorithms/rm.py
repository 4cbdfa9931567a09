"""Reward modelling: a scalar score r(x, y) fitted to preference pairs (prompt, chosen, rejected) with the
Bradley-Terry loss, as TRL's RewardTrainer.

    loss_i = -log sigma(r(x, y_w) - r(x, y_l) - m_i)  +  c * (r(x, y_w) + r(x, y_l))^2

First term: InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, eq. 1); optional per-row margin m (column
`margin`): Llama 2 (Touvron et al. 2023, arXiv 2307.09288, eq. 2); optional centering c
(`center_rewards_coefficient`): Eisenstein et al. 2023, arXiv 2312.09244. The pure function is
`posttrain.losses.reward.bradley_terry_loss`; the step's loss is the sum over its pairs / the global pair
count.

The model is AutoModelForSequenceClassification with one output. A sequence is exactly what TRL's
RewardTrainer builds (`encode_for_reward`): a conversation rendered whole by the chat template, or text
prompt + completion + EOS; so a reward model trained here scores the same in TRL, or in plain transformers
code fed `apply_chat_template(prompt + completion)`. Where TRL drops pairs longer than max_length, they are
truncated here keeping their end. Chosen and rejected run through one forward, stacked [chosen; rejected].

Where the reward is read. r(x, y) is the `score` head applied to the final hidden state of the LAST REAL
token (the last position with attention_mask 1), computed here directly (`sequence_rewards`). transformers'
own classifier forward picks the rightmost token whose id differs from `config.pad_token_id`; when pad == EOS
(SmolLM2, Llama 3, any tokenizer given EOS as pad) a sequence ending with EOS (text data; templates that end
a turn with EOS) looks padded and it would read one token early. So before training the tokenizer and the
model config get a pad token distinct from EOS (`distinct_pad_token`), and the saved run directory loads with
`AutoModelForSequenceClassification.from_pretrained(run_dir)` and its tokenizer (right padding) to the same
scores. LoRA reward models are always saved merged for the same reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from posttrain.config import TrainConfig, UserError, opt
from posttrain.data import encode_dataset, load_train_eval
from posttrain.data.tokenize import encode_prompt, is_conversation
from posttrain.engine import Algorithm, Engine, Max, Mean, Min
from posttrain.logprobs import hidden_states, pack_units, use_unit_attention
from posttrain.losses.reward import bradley_terry_loss
from posttrain.models import prepare_model, unwrap
from posttrain.parallel import is_main

log = logging.getLogger("posttrain")

DEFAULT_DATASET = "arithmetic"
PAD_FALLBACK = "<|pad|>"


@dataclass
class Config(TrainConfig):
    """Reward model (Bradley-Terry) on (prompt, chosen, rejected) pairs: a sequence classifier with one
    output, ready for `reward_model: PATH` in online training. `batch_size` and `micro_batch_size` count
    PAIRS. Rows may carry a numeric `margin` (missing = 0). With no dataset: the built-in arithmetic pairs."""

    center_rewards_coefficient: float | None = opt(
        None,
        "Weight c of c * (r_chosen + r_rejected)^2, pulling rewards towards mean 0 (TRL recommends 0.01).",
    )
    learning_rate: float | None = opt(
        None,
        "Peak learning rate (default 1e-5 full fine-tuning, 1e-4 with LoRA; TRL's RewardConfig uses 1e-4).",
    )  # type: ignore[assignment]
    shared_prefix: bool = opt(True, "Run the tokens chosen and rejected share (the prompt) once per pair, packed without "
                              "padding (same rewards, less compute).")
    command = "rm"

    def validate(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.lora is not None else 1e-5
        super().validate()
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise UserError("center_rewards_coefficient must be >= 0")
        if self.lora is not None and not self.lora.merge:
            log.info("rm: the LoRA adapter is merged into the saved model (it loads as a plain classifier)")
            self.lora.merge = True


@dataclass
class RMPair:
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


@dataclass
class RMBatch:
    """[chosen; rejected] stacked: rows 0..B-1 chosen, B..2B-1 rejected, right-padded to one width.

    input_ids, attention_mask  [2B, T]
    margin                     [B] float32, or None when the data has no margin column
    prefixes                   shared_prefix: each pair's common first tokens (B lists); the rows of input_ids
                               then hold only what follows them (at least one token each), and the pair runs
                               packed (`packed_rewards`)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor | None
    prefixes: list | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum()) + sum(len(p) for p in self.prefixes or [])


def encode_for_reward(
    tok, prompt, completion, max_length: int, max_prompt_length: int | None = None
) -> list[int]:
    """Token ids of prompt + completion as the reward model reads them, the sequence TRL's RewardTrainer
    builds. Conversations are rendered whole by the chat template and tokenized as one text (a
    ChatML sequence ends with "<|im_end|>\n"); text is prompt + completion + EOS. Truncation keeps the end,
    where the reward is read: the prompt loses its first tokens beyond max_prompt_length, then the sequence
    keeps its last max_length tokens."""
    n_prompt = len(encode_prompt(tok, prompt))  # checks the chat template for conversations
    if is_conversation(prompt) != is_conversation(completion):
        raise UserError("prompt and completion must both be text or both be conversations")
    if is_conversation(prompt):
        text = tok.apply_chat_template(prompt + completion, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]  # the template writes any BOS itself
    else:
        eos = tok.eos_token or ""
        ids = encode_prompt(tok, prompt + completion + ("" if completion.endswith(eos) else eos))
    if max_prompt_length is not None and n_prompt > max_prompt_length:
        ids = ids[n_prompt - max_prompt_length :]
    return ids[-max_length:]


def _score_head(model):
    head = getattr(unwrap(model), "score", None)
    if head is None:
        raise UserError(
            f"{type(unwrap(model)).__name__} has no `score` head; a reward model is a decoder classifier"
        )
    return head


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] float32 rewards, read at each row's last position with attention_mask 1 (left or right padding)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask).argmax(-1)
    h = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
    return _score_head(model)(h).squeeze(-1).float()


def packed_rewards(model, prefixes: list[list[int]], rests: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[2B] rewards of B pairs whose two sequences share `prefixes[i]`: rows i and B + i of `rests` hold what follows
    it (right-padded, `lengths` tokens). Each prefix runs once with both continuations after it in one packed row
    (`posttrain.logprobs.pack_units`: a continuation attends to its prefix and causally to itself, its position
    ids go on from the prefix's end), so every reward is read from the same context as in the whole sequence."""
    base = unwrap(model)
    units = use_unit_attention(base)
    B = len(prefixes)
    row_prompt = torch.arange(2 * B) % B
    layout, index = pack_units(prefixes, row_prompt, lengths.tolist())
    device = rests.device
    ids = torch.zeros(layout.length, dtype=torch.long, device=device)
    pos = torch.zeros(layout.length, dtype=torch.long, device=device)
    ids[index["prompt_at"].to(device)] = index["prompt_ids"].to(device)
    pos[index["prompt_at"].to(device)] = index["prompt_pos"].to(device)
    j = torch.arange(rests.shape[1], device=device)
    valid = j[None] < lengths.to(device)[:, None]
    where = index["row_start"].to(device)[:, None] + j[None]
    ids[where[valid]] = rests[valid]
    pos[where[valid]] = (index["row_offset"].to(device)[:, None] + j[None]).expand_as(where)[valid]
    if units:
        hidden = hidden_states(model, ids[None], None, pos[None], units=layout)
    else:  # the eager kernel: the same pattern as one block mask
        hidden = hidden_states(model, ids[None], layout.dense_mask(device), pos[None])
    last = index["row_start"].to(device) + lengths.to(device) - 1
    return _score_head(model)(hidden[0, last]).squeeze(-1).float()


def batch_rewards(model, mb: "RMBatch") -> torch.Tensor:
    """[2B] rewards of a batch, packed when it carries shared prefixes."""
    if mb.prefixes is not None:
        return packed_rewards(model, mb.prefixes, mb.input_ids, mb.attention_mask.sum(-1))
    return sequence_rewards(model, mb.input_ids, mb.attention_mask)


def can_pack(model) -> bool:
    """Packing needs an attention that takes the unit layout or a block mask (SDPA, eager); others (flash) pad."""
    base = unwrap(model)
    return use_unit_attention(base) or getattr(base.config, "_attn_implementation", "sdpa") == "eager"


def distinct_pad_token(tok, model) -> None:
    """Make the pad token differ from EOS in the tokenizer and the model config (see module docstring).

    Prefers the unk token, then a special token the chat template never writes (SmolLM2: <|endoftext|>); adds
    <|pad|> (resizing the embeddings) only when there is none. Padding is always masked, so which id it is
    changes nothing in training; it only lets transformers find each row's last real token.
    """
    base = unwrap(model)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        template = tok.chat_template if isinstance(tok.chat_template, str) else ""
        specials = [t.content for _, t in sorted(tok.added_tokens_decoder.items()) if t.special]
        for candidate in [tok.unk_token, *specials]:
            if candidate and candidate != tok.eos_token and candidate not in template:
                tok.pad_token = candidate
                break
        else:
            tok.add_special_tokens({"pad_token": PAD_FALLBACK})
            base.resize_token_embeddings(len(tok))
        log.info(
            f"rm: pad token {tok.pad_token!r} (id {tok.pad_token_id}), distinct from EOS {tok.eos_token!r}"
        )
    base.config.pad_token_id = tok.pad_token_id


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the tokens a and b share at the start, leaving each at least one token of its own."""
    n = 0
    limit = min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def collate_rm(pairs: list[RMPair], pad_id: int, with_margin: bool, shared_prefix: bool = False) -> RMBatch:
    prefixes = None
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if shared_prefix:
        cut = [_common_prefix(p.chosen, p.rejected) for p in pairs]
        prefixes = [p.chosen[:k] for p, k in zip(pairs, cut)]
        seqs = [p.chosen[k:] for p, k in zip(pairs, cut)] + [p.rejected[k:] for p, k in zip(pairs, cut)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32) if with_margin else None
    return RMBatch(ids, attn, margin, prefixes)


class RewardModel(Algorithm):
    def __init__(self, cfg: Config, pad_id: int, with_margin: bool = False):
        self.cfg, self.pad_id, self.with_margin = cfg, pad_id, with_margin

    def _batches(self, model, pairs: list[RMPair], size: int) -> list[RMBatch]:
        packed = self.cfg.shared_prefix and can_pack(model)
        return [collate_rm(pairs[s : s + size], self.pad_id, self.with_margin, packed)
                for s in range(0, len(pairs), size)]

    def prepare(self, model, examples: list) -> list:
        return self._batches(model, examples, self.cfg.micro_batch_size)

    def _compute(self, model, mb: RMBatch):
        rewards = batch_rewards(model, mb)
        B = len(mb)
        return bradley_terry_loss(rewards[:B], rewards[B:], mb.margin, self.cfg.center_rewards_coefficient)

    def loss(self, model, mb: RMBatch, total_items: float):
        losses, metrics = self._compute(model, mb)
        B = len(mb)
        out = {k: Mean(metrics[k], B) for k in ("accuracy", "margin", "mean_reward")}  # means over pairs
        # The step's extremes, not an average of per-micro-batch minima and maxima.
        out.update(min_reward=Min(metrics["min_reward"]), max_reward=Max(metrics["max_reward"]))
        return losses.sum() / total_items, out

    def evaluate(self, model, examples: list) -> dict:
        chosen, rejected, margins = [], [], []
        for mb in self._batches(model, examples, self.cfg.eval_batch_size):
            rewards = batch_rewards(model, mb)
            chosen.append(rewards[: len(mb)])
            rejected.append(rewards[len(mb) :])
            if mb.margin is not None:
                margins.append(mb.margin)
        margin = torch.cat(margins) if margins else None
        losses, metrics = bradley_terry_loss(
            torch.cat(chosen), torch.cat(rejected), margin, self.cfg.center_rewards_coefficient
        )
        return {"loss": float(losses.mean()), **{k: float(v) for k, v in metrics.items()}}


def _margin(value, source: str) -> float:
    if not isinstance(value, bool):
        try:
            number = float(value)  # CSV cells arrive as text
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number):
            return number
    raise UserError(f"{source}: field 'margin': expected a finite number, got {value!r}")


def encode_pairs(tok, ds, cfg: TrainConfig) -> list[RMPair]:
    margins = iter([_margin(r.data.get("margin", 0.0), r.source) for r in ds.rows])

    def encode(data):
        ids = [
            encode_for_reward(tok, data["prompt"], data[k], cfg.max_length, cfg.max_prompt_length)
            for k in ("chosen", "rejected")
        ]
        return RMPair(*ids, next(margins))

    return encode_dataset(ds, encode)


def run(cfg: Config):
    train, evald = load_train_eval(cfg, "preference", DEFAULT_DATASET)
    torch.manual_seed(cfg.seed)  # the new score head is initialised at load
    tok, model = prepare_model(cfg, head="score")
    distinct_pad_token(tok, model)
    pairs = encode_pairs(tok, train, cfg)
    eval_pairs = encode_pairs(tok, evald, cfg) if evald else None
    with_margin = any("margin" in r.data for r in train.rows + (evald.rows if evald else []))
    if is_main():
        log.info(f"rm: {len(pairs)} pairs{', with margins' if with_margin else ''}")
    algo = RewardModel(cfg, tok.pad_token_id, with_margin)
    return Engine(cfg, model, tok, algo, pairs, eval_pairs).train()
