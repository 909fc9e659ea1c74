"""LoRA files as Wan trainers write them, converted to one internal form.

Formats are told apart by key names, never by file names:

- ``diffusers``: diffusers / peft names, ``transformer.blocks.0.attn1.to_q.lora_A.weight``
  (prefix optional); alphas from ``.alpha`` keys or the peft config diffusers stores in the
  safetensors metadata; ``lora_B.bias`` is a bias patch.
- ``wan``: ComfyUI / original Wan names, ``diffusion_model.blocks.0.self_attn.q.lora_A.weight``
  or ``lora_down`` / ``lora_up`` + ``.alpha``; lightx2v-style distill LoRAs add full patches:
  ``.diff`` (weight), ``.diff_b`` (bias), ``.diff_m`` (modulation), also on norms.
- ``kohya``: musubi-tuner / kohya names, ``lora_unet_blocks_0_self_attn_q.lora_down.weight``
  + ``.alpha``: the original Wan names with dots written as underscores.

Internal form (`LoraWeights`), keyed by diffusers parameter names: low-rank parts
``delta(<module>.weight) = alpha / rank * up @ down`` and full-tensor diffs.

Why not diffusers' LoRA converters: ``_convert_non_diffusers_wan_lora_to_diffusers`` drops
``.diff`` weight patches, norm patches and ``.diff_m`` (exactly what makes distill LoRAs
work), turns ``head.head.diff`` into a fake LoRA with an identity up-matrix, and fails on
LoRAs that carry only part of a layer group (e.g. ``text_embedding`` patches without a LoRA);
``_convert_musubi_wan_lora_to_diffusers`` requires every block to carry every q/k/v/o/ffn
layer. Their name table is the one of diffusers' checkpoint converter, which covers every
parameter, so names go through that (`transformer_key_map`) and only the grouping of
suffixes into (down, up, alpha, diffs) is done here.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import WanflowError
from .models.single_file import transformer_key_map

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"

# File-key suffix -> role. Longest suffixes are tried first ("lora_B.bias" before "bias"...).
_SUFFIXES = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "diff_m": "diff_m",
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)

# Last name segments that are parameters themselves, not modules holding `.weight`.
_PARAMETER_LEAVES = frozenset({"modulation", "emb_pos", "scale_shift_table", "pos_embed"})

_WAN_NAMES = re.compile(
    r"(^|\.)(self_attn|cross_attn|modulation|text_embedding|time_embedding|time_projection|img_emb|norm3)(\.|$)"
    r"|(^|\.)head\.head(\.|$)|(^|\.)ffn\.[02](\.|$)"
)
_DIFFUSERS_NAMES = re.compile(
    r"(^|\.)(attn1|attn2|to_q|to_k|to_v|to_out|add_k_proj|add_v_proj|condition_embedder|proj_out|scale_shift_table)(\.|$)"
    r"|(^|\.)ffn\.net\."
)

# Original Wan name segments that contain underscores: kohya names must keep these whole.
_WAN_COMPOUND_SEGMENTS = sorted(
    ("norm_k_img", "self_attn", "cross_attn", "k_img", "v_img", "norm_q", "norm_k", "text_embedding",
     "time_embedding", "time_projection", "img_emb", "patch_embedding", "emb_pos"),
    key=lambda s: s.count("_"),
    reverse=True,
)

PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers stores the peft LoraConfig


class LoraError(WanflowError):
    """A LoRA file cannot be used: missing, unreadable, of an unknown format, or not for this model."""

    error_type = "lora_error"


@dataclass(frozen=True)
class LowRank:
    """One low-rank update of a weight: ``alpha / rank * up @ down`` (conv kernels flattened)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    """None: the trainer stored no alpha, the update is ``up @ down`` (peft's default alpha = rank)."""

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.up.shape[0] == shape[0] and self.down[0].numel() == math.prod(shape[1:])

    def delta(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The fp32 weight update, shaped like the weight."""
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32).flatten(1)
        return (up @ down).mul_(self.scale).reshape(shape)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file in the internal form."""

    path: str
    format: str
    low_rank: Mapping[str, LowRank]
    """diffusers weight name (``blocks.0.attn1.to_q.weight``) -> its low-rank update."""
    diffs: Mapping[str, torch.Tensor]
    """diffusers parameter name -> full-tensor patch (weight, bias, norm, modulation)."""
    sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """diffusers parameter name -> the file keys it came from (for error messages)."""
    unused: tuple[str, ...] = ()
    """File keys no rule understands (unknown suffix, half a pair, DoRA scales, ...)."""
    num_keys: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name

    def targets(self) -> set[str]:
        return set(self.low_rank) | set(self.diffs)


def read_lora(path: str | Path) -> LoraWeights:
    """Read and convert one LoRA file (no caching: see runtime.lora.load_lora)."""
    path = Path(path)
    state_dict, metadata = _read_file(path)
    return convert_lora(state_dict, metadata, path=str(path))


def detect_format(keys: list[str]) -> str | None:
    """``diffusers`` | ``wan`` | ``kohya`` from key names, or None when none fits."""
    if any(k.startswith(_KOHYA_PREFIX) for k in keys):
        return "kohya"
    bases = [_strip_prefix(k) for k in keys]
    wan = sum(1 for b in bases if _WAN_NAMES.search(b))
    diffusers = sum(1 for b in bases if _DIFFUSERS_NAMES.search(b))
    if wan == diffusers == 0:
        return None
    return "wan" if wan >= diffusers else "diffusers"


def convert_lora(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, path: str = "<memory>"
) -> LoraWeights:
    """A state dict in any supported format -> `LoraWeights`."""
    keys = list(state_dict)
    fmt = detect_format(keys)
    if fmt is None:
        raise LoraError(
            f"LoRA '{Path(path).name}': unknown format: no key looks like a Wan LoRA "
            f"(diffusers, ComfyUI/Wan or kohya names), e.g. {key_examples(keys)}",
            file=path,
        )
    groups, unused = _group(state_dict, fmt)
    names = _diffusers_names(groups, fmt)
    alpha_of = _peft_alphas(metadata or {})
    low_rank: dict[str, LowRank] = {}
    diffs: dict[str, torch.Tensor] = {}
    sources: dict[str, list[str]] = defaultdict(list)

    for base, parts in groups.items():
        if "down" in parts and "up" in parts:
            (down_key, down), (up_key, up) = parts["down"], parts["up"]
            if down.shape[0] != up.shape[1]:
                raise LoraError(
                    f"LoRA '{Path(path).name}': {down_key} has rank {down.shape[0]} but {up_key} "
                    f"has rank {up.shape[1]}: the file is damaged",
                    file=path, key=down_key,
                )
            target = names[(base, "down")]
            alpha = float(parts["alpha"][1].item()) if "alpha" in parts else alpha_of(target[: -len(".weight")])
            low_rank[target] = LowRank(down=down, up=up, alpha=alpha)
            sources[target] += [down_key, up_key] + ([parts["alpha"][0]] if "alpha" in parts else [])
            if "up_bias" in parts:
                bias_key, bias = parts["up_bias"]
                bias_target = names[(base, "up_bias")]
                # peft scales lora_B's bias like the rest of the LoRA output.
                diffs[bias_target] = bias * low_rank[target].scale
                sources[bias_target].append(bias_key)
        else:
            unused += [parts[role][0] for role in ("down", "up", "alpha", "up_bias") if role in parts]
        for role in ("diff", "diff_b", "diff_m"):
            if role in parts:
                key, tensor = parts[role]
                target = names[(base, role)]
                diffs[target] = tensor
                sources[target].append(key)

    return LoraWeights(
        path=path,
        format=fmt,
        low_rank=low_rank,
        diffs=diffs,
        sources={k: tuple(v) for k, v in sources.items()},
        unused=tuple(sorted(unused)),
        num_keys=len(keys),
    )


# --------------------------------------------------------------------------- file reading


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}", file=str(path))
    try:
        if path.suffix in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means the same thing to the user
        raise LoraError(f"LoRA '{path.name}' could not be read: {e}", file=str(path)) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise LoraError(f"LoRA '{path.name}' is not a tensor dictionary", file=str(path))
    return state_dict, {}


