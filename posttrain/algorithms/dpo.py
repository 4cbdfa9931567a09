"""Direct preference optimisation and its family (DPO, IPO, cDPO/robust, f-DPO, TR-DPO, EXO, NCA, SLiC,
RPO, ...) plus the reference-free SimPO, CPO and ORPO, on pairs (prompt, chosen, rejected).

DPO: Rafailov et al. 2023, arXiv:2305.18290, eq. 7:
    L = -log sigma(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
The losses themselves are pure functions in `posttrain.losses.preference`; this module only computes the
sequence log-probs they take: one forward over chosen and rejected together (the batch is [chosen; rejected]),
through the shared log-prob routine, so prompt tokens and padding never contribute.

The reference (`posttrain.reference`, logged at start as `reference: <strategy>`): none for reference-free
losses (simpo, cpo, orpo, sft); precomputed with `precompute_ref_log_probs` (one pass before training, cached
on disk); the adapter-off policy with LoRA; otherwise a frozen copy of the starting policy or `ref_model:
PATH`, which TR-DPO (`sync_ref_model`, Gorbatovski et al. 2024, arXiv:2404.09656) moves towards the policy:
ref <- alpha * policy + (1 - alpha) * ref every `ref_model_sync_steps`. Evaluation scores against the same
reference, never the policy being trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from posttrain.config import TrainConfig, UserError, opt
from posttrain.data import encode_dataset, load_train_eval
from posttrain.data.tokenize import Encoded, encode_pair, truncate_pair
from posttrain.engine import Algorithm, Engine, Mean, reduce_metrics
from posttrain.logprobs import shared_prefix_token_logps, token_logps
from posttrain.losses.preference import (
    LOSS_OPTION_DEFAULTS,
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    ld_logps,
    preference_loss,
    wpo_weights,
)
from posttrain.models import prepare_model
from posttrain.parallel import is_main
from posttrain.reference import Reference, Sync, build

log = logging.getLogger("posttrain")

DEFAULT_DATASET = "arithmetic"


@dataclass
class PreferenceOptions:
    """The DPO family's loss and reference settings, shared by `dpo` (pairs from a dataset) and `online-dpo`
    (pairs sampled from the policy). A mixin of their configs."""

    loss_type: list[str] = opt(["sigmoid"], "Loss name(s); a list is a weighted sum (see loss_weights). Names as in TRL.")
    loss_weights: list[float] | None = opt(None, "Weights of the loss_type terms (default: all 1).")
    beta: float | None = opt(None, "Inverse temperature of the implicit reward (default 0.1; 2.5 for simpo).")
    label_smoothing: float = opt(0.0, "cDPO / robust DPO label-noise rate (0 <= eps < 0.5).")
    f_divergence: str = opt("reverse_kl", "f-DPO divergence.", ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
    f_alpha: float = opt(0.5, "Alpha of alpha_divergence (TRL's convention: 1 is reverse KL).")
    rpo_alpha: float | None = opt(None, "RPO: add alpha x NLL of the chosen completion.")
    ld_alpha: float | None = opt(None, "LD-DPO: weight of the log-probs of tokens past the shorter completion.")
    use_weighting: bool = opt(False, "WPO: weight pairs by the policy's own probability of them.")
    slic_delta: float = opt(LOSS_OPTION_DEFAULTS["slic_delta"], "hinge (SLiC) margin.")
    bco_delta: float = opt(LOSS_OPTION_DEFAULTS["bco_delta"], "bco_pair reward shift.")
    discopop_tau: float = opt(LOSS_OPTION_DEFAULTS["discopop_tau"], "DiscoPOP temperature.")
    simpo_gamma: float = opt(LOSS_OPTION_DEFAULTS["simpo_gamma"], "SimPO target margin.")
    cpo_alpha: float = opt(LOSS_OPTION_DEFAULTS["cpo_alpha"], "Weight of the chosen NLL in cpo and simpo (0: pure SimPO).")
    shared_prefix: bool = opt(True, "Run each prompt once for both sides of a pair (same numbers, less compute).")
    ref_model: str | None = opt(None, "Reference model path (default: the starting policy).")
    sync_ref_model: bool = opt(False, "TR-DPO: move the reference towards the policy during training.")
    ref_model_mixup_alpha: float = opt(0.6, "TR-DPO soft update weight (1.0 = hard copy).")
    ref_model_sync_steps: int = opt(512, "TR-DPO: update the reference every N optimizer steps.")

    def validate_preference(self) -> None:
        unknown = [n for n in self.loss_type if n not in PREFERENCE_LOSSES]
        if unknown:
            raise UserError(f"loss_type: unknown {unknown[0]!r}; valid: {', '.join(sorted(PREFERENCE_LOSSES))}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(f"loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types")
        if self.loss_weights is not None:  # `loss_weights=0.8,0.2` on the command line arrives as strings
            try:
                self.loss_weights = [float(w) for w in self.loss_weights]
            except (TypeError, ValueError):
                raise UserError(f"loss_weights: expected numbers, got {self.loss_weights}") from None
        if self.beta is None:
            self.beta = 2.5 if self.loss_type == ["simpo"] else 0.1
        if self.beta <= 0:
            raise UserError("beta must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError("label_smoothing must be in [0, 0.5)")
        if self.beta < 0.01 or self.beta > 1 and self.loss_type != ["simpo"]:
            log.warning(f"beta={self.beta} is outside the usual range [0.01, 1]")
        if self.sync_ref_model and (getattr(self, "precompute_ref_log_probs", False) or self.lora is not None):
            raise UserError("sync_ref_model needs a reference copy: not with precompute_ref_log_probs or lora")
        if self.sync_ref_model and self.reference_free():
            raise UserError(f"sync_ref_model: loss_type {self.loss_type} is reference-free; there is no reference to sync")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise UserError("ref_model_mixup_alpha must be in (0, 1]")
        if self.ref_model_sync_steps < 1:
            raise UserError("ref_model_sync_steps must be >= 1")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise UserError("ld_alpha must be in [0, 1] (1 = plain sums)")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise UserError("rpo_alpha must be >= 0")
        try:  # option/loss compatibility, checked on dummy tensors before any model is loaded
            z = torch.zeros(1)
            preference_loss(self.loss_type, z, z, z, z, chosen_lengths=z + 1, rejected_lengths=z + 1, **self.loss_kwargs())
        except ValueError as e:
            raise UserError(f"loss_type: {e}") from None

    def reference_free(self) -> bool:
        names = set(self.loss_type) | ({"sft"} if self.rpo_alpha else set())
        return names <= REFERENCE_FREE_LOSSES

    def loss_kwargs(self) -> dict:
        kw = dict(beta=self.beta, label_smoothing=self.label_smoothing, f_divergence=self.f_divergence,
                  f_alpha=self.f_alpha, loss_weights=self.loss_weights, rpo_alpha=self.rpo_alpha)
        for name, default in LOSS_OPTION_DEFAULTS.items():
            if getattr(self, name) != default:  # only options the user changed: others are loss-checked
                kw[name] = getattr(self, name)
        return kw


@dataclass
class Config(PreferenceOptions, TrainConfig):
    """Preference optimisation on (prompt, chosen, rejected) pairs: the DPO family and the reference-free
    SimPO / CPO / ORPO. `batch_size` and `micro_batch_size` count PAIRS. With no dataset: pairs from the
    built-in arithmetic task (correct answer chosen, a plausible wrong one rejected)."""

    precompute_ref_log_probs: bool = opt(False, "Score the data with the reference once, cache it, keep no reference in memory.")
    learning_rate: float | None = opt(None, "Peak learning rate (default 5e-7 full fine-tuning, 5e-6 with LoRA).")  # type: ignore[assignment]
    warmup_ratio: float = opt(0.1, "Fraction of the optimizer steps spent warming up linearly from 0.")
    max_length: int = opt(512, "Maximum tokens of prompt + completion, per side of the pair.")
    truncation_mode: str = opt("keep_start", "A side over max_length keeps its first tokens (keep_start: the "
                               "completion's end is cut) or its last (keep_end: the prompt's start is cut).",
                               ("keep_start", "keep_end"))
    precompute_ref_batch_size: int | None = opt(None, "Pairs per forward of the precompute_ref_log_probs pass "
                                                "(default: eval_batch_size).")
    command = "dpo"
    demo = {"max_steps": 30, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 2e-6,
            "eval_dataset": "arithmetic:split=test,n=64"}

    def validate(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = 5e-6 if self.lora is not None else 5e-7
        super().validate()
        self.validate_preference()


@dataclass
class Pair:
    """One preference pair, tokenized: each side is prompt + completion (mask on the completion), and the
    reference's summed log-probs of each side once precomputed."""

    chosen: Encoded
    rejected: Encoded
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class PairBatch:
    """[chosen; rejected] stacked: rows 0..B-1 chosen, B..2B-1 rejected, right-padded to one width.

    input_ids, attention_mask, loss_mask  [2B, T]
    ref_logps                              [2B] precomputed reference sums, or None
    prompts                                the B prompts (token ids), shared by both sides of a pair
    completion_ids, completion_mask        [2B, Tc] the completions alone, right-padded
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    ref_logps: torch.Tensor | None
    prompts: list | None = None
    completion_ids: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def encode_preference(tok, data: dict, max_length: int, max_prompt_length: int | None,
                      truncation_mode: str = "keep_start") -> Pair | None:
    """A row's two sides, each prompt + completion with the loss mask on the completion; None when the prompt
    alone fills max_length."""
    sides = []
    for key in ("chosen", "rejected"):
        pair = truncate_pair(*encode_pair(tok, data["prompt"], data[key]), max_length, max_prompt_length,
                             truncation_mode)
        if pair is None:
            return None
        p, c = pair
        sides.append(Encoded(p + c, [0] * len(p) + [1] * len(c)))
    return Pair(*sides)


def collate_pairs(pairs: list[Pair], pad_id: int) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s.input_ids)
        attn[i, : len(s)] = 1
        mask[i, : len(s)] = torch.tensor(s.mask)
    ref = None
    if pairs[0].ref_chosen is not None:
        ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
    # The same pair split at the prompt boundary, for the shared-prefix forward (prompt run once per pair).
    starts = [s.mask.index(1) for s in seqs]
    c_width = max(len(s) - st for s, st in zip(seqs, starts))
    c_ids = torch.full((len(seqs), c_width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(seqs), c_width), dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        c_ids[i, : len(s) - st] = torch.tensor(s.input_ids[st:])
        c_mask[i, : len(s) - st] = torch.tensor(s.mask[st:])
    prompts = [p.chosen.input_ids[: starts[i]] for i, p in enumerate(pairs)]
    return PairBatch(ids, attn, mask, ref, prompts, c_ids, c_mask)


class DPO(Algorithm):
    def __init__(self, cfg: Config, pad_id: int, reference: Reference):
        self.cfg, self.pad_id, self.reference = cfg, pad_id, reference
        self.kwargs = cfg.loss_kwargs()

    def prepare(self, model, examples: list) -> list:
        size = self.cfg.micro_batch_size
        return [collate_pairs(examples[i : i + size], self.pad_id) for i in range(0, len(examples), size)]

    def _sequence_logps(self, model, mb: PairBatch, with_stats: bool | tuple[str, ...]):
        if self.cfg.shared_prefix and mb.prompts is not None:
            B = len(mb)
            rows = torch.arange(B).repeat(2)  # chosen rows, then rejected rows, each continuing prompt i
            out = shared_prefix_token_logps(model, mb.prompts, rows, mb.completion_ids, mb.completion_mask,
                                            self.pad_id, with_stats=with_stats)
        else:
            out = token_logps(model, mb.input_ids, mb.attention_mask, mb.loss_mask, with_stats=with_stats)
        lengths = out.counts()
        if self.cfg.ld_alpha is not None:
            B = len(mb)
            other = torch.cat([lengths[B:], lengths[:B]])
            sums = ld_logps(out.logps, out.mask, other, self.cfg.ld_alpha)
        else:
            sums = out.sums()
        return sums, lengths, out

    def reference_logps(self, model, mb: PairBatch) -> torch.Tensor | None:
        """[2B] reference sums of the batch (None without a reference), scored exactly as the policy's."""
        return self.reference.logps(model, lambda m: self._sequence_logps(m, mb, False)[0], stored=mb.ref_logps)

    def precompute_reference(self, model, *datasets: list[Pair]) -> list[str]:
        """With the precomputed strategy: fill every pair's ref_chosen / ref_rejected (one reference pass, or
        the disk cache) and release the reference model. Returns where each dataset's values came from."""

        def score(ref, pairs):  # [chosen, rejected] per pair
            return self._sequence_logps(ref, collate_pairs(pairs, self.pad_id), False)[0].view(2, -1).t()

        def store(pair, values):
            pair.ref_chosen, pair.ref_rejected = values

        return self.reference.precompute(model, datasets, name="dpo", settings={"ld_alpha": self.cfg.ld_alpha},
                                         sequences=lambda p: (p.chosen, p.rejected), score=score, store=store,
                                         size=self.cfg.precompute_ref_batch_size or self.cfg.eval_batch_size)

    def _compute(self, model, mb: PairBatch):
        """(per-pair losses [B], metrics: means over the B pairs)."""
        B = len(mb)
        ref = self.reference_logps(model, mb)
        stats = ("logits_mean", "log_p2") if self.cfg.use_weighting else ("logits_mean",)
        logps, lengths, out = self._sequence_logps(model, mb, with_stats=stats)
        if ref is not None:
            ref = ref.to(logps.device)  # precomputed values live on the CPU; the policy may run on a GPU
        weights = None
        if self.cfg.use_weighting:
            # WPO: mean over tokens of (log p - log sum_v p_v^2), chosen + rejected, exp, clamped at 0.
            adjusted = ((out.logps - out.log_p2) * out.mask).sum(-1) / lengths.clamp(min=1)
            weights = wpo_weights(adjusted[:B], adjusted[B:])
        res = preference_loss(
            self.cfg.loss_type,
            logps[:B],
            logps[B:],
            None if ref is None else ref[:B],
            None if ref is None else ref[B:],
            chosen_lengths=lengths[:B],
            rejected_lengths=lengths[B:],
            weights=weights,
            **self.kwargs,
        )
        # TRL's logits/*: the mean logit over every scored token of the side (token-weighted within the
        # micro-batch; across micro-batches weighted by pairs, as every metric here).
        logit_sums = (out.logits_mean * out.mask).sum(-1)
        chosen_logits = logit_sums[:B].sum() / lengths[:B].sum().clamp(min=1)
        rejected_logits = logit_sums[B:].sum() / lengths[B:].sum().clamp(min=1)
        metrics = {
            "rewards/chosen": res.chosen_rewards.mean(),
            "rewards/rejected": res.rejected_rewards.mean(),
            "rewards/margins": (res.chosen_rewards - res.rejected_rewards).mean(),
            "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).float().mean(),
            "logps/chosen": logps[:B].detach().mean(),
            "logps/rejected": logps[B:].detach().mean(),
            "logits/chosen": chosen_logits,
            "logits/rejected": rejected_logits,
        }
        for k, v in res.metrics.items():
            metrics[k] = v.detach().float().mean()
        return res.losses, {k: Mean(v, B) for k, v in metrics.items()}

    def loss(self, model, mb: PairBatch, total_items: float):
        losses, metrics = self._compute(model, mb)
        return losses.sum() / total_items, metrics

    def evaluate(self, model, examples: list) -> dict:
        parts = []
        size = self.cfg.eval_batch_size  # eval holds no activations for backward: bigger batches than training
        for i in range(0, len(examples), size):
            mb = collate_pairs(examples[i : i + size], self.pad_id)
            losses, metrics = self._compute(model, mb)
            parts.append({"loss": Mean(float(losses.sum()) / len(mb), len(mb)), **metrics})
        return reduce_metrics(parts)


