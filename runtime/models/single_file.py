"""Single model files (.safetensors): header, prefixes, fp8 / fp8_scaled weights, key names.

The header is read first and everything is checked on it (kind of file, variant, key names,
shapes) before any tensor data is read; tensors are then read one at a time, dequantised and
cast, so a model is never held twice in memory.

Key names: files in ComfyUI's folders use the original Wan layout; the modules are
diffusers'. The original→diffusers renames are diffusers' own converters, run on the key
names alone (a dict key→key goes through them). The inverse (for writing original-layout
files) is written here and checked, key by key, against those converters.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelFileError

DIFFUSION_PREFIXES = ("model.diffusion_model.",)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# ComfyUI's fp8_scaled files: a marker tensor, and per quantised linear `<name>.scale_weight`
# (true weight = fp8 weight × scale) and optionally `<name>.scale_input` (an activation scale
# for fp8 matmuls).
SCALED_FP8_MARKER = "scaled_fp8"
_SCALE_WEIGHT = ".scale_weight"
_SCALE_INPUT = ".scale_input"


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """What a .safetensors file holds, read from its header only.

    `tensors` is keyed by the names with `prefix` removed; `source_key` gives the stored name.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    prefix: str = ""
    _stored: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def source_key(self, key: str) -> str:
        return self._stored.get(key, key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        try:
            return self.tensors[key].shape
        except KeyError:
            raise ModelFileError(f"{self.name} has no '{key}', which a model of its kind needs",
                                 file=str(self.path), key=key) from None

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the float weights are stored in; bf16 for fp8 files (the dtype
        fp8 weights are dequantised into when none is asked for)."""
        totals: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.numel
        if not totals:
            raise ModelFileError(f"{self.name} holds no float tensors", file=str(self.path))
        dominant = max(totals, key=totals.__getitem__)
        return torch.bfloat16 if dominant in FP8_DTYPES else dominant


def read_header(path: str | Path, *, strip_prefixes: Iterable[str] = ()) -> SafetensorsHeader:
    """Open `path`'s header; a clear ModelFileError when it is missing, not a safetensors
    file, or truncated (safetensors checks the declared data extent against the file size)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}", file=str(path))
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file", file=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            stored = {k: _info(f.get_slice(k), path, k) for k in f.keys()}
    except SafetensorError as e:
        raise ModelFileError(
            f"{path.name} is not a valid .safetensors file (truncated, corrupt, or another "
            f"format): {e}",
            file=str(path),
        ) from None
    prefix = next((p for p in strip_prefixes if any(k.startswith(p) for k in stored)), "")
    tensors: dict[str, TensorInfo] = {}
    renamed: dict[str, str] = {}
    for key, info in stored.items():
        short = key[len(prefix):] if prefix and key.startswith(prefix) else key
        tensors[short] = info
        if short != key:
            renamed[short] = key
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, prefix=prefix,
                             _stored=renamed)


def _info(tensor_slice, path: Path, key: str) -> TensorInfo:
    name = tensor_slice.get_dtype()
    try:
        dtype = _DTYPES[name]
    except KeyError:
        raise ModelFileError(f"{path.name}: tensor '{key}' has unsupported dtype {name}",
                             file=str(path), key=key) from None
    return TensorInfo(dtype, tuple(tensor_slice.get_shape()))


# --------------------------------------------------------------------------- fp8 / fp8_scaled


@dataclass(frozen=True)
class Fp8Layout:
    scales: dict[str, str]
    """weight key -> its scale_weight key."""
    aux_keys: frozenset[str]
    """Marker, scale and input-scale keys: not weights of the model."""

    @property
    def scaled(self) -> bool:
        return bool(self.scales)


def fp8_layout(keys: Iterable[str]) -> Fp8Layout:
    scales: dict[str, str] = {}
    aux: set[str] = set()
    for key in keys:
        if key == SCALED_FP8_MARKER:
            aux.add(key)
        elif key.endswith(_SCALE_WEIGHT):
            scales[key[: -len(_SCALE_WEIGHT)] + ".weight"] = key
            aux.add(key)
        elif key.endswith(_SCALE_INPUT):
            # Only needed to run matmuls in fp8; weights are dequantised at load instead.
            aux.add(key)
    return Fp8Layout(scales=scales, aux_keys=frozenset(aux))


