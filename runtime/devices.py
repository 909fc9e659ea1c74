"""Turning the user's "auto" / "bf16" / "cuda" choices into torch objects, in one place."""
from __future__ import annotations

import torch

from .errors import InputValueError

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DEVICE_CHOICES = ("auto", "cuda", "cpu")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICE_CHOICES:
        raise InputValueError(f"unknown device '{name}' (choose one of {', '.join(DEVICE_CHOICES)})", input_name="device")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputValueError("device 'cuda' was asked for but no CUDA GPU is available", input_name="device")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype | None:
    """None means "keep the file's own precision" (fp8 files load as bf16)."""
    if name == "auto":
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise InputValueError(
            f"unknown dtype '{name}' (choose one of {', '.join(DTYPE_CHOICES)})", input_name="dtype"
        ) from None


def in_multi_rank_group() -> bool:
    """Whether this process is one rank of a torch.distributed group of more than one."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
