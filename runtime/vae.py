"""The Wan VAE: loading (ComfyUI single file or diffusers folder), decode and encode.

Latents here are raw VAE latents (ComfyUI's LATENT convention); normalising them with
latents_mean/std is the sampler's business. Images are ComfyUI IMAGEs: float32 on CPU,
[frames, H, W, 3] in 0..1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputValueError, ModelFileError
from .models.detect import detect_file_kind, ensure_kind
from .models.single_file import (
    SafetensorsHeader,
    load_into_empty,
    load_pretrained,
    read_header,
    vae_key_map,
    vae_layout,
)
from .models.variants import load_shipped_config

log = logging.getLogger(__name__)


@dataclass
class WanVAE:
    model: torch.nn.Module
    """diffusers `AutoencoderKLWan`."""
    dtype: torch.dtype
    device: torch.device
    family: str
    """"wan2.1" (z 16, ×8 spatial) | "wan2.2" (z 48, ×16 spatial)."""
    source: str = ""

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def spatial_ratio(self) -> int:
        return self.model.config.scale_factor_spatial


def load_vae(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> WanVAE:
    """A Wan2.1 or Wan2.2 VAE from a ComfyUI single file (original Wan layout), a diffusers
    `vae/` folder or a diffusers pipeline folder."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        model, dtype = load_pretrained(AutoencoderKLWan, folder, dtype=dtype, device=device, what="Wan VAE")
        family = "wan2.2" if model.config.is_residual else "wan2.1"
        return WanVAE(model=model, dtype=dtype, device=torch.device(device), family=family, source=str(path))

    header = read_header(path)
    ensure_kind(detect_file_kind(header.tensors), "vae", header.name, file=str(path))
    if "decoder.middle.0.residual.0.gamma" not in header.tensors:
        raise ModelFileError(f"{header.name} is a VAE in diffusers layout: load its folder (with config.json)",
                             file=str(path))
    family = vae_layout(header.tensors)
    config = _vae_config(header, family)
    dtype = dtype or header.float_dtype()
    model = load_into_empty(header, lambda: AutoencoderKLWan.from_config(config), vae_key_map(header.tensors),
                            dtype=dtype, device=device)
    log.info("loaded %s VAE %s (%s)", family, header.name, dtype)
    return WanVAE(model=model, dtype=dtype, device=torch.device(device), family=family, source=str(path))


def _vae_config(header: SafetensorsHeader, family: str) -> dict:
    """The shipped config of `family` with the widths the file actually has."""
    config = load_shipped_config(f"vae-{family}")
    encoder_in = header.shape("encoder.conv1.weight")
    decoder_out = header.shape("decoder.head.2.weight")
    z_dim = header.shape("conv2.weight")[0]
    if z_dim != len(config["latents_mean"]):
        raise ModelFileError(
            f"unknown Wan VAE: {header.name} has {z_dim} latent channels, a {family} VAE has "
            f"{len(config['latents_mean'])}", file=str(header.path), key="conv2.weight")
    config.update(base_dim=encoder_in[0], in_channels=encoder_in[1], z_dim=z_dim,
                  decoder_base_dim=decoder_out[1], out_channels=decoder_out[0])
    return config


@torch.no_grad()
def decode(vae: WanVAE, latent: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
    """Raw latent [B, C, T, H, W] -> IMAGE [B*frames, H*ratio, W*ratio, 3], float32 CPU, 0..1.
    tiled: decode in overlapping spatial tiles (diffusers' tiling): ~5x less memory at 480p,
    about twice the time (BENCHMARKS.md)."""
    if latent.dim() != 5 or latent.shape[1] != vae.z_dim:
        raise InputValueError(
            f"latent of shape {list(latent.shape)} does not fit this {vae.family} VAE: expected "
            f"[B, {vae.z_dim}, T, H, W]", input_name="samples")
    # The VAE object is shared through the model cache: set tiling for this call either way.
    if tiled:
        vae.model.enable_tiling()
    else:
        vae.model.disable_tiling()
    video = vae.model.decode(latent.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
    frames = video.float().permute(0, 2, 3, 4, 1).flatten(0, 1)  # [B*F, H, W, 3]
    return ((frames + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def encode(vae: WanVAE, images: torch.Tensor) -> torch.Tensor:
    """IMAGE [N, H, W, 3] in 0..1 (N frames of one video) -> raw latent [1, C, T, h, w]
    (the mode of the posterior, as ComfyUI encodes), float32 CPU."""
    ratio = vae.spatial_ratio
    if images.dim() != 4 or images.shape[-1] != 3:
        raise InputValueError(f"images of shape {list(images.shape)} are not [N, H, W, 3]", input_name="images")
    if images.shape[1] % ratio or images.shape[2] % ratio:
        raise InputValueError(
            f"image size {images.shape[2]}x{images.shape[1]} is not a multiple of {ratio} "
            f"(the {vae.family} VAE's spatial ratio)", input_name="images")
    video = images.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1  # [1, 3, N, H, W] in -1..1
    posterior = vae.model.encode(video.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mode().float().cpu()
