"""How one video is spread over several devices: the user's choice, checked up front."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputValueError

BACKENDS = ("auto", "nccl", "gloo")
NODE = "WanflowParallelConfig"


def _invalid(message: str, field: str) -> InputValueError:
    return InputValueError(message, node=NODE, input_name=field)


@dataclass(frozen=True)
class ParallelConfig:
    """`gpus` ranks = `ulysses_degree` x `ring_degree` (sequence parallel) x 2 if `cfg_parallel`.

    Sequence parallel splits the video tokens over the ranks of one group (Ulysses trades
    sequence shards for head shards with an all-to-all; ring passes key/value blocks around);
    CFG-parallel runs the cond and the uncond pass on two such groups at once.
    """

    gpus: int = 2
    ulysses_degree: int = 2
    ring_degree: int = 1
    cfg_parallel: bool = False
    backend: str = "auto"
    """"nccl" (CUDA), "gloo" (CPU) or "auto" (nccl when CUDA is available)."""
    timeout_s: float = 600.0
    """A rank silent this long inside a job counts as hung: the job fails, the group is rebuilt."""

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def world_size(self) -> int:
        return self.sp_degree * self.cfg_degree

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    def uses_cuda(self) -> bool:
        return self.resolved_backend() == "nccl"

    def validate(self, num_heads: int | None = None) -> "ParallelConfig":
        """Raise an InputValueError naming the field at fault; return self when all is well."""
        for name in ("gpus", "ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise _invalid(f"{name} must be a whole number >= 1, got {value!r}", name)
        if self.backend not in BACKENDS:
            raise _invalid(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}", "backend")
        if not self.timeout_s > 0:
            raise _invalid(f"timeout_s must be > 0, got {self.timeout_s!r}", "timeout_s")
        if self.world_size != self.gpus:
            cfg = " x 2 (cfg_parallel)" if self.cfg_parallel else ""
            raise _invalid(
                f"ulysses_degree ({self.ulysses_degree}) x ring_degree ({self.ring_degree}){cfg} = "
                f"{self.world_size}, but gpus is {self.gpus}; the product must equal the GPU count",
                "gpus",
            )
        if num_heads is not None and num_heads % self.ulysses_degree:
            raise _invalid(
                f"the model has {num_heads} attention heads, which ulysses_degree "
                f"{self.ulysses_degree} does not divide; pick a divisor of {num_heads}",
                "ulysses_degree",
            )
        if self.resolved_backend() == "nccl" and not torch.cuda.is_available():
            raise _invalid("backend 'nccl' needs CUDA GPUs and none is available", "backend")
        if self.ring_degree > 1 and not self.uses_cuda():
            # yunchang's ring attention does not run on the CPU/gloo path (checked), only on GPUs.
            raise _invalid("ring attention needs CUDA (ring_degree > 1 on the CPU/gloo backend)", "ring_degree")
        return self

    def check_local_devices(self) -> None:
        """Ranks spawned on this machine need one GPU each (torchrun spans machines instead)."""
        if self.uses_cuda() and self.gpus > torch.cuda.device_count():
            raise _invalid(
                f"gpus is {self.gpus} but only {torch.cuda.device_count()} CUDA GPU(s) are visible", "gpus"
            )
