"""Data parallelism over torch.distributed, applied to the model from outside, in one place.

`torchrun --nproc_per_node N -m posttrain <command> ...` (or `posttrain <command>` in any launch that sets
torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, or srun with MASTER_ADDR exported) runs N processes.
`distributed: ddp` (default) replicates the trainable weights, gradients and optimizer state on every rank and
all-reduces gradients (DistributedDataParallel); `distributed: fsdp` shards them (FSDP2, `fully_shard` on each
transformer block and on the whole). NCCL between GPUs, gloo on CPU. The algorithms do not change:

- Batches. `batch_size` stays global: the engine gives rank r the examples r, r + N, ... of a step and
  divides every micro-batch loss by the step's GLOBAL count (tokens, pairs, sequences; all-reduced). So the
  ranks' gradients must be SUMMED, not averaged as DDP and FSDP do by default: `wrap` sets both to sum. The
  sum of the ranks' gradients is then exactly the single-process gradient of the same global batch.
- Forward. The algorithms get their log-probs from `posttrain.logprobs`, which runs the decoder and a fused
  LM head directly instead of the model's forward; DDP (preparing the gradient all-reduce) and FSDP
  (all-gathering parameters, then reduce-scattering gradients in backward) work through a module's forward
  hooks. So the model is held by `_Call`, a module whose forward runs one of those routines, and the routines
  marked `@routed` go through the wrapped `_Call` whenever their model is wrapped.
- Steps without gradients. Generation, evaluation and reference-copy updates call the model in ways that
  differ between ranks (generation stops when a rank's own completions end), so under FSDP they run inside
  `gathered`: every parameter all-gathered once, no collective until it ends. With DDP nothing is needed.
- Metrics. Each declares its reduction (`engine.Metric`); `reduce_metrics` combines every rank's at the end
  of a step (three small collectives: the names, one sum, one max), so the logged value is the global step's.
- State. Checkpoints: DDP's replicated weights and optimizer are written once by rank 0 (as in one process);
  FSDP's shards through torch.distributed.checkpoint (`save_sharded` / `load_sharded`), every rank its own
  part. The random-number state is saved per rank. Resuming needs the same number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os

import torch
import torch.distributed as dist

from posttrain.config import UserError
from posttrain.models import ATTACHED, unwrap

STRATEGIES = ("ddp", "fsdp")


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0: the process that logs and writes the run directory."""
    return rank_world()[0] == 0


# ------------------------------------------------------------------------------------------------------
# Process group


def init() -> bool:
    """Join the process group when this process is one of several; True when this call created it.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under srun without torchrun the
    ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID once the job script exports MASTER_ADDR (and
    optionally MASTER_PORT, default 29500): without it, a script run by a multi-task allocation stays a
    single process instead of waiting for peers that never come.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env and int(tasks) > 1:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=tasks, LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_PORT", "29500")
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        backend = "cpu:gloo,cuda:nccl"  # NCCL for the GPU collectives, gloo for the engine's small CPU ones
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    if dist.get_rank() != 0:
        # One console: rank 0 reports; the others say something only when it is an error.
        logging.getLogger("posttrain").setLevel(logging.ERROR)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Tear down together: a rank destroying its gloo group while a peer still talks to it can abort.
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    """This process's device: its GPU when CUDA is available (LOCAL_RANK among the visible GPUs; srun with
    --gpus-per-task shows each task one GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal that reached only some ranks)."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ------------------------------------------------------------------------------------------------------
# Wrapping


