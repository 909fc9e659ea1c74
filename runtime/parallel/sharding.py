"""Split the video-token sequence over a sequence-parallel group, and gather it back.

Inside diffusers' `WanTransformer3DModel` the tokens exist as a sequence from the patch
embedding to `proj_out`. Hooks (the same cut points diffusers' own `_cp_plan` names, which does
not run on CPU) take this rank's slice of the hidden states and of the RoPE frequencies on the
way in, and all-gather the projected tokens on the way out, so the transformer's own forward
runs unchanged. A sequence that does not divide is padded with zeros at its end; the Ulysses
attention drops the padding again before the kernel (see usp_attention), so it is exact.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from ..errors import InputValueError
from .config import ParallelConfig


@dataclass
class SequenceShard:
    """This rank's place in its sequence-parallel group, plus the length of the current forward."""

    group: Any
    """torch.distributed process group of the sequence-parallel ranks (None: the default group)."""
    rank: int
    degree: int
    seq_len: int = 0
    """Real (unpadded) token count of the forward in flight; set by the transformer pre-hook."""

    @property
    def padded_len(self) -> int:
        return math.ceil(self.seq_len / self.degree) * self.degree

    @property
    def pad(self) -> int:
        return self.padded_len - self.seq_len

    @property
    def local_len(self) -> int:
        return self.padded_len // self.degree

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous slice of `x` along `dim` (zero-padded to divide evenly)."""
        if self.pad:
            shape = list(x.shape)
            shape[dim] = self.pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.rank * self.local_len, self.local_len).contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All ranks' slices concatenated along `dim`, padding removed: the inverse of `split`."""
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.seq_len)


def token_count(latent_shape: torch.Size | tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens the transformer makes of a [B, C, T, H, W] input."""
    _, _, t, h, w = latent_shape
    p_t, p_h, p_w = patch_size
    return (t // p_t) * (h // p_h) * (w // p_w)


def call_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call to `module` by parameter name (callers pass them either way)."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    arguments = dict(bound.arguments)
    del arguments["self"]
    return arguments


def check_ring_split(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int], config: ParallelConfig) -> None:
    """Ring attention's kernels cannot drop padded keys: its token count must divide, or the
    result would silently differ from one device's."""
    tokens = token_count(latent_shape, patch_size)
    if config.ring_degree > 1 and tokens % config.sp_degree:
        raise InputValueError(
            f"the latent {list(latent_shape)} makes {tokens} tokens, which ring attention cannot split "
            f"over {config.sp_degree} ranks; choose a size whose token count divides, or use Ulysses "
            "only (ring_degree 1), which pads",
            node="WanflowParallelConfig",
            input_name="ring_degree",
        )


def install_sequence_split(transformer: torch.nn.Module, shard: SequenceShard) -> list[RemovableHandle]:
    """Hook `transformer` so its blocks see only this rank's tokens; returns the hook handles."""
    patch_size = tuple(transformer.config.patch_size)

    def before_forward(module, args, kwargs):
        arguments = call_arguments(module, args, kwargs)
        shard.seq_len = token_count(arguments["hidden_states"].shape, patch_size)
        # Wan2.2 TI2V gives every token its own timestep [B, seq]: it is split like the tokens.
        if arguments["timestep"].ndim == 2:
            arguments["timestep"] = shard.split(arguments["timestep"])
        return (), arguments

    def split_rope(module, args, output):
        return tuple(shard.split(freqs) for freqs in output)

    def split_tokens(module, args, kwargs):
        arguments = call_arguments(module, args, kwargs)
        arguments["hidden_states"] = shard.split(arguments["hidden_states"])
        return (), arguments

    def gather_tokens(module, args, output):
        return shard.gather(output)

    return [
        transformer.register_forward_pre_hook(before_forward, with_kwargs=True),
        transformer.rope.register_forward_hook(split_rope),
        transformer.blocks[0].register_forward_pre_hook(split_tokens, with_kwargs=True),
        transformer.proj_out.register_forward_hook(gather_tokens),
    ]
