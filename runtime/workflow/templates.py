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
from ..schema import NodeRegistry
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
    shift: float | None = None
    seed: int | None = None
    """None: a random seed (the built prompt records which)."""
    image: str | None = None
    """Start image (I2V), a file in the input folder."""
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
    "lora": "loras",
}

_INTS = {"width", "height", "num_frames", "fps", "steps", "seed"}
_FLOATS = {"seconds", "guidance", "shift"}
_STRINGS = {"model", "prompt", "negative_prompt", "size", "image"}


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
    model_input: tuple[str, str]
    """Where the model reaches the sampler: model patches (cache, LoRA) are inserted on this link."""
    save_node: str
    """The node that writes the video (swapped for an image saver for one-frame requests)."""


@dataclass(frozen=True)
class ModelEntry:
    template: str
    files: Mapping[str, str]
    """template field (model_file, text_encoder_file, vae_file) -> file name in the models dir."""
    defaults: Mapping[str, Any]
    description: str = ""


TEMPLATES: dict[str, Template] = {
    "t2v_wan21": Template(
        name="t2v_wan21",
        fields={
            "prompt": ("Prompt", "positive"),
            "negative_prompt": ("Prompt", "negative"),
            "width": ("Video Size", "width"),
            "height": ("Video Size", "height"),
            "num_frames": ("Video Size", "length"),
            "seed": ("Sampler", "seed"),
            "steps": ("Sampler", "steps"),
            "guidance": ("Sampler", "cfg"),
            "shift": ("Sampler", "shift"),
            "fps": ("Save Video", "fps"),
            "filename_prefix": ("Save Video", "filename_prefix"),
            "model_file": ("Load Diffusion Model", "model_name"),
            "text_encoder_file": ("Load Text Encoder", "text_encoder_name"),
            "vae_file": ("Load VAE", "vae_name"),
        },
        model_input=("Sampler", "model"),
        save_node="Save Video",
    ),
}

_WAN21_FILES = {"text_encoder_file": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae_file": "wan_2.1_vae.safetensors"}
# Official Wan2.1 T2V sampling settings (FACTS §3); shift 8 is the 480p suggestion for 1.3B.
_WAN21_T2V_DEFAULTS = {"width": 832, "height": 480, "num_frames": 81, "fps": 16, "steps": 50, "guidance": 5.0, "shift": 5.0}

MODELS: dict[str, ModelEntry] = {
    "wan2.1-t2v-1.3b": ModelEntry(
        "t2v_wan21", {"model_file": "wan2.1_t2v_1.3B_fp16.safetensors", **_WAN21_FILES},
        {**_WAN21_T2V_DEFAULTS, "shift": 8.0}, "Wan2.1 text-to-video 1.3B (480p)",
    ),
    "wan2.1-t2v-14b": ModelEntry(
        "t2v_wan21", {"model_file": "wan2.1_t2v_14B_bf16.safetensors", **_WAN21_FILES},
        {**_WAN21_T2V_DEFAULTS, "width": 1280, "height": 720}, "Wan2.1 text-to-video 14B (720p)",
    ),
}
# The smoke-test models `runtime.tiny.make_tiny_models` writes: tests, CI and the demo run the
# whole server on them.
MODELS["tiny-wan2.1-t2v"] = ModelEntry(
    "t2v_wan21",
    {"model_file": "tiny_wan21_t2v_bf16.safetensors", "text_encoder_file": "tiny_umt5_bf16.safetensors",
     "vae_file": "tiny_wan21_vae.safetensors"},
    {"width": 64, "height": 64, "num_frames": 5, "fps": 8, "steps": 2, "guidance": 5.0, "shift": 5.0},
    "random tiny Wan2.1 T2V (smoke tests; output is noise)",
)
MODEL_ALIASES = {
    "Wan-AI/Wan2.1-T2V-1.3B": "wan2.1-t2v-1.3b",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan2.1-t2v-1.3b",
    "Wan-AI/Wan2.1-T2V-14B": "wan2.1-t2v-14b",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan2.1-t2v-14b",
}

_FILE_FOLDERS = {"model_file": "diffusion_models", "text_encoder_file": "text_encoders", "vae_file": "vae"}


def model_entry(name: str) -> ModelEntry:
    key = MODEL_ALIASES.get(name, name)
    if key not in MODELS:
        raise InputValueError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})", key="model")
    return MODELS[key]


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
    if request.negative_prompt is not None:
        values["negative_prompt"] = request.negative_prompt
    for key in ("width", "height"):
        if values[key] % 16:
            raise InputValueError(f"{key} {values[key]} is not a multiple of 16", key=key)
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
) -> dict[str, Any]:
    """The API-format prompt for `request`: its model's template with the request's values.

    `registry` supplies the defaults of nodes inserted for loras / cache / parallel.
    `default_loras` apply when the request names none (the server's /v1/set_lora stack).
    output="image" makes a one-frame still saved as PNG (the OpenAI images endpoint).
    """
    if output not in ("video", "image"):
        raise InputValueError(f"output must be 'video' or 'image', got '{output}'", key="output")
    entry = model_entry(request.model)
    template = TEMPLATES[entry.template]
    prompt = copy.deepcopy(load_template(template.name, workflows_dir))
    if output == "image":
        request = replace(request, num_frames=1, seconds=None)
    values = resolve_values(request, entry)
    if filename_prefix is not None:
        values["filename_prefix"] = filename_prefix
    if request.image is not None:
        values["image"] = request.image
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
