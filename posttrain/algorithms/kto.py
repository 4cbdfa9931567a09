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

The reference (`posttrain.reference`), as for DPO: `precomputed` (one pass before training over the examples
and their mismatched sequences, cached on disk; no reference in memory), `adapter` (LoRA: the same model with
the adapter disabled), `copy` (a frozen copy of the starting policy, or `ref_model: PATH`).

Metrics (TRL names, eval with `eval/`): rewards/chosen and rewards/rejected (mean beta * r over the step's
desirable / undesirable examples), rewards/margins (their difference), logps/chosen and logps/rejected (mean
summed log-prob), count/desirable and count/undesirable, kl (z0). All are exact over the whole step on every
process: each micro-batch reports its means weighted by its number of desirable (or undesirable) examples,
which the engine adds up over micro-batches and processes (an unweighted average of per-micro-batch means
would weight the examples unevenly), and the margin is taken from the two step means (`derived_metrics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from posttrain.config import TrainConfig, UserError, opt
from posttrain.data import encode_dataset, load_train_eval
from posttrain.data.formats import Dataset, Row
from posttrain.data.tokenize import Encoded, LMBatch, collate, encode_pair, truncate_pair
from posttrain.engine import Algorithm, Engine, Global, Mean, Sum, reduce_metrics
from posttrain.logprobs import token_logps
from posttrain.losses.kto import KTO_LOSSES, desirable_ratio_warning, kl_estimate, kto_loss
from posttrain.models import prepare_model
from posttrain.parallel import all_reduce_sum, is_main
from posttrain.reference import Reference, build

log = logging.getLogger("posttrain")

DEFAULT_DATASET = "arithmetic"


@dataclass
class Config(TrainConfig):
    """KTO on unpaired (prompt, completion, label) examples; preference pairs are split into a desirable and
    an undesirable example. `batch_size` and `micro_batch_size` count EXAMPLES (two per preference pair).
    With no dataset: the built-in arithmetic pairs (correct answer desirable, a plausible wrong one not)."""

    loss_type: str = opt("kto", "kto (Eq. 7 of the KTO paper, with the KL reference point z0) or apo_zero_unpaired "
                         "(APO-zero per example: no z0, so no mismatched-pair pass).", tuple(KTO_LOSSES))
    beta: float = opt(0.1, "Inverse temperature of the implicit reward beta * log(pi / ref).")
    desirable_weight: float = opt(1.0, "Weight of the desirable examples' losses.")
    undesirable_weight: float = opt(1.0, "Weight of the undesirable examples' losses.")
    ref_model: str | None = opt(None, "Reference model path (default: the starting policy).")
    precompute_ref_log_probs: bool = opt(
        False,
        "Score the data (and its mismatched KL pairs) with the reference once, cache it, keep no reference "
        "in memory.",
    )
    precompute_ref_batch_size: int | None = opt(
        None, "Examples per forward of the precompute_ref_log_probs pass (default: eval_batch_size)."
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


def _stored(values: list) -> torch.Tensor | None:
    """Precomputed reference values as a tensor, or None when nothing was precomputed."""
    return None if values[0] is None else torch.tensor(values, dtype=torch.float32)


def collate_examples(examples: list[KTOExample], pad_id: int, z0: float) -> KTOBatch:
    ref = _stored([e.ref_logp for e in examples])
    labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return KTOBatch(collate([e.seq for e in examples], pad_id), labels, ref, z0)


# ------------------------------------------------------------------------------------------------------
# The algorithm


def _sums(model, batch: LMBatch) -> torch.Tensor:
    return token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask).sums()


def _metrics(res) -> dict:
    """Declared metrics of one batch from `kto_loss`'s sums and counts: each side's means weighted by its
    example count (a side with no example here has weight 0 and adds nothing)."""
    m = {k: float(v) for k, v in res.metrics.items()}
    n_d, n_u = m["count/chosen"], m["count/rejected"]
    return {
        "count/desirable": Sum(n_d),
        "count/undesirable": Sum(n_u),
        "rewards/chosen": Mean(m["rewards/chosen_sum"] / max(n_d, 1), n_d),
        "logps/chosen": Mean(m["logps/chosen_sum"] / max(n_d, 1), n_d),
        "rewards/rejected": Mean(m["rewards/rejected_sum"] / max(n_u, 1), n_u),
        "logps/rejected": Mean(m["logps/rejected_sum"] / max(n_u, 1), n_u),
    }


class KTO(Algorithm):
    def __init__(self, cfg: Config, pad_id: int, reference: Reference):
        self.cfg, self.pad_id, self.reference = cfg, pad_id, reference

    def reference_sums(self, model, batch: LMBatch, stored: torch.Tensor | None = None) -> torch.Tensor:
        """Reference log-prob sums of a batch's sequences (`stored`: their precomputed values, if any)."""
        return self.reference.logps(model, lambda m: _sums(m, batch), stored=stored)

    def kl_logps(self, model, examples: list[KTOExample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-prob sums [N] of the examples' mismatched sequences, no gradient."""
        policy, ref = [], []
        with torch.no_grad():
            for i in range(0, len(examples), size):
                chunk = examples[i : i + size]
                batch = collate([e.kl_seq for e in chunk], self.pad_id)
                policy.append(_sums(model, batch))
                stored = _stored([e.ref_kl_logp for e in chunk])
                ref.append(self.reference_sums(model, batch, stored).to(policy[-1].device))
        return torch.cat(policy), torch.cat(ref)

    @property
    def uses_kl(self) -> bool:
        return KTO_LOSSES[self.cfg.loss_type].uses_kl

    def prepare(self, model, examples: list) -> list:
        z0 = 0.0
        if self.uses_kl:
            policy, ref = self.kl_logps(model, examples, self.cfg.micro_batch_size)
            # kl_estimate over every process's pairs: all-reduce the sum and the count, then mean and clamp.
            totals = all_reduce_sum(
                torch.tensor([float((policy - ref).double().sum()), float(len(examples))], dtype=torch.float64)
            )
            z0 = max(0.0, float(totals[0] / totals[1]))
        size = self.cfg.micro_batch_size
        return [collate_examples(examples[s : s + size], self.pad_id, z0) for s in range(0, len(examples), size)]

    def _compute(self, model, mb: KTOBatch):
        ref = self.reference_sums(model, mb.seqs, mb.ref_logps)
        logps = _sums(model, mb.seqs)
        return kto_loss(
            logps,
            ref.to(logps.device),  # precomputed values and eval batches stay on the CPU; the policy may not
            mb.labels.to(logps.device),
            mb.z0,
            beta=self.cfg.beta,
            desirable_weight=self.cfg.desirable_weight,
            undesirable_weight=self.cfg.undesirable_weight,
            loss_type=self.cfg.loss_type,
        )

    def loss(self, model, mb: KTOBatch, total_items: float):
        res = self._compute(model, mb)
        # z0 is one all-reduced estimate for the whole step: the same in every micro-batch and process.
        return res.losses.sum() / total_items, {"kl": Global(mb.z0), **_metrics(res)}

    def derived_metrics(self, step: dict) -> dict:
        if "rewards/chosen" in step and "rewards/rejected" in step:
            return {"rewards/margins": step["rewards/chosen"] - step["rewards/rejected"]}
        return {}

    def evaluate(self, model, examples: list) -> dict:
        size = self.cfg.eval_batch_size
        # One estimate over the whole eval set.
        z0 = float(kl_estimate(*self.kl_logps(model, examples, size))) if self.uses_kl else 0.0
        parts = []
        for s in range(0, len(examples), size):
            res = self._compute(model, collate_examples(examples[s : s + size], self.pad_id, z0))
            parts.append({"loss": Mean(float(res.losses.sum()) / len(res.losses), len(res.losses)), **_metrics(res)})
        out = {"kl": z0, **reduce_metrics(parts)}
        return {**out, **self.derived_metrics(out)}

    def precompute_reference(self, model, *datasets: list[KTOExample]) -> list[str]:
        """With the precomputed strategy: fill every example's ref_logp / ref_kl_logp (one reference pass over
        the examples and their mismatched sequences, or the disk cache) and release the reference model.
        Returns where each dataset's values came from."""

        def score(ref, examples):  # [own completion, mismatched completion] per example
            return torch.stack([_sums(ref, collate([e.seq for e in examples], self.pad_id)),
                                _sums(ref, collate([e.kl_seq for e in examples], self.pad_id))], dim=1)

        def store(example, values):
            example.ref_logp, example.ref_kl_logp = values

        return self.reference.precompute(model, datasets, name="kto", settings={}, sequences=lambda e: (e.seq, e.kl_seq),
                                         score=score, store=store,
                                         size=self.cfg.precompute_ref_batch_size or self.cfg.eval_batch_size)


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

    reference = build(model, path=cfg.ref_model, model_path=cfg.model, precompute=cfg.precompute_ref_log_probs,
                      trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
    algo = KTO(cfg, tok.pad_token_id, reference)
    algo.precompute_reference(model, examples, *([eval_examples] if eval_examples else []))
    if is_main():
        n_undesirable = len(examples) - n_desirable
        log.info(f"kto: beta {cfg.beta}, {n_desirable} desirable / {n_undesirable} undesirable examples, "
                 f"reference: {reference.strategy}")
    return Engine(cfg, model, tok, algo, examples, eval_examples).train()
