"""Where weights live while a job runs: all on the GPU, the whole module moved in only while it
works (text encoder, DiT, VAE), or streamed block by block.

Block/leaf streaming is diffusers' group offloading (`ModelMixin.enable_group_offload`): weights
stay in pinned CPU memory and the next group is copied in on a side CUDA stream while the
current one computes, which is the layerwise-offload-with-prefetch the engine needs; wanflow only
chooses the mode and device.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from .errors import InputValueError

log = logging.getLogger(__name__)

OFFLOAD_MODES: tuple[str, ...] = ("none", "model", "block", "leaf")
"""none: resident on the device. model: on the CPU, moved in for each use (`onloaded`).
block: one transformer block at a time on the device, the next prefetched.
leaf: one layer at a time (least memory, most transfers)."""


def apply_offload(module: torch.nn.Module, mode: str, device: torch.device | str) -> str:
    """Place `module` for offload `mode` on compute `device`; returns the mode. Block and leaf
    streaming need a diffusers model; they are set once per loaded model (load again to change)."""
    if mode not in OFFLOAD_MODES:
        raise InputValueError(
            f"unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}", input_name="offload"
        )
    device = torch.device(device)
    if mode == "none":
        module.to(device)
    elif mode == "model":
        module.to("cpu")
    else:
        if not hasattr(module, "enable_group_offload"):
            raise InputValueError(
                f"offload mode {mode!r} needs a diffusers model, got {type(module).__name__}", input_name="offload"
            )
        streamed = device.type == "cuda"
        module.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level" if mode == "block" else "leaf_level",
            num_blocks_per_group=1 if mode == "block" else None,
            # The side stream is what overlaps the copy of block i+1 with block i's compute.
            use_stream=streamed,
            non_blocking=streamed,
            record_stream=streamed,
        )
    log.info("offload %s: %s on %s", type(module).__name__, mode, device)
    return mode


@contextlib.contextmanager
def onloaded(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """`module` on `device` inside the block and back on the CPU after it (text encoder: encode
    then offload; DiT and VAE in "model" mode), releasing the device memory it used."""
    device = torch.device(device)
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
