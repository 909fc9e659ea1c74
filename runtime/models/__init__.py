"""Wan model variants, detection and loading (single files and diffusers folders)."""
from .detect import detect_file_kind, detect_transformer
from .loader import DiffusersComponents, combine_experts, load_diffusers_folder, load_diffusion_model
from .variants import VARIANTS, VariantSpec, get_variant, load_shipped_config
from .wan_model import WanModel

__all__ = [
    "VARIANTS",
    "DiffusersComponents",
    "VariantSpec",
    "WanModel",
    "combine_experts",
    "detect_file_kind",
    "detect_transformer",
    "get_variant",
    "load_diffusers_folder",
    "load_diffusion_model",
    "load_shipped_config",
]
