"""Attention backend choice for Wan transformers: one place, per GPU, dtype and install.

Names a user can pick (loader option, CLI, server flag):
- "sdpa" (torch's default dispatch), "cudnn", "flash", "efficient", "math": torch SDPA kernels,
  run through diffusers' own backend mechanism (the processor's `_attention_backend`);
- "flash_attn": the flash-attn package through diffusers' "flash" backend;
- "sage": SageAttention v1 from PyPI (`sageattention.sageattn`; diffusers' own sage backend
  wants >= 2.1.1, which is not on PyPI);
- "int8", "fp8", "int8_pv16": our Triton kernels for Hopper (runtime/kernels/quant_attention):
  Q·K in INT8 or FP8, P·V in FP8 (or fp16), with RoPE fused into the quantisation;
- "auto": the fastest of these that is accurate here (see `resolve_auto`).

Only the self-attention (`attn1`) takes the custom kernels; cross-attention (512 text tokens,
~2% of the FLOPs) keeps diffusers' default, so the text conditioning stays exact.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    _get_qkv_projections,
)

from .errors import InputValueError

log = logging.getLogger(__name__)

_SDPA_BACKENDS = {
    "sdpa": "native",
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flash_attn": "flash",
}
_QUANT_BACKENDS = {
    # name: (qk_int8, pv_fp8)
    "int8": (True, True),
    "fp8": (False, True),
    "int8_pv16": (True, False),
}
BACKENDS: tuple[str, ...] = ("auto", *_SDPA_BACKENDS, "sage", *_QUANT_BACKENDS)

_AUTO_ORDER_SM90 = ("int8", "sdpa")
"""Hopper: the INT8-QK/FP8-PV kernel first (BENCHMARKS.md has the measurements)."""
_AUTO_ORDER = ("sdpa",)
"""Elsewhere torch's own dispatch (cuDNN / flash on CUDA) was the fastest measured."""

KernelFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor
]
"""(q, k, v, cos, sin) -> out, all [B, S, H, D]; q and k not yet rotated (cos/sin None: no RoPE)."""


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's pairwise rotation (as diffusers' WanAttnProcessor), without its strided writes:
    out = x·cos + pairswap(x)·sin with pairswap(x)[2i] = -x[2i+1], pairswap(x)[2i+1] = x[2i]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    swapped = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x * cos + swapped * sin).type_as(x)


def _sdpa_probe(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the torch kernel once on a tiny input: the only reliable test of what a given
    torch build, device and dtype support."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    kernel = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend]
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel(kernel):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return f"torch's {backend} SDPA kernel does not run on {device.type} with {dtype}"
    return None


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _availability(device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    reasons: dict[str, str | None] = {"sdpa": None, "math": None}
    for name in ("cudnn", "flash", "efficient"):
        reasons[name] = _sdpa_probe(name, device, dtype)
    from diffusers.models.attention_dispatch import _CAN_USE_FLASH_ATTN  # noqa: PLC0415

    reasons["flash_attn"] = None if _CAN_USE_FLASH_ATTN and device.type == "cuda" else (
        "needs a CUDA GPU and the flash-attn package (pip install flash-attn)"
    )
    has_triton = importlib.util.find_spec("triton") is not None
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type != "cuda" or not has_triton or not half:
        sage = "needs a CUDA GPU, Triton, fp16/bf16 weights and `pip install sageattention`"
    elif importlib.util.find_spec("sageattention") is None:
        sage = "sageattention is not installed (pip install sageattention)"
    else:
        sage = None
    reasons["sage"] = sage
    quant = None if _is_hopper(device) and has_triton and half else (
        "needs a Hopper (sm90+) GPU, Triton and fp16/bf16 weights"
    )
    for name in _QUANT_BACKENDS:
        reasons[name] = quant
    return reasons


def available_backends(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16
) -> dict[str, str | None]:
    """Every backend name -> None when it runs here, else the reason it does not
    ("auto" is always available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"auto": None, **_availability(device, dtype)}


def resolve_auto(device: torch.device | str, dtype: torch.dtype) -> str:
    device = torch.device(device)
    order = _AUTO_ORDER_SM90 if _is_hopper(device) else _AUTO_ORDER
    reasons = available_backends(device, dtype)
    return next(name for name in order if reasons[name] is None)


class WanKernelAttnProcessor:
    """Wan self-attention through a kernel that applies RoPE itself (or gets it applied by
    `apply_rope` first): the projections and norms are diffusers' own."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, kernel: KernelFn, name: str) -> None:
        self.kernel = kernel
        self.name = name

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"the {self.name} attention processor serves self-attention only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb if rotary_emb is not None else (None, None)
        out = self.kernel(query, key, value, cos, sin)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def reference_kernel(q, k, v, cos=None, sin=None) -> torch.Tensor:
    """RoPE + torch SDPA: what every kernel must match (also used by the CPU tests)."""
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)


@functools.lru_cache(maxsize=None)
def _custom_ops() -> tuple[Callable, Callable]:
    """Register the kernels as torch custom ops (opaque to torch.compile, which cannot trace
    Triton's autotuner with TMA descriptors) once, on first use."""
    from .kernels.quant_attention import QuantAttentionOptions, quant_attention  # noqa: PLC0415

    @torch.library.custom_op("wanflow::quant_attention", mutates_args=())
    def quant_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                 sin: torch.Tensor | None, qk_int8: bool, pv_fp8: bool, split_acc: bool) -> torch.Tensor:
        options = QuantAttentionOptions(qk_int8=qk_int8, pv_fp8=pv_fp8, split_acc=split_acc)
        return quant_attention(q, k, v, cos, sin, options)

    @quant_op.register_fake
    def _(q, k, v, cos, sin, qk_int8, pv_fp8, split_acc):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    @torch.library.custom_op("wanflow::sage_attention", mutates_args=())
    def sage_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None) -> torch.Tensor:
        from sageattention import sageattn  # noqa: PLC0415

        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # sageattn subtracts mean(k) in place: k is our own rotated copy (or cloned here).
        return sageattn(q, k if cos is not None else k.clone(), v, tensor_layout="NHD")

    @sage_op.register_fake
    def _(q, k, v, cos, sin):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    return quant_op, sage_op


