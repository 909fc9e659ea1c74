"""Benchmark: Wan DiT forward, attention kernels, a full CFG job and VAE decode, each against
diffusers' own path measured in the same run.

    python -m wanflow.scripts.bench --sections peak,attn,forward --sizes 1.3B --out bench.json
    python -m wanflow.scripts.bench --sections cache --cache-steps 50   # cache-dit on a 1.3B job
    python -m wanflow.scripts.bench --sections job --steps 50 --job-variants int8+compile,int8+compile+dbcache
    python -m wanflow.scripts.bench --smoke        # CPU, tiny configs, seconds (CI)

Weights are random (real architectures built from the shipped configs): timings and
relative errors need no checkpoint. JSON goes to --out, updated after every measurement
(a run cut short keeps what it measured); a markdown table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # `python scripts/bench.py` from a checkout (e.g. on a bare GPU box)
    # Register the checkout as package `wanflow` without running its __init__, which loads the
    # ComfyUI node layer and its media/cache dependencies that a benchmark does not need.
    import types

    _root = Path(__file__).resolve().parents[1]
    if "wanflow" not in sys.modules:
        _pkg = types.ModuleType("wanflow")
        _pkg.__path__ = [str(_root)]
        sys.modules["wanflow"] = _pkg
    __package__ = "wanflow.scripts"

from ..runtime.attention import (
    WanKernelAttnProcessor,
    apply_attention_backend,
    available_backends,
    kernel_for,
    quant_kernel,
    quant_options,
    reference_kernel,
    set_self_attention_processor,
)
from ..runtime.cache import SCM_PRESETS, CacheConfig
from ..runtime.fp8_linear import FP8Linear, quantize_linears
from ..runtime.models.single_file import keep_fp32
from ..runtime.models.variants import load_shipped_config
from ..runtime.offload import apply_offload
from ..runtime.tiny import TINY_TRANSFORMER_CONFIG

SECTIONS = ("peak", "attn", "forward", "job", "vae", "cache")


@dataclass(frozen=True)
class Size:
    name: str
    variant: str
    """Shipped config name (runtime/models/configs)."""
    height: int
    width: int
    frames: int

    def config(self) -> dict:
        if self.variant == "tiny":
            return dict(TINY_TRANSFORMER_CONFIG)
        cfg = load_shipped_config(self.variant)
        cfg.pop("_class_name", None)
        return cfg

    def latent_shape(self, batch: int, cfg: dict) -> tuple[int, ...]:
        # Wan2.1 VAE: x8 spatial, x4 temporal (Wan2.2 VAE: x16) -> the 5B uses 48 channels.
        spatial = 16 if cfg["in_channels"] == 48 else 8
        return (batch, cfg["in_channels"], (self.frames - 1) // 4 + 1, self.height // spatial, self.width // spatial)


SIZES = {
    "1.3B": Size("1.3B", "wan2.1-t2v-1.3b", 480, 832, 81),
    "14B": Size("14B", "wan2.1-t2v-14b", 720, 1280, 81),
    "5B": Size("5B", "wan2.2-ti2v-5b", 704, 1280, 121),
}
SMOKE_SIZE = Size("tiny", "tiny", 64, 64, 9)
TEXT_TOKENS = 512

FORWARD_VARIANTS = ("diffusers", "cudnn", "sage", "int8", "fp8", "int8_pv16",
                    "compile", "int8+compile", "fp8+compile")
ATTN_KERNELS = ("sdpa", "cudnn", "flash", "sage", "int8", "fp8", "int8_pv16", "int8:no_split_acc")
CACHE_VARIANTS = ("none", "dbcache", "dbcache+taylorseer", "scm-medium", "scm-fast")


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of `fn` (CUDA events on GPU), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def forward_flops(cfg: dict, latent_shape: tuple[int, ...], text_tokens: int = TEXT_TOKENS) -> float:
    """Multiply-adds x2 of one transformer forward: every linear layer plus attention
    (4·B·H·S²·D for self-attention, 4·B·H·S·L·D for cross-attention)."""
    b, c, t, h, w = latent_shape
    pt, ph, pw = cfg["patch_size"]
    seq = (t // pt) * (h // ph) * (w // pw)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn, layers = cfg["ffn_dim"], cfg["num_layers"]
    patch = pt * ph * pw
    per_block = (
        4 * 2 * seq * dim * dim           # self-attn q, k, v, o
        + 4 * seq * seq * dim             # self-attn QK^T and PV
        + 2 * 2 * seq * dim * dim         # cross-attn q, o
        + 2 * 2 * text_tokens * dim * dim  # cross-attn k, v
        + 4 * seq * text_tokens * dim     # cross-attn QK^T and PV
        + 2 * 2 * seq * dim * ffn         # feed-forward
    )
    embed = 2 * seq * c * patch * dim + 2 * text_tokens * (cfg["text_dim"] * dim + dim * dim)
    head = 2 * seq * dim * cfg["out_channels"] * patch
    return float(b * (layers * per_block + embed + head))


# ----------------------------------------------------------------------------- building
def build_transformer(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The real architecture with random weights, created directly on `device` in `dtype`
    (never on the CPU in fp32: the 14B would need 57 GB there); the modules diffusers keeps
    in fp32 when it loads a checkpoint are kept in fp32 here too."""
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return cast_like_diffusers(model, dtype).eval().requires_grad_(False)


