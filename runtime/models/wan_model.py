"""The loaded diffusion model as every stage sees it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .variants import VariantSpec


@dataclass
class WanModel:
    """Transformer(s) + what they are + how they run.

    `transformer` is a diffusers `WanTransformer3DModel`. For Wan2.2 A14B it is the
    high-noise expert and `transformer_2` the low-noise one (diffusers' naming).
    Nodes that change how the model runs (LoRA, cache, parallel) return a copy via `replace`.
    """

    transformer: torch.nn.Module
    variant: VariantSpec
    dtype: torch.dtype
    device: torch.device
    transformer_2: torch.nn.Module | None = None
    sources: tuple[str, ...] = ()
    loras: tuple[Any, ...] = ()
    cache: Any = None
    """runtime.cache config applied at sampling time, or None."""
    parallel: Any = None
    """runtime.parallel config; None runs on one device."""
    attention: str = "auto"
    """runtime.attention backend for self-attention ("auto" picks per GPU)."""
    compile: bool = False
    """torch.compile each repeated transformer block (regional compile)."""
    offload: str = "none"
    """runtime.offload mode for the transformer(s): none | block | leaf."""
    linear: str = "bf16"
    """Precision of the blocks' linear layers: bf16 (as loaded) | fp8 (runtime.fp8_linear)."""

    def replace(self, **changes: Any) -> "WanModel":
        return dataclasses.replace(self, **changes)

    def experts(self) -> list[torch.nn.Module]:
        return [t for t in (self.transformer, self.transformer_2) if t is not None]
