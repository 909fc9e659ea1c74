"""Generation requests -> workflow templates: what `wanflow generate` and the OpenAI shim run.

A request ({model, prompt, size, frames, steps, ...}, SGLang's names accepted) is not a new
code path: it fills the inputs of a saved API-format workflow from `workflows/` through one
mapping table per template (request field -> node title or id, input name), so a request and
the same workflow run by hand in the editor produce the same video. The model name picks the
template and the model files (`MODELS`).
"""
from __future__ import annotations

import copy
import json
import random
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..paths import workflows_dir as shipped_workflows_dir
from ..errors import InputValueError, WanflowError
from ..paths import list_models
from ..models.variants import VARIANTS
from ..schema import NodeRegistry
from ..tiny import tiny_model_paths
from .events import ExecutionListener
from .executor import ExecutionResult, Executor

MAX_SEED = 2**32 - 1

# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLora:
    """One LoRA for one request: a file in models/loras (or a nickname given to the server's
    /v1/set_lora), a strength, and which expert it applies to."""

    name: str
    strength: float = 1.0
    target: str = "all"


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    size: str | None = None
    """"WxH" (OpenAI's form); width/height win when both are given."""
    num_frames: int | None = None
    seconds: float | None = None
    """Duration; frames = 4n+1 closest to seconds x fps (ignored when num_frames is given)."""
    fps: int | None = None
    steps: int | None = None
    guidance: float | None = None
    """Classifier-free guidance (Wan2.2 A14B: of the high-noise expert)."""
    guidance_2: float | None = None
    """Wan2.2 A14B: guidance of the low-noise expert."""
    boundary: float | None = None
    """Wan2.2 A14B: the high-noise expert runs while t >= boundary x 1000."""
    shift: float | None = None
    seed: int | None = None
    """None: a random seed (the built prompt records which)."""
    image: str | None = None
    """Start image (image-to-video models), a file in the input folder."""
    end_image: str | None = None
    """End image (first-last-frame models), a file in the input folder."""
    loras: tuple[RequestLora, ...] = ()
    cache: bool | Mapping[str, Any] | None = None
    """Cache-DiT: True for the defaults, or the cache node's inputs (fn, warmup_steps, ...)."""
    parallel: int | Mapping[str, Any] | None = None
    """GPUs to sample on, or the multi-GPU node's inputs (gpus, ulysses_degree, ...)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "request") -> GenerationRequest:
        """Build from a config file / JSON body; SGLang's and OpenAI's names are accepted."""
        if not isinstance(data, Mapping):
            raise InputValueError(f"{source} must be a mapping of fields, got {type(data).__name__}", file=source)
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = ALIASES.get(key, key)
            if name not in known:
                raise InputValueError(
                    f"{source}: unknown field '{key}' (known: {', '.join(sorted(known | set(ALIASES)))})", key=key
                )
            if value is None:
                continue
            if name in values and values[name] != value:
                raise InputValueError(f"{source}: '{key}' repeats field '{name}' with another value", key=key)
            values[name] = _coerce(name, value, source)
        for required in ("model", "prompt"):
            if required not in values:
                raise InputValueError(f"{source}: '{required}' is required", key=required)
        return cls(**values)

    def with_overrides(self, overrides: Mapping[str, Any]) -> GenerationRequest:
        """A copy with the non-None `overrides` applied (CLI flags over a config file)."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationRequest.from_dict(merged)


ALIASES = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "cfg": "guidance",
    "flow_shift": "shift",
    "negative": "negative_prompt",
    "length": "num_frames",
    "frames": "num_frames",
    "start_image": "image",
    "image_path": "image",
    "input_reference": "image",
    "last_image": "end_image",
    "guidance_scale_2": "guidance_2",
    "cfg_2": "guidance_2",
    "boundary_ratio": "boundary",
    "lora": "loras",
}