def read_tensors(
    header: SafetensorsHeader,
    names: Mapping[str, str],
    *,
    dtype_for: Callable[[str], torch.dtype],
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read `names` (target key -> key in the file) into `dtype_for(target key)` on `device`.

    fp8 weights are dequantised here, once, into the target dtype (fp8 × scale computed in
    fp32, then cast). The choice: a 14B fp8 file then takes bf16's memory (~28 GB, not ~14)
    where ComfyUI keeps fp8 in memory and upcasts layer by layer at every step; in exchange
    every file runs the same kernels (attention backends, LoRA merging, cache-dit, parallel
    sharding see plain bf16 linears) and pays no per-step upcast.
    """
    layout = fp8_layout(header.tensors)
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # tied weights are read once
    try:
        with safe_open(str(header.path), framework="pt", device=str(device)) as f:
            for target, key in names.items():
                dtype = dtype_for(target)
                if (key, dtype) in done:
                    out[target] = done[(key, dtype)]
                    continue
                tensor = f.get_tensor(header.source_key(key))
                scale_key = layout.scales.get(key)
                if scale_key is not None:
                    scale = f.get_tensor(header.source_key(scale_key)).float()
                    if scale.numel() > 1:  # per-output-channel scales
                        scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))
                    tensor = tensor.float() * scale
                elif tensor.dtype in FP8_DTYPES:
                    tensor = tensor.float()
                out[target] = done[(key, dtype)] = tensor.to(dtype)
    except SafetensorError as e:
        raise ModelFileError(f"{header.name}: could not read tensor data ({e})",
                             file=str(header.path)) from None
    return out


# --------------------------------------------------------------------------- checking


def check_keys_and_shapes(
    header: SafetensorsHeader,
    names: Mapping[str, str],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore_extra: Iterable[str] = (),
) -> None:
    """`names` (model key -> file key) must cover `expected` (model key -> shape) exactly;
    model keys containing one of `ignore_extra` may be left over."""
    missing = sorted(k for k in expected if k not in names)
    ignore = tuple(ignore_extra)
    extra = sorted(names[k] for k in names if k not in expected and not any(p in k for p in ignore))
    file = str(header.path)
    if missing:
        raise ModelFileError(
            f"{header.name} is missing {len(missing)} key(s) the model needs, e.g. "
            f"{', '.join(missing[:5])}",
            file=file, key=missing[0],
        )
    if extra:
        raise ModelFileError(
            f"{header.name} has {len(extra)} key(s) the model does not use, e.g. "
            f"{', '.join(extra[:5])}",
            file=file, key=extra[0],
        )
    for target, key in names.items():
        if target not in expected:
            continue
        got = header.tensors[key].shape
        want = tuple(expected[target])
        if got != want:
            raise ModelFileError(
                f"{header.name}: tensor '{key}' has shape {list(got)}, the model expects {list(want)}",
                file=file, key=key,
            )


# --------------------------------------------------------------------------- loading


def keep_fp32(module_cls: type, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which parameters the library's own `from_pretrained` would keep in fp32 at `dtype`,
    so single-file and folder loads of the same weights give the same module.

    diffusers keeps `_keep_in_fp32_modules` in fp32 always; transformers only for fp16
    (its `_keep_in_fp32_modules_strict` also for bf16).
    """
    names = set(getattr(module_cls, "_keep_in_fp32_modules", None) or ())
    if module_cls.__module__.startswith("transformers."):
        if dtype != torch.float16:
            names = set()
        if dtype in (torch.float16, torch.bfloat16):
            names |= set(getattr(module_cls, "_keep_in_fp32_modules_strict", None) or ())
    return lambda key: bool(names & set(key.split(".")))


def load_into_empty(
    header: SafetensorsHeader,
    build: Callable[[], torch.nn.Module],
    names: Mapping[str, str],
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    ignore_extra: Iterable[str] = (),
) -> torch.nn.Module:
    """Build a module without allocating its weights, check `names` (module key -> file key)
    against it on the header alone, then read the tensors and assign them in place.

    Parameters are created on the meta device (accelerate's `init_empty_weights`); buffers
    are not, since modules compute some (rotary tables) at construction and never store them.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_keys_and_shapes(header, names, expected, ignore_extra=ignore_extra)
    fp32 = keep_fp32(type(module), dtype)
    tensors = read_tensors(
        header,
        {k: v for k, v in names.items() if k in expected},
        dtype_for=lambda key: torch.float32 if fp32(key) else dtype,
        device=device,
    )
    module.load_state_dict(tensors, strict=False, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(f"{header.name}: no weights for {', '.join(left[:5])}", file=str(header.path), key=left[0])
    return module.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- transformer keys


def transformer_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers key -> original Wan key, for the model keys among `keys`."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    # The converter pops from its input; it only renames, so names can stand in for tensors.
    mapping = convert_wan_transformer_to_diffusers({k: k for k in keys})
    # diffusers' single-file converter misses FLF2V's image position embedding (its
    # conversion script maps it to image_embedder.pos_embed).
    if "img_emb.emb_pos" in mapping:
        mapping["condition_embedder.image_embedder.pos_embed"] = mapping.pop("img_emb.emb_pos")
    return mapping


# diffusers name -> original Wan name, applied in order (inverse of the converter's renames).
_TRANSFORMER_TO_ORIGINAL = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.add_([kv])_proj\.", r".\1_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # diffusers' norm2 (cross-attention norm) is the original norm3 and vice versa.
    (r"\.norm2\.", ".norm__swap."),
    (r"\.norm3\.", ".norm2."),
    (r"\.norm__swap\.", ".norm3."),
)


def transformer_keys_to_original(keys: Iterable[str]) -> dict[str, str]:
    """original Wan key -> diffusers key, checked against diffusers' forward converter."""
    return _inverse_checked(keys, _TRANSFORMER_TO_ORIGINAL, transformer_key_map)


# --------------------------------------------------------------------------- VAE keys


def vae_layout(keys: Iterable[str]) -> str:
    """"wan2.2" when the encoder stages are nested (Wan2.2's residual VAE), else "wan2.1"."""
    return "wan2.2" if any(k.startswith("encoder.downsamples.0.downsamples.") for k in keys) else "wan2.1"


_RESNET_PARTS = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_NESTED_STAGE = re.compile(
    r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)$"
)


def vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers key -> original Wan VAE key (Wan2.1 or Wan2.2 layout)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    keys = list(keys)
    if vae_layout(keys) == "wan2.1":
        return convert_wan_vae_to_diffusers({k: k for k in keys})
    # diffusers ships no single-file converter for Wan2.2's VAE (only its conversion script):
    # its stages are nested `<side>.<stages>.I.<stages>.J`, resnets then one resampler, which
    # diffusers names `<side>.<blocks>.I.resnets.J` and `<side>.<blocks>.I.<down|up>sampler`.
    nested = [k for k in keys if _NESTED_STAGE.match(k)]
    mapping = convert_wan_vae_to_diffusers({k: k for k in keys if k not in set(nested)})
    for key in nested:
        side, stages, i, j, rest = _NESTED_STAGE.match(key).groups()
        blocks = "down_blocks" if stages == "downsamples" else "up_blocks"
        for old, new in _RESNET_PARTS:
            if rest.startswith(old):
                mapping[f"{side}.{blocks}.{i}.resnets.{j}.{new}{rest[len(old):]}"] = key
                break
        else:
            sampler = "downsampler" if stages == "downsamples" else "upsampler"
            mapping[f"{side}.{blocks}.{i}.{sampler}.{rest}"] = key
    return mapping