def cast_like_diffusers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`dtype` everywhere but the modules diffusers' from_pretrained keeps in fp32."""
    fp32 = keep_fp32(type(model), dtype)
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if fp32(name) else dtype)
    return model


def fp32_reference(model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    """The same weights and inputs in full fp32 (no TF32): the yardstick for bf16 rounding."""
    restore_diffusers_default(model)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for param in model.parameters():  # parameters only: buffers (RoPE tables) stay as built
            param.data = param.data.float()
        with torch.inference_mode():
            args = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inputs.items()}
            return model(**args)[0][:1]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        cast_like_diffusers(model, dtype)


def make_inputs(size: Size, cfg: dict, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 1) -> dict:
    """B=1: one latent and prompt. B=2: CFG batched (the same latent twice, prompt and
    negative prompt), so sample 0 is the B=1 input in both."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn(size.latent_shape(1, cfg), generator=gen).to(device, dtype)
    texts = [torch.randn(1, TEXT_TOKENS, cfg["text_dim"], generator=gen).to(device, dtype) for _ in range(batch)]
    return {"hidden_states": latents.expand(batch, *latents.shape[1:]).contiguous(),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": torch.cat(texts), "return_dict": False}


def restore_diffusers_default(transformer: torch.nn.Module) -> None:
    """Exactly what diffusers builds: a fresh WanAttnProcessor without a backend override."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor  # noqa: PLC0415

    for module in transformer.modules():
        if isinstance(module, WanAttention):
            module.set_processor(WanAttnProcessor())