class _Call(torch.nn.Module):
    """The module DDP / FSDP wrap: it holds the model (so it owns the parameters) and its forward runs one
    log-prob routine on it, so the wrapper's forward hooks surround the computation that uses the weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inside = False

    def forward(self, fn, model, args, kwargs):
        self.inside = True  # routines called by this one run directly
        try:
            out = fn(model, *args, **kwargs)
        finally:
            self.inside = False
        # FSDP hooks backward through the output's tensors, found by pytree: a dataclass would hide them.
        if dataclasses.is_dataclass(out):
            return type(out), {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return None, out


def _noop(model):
    return None


@dataclasses.dataclass
class _Parallel:
    kind: str  # "ddp" or "fsdp"
    call: torch.nn.Module  # DistributedDataParallel(_Call) or the fully_shard-ed _Call
    inner: _Call
    fsdp_modules: list
    gathered: bool = False


def state(model) -> _Parallel | None:
    return model.__dict__.get("_posttrain_parallel") if model is not None else None


def is_fsdp(model) -> bool:
    p = state(model)
    return p is not None and p.kind == "fsdp"


def _sum_hook(_, bucket):
    # DDP's default hook averages over ranks; every rank's loss is already divided by the global count.
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def place(model, *others) -> torch.device:
    """Move the model, and the other models the algorithm runs (a reference copy), to this process's device.
    Batches follow: the engine moves each micro-batch, `routed` the arguments of the log-prob routines."""
    dev = device()
    if dev.type != "cpu":
        for m in (model, *others):
            m.to(dev)
    return dev


def wrap(model, strategy: str = "ddp", bf16: bool = False) -> None:
    """Make `model` data-parallel over the process group, in place (nothing happens in one process).

    The object stays the one the algorithms hold; the wrapper is recorded on it (and on the transformers
    model under a peft wrapper) for `routed`, `accumulating`, `gathered` and the checkpoint functions.
    Trainable parameters are broadcast from rank 0 first, so every rank starts from the same weights even
    when an initialisation (a LoRA adapter, a new score head) drew different random numbers.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"distributed: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    _, world = rank_world()
    if world == 1 or state(model) is not None:
        return
    dev = place(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, 0)
    inner = _Call(model)
    modules: list = []
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(dev.type, (world,))
        mp = MixedPrecisionPolicy()
        if bf16 and dev.type == "cuda":  # bf16 all-gathers and compute, fp32 gradient reduction
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The transformer blocks (transformers' `_no_split_modules`) are the sharding units: one block's
        # parameters are gathered at a time; embeddings, final norm and head belong to the root unit.
        blocks = set(getattr(unwrap(model), "_no_split_modules", None) or ())
        for m in list(model.modules()):
            if type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh, mp_policy=mp)
        fully_shard(inner, mesh=mesh, mp_policy=mp)
        modules = [m for m in inner.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.set_gradient_divide_factor(1.0)  # sum, see the module docstring
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        with torch.no_grad():
            inner(_noop, model, (), {})  # FSDP makes the first module to run forward the root: this one
        inner.reshard()  # the root stays gathered after forward; the optimizer must see the shards
        call = inner
    else:
        from torch.nn.parallel import DistributedDataParallel

        call = DistributedDataParallel(
            inner, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False
        )  # no buffer is trained (rotary tables are constants): no broadcast before each forward
        call.register_comm_hook(None, _sum_hook)
    p = _Parallel(strategy, call, inner, modules)
    for m in {id(x): x for x in (model, unwrap(model))}.values():
        object.__setattr__(m, "_posttrain_parallel", p)  # not a submodule: no cycle in modules()/state_dict()


def routed(fn):
    """Decorator for the log-prob routines: when their model is wrapped, run them through the wrapper's
    forward (DDP: only with gradients; FSDP: always, except inside `gathered`). Tensor arguments are moved
    to the model's device first (a no-op on the CPU)."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        p = state(model)
        dev = _device_of(model)
        if dev is not None and dev.type != "cpu":
            args, kwargs = to_device(args, dev), to_device(kwargs, dev)
        if p is None or p.inner.inside or p.gathered or (p.kind == "ddp" and not torch.is_grad_enabled()):
            return fn(model, *args, **kwargs)
        kind, out = p.call(fn, model, args, kwargs)
        return out if kind is None else kind(**out)

    return run


def _device_of(model) -> torch.device | None:
    try:
        t = next(model.parameters())
    except (StopIteration, AttributeError):
        return None
    return t.device


def to_device(obj, dev: torch.device):
    """Tensors inside `obj` (tuples, lists, dicts, dataclasses) moved to `dev`; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev, non_blocking=True)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_device(x, dev) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), dev) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


@contextlib.contextmanager
def accumulating(model, sync: bool):
    """Around one micro-batch's forward and backward: gradients cross ranks only when `sync` (the step's last
    micro-batch); before that they add up locally (DDP `no_sync`, FSDP `set_requires_gradient_sync`)."""
    p = state(model)
    if p is None or sync:
        yield
    elif p.kind == "ddp":
        with p.call.no_sync():
            yield
    else:
        for m in p.fsdp_modules:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in p.fsdp_modules:
                m.set_requires_gradient_sync(True, recurse=False)


@contextlib.contextmanager
def gathered(model):
    """FSDP: every parameter all-gathered (the modules then hold ordinary full tensors) until the block ends,
    with no collective inside it, so ranks may call the model different numbers of times (generation,
    evaluation) or read its parameters (TR-DPO's reference update). DDP / one process: no-op. Every rank must
    enter it together. Costs one full copy of the weights per rank while it lasts. Not for saving:
    `state_dict()` puts FSDP modules back to their shards (see `full_copy`)."""
    p = state(model)
    if p is None or p.kind != "fsdp" or p.gathered:
        yield
        return
    for m in p.fsdp_modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    p.gathered = True
    try:
        yield
    finally:
        p.gathered = False
        for m in p.fsdp_modules:
            # Blocks reshard after forward (gathered one at a time); the root keeps FSDP's default (not).
            m.set_reshard_after_forward(m is not p.inner, recurse=False)
            m.reshard()


# ------------------------------------------------------------------------------------------------------
# Step helpers


