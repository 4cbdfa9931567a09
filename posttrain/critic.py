"""The value model (critic) of the online-RL core: none, a value head on the policy's own backbone (shared), or
a model of its own with a scalar head (separate). One owner of these strategies, as `reference.py` is of the
reference's; the algorithm asks the same two things of each:

    values = critic.values(policy, batch)                     V_t of every completion token (no gradient in
                                                              the rollout, with it in the loss)
    out = shared_prefix_token_logps(policy, ..., value_head=critic.shared_head)   (shared: one forward gives both)

V_t is read from the final hidden state that predicts token t (the state before t is generated), exactly the
positions whose log-probs the policy loss uses, packed the same way (`posttrain.logprobs`).

Strategies (`critic:`):

  none      critic-free estimators (grpo, rloo, reinforce_plus_plus, remax)
  shared    `ValueHead` on the policy's last hidden state: one forward for log-probs and values, no second
            model; the value loss also trains the policy's weights (its LoRA adapter, with LoRA)
  separate  a sequence-classification model whose `score` head reads every position: initialised from
            `value_model`, else the reward model, else the policy's weights (its head then starts at zero);
            with `lora:` it gets an adapter of its own with the same settings (its head trained fully)

The critic is trained by the same optimizer as the policy (`critic_learning_rate` may differ): it is attached
to the policy (`models.attach`), so the optimizer, the data-parallel wrappers and checkpoints treat its
parameters as the policy's own, while the saved policy leaves it out; the engine saves it beside the policy
(output_dir/critic/ for a separate model, output_dir/critic.safetensors for a shared head).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import UserError
from posttrain.logprobs import shared_prefix_token_logps
from posttrain.models import (
    apply_lora,
    attach,
    disable_dropout,
    enable_checkpointing,
    lean_mlp,
    load_model,
    resolve_model_path,
    unwrap,
)

log = logging.getLogger("posttrain")

KINDS = ("none", "shared", "separate")
NAME = "critic"  # under which it is attached to the policy (and saved beside it)


class ValueHead(torch.nn.Module):
    """V = w . h + b on the final hidden state (after the last norm). Zero-initialised: the first values are 0,
    so the first advantages are the plain returns instead of noise from a random head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1).float()


class _ScoreHead:
    """A sequence-classification model's one-output `score` layer, applied at every position (through peft's
    wrapper of it when the critic has a LoRA adapter: the head is trained in full)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return unwrap(self.model).score(h)[..., 0].float()


@dataclass(frozen=True)
class Footprint:
    """What a critic holds in memory besides the policy: parameters (and bytes) of its own, and a note."""

    kind: str
    parameters: int = 0
    trainable: int = 0
    bytes: int = 0
    note: str = ""


class Critic:
    """The interface, and the `none` strategy."""

    kind = "none"
    module: torch.nn.Module | None = None
    shared_head = None  # the value head the policy's own forward applies (shared only)

    def values(self, policy, prompts, row_prompt, completion_ids, completion_mask, pad_id) -> torch.Tensor | None:
        return None

    def footprint(self) -> Footprint:
        return Footprint(self.kind, note="no critic")


class SharedCritic(Critic):
    kind = "shared"

    def __init__(self, head: ValueHead):
        self.module = self.shared_head = head

    def values(self, policy, prompts, row_prompt, completion_ids, completion_mask, pad_id) -> torch.Tensor:
        return shared_prefix_token_logps(policy, prompts, row_prompt, completion_ids, completion_mask, pad_id,
                                         value_head=self.module, logps=False).values

    def footprint(self) -> Footprint:
        n = sum(p.numel() for p in self.module.parameters())
        return Footprint(self.kind, n, n, 4 * n, note=f"a value head on the policy's backbone ({n:,} parameters)")


class SeparateCritic(Critic):
    kind = "separate"

    def __init__(self, model, source: str):
        self.module, self.source = model, source
        self.head = _ScoreHead(model)

    def values(self, policy, prompts, row_prompt, completion_ids, completion_mask, pad_id) -> torch.Tensor:
        return shared_prefix_token_logps(self.module, prompts, row_prompt, completion_ids, completion_mask, pad_id,
                                         value_head=self.head, logps=False).values

    def footprint(self) -> Footprint:
        params = list(self.module.parameters())
        n = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        size = sum(p.numel() * p.element_size() for p in params)
        return Footprint(self.kind, n, trainable, size,
                         note=f"a second model ({n:,} parameters, {trainable:,} trained) from {self.source}")


def choose(critic: str, *, value_model: str | None = None, reward_model: str | None = None, model: str = "") -> str:
    """Where a separate critic's weights come from, from the settings alone (for the memory planner)."""
    if critic != "separate":
        return critic
    return value_model or reward_model or model


def _has_value_head(path: str) -> bool:
    """Whether the folder holds a trained one-output head (a reward model, a critic): a sequence-classification
    config, or a LoRA folder trained for that task. A causal LM's head is new and starts at zero."""
    folder = Path(resolve_model_path(path))
    for name, key in (("config.json", "architectures"), ("adapter_config.json", "task_type")):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key) or []
            values = [value] if isinstance(value, str) else value
            if any(str(v).endswith("ForSequenceClassification") or v == "SEQ_CLS" for v in values):
                return True
    return False


def build(cfg, policy) -> Critic:
    """The run's critic (attached to `policy` when there is one), as `cfg.critic` says."""
    kind = cfg.critic
    if kind == "none":
        return Critic()
    base = unwrap(policy)
    if kind == "shared":
        critic = SharedCritic(ValueHead(base.config.hidden_size))
    else:
        source = choose(kind, value_model=cfg.value_model, reward_model=cfg.reward_model, model=cfg.model)
        model = load_model(source, cfg.trust_remote_code, head="score")
        if not _has_value_head(source):
            with torch.no_grad():
                model.score.weight.zero_()
        vocab, own = base.config.vocab_size, model.config.vocab_size
        if own < vocab:
            raise UserError(f"value_model: {source} has a vocabulary of {own} tokens, the policy {vocab}: the critic "
                            "reads the policy's tokens, so it must come from the same model family")
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora, "SEQ_CLS")
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
        if getattr(cfg, "lean_mlp", False):
            lean_mlp(model)
        critic = SeparateCritic(model, source)
    attach(policy, NAME, critic.module)
    return critic
