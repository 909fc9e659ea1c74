"""FP8 linear layers for the transformer blocks (Hopper/Ada FP8 tensor cores, ~2x the bf16 rate).

Weights are quantised once to float8_e4m3fn with one scale per output channel (row); activations
are quantised on the fly with one scale per row (token). Both scales are applied in the GEMM's
epilogue by `torch._scaled_mm` (cuBLASLt / CUTLASS row-wise FP8), so the result is
`(a_q * s_a) @ (w_q * s_w).T + bias` with bf16 out. Under regional `torch.compile` the
activation's amax / scale / cast fuse into one Triton kernel before the GEMM.

Written here rather than taken from torchao (its float8 inference path does the same) because
torchao is not a dependency and this needs ~60 lines; diffusers has no FP8 GEMM path.

Where `_scaled_mm` cannot run (CPU, GPUs before sm89) the same quantised numbers go through a
dequantise-then-matmul reference, so CPU tests check the quantisation itself.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
LINEAR_MODES = ("bf16", "fp8")
"""Values of `WanModel.linear`: keep the checkpoint's linears, or FP8 GEMMs in the blocks."""
_MIN_SCALE = 1e-12  # an all-zero row would otherwise divide by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [..., K] -> (e4m3 codes like x, fp32 scales [..., 1]) with x ≈ codes * scales."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE) / FP8_MAX
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def scaled_mm_supported(device: torch.device) -> bool:
    """Row-wise FP8 `_scaled_mm` needs CUDA compute capability 8.9 (Ada) or 9.0 (Hopper)+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """An `nn.Linear` whose weight is stored as e4m3 codes plus per-output-channel scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight_fp8", codes)  # [N, K]
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous())  # [1, N], as _scaled_mm wants it
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        # Decided once: a branch on the device per call would be a guard in every compiled block.
        self.use_scaled_mm = scaled_mm_supported(codes.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a, a_scale = quantize_rows(x.reshape(-1, self.in_features))
        if self.use_scaled_mm:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            # mat2 must be column-major: the transpose of the row-major [N, K] codes is exactly that.
            out = torch._scaled_mm(a, self.weight_fp8.t(), scale_a=a_scale, scale_b=self.weight_scale,
                                   bias=bias, out_dtype=x.dtype, use_fast_accum=True)
        else:
            weight = self.weight_fp8.float() * self.weight_scale.t()
            out = nn.functional.linear(a.float() * a_scale, weight,
                                       None if self.bias is None else self.bias.float()).to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 rowwise"


def quantize_linears(transformer: nn.Module, *, min_features: int = 128) -> int:
    """Swap every plain `nn.Linear` inside the transformer blocks (self/cross attention q/k/v/o,
    FFN) with both sides >= `min_features` for an `FP8Linear`, in place; returns how many.

    Only the repeated blocks: the embeddings, the time projection and the output head are small
    GEMMs where quantisation error is not paid back (every block linear of the real models has
    both sides >= 1536; the default keeps the tiny test models' 256-wide ones in too). Sides must be multiples of 16 (`_scaled_mm`).
    Cannot be undone: the bf16 weights are dropped (load the model again for bf16)."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no `blocks` to quantise")
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            if min(module.in_features, module.out_features) < min_features:
                continue
            if module.in_features % 16 or module.out_features % 16:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, FP8Linear(module))
            count += 1
    log.info("FP8 linear layers: %d quantised (row-wise e4m3)", count)
    return count
