"""Offload modes move weights, never change results."""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanflow.runtime.errors import InputValueError
from wanflow.runtime.offload import OFFLOAD_MODES, apply_offload, onloaded
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG


def _model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 3}).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 2, 8, 8, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 6, TINY_TRANSFORMER_CONFIG["text_dim"], generator=gen),
        "return_dict": False,
    }


@pytest.fixture(scope="session")
def reference(inputs) -> torch.Tensor:
    with torch.no_grad():
        return _model()(**inputs)[0]


@pytest.mark.parametrize("mode", OFFLOAD_MODES)
def test_every_offload_mode_gives_the_default_output(mode, inputs, reference):
    model = _model()
    assert apply_offload(model, mode, "cpu") == mode
    with torch.no_grad(), onloaded(model, "cpu") if mode == "model" else torch.no_grad():
        out = model(**inputs)[0]
    assert torch.equal(out, reference)


class _Recording(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.moves: list[str] = []

    def to(self, device, *args, **kwargs):
        self.moves.append(str(device))
        return self


def test_onloaded_moves_in_for_the_block_and_back_to_the_cpu_even_on_error():
    model = _Recording()
    with pytest.raises(RuntimeError), onloaded(model, "cuda"):
        assert model.moves == ["cuda"]
        raise RuntimeError("job failed")
    assert model.moves == ["cuda", "cpu"]


def test_unknown_offload_mode_is_a_clear_input_error():
    with pytest.raises(InputValueError, match="unknown offload mode 'disk'") as err:
        apply_offload(torch.nn.Linear(2, 2), "disk", "cpu")
    assert err.value.input_name == "offload"


def test_streaming_modes_need_a_diffusers_model():
    with pytest.raises(InputValueError, match="'block' needs a diffusers model"):
        apply_offload(torch.nn.Linear(2, 2), "block", "cpu")