def _resnet_to_original(rest: str) -> str:
    for old, new in _RESNET_PARTS:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def _vae21_to_original(key: str) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return {"quant_conv": "conv1", "post_quant_conv": "conv2"}.get(side, side) + "." + rest
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest)
    if m:
        kind, idx, tail = m.groups()
        pos = 1 if kind == "attentions" else 2 * int(idx)
        tail = tail if kind == "attentions" else _resnet_to_original(tail)
        return f"{side}.middle.{pos}.{tail}"
    for new, old in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new):]}"
    m = re.match(r"^down_blocks\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.downsamples.{m.group(1)}.{_resnet_to_original(m.group(2))}"
    m = re.match(r"^up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", rest)
    if m:
        block, _, resnet, tail = m.groups()
        # Wan2.1's decoder is flat: per stage 3 resnets then an upsampler (4 slots each).
        slot = 4 * int(block) + (int(resnet) if resnet is not None else 3)
        return f"{side}.upsamples.{slot}.{_resnet_to_original(tail)}"
    return key


def _vae22_to_original(key: str) -> str:
    m = re.match(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.+)$", key)
    if not m:
        return _vae21_to_original(key)
    side, blocks, i, _, j, tail = m.groups()
    stages = "downsamples" if blocks == "down_blocks" else "upsamples"
    if j is None:
        # The resampler follows the stage's resnets: 2 in the encoder, 3 in the decoder.
        j = "2" if side == "encoder" else "3"
        return f"{side}.{stages}.{i}.{stages}.{j}.{tail}"
    return f"{side}.{stages}.{i}.{stages}.{j}.{_resnet_to_original(tail)}"


def vae_keys_to_original(keys: Iterable[str], family: str) -> dict[str, str]:
    """original Wan VAE key -> diffusers key, checked against `vae_key_map`."""
    rename = _vae22_to_original if family == "wan2.2" else _vae21_to_original
    return _inverse_checked(keys, rename, vae_key_map)


def _inverse_checked(
    keys: Iterable[str],
    rules: tuple[tuple[str, str], ...] | Callable[[str], str],
    forward: Callable[[Iterable[str]], dict[str, str]],
) -> dict[str, str]:
    keys = list(keys)
    if callable(rules):
        inverse = {rules(k): k for k in keys}
    else:
        inverse = {}
        for key in keys:
            orig = key
            for pattern, repl in rules:
                orig = re.sub(pattern, repl, orig)
            inverse[orig] = key
    round_trip = forward(inverse)
    wrong = [(o, d, round_trip.get(d)) for o, d in inverse.items() if round_trip.get(d) != o]
    if wrong or len(inverse) != len(keys) or len(round_trip) != len(keys):
        raise RuntimeError(f"key inversion does not round-trip through diffusers' converter: {wrong[:3]}")
    return inverse


# --------------------------------------------------------------------------- folders


def folder_float_dtype(folder: Path) -> torch.dtype:
    """The float dtype a diffusers/transformers component folder stores its weights in."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder} has no .safetensors weights", file=str(folder))
    return read_header(files[0]).float_dtype()


def load_pretrained(cls: type, folder: Path, *, dtype: torch.dtype | None,
                    device: str | torch.device, what: str) -> tuple[torch.nn.Module, torch.dtype]:
    """`cls.from_pretrained(folder)` (the libraries build it on the meta device themselves)
    in `dtype` (None: the folder's own), errors turned into ModelFileError naming the folder."""
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"{folder} is not a {what} folder (no config.json)", file=str(folder))
    config = json.loads((folder / "config.json").read_text())
    found = config.get("_class_name") or config.get("model_type")
    config_class = getattr(cls, "config_class", None)  # transformers models only
    wanted = getattr(config_class, "model_type", None) if config_class else cls.__name__
    if found != wanted:
        article = "an" if str(found)[:1].lower() in "aeiou" else "a"
        raise ModelFileError(f"{folder} holds {article} {found}, not a {what} ({wanted})", file=str(folder))
    dtype = dtype or folder_float_dtype(folder)
    # diffusers takes `torch_dtype`, transformers 5 `dtype`.
    key = "dtype" if cls.__module__.startswith("transformers.") else "torch_dtype"
    try:
        module = cls.from_pretrained(str(folder), **{key: dtype})
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"could not load the {what} in {folder}: {e}", file=str(folder)) from None
    return module.to(device).eval().requires_grad_(False), dtype
