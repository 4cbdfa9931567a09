from pathlib import Path

import pytest
import torch

from posttrain.testing import save_tiny, tiny_model, tiny_tokenizer

# One thread: tiny-model ops are latency-bound, and a second spinning OpenMP thread makes them orders of
# magnitude slower whenever anything else shares the CPU (as in CI and parallel test runs).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def pytest_sessionstart(session):
    """Print the versions this run resolved (also under -q, which hides the report header): a failure after a
    dependency release then names what changed."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_versions())


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft", "datasets", "trl"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "posttrain dependencies: " + ", ".join(found)
