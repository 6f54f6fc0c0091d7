"""Shared fixtures: one torch thread everywhere; a tiny exported model (once per session) and
fresh stores for the service tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import service_fixtures as sf


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster than two fighting, and results stay deterministic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_version(tmp_path_factory) -> sf.ModelVersion:
    """One real export (tiny random checkpoints, ONNX + TorchScript) in a source store."""
    base = tmp_path_factory.mktemp("tiny-export")
    return sf.export_tiny(base / "store", base / "ckpt")


@pytest.fixture
def service_store(tmp_path, tiny_version) -> Path:
    """A fresh store holding the tiny model as cifar10-atop version 1."""
    root = tmp_path / "store"
    sf.republish(root, tiny_version)
    return root
