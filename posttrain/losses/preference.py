"""Preference losses (the DPO family, SimPO, CPO, ORPO) as pure functions of sequence log-probs.

Every loss sees the same inputs: per-example SUMS of completion-token log-probs of the policy
(`chosen_logps`, `rejected_logps`, shape [B]), the same sums under the reference model when the loss
needs one, and completion token counts (`chosen_lengths`, `rejected_lengths`) for the losses that
average over tokens. Names, formulas and defaults follow Hugging Face TRL (`DPOTrainer` >= 1.0,
`CPOTrainer`, `ORPOTrainer`); each loss docstring names its paper and says where we differ from TRL.

Notation used in the docstrings (per example):
    c_s, r_s   policy/reference log-ratios  c = logp(y_w) - ref_logp(y_w),  r = logp(y_l) - ref_logp(y_l),
               passed through the f-divergence transform (identity for reverse KL, i.e. plain DPO)
    h          c_s - r_s   (TRL's `delta_score`; with reverse KL: (pi_w - pi_l) - (ref_w - ref_l))
    sigma      the logistic function, log sigma = F.logsigmoid
    eps        label_smoothing
Per-example losses are returned unreduced ([B]); the caller owns the reduction (mean over the global
batch), so gradient accumulation and data parallelism see the same numbers as one big batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Options only some losses read, with TRL's defaults. Passing one that no selected loss reads is an error.
LOSS_OPTION_DEFAULTS: dict[str, float] = {
    "slic_delta": 1.0,  # hinge margin (TRL hard-codes 1)
    "bco_delta": 0.0,  # bco_pair reward shift (TRL 0.x: a running mean of rewards; TRL >= 1.0: 0)
    "discopop_tau": 0.05,  # DiscoPOP temperature (TRL default, recommended by the paper)
    "simpo_gamma": 0.5,  # SimPO target reward margin (TRL CPOConfig default)
    "cpo_alpha": 1.0,  # weight of the chosen NLL in cpo and simpo (TRL CPOConfig default)
}

# Clamp on the exponent of the alpha-divergence transform so exp() stays finite (TRL's values, plus f64).
_ALPHA_EXP_MAX = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


@dataclass
class PreferenceLossOutput:
    """What a preference loss returns. All tensors are [B] unless a metric says otherwise.

    losses:            per-example total loss (weighted sum of the terms), differentiable.
    chosen_rewards:    detached implicit reward of the chosen completion. Reference-based losses:
                       beta * (chosen_logps - ref_chosen_logps). Reference-free losses report their own
                       implicit reward: simpo and orpo beta * average log-prob, cpo beta * log-prob.
    rejected_rewards:  the same for the rejected completion.
    metrics:           detached per-example terms, e.g. "nll_loss" (cpo, simpo, orpo, sft, rpo_alpha),
                       "log_odds_ratio" and "log_odds_chosen" (orpo), "<name>_loss" for each term of a
                       multi-term loss. Take `.mean()` over the batch for the value TRL logs.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class LossTerm(NamedTuple):
    """What one registry entry returns: (losses [B], chosen_rewards [B], rejected_rewards [B], metrics)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True)
class PreferenceInputs:
    """Everything a registered loss may read: the log-prob tensors, the shared options, and the
    loss-specific options (`options`, defaults filled in). Helpers derive the common quantities."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    options: dict[str, float] = field(default_factory=lambda: dict(LOSS_OPTION_DEFAULTS))

    def logratios(self) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) policy-minus-reference log-ratios."""
        if self.ref_chosen_logps is None or self.ref_rejected_logps is None:
            raise ValueError("this loss needs ref_chosen_logps and ref_rejected_logps")
        return self.chosen_logps - self.ref_chosen_logps, self.rejected_logps - self.ref_rejected_logps

    def logratios_or_uniform(self) -> tuple[Tensor, Tensor]:
        """Log-ratios, against a uniform reference (log-prob 0) when no reference is given."""
        if self.ref_chosen_logps is None or self.ref_rejected_logps is None:
            return self.chosen_logps, self.rejected_logps
        return self.logratios()

    def scores(self) -> tuple[Tensor, Tensor]:
        """Log-ratios mapped through f'(u) of the f-divergence (f-DPO: Wang et al., 2023, "Beyond Reverse KL:
        Generalizing Direct Preference Optimization with Diverse Divergence Constraints", arXiv:2309.16240,
        Theorem 1: the DPO logit becomes f'(u_w) - f'(u_l), u = pi/ref), with the additive constant chosen so
        that f'(1) = 0, as TRL >= 1.0 does:

        reverse_kl        f'(u) = log u                  -> x             (x = log u, plain DPO)
        forward_kl        f'(u) = 1 - 1/u                -> 1 - exp(-x)
        js_divergence     f'(u) = log(2u / (1 + u))      -> log 2 + log sigma(x)
        alpha_divergence  f'(u) = (u^(a-1) - 1) / (a-1)  -> expm1((a-1) x) / (a-1),  a = f_alpha

        Why the constant matters: the paper defines the implicit reward only up to a constant (its f' for
        reverse KL is log u + 1, for forward KL -1/u), which cancels in c_s - r_s. It does not cancel once a
        loss divides each side by its length (ipo, sigmoid_norm): there a constant k adds k (1/|y_w| - 1/|y_l|),
        a preference for one length over the other already at the reference policy (u = 1). With f'(1) = 0 the
        reference policy scores 0 on every completion under every divergence, as DPO's log u does, and the
        alpha family is continuous in a: a -> 1 gives log u (reverse KL), a = 0 gives forward KL.
        (posttrain before this change dropped the constants instead, which agreed with TRL except there.)

        f_alpha follows TRL >= 1.0, where f_alpha = 1 - (the paper's alpha): |f_alpha - 1| < 1e-6 is treated
        as exactly reverse KL, as TRL does. TRL 0.x used the paper's alpha; the two agree at the default 0.5.
        """
        c, r = self.logratios()
        kind = self.f_divergence
        if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(self.f_alpha - 1.0) < 1e-6):
            return c, r
        if kind == "forward_kl":
            return -torch.expm1(-c), -torch.expm1(-r)
        if kind == "js_divergence":
            return math.log(2) + F.logsigmoid(c), math.log(2) + F.logsigmoid(r)
        a1 = self.f_alpha - 1.0
        cap = _ALPHA_EXP_MAX.get(c.dtype, 80.0)
        return torch.expm1((a1 * c).clamp(max=cap)) / a1, torch.expm1((a1 * r).clamp(max=cap)) / a1

    def lengths(self) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) completion token counts as floats, at least 1 (TRL clamps the same way)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError("this loss needs chosen_lengths and rejected_lengths (completion token counts)")
        dtype = self.chosen_logps.dtype
        return self.chosen_lengths.to(dtype).clamp(min=1), self.rejected_lengths.to(dtype).clamp(min=1)

    def average_logps(self) -> tuple[Tensor, Tensor]:
        """Per-token average policy log-probs (chosen, rejected)."""
        lc, lr = self.lengths()
        return self.chosen_logps / lc, self.rejected_logps / lr

    def chosen_nll(self) -> Tensor:
        """Per-example mean negative log-likelihood of the chosen completion, -logp(y_w) / |y_w|."""
        if self.chosen_lengths is None:
            raise ValueError("the chosen NLL term needs chosen_lengths (completion token counts)")
        return -self.chosen_logps / self.chosen_lengths.to(self.chosen_logps.dtype).clamp(min=1)

    def reference_rewards(self) -> tuple[Tensor, Tensor]:
        """DPO implicit rewards beta * log-ratio, detached (what TRL logs as rewards/chosen|rejected)."""
        c, r = self.logratios()
        return (self.beta * c).detach(), (self.beta * r).detach()


# Why only some losses take an f-divergence: f-DPO's reparameterisation gives the reward
# beta f'(pi/ref) + beta log Z(x) (Wang et al. 2023, arXiv:2309.16240, Theorem 1), and log Z(x) cancels only in
# the chosen-minus-rejected difference. Losses that read the chosen or rejected log-ratio on its own (nca_pair,
# bco_pair, sppo_hard, apo_zero, apo_down) or sort them (aot, aot_unpaired) have no f-divergence form; asking
# for one is an error here, as in TRL >= 1.0 (which accepts it for the same set: sigmoid, sigmoid_norm, hinge,
# ipo, exo_pair, robust, discopop).

LossFn = Callable[[PreferenceInputs], LossTerm]
PREFERENCE_LOSSES: dict[str, LossFn] = {}
REFERENCE_FREE_LOSSES: set[str] = set()


def register_preference_loss(name: str, uses: tuple[str, ...] = (), reference_free: bool = False,
                             lengths: tuple[str, ...] = ()):
    """Register `fn(PreferenceInputs) -> LossTerm` under `name` (a name registered twice is an error).

    uses             the options it reads ("label_smoothing", "f_divergence", or keys of
                     LOSS_OPTION_DEFAULTS); setting any other is rejected
    reference_free   it needs no reference log-probs
    lengths          the completion lengths it cannot run without: ("chosen", "rejected"), ("chosen",) or ()
                     (a loss whose need depends on an option, as cpo's NLL term, checks for itself)
    Declared on the function as `fn.uses`, `fn.lengths`, `fn.reference_free`."""

    def wrap(fn: LossFn) -> LossFn:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is already registered")
        unknown = set(lengths) - {"chosen", "rejected"}
        if unknown:
            raise ValueError(f"lengths: {sorted(unknown)} are not completion sides (chosen, rejected)")
        fn.uses = frozenset(uses)  # type: ignore[attr-defined]
        fn.lengths = tuple(lengths)  # type: ignore[attr-defined]
        fn.reference_free = reference_free  # type: ignore[attr-defined]
        PREFERENCE_LOSSES[name] = fn
        if reference_free:
            REFERENCE_FREE_LOSSES.add(name)
        return fn

    return wrap


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with labels flipped w.p. eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _term(losses: Tensor, rewards: tuple[Tensor, Tensor], **metrics: Tensor) -> LossTerm:
    return LossTerm(losses, rewards[0], rewards[1], {k: v.detach() for k, v in metrics.items()})


# ---------------------------------------------------------------- reference-based losses


@register_preference_loss("sigmoid", uses=("label_smoothing", "f_divergence"))
def _sigmoid(x: PreferenceInputs) -> LossTerm:
    """DPO: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn, 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", arXiv:2305.18290, Eq. 7:  -log sigma(beta h).
    label_smoothing eps > 0 gives conservative DPO (Mitchell, 2023, "A note on DPO with noisy
    preferences & relationship to IPO", Eq. 3): -(1-eps) log sigma(beta h) - eps log sigma(-beta h),
    as TRL 0.x; TRL >= 1.0 dropped eps from this loss (identical at eps = 0)."""
    c, r = x.scores()
    return _term(_smoothed_logistic(x.beta * (c - r), x.label_smoothing), x.reference_rewards())


@register_preference_loss("hinge", uses=("f_divergence", "slic_delta"))
def _hinge(x: PreferenceInputs) -> LossTerm:
    """SLiC-HF: Zhao, Joshi, Liu, Khalman, Saleh, Liu, 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback", arXiv:2305.10425, calibration loss max(0, delta - beta h) with margin
    delta = slic_delta (TRL fixes delta = 1; here with the reference log-ratio as in TRL)."""
    c, r = x.scores()
    return _term(torch.relu(x.options["slic_delta"] - x.beta * (c - r)), x.reference_rewards())


@register_preference_loss("ipo", uses=("f_divergence",), lengths=("chosen", "rejected"))
def _ipo(x: PreferenceInputs) -> LossTerm:
    """IPO: Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos, 2023, "A General Theoretical Paradigm
    to Understand Learning from Human Preferences", arXiv:2310.12036, Eq. 17 with tau = beta:
    (h_avg - 1/(2 beta))^2, where h_avg = c_s/|y_w| - r_s/|y_l| uses per-token averaged log-ratios,
    as TRL >= 1.0 does (confirmed there with the IPO authors; TRL 0.x used sums)."""
    c, r = x.scores()
    lc, lr = x.lengths()
    return _term((c / lc - r / lr - 1 / (2 * x.beta)) ** 2, x.reference_rewards())


@register_preference_loss("exo_pair", uses=("label_smoothing", "f_divergence"))
def _exo_pair(x: PreferenceInputs) -> LossTerm:
    """EXO (pairwise): Ji, Zhou, Zhang, Mao, Yang, Fu, Huang, 2024, "Towards Efficient Exact Optimization
    of Language Model Alignment", arXiv:2402.00856, Eq. 16: KL(q || p) over {chosen, rejected} with
    q = (sigma(beta h), sigma(-beta h)) and target p = (1 - eps, eps):
    sigma(z) (log sigma(z) - log(1-eps)) + sigma(-z) (log sigma(-z) - log eps),  z = beta h.
    eps = label_smoothing must be in (0, 1); the paper uses 1e-3 (TRL 0.x silently replaced 0 by 1e-3,
    here 0 is an error)."""
    eps = x.label_smoothing
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {eps}")
    c, r = x.scores()
    z = x.beta * (c - r)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _term(losses, x.reference_rewards())


@register_preference_loss("nca_pair")
def _nca_pair(x: PreferenceInputs) -> LossTerm:
    """NCA (pairwise): Chen, Li, Su, Zhu, Chen, Yang, Zhao, 2024, "Noise Contrastive Alignment of
    Language Models with Explicit Rewards", arXiv:2402.05369:
    -log sigma(beta c) - 1/2 log sigma(-beta c) - 1/2 log sigma(-beta r). No f-divergence (see the note above
    the registry)."""
    c, r = x.logratios()
    losses = -F.logsigmoid(x.beta * c) - 0.5 * F.logsigmoid(-x.beta * c) - 0.5 * F.logsigmoid(-x.beta * r)
    return _term(losses, x.reference_rewards())


@register_preference_loss("robust", uses=("label_smoothing", "f_divergence"))
def _robust(x: PreferenceInputs) -> LossTerm:
    """Robust DPO: Chowdhury, Kini, Natarajan, 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback", arXiv:2403.00409, the unbiased loss under label-flip rate eps:
    ((1-eps) L(w, l) - eps L(l, w)) / (1 - 2 eps),  L(w, l) = -log sigma(beta h).  eps in [0, 0.5)."""
    eps = x.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust needs label_smoothing (the flip rate) in [0, 0.5), got {eps}")
    c, r = x.scores()
    z = x.beta * (c - r)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _term(losses, x.reference_rewards())


@register_preference_loss("bco_pair", uses=("bco_delta",))
def _bco_pair(x: PreferenceInputs) -> LossTerm:
    """BCO (pairwise): Jung, Han, Kim, Kim, Lee, Hwang, 2024, "Binary Classifier Optimization for Large
    Language Model Alignment", arXiv:2404.04656: a binary classifier on the implicit reward shifted by
    delta, -log sigma(beta c_s - delta) - log sigma(-(beta r_s - delta)). The paper (and TRL 0.x) take
    delta as a running mean of the rewards, which is state; this pure function takes it as the option
    `bco_delta` (default 0, which is what TRL >= 1.0 uses). No f-divergence (see the note above the registry)."""
    c, r = x.logratios()
    d = x.options["bco_delta"]
    losses = -F.logsigmoid(x.beta * c - d) - F.logsigmoid(-(x.beta * r - d))
    return _term(losses, x.reference_rewards())


@register_preference_loss("sppo_hard")
def _sppo_hard(x: PreferenceInputs) -> LossTerm:
    """SPPO with hard labels: Wu, Sun, Yuan, Ji, Yang, Gu, 2024, "Self-Play Preference Optimization for
    Language Model Alignment", arXiv:2405.00675, Eq. 4.7 with the win probability set to 1 for the
    chosen and 0 for the rejected completion: (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2. No f-divergence."""
    c, r = x.logratios()
    losses = (c - 0.5 / x.beta) ** 2 + (r + 0.5 / x.beta) ** 2
    return _term(losses, x.reference_rewards())


@register_preference_loss("aot", uses=("label_smoothing",))
def _aot(x: PreferenceInputs) -> LossTerm:
    """AOT (paired): Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin, Greenewald, Navratil, Ross,
    2024, "Distributional Preference Alignment of LLMs via Optimal Transport", arXiv:2406.05882:
    first-order stochastic dominance via the 1-D optimal transport plan, i.e. sort the batch of policy
    margins (pi_w - pi_l) and of reference margins (ref_w - ref_l) separately, pair them by rank, and
    apply the (smoothed) logistic loss to beta * (sorted_pi - sorted_ref). Entry i of the result is the
    i-th ranked pair, not example i. No f-divergence (TRL applies none here)."""
    if x.ref_chosen_logps is None or x.ref_rejected_logps is None:
        raise ValueError("aot needs ref_chosen_logps and ref_rejected_logps")
    pi = torch.sort(x.chosen_logps - x.rejected_logps, dim=0).values
    ref = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0).values
    return _term(_smoothed_logistic(x.beta * (pi - ref), x.label_smoothing), x.reference_rewards())


@register_preference_loss("aot_unpaired", uses=("label_smoothing",))
def _aot_unpaired(x: PreferenceInputs) -> LossTerm:
    """AOT (unpaired): Melnyk et al., 2024, arXiv:2406.05882: sort the chosen log-ratios and the rejected
    log-ratios separately across the batch, pair by rank, and apply the (smoothed) logistic loss to
    beta * (sorted_c - sorted_r). Entry i is the i-th ranked pair. TRL 0.x called this `aot_pair`."""
    c, r = x.logratios()
    d = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
    return _term(_smoothed_logistic(x.beta * d, x.label_smoothing), x.reference_rewards())


@register_preference_loss("apo_zero")
def _apo_zero(x: PreferenceInputs) -> LossTerm:
    """APO-zero: D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri, 2024, "Anchored
    Preference Optimization and Contrastive Revisions", arXiv:2408.06266, Eq. 7:
    1 - sigma(beta c) + sigma(beta r) (raw log-ratios). Use when the chosen outputs are better than
    the model's own: raises chosen and lowers rejected likelihood."""
    c, r = x.logratios()
    return _term(1 - torch.sigmoid(x.beta * c) + torch.sigmoid(x.beta * r), x.reference_rewards())


@register_preference_loss("apo_down")
def _apo_down(x: PreferenceInputs) -> LossTerm:
    """APO-down: D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 8: sigma(beta c) + 1 - sigma(beta h).
    Use when the chosen outputs are worse than the model's own: lowers both likelihoods, the rejected
    one more. No f-divergence: its first term reads c on its own (see the note above the registry)."""
    c, r = x.logratios()
    return _term(torch.sigmoid(x.beta * c) + 1 - torch.sigmoid(x.beta * (c - r)), x.reference_rewards())


@register_preference_loss("discopop", uses=("f_divergence", "discopop_tau"))
def _discopop(x: PreferenceInputs) -> LossTerm:
    """DiscoPOP / log-ratio modulated loss: Lu, Holt, Fanconi, Chan, Foerster, van der Schaar, Lange,
    2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    arXiv:2406.08414, Eq. 5: with z = beta h and m = sigma(z / tau),
    (1 - m) (-log sigma(z)) + m exp(-z);  tau = discopop_tau (default 0.05)."""
    c, r = x.scores()
    z = x.beta * (c - r)
    m = torch.sigmoid(z / x.options["discopop_tau"])
    return _term(-F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m, x.reference_rewards())


@register_preference_loss("sigmoid_norm", uses=("f_divergence",), lengths=("chosen", "rejected"))
def _sigmoid_norm(x: PreferenceInputs) -> LossTerm:
    """Length-normalised DPO: the DPO loss on per-token averaged log-ratios, -log sigma(beta h_avg),
    h_avg = c_s/|y_w| - r_s/|y_l| (Lambert et al., 2024, "Tulu 3: Pushing Frontiers in Open Language
    Model Post-Training", arXiv:2411.15124, length-normalised DPO; the normalisation SimPO,
    arXiv:2405.14734, applies without a reference). TRL's `sigmoid_norm`."""
    c, r = x.scores()
    lc, lr = x.lengths()
    return _term(-F.logsigmoid(x.beta * (c / lc - r / lr)), x.reference_rewards())


@register_preference_loss("sft", reference_free=True, lengths=("chosen",))
def _sft(x: PreferenceInputs) -> LossTerm:
    """Negative log-likelihood of the chosen completion, -logp(y_w) / |y_w| per example: the SFT term
    of MPO (Wang et al., 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
    Mixed Preference Optimization", arXiv:2411.10442) and RPO (Pang, Yuan, Cho, He, Sukhbaatar, Weston,
    2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733). TRL averages over all chosen
    tokens of the batch instead; the two agree when chosen lengths are equal. Rewards: beta times the
    log-ratio, against a uniform reference when none is given."""
    nll = x.chosen_nll()
    c, r = x.logratios_or_uniform()
    return _term(nll, ((x.beta * c).detach(), (x.beta * r).detach()), nll_loss=nll)


# ---------------------------------------------------------------- reference-free losses


@register_preference_loss("simpo", uses=("label_smoothing", "simpo_gamma", "cpo_alpha"), reference_free=True,
                          lengths=("chosen", "rejected"))
def _simpo(x: PreferenceInputs) -> LossTerm:
    """SimPO: Meng, Xia, Chen, 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734, Eq. 6: -log sigma(beta (avg_w - avg_l) - gamma), avg = logp / |y|,
    gamma = simpo_gamma; label smoothing and the cpo_alpha * NLL term as in TRL's CPOTrainer with
    loss_type="simpo" (cpo_alpha defaults to 1.0 there and here: that is CPO-SimPO; set cpo_alpha=0 for
    pure SimPO). Rewards: beta * avg."""
    aw, al = x.average_logps()
    losses = _smoothed_logistic(x.beta * (aw - al) - x.options["simpo_gamma"], x.label_smoothing)
    nll = x.chosen_nll()
    if x.options["cpo_alpha"] != 0:
        losses = losses + x.options["cpo_alpha"] * nll
    return _term(losses, ((x.beta * aw).detach(), (x.beta * al).detach()), nll_loss=nll)


@register_preference_loss("cpo", uses=("label_smoothing", "cpo_alpha"), reference_free=True)
def _cpo(x: PreferenceInputs) -> LossTerm:
    """CPO: Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim, 2024, "Contrastive Preference
    Optimization: Pushing the Boundaries of LLM Performance in Machine Translation", arXiv:2401.08417,
    Eq. 3 (reference-free DPO on summed log-probs) plus the NLL of the chosen completion:
    -(1-eps) log sigma(beta (logp_w - logp_l)) - eps log sigma(-beta (...)) + cpo_alpha * NLL(y_w).
    NLL is the per-example token mean (TRL: the mean over all chosen tokens of the batch). Rewards:
    beta * logp. metrics["nll_loss"] is reported when lengths are given."""
    z = x.beta * (x.chosen_logps - x.rejected_logps)
    losses = _smoothed_logistic(z, x.label_smoothing)
    metrics = {}
    if x.chosen_lengths is not None:
        metrics["nll_loss"] = x.chosen_nll()
        losses = losses + x.options["cpo_alpha"] * metrics["nll_loss"]
    elif x.options["cpo_alpha"] != 0:
        raise ValueError("cpo with cpo_alpha != 0 needs chosen_lengths for its NLL term")
    rewards = ((x.beta * x.chosen_logps).detach(), (x.beta * x.rejected_logps).detach())
    return _term(losses, rewards, **metrics)


@register_preference_loss("orpo", reference_free=True, lengths=("chosen", "rejected"))
def _orpo(x: PreferenceInputs) -> LossTerm:
    """ORPO: Hong, Lee, Thorne, 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691, Eq. 6-7: NLL(y_w) - lambda log sigma(log odds_w - log odds_l), with
    lambda = beta (TRL's name) and odds(y) = P / (1 - P) on per-token average probabilities:
    log_odds = (avg_w - avg_l) - (log(1 - e^avg_w) - log(1 - e^avg_l)).
    NLL is -avg_w per example (TRL: the mean over all chosen tokens, prompt included).
    Rewards: beta * avg. metrics: nll_loss, log_odds_ratio = log sigma(log_odds), log_odds_chosen."""
    aw, al = x.average_logps()
    # An average of exactly 0 (every token certain) makes log(1 - e^0) = -inf and the loss NaN (in TRL
    # too); capping at -eps changes nothing for any other value and keeps the loss finite.
    cap = -torch.finfo(aw.dtype).eps
    aw, al = aw.clamp(max=cap), al.clamp(max=cap)
    # log(1 - e^a) as log(-expm1(a)): accurate for a near 0, where log1p(-exp(a)) loses digits.
    log_odds = (aw - al) - (torch.log(-torch.expm1(aw)) - torch.log(-torch.expm1(al)))
    ratio = F.logsigmoid(log_odds)
    nll = -aw
    rewards = ((x.beta * aw).detach(), (x.beta * al).detach())
    return _term(nll - x.beta * ratio, rewards, nll_loss=nll, log_odds_ratio=ratio, log_odds_chosen=log_odds)


# ---------------------------------------------------------------- dispatcher


def preference_loss(
    loss_type: str | list[str],
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    loss_weights: list[float] | None = None,
    rpo_alpha: float | None = None,
    weights: Tensor | None = None,
    **loss_specific_options: float,
) -> PreferenceLossOutput:
    """Compute one preference loss by name, or a weighted sum of several.

    loss_type:      a name in PREFERENCE_LOSSES, or a list of names combined as sum_i loss_weights[i] * L_i
                    (loss_weights defaults to all 1.0); e.g. MPO = ["sigmoid", "bco_pair", "sft"] with
                    loss_weights [0.8, 0.2, 1.0]. Rewards come from the first term.
    *_logps:        [B] sums of completion-token log-probs (policy and, unless every term is
                    reference-free, reference).
    *_lengths:      [B] completion token counts, needed by ipo, sigmoid_norm, simpo, orpo, sft (and cpo
                    with cpo_alpha != 0).
    rpo_alpha:      adds the `sft` term with this weight (RPO, arXiv:2404.19733); metrics["nll_loss"].
    weights:        [B] per-example weights multiplying the total (WPO: see `wpo_weights`); treated as
                    constants (detached).
    label_smoothing, f_divergence, f_alpha, and loss_specific_options (slic_delta, bco_delta,
    discopop_tau, simpo_gamma, cpo_alpha) are each read only by some losses; setting one that no
    selected term reads raises ValueError (in a list, one reader is enough).
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ValueError("loss_type is empty")
    unknown = [n for n in names if n not in PREFERENCE_LOSSES]
    if unknown:
        raise ValueError(f"unknown preference loss {unknown}; valid names: {sorted(PREFERENCE_LOSSES)}")
    if loss_weights is None:
        loss_weights = [1.0] * len(names)
    elif len(loss_weights) != len(names):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(names)} loss types {names}")
    terms = list(zip(names, loss_weights))
    if rpo_alpha is not None:
        terms.append(("sft", float(rpo_alpha)))

    _check_options(names, terms, label_smoothing, f_divergence, f_alpha, loss_specific_options)
    inputs = PreferenceInputs(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence=f_divergence,
        f_alpha=f_alpha,
        options={**LOSS_OPTION_DEFAULTS, **loss_specific_options},
    )
    _check_inputs(terms, inputs)
    total, metrics, rewards = 0.0, {}, None
    for name, w in terms:
        term = PREFERENCE_LOSSES[name](inputs)
        total = total + w * term.losses
        if rewards is None:
            rewards = (term.chosen_rewards, term.rejected_rewards)
        for k, v in term.metrics.items():
            metrics.setdefault(k, v)
        if len(terms) > 1:
            metrics[f"{name}_loss"] = term.losses.detach()
    if weights is not None:
        total = total * weights.detach()
    return PreferenceLossOutput(total, rewards[0], rewards[1], metrics)


def _check_options(names, terms, label_smoothing, f_divergence, f_alpha, loss_specific_options) -> None:
    """Reject unknown options and options that no selected term reads."""
    bad_keys = sorted(set(loss_specific_options) - set(LOSS_OPTION_DEFAULTS))
    if bad_keys:
        raise ValueError(f"unknown loss option(s) {bad_keys}; known: {sorted(LOSS_OPTION_DEFAULTS)}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence {f_divergence!r}; valid: {list(F_DIVERGENCES)}")
    if f_alpha != 0.5 and f_divergence != "alpha_divergence":
        raise ValueError(f"f_alpha={f_alpha} is only read with f_divergence='alpha_divergence'")
    readers = set().union(*(PREFERENCE_LOSSES[n].uses for n, _ in terms))
    set_options = list(loss_specific_options)
    if label_smoothing != 0.0:
        set_options.append("label_smoothing")
    if f_divergence != "reverse_kl":
        set_options.append("f_divergence")
    for opt in set_options:
        if opt not in readers:
            users = sorted(n for n, fn in PREFERENCE_LOSSES.items() if opt in fn.uses)
            why = (" (an f-divergence needs a loss of the chosen-minus-rejected reward difference)"
                   if opt == "f_divergence" else "")
            raise ValueError(f"option {opt!r} is not used by loss {names}; losses that use it: {users}{why}")


def _check_inputs(terms: list[tuple[str, float]], x: PreferenceInputs) -> None:
    """Reject wrong shapes and missing reference log-probs or lengths, naming the loss that needs them."""
    if x.chosen_logps.dim() != 1 or x.chosen_logps.shape != x.rejected_logps.shape:
        raise ValueError(
            f"chosen_logps and rejected_logps must both be [B], got {tuple(x.chosen_logps.shape)} "
            f"and {tuple(x.rejected_logps.shape)}"
        )
    needs_ref = [n for n, _ in terms if not PREFERENCE_LOSSES[n].reference_free]
    if needs_ref and (x.ref_chosen_logps is None or x.ref_rejected_logps is None):
        raise ValueError(f"loss {needs_ref} needs ref_chosen_logps and ref_rejected_logps")
    for side, given in (("chosen", x.chosen_lengths), ("rejected", x.rejected_lengths)):
        needs = [n for n, _ in terms if side in PREFERENCE_LOSSES[n].lengths]
        if needs and given is None:
            raise ValueError(f"loss {needs} needs {side}_lengths (completion token counts)")


# ---------------------------------------------------------------- functional wrappers


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    weights: Tensor | None = None,
) -> PreferenceLossOutput:
    """SimPO (arXiv:2405.14734) on summed log-probs; see `_simpo`. cpo_alpha=0 gives pure SimPO."""
    return preference_loss(
        "simpo",
        chosen_logps,
        rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        weights=weights,
        simpo_gamma=simpo_gamma,
        cpo_alpha=cpo_alpha,
    )


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    weights: Tensor | None = None,
) -> PreferenceLossOutput:
    """CPO (arXiv:2401.08417) on summed log-probs; see `_cpo`. chosen_lengths is needed when cpo_alpha != 0."""
    return preference_loss(
        "cpo",
        chosen_logps,
        rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        weights=weights,
        cpo_alpha=cpo_alpha,
    )


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
) -> PreferenceLossOutput:
    """ORPO (arXiv:2403.07691) on summed log-probs; beta is ORPO's lambda. See `_orpo`."""
    return preference_loss(
        "orpo",
        chosen_logps,
        rejected_logps,
        beta=beta,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        weights=weights,
    )


# ---------------------------------------------------------------- helpers for the caller


def ld_logps(per_token_logps: Tensor, mask: Tensor, other_lengths: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO sequence log-probs: Liu, Liu, Zhang, Zhou, Lin, Hu, 2024, "Length Desensitization in Direct
    Preference Optimization", arXiv:2409.06411: the first l_p = min(|y|, |y_other|) completion tokens
    count fully, the rest ("verbose" tokens) are scaled by ld_alpha:
        logp = sum_{k <= l_p} logp_k + ld_alpha * sum_{k > l_p} logp_k
    where k counts completion tokens (mask == 1) from 1. Same as TRL >= 1.0, which applies it to the
    policy and the reference log-probs alike (call this for both). ld_alpha = 1 is the plain sum.

    per_token_logps [B, T], mask [B, T] (1 on completion tokens), other_lengths [B] (completion length of
    the paired completion: rejected lengths when these are the chosen rows, and vice versa) -> [B]."""
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    mask = mask.to(per_token_logps.dtype)
    position = mask.cumsum(dim=1)  # 1-based index among completion tokens
    shared = torch.minimum(mask.sum(dim=1), other_lengths.to(per_token_logps.dtype)).unsqueeze(1)
    front = (position <= shared).to(per_token_logps.dtype) * mask
    tokens = per_token_logps * mask
    return (tokens * front).sum(dim=1) + ld_alpha * (tokens * (mask - front)).sum(dim=1)


def wpo_weights(chosen_adjusted_logps_mean: Tensor, rejected_adjusted_logps_mean: Tensor) -> Tensor:
    """WPO pair weights: Zhou, Agrawal, Zhang, Gu, Zeng, Chen, Duan, Dehghani, 2024, "WPO: Enhancing RLHF
    with Weighted Preference Optimization", arXiv:2406.11827, Eq. 2 in TRL's form:
        w = exp(min(a_w + a_l, 0))      (= min(1, exp(a_w) exp(a_l)))
    where a is the completion's mean over tokens t of the adjusted log-prob
        log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2
    (the caller computes it from logits: log-prob minus logsumexp(2 * log_softmax(logits))), all under
    no_grad. TRL 0.x clamps the weight at 1 as here; TRL >= 1.0 dropped the clamp. Pass the result as
    `weights=` to `preference_loss`. Returns detached [B]."""
    return torch.exp((chosen_adjusted_logps_mean + rejected_adjusted_logps_mean).clamp(max=0.0)).detach()
