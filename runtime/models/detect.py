"""What a model file is, from its key names and shapes (never from its file name)."""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

from ..errors import ModelFileError
from .single_file import DIFFUSION_PREFIXES
from .variants import VariantSpec, load_shipped_config, variant_for_config

_KIND_WORDS = {
    "diffusion_model": ("a diffusion model", "diffusion model loader"),
    "text_encoder": ("a text encoder", "text encoder loader"),
    "vae": ("a VAE", "VAE loader"),
    "clip_vision": ("a CLIP-vision model", "CLIP vision loader"),
    "lora": ("a LoRA", "LoRA loader"),
}

_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", ".diff_b")


def detect_file_kind(keys: Iterable[str]) -> str:
    """"diffusion_model" | "text_encoder" | "vae" | "clip_vision" | "lora" | "unknown"."""
    keys = set(keys)
    for prefix in DIFFUSION_PREFIXES:
        keys |= {k[len(prefix):] for k in keys if k.startswith(prefix)}
    if any(m in k for k in keys for m in _LORA_MARKERS):
        return "lora"
    if "head.modulation" in keys or "blocks.0.self_attn.q.weight" in keys or (
        "scale_shift_table" in keys and "condition_embedder.time_proj.weight" in keys
    ):
        return "diffusion_model"
    if "decoder.middle.0.residual.0.gamma" in keys or "decoder.mid_block.resnets.0.norm1.gamma" in keys:
        return "vae"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "text_encoder"
    if any(k.startswith(("vision_model.", "visual.")) for k in keys):
        return "clip_vision"
    return "unknown"


def ensure_kind(kind: str, expected: str, file_name: str, *, file: str | None = None) -> None:
    """Raise the 'wrong kind of file' error: '<file> is a VAE, not a diffusion model: ...'."""
    if kind == expected:
        return
    want = _KIND_WORDS[expected][0]
    if kind == "unknown":
        raise ModelFileError(
            f"{file_name} is not {want} file (its keys match no known model kind)", file=file or file_name
        )
    what, loader = _KIND_WORDS[kind]
    raise ModelFileError(
        f"{file_name} is {what} file, not {want}: load it with the {loader}", file=file or file_name
    )


def block_count(keys: Iterable[str], pattern: str) -> int:
    """How many numbered blocks `keys` hold: `pattern` captures the block index."""
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def derive_transformer_config(shapes: Mapping[str, tuple[int, ...]], file: str) -> dict:
    """The diffusers WanTransformer3DModel config implied by original-layout shapes."""
    def shape(key: str) -> tuple[int, ...]:
        try:
            return tuple(shapes[key])
        except KeyError:
            sample = ", ".join(sorted(shapes)[:6])
            raise ModelFileError(
                f"unknown Wan variant: {file} has no '{key}' (keys: {sample}, ...)", file=file, key=key
            ) from None

    dim = shape("head.modulation")[-1]
    if dim % 128:
        raise ModelFileError(f"unknown Wan variant: {file} has model width {dim}, not a multiple of 128",
                             file=file, key="head.modulation")
    patch = shape("patch_embedding.weight")
    patch_size = tuple(patch[2:])
    has_img = "img_emb.proj.0.weight" in shapes
    config = load_shipped_config("wan2.1-t2v-14b")  # for the constant fields (eps, rope, ...)
    config.update(
        num_attention_heads=dim // 128,
        attention_head_dim=128,
        in_channels=patch[1],
        out_channels=shape("head.head.weight")[0] // math.prod(patch_size),
        patch_size=patch_size,
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_layers=block_count(shapes, r"^blocks\.(\d+)\."),
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        image_dim=shape("img_emb.proj.0.weight")[0] if has_img else None,
        added_kv_proj_dim=shape("blocks.0.cross_attn.k_img.weight")[1] if has_img else None,
        pos_embed_seq_len=shape("img_emb.emb_pos")[1] if "img_emb.emb_pos" in shapes else None,
    )
    return config


def detect_transformer(shapes: Mapping[str, tuple[int, ...]], file: str) -> tuple[VariantSpec, dict]:
    """(variant, diffusers config) of an original-layout Wan transformer (prefix stripped)."""
    if any(k.startswith("vace_") for k in shapes):
        raise ModelFileError(f"{file} is a Wan VACE model, which wanflow does not run", file=file)
    config = derive_transformer_config(shapes, file)
    try:
        variant = variant_for_config(config)
    except ModelFileError as e:
        raise ModelFileError(f"{file}: {e.message}", file=file) from None
    return variant, config