_INTS = {"width", "height", "num_frames", "fps", "steps", "seed"}
_FLOATS = {"seconds", "guidance", "guidance_2", "boundary", "shift"}
_STRINGS = {"model", "prompt", "negative_prompt", "size", "image", "end_image"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Config files and multipart forms carry strings: turn them into the field's type."""
    try:
        if name in _INTS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if name in _FLOATS:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if name in _INTS else "a number"
        raise InputValueError(f"{source}: '{name}' must be {kind}, got {value!r}", key=name) from None
    if name in _STRINGS:
        if not isinstance(value, str):
            raise InputValueError(f"{source}: '{name}' must be a string, got {value!r}", key=name)
        return value
    if name == "loras":
        return _loras(value, source)
    if name == "cache":
        return _cache(value, source)
    if name == "parallel":
        if isinstance(value, Mapping):
            return dict(value)
        return _coerce("steps", value, source) if not isinstance(value, bool) else int(value)
    return value


def _loras(value: Any, source: str) -> tuple[RequestLora, ...]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)  # multipart forms carry lists as JSON text
        except json.JSONDecodeError as e:
            raise InputValueError(f"{source}: 'loras' is not valid JSON: {e}", key="loras") from None
    items = value if isinstance(value, (list, tuple)) else [value]
    specs = []
    for item in items:
        try:
            if isinstance(item, RequestLora):
                specs.append(item)
            elif isinstance(item, str):
                name, _, strength = item.partition(":")
                specs.append(RequestLora(name, float(strength) if strength else 1.0))
            elif isinstance(item, Mapping) and any(k in item for k in ("name", "path", "nickname")):
                name = item.get("name") or item.get("path") or item.get("nickname")
                specs.append(RequestLora(str(name), float(item.get("strength", 1.0)), str(item.get("target", "all"))))
            else:
                raise ValueError(item)
        except (TypeError, ValueError):
            raise InputValueError(
                f"{source}: each lora is 'file[:strength]' or {{name, strength, target}}, got {item!r}", key="loras"
            ) from None
    return tuple(specs)


def _cache(value: Any, source: str) -> bool | dict[str, Any]:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
        return value.lower() in ("true", "1", "on")
    if isinstance(value, Mapping):
        return dict(value)
    raise InputValueError(f"{source}: 'cache' is true/false or a mapping of cache settings, got {value!r}", key="cache")


def load_generation_config(path: str | Path) -> dict[str, Any]:
    """A request file (YAML or JSON, by extension; YAML otherwise) as a plain mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WanflowError(f"cannot read generation config {path}: {e.strerror or e}", file=str(path)) from e
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InputValueError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}",
                              file=str(path)) from e
    if not isinstance(data, dict):
        raise InputValueError(f"{path} must hold a mapping of request fields", file=str(path))
    return data


# --- templates and models ------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A saved API workflow and where each request field goes in it."""

    name: str
    """workflows/<name>_api.json"""
    fields: Mapping[str, tuple[str, str]]
    """request field -> (node title or id, input name)."""
    model_input: tuple[str, str] = ("Sampler", "model")
    """Where the model reaches the sampler: model patches (cache, LoRA) are inserted on this link."""
    save_node: str = "Save Video"
    """The node that writes the video (swapped for an image saver for one-frame requests)."""


@dataclass(frozen=True)
class ModelEntry:
    template: str
    files: Mapping[str, str]
    """template field (model_file, text_encoder_file, ...) -> file name in the models dir."""
    variant: str
    """Its `runtime.models.VARIANTS` name: what it generates, its size step."""
    defaults: Mapping[str, Any]
    description: str = ""
    text_template: str | None = None
    """The template for requests without a start image, for models that take one or none (TI2V)."""


