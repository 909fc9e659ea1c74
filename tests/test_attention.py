"""Attention backends: every backend gives the transformer the same output as diffusers'
default; unknown or unavailable names fail clearly."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from wanflow.runtime.attention import (
    BACKENDS,
    WanKernelAttnProcessor,
    apply_attention_backend,
    apply_rope,
    available_backends,
    reference_kernel,
    set_self_attention_processor,
)
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 2})
    return model.to(device, dtype).eval().requires_grad_(False)


def _inputs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 3, 8, 12, generator=gen).to(device, dtype),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, 7, TINY_TRANSFORMER_CONFIG["text_dim"], generator=gen).to(device, dtype),
        "return_dict": False,
    }


@pytest.fixture(scope="session")
def tiny():
    model = _model()
    inputs = _inputs()
    with torch.no_grad():
        default = model(**inputs)[0]
    return model, inputs, default


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "auto"])
def test_each_available_backend_matches_the_default_output(tiny, name):
    model, inputs, default = tiny
    reason = available_backends("cpu", torch.float32)[name]
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    assert apply_attention_backend(model, name) == name
    with torch.no_grad():
        out = model(**inputs)[0]
    assert _rel(out, default) < 1e-5


def test_auto_resolves_to_an_available_backend_on_cpu(tiny):
    model, inputs, default = tiny
    resolved = apply_attention_backend(model, "auto")
    assert available_backends("cpu", torch.float32)[resolved] is None
    with torch.no_grad():
        assert _rel(model(**inputs)[0], default) < 1e-5


def test_unknown_backend_name_is_a_clear_input_error(tiny):
    with pytest.raises(InputValueError, match="unknown attention backend 'flashy'") as err:
        apply_attention_backend(tiny[0], "flashy")
    assert err.value.input_name == "attention"


def test_unavailable_backend_names_itself_and_the_reason(tiny):
    with pytest.raises(InputValueError, match="'int8' is not available here: needs a Hopper"):
        apply_attention_backend(tiny[0], "int8")


def test_every_backend_name_is_reported_with_none_or_a_reason():
    reasons = available_backends("cpu", torch.float32)
    assert set(reasons) == set(BACKENDS)
    assert reasons["auto"] is None and reasons["sdpa"] is None
    assert all(r is None or (isinstance(r, str) and r) for r in reasons.values())


def test_kernel_processor_with_the_reference_kernel_matches_the_default(tiny):
    """Our processor (diffusers' projections + a (q, k, v, cos, sin) kernel) is exact."""
    model, inputs, default = tiny
    set_self_attention_processor(model, WanKernelAttnProcessor(reference_kernel, "reference"))
    with torch.no_grad():
        out = model(**inputs)[0]
    apply_attention_backend(model, "sdpa")
    assert _rel(out, default) < 1e-5


def test_custom_kernels_take_self_attention_only(tiny):
    model = tiny[0]
    set_self_attention_processor(model, WanKernelAttnProcessor(reference_kernel, "reference"))
    kinds = {
        (m.is_cross_attention, type(m.processor).__name__) for m in model.modules() if isinstance(m, WanAttention)
    }
    apply_attention_backend(model, "sdpa")
    assert kinds == {(False, "WanKernelAttnProcessor"), (True, "WanAttnProcessor")}


def test_switching_back_restores_diffusers_processors(tiny):
    model = tiny[0]
    set_self_attention_processor(model, WanKernelAttnProcessor(reference_kernel, "reference"))
    apply_attention_backend(model, "math")
    processors = [m.processor for m in model.modules() if isinstance(m, WanAttention)]
    assert all(type(p) is WanAttnProcessor and p._attention_backend.value == "_native_math" for p in processors)
    apply_attention_backend(model, "sdpa")


def test_apply_rope_rotates_each_pair_by_its_angle():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 2, 8)
    theta = torch.rand(5, 4) * 2 * math.pi
    # diffusers' tables repeat each angle for both members of a pair.
    cos = theta.cos().repeat_interleave(2, -1).view(1, 5, 1, 8)
    sin = theta.sin().repeat_interleave(2, -1).view(1, 5, 1, 8)
    as_complex = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(theta), theta)[None, :, None]).flatten(-2)
    assert torch.allclose(apply_rope(x, cos, sin), expected, atol=1e-6)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["int8", "fp8", "int8_pv16", "sage"])
def test_quantised_backends_stay_close_to_sdpa_on_gpu(name):
    reason = available_backends("cuda", torch.bfloat16)[name]
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    model = _model("cuda", torch.bfloat16)
    inputs = _inputs("cuda", torch.bfloat16)
    with torch.no_grad():
        ref = model(**inputs)[0]
        apply_attention_backend(model, name)
        out = model(**inputs)[0]
    assert _rel(out, ref) < 2e-2
