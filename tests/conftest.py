"""Session-wide fixtures shared by every test module."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from wanflow.runtime.server.app import ServeOptions
from wanflow.runtime.tiny import TinyModelPaths, make_tiny_models


# Tiny models gain nothing from intra-op threads; on 2 shared cores extra threads made tests
# up to 10x slower (and spawned ranks of the parallel tests would oversubscribe).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    """The tiny smoke-test models in ComfyUI's models layout, built once per session."""
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def serve_options(tiny_models: TinyModelPaths) -> Callable[..., ServeOptions]:
    """Options for a test server on the tiny models: an ephemeral loopback port, every folder it
    writes under `root`; keyword arguments override any option."""

    def make(root: Path, **overrides: Any) -> ServeOptions:
        folders = {f"{name}_dir": root / name for name in ("output", "input", "temp", "user")}
        return ServeOptions(**{"models_dir": tiny_models.root, "port": 0, **folders, **overrides})

    return make
