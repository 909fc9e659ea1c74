"""Wan VAE: single-file (original layout) and diffusers-folder loading, decode/encode conventions."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from wanflow.runtime.errors import InputValueError
from wanflow.runtime.models.single_file import vae_keys_to_original
from wanflow.runtime.models.variants import load_shipped_config
from wanflow.runtime.vae import decode, encode, load_vae


def _latent(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vae(tiny_models):
    return load_vae(tiny_models.vae, dtype=torch.float32)


def test_single_file_and_folder_decode_identically(tiny_models, vae):
    folder = load_vae(tiny_models.diffusers, dtype=torch.float32)
    latent = _latent(1, 16, 2, 4, 4)
    assert vae.family == folder.family == "wan2.1"
    assert torch.equal(decode(vae, latent), decode(folder, latent))


def test_decode_gives_comfy_images_frames_on_the_batch_axis(vae):
    latent = _latent(2, 16, 2, 4, 6)  # 2 videos of (2-1)*4+1 = 5 frames, 32x48 pixels
    images = decode(vae, latent)
    assert images.shape == (2 * 5, 32, 48, 3)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    assert torch.allclose(images[:5], decode(vae, latent[:1]), atol=1e-6)


def test_decode_applies_no_latent_normalisation(vae):
    # A raw latent goes straight into the decoder: scaling it must change the frames.
    latent = _latent(1, 16, 1, 4, 4)
    assert not torch.allclose(decode(vae, latent), decode(vae, latent * 2))


def test_encode_returns_a_raw_latent_of_the_right_shape(vae):
    images = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    latent = encode(vae, images)
    assert latent.shape == (1, 16, 2, 4, 6) and latent.dtype == torch.float32


def test_decode_rejects_a_latent_with_the_wrong_channels(vae):
    with pytest.raises(InputValueError, match=r"expected \[B, 16, T, H, W\]"):
        decode(vae, _latent(1, 48, 2, 4, 4))


def test_encode_rejects_sizes_off_the_vae_grid(vae):
    with pytest.raises(InputValueError, match="not a multiple of 8"):
        encode(vae, torch.rand(1, 30, 32, 3))


def test_wan22_vae_single_file_loads_in_its_nested_layout(tmp_path):
    config = {**load_shipped_config("vae-wan2.2"), "base_dim": 8, "decoder_base_dim": 16}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = AutoencoderKLWan.from_config(config).eval()
    sd = reference.state_dict()
    original = {o: sd[d].contiguous() for o, d in vae_keys_to_original(sd, "wan2.2").items()}
    assert "encoder.downsamples.0.downsamples.0.residual.0.gamma" in original
    path = tmp_path / "tiny_wan22_vae.safetensors"
    save_file(original, str(path))
    loaded = load_vae(path)
    assert (loaded.family, loaded.z_dim, loaded.spatial_ratio) == ("wan2.2", 48, 16)
    latent = _latent(1, 48, 1, 2, 2)
    with torch.no_grad():
        expected = reference.decode(latent, return_dict=False)[0]
    assert torch.equal(decode(loaded, latent), ((expected.permute(0, 2, 3, 4, 1).flatten(0, 1) + 1) / 2).clamp(0, 1))