# Field groups the templates are made of; node titles are the shipped workflows' (make_workflows).
_COMMON = {
    "prompt": ("Prompt", "positive"),
    "negative_prompt": ("Prompt", "negative"),
    "seed": ("Sampler", "seed"),
    "steps": ("Sampler", "steps"),
    "guidance": ("Sampler", "cfg"),
    "shift": ("Sampler", "shift"),
    "fps": ("Save Video", "fps"),
    "filename_prefix": ("Save Video", "filename_prefix"),
    "text_encoder_file": ("Load Text Encoder", "text_encoder_name"),
    "vae_file": ("Load VAE", "vae_name"),
}
_ONE_MODEL = {"model_file": ("Load Diffusion Model", "model_name")}
_EXPERTS = {
    "high_noise_file": ("Load Experts", "high_noise_model"),
    "low_noise_file": ("Load Experts", "low_noise_model"),
    "guidance_2": ("Sampler", "cfg_2"),
    "boundary": ("Sampler", "boundary"),
}
_CLIP_VISION = {"clip_vision_file": ("Load CLIP Vision", "clip_name")}
_START = {"image": ("Start Image", "image")}
_END = {"end_image": ("End Image", "image")}


def _template(name: str, *groups: Mapping[str, tuple[str, str]], size_node: str = "Video Size") -> Template:
    size = {"width": (size_node, "width"), "height": (size_node, "height"), "num_frames": (size_node, "length")}
    fields = {**_COMMON, **size}
    for group in groups:
        fields |= group
    return Template(name, fields)


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    _template("t2v_wan21", _ONE_MODEL),
    _template("i2v_wan21", _ONE_MODEL, _CLIP_VISION, _START, size_node="Image To Video"),
    _template("flf2v_wan21", _ONE_MODEL, _CLIP_VISION, _START, _END, size_node="Image To Video"),
    _template("t2v_wan22_a14b", _EXPERTS),
    _template("i2v_wan22_a14b", _EXPERTS, _START, size_node="Image To Video"),
    _template("ti2v_wan22_5b", _ONE_MODEL, _START, size_node="Image To Video"),
    _template("t2v_wan22_5b", _ONE_MODEL),
)}


def _defaults(variant: str, **changes: Any) -> dict[str, Any]:
    """The variant's official sampling settings (FACTS §3, `runtime.models.VARIANTS`), changed."""
    v = VARIANTS[variant]
    defaults: dict[str, Any] = {
        "width": v.default_width, "height": v.default_height, "num_frames": v.default_frames,
        "fps": v.default_fps, "steps": v.default_steps, "guidance": v.default_guidance, "shift": v.default_shift,
    }
    if v.is_moe:
        defaults |= {"guidance_2": v.default_guidance_2, "boundary": v.boundary_ratio}
    return {**defaults, **changes}


def _entry(template: str, variant: str, files: Mapping[str, str], description: str, *,
           text_template: str | None = None, **default_changes: Any) -> ModelEntry:
    return ModelEntry(template, dict(files), variant, _defaults(variant, **default_changes), description,
                      text_template)


