"""Cheap, approximate latent -> RGB previews for progress display.

Not a decode: each latent cell is standardized per channel and projected onto the three
principal components of the frame's own channel covariance (PC1 -> R, PC2 -> G, PC3 -> B).
That shows the frame's structure (shapes, motion, regions) with false colours, for any Wan
latent space and without fitted per-model colour factors. Signs of the components are fixed
(largest loading positive) so colours do not flip from one step to the next.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import InputValueError

_SPREAD = 2.0
"""Standard deviations of the first component mapped onto half the 0..255 range."""


def latent_preview_rgb(latent: torch.Tensor, frame: int = -1) -> Image.Image:
    """RGB image (latent resolution, W x H) of one latent frame of the first batch item.

    latent: [B, C, T, H, W] or [C, T, H, W], raw or normalized (the projection does not care:
    per-channel standardization removes any per-channel affine map).
    """
    if latent.ndim == 5:
        latent = latent[0]
    if latent.ndim != 4:
        raise InputValueError(
            f"preview needs a latent [B,C,T,H,W] or [C,T,H,W], got shape {tuple(latent.shape)}",
            input_name="latent",
        )
    channels, frames, height, width = latent.shape
    if channels < 3:
        raise InputValueError(f"preview needs at least 3 latent channels, got {channels}", input_name="latent")
    if not -frames <= frame < frames:
        raise InputValueError(f"frame {frame} is outside the latent's {frames} frames", input_name="frame")
    cells = latent[:, frame].detach().float().reshape(channels, -1).T  # [H*W, C]
    cells = (cells - cells.mean(0)) / cells.std(0, correction=0).clamp_min(1e-6)
    # Eigen-decomposition of the CxC covariance: C is 16 or 48, so this costs nothing.
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(cells.T, correction=0))
    order = torch.argsort(eigvals, descending=True)[:3]
    components = eigvecs[:, order]
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    components = components * signs
    projected = cells @ components  # [H*W, 3]
    # One scale for all three (that of PC1): weak components stay near grey instead of
    # having their noise stretched to full-range colour.
    projected = projected / projected[:, 0].std(correction=0).clamp_min(1e-6)
    rgb = (0.5 + projected / (2 * _SPREAD)).clamp(0, 1)
    pixels = (rgb * 255).round().to(torch.uint8).reshape(height, width, 3).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))
