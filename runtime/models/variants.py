"""The released Wan variants: what each is, how it is sampled by default, its transformer config.

Defaults follow the official Wan repositories (generate.py and the model cards): see
FACTS.md §3; FLF2V's shift 16 and I2V's 40 steps / shift 3.0 at 480p are generate.py's.
`configs/<name>.json` holds each variant's diffusers `WanTransformer3DModel` config (numbers
from FACTS.md §2 and diffusers' scripts/convert_wan_to_diffusers.py), and `vae-wan2.1.json` /
`vae-wan2.2.json` the `AutoencoderKLWan` configs (Wan2.2's latents_mean/std from that script).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

CONFIG_DIR = Path(__file__).parent / "configs"

# Keys of a WanTransformer3DModel config that fix the architecture (the rest is bookkeeping).
ARCH_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "image_dim",
    "added_kv_proj_dim",
    "rope_max_seq_len",
    "pos_embed_seq_len",
)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    family: str
    """"t2v" | "i2v" | "flf2v" | "ti2v"."""
    generation: str
    """"wan2.1" | "wan2.2"."""
    vae_family: str
    """"wan2.1" (z 16, ×8) | "wan2.2" (z 48, ×16)."""
    default_width: int
    default_height: int
    default_frames: int
    default_fps: int
    default_steps: int
    default_shift: float
    default_guidance: float
    default_guidance_2: float | None = None
    """Wan2.2 A14B: guidance of the low-noise expert (transformer_2)."""
    boundary_ratio: float | None = None
    """Wan2.2 A14B: the high-noise expert runs while t >= boundary_ratio * 1000."""
    needs_clip_vision: bool = False
    size_multiple: int = 16
    """Width and height must be multiples of this."""
    released: bool = True
    """False for models whose sizes match no release (tiny test models, fine-tunes)."""

    @property
    def is_moe(self) -> bool:
        """Two experts (Wan2.2 A14B): sampling switches at `boundary_ratio`."""
        return self.boundary_ratio is not None


def _spec(name: str, family: str, **kw: Any) -> VariantSpec:
    generation = name.split("-")[0]
    defaults: dict[str, Any] = dict(
        vae_family="wan2.2" if family == "ti2v" else "wan2.1",
        default_frames=81,
        default_fps=16,
        needs_clip_vision=generation == "wan2.1" and family in ("i2v", "flf2v"),
    )
    defaults.update(kw)
    return VariantSpec(name=name, family=family, generation=generation, **defaults)


VARIANTS: dict[str, VariantSpec] = {
    v.name: v
    for v in (
        _spec("wan2.1-t2v-1.3b", "t2v", default_width=832, default_height=480,
              default_steps=50, default_shift=5.0, default_guidance=5.0),
        _spec("wan2.1-t2v-14b", "t2v", default_width=1280, default_height=720,
              default_steps=50, default_shift=5.0, default_guidance=5.0),
        # The 480p and 720p I2V releases share one architecture, so one spec serves both;
        # its default size is 480p, where the official repo lowers the shift to 3.0.
        _spec("wan2.1-i2v-14b", "i2v", default_width=832, default_height=480,
              default_steps=40, default_shift=3.0, default_guidance=5.0),
        _spec("wan2.1-flf2v-14b", "flf2v", default_width=1280, default_height=720,
              default_steps=50, default_shift=16.0, default_guidance=5.0),
        _spec("wan2.2-t2v-a14b", "t2v", default_width=1280, default_height=720,
              default_steps=40, default_shift=12.0, default_guidance=4.0,
              default_guidance_2=3.0, boundary_ratio=0.875),
        _spec("wan2.2-i2v-a14b", "i2v", default_width=1280, default_height=720,
              default_steps=40, default_shift=5.0, default_guidance=3.5,
              default_guidance_2=3.5, boundary_ratio=0.900),
        _spec("wan2.2-ti2v-5b", "ti2v", default_width=1280, default_height=704,
              default_frames=121, default_fps=24, default_steps=50, default_shift=5.0,
              default_guidance=5.0, size_multiple=32),
    )
}

# Which release a custom-sized model borrows its sampling defaults from.
_DEFAULTS_OF = {
    ("wan2.1", "t2v"): "wan2.1-t2v-1.3b",
    ("wan2.1", "i2v"): "wan2.1-i2v-14b",
    ("wan2.1", "flf2v"): "wan2.1-flf2v-14b",
    ("wan2.2", "t2v"): "wan2.2-t2v-a14b",
    ("wan2.2", "i2v"): "wan2.2-i2v-a14b",
    ("wan2.2", "ti2v"): "wan2.2-ti2v-5b",
}


def get_variant(name: str) -> VariantSpec:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ModelFileError(
            f"unknown Wan variant '{name}' (known: {', '.join(VARIANTS)})"
        ) from None


@lru_cache(maxsize=None)
def _shipped_config(name: str) -> str:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelFileError(f"no shipped config for '{name}'", file=str(path))
    return path.read_text()


def load_shipped_config(name: str) -> dict:
    """The diffusers config shipped for `name` (a transformer variant, or `vae-wan2.1`/`vae-wan2.2`)."""
    config = json.loads(_shipped_config(name))
    if "patch_size" in config and isinstance(config["patch_size"], list):
        config["patch_size"] = tuple(config["patch_size"])
    return config


def arch_of(config: dict) -> dict:
    """The architecture-defining part of a transformer config, normalised for comparison."""
    arch = {k: config.get(k) for k in ARCH_KEYS}
    arch["patch_size"] = tuple(arch["patch_size"] or ())
    return arch


def family_of(config: dict, *, two_experts: bool = False) -> tuple[str, str]:
    """(generation, family) from a transformer config, by the rules of FACTS.md §2.

    A single 14B T2V expert is indistinguishable from Wan2.1 T2V 14B; a pair of experts
    (`two_experts`) makes it Wan2.2 A14B.
    """
    in_channels = config["in_channels"]
    if in_channels == 48:
        return "wan2.2", "ti2v"
    if in_channels == 36:
        if config.get("image_dim") is None:
            return "wan2.2", "i2v"
        if config.get("pos_embed_seq_len"):
            return "wan2.1", "flf2v"
        return ("wan2.2" if two_experts else "wan2.1"), "i2v"
    if in_channels == 16:
        return ("wan2.2" if two_experts else "wan2.1"), "t2v"
    raise ModelFileError(f"unknown Wan variant: {in_channels} input channels (expected 16, 36 or 48)")


def variant_for_config(config: dict, *, two_experts: bool = False) -> VariantSpec:
    """The released variant whose architecture equals `config`, else a custom spec."""
    generation, family = family_of(config, two_experts=two_experts)
    arch = arch_of(config)
    for spec in VARIANTS.values():
        if (spec.generation, spec.family) == (generation, family) and arch_of(
            load_shipped_config(spec.name)
        ) == arch:
            return spec
    base = VARIANTS[_DEFAULTS_OF[(generation, family)]]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return dataclasses.replace(
        base,
        name=f"{generation}-{family} (custom: dim {dim}, {config['num_layers']} layers)",
        released=False,
    )
