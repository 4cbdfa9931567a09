"""The parity suite runs TRL's own loss code (trl==1.16.0, installed by the `dev` and `parity` extras) next to
posttrain's on random inputs. Where TRL computes a loss inside a trainer method, the method runs on a bare
instance of TRL's trainer class (`bare_trainer`: no __init__, only the attributes the method reads) and a stub
model that returns chosen per-token log-probs; nothing of TRL's formulas is re-typed here."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from types import SimpleNamespace

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPOTrainer and ORPOTrainer live in trl.experimental

try:  # a missing TRL fails the run loudly (the README's test command installs it), never skips it quietly
    import trl
except ImportError as e:
    raise RuntimeError("the parity suite needs trl==1.16.0: pip install -e '.[dev]' (or '.[parity]')") from e
if trl.__version__ != "1.16.0":
    raise RuntimeError(f"the parity suite checks against trl 1.16.0; found {trl.__version__}")


class Accelerator:
    """One process: every collective is the identity."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


class StubModel(torch.nn.Module):
    """Stands in for a causal LM called with TRL's `fused_lm_head=True`: returns the per-token log-probs (and
    entropies, ...) it is given, as the fused head does (0 where labels are -100). `outputs` maps id(input_ids)
    to the fields for that input, for trainers that call one model on several inputs."""

    is_gradient_checkpointing = False

    def __init__(self, outputs: dict | None = None, **fields):
        super().__init__()
        self.outputs = outputs or {}
        self.fields = fields

    def forward(self, input_ids=None, *args, **kwargs):
        return SimpleNamespace(**self.outputs.get(id(input_ids), self.fields))


def bare_trainer(cls, **attributes):
    """An instance of TRL's trainer class without running its __init__, holding only `attributes` plus what
    every method reads (a one-process accelerator, metric buffers, a step-0 state)."""
    trainer = object.__new__(cls)
    base = {"accelerator": Accelerator(), "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
                "_total_train_tokens": 0, "_tp_size": 1, "aux_loss_enabled": False, "model": StubModel(),
                "state": SimpleNamespace(global_step=0)}
    for key, value in {**base, **attributes}.items():
        object.__setattr__(trainer, key, value)
    return trainer


def close(actual, expected, rtol=1e-6, name=""):
    """|actual - expected| <= rtol * max(|expected|, 1e-12): TRL's tolerance of the issue, relative."""
    a, e = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert torch.isfinite(e).all(), f"{name}: TRL's value is not finite ({e}); such cases are tested separately"
    err = float((a - e).abs().max())
    bound = rtol * max(float(e.abs().max()), 1e-12)
    assert err <= bound, f"{name}: posttrain {a.tolist()} vs TRL {e.tolist()} (difference {err:.3g} > {bound:.3g})"
