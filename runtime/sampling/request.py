"""What the sampling loop takes and returns: the contract shared by the single-device loop
and the multi-GPU worker group (the sampler node cannot tell which one ran)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SCHEDULERS = ("unipc", "euler", "dpm++")


@dataclass
class SamplingRequest:
    positive: torch.Tensor
    """Prompt embeds [1, L, D] (UMT5 output, zero past the prompt's length)."""
    negative: torch.Tensor | None
    """Negative prompt embeds; None disables CFG (guidance is then ignored)."""
    latent_shape: tuple[int, int, int, int, int]
    """[B, C, T, H, W] of the raw (VAE-space) latent to produce."""
    seed: int
    steps: int
    guidance_scale: float = 5.0
    shift: float = 5.0
    scheduler: str = "unipc"
    denoise: float = 1.0
    init_latent: torch.Tensor | None = None
    """Raw VAE-space latent to start from (ComfyUI LATENT['samples']); needed when denoise < 1."""
    guidance_scale_2: float | None = None
    """Wan2.2 A14B: guidance for the low-noise expert (None: same as guidance_scale)."""
    boundary_ratio: float | None = None
    """Wan2.2 A14B: switch to the low-noise expert when t < boundary_ratio * 1000."""
    conditioning: dict[str, Any] = field(default_factory=dict)
    """Variant-specific conditioning (I2V image latents / CLIP embeds); empty for T2V."""


@dataclass
class StepTrace:
    index: int
    timestep: float
    expert: int
    """0: transformer (high-noise / only), 1: transformer_2 (low-noise)."""
    guidance_scale: float
    seconds: float = 0.0
    """Wall time of the step (device synchronised), for per-step performance dumps."""


@dataclass
class SamplingResult:
    latent: torch.Tensor
    """Raw VAE-space latent [B, C, T, H, W] in float32 on CPU (ComfyUI LATENT convention)."""
    trace: list[StepTrace] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    """Per-job statistics (cache hits, timings) for UI text and job results."""