# --------------------------------------------------------------------------- key names


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _kohya_to_wan(name: str) -> str:
    """``blocks_0_cross_attn_k_img`` -> ``blocks.0.cross_attn.k_img``.

    kohya writes the module path with underscores, so segments that contain one themselves
    are rejoined from a list (ComfyUI instead derives the names from the loaded model; this
    keeps conversion independent of any model)."""
    dotted = name.replace("_", ".")
    for segment in _WAN_COMPOUND_SEGMENTS:
        dotted = re.sub(rf"(?<![^.]){re.escape(segment.replace('_', '.'))}(?![^.])", segment, dotted)
    return dotted


def _split_key(key: str, fmt: str) -> tuple[str, str] | None:
    """(module/parameter base, role) of a file key in original or diffusers naming."""
    if fmt == "kohya":
        if not key.startswith(_KOHYA_PREFIX):
            return None
        module, _, suffix = key[len(_KOHYA_PREFIX):].partition(".")
        role = _SUFFIXES.get(suffix)
        return (_kohya_to_wan(module), role) if role else None
    stripped = _strip_prefix(key)
    for suffix in _SUFFIX_ORDER:
        if stripped.endswith("." + suffix):
            return stripped[: -len(suffix) - 1], _SUFFIXES[suffix]
    return None


def _group(state_dict: Mapping[str, torch.Tensor], fmt: str):
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unused: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key, fmt)
        if split is None:
            unused.append(key)
        else:
            base, role = split
            groups[base][role] = (key, tensor)
    return groups, unused


def _parameter_name(base: str, role: str) -> str:
    """The parameter (in the file's own naming) that a key with this base and role patches."""
    if role == "diff_b" or role == "up_bias":
        return base + ".bias"
    if role == "diff_m":
        return base + ".modulation"
    if role == "diff" and base.rsplit(".", 1)[-1] in _PARAMETER_LEAVES:
        return base
    return base + ".weight"


def _diffusers_names(groups: Mapping[str, Mapping[str, object]], fmt: str) -> dict[tuple[str, str], str]:
    """(base, role) -> diffusers parameter name, for every role present."""
    wanted = {(base, role): _parameter_name(base, role) for base, parts in groups.items() for role in parts}
    if fmt == "diffusers":
        return wanted
    # transformer_key_map runs diffusers' checkpoint converter on names: diffusers -> original.
    to_diffusers = {orig: new for new, orig in transformer_key_map(set(wanted.values())).items()}
    return {k: to_diffusers.get(v, v) for k, v in wanted.items()}


def _peft_alphas(metadata: Mapping[str, str]) -> Callable[[str], float | None]:
    """module name -> alpha from the peft config diffusers saves with a LoRA (None: no config)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return lambda module: None
    from peft.utils.other import get_pattern_key

    config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    default = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}

    def alpha_of(module: str) -> float | None:
        value = pattern.get(get_pattern_key(list(pattern), module), default)
        return None if value is None else float(value)

    return alpha_of


def key_examples(keys, limit: int = 5) -> str:
    """A few keys for an error message, and how many more there are."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