_TEXT_ENCODER = {"text_encoder_file": "umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
_WAN21_FILES = {**_TEXT_ENCODER, "vae_file": "wan_2.1_vae.safetensors"}
_CLIP_FILE = {"clip_vision_file": "clip_vision_h.safetensors"}


def _expert_files(kind: str) -> dict[str, str]:
    return {"high_noise_file": f"wan2.2_{kind}_high_noise_14B_fp8_scaled.safetensors",
            "low_noise_file": f"wan2.2_{kind}_low_noise_14B_fp8_scaled.safetensors", **_WAN21_FILES}


# File names are ComfyUI's repackaged releases (FACTS §1), as in the shipped workflows.
MODELS: dict[str, ModelEntry] = {
    # shift 8 is the official suggestion for 1.3B at 480p.
    "wan2.1-t2v-1.3b": _entry("t2v_wan21", "wan2.1-t2v-1.3b",
                              {"model_file": "wan2.1_t2v_1.3B_fp16.safetensors", **_WAN21_FILES},
                              "Wan2.1 text-to-video 1.3B (480p)", shift=8.0),
    "wan2.1-t2v-14b": _entry("t2v_wan21", "wan2.1-t2v-14b",
                             {"model_file": "wan2.1_t2v_14B_bf16.safetensors", **_WAN21_FILES},
                             "Wan2.1 text-to-video 14B (720p)"),
    "wan2.1-i2v-14b-480p": _entry("i2v_wan21", "wan2.1-i2v-14b",
                                  {"model_file": "wan2.1_i2v_480p_14B_fp16.safetensors", **_CLIP_FILE, **_WAN21_FILES},
                                  "Wan2.1 image-to-video 14B (480p)"),
    # The 720p release is sampled with the shift the official repo uses above 480p.
    "wan2.1-i2v-14b-720p": _entry("i2v_wan21", "wan2.1-i2v-14b",
                                  {"model_file": "wan2.1_i2v_720p_14B_fp16.safetensors", **_CLIP_FILE, **_WAN21_FILES},
                                  "Wan2.1 image-to-video 14B (720p)", width=1280, height=720, shift=5.0),
    "wan2.1-flf2v-14b-720p": _entry("flf2v_wan21", "wan2.1-flf2v-14b",
                                    {"model_file": "wan2.1_flf2v_720p_14B_fp16.safetensors", **_CLIP_FILE,
                                     **_WAN21_FILES},
                                    "Wan2.1 first-last-frame-to-video 14B (720p)"),
    "wan2.2-t2v-a14b": _entry("t2v_wan22_a14b", "wan2.2-t2v-a14b", _expert_files("t2v"),
                              "Wan2.2 text-to-video A14B (two experts, 720p)"),
    "wan2.2-i2v-a14b": _entry("i2v_wan22_a14b", "wan2.2-i2v-a14b", _expert_files("i2v"),
                              "Wan2.2 image-to-video A14B (two experts, 720p)"),
    "wan2.2-ti2v-5b": _entry("ti2v_wan22_5b", "wan2.2-ti2v-5b",
                             {"model_file": "wan2.2_ti2v_5B_fp16.safetensors", **_TEXT_ENCODER,
                              "vae_file": "wan2.2_vae.safetensors"},
                             "Wan2.2 text/image-to-video 5B (720p; the start image is optional)",
                             text_template="t2v_wan22_5b"),
}

# The smoke-test models `runtime.tiny.make_tiny_models` writes (tests, CI and the demo run the
# whole server on them): each release's template and defaults, tiny files, a tiny video.
_TINY = tiny_model_paths(Path("."))
_TINY_VIDEO = {"width": 64, "height": 64, "num_frames": 5, "fps": 8, "steps": 2}
_TINY_WAN21 = {"text_encoder_file": _TINY.text_encoder.name, "vae_file": _TINY.vae.name}
_TINY_CLIP = {"clip_vision_file": _TINY.clip_vision.name}
_TINY_MODELS = {
    "tiny-wan2.1-t2v": ("wan2.1-t2v-1.3b", {"model_file": _TINY.transformer_bf16.name, **_TINY_WAN21}),
    "tiny-wan2.1-i2v": ("wan2.1-i2v-14b-480p", {"model_file": _TINY.i2v.name, **_TINY_CLIP, **_TINY_WAN21}),
    "tiny-wan2.1-flf2v": ("wan2.1-flf2v-14b-720p", {"model_file": _TINY.flf2v.name, **_TINY_CLIP, **_TINY_WAN21}),
    "tiny-wan2.2-t2v-a14b": ("wan2.2-t2v-a14b", {"high_noise_file": _TINY.t2v_high_noise.name,
                                                 "low_noise_file": _TINY.t2v_low_noise.name, **_TINY_WAN21}),
    "tiny-wan2.2-i2v-a14b": ("wan2.2-i2v-a14b", {"high_noise_file": _TINY.i2v_high_noise.name,
                                                 "low_noise_file": _TINY.i2v_low_noise.name, **_TINY_WAN21}),
    "tiny-wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", {"model_file": _TINY.ti2v.name, "vae_file": _TINY.vae_wan22.name,
                                               "text_encoder_file": _TINY.text_encoder.name}),
}
"""Tiny model name -> (the release whose template and defaults it takes, its files)."""


