"""Wan latent spaces: channel counts, VAE strides and the per-channel statistics that map the
raw VAE latent (ComfyUI's LATENT convention) to the normalized space the transformer sees.

The statistics are the `latents_mean` / `latents_std` of the shipped `AutoencoderKLWan`
configs (models/configs/vae-*.json): Wan2.1 = the class defaults (16 channels, also used by
Wan2.2 A14B), Wan2.2 = the TI2V-5B VAE (48 channels, `vae22_diffusers_config` in diffusers'
convert_wan_to_diffusers.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputValueError
from ..models.variants import load_shipped_config

PATCH_SIZE = 2
"""The transformer's spatial patch: latent H and W must be even."""


@dataclass(frozen=True)
class LatentFormat:
    channels: int
    spatial: int
    """Pixels per latent cell along width and height."""
    temporal: int
    """Frames per latent frame (after the first)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def size_multiple(self) -> int:
        return self.spatial * PATCH_SIZE

    def stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels, 1, 1, 1)
        mean = torch.tensor(self.mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std


def _from_vae_config(vae_family: str) -> LatentFormat:
    config = load_shipped_config(f"vae-{vae_family}")
    return LatentFormat(
        channels=config["z_dim"],
        spatial=config["scale_factor_spatial"],
        temporal=config["scale_factor_temporal"],
        mean=tuple(config["latents_mean"]),
        std=tuple(config["latents_std"]),
    )


# Read from the VAE configs the loader builds from, so the two can never disagree.
LATENT_FORMATS: dict[str, LatentFormat] = {family: _from_vae_config(family) for family in ("wan2.1", "wan2.2")}


def latent_format(vae_family: str) -> LatentFormat:
    try:
        return LATENT_FORMATS[vae_family]
    except KeyError:
        raise ValueError(
            f"unknown VAE family {vae_family!r} (known: {', '.join(LATENT_FORMATS)})"
        ) from None


def normalize(raw: torch.Tensor, vae_family: str) -> torch.Tensor:
    """Raw VAE latent [B,C,T,H,W] -> the transformer's space: (raw - mean) / std."""
    mean, std = latent_format(vae_family).stats(raw)
    return (raw - mean) / std


def denormalize(x: torch.Tensor, vae_family: str) -> torch.Tensor:
    """Inverse of `normalize`."""
    mean, std = latent_format(vae_family).stats(x)
    return x * std + mean


def validate_video_size(width: int, height: int, frames: int, vae_family: str) -> None:
    """Raise InputValueError naming the first input (width/height/length) the model cannot use."""
    fmt = latent_format(vae_family)
    multiple = fmt.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            lower = max(value // multiple * multiple, multiple)
            raise InputValueError(
                f"{name} {value} is not a multiple of {multiple} (e.g. {lower} or {lower + multiple})",
                input_name=name,
            )
    if frames < 1 or (frames - 1) % fmt.temporal:
        below = max((frames - 1) // fmt.temporal * fmt.temporal + 1, 1)
        raise InputValueError(
            f"length {frames} must be {fmt.temporal}n+1 (e.g. {below} or {below + fmt.temporal})",
            input_name="length",
        )


def latent_shape(
    width: int, height: int, frames: int, batch: int, vae_family: str
) -> tuple[int, int, int, int, int]:
    """[B, C, T, H, W] of the raw latent for a video of this size (validated)."""
    validate_video_size(width, height, frames, vae_family)
    if batch < 1:
        raise InputValueError(f"batch_size {batch} must be at least 1", input_name="batch_size")
    fmt = latent_format(vae_family)
    return (
        batch,
        fmt.channels,
        (frames - 1) // fmt.temporal + 1,
        height // fmt.spatial,
        width // fmt.spatial,
    )