def reset_variant(transformer: torch.nn.Module) -> None:
    """Undo compile and QKV fusion."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()
    transformer.unfuse_qkv_projections()


def configure(transformer: torch.nn.Module, variant: str, device: torch.device) -> str:
    """Set up `variant`: "<backend>[+fuse][+compile][+offload]" where backend is
    "diffusers" (exactly as diffusers builds it), "compile" (= diffusers+compile), a name of
    runtime.attention or "<quant backend>:<option>..." (see options_of); fuse = one QKV GEMM;
    compile = regional torch.compile of each block; offload = blocks streamed from pinned CPU
    memory (runtime.offload "block"); fp8linear = the blocks' linears as row-wise FP8 GEMMs
    (runtime.fp8_linear). offload and fp8linear cannot be undone in place: list them last."""
    reset_variant(transformer)
    backend, *flags = variant.split("+")
    if backend == "compile":
        backend, flags = "diffusers", [*flags, "compile"]
    if backend == "diffusers":
        restore_diffusers_default(transformer)
        resolved = "diffusers"
    elif ":" in backend:  # a kernel option under test, e.g. "int8:no_split_acc"
        apply_attention_backend(transformer, backend.partition(":")[0], device)  # availability check
        set_self_attention_processor(transformer, WanKernelAttnProcessor(quant_kernel(options_of(backend)), backend))
        resolved = backend
    else:
        resolved = apply_attention_backend(transformer, backend, device)
    unknown = set(flags) - {"fuse", "compile", "offload", "fp8linear"}
    if unknown:
        raise ValueError(f"unknown variant flags {sorted(unknown)} in {variant!r}")
    quantized = any(isinstance(m, FP8Linear) for m in transformer.modules())
    if quantized and "fp8linear" not in flags:
        raise ValueError(f"{variant!r} after an fp8linear variant: list fp8linear variants last")
    if "fp8linear" in flags and not quantized:
        quantize_linears(transformer)
    if "fuse" in flags:
        transformer.fuse_qkv_projections()
    if "compile" in flags:
        # Regional compilation: each WanTransformerBlock (diffusers' `_repeated_blocks`).
        transformer.compile_repeated_blocks(fullgraph=True)
    if "offload" in flags:
        apply_offload(transformer, "block", device)
    return resolved


# ----------------------------------------------------------------------------- report
class Report:
    def __init__(self, out: Path | None, env: dict) -> None:
        self.out = out
        self.data: dict[str, Any] = {"env": env, "rows": []}

    def add(self, **row: Any) -> None:
        self.data["rows"].append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "times"}
        print(json.dumps(shown), flush=True)
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=1, default=str))

    def table(self) -> str:
        head = ("| section | size | variant | s | vs diffusers | TFLOP/s | % peak | peak GiB | rel err "
                "| err vs fp32 | note |")
        lines = [head, "|" + "---|" * 11]
        for r in self.data["rows"]:
            def f(key: str, fmt: str) -> str:
                v = r.get(key)
                return "" if v is None else format(v, fmt)
            lines.append(
                f"| {r['section']} | {r.get('size', '')} | {r['variant']} | {f('seconds', '.4g')} | "
                f"{f('speedup', '.3g')}{'x' if r.get('speedup') else ''} | {f('tflops', '.0f')} | {f('peak_fraction', '.0%')} | "
                f"{f('peak_gib', '.2f')} | {f('rel_err', '.2e')} | {f('rel_err_fp32', '.2e')} | {r.get('note', '')} |"
            )
        return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import diffusers  # noqa: PLC0415

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import triton  # noqa: PLC0415

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    from importlib.metadata import version  # noqa: PLC0415

    for package in ("sageattention", "cache-dit"):
        try:
            env[package] = version(package)
        except Exception:  # noqa: BLE001 - absent is fine
            env[package] = None
    env["backends"] = available_backends(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return env


# ----------------------------------------------------------------------------- sections
def section_peak(args, report: Report, device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec, times = time_fn(lambda: a @ b, device, warmup=3, repeats=10)
    tflops = 2 * n**3 / sec / 1e12
    report.add(section="peak", variant=f"{dtype} matmul {n}^3", seconds=sec, tflops=tflops, times=times)
    report.set("peak_tflops", tflops)
    return tflops


def _attn_kernel(name: str) -> Callable:
    """"sdpa" | "cudnn" | "flash" | a custom backend, optionally "<quant>:no_split_acc" and/or
    "@BMxBNwWARPSsSTAGES" (a fixed Triton config instead of the autotuner's pick)."""
    if name == "sdpa":
        return reference_kernel
    if name in ("cudnn", "flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]

        def run(q, k, v, cos, sin):
            with sdpa_kernel(backend):
                return reference_kernel(q, k, v, cos, sin)
        return run
    spec, _, config = name.partition("@")
    if ":" not in spec and not config:
        return kernel_for(spec)
    from ..runtime.kernels.quant_attention import quant_attention  # noqa: PLC0415

    opts = options_of(spec)
    fixed = None
    if config:
        bm_bn, warps_stages = config.split("w")
        warps, stages = warps_stages.split("s")
        fixed = (*map(int, bm_bn.split("x")), int(warps), int(stages))
    return lambda q, k, v, cos, sin: quant_attention(q, k, v, cos, sin, opts, config=fixed)


def options_of(spec: str):
    """"int8:no_split_acc" -> QuantAttentionOptions."""
    base, *flags = spec.split(":")
    unknown = set(flags) - {"no_split_acc"}
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)} in {spec!r}")
    return dataclasses.replace(quant_options(base), split_acc="no_split_acc" not in flags)


