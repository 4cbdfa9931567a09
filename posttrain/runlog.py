"""What a run leaves for people to read, owned in one place: config.yaml, metrics.jsonl, samples.jsonl (a few
completions per step of online runs), the trackers of `report_to`, the live diagnostics and report.html.

The engine calls a `RunLog` where it logs. Nothing here feeds back into training, and a failure here (a
tracker that cannot reach its server, a report that cannot be written) is a warning, never a stopped run.
Only the main process writes; on the others every method does nothing.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
from pathlib import Path

import yaml

from posttrain.config import TRACKERS, config_to_dict, resolve_report_to

log = logging.getLogger("posttrain")

def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, out: Path, cfg, run_name: str, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events the abandoned run logged after its checkpoint.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```")

    def log(self, row: dict, step: int) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, out: Path, cfg, run_name: str, start: int):
        import os

        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "posttrain"), name=run_name,
                     config=config_to_dict(cfg), resume="allow" if start else "never")

    def log(self, row: dict, step: int) -> None:
        self.trackio.log(_scalars(row), step=step)

    def close(self) -> None:
        self.trackio.finish()


class _WandB:
    def __init__(self, out: Path, cfg, run_name: str, start: int):
        import os

        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), name=run_name,
                              config=config_to_dict(cfg), dir=str(out), resume="allow" if start else None)

    def log(self, row: dict, step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _WandB}


def _json_or_none(line: str):
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    """Replace a file's content all at once: a kill in the middle leaves the old file, not half of the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLog:
    def __init__(self, cfg, out: Path, tokenizer=None, has_eval: bool = False, enabled: bool = True):
        self.cfg, self.out, self.enabled = cfg, Path(out), enabled
        self.command = getattr(cfg, "command", "train")
        self.run_name = getattr(cfg, "run_name", None) or self.out.resolve().name
        self.trackers: dict[str, object] = {}
        self.diagnostics = None
        if enabled and getattr(cfg, "diagnostics", None) is not None:
            from posttrain.diagnostics import Context, Diagnostics

            has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else True
            self.diagnostics = Diagnostics(Context(self.command, cfg, has_template, has_eval))
        self._report_failed = False

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"

    # --- start -------------------------------------------------------------------------------------
    def start(self, step: int = 0) -> None:
        """Write config.yaml; on a resume keep only the rows up to the checkpoint; open the trackers."""
        if not self.enabled:
            return
        if getattr(self.cfg, "_output_dir_default", False):
            log.info(f"output_dir not set: this run writes to {self.out}")
        self.out.mkdir(parents=True, exist_ok=True)
        header = f"# posttrain {self.command}: the resolved config of this run\n"
        (self.out / "config.yaml").write_text(header + yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        kept = []
        for name in ("metrics.jsonl", "samples.jsonl", "completions.jsonl"):
            path = self.out / name
            if not path.exists():
                continue
            if step == 0:
                path.unlink()
                continue
            # Resuming from an earlier checkpoint: rows logged after it belong to the abandoned run, and so
            # does a last line cut short by a kill or a full disk.
            rows = [r for r in (_json_or_none(line) for line in path.read_text().splitlines())
                    if r is not None and r.get("step", 0) <= step]
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
            if name == "metrics.jsonl":
                kept = rows
        if self.diagnostics is not None and kept:
            self.diagnostics.replay(kept)
        for name in resolve_report_to(getattr(self.cfg, "report_to", None) or []):
            module, install = TRACKERS[name]
            if importlib.util.find_spec(module) is None:
                log.warning(f"report_to: {name} is not installed ({install}); the run goes on without it")
                continue
            try:
                self.trackers[name] = _OPENERS[name](self.out, self.cfg, self.run_name, step)
            except Exception as e:  # a tracker that cannot start (no login, no server) must not stop training
                log.warning(f"report_to: {name} could not start ({type(e).__name__}: {' '.join(str(e).split())}); "
                            "the run goes on without it")
        if self.trackers:
            atexit.register(self.close)  # a crashed run still flushes what it logged

    # --- during the run ----------------------------------------------------------------------------
    def step(self, row: dict, write: bool = True) -> dict:
        """One step's row (or an eval row): the diagnostics look at it; what fired is printed and added to the
        row, which is then written (even on a step logging_steps skips, so the flag lands on its own step)."""
        if not self.enabled:
            return row
        if self.diagnostics is not None:
            for finding in self.diagnostics.observe(row):
                log.warning(finding.message())
                row[f"diagnostics/{finding.rule.name}"] = 1
                write = True
        if not write:
            return row
        with (self.out / "metrics.jsonl").open("a") as f:
            # 8 significant digits, not 8 decimals: learning rates like 2e-5 x a schedule factor keep precision.
            f.write(json.dumps({k: (float(f"{v:.8g}") if isinstance(v, float) else v) for k, v in row.items()}) + "\n")
        step = int(row.get("step", 0))
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(row, step)
            except Exception as e:
                log.warning(f"report_to: {name} failed ({type(e).__name__}: {' '.join(str(e).split())}); "
                            "no more metrics go to it")
                self.trackers.pop(name)
        return row

    def samples(self, step: int, samples: list[dict], name: str = "samples.jsonl") -> None:
        """Completions of the batch that `step` trains on (online runs): a few for the report in samples.jsonl,
        or every one in completions.jsonl (`log_completions`). Each row carries the step, so a resumed run
        drops those of the abandoned steps and logs them again, exactly once."""
        if not self.enabled or not samples:
            return
        with (self.out / name).open("a") as f:
            f.write("".join(json.dumps({"step": step, **s}, default=str) + "\n" for s in samples))

    def write_report(self) -> Path | None:
        if not self.enabled:
            return None
        try:
            from posttrain.report import write_report

            write_report([self.out], self.report_path)
            return self.report_path
        except Exception as e:  # the report is for reading; training goes on without it
            if not self._report_failed:
                log.warning(f"report: could not write {self.report_path} ({type(e).__name__}: {e})")
            self._report_failed = True
            return None

    # --- end ---------------------------------------------------------------------------------------
    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.close()
            except Exception as e:
                log.warning(f"report_to: {name} did not close cleanly ({type(e).__name__}: {e})")
        self.trackers = {}
        atexit.unregister(self.close)

    def finish(self) -> None:
        """End of the run (or an interruption): close the trackers, write the report, and name it last."""
        if not self.enabled:
            return
        self.close()
        if self.write_report() is not None:
            print(f"report: {self.report_path}", flush=True)
