"""The reference model: one owner of every strategy an algorithm measures its policy against.

DPO and KTO score log-ratios against a reference, GRPO's `beta` term is a KL to it, PPO (issue 12) shapes
per-token rewards with it. Every algorithm asks its `Reference` in the same way:

    ref_logps = reference.logps(policy, score, stored=batch.ref_logps)

`score(model) -> Tensor` is the algorithm's own log-prob routine on the batch (sequence sums for DPO and
KTO, per-token log-probs for GRPO), and the strategy runs it on the right model, without gradients; so the
reference is always scored exactly as the policy is (same packing, temperature, LD-DPO weighting).

Strategies (`Reference.strategy`), chosen by `build` with one rule for every algorithm (`choose`):

  none         nothing to compare against (reference-free losses: simpo, cpo, orpo; GRPO with beta = 0):
               `logps` returns None.
  precomputed  `precompute_ref_log_probs: true`: one pass over the data before training (`Precomputed.
               precompute`), cached on disk; the values travel with the examples into the batches (`stored`).
               The model of that pass (`ref_model: PATH`, or the starting policy with its LoRA adapter off)
               is dropped by `release()`, so nothing of it stays in memory while training.
  adapter      LoRA: the policy itself with its adapter disabled; no second copy of the weights.
  copy         a frozen copy of the starting policy, or the model at `ref_model: PATH`. With `Sync` (TR-DPO,
               Gorbatovski et al. 2024, arXiv:2404.09656) it moves towards the policy every `every` optimizer
               steps, and is then part of the run's state (`state_dict`).

Evaluation scores against the same reference as training: never the policy being trained.
`footprint()` says what a strategy keeps in memory besides the policy (for the memory planner).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.tokenize import Encoded
from posttrain.models import cache_dir, frozen_copy, is_peft, load_model, resolve_model_path, torch_dtype
from posttrain.parallel import is_main

log = logging.getLogger("posttrain")

# Bumped whenever what the precompute cache key covers changes, so an old file is never read as a new one.
# 2: one key for every algorithm (name, model, settings, every token sequence with its mask).
CACHE_VERSION = 2

Score = Callable[[torch.nn.Module], torch.Tensor]  # one batch's log-probs, computed on the model given
ScoreExamples = Callable[[torch.nn.Module, list], torch.Tensor]  # [len(examples), k] values of some examples


@dataclass(frozen=True)
class Footprint:
    """What a reference strategy holds in memory besides the policy.

    parameters, bytes   reference weights held apart from the policy (0 when there are none, or when they are
                        the policy's own, as with the adapter strategy)
    stored_values       precomputed log-prob values held with the examples (floats)
    note                one line saying what is kept
    """

    strategy: str
    parameters: int = 0
    bytes: int = 0
    stored_values: int = 0
    note: str = ""


@dataclass(frozen=True)
class Sync:
    """TR-DPO: every `every` optimizer steps, ref <- alpha * policy + (1 - alpha) * ref (alpha = 1: a hard copy)."""

    every: int
    alpha: float


class Reference:
    """The interface, and the `none` strategy: no reference (`logps` returns None)."""

    strategy = "none"

    def logps(self, policy, score: Score, stored: torch.Tensor | None = None) -> torch.Tensor | None:
        """Reference log-probs of a batch: `score` run on the reference model without gradients, or the
        batch's `stored` precomputed values; None when there is no reference."""
        return None

    def precompute(self, policy, datasets: Iterable[list], *, name: str, settings: dict,
                   sequences: Callable[[object], Iterable[Encoded]], score: ScoreExamples,
                   store: Callable[[object, list[float]], None], size: int) -> list[str]:
        """Fill the examples' `stored` values before training; only the precomputed strategy stores any
        (see `Precomputed.precompute`): the others have nothing to do and return []."""
        return []

    def on_step_end(self, policy, step: int) -> None:
        """After optimizer step `step` (1-based): TR-DPO's sync; nothing for the other strategies."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume: only a moving (synced) reference has any."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Counterpart of `state_dict`."""

    def models(self) -> list[torch.nn.Module]:
        """Models this strategy runs apart from the policy (the engine puts them on the policy's device)."""
        return []

    def footprint(self) -> Footprint:
        return Footprint(self.strategy, note="no reference")


class AdapterOff(Reference):
    """LoRA: the reference is the policy with its adapter switched off (the base weights it started from)."""

    strategy = "adapter"

    def logps(self, policy, score: Score, stored: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad(), policy.disable_adapter():
            return score(policy)

    def footprint(self) -> Footprint:
        return Footprint(self.strategy, note="the policy's own base weights (LoRA adapter off): no second copy")


class Copy(Reference):
    """A frozen model of its own: a copy of the starting policy, or a model loaded from a path."""

    strategy = "copy"

    def __init__(self, model: torch.nn.Module, sync: Sync | None = None):
        self.model, self.sync = model, sync

    def logps(self, policy, score: Score, stored: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return score(self.model)

    def on_step_end(self, policy, step: int) -> None:
        if self.sync is not None and step % self.sync.every == 0:
            sync_towards(self.model, policy, self.sync.alpha)

    def state_dict(self) -> dict:
        if self.sync is None:  # a frozen reference is rebuilt from the config on resume
            return {}
        return {"ref_model": {k: v.clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if "ref_model" in state:
            self.model.load_state_dict(state["ref_model"])

    def models(self) -> list[torch.nn.Module]:
        return [self.model]

    def footprint(self) -> Footprint:
        params = list(self.model.parameters()) + list(self.model.buffers())
        n = sum(p.numel() for p in self.model.parameters())
        size = sum(p.numel() * p.element_size() for p in params)
        moving = f", moved towards the policy every {self.sync.every} steps" if self.sync else ""
        return Footprint(self.strategy, n, size, note=f"a second copy of the weights ({n:,} parameters){moving}")


class Precomputed(Reference):
    """Reference log-probs computed once before training and cached on disk.

    `precompute` scores the datasets with the reference model: `path`'s model (loaded on first need, so a run
    whose every dataset is cached never loads it), or else the policy as it is before training, its LoRA
    adapter off; then it drops the model (`release`), and only the values are left, in the examples.
    """

    strategy = "precomputed"

    def __init__(self, model_path: str, path: str | None = None, trust_remote_code: bool = False,
                 dtype: str = "float32"):
        self.model_path = model_path  # the weights the values come from (part of the cache key)
        self.path, self.trust_remote_code, self.dtype = path, trust_remote_code, dtype
        self._model = None
        self.stored_values = 0

    def logps(self, policy, score: Score, stored: torch.Tensor | None = None) -> torch.Tensor:
        if stored is None:
            raise RuntimeError("precomputed reference: this batch carries no precomputed values (precompute first)")
        return stored

    def precompute(self, policy, datasets: Iterable[list], *, name: str, settings: dict,
                   sequences: Callable[[object], Iterable[Encoded]], score: ScoreExamples,
                   store: Callable[[object, list[float]], None], size: int) -> list[str]:
        """Score every example of every dataset with the reference once (or read the values from the disk
        cache), hand each example its values, then release the reference model.

        name, settings   the algorithm, and whatever besides the weights and the tokens changes the values
                         (e.g. {"ld_alpha": 0.5}); with each example's `sequences(example)` (token ids and
                         mask) they make the cache key
        score(model, examples) -> [len(examples), k]: run in eval mode without gradients, `size` examples
                         at a time
        store(example, values)  puts an example's k values where its batches will find them
        Returns where each dataset's values came from ("cache PATH" or "computed, cached at PATH")."""
        sources = []
        for examples in datasets:
            values, source = self._values(policy, name, settings, examples, sequences, score, size)
            for example, row in zip(examples, values.tolist()):
                store(example, row)
            self.stored_values += values.numel()
            log.info(f"{name}: reference log-probs for {len(examples)} examples: {source}")
            sources.append(source)
        self.release()
        return sources

    def _values(self, policy, name, settings, examples, sequences, score, size) -> tuple[torch.Tensor, str]:
        key = self._cache_key(settings, (s for e in examples for s in sequences(e)))
        file = cache_dir() / "ref_logps" / f"{name}-{key}.pt"
        if file.exists():
            return torch.load(file, weights_only=True), f"cache {file}"
        if self.path is not None and self._model is None:
            self._model = load_model(self.path, self.trust_remote_code, torch_dtype(self.dtype)).eval().requires_grad_(False)
        model = self._model if self._model is not None else policy
        adapter_off = policy.disable_adapter() if self._model is None and is_peft(policy) else nullcontext()
        was_training = model.training
        model.eval()
        with torch.no_grad(), adapter_off:
            values = torch.cat([score(model, examples[i : i + size]).cpu() for i in range(0, len(examples), size)])
        model.train(was_training)
        if is_main():  # every process computed the same values; one writes them, atomically
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            torch.save(values, tmp)
            tmp.replace(file)
        return values, f"computed, cached at {file}"

    def _cache_key(self, settings: dict, sequences: Iterable[Encoded]) -> str:
        """The weights (path + each weight file's size and modification time), the settings and every token
        sequence scored: a change in any of them is a different file."""
        path = resolve_model_path(self.model_path)
        # The dtype the reference runs in changes the values; float32 keeps the key it always had.
        dtype = [] if self.dtype == "float32" else [self.dtype]
        h = hashlib.sha256(json.dumps([CACHE_VERSION, path, settings, *dtype]).encode())
        weights = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
        for f in weights:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        for s in sequences:
            h.update(f"{s.input_ids}|{s.mask};".encode())
        return h.hexdigest()[:24]

    def release(self) -> None:
        """Drop the model used to precompute: training keeps only the values."""
        self._model = None

    def footprint(self) -> Footprint:
        return Footprint(self.strategy, stored_values=self.stored_values,
                         note=f"{self.stored_values:,} precomputed values with the examples; no reference model")


def choose(*, needed: bool = True, path: str | None = None, precompute: bool = False, lora: bool = False) -> str:
    """The strategy `build` picks, from the settings alone (so the memory planner can ask before anything is
    loaded): not `needed` -> none; `precompute` -> precomputed; `path` -> copy (of that model); a LoRA
    policy -> adapter; otherwise -> copy (of the policy)."""
    if not needed:
        return "none"
    if precompute:
        return "precomputed"
    return "adapter" if lora and not path else "copy"


def build(policy, *, needed: bool = True, path: str | None = None, model_path: str | None = None,
          precompute: bool = False, sync: Sync | None = None, trust_remote_code: bool = False,
          dtype: str = "float32") -> Reference:
    """The reference of a run, by one rule for every algorithm (`choose`). precomputed: the values come from
    the model at `path`, else from the policy as loaded from `model_path` (adapter off); copy: a frozen copy
    of the model at `path`, else of the policy, moved towards the policy when `sync` is given (TR-DPO). A model
    loaded from `path` gets the run's `dtype`, as the policy does."""
    kind = choose(needed=needed, path=path, precompute=precompute, lora=is_peft(policy))
    if kind == "none":
        return Reference()
    if kind == "precomputed":
        return Precomputed(path or model_path, path, trust_remote_code, dtype)
    if kind == "adapter":
        return AdapterOff()
    model = (load_model(path, trust_remote_code, torch_dtype(dtype)).eval().requires_grad_(False) if path
             else frozen_copy(policy))
    return Copy(model, sync)


@torch.no_grad()
def sync_towards(ref_model, policy, alpha: float) -> None:
    """TR-DPO: ref <- alpha * policy + (1 - alpha) * ref (alpha = 1: hard copy)."""
    policy_params = dict(policy.named_parameters())
    for name, p in ref_model.named_parameters():
        p.mul_(1 - alpha).add_(policy_params[name].detach(), alpha=alpha)