def _tiny_entry(release: str, files: Mapping[str, str]) -> ModelEntry:
    real = MODELS[release]
    return _entry(real.template, real.variant, files, f"random tiny {release} (smoke tests; output is noise)",
                  text_template=real.text_template, **_TINY_VIDEO)


MODELS |= {name: _tiny_entry(release, files) for name, (release, files) in _TINY_MODELS.items()}

# Hugging Face repository names (original and -Diffusers layout); matched ignoring case.
_HUB_NAMES = {
    "Wan-AI/Wan2.1-T2V-1.3B": "wan2.1-t2v-1.3b",
    "Wan-AI/Wan2.1-T2V-14B": "wan2.1-t2v-14b",
    "Wan-AI/Wan2.1-I2V-14B-480P": "wan2.1-i2v-14b-480p",
    "Wan-AI/Wan2.1-I2V-14B-720P": "wan2.1-i2v-14b-720p",
    "Wan-AI/Wan2.1-FLF2V-14B-720P": "wan2.1-flf2v-14b-720p",
    "Wan-AI/Wan2.2-T2V-A14B": "wan2.2-t2v-a14b",
    "Wan-AI/Wan2.2-I2V-A14B": "wan2.2-i2v-a14b",
    "Wan-AI/Wan2.2-TI2V-5B": "wan2.2-ti2v-5b",
}
MODEL_ALIASES = {alias: key for hub, key in _HUB_NAMES.items() for alias in (hub, f"{hub}-Diffusers")}

_FILE_FOLDERS = {"model_file": "diffusion_models", "high_noise_file": "diffusion_models",
                 "low_noise_file": "diffusion_models", "text_encoder_file": "text_encoders", "vae_file": "vae",
                 "clip_vision_file": "clip_vision"}
_KINDS = {"t2v": "text-to-video", "i2v": "image-to-video", "flf2v": "first-last-frame-to-video",
          "ti2v": "text/image-to-video"}


def model_entry(name: str) -> ModelEntry:
    """The entry of a model name or alias (aliases ignore case: hub names are written both ways)."""
    folded = {alias.lower(): key for alias, key in MODEL_ALIASES.items()}
    key = name if name in MODELS else folded.get(name.lower(), name)
    if key not in MODELS:
        raise InputValueError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})", key="model")
    return MODELS[key]


def template_for(request: GenerationRequest, entry: ModelEntry) -> Template:
    """The request's template: the model's, or its text-only one when no start image is given."""
    if request.image is None and entry.text_template is not None:
        return TEMPLATES[entry.text_template]
    return TEMPLATES[entry.template]


def check_images(request: GenerationRequest, entry: ModelEntry, template: Template, *, required: bool = True) -> None:
    """Images the model cannot take are refused; with `required`, so are missing ones it needs."""
    kind = _KINDS[VARIANTS[entry.variant].family]
    if request.image is not None and "image" not in template.fields:
        raise InputValueError(f"model '{request.model}' is {kind}; remove input_reference (the start image)",
                              key="image")
    if request.end_image is not None and "end_image" not in template.fields:
        raise InputValueError(f"model '{request.model}' takes no end image; remove end_image", key="end_image")
    if required and request.image is None and "image" in template.fields:
        raise InputValueError(f"model '{request.model}' is {kind}: give it a start image (input_reference, "
                              "or image: a file in the input folder)", key="image")
    if required and request.end_image is None and "end_image" in template.fields:
        raise InputValueError(f"model '{request.model}' is {kind}: give it an end image too (end_image: a file "
                              "in the input folder)", key="end_image")


