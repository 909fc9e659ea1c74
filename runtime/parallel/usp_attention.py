"""Unified sequence parallelism (Ulysses x ring) for diffusers' Wan transformer.

Layout of the ranks (the one xDiT and yunchang use): rank = cfg_index * sp_degree + sp_rank, and
inside a sequence-parallel group the Ulysses ranks are adjacent (yunchang's `use_ulysses_low`).
Token slice i belongs to sp rank i, so a Ulysses all-to-all over adjacent ranks yields one
contiguous ring block.

Only the self-attention (`attn1`) changes: its queries, keys and values are computed on this
rank's tokens, then
- Ulysses only: one all-to-all (yunchang) turns [tokens/P, all heads] into [all tokens, heads/P];
  the zero padding at the end of the sequence is cut off before the kernel, so padded keys
  never enter the softmax (exact for any length), and the kernel runtime.attention chose for
  this model runs (as on one device); a second all-to-all returns [tokens/P, all heads].
- ring > 1 (CUDA only): yunchang's `LongContextAttention` (Ulysses all-to-all + ring of
  flash-attention blocks, its own kernels). They cannot skip padded keys, so there the token
  count must divide (sharding.check_ring_split refuses other sizes up front).
Cross-attention keys are the text tokens, which every rank holds whole: it stays local.
"""
from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from ..attention import KernelFn, WanKernelAttnProcessor, apply_rope
from .config import ParallelConfig
from .sharding import SequenceShard, install_sequence_split


@dataclass
class ParallelGroups:
    """The process groups of one rank for one ParallelConfig, all with the job timeout."""

    config: ParallelConfig
    rank: int
    shard: SequenceShard
    everyone: Any
    ulysses_group: Any
    cfg_group: Any
    """The ranks holding the same token slice in the cond and the uncond half (None: no CFG split)."""

    @property
    def cfg_index(self) -> int:
        """0: this rank computes the cond pass, 1: the uncond pass."""
        return self.rank // self.config.sp_degree


def init_groups(config: ParallelConfig, rank: int) -> ParallelGroups:
    """Create every process group; all ranks call this together (new_group is collective).

    The groups are made here rather than by yunchang's `set_seq_parallel_pg` (same layout) so
    that they carry the job timeout: a collective waiting on a dead or hung peer must fail.
    """
    from yunchang.globals import PROCESS_GROUP  # noqa: PLC0415 - heavy, only inside a rank

    timeout = datetime.timedelta(seconds=config.timeout_s)
    sp, uly, cfg = config.sp_degree, config.ulysses_degree, config.cfg_degree
    mine: dict[str, Any] = {}

    def new(kind: str, ranks: list[int]) -> None:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine[kind] = group

    new("everyone", list(range(config.world_size)))
    for c in range(cfg):
        base = c * sp
        new("sp", list(range(base, base + sp)))
        for i in range(config.ring_degree):
            new("ulysses", list(range(base + i * uly, base + (i + 1) * uly)))
        for j in range(uly):
            new("ring", list(range(base + j, base + sp, uly)))
    if cfg > 1:
        for s in range(sp):
            new("cfg", [c * sp + s for c in range(cfg)])
    # yunchang's LongContextAttention (ring path) reads its groups from this global.
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = mine["ulysses"], mine["ring"]
    return ParallelGroups(
        config=config,
        rank=rank,
        shard=SequenceShard(group=mine["sp"], rank=rank % sp, degree=sp),
        everyone=mine["everyone"],
        ulysses_group=mine["ulysses"],
        cfg_group=mine.get("cfg"),
    )


def _kernel_of(processor: Any) -> KernelFn:
    """The attention kernel the replaced processor ran (runtime.attention's choice), so the
    ranks compute what one device would."""
    if isinstance(processor, WanKernelAttnProcessor):
        return processor.kernel
    backend = getattr(processor, "_attention_backend", None)
    return lambda q, k, v, cos, sin: dispatch_attention_fn(q, k, v, backend=backend)


def _ring_attention() -> torch.nn.Module:
    from yunchang import LongContextAttention  # noqa: PLC0415
    from yunchang.globals import HAS_FLASH_ATTN  # noqa: PLC0415
    from yunchang.kernels import AttnType  # noqa: PLC0415

    attn_type = AttnType.FA if HAS_FLASH_ATTN else AttnType.TORCH_EFFICIENT
    return LongContextAttention(ring_impl_type="basic", attn_type=attn_type)


class UspAttnProcessor:
    """Self-attention of a Wan block over the sequence-parallel group (see module docstring)."""

    def __init__(self, groups: ParallelGroups, kernel: KernelFn) -> None:
        self.shard = groups.shard
        self.ulysses_group = groups.ulysses_group
        self.kernel = kernel
        self.ring = _ring_attention() if groups.config.ring_degree > 1 else None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            # Rotated here, on this rank's tokens with its slice of the frequencies: after the
            # all-to-all a rank holds every token, whose frequencies it does not have.
            query = apply_rope(query, *rotary_emb)
            key = apply_rope(key, *rotary_emb)
        if self.ring is not None:
            out = self.ring(query, key, value, softmax_scale=query.shape[-1] ** -0.5)
        else:
            out = self._ulysses(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _ulysses(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        from yunchang.comm.all_to_all import all_to_all_4D, all_to_all_5D  # noqa: PLC0415

        shard = self.shard
        # One all-to-all for q, k and v: [B, S/P, 3, H, D] -> [B, S, 3, H/P, D].
        qkv = all_to_all_5D(torch.stack([query, key, value], dim=2), 3, 1, group=self.ulysses_group)
        query, key, value = qkv[:, : shard.seq_len].unbind(2)
        out = self.kernel(query, key, value, None, None)
        if shard.pad:
            out = torch.cat([out, out.new_zeros(out.shape[0], shard.pad, *out.shape[2:])], dim=1)
        return all_to_all_4D(out.contiguous(), 1, 2, group=self.ulysses_group)


@contextlib.contextmanager
def sequence_parallel(transformer: torch.nn.Module, groups: ParallelGroups) -> Iterator[torch.nn.Module]:
    """Run `transformer` sequence-parallel inside the block; it is restored on exit."""
    if groups.config.sp_degree == 1:
        yield transformer
        return
    blocks = list(transformer.blocks)
    previous = [block.attn1.processor for block in blocks]
    handles = install_sequence_split(transformer, groups.shard)
    for block, old in zip(blocks, previous):
        block.attn1.set_processor(UspAttnProcessor(groups, _kernel_of(old)))
    try:
        yield transformer
    finally:
        for handle in handles:
            handle.remove()
        for block, old in zip(blocks, previous):
            block.attn1.set_processor(old)