def section_attn(args, report: Report, device: torch.device, peak: float | None) -> None:
    """The self-attention kernel alone at each size's shape (RoPE included)."""
    dtype = torch.bfloat16
    for size in args.sizes:
        cfg = size.config()
        _, _, t, h, w = size.latent_shape(1, cfg)
        seq = t * (h // 2) * (w // 2)
        heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        gen = torch.Generator(device="cpu").manual_seed(2)
        q, k, v = (torch.randn(1, seq, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
        theta = torch.rand(seq, dim // 2, generator=gen) * 2 * math.pi
        cos = theta.cos().repeat_interleave(2, -1).view(1, seq, 1, dim).to(device)
        sin = theta.sin().repeat_interleave(2, -1).view(1, seq, 1, dim).to(device)
        flops = 4.0 * heads * seq * seq * dim
        ref = None
        for name in args.attn_kernels:
            reason = available_backends(device, dtype).get(name.partition("@")[0].partition(":")[0])
            if reason is not None:
                report.add(section="attn", size=size.name, variant=name, note=f"skipped: {reason[:80]}")
                continue
            fn = _attn_kernel(name)
            try:
                reset_peak(device)
                out = fn(q, k, v, cos, sin)
                sec, times = time_fn(lambda: fn(q, k, v, cos, sin), device, warmup=1, repeats=args.repeats)
            except Exception as e:  # noqa: BLE001 - one failing kernel must not end the run
                report.add(section="attn", size=size.name, variant=name, note=f"failed: {type(e).__name__}: {e}"[:200])
                continue
            if ref is None:
                ref = out
            report.add(section="attn", size=size.name, variant=name, seconds=sec,
                       speedup=report_speedup(report, "attn", size.name, sec), tflops=flops / sec / 1e12,
                       peak_fraction=flops / sec / 1e12 / peak if peak else None,
                       peak_gib=peak_memory_gib(device), rel_err=rel_error(out, ref), times=times,
                       note=_tuned_config(name))
            del out
        del q, k, v, ref


def _tuned_config(name: str) -> str:
    if "@" in name or name.partition(":")[0] not in ("int8", "fp8", "int8_pv16"):
        return ""
    from ..runtime.kernels.quant_attention import _attn_kernel_tuned  # noqa: PLC0415

    best = _attn_kernel_tuned.best_config
    return "" if best is None else f"config {best.kwargs} w{best.num_warps} s{best.num_stages}"


def report_speedup(report: Report, section: str, size: str, seconds: float) -> float | None:
    """Against the first row of this section and size (the baseline, measured first)."""
    for r in report.data["rows"]:
        if r["section"] == section and r.get("size") == size and r.get("seconds"):
            return r["seconds"] / seconds
    return None


def section_forward(args, report: Report, device: torch.device, dtype: torch.dtype, peak: float | None) -> None:
    for size in args.sizes:
        cfg = size.config()
        reset_peak(device)
        model = build_transformer(cfg, device, dtype)
        report.add(section="forward", size=size.name, variant="(weights)", peak_gib=peak_memory_gib(device),
                   note=f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
        ref = ref32 = None
        for batch in sorted(set(args.batches)):
            inputs = make_inputs(size, cfg, batch, device, dtype)
            if batch == 1 and size.name in args.fp32_ref_sizes:
                ref32 = fp32_reference(model, inputs, dtype)
            flops = forward_flops(cfg, inputs["hidden_states"].shape)
            for variant in args.variants:
                if batch > 1 and variant not in args.batch_variants:
                    continue
                label = variant if batch == 1 else f"{variant} B={batch}"
                try:
                    resolved = configure(model, variant, device)
                    reset_peak(device)
                    with torch.inference_mode():
                        out = model(**inputs)[0]  # also the warm-up (autotune, compile)
                        sec, times = time_fn(lambda: model(**inputs), device,
                                             warmup=1 if "compile" in variant else 0, repeats=args.repeats)
                except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
                    report.add(section="forward", size=size.name, variant=label,
                               note=f"failed: {type(e).__name__}: {e}"[:300])
                    continue
                if ref is None:
                    ref = out[:1]
                per_sample = sec / batch
                report.add(section="forward", size=size.name, variant=label, backend=resolved, batch=batch,
                           seconds=sec, per_sample=per_sample,
                           speedup=report_speedup(report, "forward", size.name, per_sample),
                           tflops=flops / sec / 1e12, peak_fraction=flops / sec / 1e12 / peak if peak else None,
                           peak_gib=peak_memory_gib(device), rel_err=rel_error(out[:1], ref),
                           rel_err_fp32=None if ref32 is None else rel_error(out[:1], ref32), times=times,
                           note="" if batch == 1 else f"{per_sample:.4g} s per sample")
                del out
            del inputs
        reset_variant(model)
        del model, ref, ref32
        reset_peak(device)


@dataclass
class LoopJob:
    """One CFG job on a random-weight transformer: the same weights, embeddings, scheduler
    and seed for every variant a section compares."""
    size: Size
    transformer: torch.nn.Module
    positive: torch.Tensor
    negative: torch.Tensor
    wan: Any
    """runtime WanModel around `transformer`."""
    request: Any
    """runtime SamplingRequest: UniPC, shift 5, guidance 5, seed 0."""

    def run_loop(self, cache: Any = None) -> tuple[torch.Tensor, dict]:
        """Our `sample()` with `cache` as WanModel.cache: the final latent in the transformer's
        (normalised) space on the GPU, and the job's stats."""
        from ..runtime.sampling.latent_format import normalize  # noqa: PLC0415
        from ..runtime.sampling.loop import sample  # noqa: PLC0415

        result = sample(self.wan.replace(cache=cache), self.request)
        return normalize(result.latent.to(self.wan.device), "wan2.1"), result.stats


def loop_job(size: Size, steps: int, device: torch.device, dtype: torch.dtype) -> LoopJob:
    from ..runtime.model_setup import prepare_for_sampling  # noqa: PLC0415
    from ..runtime.models.variants import get_variant  # noqa: PLC0415
    from ..runtime.models.wan_model import WanModel  # noqa: PLC0415
    from ..runtime.sampling.request import SamplingRequest  # noqa: PLC0415

    cfg = size.config()
    model = build_transformer(cfg, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(3)
    positive = torch.randn(1, TEXT_TOKENS, cfg["text_dim"], generator=gen).to(device, dtype)
    negative = torch.randn(1, TEXT_TOKENS, cfg["text_dim"], generator=gen).to(device, dtype)
    variant_name = "wan2.1-t2v-1.3b" if size.variant == "tiny" else size.variant
    # sample() applies the model's own attention choice when it differs from the one recorded
    # on the transformer; done once here, so the processors configure() sets stay in every job
    # (the default "auto" would put the INT8 kernel under a "default attention" row on Hopper).
    wan = prepare_for_sampling(WanModel(transformer=model, variant=get_variant(variant_name), dtype=dtype,
                                        device=device, attention="sdpa"))
    request = SamplingRequest(positive=positive, negative=negative, latent_shape=size.latent_shape(1, cfg),
                              seed=0, steps=steps, guidance_scale=5.0, shift=5.0, scheduler="unipc")
    return LoopJob(size=size, transformer=model, positive=positive, negative=negative, wan=wan, request=request)


def split_job_variant(variant: str) -> tuple[str, CacheConfig | None]:
    """A job variant "<configure() variant>[+<cache terms>]" -> (configure variant, cache):
    e.g. "int8+compile+dbcache" -> ("int8+compile", CacheConfig()); the cache terms are
    cache_config_for()'s, and no attention terms means diffusers' default attention."""
    terms = variant.split("+")
    is_cache = [t in ("dbcache", "taylorseer", "taylorseer2") or t.startswith("scm-") for t in terms]
    attention = "+".join(t for t, c in zip(terms, is_cache) if not c) or "diffusers"
    cache = "+".join(t for t, c in zip(terms, is_cache) if c)
    return attention, cache_config_for(cache) if cache else None


def section_job(args, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    """A full CFG job: diffusers' WanPipeline (output_type="latent") against our loop, same
    weights, embeddings, scheduler and seed; `--job-variants` may add cache-dit terms to the
    loop's attention variant (split_job_variant). Each row is timed after a 2-step untimed job
    of the same setting (compilation, cuBLAS plans, the allocator); errors are the final
    latent's against the pipeline's and against our uncached loop's with default attention."""
    from diffusers import WanPipeline  # noqa: PLC0415

    from ..runtime.sampling.schedulers import make_scheduler  # noqa: PLC0415

    if any(split_job_variant(v)[1] is not None for v in args.job_variants):
        import cache_dit  # noqa: F401, PLC0415 - imported before timing: its first import takes seconds

    size = args.job_size
    job = loop_job(size, args.steps, device, dtype)
    model = job.transformer
    flops = 2 * args.steps * forward_flops(model.config, job.request.latent_shape)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=make_scheduler("unipc", job.request.shift))
    pipe.set_progress_bar_config(disable=True)

    def run_pipeline(steps: int) -> tuple[torch.Tensor, dict | None]:
        return pipe(prompt_embeds=job.positive, negative_prompt_embeds=job.negative, height=size.height,
                    width=size.width, num_frames=size.frames, num_inference_steps=steps,
                    guidance_scale=job.request.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(job.request.seed),
                    output_type="latent", return_dict=False)[0], None

    def loop_runner(cache: CacheConfig | None) -> Callable[[int], tuple[torch.Tensor, dict | None]]:
        def run(steps: int) -> tuple[torch.Tensor, dict | None]:
            out, stats = dataclasses.replace(job, request=dataclasses.replace(job.request, steps=steps)).run_loop(cache)
            return out, stats.get("cache")
        return run

    rows = [("diffusers WanPipeline", "diffusers", run_pipeline), ("wanflow loop", "diffusers", loop_runner(None))]
    for v in args.job_variants:
        attention, cache = split_job_variant(v)
        rows.append((f"wanflow loop {v}", attention, loop_runner(cache)))
    ref = loop_ref = None
    configured = None  # the attention variant in place: rows sharing it reuse its compilation
    for variant, attention, runner in rows:
        try:
            if attention != configured:
                configured = None
                configure(model, attention, device)
                configured = attention
            reset_peak(device)
            with torch.inference_mode():
                runner(min(2, args.steps))
                _sync(device)
                t0 = time.perf_counter()
                out, counts = runner(args.steps)
                _sync(device)
                sec = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            report.add(section="job", size=size.name, variant=variant, note=f"failed: {type(e).__name__}: {e}"[:300])
            continue
        ref = out if ref is None else ref
        loop_ref = out if loop_ref is None and variant == "wanflow loop" else loop_ref
        base = report_speedup(report, "job", size.name, sec)
        note = f"{args.steps} steps CFG" + (f"; time ratio {1 / base:.2f}" if base else "")
        if counts:
            note += f"; {counts['computed_calls']}/{counts['calls']} calls computed"
        rel_loop = None if loop_ref is None else rel_error(out, loop_ref)
        if rel_loop is not None and variant != "wanflow loop":
            note += f"; rel err vs our uncached loop {rel_loop:.2e}"
        report.add(section="job", size=size.name, variant=variant, seconds=sec,
                   speedup=base, tflops=None if counts else flops / sec / 1e12, peak_gib=peak_memory_gib(device),
                   rel_err=rel_error(out, ref), rel_err_loop=rel_loop, cache=counts, note=note)
    reset_variant(model)
    del model, pipe, job
    reset_peak(device)


def cache_config_for(variant: str) -> CacheConfig | None:
    """"none" -> None; else "+"-joined terms: "dbcache" (SGLang's defaults: Fn 1, Bn 0, warmup 4,
    threshold 0.24, at most 3 cached steps in a row), "taylorseer" (order 1) or "taylorseer2",
    "scm-<preset>" (a runtime.cache SCM preset; DBCache under it), e.g. "scm-fast+taylorseer"."""
    if variant == "none":
        return None
    options: dict[str, Any] = {}
    for term in variant.split("+"):
        if term == "dbcache":
            continue
        if term in ("taylorseer", "taylorseer2"):
            options.update(taylorseer=True, taylorseer_order=2 if term.endswith("2") else 1)
        elif term.startswith("scm-") and term[4:] in SCM_PRESETS:
            options["scm_preset"] = term[4:]
        else:
            raise ValueError(f"unknown cache term {term!r} in {variant!r}")
    return CacheConfig(**options)


def section_cache(args, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    """A full CFG job through our loop with each cache-dit setting against the same job
    uncached (the first variant, "none"): wall time, transformer calls computed vs served from
    the cache, and the final latent's relative L2 error. Attention stays the loop's default, so
    the ratio is caching alone."""
    import cache_dit  # noqa: PLC0415 - imported before timing: its first import takes seconds

    from ..runtime.sampling.loop import sample  # noqa: PLC0415

    size, steps = args.job_size, args.cache_steps
    job = loop_job(size, steps, device, dtype)
    with torch.inference_mode():  # warm-up (cuBLAS/cuDNN plans, allocator): two steps, uncached
        sample(job.wan, dataclasses.replace(job.request, steps=2))
    ref = None
    for variant in args.cache_variants:
        try:
            cache = cache_config_for(variant)
            reset_peak(device)
            with torch.inference_mode():
                _sync(device)
                t0 = time.perf_counter()
                out, stats = job.run_loop(cache)
                _sync(device)
                sec = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one failing setting must not end the run
            report.add(section="cache", size=size.name, variant=variant, note=f"failed: {type(e).__name__}: {e}"[:300])
            continue
        ref = out if ref is None else ref
        counts = stats.get("cache")
        note = f"{steps} steps CFG"
        if counts:
            note += (f"; {counts['computed_calls']}/{counts['calls']} calls computed"
                     f" ({counts['calls'] / max(counts['computed_calls'], 1):.2f}x fewer),"
                     f" {counts['blocks_total'] / max(counts['blocks_computed'], 1):.2f}x fewer block runs")
        report.add(section="cache", size=size.name, variant=variant, seconds=sec,
                   speedup=report_speedup(report, "cache", size.name, sec), peak_gib=peak_memory_gib(device),
                   rel_err=rel_error(out, ref), cache=counts, note=note)
    if getattr(job.transformer, "_is_cached", False):
        cache_dit.disable_cache(job.transformer)
    del job, ref
    reset_peak(device)


def section_vae(args, report: Report, device: torch.device) -> None:
    from diffusers import AutoencoderKLWan  # noqa: PLC0415

    cfg = load_shipped_config("vae-wan2.1")
    cfg.pop("_class_name", None)
    if args.smoke:
        cfg.update(base_dim=8, num_res_blocks=1)
    size = args.job_size
    shape = size.latent_shape(1, {"in_channels": 16})
    cases = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]
    for dtype, tiled in cases[:2] if args.smoke else cases:
        torch.manual_seed(0)
        with torch.device(device):
            vae = AutoencoderKLWan(**cfg).to(dtype).eval()
        if tiled:
            vae.enable_tiling()
        latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(4)).to(device, dtype)
        reset_peak(device)
        with torch.inference_mode():
            sec, times = time_fn(lambda: vae.decode(latents, return_dict=False)[0], device,
                                 warmup=0 if args.smoke else 1, repeats=args.vae_repeats)
        report.add(section="vae", size=f"{size.height}x{size.width}x{size.frames}",
                   variant=f"decode {str(dtype).split('.')[-1]}{' tiled' if tiled else ''}",
                   seconds=sec, speedup=report_speedup(report, "vae", f"{size.height}x{size.width}x{size.frames}", sec),
                   peak_gib=peak_memory_gib(device), times=times)
        del vae, latents
        reset_peak(device)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wanflow bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="peak,attn,forward,job,vae",
                   help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--sizes", default="1.3B", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--variants", default=",".join(FORWARD_VARIANTS),
                   help="forward variants: diffusers (baseline, always first), a backend name, "
                        "compile, <backend>[+fuse][+compile][+offload] (offload variants last)")
    p.add_argument("--batch-variants", default="int8+compile",
                   help="variants also timed at B=2 (CFG batched), see --batches")
    p.add_argument("--batches", default="1,2", help="batch sizes for the forward section")
    p.add_argument("--attn-kernels", default=",".join(ATTN_KERNELS))
    p.add_argument("--fp32-ref-sizes", default="1.3B",
                   help="sizes whose forward is also run in fp32 as a precision yardstick")
    p.add_argument("--job-variants", default="int8+compile",
                   help="our loop with these variants: a forward variant, optionally + cache terms "
                        "(e.g. int8+compile+dbcache, see split_job_variant)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the job section")
    p.add_argument("--cache-variants", default=",".join(CACHE_VARIANTS),
                   help="cache section: none (baseline, always first) and cache_config_for() names")
    p.add_argument("--cache-steps", type=int, default=50, help="denoising steps of the cache section")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--vae-repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny configs: checks the script runs")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    try:
        args.sizes = [SIZES[s] for s in args.sizes.split(",") if s]
    except KeyError as e:
        p.error(f"unknown size {e}; choose from {', '.join(SIZES)}")
    variants = [v for v in args.variants.split(",") if v]
    args.variants = ["diffusers"] + [v for v in variants if v != "diffusers"]
    args.batch_variants = [v for v in args.batch_variants.split(",") if v]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.attn_kernels = [k for k in args.attn_kernels.split(",") if k]
    args.job_variants = [v for v in args.job_variants.split(",") if v]
    args.fp32_ref_sizes = [v for v in args.fp32_ref_sizes.split(",") if v]
    cache_variants = [v for v in args.cache_variants.split(",") if v]
    args.cache_variants = ["none"] + [v for v in cache_variants if v != "none"]
    args.job_size = SIZES["1.3B"]
    if args.smoke:
        args.sizes = [SMOKE_SIZE]
        args.job_size = SMOKE_SIZE
        # 8 steps: past DBCache's 4 warm-up steps, so the job's cache rows do cache.
        args.steps = min(args.steps, 8)
        args.repeats = 1
        args.vae_repeats = 1
        args.batches = [1, 2]
        # torch.compile on CPU needs a C++ toolchain: CI checks the plumbing, not the compiler.
        args.variants = ["diffusers", "sdpa", "math", "sdpa+fuse"]
        args.batch_variants = ["sdpa"]
        args.fp32_ref_sizes = ["tiny"]
        args.attn_kernels = ["sdpa"]
        args.job_variants = ["sdpa", "sdpa+dbcache"]
        # SCM needs >= 8 steps (runtime.cache.SCM_MIN_STEPS); fewer would test only its off switch.
        args.cache_steps = min(args.cache_steps, 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    report = Report(args.out, environment(device))
    report.set("args", {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                        for k, v in vars(args).items() if k != "sizes"})
    peak = section_peak(args, report, device) if "peak" in args.sections else None
    if "attn" in args.sections and not args.smoke:
        section_attn(args, report, device, peak)
    if "forward" in args.sections:
        section_forward(args, report, device, dtype, peak)
    if "job" in args.sections:
        section_job(args, report, device, dtype)
    if "vae" in args.sections:
        section_vae(args, report, device)
    if "cache" in args.sections:
        section_cache(args, report, device, dtype)
    env = report.data["env"]
    print(f"\n{env.get('gpu', env['device'])} torch {env['torch']} diffusers {env['diffusers']} "
          f"triton {env['triton']}; bf16 matmul peak {report.data.get('peak_tflops', 0):.0f} TFLOP/s")
    print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
