"""Session-wide fixtures shared by every test module."""
from __future__ import annotations

import pytest
import torch

from wanflow.runtime.tiny import TinyModelPaths, make_tiny_models


# Tiny models gain nothing from intra-op threads; on 2 shared cores extra threads made tests
# up to 10x slower (and spawned ranks of the parallel tests would oversubscribe).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    """The tiny smoke-test models in ComfyUI's models layout, built once per session."""
    return make_tiny_models(tmp_path_factory.mktemp("models"))