def run(cfg: Config):
    train, evald = load_train_eval(cfg, "preference", DEFAULT_DATASET)
    tok, model = prepare_model(cfg)
    if {"orpo"} & set(cfg.loss_type) and not tok.chat_template:
        log.warning("ORPO on a model without a chat template (a base model?): it can learn the preferences "
                    "but lose instruction following; start from an instruction-tuned model")

    def encode(data):
        return encode_preference(tok, data, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)

    pairs = encode_dataset(train, encode)
    eval_pairs = encode_dataset(evald, encode) if evald else None

    sync = Sync(cfg.ref_model_sync_steps, cfg.ref_model_mixup_alpha) if cfg.sync_ref_model else None
    reference = build(model, needed=not cfg.reference_free(), path=cfg.ref_model, model_path=cfg.model,
                      precompute=cfg.precompute_ref_log_probs, sync=sync, trust_remote_code=cfg.trust_remote_code,
                      dtype=cfg.dtype)
    algo = DPO(cfg, tok.pad_token_id, reference)
    algo.precompute_reference(model, pairs, *([eval_pairs] if eval_pairs else []))
    if is_main():
        log.info(f"dpo: loss {'+'.join(cfg.loss_type)}, beta {cfg.beta}, reference: {reference.strategy}")
    return Engine(cfg, model, tok, algo, pairs, eval_pairs).train()