def quant_options(name: str):
    """The QuantAttentionOptions behind backend `name` ("int8", "fp8", "int8_pv16")."""
    from .kernels.quant_attention import QuantAttentionOptions  # noqa: PLC0415

    qk_int8, pv_fp8 = _QUANT_BACKENDS[name]
    return QuantAttentionOptions(qk_int8=qk_int8, pv_fp8=pv_fp8)


def quant_kernel(options) -> KernelFn:
    """Our Triton kernel with explicit `QuantAttentionOptions`, as a compile-safe kernel."""
    quant_op, _ = _custom_ops()
    return functools.partial(_call_quant, quant_op, options=options)


def _call_quant(op, q, k, v, cos, sin, *, options) -> torch.Tensor:
    return op(q, k, v, cos, sin, options.qk_int8, options.pv_fp8, options.split_acc)


def kernel_for(name: str) -> KernelFn:
    """The raw (q, k, v, cos, sin) kernel of a custom backend ("sage", "int8", ...)."""
    if name == "sage":
        return _custom_ops()[1]
    return quant_kernel(quant_options(name))


def _model_placement(transformer: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(p for p in transformer.parameters() if p.dtype.is_floating_point)
    # Most weights share the compute dtype; a few diffusers keeps in fp32 (norms, time embedder).
    dtypes = [p.dtype for p in transformer.parameters() if p.ndim == 2]
    return param.device, max(set(dtypes), key=dtypes.count) if dtypes else param.dtype


def set_self_attention_processor(transformer: torch.nn.Module, processor: WanKernelAttnProcessor) -> None:
    """`processor` on every self-attention, diffusers' default on every cross-attention."""
    for module in transformer.modules():
        if isinstance(module, WanAttention):
            module.set_processor(WanAttnProcessor() if module.is_cross_attention else processor)


def apply_attention_backend(
    transformer: torch.nn.Module, name: str, device: torch.device | str | None = None
) -> str:
    """Make every attention of a diffusers Wan transformer use backend `name`; returns the
    backend actually used ("auto" resolved). Unknown or unavailable -> InputValueError.
    `device` is where the model computes (default: where its weights are; pass it for a model
    whose weights are offloaded to the CPU)."""
    key = name.strip().lower()
    if key not in BACKENDS:
        raise InputValueError(
            f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}", input_name="attention"
        )
    weights_device, dtype = _model_placement(transformer)
    device = torch.device(device) if device is not None else weights_device
    if key == "auto":
        key = resolve_auto(device, dtype)
    reason = available_backends(device, dtype)[key]
    if reason is not None:
        raise InputValueError(f"attention backend {key!r} is not available here: {reason}", input_name="attention")
    if key in _SDPA_BACKENDS:
        # Set per processor, not with ModelMixin.set_attention_backend: that also changes the
        # process-wide default, which would leak into every other loaded model.
        backend = AttentionBackendName(_SDPA_BACKENDS[key])
        for module in transformer.modules():
            if isinstance(module, WanAttention):
                processor = WanAttnProcessor()
                processor._attention_backend = backend
                processor._parallel_config = getattr(module.processor, "_parallel_config", None)
                module.set_processor(processor)
    else:
        set_self_attention_processor(transformer, WanKernelAttnProcessor(kernel_for(key), key))
    log.info("attention backend: %s (asked: %s)", key, name)
    return key
