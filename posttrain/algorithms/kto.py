"""KTO: Kahneman-Tversky Optimization on unpaired examples (prompt, completion, desirable or not).

Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7. With r = log pi(y|x) - log pi_ref(y|x) (summed over the
completion's tokens) and the reference point z0:
    desirable:    desirable_weight   * (1 - sigma(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - sigma(beta * (z0 - r)))
The pure function is `posttrain.losses.kto.kto_loss`; the step's loss is the sum of the per-example losses /
the number of examples in the step over all processes (TRL's per-micro-batch mean when one micro-batch makes
the step).

Data. Unpaired rows {prompt, completion, label}. Preference pairs are unpaired as TRL does: each pair gives
(prompt, chosen, True) then (prompt, rejected, False), in file order (`max_samples` counts file rows).

z0, the KL term. Each example i is also given a mismatched sequence: its own prompt x_i with the completion of
example i - s (the list rotated by s, as TRL's +1 offset, so every completion is used exactly once as a y').
s is 1, or the smallest shift that never pairs a prompt with a completion written for the same prompt (2 for
unpaired preference pairs, whose neighbours share a prompt). Then
    z0 = max(0, mean over the step's examples on every process of log pi(y'|x) - log pi_ref(y'|x))
(`kl_estimate` over all the step's pairs), computed without gradient before the step's micro-batches run, and
held constant in the loss (stop-gradient, as in the paper).
Deviation from TRL: TRL rotates within each per-device micro-batch and estimates z0 per micro-batch, so its
update depends on how a step is split into micro-batches (with micro-batches of one, z0 would be the
example's own log-ratio; TRL refuses that size). One estimate per step keeps this engine's guarantee that
the update does not depend on the split, and fixed pairs let `precompute_ref_log_probs` store the reference
side of z0 too, so precomputed and live references give the same numbers.

Reference strategies, as dpo.py: `precomputed` (one pass before training over the examples and their
mismatched sequences, cached on disk; no reference in memory), `adapter` (LoRA: the same model with the
adapter disabled), `copy` (a frozen copy of the starting policy, or `ref_model: PATH`).

Metrics (TRL names, eval with `eval/`): rewards/chosen and rewards/rejected (mean beta * r over the step's
desirable / undesirable examples), rewards/margins (their difference), logps/chosen and logps/rejected (mean
summed log-prob), count/desirable and count/undesirable, kl (z0). All are exact over the whole step on every
process: micro-batches add up sums and counts, and `step_metrics` adds them over the processes before it
divides (an average of per-micro-batch or per-process ratios would weight the examples unevenly).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.algorithms.dpo import reference_pass
from posttrain.config import TrainConfig, UserError, opt
from posttrain.data import encode_dataset, load_train_eval
from posttrain.data.formats import Dataset, Row
from posttrain.data.tokenize import Encoded, LMBatch, collate, encode_pair, truncate_pair
from posttrain.engine import Algorithm, Engine, all_reduce_sum, is_main
from posttrain.logprobs import token_logps
from posttrain.losses.kto import desirable_ratio_warning, kl_estimate, kto_loss
from posttrain.models import cache_dir, frozen_copy, load_model, prepare_model, resolve_model_path

log = logging.getLogger("posttrain")

DEFAULT_DATASET = "arithmetic"
_SUM_KEYS = (
    "rewards/chosen_sum",
    "rewards/rejected_sum",
    "logps/chosen_sum",
    "logps/rejected_sum",
    "count/chosen",
    "count/rejected",
)


@dataclass
class Config(TrainConfig):
    """KTO on unpaired (prompt, completion, label) examples; preference pairs are split into a desirable and
    an undesirable example. `batch_size` and `micro_batch_size` count EXAMPLES (two per preference pair).
    With no dataset: the built-in arithmetic pairs (correct answer desirable, a plausible wrong one not)."""

    beta: float = opt(0.1, "Inverse temperature of the implicit reward beta * log(pi / ref).")
    desirable_weight: float = opt(1.0, "Weight of the desirable examples' losses.")
    undesirable_weight: float = opt(1.0, "Weight of the undesirable examples' losses.")
    ref_model: str | None = opt(None, "Reference model path (default: the starting policy).")
    precompute_ref_log_probs: bool = opt(
        False,
        "Score the data (and its mismatched KL pairs) with the reference once, cache it, keep no reference "
        "in memory.",
    )
    learning_rate: float | None = opt(
        None, "Peak learning rate (default 5e-7 full fine-tuning, 5e-6 with LoRA)."
    )  # type: ignore[assignment]
    warmup_ratio: float = opt(0.1, "Fraction of the optimizer steps spent warming up linearly from 0.")
    max_length: int = opt(512, "Maximum tokens of prompt + completion.")
    command = "kto"

    def validate(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = 5e-6 if self.lora is not None else 5e-7
        super().validate()
        if self.beta <= 0:
            raise UserError("beta must be > 0")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise UserError("desirable_weight and undesirable_weight must be > 0")


@dataclass
class KTOExample:
    seq: Encoded  # prompt + its completion, mask on the completion
    kl_seq: Encoded  # the same prompt + another example's completion (the mismatched pair for z0)
    label: bool
    ref_logp: float | None = None
    ref_kl_logp: float | None = None


@dataclass
class KTOBatch:
    """One micro-batch.

    seqs        LMBatch [B, T] of prompt + completion
    labels      [B] bool, True = desirable
    ref_logps   [B] precomputed reference sums, or None
    z0          the step's KL estimate (a constant of the loss)
    """

    seqs: LMBatch
    labels: torch.Tensor
    ref_logps: torch.Tensor | None
    z0: float

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_tokens(self) -> int:
        return self.seqs.num_tokens


# ------------------------------------------------------------------------------------------------------
# Data


def unpair(ds: Dataset) -> Dataset:
    """Preference pairs -> unpaired rows (prompt, chosen, True), (prompt, rejected, False); others as is."""
    if ds.format != "preference":
        return ds
    rows = []
    for r in ds.rows:
        for key, label in (("chosen", True), ("rejected", False)):
            rows.append(
                Row(
                    {"prompt": r.data["prompt"], "completion": r.data[key], "label": label},
                    f"{r.source} ({key})",
                )
            )
    return Dataset(rows, ds.name, "unpaired", ds.skipped)


def kl_shift(prompts: list) -> int:
    """The smallest rotation s >= 1 such that no row i is paired with row i - s of the same prompt."""
    n = len(prompts)
    for s in range(1, n):
        if all(prompts[i] != prompts[i - s] for i in range(n)):
            return s
    log.warning(
        "kto: every mismatched pair for the KL estimate shares a prompt (a single prompt?); using shift 1"
    )
    return 1 if n > 1 else 0


def build_examples(
    pieces: list[tuple[list[int], list[int], bool]], max_length: int, max_prompt_length: int | None
) -> list[KTOExample]:
    """(prompt_ids, completion_ids, label) -> examples with their mismatched KL sequences (see the module)."""

    def join(prompt_ids, completion_ids) -> Encoded:
        p, c = truncate_pair(prompt_ids, completion_ids, max_length, max_prompt_length)
        return Encoded(p + c, [0] * len(p) + [1] * len(c))

    s = kl_shift([p for p, _, _ in pieces])
    return [
        KTOExample(join(p, c), join(p, pieces[i - s][1]), label) for i, (p, c, label) in enumerate(pieces)
    ]


def encode_examples(tok, ds: Dataset, cfg: TrainConfig) -> list[KTOExample]:
    def encode(data):
        p, c = encode_pair(tok, data["prompt"], data["completion"])
        # Rows whose prompt fills max_length are dropped (and counted) here, before any pairing.
        return (
            None
            if truncate_pair(p, c, cfg.max_length, cfg.max_prompt_length) is None
            else (p, c, data["label"])
        )

    return build_examples(encode_dataset(ds, encode), cfg.max_length, cfg.max_prompt_length)


def collate_examples(examples: list[KTOExample], pad_id: int, z0: float) -> KTOBatch:
    ref = None
    if examples[0].ref_logp is not None:
        ref = torch.tensor([e.ref_logp for e in examples], dtype=torch.float32)
    labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return KTOBatch(collate([e.seq for e in examples], pad_id), labels, ref, z0)


# ------------------------------------------------------------------------------------------------------
# The algorithm


def _sums(model, batch: LMBatch) -> torch.Tensor:
    return token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask).sums()


def summarize(sums: dict) -> dict:
    """Step (or eval) means from the added-up sums and counts of `kto_loss`'s metrics."""
    n_d, n_u = sums["count/chosen"], sums["count/rejected"]
    out = {"count/desirable": n_d, "count/undesirable": n_u}
    if n_d:
        out["rewards/chosen"] = sums["rewards/chosen_sum"] / n_d
        out["logps/chosen"] = sums["logps/chosen_sum"] / n_d
    if n_u:
        out["rewards/rejected"] = sums["rewards/rejected_sum"] / n_u
        out["logps/rejected"] = sums["logps/rejected_sum"] / n_u
    if n_d and n_u:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


