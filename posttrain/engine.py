"""The one training loop. Algorithms plug in; none copies it.

An algorithm tells the engine four things (see `Algorithm`): how a list of examples becomes micro-batches,
how many normalisation units a micro-batch holds, the loss of one micro-batch given the *global* unit
count of the step (with its metrics, each declaring how it reduces: `Metric`), and (optionally) how to
evaluate. Because every micro-batch loss is divided by the global count, a step's gradient is the same
however its batch is split into micro-batches or devices, and because the engine reduces every metric once
over all micro-batches and processes, so are the logged metrics.

Run directory: config.yaml, metrics.jsonl, checkpoint-N/ (atomic), the final Hugging Face model, and what
`RunLog` writes for people (report.html, samples.jsonl, tracker logs).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import parallel
from posttrain.config import RunError, UserError
from posttrain.models import attached, detached, is_peft, unwrap
from posttrain.parallel import is_main, rank_world
from posttrain.reference import Reference
from posttrain.rundir import prepare_output_dir, storage_error
from posttrain.runlog import RunLog

log = logging.getLogger("posttrain")


def _load(path: Path):
    """A file of a checkpoint posttrain wrote: tensors and plain containers only (weights_only: a file swapped
    in by someone else cannot run code when it is read back)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError ...
        raise UserError(f"{path}: not a checkpoint file posttrain can read ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None


# ------------------------------------------------------------------------------------------------------
# Metrics: each value says how it combines over a step's micro-batches and processes.


class Metric(float):
    """A metric value (a float: anything that reads it reads a number) that declares its reduction.

    An algorithm's `loss` returns these for its micro-batch and `prepare` may attach some for the whole
    step (`Prepared.metrics`); the engine reduces every name once per optimizer step, over all micro-batches
    (`accumulate_metrics`) and all processes (`parallel.reduce_metrics`), and logs the result. The kinds:

      Mean(value, weight)  weighted mean: sum of value * weight / sum of weight. `weight` counts what the
                           value is a mean over (pairs, examples, tokens); a name whose weights add up to 0
                           over the whole step (no such example anywhere) is not logged that step.
      Sum(value)           added up (counts).
      Min(value), Max(value)  the extreme over everything.
      Global(value)        already a statistic of the whole step on every process (computed from gathered
                           data, e.g. a batch std): the same everywhere, taken as it is.
    """

    kind = ""
    weight = 1.0

    def __new__(cls, value):
        return super().__new__(cls, float(value))

    def __reduce__(self):  # copy.deepcopy keeps the kind (and Mean its weight)
        return type(self), (float(self),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({float(self)!r})"


class Mean(Metric):
    kind = "mean"

    def __new__(cls, value, weight):
        self = super().__new__(cls, value)
        self.weight = float(weight)
        return self

    def __reduce__(self):
        return type(self), (float(self), self.weight)

    def __repr__(self) -> str:
        return f"Mean({float(self)!r}, weight={self.weight!r})"


class Sum(Metric):
    kind = "sum"


class Min(Metric):
    kind = "min"


class Max(Metric):
    kind = "max"


class Global(Metric):
    kind = "global"


def accumulate_metrics(parts) -> dict[str, list]:
    """{name: [kind, a, b]} over dicts of declared metrics: a mean adds value * weight in a and weight in b;
    a sum adds in a; min, max and global keep the extreme in a. What `parallel.reduce_metrics` combines
    over processes and `finish_metrics` turns into values."""
    acc: dict[str, list] = {}
    for metrics in parts:
        for name, v in metrics.items():
            if not isinstance(v, Metric):
                raise TypeError(f"metric {name!r} = {v!r} does not declare its reduction (Mean, Sum, Min, Max, Global)")
            slot = acc.get(name)
            if slot is None:
                slot = acc[name] = [v.kind, 0.0, 0.0] if v.kind in ("mean", "sum") else [v.kind, float(v), 0.0]
            elif slot[0] != v.kind:
                raise TypeError(f"metric {name!r} is reduced as {slot[0]} and as {v.kind}")
            if v.kind == "mean":
                if v.weight > 0:  # a mean over nothing (e.g. no desirable example in this micro-batch)
                    slot[1] += float(v) * v.weight
                    slot[2] += v.weight
            elif v.kind == "sum":
                slot[1] += float(v)
            elif v.kind == "min":
                slot[1] = min(slot[1], float(v))
            else:
                slot[1] = max(slot[1], float(v))
    return acc


def finish_metrics(acc: dict[str, list]) -> dict[str, float]:
    return {name: (a / b if kind == "mean" else a) for name, (kind, a, b) in acc.items() if kind != "mean" or b > 0}


def reduce_metrics(parts) -> dict[str, float]:
    """Declared metrics of several micro-batches (one process) -> one float per name. The engine's step
    reduction adds the processes (`parallel.reduce_metrics`); evaluation, which every process runs on the
    whole eval set, uses this directly."""
    return finish_metrics(accumulate_metrics(parts))


class Prepared(list):
    """What `Algorithm.prepare` may return instead of a plain list: the micro-batches of one step (the list),
    the `metrics` that preparing them measured (a rollout's rewards, the generation time), declared like the
    loss's metrics and reduced with them at every optimizer step taken on these micro-batches, and `samples`:
    a few of the completions an online method sampled ({prompt, completion, rewards, ...}), which the engine
    keeps in samples.jsonl for the run report, and `completions`: all of them when `log_completions` is on
    (completions.jsonl). The engine writes both with the step, so a resumed run logs each step once."""

    def __init__(self, micro_batches=(), metrics: dict | None = None, samples: list[dict] | None = None,
                 completions: list[dict] | None = None, parts: list[list] | None = None):
        super().__init__(micro_batches)
        self.metrics = dict(metrics or {})
        self.samples = list(samples or [])
        self.completions = list(completions or [])  # every sampled completion, for completions.jsonl
        # With `Algorithm.parts_per_batch` = k > 1: the micro-batches of each of the k optimizer steps (GRPO's
        # generation_batch_size: one generation, k steps on its k slices); step i of the batch takes part i % k.
        self.parts = parts

    def step_part(self, i: int) -> Prepared:
        """The micro-batches of the i-th optimizer step taken on this prepared batch (all of them without parts)."""
        parts = getattr(self, "parts", None)  # (a batch pickled in a checkpoint before parts existed has none)
        if not parts:
            return self
        return Prepared(parts[i % len(parts)], self.metrics)


# A prepared batch in a checkpoint (num_iterations > 1, saved mid-batch): its tensors in safetensors, the rest
# as JSON naming the posttrain dataclass of each micro-batch. Nothing is unpickled when resuming.
_METRIC_KINDS = {"mean": Mean, "sum": Sum, "min": Min, "max": Max, "global": Global}


def _to_json(obj, tensors: dict, path: str):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous()
        return {"tensor": path}
    if isinstance(obj, Metric):
        return {"metric": obj.kind, "value": float(obj), "weight": obj.weight}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _to_json(getattr(obj, f.name), tensors, f"{path}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": {k: _to_json(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"list": [_to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return {"value": obj}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} in a prepared batch ({path})")


def _from_json(node, tensors: dict):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "metric" in node:
        kind = _METRIC_KINDS[node["metric"]]
        return kind(node["value"], node["weight"]) if kind is Mean else kind(node["value"])
    if "dataclass" in node:
        import importlib

        module, _, name = node["dataclass"].partition(":")
        cls = getattr(importlib.import_module(module), name, None) if module.startswith("posttrain.") else None
        if cls is None or not dataclasses.is_dataclass(cls):  # only posttrain's own batch types are rebuilt
            raise ValueError(f"unknown batch type {node['dataclass']!r}")
        return cls(**{k: _from_json(v, tensors) for k, v in node["fields"].items()})
    if "dict" in node:
        return {k: _from_json(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_from_json(v, tensors) for v in node["list"]]
    return node["value"]


def save_prepared(batch, folder: Path, name: str) -> None:
    """`batch` (a list of micro-batches or a Prepared) as folder/name.safetensors + folder/name.json."""
    from safetensors.torch import save_file

    tensors: dict = {}
    doc = {"micro_batches": [_to_json(mb, tensors, f"mb{i}") for i, mb in enumerate(batch)]}
    if isinstance(batch, Prepared):
        doc["metrics"] = _to_json(batch.metrics, tensors, "metrics")
        doc["samples"], doc["completions"] = batch.samples, batch.completions
        if batch.parts:  # each step's micro-batches, as positions in the list (they are the same objects)
            at = {id(mb): i for i, mb in enumerate(batch)}
            doc["parts"] = [[at[id(mb)] for mb in part] for part in batch.parts]
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(doc, default=str))


def load_prepared(folder: Path, name: str):
    from safetensors.torch import load_file

    doc = json.loads((folder / f"{name}.json").read_text())
    tensors = load_file(str(folder / f"{name}.safetensors"))
    micro = [_from_json(mb, tensors) for mb in doc["micro_batches"]]
    if "metrics" not in doc:
        return micro
    parts = [[micro[i] for i in part] for part in doc["parts"]] if doc.get("parts") else None
    return Prepared(micro, _from_json(doc["metrics"], tensors), doc["samples"], doc["completions"], parts=parts)


class Algorithm(abc.ABC):
    """Interface between an algorithm and the engine.

    `prepare(model, examples)`: this rank's examples of one optimizer step -> its micro-batches, a list or a
        `Prepared` (offline methods collate; online methods generate and score here).
    `num_items(mb)`: how many normalisation units the micro-batch holds (examples, tokens, sequences).
    `loss(model, mb, total_items)`: (loss already divided by the global total, {name: Metric}).
    `derived_metrics(step)`: metrics computed from the step's reduced ones (default: none).
    `num_tokens(mb)`: non-pad tokens processed, for throughput.
    `evaluate(model, examples)`: {metric: float}, or {} when the algorithm has no eval.
    `reference`: the algorithm's reference model strategy (`posttrain.reference`); its TR-DPO sync, its
        state in checkpoints and its models' device placement go through the hooks below.
    `learning_rate_of(name)`: another learning rate for a parameter (PPO's critic), or None.
    Modules trained with the policy (PPO's critic) are attached to it (`posttrain.models.attach`): the engine
    optimises and checkpoints them as the policy's own, and saves each beside the final policy (before the
    policy's weights, which are moved in last).
    """

    steps_per_batch = 1  # optimizer steps taken on one prepared batch (GRPO: parts_per_batch x num_iterations)
    parts_per_batch = 1  # steps' worth of examples one prepare gets (GRPO's generation_batch_size / batch_size)
    reference: Reference = Reference()  # none, unless the algorithm sets its own

    @abc.abstractmethod
    def prepare(self, model, examples: list) -> list: ...

    def num_items(self, mb) -> float:
        return float(len(mb))

    def learning_rate_of(self, name: str) -> float | None:
        return None

    def num_tokens(self, mb) -> int:
        return int(mb.num_tokens)

    @abc.abstractmethod
    def loss(self, model, mb, total_items: float): ...

    def derived_metrics(self, step: dict[str, float]) -> dict[str, float]:
        """Metrics that are functions of the step's reduced metrics, not reductions themselves (KTO's margin
        is the difference of two means over different examples)."""
        return {}

    def evaluate(self, model, examples: list) -> dict:
        return {}

    def on_step_end(self, model, step: int) -> None:
        """Hook after each optimizer step (TR-DPO's reference sync)."""
        self.reference.on_step_end(model, step)

    def models(self) -> list:
        """Models the algorithm runs besides the policy (a reference copy), placed on the policy's device."""
        return self.reference.models()

    def state_dict(self) -> dict:
        return self.reference.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reference.load_state_dict(state)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    seconds: float
    last_metrics: dict


def make_scheduler(optimizer, kind: str, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, cfg, lr_of=None):
    """AdamW over the trainable parameters: weight decay on matrices only. `lr_of(name)`: another learning rate
    for some parameters (PPO's critic), or None for `cfg.learning_rate`; each rate gets its own groups, and the
    schedule scales every group alike."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = (lr_of(name) if lr_of is not None else None) or cfg.learning_rate
            groups.setdefault((p.ndim >= 2, lr), []).append(p)
    if not groups:
        raise UserError("the model has no trainable parameters")
    rates = [cfg.learning_rate] + sorted({lr for _, lr in groups} - {cfg.learning_rate})
    params = [p for ps in groups.values() for p in ps]
    param_groups = [{"params": groups.get((decay, lr), []), "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr}
                    for lr in rates for decay in (True, False)]
    # The fused kernel updates every tensor in one pass (~3x faster than the per-tensor loop torch picks by
    # default on CPU); sharded (FSDP) parameters keep the default path.
    plain = all(type(p) is torch.nn.Parameter and p.dtype.is_floating_point and p.device.type in ("cpu", "cuda")
                for p in params)
    return torch.optim.AdamW(
        param_groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        fused=plain or None
    )


class BatchStream:
    """Deterministic example order: epoch e is a permutation seeded by (seed, e); a step takes the next
    `batch_size` indices of the endless stream, so the data position is just the number of steps."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self._perm(k // self.n)[k % self.n])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.batch_size / self.n


class _StopFlag:
    """Ctrl-C / SIGTERM: finish the step in flight, save a checkpoint, exit non-zero."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum
        if is_main():
            print("\nstopping after this step (a checkpoint will be saved); press Ctrl-C again to abort", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Engine:
    def __init__(self, cfg, model, tokenizer, algorithm: Algorithm, train_examples: list, eval_examples: list | None = None):
        self.cfg, self.model, self.tokenizer, self.algo = cfg, model, tokenizer, algorithm
        self.train_examples, self.eval_examples = train_examples, eval_examples or []
        self.out = prepare_output_dir(cfg)  # refuses a folder holding another run (unless resuming / overwriting)
        self.rank, self.world_size = rank_world()
        if cfg.batch_size % self.world_size:
            raise UserError(f"batch_size {cfg.batch_size} is not divisible by the number of processes {self.world_size}")
        self.total_steps = self._total_steps()
        self._batch = None  # the prepared micro-batches of the current optimizer-step batch
        # A prepared batch holds parts_per_batch steps' examples (one GRPO generation for several steps).
        self.stream = BatchStream(len(train_examples), cfg.batch_size * algorithm.parts_per_batch, cfg.seed)
        self.best: tuple[float, int] | None = None  # (metric, step) of the best eval so far
        self._saved_at = -1  # the step of the last checkpoint written (one per step at most)
        self._nonfinite_run = self._nonfinite_total = 0  # skipped steps: in a row now, and in this run

    def steps_of(self, value: float) -> int:
        """A step count from the config: N, or below 1 a fraction of the run (rounded up, as transformers)."""
        return math.ceil(value * self.total_steps) if 0 < value < 1 else int(value)

    def _due(self, strategy: str, every: float, step: int) -> bool:
        """Whether a logging / eval / save event with this strategy falls on optimizer step `step`."""
        if strategy == "epoch":
            spb = self.algo.steps_per_batch
            if step % spb:  # mid-batch (num_iterations > 1): the batch's last iteration ends the epoch
                return False
            b = step // spb
            return math.floor(self.stream.epoch_at(b)) > math.floor(self.stream.epoch_at(b - 1))
        n = self.steps_of(every) if strategy == "steps" else 0
        return n > 0 and step % n == 0

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps > 0:
            return cfg.max_steps
        per_epoch = len(self.train_examples) / (cfg.batch_size * self.algo.parts_per_batch)  # prepared batches
        return max(1, math.ceil(cfg.num_epochs * per_epoch)) * self.algo.steps_per_batch

    # --- checkpoints -------------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        found = [p for p in self.out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def save_checkpoint(self, step: int) -> Path | None:
        """Every rank calls this (several processes: FSDP shards are written collectively, RNG states per
        rank); rank 0 writes the rest and renames the folder into place once all are done."""
        tmp = self.out / f".checkpoint-{step}.tmp"
        try:
            return self._write_checkpoint(step, tmp)
        except BaseException:
            # A full disk or a kill mid-write: the partial folder never becomes a checkpoint (it is renamed into
            # place only when complete), and removing it gives the space back; earlier checkpoints are untouched.
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_checkpoint(self, step: int, tmp: Path) -> Path | None:
        from safetensors.torch import save_file

        final = self.out / f"checkpoint-{step}"
        if is_main():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        parallel.barrier()
        if not parallel.save_sharded(tmp, self.model, self.optimizer) and is_main():
            params = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(params, str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        torch.save(rng, tmp / ("rng.pt" if self.world_size == 1 else f"rng-{self.rank}.pt"))
        if step % self.algo.steps_per_batch:
            # Mid-batch (GRPO's num_iterations > 1): keep the batch itself, so a resumed run finishes its
            # remaining iterations on the same rollouts instead of sampling new ones.
            save_prepared(self._batch, tmp, f"prepared-{self.rank}")
        parallel.barrier()
        if not is_main():
            parallel.barrier()  # returns once rank 0 has put the checkpoint in place
            return None
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        algo_state = self.algo.state_dict()
        if algo_state:
            torch.save(algo_state, tmp / "algorithm.pt")
        trainer_state = {"step": step, "epoch": self.stream.epoch_at(step)}
        if self.best is not None:
            trainer_state["best"] = {"metric": self.best[0], "step": self.best[1]}
        if self.world_size > 1:
            trainer_state["world_size"] = self.world_size
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.cfg.save_total_limit:
            best = f"checkpoint-{self.best[1]}" if self.best else None
            for old in self._checkpoints()[: -self.cfg.save_total_limit]:
                if old.name != best:  # the best checkpoint outlives the rotation (as in transformers)
                    shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return final

    def load_checkpoint(self, path: Path) -> int:
        from safetensors.torch import load_file

        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("world_size", 1) != self.world_size:
            raise UserError(f"{path}: written by {state.get('world_size', 1)} processes; resume it with as many "
                            f"(this run has {self.world_size})")
        if not parallel.load_sharded(path, self.model, self.optimizer):
            params = load_file(str(path / "trainable.safetensors"))
            named = dict(self.model.named_parameters())
            missing = [n for n in params if n not in named]
            if missing:
                raise UserError(f"{path}: checkpoint does not match this model (e.g. {missing[0]})")
            with torch.no_grad():
                for n, t in params.items():
                    named[n].copy_(t)
            self.optimizer.load_state_dict(_load(path / "optimizer.pt"))
        self.scheduler.load_state_dict(_load(path / "scheduler.pt"))
        rng = _load(path / ("rng.pt" if self.world_size == 1 else f"rng-{self.rank}.pt"))
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if (path / "algorithm.pt").exists():
            self.algo.load_state_dict(_load(path / "algorithm.pt"))
        if (path / f"prepared-{self.rank}.pt").exists():
            raise UserError(f"{path}: its rollout batch is pickled (written by an older posttrain), which is never "
                            "loaded; resume from a checkpoint taken at a batch boundary")
        prepared = f"prepared-{self.rank}"
        self._batch = load_prepared(path, prepared) if (path / f"{prepared}.json").exists() else None
        if "best" in state:
            self.best = (float(state["best"]["metric"]), int(state["best"]["step"]))
        return int(state["step"])

    def _save_once(self, step: int):
        if self._saved_at != step:
            self._saved_at = step
            path = self.save_checkpoint(step)
            self.runlog.write_report()  # the report beside every checkpoint
            return path
        return self.out / f"checkpoint-{step}"

    def _track_best(self, step: int, metrics: dict) -> None:
        """load_best_model_at_end / save_strategy=best: remember the best eval and checkpoint the step it came
        from (the last step needs none: it is the final model)."""
        cfg = self.cfg
        if not (cfg.load_best_model_at_end or cfg.save_strategy == "best"):
            return
        key, greater = cfg.best_metric()
        if key not in metrics:
            known = ", ".join(k.removeprefix("eval/") for k in metrics)
            raise UserError(f"metric_for_best_model: {key.removeprefix('eval/')!r} is not an eval metric of this "
                            f"run (it reports: {known})")
        value = float(metrics[key])
        if math.isnan(value):  # an eval that produced no number ranks nowhere
            return
        if self.best is None or (value > self.best[0] if greater else value < self.best[0]):
            self.best = (value, step)
            if step < self.total_steps:
                self._save_once(step)

    def _resume_path(self) -> Path | None:
        spec = self.cfg.resume_from_checkpoint
        if not spec:
            return None
        if spec == "latest":
            found = self._checkpoints()
            if not found:
                log.warning(f"resume_from_checkpoint=latest: no checkpoint in {self.out}; starting fresh")
                return None
            return found[-1]
        path = Path(spec)
        if not (path / "trainer_state.json").exists():
            raise UserError(f"resume_from_checkpoint: {spec} is not a checkpoint folder")
        return path

    def save_final(self) -> None:
        model = self.model
        extras = self._attached_states()  # every rank takes part (FSDP gathers); rank 0 gets the weights
        if parallel.is_fsdp(model):
            model = parallel.full_copy(model)  # every rank sends its shards; rank 0 gets a plain CPU copy
        if is_main():
            if is_peft(model) and self.cfg.lora is not None and self.cfg.lora.merge:
                model = model.merge_and_unload()
            elif not is_peft(model):
                model = unwrap(model)
            # Written beside the run, then moved in with the policy's weights last: a run stopped while saving (a
            # full disk, a kill) leaves no half-written model that looks like a finished one.
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with detached(model):  # the policy alone; what is attached to it is saved next to it
                    model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                self._write_attached(extras, tmp)

                def policy_weights(n):
                    return n.endswith((".safetensors", ".bin")) and n.split(".")[0] not in extras

                for name in sorted(os.listdir(tmp), key=lambda n: (policy_weights(n), n)):
                    if (self.out / name).is_dir():  # a critic folder left by a save that was cut short
                        shutil.rmtree(self.out / name)
                    os.replace(tmp / name, self.out / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        parallel.barrier()

    def _attached_states(self) -> dict:
        """{name: (module, its full weights)} of the modules attached to the policy (PPO's critic), read inside
        `gathered` (FSDP: every rank takes part; only rank 0 keeps the copies)."""
        extras = attached(self.model)
        out = {}
        if extras:
            with parallel.gathered(self.model):
                for name, module in extras.items():
                    state = {n: p.detach().cpu().clone().contiguous() for n, p in module.named_parameters()}
                    out[name] = (module, state if is_main() else None)
        return out

    def _write_attached(self, extras: dict, folder: Path) -> None:
        """Each attached module beside the policy: a transformers model as a folder `NAME/` (with the tokenizer),
        anything else as `NAME.safetensors`."""
        from safetensors.torch import save_file

        for name, (module, state) in extras.items():
            if hasattr(module, "save_pretrained"):
                module.save_pretrained(folder / name, state_dict=state)
                self.tokenizer.save_pretrained(folder / name)
            else:
                save_file(state, str(folder / f"{name}.safetensors"))

    # --- the loop ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.bf16:
            device = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return nullcontext()

    def _step_examples(self, step_batch: int) -> list:
        idx = self.stream.batch(step_batch)
        return [self.train_examples[i] for i in idx[self.rank :: self.world_size]]

    def _run_step(self, micro_batches: list) -> dict:
        algo = self.algo
        local_items = sum(algo.num_items(mb) for mb in micro_batches)
        total = float(parallel.all_reduce_sum(torch.tensor(float(local_items))))
        parts = []
        finite = True
        for i, mb in enumerate(micro_batches):
            if self.device.type != "cpu":
                mb = parallel.to_device(mb, self.device)
            # Several processes: gradients cross ranks once per step, after the last micro-batch.
            with parallel.accumulating(self.model, sync=i == len(micro_batches) - 1):
                with self._autocast():
                    loss, metrics = algo.loss(self.model, mb, total)
                loss.backward()
            finite = finite and bool(torch.isfinite(loss.detach()).all())
            parts += [metrics, {"loss": Sum(loss.detach()), "_tokens": Sum(algo.num_tokens(mb))}]
        grad_norm = parallel.grad_norm(self.model, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        # A NaN/Inf loss or gradient on any rank: no update at all (AdamW would write NaN into every weight and
        # both moments, for good). The schedule still advances: the learning rate stays a function of the step.
        skipped = parallel.any_rank(not (finite and math.isfinite(grad_norm)))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        else:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(micro_batches, Prepared):  # measured once per prepared batch, logged with each of its steps
            parts.append(micro_batches.metrics)
        # Every metric reduced once: over this rank's micro-batches, then over the ranks.
        out = finish_metrics(parallel.reduce_metrics(accumulate_metrics(parts)))
        out.update(algo.derived_metrics(out))
        out.update(grad_norm=grad_norm, learning_rate=lr, nonfinite_skipped=float(skipped))
        return out

    def _after_nonfinite(self, step: int, row: dict) -> None:
        """Warn at the first skipped step; stop (with a checkpoint) after max_nonfinite_steps in a row."""
        if not row.get("nonfinite_skipped"):
            self._nonfinite_run = 0
            return
        self._nonfinite_run += 1
        self._nonfinite_total += 1
        if self._nonfinite_total == 1 and is_main():
            log.warning(f"step {step}: the loss or gradient is not finite (loss {row.get('loss')}, grad_norm "
                        f"{row.get('grad_norm')}); the update is skipped, weights and optimizer state unchanged. "
                        "Later skips are only counted (nonfinite_skipped in metrics.jsonl).")
        limit = self.cfg.max_nonfinite_steps
        if limit and self._nonfinite_run >= limit:
            path = self._save_once(step)
            self.runlog.finish()
            raise RunError(f"stopped at step {step}: the loss or gradient was not finite for {limit} steps in a row "
                           f"(max_nonfinite_steps); the weights of step {step - limit} are saved in {path}. Lower "
                           "learning_rate, check the data for extreme rows, or raise max_nonfinite_steps")

    def evaluate(self) -> dict:
        if not self.eval_examples:
            return {}
        self.model.eval()
        # Every rank evaluates the whole eval set (rank 0 logs it); FSDP: with gathered weights.
        with torch.no_grad(), self._autocast(), parallel.gathered(self.model):
            metrics = self.algo.evaluate(self.model, self.eval_examples)
        self.model.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    def train(self) -> TrainResult:
        try:
            return self._train()
        except OSError as e:  # disk full, quota, read-only: one line naming the intact checkpoint (cli: exit 1)
            err = storage_error(e, self.out)
            if err is None:
                raise
            raise err from None

    def _train(self) -> TrainResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = parallel.place(self.model, *self.algo.models())
        parallel.wrap(self.model, cfg.distributed, cfg.bf16)  # before the optimizer: FSDP replaces the parameters
        self.optimizer = make_optimizer(self.model, cfg, self.algo.learning_rate_of)
        warmup = self.steps_of(cfg.warmup_steps) or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, self.total_steps, warmup)
        start = 0
        resume = self._resume_path()
        if resume is not None:
            start = self.load_checkpoint(resume)
            if is_main():
                log.info(f"resumed from {resume} at step {start}")
        self.runlog = RunLog(cfg, self.out, tokenizer=self.tokenizer, has_eval=bool(self.eval_examples), enabled=is_main())
        self.runlog.start(start)
        self.model.train()
        t0 = time.time()
        last: dict = {}
        progress = _Progress(self.total_steps, start, enabled=cfg.progress and is_main())
        with _StopFlag() as stop, progress:
            step = start
            spb = self.algo.steps_per_batch
            while step < self.total_steps:
                if step % spb and self._batch is not None:  # resumed mid-batch: finish it first
                    micro_batches = self._batch
                else:
                    examples = self._step_examples(step // spb)
                    with parallel.gathered(self.model):  # generation / no-grad passes differ between ranks
                        micro_batches = self.algo.prepare(self.model, examples)
                    if isinstance(micro_batches, Prepared):
                        self.runlog.samples(step + 1, micro_batches.samples)
                        self.runlog.samples(step + 1, micro_batches.completions, "completions.jsonl")
                self._batch = micro_batches
                for _ in range(spb - step % spb):
                    if step >= self.total_steps:
                        break
                    ts = time.time()
                    part = micro_batches.step_part(step % spb) if isinstance(micro_batches, Prepared) else micro_batches
                    metrics = self._run_step(part)
                    with parallel.gathered(self.model):
                        self.algo.on_step_end(self.model, step + 1)
                    step += 1
                    elapsed = time.time() - ts
                    metrics["tokens_per_second"] = metrics.pop("_tokens") / max(elapsed, 1e-9)
                    metrics["step_seconds"] = elapsed
                    row = {"step": step, "epoch": round(self.stream.epoch_at(math.ceil(step / spb)), 4)}
                    row.update(metrics)
                    evaluation = {}
                    if step < self.total_steps and self._due(cfg.eval_strategy, cfg.eval_steps, step):
                        evaluation = self.evaluate()
                        row.update(evaluation)
                        self._track_best(step, evaluation)
                    # A row with an evaluation is always written, whatever the logging interval.
                    write = bool(evaluation) or step == self.total_steps or self._due(
                        cfg.logging_strategy, cfg.logging_steps, step)
                    last = self.runlog.step(row, write=write)
                    progress.update(step, row)
                    if self._due(cfg.save_strategy, cfg.save_steps, step):
                        self._save_once(step)
                    self._after_nonfinite(step, row)
                    if parallel.any_rank(stop.signum is not None):  # all ranks stop at the same step
                        path = self._save_once(step)
                        progress.close()
                        if is_main():
                            print(f"interrupted at step {step}; checkpoint saved to {path}", file=sys.stderr)
                        self.runlog.finish()
                        raise SystemExit(128 + (stop.signum or signal.SIGTERM))  # a rank that got no signal itself
        final_eval = self.evaluate() if cfg.eval_strategy != "no" else {}
        if final_eval:
            last = self.runlog.step({"step": step, **final_eval})
            self._track_best(step, final_eval)
        if cfg.load_best_model_at_end and self.best is not None and self.best[1] != step:
            path = self.out / f"checkpoint-{self.best[1]}"
            self.load_checkpoint(path)
            if is_main():
                log.info(f"load_best_model_at_end: the final model is {path.name} "
                         f"({cfg.best_metric()[0]} {self.best[0]:.4g}; at the last step: {final_eval.get(cfg.best_metric()[0])})")
        self.save_final()
        seconds = time.time() - t0
        if is_main():
            self._summary(step - start, seconds, last)
        self.runlog.finish()  # closes the trackers, writes report.html and prints its path as the last line
        return TrainResult(str(self.out), step, seconds, last)

    def _summary(self, steps: int, seconds: float, last: dict) -> None:
        keys = [k for k in ("loss", "eval/loss", "rewards/accuracies", "reward", "objective/scores", "eval/accuracy")
                if k in last]
        extra = ", ".join(f"{k} {last[k]:.4g}" for k in keys)
        if self._nonfinite_total:
            extra += f"{', ' if extra else ''}{self._nonfinite_total} skipped (non-finite)"
        print(f"done: {steps} steps in {seconds:.1f}s{', ' + extra if extra else ''}; model saved to {self.out}")


class _Progress:
    """A rich progress bar with ETA and the live loss on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.bar, self.total = enabled, None, total
        self.tty = enabled and sys.stderr.isatty()
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        keys = [k for k in ("loss", "reward", "objective/scores", "rewards/accuracies", "eval/loss") if k in row]
        info = "  ".join(f"{k} {row[k]:.4f}" for k in keys)
        if self.bar:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total}  {info}  ({row.get('step_seconds', 0):.2f}s/step)", file=sys.stderr, flush=True)

    def close(self):
        if self.bar:
            self.bar.stop()
            self.bar = None

    def __exit__(self, *exc):
        self.close()