def model_available(name: str) -> bool:
    """True when every file the model needs is in the models dir."""
    entry = model_entry(name)
    return all(file in list_models(_FILE_FOLDERS[field_name]) for field_name, file in entry.files.items())


def load_template(name: str, workflows_dir: Path | None = None) -> dict[str, Any]:
    path = (workflows_dir or shipped_workflows_dir()) / f"{name}_api.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WanflowError(f"workflow template '{name}' not found ({path})", file=str(path)) from e


def find_node(prompt: dict[str, Any], ref: str, template: str) -> str:
    """The id of the node `ref` names: an id, or a unique `_meta.title`."""
    if ref in prompt:
        return ref
    matches = [i for i, n in prompt.items() if n.get("_meta", {}).get("title") == ref]
    if len(matches) != 1:
        problem = "no node" if not matches else f"{len(matches)} nodes"
        raise WanflowError(f"template '{template}' has {problem} titled '{ref}'", node=ref)
    return matches[0]


def frames_for(seconds: float, fps: int) -> int:
    """The Wan frame count (4n+1) closest to `seconds` of video at `fps`."""
    return 4 * max(0, round(seconds * fps / 4)) + 1


def resolve_values(request: GenerationRequest, entry: ModelEntry) -> dict[str, Any]:
    """Every template field's value for this request: request, then model defaults."""
    d = entry.defaults
    width, height = request.width, request.height
    if request.size is not None and (width is None or height is None):
        w, sep, h = request.size.lower().partition("x")
        if not sep or not w.strip().isdigit() or not h.strip().isdigit():
            raise InputValueError(f"size '{request.size}' is not WIDTHxHEIGHT (e.g. 832x480)", key="size")
        width, height = width or int(w), height or int(h)
    fps = request.fps or d["fps"]
    if request.num_frames is not None:
        frames = request.num_frames
    elif request.seconds is not None:
        frames = frames_for(request.seconds, fps)
    else:
        frames = d["num_frames"]
    values = {
        "prompt": request.prompt,
        "width": width or d["width"],
        "height": height or d["height"],
        "num_frames": frames,
        "fps": fps,
        "steps": request.steps or d["steps"],
        "guidance": request.guidance if request.guidance is not None else d["guidance"],
        "shift": request.shift if request.shift is not None else d["shift"],
        "seed": request.seed if request.seed is not None else random.randint(0, MAX_SEED),
        **entry.files,
    }
    # Only the fields the request or the model has: the rest keep the template's value.
    for name in ("negative_prompt", "guidance_2", "boundary", "image", "end_image"):
        value = getattr(request, name)
        value = d.get(name) if value is None else value
        if value is not None:
            values[name] = value
    step = VARIANTS[entry.variant].size_multiple
    for key in ("width", "height"):
        if values[key] % step:
            raise InputValueError(f"{key} {values[key]} is not a multiple of {step}", key=key)
    if (values["num_frames"] - 1) % 4:
        raise InputValueError(f"num_frames {values['num_frames']} is not 4n+1 (e.g. 81)", key="num_frames")
    return values


def _set(prompt: dict[str, Any], template: Template, field_name: str, value: Any) -> None:
    if field_name not in template.fields:
        raise InputValueError(f"template '{template.name}' has no place for '{field_name}'", key=field_name)
    ref, input_name = template.fields[field_name]
    prompt[find_node(prompt, ref, template.name)]["inputs"][input_name] = value


def _widget_defaults(registry: NodeRegistry, class_type: str) -> dict[str, Any]:
    cls = registry.get(class_type)
    if cls is None:
        raise InputValueError(f"this build has no {class_type} node", key=class_type)
    return {i.name: i.default for i in cls.SCHEMA.inputs if i.is_widget and i.default is not None}