class KTO(Algorithm):
    def __init__(self, cfg: Config, pad_id: int, ref_model=None):
        self.cfg, self.pad_id, self.ref_model = cfg, pad_id, ref_model
        self._sums: dict[str, float] = {}

    @property
    def strategy(self) -> str:
        if self.cfg.precompute_ref_log_probs:
            return "precomputed"
        return "copy" if self.ref_model is not None else "adapter"

    def reference_sums(self, model, batch: LMBatch) -> torch.Tensor:
        """Reference log-prob sums of a batch: the frozen copy, or the policy with its adapter disabled."""
        with torch.no_grad():
            if self.ref_model is not None:
                return _sums(self.ref_model, batch)
            with model.disable_adapter():
                return _sums(model, batch)

    def kl_logps(self, model, examples: list[KTOExample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-prob sums [N] of the examples' mismatched sequences, no gradient."""
        policy, ref = [], []
        with torch.no_grad():
            for i in range(0, len(examples), size):
                chunk = examples[i : i + size]
                batch = collate([e.kl_seq for e in chunk], self.pad_id)
                policy.append(_sums(model, batch))
                if self.strategy == "precomputed":
                    ref.append(torch.tensor([e.ref_kl_logp for e in chunk], dtype=torch.float32, device=policy[-1].device))
                else:
                    ref.append(self.reference_sums(model, batch))
        return torch.cat(policy), torch.cat(ref)

    def prepare(self, model, examples: list) -> list:
        policy, ref = self.kl_logps(model, examples, self.cfg.micro_batch_size)
        # kl_estimate over every process's pairs: all-reduce the sum and the count, then mean and clamp.
        totals = all_reduce_sum(
            torch.tensor([float((policy - ref).double().sum()), float(len(examples))], dtype=torch.float64)
        )
        z0 = max(0.0, float(totals[0] / totals[1]))
        size = self.cfg.micro_batch_size
        return [collate_examples(examples[s : s + size], self.pad_id, z0) for s in range(0, len(examples), size)]

    def _compute(self, model, mb: KTOBatch):
        ref = mb.ref_logps if mb.ref_logps is not None else self.reference_sums(model, mb.seqs)
        logps = _sums(model, mb.seqs)
        return kto_loss(
            logps,
            ref.to(logps.device),  # precomputed values and eval batches stay on the CPU; the policy may not
            mb.labels.to(logps.device),
            mb.z0,
            beta=self.cfg.beta,
            desirable_weight=self.cfg.desirable_weight,
            undesirable_weight=self.cfg.undesirable_weight,
        )

    def loss(self, model, mb: KTOBatch, total_items: float):
        res = self._compute(model, mb)
        for k in _SUM_KEYS:
            self._sums[k] = self._sums.get(k, 0.0) + float(res.metrics[k])
        return res.losses.sum() / total_items, {"kl": mb.z0}

    def step_metrics(self) -> dict:
        totals = all_reduce_sum(torch.tensor([self._sums.get(k, 0.0) for k in _SUM_KEYS], dtype=torch.float64))
        self._sums = {}
        return summarize(dict(zip(_SUM_KEYS, totals.tolist())))

    def evaluate(self, model, examples: list) -> dict:
        size = self.cfg.eval_batch_size
        z0 = float(kl_estimate(*self.kl_logps(model, examples, size)))  # one estimate over the whole eval set
        sums = dict.fromkeys(_SUM_KEYS, 0.0)
        loss = 0.0
        for s in range(0, len(examples), size):
            res = self._compute(model, collate_examples(examples[s : s + size], self.pad_id, z0))
            loss += float(res.losses.sum())
            for k in _SUM_KEYS:
                sums[k] += float(res.metrics[k])
        return {"loss": loss / len(examples), "kl": z0, **summarize(sums)}


# ------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs


def _cache_key(model_path: str, examples: list[KTOExample]) -> str:
    """Model (path + weight file sizes and times) and the exact token sequences scored."""
    h = hashlib.sha256(json.dumps(["kto", model_path]).encode())
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    for f in weights:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for e in examples:
        h.update(f"{e.seq.input_ids}|{e.seq.mask}|{e.kl_seq.input_ids}|{e.kl_seq.mask}".encode())
    return h.hexdigest()[:24]


def precompute_reference(cfg: Config, algo: KTO, model, examples: list[KTOExample]) -> str:
    """Fill ref_logp / ref_kl_logp of every example (from the disk cache when the same model and data ran)."""
    path = cache_dir() / "ref_logps" / f"kto-{_cache_key(resolve_model_path(cfg.ref_model or cfg.model), examples)}.pt"

    def score(ref, start, stop):
        chunk = examples[start:stop]
        return torch.stack([_sums(ref, collate([e.seq for e in chunk], algo.pad_id)),
                            _sums(ref, collate([e.kl_seq for e in chunk], algo.pad_id))], dim=1)

    values, source = reference_pass(path, model, algo.ref_model, len(examples), cfg.eval_batch_size, score)
    for e, (main, kl) in zip(examples, values.tolist()):
        e.ref_logp, e.ref_kl_logp = main, kl
    return source


def run(cfg: Config):
    train, evald = load_train_eval(cfg, "unpaired", DEFAULT_DATASET)
    train, evald = unpair(train), (unpair(evald) if evald else None)
    tok, model = prepare_model(cfg)
    examples = encode_examples(tok, train, cfg)
    eval_examples = encode_examples(tok, evald, cfg) if evald else None
    n_desirable = sum(e.label for e in examples)
    warning = desirable_ratio_warning(
        n_desirable, len(examples) - n_desirable, cfg.desirable_weight, cfg.undesirable_weight
    )
    if warning and is_main():
        log.warning(f"kto: {warning}")

    ref_model = None
    if cfg.ref_model:
        ref_model = load_model(cfg.ref_model, cfg.trust_remote_code)
        ref_model.eval().requires_grad_(False)
    elif cfg.lora is None and not cfg.precompute_ref_log_probs:
        ref_model = frozen_copy(model)
    algo = KTO(cfg, tok.pad_token_id, ref_model)
    if cfg.precompute_ref_log_probs:
        source = precompute_reference(cfg, algo, model, examples)
        log.info(f"kto: reference log-probs for {len(examples)} examples: {source}")
        if eval_examples:
            precompute_reference(cfg, algo, model, eval_examples)
        algo.ref_model = None  # nothing of the reference stays in memory
    if is_main():
        n_undesirable = len(examples) - n_desirable
        log.info(f"kto: beta {cfg.beta}, {n_desirable} desirable / {n_undesirable} undesirable examples, "
                 f"reference: {algo.strategy}")
    return Engine(cfg, model, tok, algo, examples, eval_examples).train()
