"""Speed / memory options reach the shared transformer once per change, and keep results."""
from __future__ import annotations

import pytest
import torch

from wanflow import NODE_CLASS_MAPPINGS
from wanflow.runtime import model_setup
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.models import load_diffusion_model
from wanflow.runtime.sampling.loop import sample
from wanflow.runtime.sampling.request import SamplingRequest


def options(model, **kw):
    cls = NODE_CLASS_MAPPINGS["WanflowModelOptions"]
    return getattr(cls(), cls.FUNCTION)(model=model, **kw)[0]


def fresh_model(tiny_models):
    # A model of its own (not from the loader cache): these tests change its processors/offload.
    return load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32)


def request(model) -> SamplingRequest:
    g = torch.Generator().manual_seed(0)
    dim = model.transformer.config.text_dim
    return SamplingRequest(positive=torch.randn(1, 16, dim, generator=g), negative=torch.randn(1, 16, dim, generator=g),
                           latent_shape=(1, 16, 2, 8, 8), seed=3, steps=3)


def test_math_attention_gives_the_sdpa_result(tiny_models):
    model = fresh_model(tiny_models)
    sdpa = sample(options(model, attention="sdpa"), request(model)).latent
    math = sample(options(model, attention="math"), request(model)).latent
    assert (math - sdpa).norm() / sdpa.norm() < 1e-5


def test_a_second_job_with_the_same_options_does_not_reapply_them(tiny_models, monkeypatch):
    model = options(fresh_model(tiny_models), attention="math")
    sample(model, request(model))
    calls = []
    monkeypatch.setattr(model_setup, "apply_attention_backend", lambda *a, **k: calls.append(a))
    sample(model, request(model))
    assert calls == []


def test_block_offload_keeps_the_result(tiny_models):
    resident = fresh_model(tiny_models)
    expected = sample(resident, request(resident)).latent
    streamed = options(fresh_model(tiny_models), offload="block")
    assert torch.allclose(sample(streamed, request(streamed)).latent, expected, rtol=1e-5, atol=1e-6)


def test_changing_offload_of_an_offloaded_model_asks_for_a_reload(tiny_models):
    model = options(fresh_model(tiny_models), offload="block")
    sample(model, request(model))
    with pytest.raises(InputValueError, match="load it again"):
        model_setup.prepare_for_sampling(model.replace(offload="leaf"))


def test_unknown_attention_backend_is_refused_naming_it(tiny_models):
    model = fresh_model(tiny_models).replace(attention="warp-speed")
    with pytest.raises(InputValueError, match="warp-speed"):
        sample(model, request(model))


def test_text_encoder_offload_gives_the_same_embeds_and_leaves_it_on_the_cpu(tiny_models):
    from wanflow.runtime.text import encode_prompts, load_text_encoder

    te = load_text_encoder(tiny_models.text_encoder, dtype=torch.float32)
    resident = encode_prompts(te, "a fox", "blurry")
    offloaded = encode_prompts(te, "a fox", "blurry", offload=True)
    assert torch.equal(resident.positive, offloaded.positive)
    assert torch.equal(resident.negative, offloaded.negative)
    assert next(te.model.parameters()).device.type == "cpu"


def test_tiled_vae_decode_stays_close_to_the_full_decode(tiny_models):
    from wanflow.runtime.vae import decode, load_vae

    vae = load_vae(tiny_models.vae, dtype=torch.float32)
    # Large enough (in pixels) for diffusers' default tiles to split it.
    latent = torch.randn(1, 16, 2, 48, 48, generator=torch.Generator().manual_seed(0))
    tiled, full = decode(vae, latent, tiled=True), decode(vae, latent)
    assert vae.model.use_tiling is False  # a shared VAE: the untiled call switched tiling off again
    assert not torch.equal(full, tiled)  # the tiled path really ran
    assert full.shape == tiled.shape
    assert (full - tiled).abs().mean() < 0.05