def _insert_model_patch(prompt: dict[str, Any], template: Template, registry: NodeRegistry,
                        class_type: str, inputs: Mapping[str, Any], title: str) -> None:
    """Put a model -> model node (LoRA, cache, multi-GPU) on the link feeding the sampler's model."""
    ref, input_name = template.model_input
    target = prompt[find_node(prompt, ref, template.name)]
    new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
    prompt[new_id] = {
        "class_type": class_type,
        "inputs": {**_widget_defaults(registry, class_type), **inputs, "model": target["inputs"][input_name]},
        "_meta": {"title": title},
    }
    target["inputs"][input_name] = [new_id, 0]


def _lora_file(name: str, nicknames: Mapping[str, str]) -> str:
    """A request names a LoRA by file (in models/loras) or by a nickname the server knows."""
    return nicknames.get(name, name)


def build_prompt(
    request: GenerationRequest,
    *,
    registry: NodeRegistry,
    output: str = "video",
    filename_prefix: str | None = None,
    workflows_dir: Path | None = None,
    default_loras: Sequence[RequestLora] = (),
    lora_nicknames: Mapping[str, str] | None = None,
    require_images: bool = True,
) -> dict[str, Any]:
    """The API-format prompt for `request`: its model's template with the request's values.

    `registry` supplies the defaults of nodes inserted for loras / cache / parallel.
    `default_loras` apply when the request names none (the server's /v1/set_lora stack).
    output="image" makes a one-frame still saved as PNG (the OpenAI images endpoint).
    require_images=False keeps the template's own image names where the request gives none
    (preloading a model runs only the loaders).
    """
    if output not in ("video", "image"):
        raise InputValueError(f"output must be 'video' or 'image', got '{output}'", key="output")
    entry = model_entry(request.model)
    template = template_for(request, entry)
    check_images(request, entry, template, required=require_images)
    prompt = copy.deepcopy(load_template(template.name, workflows_dir))
    if output == "image":
        request = replace(request, num_frames=1, seconds=None)
    values = resolve_values(request, entry)
    if filename_prefix is not None:
        values["filename_prefix"] = filename_prefix
    for name, value in values.items():
        if not (name == "fps" and output == "image"):
            _set(prompt, template, name, value)
    for lora in request.loras or default_loras:
        _insert_model_patch(prompt, template, registry, "WanflowLoRA",
                            {"lora_name": _lora_file(lora.name, lora_nicknames or {}), "strength": lora.strength,
                             "target": lora.target}, f"LoRA {lora.name}")
    if request.cache:
        settings = request.cache if isinstance(request.cache, Mapping) else {}
        _insert_model_patch(prompt, template, registry, "WanflowCacheDiT", {"enabled": True, **settings}, "Cache-DiT")
    if request.parallel is not None:
        settings = request.parallel if isinstance(request.parallel, Mapping) else {"gpus": request.parallel}
        _insert_model_patch(prompt, template, registry, "WanflowParallelConfig", settings, "Multi-GPU")
    if output == "image":
        save_id = find_node(prompt, template.save_node, template.name)
        saver = prompt[save_id]["inputs"]
        prompt[save_id] = {"class_type": "SaveImage",
                           "inputs": {"images": saver["images"], "filename_prefix": saver["filename_prefix"]},
                           "_meta": {"title": "Save Image"}}
    return prompt


def generate(
    request: GenerationRequest,
    *,
    registry: NodeRegistry,
    executor: Executor | None = None,
    listener: ExecutionListener | None = None,
    output: str = "video",
    workflows_dir: Path | None = None,
) -> ExecutionResult:
    """Run `request` through its template (`wanflow generate`): the same executor as any workflow."""
    prompt = build_prompt(request, registry=registry, output=output, workflows_dir=workflows_dir)
    return (executor or Executor(registry)).execute(prompt, prompt_id=str(uuid.uuid4()), listener=listener)
