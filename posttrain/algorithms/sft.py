"""Supervised fine-tuning: maximum likelihood of the completion (or assistant turns, or all text).

Loss = sum of -log p(token) over scored tokens / number of scored tokens in the *global* batch, so a
step's gradient does not depend on how the batch is split into micro-batches or devices (a per-micro-batch
mean, as many trainers compute, over-weights short micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import SFTConfig
from posttrain.data import encode_dataset, load_train_eval
from posttrain.data.tokenize import collate, collate_packed, encode_sft_row, pack
from posttrain.engine import Algorithm, Engine, Mean
from posttrain.logprobs import token_logps
from posttrain.models import prepare_model

DEFAULT_DATASET = "arithmetic"


@dataclass
class Config(SFTConfig):
    """Supervised fine-tuning (SFT). With no arguments: the embedded SmolLM2-135M-Instruct learns the built-in
    arithmetic task for a few minutes on a CPU."""

    command = "sft"
    demo = {"max_steps": 40, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 2e-5, "warmup_ratio": 0.1,
            "eval_dataset": "arithmetic:split=test,n=64"}


class SFT(Algorithm):
    def __init__(self, cfg: SFTConfig, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id

    def _micro_batches(self, examples: list, size: int) -> list:
        if self.cfg.packing:
            rows = pack(examples, self.cfg.max_length)
            return [collate_packed(rows[i : i + size], self.pad_id) for i in range(0, len(rows), size)]
        return [collate(examples[i : i + size], self.pad_id) for i in range(0, len(examples), size)]

    def prepare(self, model, examples: list) -> list:
        return self._micro_batches(examples, self.cfg.micro_batch_size)

    def num_items(self, mb) -> float:
        return float(mb.loss_mask[:, 1:].sum())

    def loss(self, model, mb, total_items: float):
        out = token_logps(model, mb.input_ids, mb.attention_mask, mb.loss_mask, mb.position_ids)
        nll_sum = -(out.logps * out.mask).sum()
        n = out.mask.sum().clamp(min=1)
        return nll_sum / total_items, {"nll": Mean(nll_sum.detach() / n, self.num_items(mb))}  # a token mean

    def evaluate(self, model, examples: list) -> dict:
        nll, count = 0.0, 0.0
        for mb in self._micro_batches(examples, self.cfg.eval_batch_size):
            out = token_logps(model, mb.input_ids, mb.attention_mask, mb.loss_mask, mb.position_ids)
            nll -= float((out.logps * out.mask).sum())
            count += float(out.mask.sum())
        return {"loss": nll / max(count, 1.0)}


def as_prompted(data: dict, cfg: SFTConfig, has_template: bool) -> dict:
    """A prompt-completion row as the online commands prompt: `prompt_suffix` appended to the prompt, and with
    `chat_prompts` (and a chat template) text fields turned into a user turn and the assistant's reply."""
    if "prompt" not in data or "completion" not in data:
        return data
    prompt, completion = data["prompt"], data["completion"]
    if cfg.prompt_suffix:
        if isinstance(prompt, str):
            prompt = prompt + cfg.prompt_suffix
        else:
            prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + cfg.prompt_suffix}]
    if cfg.chat_prompts and has_template and isinstance(prompt, str) and isinstance(completion, str):
        prompt = [{"role": "user", "content": prompt}]
        completion = [{"role": "assistant", "content": completion}]
    return {**data, "prompt": prompt, "completion": completion}


def run(cfg: Config):
    train, evald = load_train_eval(cfg, "sft", DEFAULT_DATASET)
    tok, model = prepare_model(cfg)

    def encode(data):
        return encode_sft_row(
            tok,
            as_prompted(data, cfg, bool(tok.chat_template)),
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            completion_only=cfg.completion_only_loss,
            assistant_only=cfg.assistant_only_loss,
            truncation_mode=cfg.truncation_mode,
        )

    examples = encode_dataset(train, encode)
    eval_examples = encode_dataset(evald, encode) if evald else None
    torch.manual_seed(cfg.seed)
    return Engine(cfg, model, tok, SFT(cfg, tok.pad_token_id), examples, eval_examples).train()
