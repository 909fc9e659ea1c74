"""Loading Wan diffusion models: ComfyUI single files and diffusers folders."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelFileError
from .detect import detect_file_kind, detect_transformer, ensure_kind
from .single_file import (
    DIFFUSION_PREFIXES,
    fp8_layout,
    load_into_empty,
    load_pretrained,
    read_header,
    transformer_key_map,
)
from .variants import arch_of, variant_for_config
from .wan_model import WanModel

if TYPE_CHECKING:
    from ..text import TextEncoder
    from ..vae import WanVAE

log = logging.getLogger(__name__)


@dataclass
class DiffusersComponents:
    """Everything a diffusers Wan pipeline folder holds that wanflow runs."""

    model: WanModel
    text_encoder: TextEncoder
    vae: WanVAE
    scheduler_config: dict = field(default_factory=dict)
    """scheduler/scheduler_config.json as stored (flow_shift, solver), empty if absent."""


def load_diffusion_model(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> WanModel:
    """A Wan transformer from a ComfyUI single file (original layout, optional
    `model.diffusion_model.` prefix; fp32/fp16/bf16/fp8/fp8_scaled), a diffusers
    `transformer/` folder, or a diffusers pipeline folder (both experts for Wan2.2 A14B).

    `dtype` None keeps the file's precision; fp8 weights are dequantised, to bf16 by default.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _load_pipeline_transformers(path, dtype, device)
        return _load_transformer_folder(path, dtype, device)
    return _load_single_file(path, dtype, device)


def _load_single_file(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> WanModel:
    from diffusers import WanTransformer3DModel

    header = read_header(path, strip_prefixes=DIFFUSION_PREFIXES)
    ensure_kind(detect_file_kind(header.tensors), "diffusion_model", header.name, file=str(path))
    if "head.modulation" not in header.tensors and "scale_shift_table" in header.tensors:
        raise ModelFileError(
            f"{header.name} is a transformer in diffusers layout: load the folder holding it "
            "and its config.json instead",
            file=str(path),
        )
    layout = fp8_layout(header.tensors)
    shapes = {k: t.shape for k, t in header.tensors.items() if k not in layout.aux_keys}
    variant, config = detect_transformer(shapes, header.name)
    dtype = dtype or header.float_dtype()
    log.info("loading %s as %s (%s%s)", header.name, variant.name, dtype,
             ", fp8_scaled" if layout.scaled else "")
    transformer = load_into_empty(
        header,
        lambda: WanTransformer3DModel.from_config(config),
        transformer_key_map(shapes),
        dtype=dtype,
        device=device,
        ignore_extra=WanTransformer3DModel._keys_to_ignore_on_load_unexpected or (),
    )
    return WanModel(transformer=transformer, variant=variant, dtype=dtype,
                    device=torch.device(device), sources=(str(path),))


def _load_transformer(folder: Path, dtype: torch.dtype | None, device: str | torch.device):
    from diffusers import WanTransformer3DModel

    return load_pretrained(WanTransformer3DModel, folder, dtype=dtype, device=device,
                           what="Wan transformer")


def _load_transformer_folder(folder: Path, dtype: torch.dtype | None, device: str | torch.device) -> WanModel:
    transformer, dtype = _load_transformer(folder, dtype, device)
    variant = variant_for_config(dict(transformer.config))
    return WanModel(transformer=transformer, variant=variant, dtype=dtype,
                    device=torch.device(device), sources=(str(folder),))


def _load_pipeline_transformers(folder: Path, dtype: torch.dtype | None, device: str | torch.device) -> WanModel:
    index = json.loads((folder / "model_index.json").read_text())
    if not index.get("transformer") or not (folder / "transformer").is_dir():
        raise ModelFileError(f"{folder} has no transformer/ folder", file=str(folder))
    transformer, dtype = _load_transformer(folder / "transformer", dtype, device)
    transformer_2 = None
    if index.get("transformer_2") and index["transformer_2"][0] is not None:
        transformer_2, _ = _load_transformer(folder / "transformer_2", dtype, device)
    variant = variant_for_config(dict(transformer.config), two_experts=transformer_2 is not None)
    if index.get("boundary_ratio") and variant.is_moe:  # the folder's own setting wins
        variant = dataclasses.replace(variant, boundary_ratio=float(index["boundary_ratio"]))
    return WanModel(transformer=transformer, transformer_2=transformer_2, variant=variant, dtype=dtype,
                    device=torch.device(device), sources=(str(folder),))


def combine_experts(high_noise: WanModel, low_noise: WanModel) -> WanModel:
    """One Wan2.2 A14B model from its two single-file experts (ComfyUI ships them apart).

    The high-noise expert becomes `transformer`, the low-noise one `transformer_2`.
    """
    for part in (high_noise, low_noise):
        if part.transformer_2 is not None:
            raise ModelFileError(f"{part.sources[0]} already holds two experts", file=part.sources[0])
    config = dict(high_noise.transformer.config)
    if arch_of(config) != arch_of(dict(low_noise.transformer.config)):
        raise ModelFileError(
            f"the experts differ in architecture ({high_noise.variant.name} vs {low_noise.variant.name})",
            file=low_noise.sources[0],
        )
    variant = variant_for_config(config, two_experts=True)
    if not variant.is_moe:
        raise ModelFileError(
            f"{variant.name} has one expert; only Wan2.2 A14B T2V/I2V pair a high- and a low-noise model",
            file=high_noise.sources[0],
        )
    return high_noise.replace(transformer_2=low_noise.transformer, variant=variant,
                              sources=high_noise.sources + low_noise.sources)


def load_diffusers_folder(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> DiffusersComponents:
    """Transformer(s), text encoder (+ tokenizer) and VAE of a diffusers Wan pipeline folder."""
    # text and vae build on this package; importing them at call time keeps imports acyclic.
    from ..text import load_text_encoder
    from ..vae import load_vae

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelFileError(f"{path} is not a diffusers pipeline folder (no model_index.json)", file=str(path))
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    return DiffusersComponents(
        model=_load_pipeline_transformers(path, dtype, device),
        text_encoder=load_text_encoder(path, dtype=dtype, device=device),
        vae=load_vae(path, dtype=dtype, device=device),
        scheduler_config=json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {},
    )
