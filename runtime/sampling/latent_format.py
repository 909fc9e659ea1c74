"""Wan latent spaces: channel counts, VAE strides and the per-channel statistics that map the
raw VAE latent (ComfyUI's LATENT convention) to the normalized space the transformer sees.

The statistics are the `latents_mean` / `latents_std` of diffusers' `AutoencoderKLWan`
configs: Wan2.1 = the class defaults (16 channels, also used by Wan2.2 A14B), Wan2.2 = the
TI2V-5B VAE (48 channels, `vae22_diffusers_config` in diffusers' convert_wan_to_diffusers.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputValueError

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


LATENT_FORMATS: dict[str, LatentFormat] = {
    "wan2.1": LatentFormat(
        channels=16,
        spatial=8,
        temporal=4,
        mean=(
            -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
        ),
        std=(
            2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
        ),
    ),
    "wan2.2": LatentFormat(
        channels=48,
        spatial=16,
        temporal=4,
        mean=(
            -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
            -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
            -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
            -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
            -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
            0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
        ),
        std=(
            0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
            0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
            0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
            0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
            0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
            0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
        ),
    ),
}


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
