"""Data: formats and validation (formats.py), tokenization and batches (tokenize.py), built-in tasks."""

from __future__ import annotations

import logging

from posttrain.config import UserError
from posttrain.data.formats import Dataset, load_dataset, report_skipped
from posttrain.data.tokenize import encode_rows

log = logging.getLogger("posttrain")

__all__ = ["Dataset", "load_dataset", "load_train_eval", "encode_dataset"]


def load_train_eval(cfg, kind: str, default: str) -> tuple[Dataset, Dataset | None]:
    """The config's training (or the command's built-in default) and eval datasets, validated."""
    config = getattr(cfg, "dataset_config", None)
    train = load_dataset(
        cfg.dataset or default, kind, split=cfg.dataset_split, skip_invalid=cfg.skip_invalid, max_samples=cfg.max_samples,
        config=config,
    )
    evald = None
    if cfg.eval_dataset:
        # The same hub dataset for evaluation (TRL's dataset_test_split) shares its configuration.
        evald = load_dataset(cfg.eval_dataset, kind, split=cfg.eval_split, skip_invalid=cfg.skip_invalid,
                             max_samples=cfg.eval_max_samples, config=config if cfg.eval_dataset == cfg.dataset else None)
    return train, evald


def encode_dataset(ds: Dataset, encode_fn) -> list:
    """Tokenize every row; report rows skipped as invalid and rows dropped by truncation."""
    try:
        examples, dropped = encode_rows(ds.rows, encode_fn)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(ds.name) else f"{ds.name}: {msg}") from None
    for line in report_skipped(ds):
        log.warning(line)
    for reason, n in dropped.items():
        log.warning(f"{ds.name}: dropped {n} row(s): {reason}")
    if not examples:
        raise UserError(f"{ds.name}: no usable examples")
    return examples