def grad_norm(model, max_norm: float) -> float:
    """The global gradient norm over every trainable parameter (FSDP: over the shards of every rank), after
    clipping it to `max_norm` when that is > 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    if max_norm > 0 or is_fsdp(model):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    else:
        grads = [p.grad.float() for p in params if p.grad is not None]
        norm = torch.sqrt(sum((g**2).sum() for g in grads)) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the processes (a copy; `x` itself in one process)."""
    if rank_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def reduce_metrics(acc: dict[str, list]) -> dict[str, list]:
    """Every process's accumulated metrics (`engine.accumulate_metrics`: {name: [kind, a, b]}) combined, on
    every process: means and sums add their a and b, min / max / global keep the extreme. Processes may
    report different names (e.g. no desirable KTO example here); the result lists every name, sorted."""
    _, world = rank_world()
    if world == 1:
        return acc
    found: list = [None] * world
    dist.all_gather_object(found, sorted((name, slot[0]) for name, slot in acc.items()))
    kinds = dict(pair for part in found for pair in part)
    names = sorted(kinds)
    added = [n for n in names if kinds[n] in ("mean", "sum")]
    extreme = [n for n in names if kinds[n] not in ("mean", "sum")]
    out = {}
    if added:
        t = torch.tensor([acc[n][i] if n in acc else 0.0 for n in added for i in (1, 2)], dtype=torch.float64)
        dist.all_reduce(t)
        out.update({n: [kinds[n], float(t[2 * j]), float(t[2 * j + 1])] for j, n in enumerate(added)})
    if extreme:
        sign = {n: -1.0 if kinds[n] == "min" else 1.0 for n in extreme}  # a min is the max of the negatives
        t = torch.tensor([sign[n] * acc[n][1] if n in acc else -math.inf for n in extreme], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.update({n: [kinds[n], sign[n] * float(t[j]), 0.0] for j, n in enumerate(extreme)})
    return {n: out[n] for n in names}


def gather_rows(t: torch.Tensor, pad: float | None = None) -> tuple[torch.Tensor, int]:
    """Every rank's rows of `t` (sizes may differ) concatenated in rank order, and the index where this
    rank's rows start. For statistics over the global batch, e.g. GRPO's batch-std advantages. `pad`: [N, T]
    tensors whose T differs between ranks (completions of other lengths) are right-padded with it."""
    rank, world = rank_world()
    if world == 1:
        return t, 0
    parts: list = [None] * world
    dist.all_gather_object(parts, t.detach().cpu())
    start = sum(int(x.shape[0]) for x in parts[:rank])
    if pad is not None and t.ndim == 2:
        width = max(int(x.shape[1]) for x in parts)
        parts = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad) for x in parts]
    return torch.cat(parts).to(t.device), start


# ------------------------------------------------------------------------------------------------------
# Checkpoints and the final model


def full_copy(model):
    """FSDP: an unsharded copy of the model on rank 0's CPU (None on the other ranks), to save the final model
    exactly as one process does (plain, adapter, or merged). Every rank must call it: each sends its shards.
    The copy is built on the meta device and takes the gathered tensors as its parameters, so the weights
    exist once in memory; it is for saving, not for computing (non-persistent buffers stay empty)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from posttrain.models import is_peft

    p = state(model)
    full = get_model_state_dict(p.call, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    full = {k.removeprefix("model."): v for k, v in full.items()}  # _Call holds the model as `model`
    full = {k: v for k, v in full.items() if not k.startswith(ATTACHED + ".")}  # a critic: not the policy's
    base = unwrap(model)
    with torch.device("meta"):
        copy = type(base)(base.config)
        if is_peft(model):
            from peft import get_peft_model

            copy = get_peft_model(copy, model.peft_config[model.active_adapter])
    copy.load_state_dict(full, strict=True, assign=True)
    unwrap(copy).tie_weights()  # assign=True replaced tied parameters one by one
    unwrap(copy).generation_config = base.generation_config
    return copy


def save_sharded(path, model, optimizer) -> bool:
    """FSDP: write the model's and the optimizer's shards to `path/sharded` (torch.distributed.checkpoint;
    every rank writes its part, collectively). False, doing nothing, when the model is not FSDP-sharded."""
    p = state(model)
    if p is None or p.kind != "fsdp":
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(p.call, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / "sharded"))
    return True


def load_sharded(path, model, optimizer) -> bool:
    """Counterpart of `save_sharded`: True when it loaded `path/sharded`; False when the checkpoint is a
    single-file one (DDP or one process) and the model is not sharded either."""
    p = state(model)
    sharded = (path / "sharded").is_dir()
    fsdp = p is not None and p.kind == "fsdp"
    if sharded != fsdp:
        written = "distributed: fsdp" if sharded else "distributed: ddp or one process"
        raise UserError(f"{path}: checkpoint written with {written}; resume it the same way")
    if not sharded:
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(p.call, optimizer)
    loaded = {"model": model_state, "optimizer": optim_state}
    dcp.load(loaded, checkpoint_id=str(path / "sharded"))
    set_state_dict(p.call, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    return True
