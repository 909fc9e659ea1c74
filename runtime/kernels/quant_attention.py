"""Quantised (FP8 / INT8) attention for Hopper, with Wan's RoPE fused into the quantisation.

Written by hand because no installable library does it: PyPI's SageAttention (1.0.6) is
INT8-QK / FP16-PV without TMA and measured slower than cuDNN on H100 for Wan; its FP8
Hopper kernels (v2) and FlashAttention-3's FP8 path must be built from source.

Design (ideas from SageAttention and FlashAttention-3; the code is our own):
- One pass over K and V gathers per-head statistics: the mean of the rotated keys
  ("smoothing": softmax is invariant to a per-query constant, so subtracting mean(K) changes
  nothing but shrinks |K| and with it the quantisation error) and V's per-channel max.
- One pass rotates Q and K (RoPE) and quantises them with one scale per 128 tokens per head
  (INT8 or e4m3), and writes V either as e4m3 with per-channel scales, transposed because
  Hopper's FP8 tensor-core instruction takes its B operand K-major only, or as fp16.
- The attention kernel (TMA loads) runs QK^T in INT8/FP8 and PV in FP8/FP16 with FP32
  softmax state; probabilities are scaled by 2**P_SHIFT before the cast so small ones keep
  their mantissa (the factor cancels in acc / l); 1/sqrt(d)·log2(e) rides on Q's scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

QUANT_TILE = 128
"""Tokens per Q/K quantisation scale; attention blocks must divide it."""
LOG2E = 1.4426950408889634
# Kernel-side constants (Triton reads only constexpr globals).
_TILE = tl.constexpr(QUANT_TILE)
_P_SHIFT = tl.constexpr(8.0)
_INT_AS_FLOAT = tl.constexpr(0x4B400000)
"""Bit pattern of 1.5·2**23: adding it to an int32 |x| < 2**22 and reinterpreting as fp32 gives
1.5·2**23 + x exactly, which replaces the (quarter-rate) int-to-float conversion."""
_INT_AS_FLOAT_OFFSET = tl.constexpr(12582912.0)


@dataclass(frozen=True)
class QuantAttentionOptions:
    qk_int8: bool = True
    """INT8 Q/K (≈4x finer steps than e4m3 for bell-shaped data) or e4m3."""
    pv_fp8: bool = True
    """e4m3 P and V (twice the fp16 MMA rate) or fp16."""
    smooth_k: bool = True
    split_acc: bool = True
    """Add each block's PV product to the fp32 accumulator outside the MMA: Hopper's FP8 MMA
    accumulates with fewer mantissa bits (SageAttention2's finding)."""


@triton.jit
def _load_rotated(base, offs_s, offs_d, stride_s, S, COS, SIN, stride_c, HAS_ROPE: tl.constexpr):
    """[BLOCK_S, D] tile in fp32, rows past S read as 0, rotated pairwise when HAS_ROPE."""
    mask = offs_s[:, None] < S
    x = tl.load(base + offs_s[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        # out[2i] = x[2i] cos - x[2i+1] sin ; out[2i+1] = x[2i] sin + x[2i+1] cos
        # (diffusers' cos/sin tables repeat each value for both members of a pair).
        partner = tl.load(base + offs_s[:, None] * stride_s + (offs_d ^ 1)[None, :], mask=mask, other=0.0)
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        cos = tl.load(COS + offs_s[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + offs_s[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x * cos + partner.to(tl.float32) * sign[None, :] * sin
    return x


@triton.jit
def _quantize_tile(x, QK_INT8: tl.constexpr):
    amax = tl.maximum(tl.max(tl.abs(x)), 1e-20)
    if QK_INT8:
        scale = amax / 127.0
        y = x * (1.0 / scale)
        y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
    else:
        scale = amax / 448.0
        y = (x * (1.0 / scale)).to(tl.float8e4nv)
    return y, scale


@triton.jit
def _kv_stats_kernel(
    K, V, COS, SIN, KSUM, VMAX,
    S, H, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_c,
    HAS_ROPE: tl.constexpr, SMOOTH_K: tl.constexpr, PV_FP8: tl.constexpr,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    if SMOOTH_K:
        k = _load_rotated(K + b * stride_kb + h * stride_kh, offs_s, offs_d, stride_ks, S,
                          COS, SIN, stride_c, HAS_ROPE)
        tl.atomic_add(KSUM + bh * HEAD_DIM + offs_d, tl.sum(k, 0))
    if PV_FP8:
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_s[:, None] * stride_vs + offs_d[None, :],
                    mask=offs_s[:, None] < S, other=0.0).to(tl.float32)
        tl.atomic_max(VMAX + bh * HEAD_DIM + offs_d, tl.max(tl.abs(v), 0))


@triton.jit
def _quantize_kernel(
    Q, K, V, COS, SIN, KSUM, VMAX, QQ, KQ, VQ, QS, KS,
    S, S_PAD, H, n_tiles, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_c,
    HAS_ROPE: tl.constexpr, SMOOTH_K: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (bh * S_PAD + offs_s).to(tl.int64)
    valid = offs_s[:, None] < S

    q = _load_rotated(Q + b * stride_qb + h * stride_qh, offs_s, offs_d, stride_qs, S,
                      COS, SIN, stride_c, HAS_ROPE)
    q_q, q_scale = _quantize_tile(q, QK_INT8)
    tl.store(QQ + rows[:, None] * HEAD_DIM + offs_d[None, :], q_q)
    tl.store(QS + bh * n_tiles + pid_s, q_scale * qk_scale)

    k = _load_rotated(K + b * stride_kb + h * stride_kh, offs_s, offs_d, stride_ks, S,
                      COS, SIN, stride_c, HAS_ROPE)
    if SMOOTH_K:
        k = tl.where(valid, k - (tl.load(KSUM + bh * HEAD_DIM + offs_d) / S)[None, :], 0.0)
    k_q, k_scale = _quantize_tile(k, QK_INT8)
    tl.store(KQ + rows[:, None] * HEAD_DIM + offs_d[None, :], k_q)
    tl.store(KS + bh * n_tiles + pid_s, k_scale)

    v = tl.load(V + b * stride_vb + h * stride_vh + offs_s[:, None] * stride_vs + offs_d[None, :],
                mask=valid, other=0.0)
    if PV_FP8:
        v_inv = 448.0 / tl.maximum(tl.load(VMAX + bh * HEAD_DIM + offs_d), 1e-20)
        v8 = tl.trans((v.to(tl.float32) * v_inv[None, :]).to(tl.float8e4nv))
        vt_rows = (bh * HEAD_DIM + offs_d).to(tl.int64)
        tl.store(VQ + vt_rows[:, None] * S_PAD + offs_s[None, :], v8)
    else:
        tl.store(VQ + rows[:, None] * HEAD_DIM + offs_d[None, :], v.to(tl.float16))


@triton.jit
def _attn_block(acc, l_i, m_i, q, q_scale, desc_k, desc_v, row0, v_row, KS_ROW, start_n, S, offs_n,
                MASK: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, SPLIT_ACC: tl.constexpr):
    k = desc_k.load([row0 + start_n, 0]).T
    scale = q_scale * tl.load(KS_ROW + start_n // _TILE)
    if QK_INT8:
        qk = (tl.dot(q, k, out_dtype=tl.int32) + _INT_AS_FLOAT).to(tl.float32, bitcast=True)
        offset = _INT_AS_FLOAT_OFFSET
    else:
        qk = tl.dot(q, k)
        offset = 0.0
    if MASK:
        qk = tl.where((start_n + offs_n)[None, :] < S, qk, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(qk, 1) - offset) * scale)
    # One FMA per score: the int offset, the running max and the P shift in one constant.
    p = tl.math.exp2(qk * scale - (m_new - _P_SHIFT + offset * scale)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        v = desc_v.load([v_row, start_n]).T
        p = p.to(tl.float8e4nv)
    else:
        v = desc_v.load([row0 + start_n, 0])
        p = p.to(tl.float16)
    if SPLIT_ACC:
        acc += tl.dot(p, v)
    else:
        acc = tl.dot(p, v, acc)
    return acc, l_i, m_new


def _set_block_shapes(nargs):
    bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["desc_q"].block_shape = [bm, d]
    nargs["desc_k"].block_shape = [bn, d]
    nargs["desc_v"].block_shape = [d, bn] if nargs["PV_FP8"] else [bn, d]


CONFIGS = [(128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3), (64, 128, 4, 2)]
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries."""


@triton.jit
def _attn_kernel(
    desc_q, desc_k, desc_v, QS, KS, VMAX, Out,
    S, S_PAD, H, n_tiles, n_full, stride_ob, stride_os, stride_oh, S_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, SPLIT_ACC: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = bh * S_PAD
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = desc_q.load([row0 + start_m * BLOCK_M, 0])
    q_scale = tl.load(QS + bh * n_tiles + (start_m * BLOCK_M) // _TILE)
    ks_row = KS + bh * n_tiles
    v_row = bh * HEAD_DIM
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # n_full (a multiple of QUANT_TILE, so of every BLOCK_N) bounds the unmasked blocks.
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, q_scale, desc_k, desc_v, row0, v_row, ks_row,
                                    start_n, S, offs_n, False, QK_INT8, PV_FP8, SPLIT_ACC)
    for start_n in range(n_full, S, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, q_scale, desc_k, desc_v, row0, v_row, ks_row,
                                    start_n, S, offs_n, True, QK_INT8, PV_FP8, SPLIT_ACC)

    out = acc * (1.0 / l_i)[:, None]
    if PV_FP8:
        out = out * (tl.load(VMAX + bh * HEAD_DIM + offs_d) / 448.0)[None, :]
    ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < S)


_attn_kernel_tuned = triton.autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
     for bm, bn, w, s in CONFIGS],
    key=["S_BUCKET", "HEAD_DIM", "QK_INT8", "PV_FP8", "SPLIT_ACC"],
)(_attn_kernel)


def quant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    options: QuantAttentionOptions = QuantAttentionOptions(),
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T / sqrt(d)) v for q, k, v [B, S, H, D] (unit last stride).

    `cos`/`sin` are diffusers' Wan rotary tables viewable as [S, D] (pairs repeated);
    without them nothing is rotated. Returns [B, S, H, D] in q's dtype. `config` =
    (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner (which needs a GPU).
    """
    B, S, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"quant_attention is self-attention only: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D not in (64, 128) or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("quant_attention needs head dim 64 or 128 with a contiguous last dimension")
    o = options
    has_rope = cos is not None
    if has_rope:
        cos, sin = cos.reshape(S, D).contiguous(), sin.reshape(S, D).contiguous()
    else:
        cos = sin = q  # never read
    dev = q.device
    n_tiles = triton.cdiv(S, QUANT_TILE)
    s_pad = n_tiles * QUANT_TILE
    qk_dtype = torch.int8 if o.qk_int8 else torch.float8_e4m3fn
    ksum = torch.zeros(B * H, D, device=dev, dtype=torch.float32)
    vmax = torch.zeros(B * H, D, device=dev, dtype=torch.float32)
    qq = torch.empty(B * H * s_pad, D, device=dev, dtype=qk_dtype)
    kq = torch.empty_like(qq)
    if o.pv_fp8:
        vq = torch.empty(B * H * D, s_pad, device=dev, dtype=torch.float8_e4m3fn)
    else:
        vq = torch.empty(B * H * s_pad, D, device=dev, dtype=torch.float16)
    q_scales = torch.empty(B * H, n_tiles, device=dev, dtype=torch.float32)
    k_scales = torch.empty_like(q_scales)
    out = torch.empty((B, S, H, D), device=dev, dtype=q.dtype)

    grid = (n_tiles, B * H)
    kv_strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    if o.smooth_k or o.pv_fp8:
        _kv_stats_kernel[grid](
            k, v, cos, sin, ksum, vmax, S, H, *kv_strides, D,
            HAS_ROPE=has_rope, SMOOTH_K=o.smooth_k, PV_FP8=o.pv_fp8,
            BLOCK_S=QUANT_TILE, HEAD_DIM=D, num_warps=8,
        )
    _quantize_kernel[grid](
        q, k, v, cos, sin, ksum, vmax, qq, kq, vq, q_scales, k_scales,
        S, s_pad, H, n_tiles, LOG2E / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), *kv_strides, D,
        HAS_ROPE=has_rope, SMOOTH_K=o.smooth_k, QK_INT8=o.qk_int8, PV_FP8=o.pv_fp8,
        BLOCK_S=QUANT_TILE, HEAD_DIM=D, num_warps=8,
    )
    # Block shapes are placeholders until the chosen config sets them.
    desc_q = TensorDescriptor.from_tensor(qq, [QUANT_TILE, D])
    desc_k = TensorDescriptor.from_tensor(kq, [QUANT_TILE, D])
    desc_v = TensorDescriptor.from_tensor(vq, [D, QUANT_TILE] if o.pv_fp8 else [QUANT_TILE, D])
    args = (desc_q, desc_k, desc_v, q_scales, k_scales, vmax, out,
            S, s_pad, H, n_tiles, (S // QUANT_TILE) * QUANT_TILE, out.stride(0), out.stride(1),
            out.stride(2), 1 << max(S - 1, 1).bit_length())
    flags = dict(HEAD_DIM=D, QK_INT8=o.qk_int8, PV_FP8=o.pv_fp8, SPLIT_ACC=o.split_acc)
    if config is None:
        grid_fn = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_kernel_tuned[grid_fn](*args, **flags)
    else:
        bm, bn, warps, stages = config
        _set_block_shapes({"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": D, "PV_FP8": o.pv_fp8,
                           "desc_q": desc_q, "desc_k": desc_k, "desc_v": desc_v})
        _attn_kernel[(triton.cdiv(S, bm), B * H)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return out
