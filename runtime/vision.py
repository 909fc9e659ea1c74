"""CLIP-vision image embeds for Wan2.1 I2V / FLF2V.

Wan feeds the penultimate hidden states of a ViT-H/14 vision tower (257 tokens x 1280 at
224 px) into its image cross-attention. The encoder comes as ComfyUI's `clip_vision_h`
single file (transformers' key names: `vision_model.*`, plus an unused `visual_projection`)
or as a diffusers pipeline's `image_encoder/` + `image_processor/` folders. The model is
transformers' `CLIPVisionModel`; preprocessing is transformers' CLIP image processor.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputValueError, ModelFileError
from .models.detect import block_count, detect_file_kind, ensure_kind
from .models.single_file import SafetensorsHeader, load_into_empty, load_pretrained, read_header

log = logging.getLogger(__name__)

CROP_MODES = ("center", "none")
"""center: shortest side to the model's size, then a center crop (ComfyUI's and diffusers'
default); none: stretch to a square (what the official Wan repository does)."""

# Attention heads cannot be read from shapes. OpenCLIP/OpenAI towers: ViT-B 12, L/H/bigG 16;
# other widths (tiny test models) use 64-wide heads.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_PREFIX = "vision_model."
_UNUSED = ("visual_projection.",)
"""The projection head: Wan uses hidden states, not the projected image embedding."""


@dataclass
class ClipVision:
    model: torch.nn.Module
    """transformers `CLIPVisionModel`."""
    processor: object
    """transformers CLIP image processor (resize, crop, normalise)."""
    dtype: torch.dtype
    device: torch.device
    source: str = ""

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


@dataclass
class ClipVisionOutput:
    penultimate_hidden_states: torch.Tensor
    """[images, tokens, hidden] float32 on CPU (ComfyUI's name for the same tensor)."""

    @property
    def image_count(self) -> int:
        return int(self.penultimate_hidden_states.shape[0])


def _processor(image_size: int, folder: Path | None = None):
    # The PIL backend explicitly: transformers' default backend needs torchvision, and the
    # two resize differently, so one backend everywhere keeps results reproducible.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if folder is not None:
        return CLIPImageProcessorPil.from_pretrained(str(folder))
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def load_clip_vision(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ClipVision:
    """A CLIP vision tower from a ComfyUI single file, a diffusers pipeline folder (its
    `image_encoder/` and `image_processor/`), or an `image_encoder/` folder itself."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, dtype, device)
    return _load_single_file(path, dtype, device)


def _load_folder(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> ClipVision:
    from transformers import CLIPVisionModel

    encoder = path / "image_encoder" if (path / "image_encoder").is_dir() else path
    model, dtype = load_pretrained(CLIPVisionModel, encoder, dtype=dtype, device=device, what="CLIP vision encoder")
    processor_dir = encoder.parent / "image_processor"
    processor = _processor(model.config.image_size, processor_dir if processor_dir.is_dir() else None)
    return ClipVision(model=model, processor=processor, dtype=dtype, device=torch.device(device), source=str(path))


def _clip_config(header: SafetensorsHeader):
    from transformers import CLIPVisionConfig

    hidden = header.shape(f"{_PREFIX}embeddings.class_embedding")[0]
    patch = header.shape(f"{_PREFIX}embeddings.patch_embedding.weight")[-1]
    positions = header.shape(f"{_PREFIX}embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ModelFileError(f"{header.name}: {positions} position embeddings is not a square grid plus a class token",
                             file=str(header.path), key=f"{_PREFIX}embeddings.position_embedding.weight")
    layers = block_count(header.tensors, rf"^{_PREFIX}encoder\.layers\.(\d+)\.")
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=header.shape(f"{_PREFIX}encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers,
        num_attention_heads=_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        patch_size=patch,
        image_size=grid * patch,
        hidden_act="gelu",  # ViT-H/14 (clip_vision_h); OpenAI's ViT-L would need quick_gelu
        layer_norm_eps=1e-5,
    )


def _load_single_file(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> ClipVision:
    from transformers import CLIPVisionModel

    header = read_header(path)
    ensure_kind(detect_file_kind(header.tensors), "clip_vision", header.name, file=str(path))
    if not any(k.startswith(_PREFIX) for k in header.tensors):
        raise ModelFileError(
            f"{header.name} is a CLIP vision model in open_clip layout ('visual.*'); use ComfyUI's "
            "clip_vision_h.safetensors (transformers layout, 'vision_model.*')", file=str(path))
    config = _clip_config(header)
    # transformers 5's CLIPVisionModel has no `vision_model.` level (its from_pretrained strips
    # the prefix the same way); anything else left over is reported as an extra key.
    names = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): k for k in header.tensors if not k.startswith(_UNUSED)}
    dtype = dtype or header.float_dtype()
    model = load_into_empty(header, lambda: CLIPVisionModel(config), names, dtype=dtype, device=device)
    log.info("loaded CLIP vision %s (%d layers, width %d, %d px, %s)", header.name, config.num_hidden_layers,
             config.hidden_size, config.image_size, dtype)
    return ClipVision(model=model, processor=_processor(config.image_size), dtype=dtype,
                      device=torch.device(device), source=str(path))


@torch.no_grad()
def encode_images(clip: ClipVision, images: torch.Tensor, crop: str = "center") -> ClipVisionOutput:
    """IMAGE [N, H, W, C] in 0..1 -> the penultimate hidden states of each image, as diffusers'
    `WanImageToVideoPipeline.encode_image` computes them."""
    if crop not in CROP_MODES:
        raise InputValueError(f"crop '{crop}' is not one of {', '.join(CROP_MODES)}", input_name="crop")
    if images.dim() != 4 or images.shape[-1] < 3:
        raise InputValueError(f"image of shape {list(images.shape)} is not [N, H, W, 3]", input_name="image")
    # 8-bit pixels, rounded (as ComfyUI's clip_preprocess does): the processor would otherwise
    # truncate floats on its way through PIL.
    pixels = (images[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    square = {"height": clip.image_size, "width": clip.image_size}
    options = {} if crop == "center" else {"do_center_crop": False, "size": square}
    inputs = clip.processor(images=list(pixels), return_tensors="pt", **options)
    out = clip.model(pixel_values=inputs.pixel_values.to(clip.device, clip.dtype), output_hidden_states=True)
    return ClipVisionOutput(penultimate_hidden_states=out.hidden_states[-2].float().cpu())
