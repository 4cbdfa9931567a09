"""The run directory: which folder a run writes to, and never two runs in one folder.

A training run refuses an output_dir that already holds a run (a posttrain run's logs or checkpoints, or a
saved model) unless it resumes from one of its checkpoints or overwrite_output_dir is set; with no output_dir
it takes the first free runs/<command>, runs/<command>-2, ... `posttrain eval` never replaces a training
run's files. A file system error while the run writes (disk full, quota, read-only) becomes a StorageError
naming the last intact checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from posttrain.config import StorageError, UserError

log = logging.getLogger("posttrain")

LOG_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "completions.jsonl", "report.html")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def run_contents(path: Path) -> list[str]:
    """What in `path` belongs to a run (a posttrain run's logs and checkpoints, or any saved model's weights).
    Other files are not ours and are never touched."""
    if not path.is_dir():
        return []
    found = []
    for p in path.iterdir():
        name = p.name
        if (name in LOG_FILES or name in WEIGHT_FILES or name == "tensorboard"
                or (name.startswith("model-") and name.endswith(".safetensors"))
                or (p.is_dir() and name.startswith("checkpoint-") and name.split("-")[-1].isdigit())
                or (name.startswith(".checkpoint-") and name.endswith(".tmp"))):
            found.append(name)
    return sorted(found)


def _checkpoint_steps(path: Path) -> list[int]:
    return sorted(int(n.split("-")[-1]) for n in run_contents(path) if n.startswith("checkpoint-"))


def _describe(path: Path, contents: list[str]) -> str:
    """'a finished sft run', 'an unfinished grpo run (checkpoint-20)', 'a model' ... for messages."""
    command = None
    try:
        first = (path / "config.yaml").read_text().split("\n", 1)[0]
        if first.startswith("# posttrain "):
            command = first.removeprefix("# posttrain ").split(":")[0]
    except (OSError, UnicodeDecodeError):
        pass
    finished = any(c in WEIGHT_FILES or c.startswith("model-") for c in contents)
    steps = _checkpoint_steps(path)
    if command is None and not any(c in LOG_FILES for c in contents) and not steps:
        return "a saved model"
    what = f"{'a finished' if finished else 'an unfinished'} {command + ' ' if command else ''}run"
    return what + (f" (checkpoint-{steps[-1]})" if steps else "")


def _remove_run(path: Path, contents: list[str]) -> None:
    """overwrite_output_dir: delete what the old run wrote, so nothing of it mixes with the new one (a stale
    checkpoint would be what `resume_from_checkpoint=latest` picks; an old model would outlive a new run
    that fails)."""
    for name in contents:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for extra in ("adapter_config.json",):  # goes with the old weights
        (path / extra).unlink(missing_ok=True)


def _probe_writable(path: Path) -> None:
    """Fail now, in one line, if the folder cannot be created or written; leave no folder behind (a run that
    stops at a data error must not leave an empty run folder)."""
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".posttrain-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {path}: cannot write there ({e.strerror or e})") from None
    finally:
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass


def prepare_output_dir(cfg) -> Path:
    """Choose and check the run directory once, before anything is loaded, and store it in cfg.output_dir.

    No output_dir: runs/<command>, or the first of runs/<command>-2, -3, ... that holds no run (resuming
    `latest`: the newest of them). A given output_dir that holds a run is refused unless the run resumes from
    one of its checkpoints or overwrite_output_dir is set (then the old run's files are deleted first).
    Several processes: process 0 decides, the others follow."""
    if getattr(cfg, "_output_dir_ready", False):
        return Path(cfg.output_dir)
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if several else 0
    decided = [None]
    if rank == 0:
        try:
            decided[0] = ("ok", str(_choose_output_dir(cfg)))
        except (UserError, StorageError) as e:
            decided[0] = ("error", str(e))
    if several:
        dist.broadcast_object_list(decided, src=0)
    status, value = decided[0]
    if status == "error":
        raise UserError(value)
    cfg.output_dir = value
    cfg._output_dir_ready = True
    return Path(value)


def _choose_output_dir(cfg) -> Path:
    resume = cfg.resume_from_checkpoint
    if cfg.output_dir is None:
        base = Path("runs") / cfg.command
        taken = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 10_000)]
        existing = [p for p in taken if run_contents(p)]
        if resume == "latest" and existing and _checkpoint_steps(existing[-1]):
            out = existing[-1]
        else:
            out = next(p for p in taken if not run_contents(p))
        cfg._output_dir_default = True  # RunLog.start says where the run went
    else:
        out = Path(cfg.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"output_dir {out}: a file, not a folder")
        contents = run_contents(out)
        finished = any(c in WEIGHT_FILES or c.startswith("model-") for c in contents)
        # Resuming: from a checkpoint; or `latest` in a run killed before its first checkpoint, which then starts
        # over in its own folder (its partial logs are replaced). A finished run is never started over silently.
        resuming = bool(resume) and (resume != "latest" or bool(_checkpoint_steps(out)) or not finished)
        if contents and not resuming:
            if not cfg.overwrite_output_dir:
                hint = ("resume it with resume_from_checkpoint=latest, " if _checkpoint_steps(out) else "")
                raise UserError(f"output_dir {out} already holds {_describe(out, contents)}; {hint}set "
                                "overwrite_output_dir=true to replace it, or choose another output_dir")
            log.warning(f"overwrite_output_dir: deleting {_describe(out, contents)} in {out} ({', '.join(contents)})")
            _remove_run(out, contents)
    _probe_writable(out)
    return out


def eval_output_dir(path: Path, overwrite: bool) -> Path:
    """Where `posttrain eval output_dir=PATH` writes eval.json and completions.jsonl: PATH itself, or, when PATH
    holds a training run (evaluating a run into its own folder), the first free PATH/eval, eval-2, ... so no
    file of the run is replaced. A folder with an earlier eval.json is refused unless `overwrite`."""
    path = path.expanduser()
    training = [c for c in run_contents(path) if c != "completions.jsonl"]
    if training:
        subs = [path / "eval"] + [path / f"eval-{i}" for i in range(2, 10_000)]
        path = next(p for p in subs if not (p / "eval.json").exists() and not (p / "completions.jsonl").exists())
    elif ((path / "eval.json").exists() or (path / "completions.jsonl").exists()) and not overwrite:
        raise UserError(f"output_dir {path} already holds an evaluation (eval.json); set overwrite_output_dir=true "
                        "to replace it, or choose another output_dir")
    _probe_writable(path)
    return path


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def storage_error(e: OSError, out: Path) -> StorageError | None:
    """A StorageError saying what failed and which checkpoint is intact, for an OSError of the file system."""
    if e.errno not in STORAGE_ERRNOS:
        return None
    steps = _checkpoint_steps(out)
    last = (f"the last good checkpoint is {out / f'checkpoint-{steps[-1]}'} (resume with "
            "resume_from_checkpoint=latest)") if steps else "no checkpoint was written yet"
    where = e.filename or out
    return StorageError(f"cannot write {where}: {os.strerror(e.errno)}; the run stopped, {last}")
