"""FP8 linear layers: row-wise e4m3 weights and activations, bounded error against bf16/fp32.

Bound used below: e4m3 keeps 3 mantissa bits, so rounding one value moves it by at most 2^-4
of itself (6.25%), and by ~2.5% RMS over a Gaussian row. A GEMM of two such operands has a
relative L2 error of ~3-4%; the tests allow 5e-2 per layer and for the whole tiny transformer.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

from wanflow.runtime import model_setup
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.fp8_linear import FP8_MAX, FP8Linear, quantize_linears, quantize_rows, scaled_mm_supported
from wanflow.runtime.models import load_diffusion_model
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG

LAYER_BOUND = 5e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[nn.Module, nn.Module, dict]:
    """The tiny transformer twice with the same weights (the second quantised), and inputs."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval().requires_grad_(False)
    quant = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval().requires_grad_(False)
    quant.load_state_dict(ref.state_dict())
    quantize_linears(quant)
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 16, TINY_TRANSFORMER_CONFIG["text_dim"], generator=g),
              "return_dict": False}
    return ref, quant, inputs


def test_row_quantisation_moves_each_value_by_at_most_one_sixteenth():
    x = torch.randn(64, 256, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = codes.double() * scale.double()
    # Relative 2^-4 for e4m3 normals; values under the smallest normal (2^-6 of the scale unit) lose
    # at most half a subnormal step, 2^-10 units.
    assert ((back - x).abs() <= x.abs() / 16 + scale.double() * 2**-10).all()


def test_each_row_uses_the_full_e4m3_range():
    codes, _ = quantize_rows(torch.randn(8, 64))
    assert torch.allclose(codes.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))


def test_an_all_zero_row_quantises_to_zeros():
    codes, scale = quantize_rows(torch.zeros(2, 32))
    assert torch.isfinite(scale).all() and (codes.float() == 0).all()


def test_fp8_linear_is_within_the_layer_bound_of_the_exact_linear():
    torch.manual_seed(2)
    linear = nn.Linear(256, 512)
    x = torch.randn(3, 40, 256)
    err = rel(FP8Linear(linear)(x), linear(x))
    assert 1e-3 < err < LAYER_BOUND  # really quantised, and not by more than e4m3 rounding


def test_only_the_block_linears_are_quantised(tiny_pair):
    _, quant, _ = tiny_pair
    fp8 = [n for n, m in quant.named_modules() if isinstance(m, FP8Linear)]
    assert fp8 and all(n.startswith("blocks.") for n in fp8)
    assert type(quant.proj_out) is nn.Linear
    # Per block: self- and cross-attention q, k, v, out and the two FFN layers.
    assert len(fp8) == 10 * TINY_TRANSFORMER_CONFIG["num_layers"]


def test_layers_narrower_than_min_features_stay_bf16():
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    assert quantize_linears(model, min_features=TINY_TRANSFORMER_CONFIG["ffn_dim"] + 1) == 0


def test_quantised_transformer_stays_within_the_bound_of_the_exact_one(tiny_pair):
    ref, quant, inputs = tiny_pair
    with torch.inference_mode():
        assert rel(quant(**inputs)[0], ref(**inputs)[0]) < LAYER_BOUND


def test_scaled_mm_is_not_claimed_on_the_cpu():
    assert not scaled_mm_supported(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
                    reason="row-wise FP8 _scaled_mm needs a CUDA GPU of compute capability >= 8.9")
def test_scaled_mm_path_matches_the_reference_path():
    torch.manual_seed(3)
    linear = nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 1000, 1536, device="cuda", dtype=torch.bfloat16)
    fast = FP8Linear(linear)
    assert fast.use_scaled_mm
    reference = FP8Linear(linear)
    reference.use_scaled_mm = False
    assert rel(fast(x), reference(x)) < 1e-2  # same codes; only accumulation order and bf16 out differ
    assert rel(fast(x), linear.float()(x.float())) < LAYER_BOUND


# ----------------------------------------------------------------------------- model_setup option
def fresh_model(tiny_models):
    return load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32)


def test_the_linear_fp8_extra_quantises_the_transformer(tiny_models):
    model = fresh_model(tiny_models)
    model_setup.prepare_for_sampling(model.replace(linear="fp8"))
    assert any(isinstance(m, FP8Linear) for m in model.transformer.modules())


def test_going_back_to_bf16_linears_asks_for_a_reload(tiny_models):
    model = fresh_model(tiny_models)
    model_setup.prepare_for_sampling(model.replace(linear="fp8"))
    with pytest.raises(InputValueError, match="load it again"):
        model_setup.prepare_for_sampling(model.replace(linear="bf16"))


def test_an_unknown_linear_mode_names_the_choices(tiny_models):
    with pytest.raises(InputValueError, match="bf16, fp8"):
        model_setup.prepare_for_sampling(fresh_model(tiny_models).replace(linear="int4"))
