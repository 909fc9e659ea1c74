"""Loader nodes: diffusion model (one file, or Wan2.2 A14B's two experts), text encoder, VAE
(ComfyUI single files) and diffusers folders."""
from __future__ import annotations

from typing import Any, Callable

from ..runtime import model_cache
from ..runtime.devices import DEVICE_CHOICES, DTYPE_CHOICES, resolve_device, resolve_dtype
from ..runtime.model_defaults import apply_model_defaults
from ..runtime.errors import ModelFileError
from ..runtime.models import combine_experts, load_diffusers_folder, load_diffusion_model
from ..runtime.paths import list_models, resolve_model
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode
from ..runtime.text import load_text_encoder
from ..runtime.vae import load_vae

CATEGORY = "wanflow/loaders"


def dtype_input(tooltip: str = "auto keeps the file's precision (fp8 files load as bf16)") -> Input:
    return Input("weight_dtype", "COMBO", default="auto", options=DTYPE_CHOICES, tooltip=tooltip)


def device_input() -> Input:
    return Input("device", "COMBO", default="auto", options=DEVICE_CHOICES, tooltip="auto: CUDA if available")


def load_cached(folder: str, name: str, weight_dtype: str, device: str, loader):
    path = resolve_model(folder, name)
    dtype, dev = resolve_dtype(weight_dtype), resolve_device(device)
    return model_cache.cached(folder, str(path), (str(dtype), str(dev)), lambda: loader(path, dtype=dtype, device=dev))


def single_file_loader(
    node_id: str,
    display_name: str,
    description: str,
    folder: str,
    input_name: str,
    output: Output,
    loader: Callable[..., Any],
    finish: Callable[[Any], Any] = lambda loaded: loaded,
) -> type[SchemaNode]:
    """A loader node for one file of `folder` (+ dtype / device): every single-file loader has
    this same shape, so it is declared once. `finish` adjusts what the (cached) loader returned."""

    def execute(self, weight_dtype: str = "auto", device: str = "auto", **names: str):
        return (finish(load_cached(folder, names[input_name], weight_dtype, device, loader)),)

    schema = NodeSchema(
        node_id=node_id,
        display_name=display_name,
        category=CATEGORY,
        description=description,
        inputs=(
            Input(input_name, "COMBO", options=lambda: list_models(folder), tooltip=f"file in models/{folder}"),
            dtype_input(),
            device_input(),
        ),
        outputs=(output,),
    )
    return type(node_id, (SchemaNode,), {"SCHEMA": schema, "execute": execute, "__module__": __name__})


WanflowModelLoader = single_file_loader(
    "WanflowModelLoader", "Wan Diffusion Model Loader",
    "Loads a Wan2.1 / Wan2.2 diffusion model file (fp16, bf16, fp8, fp8_scaled); the variant is detected from the file's contents.",
    "diffusion_models", "model_name", Output("WANFLOW_MODEL", "model"), load_diffusion_model, apply_model_defaults,
)


class WanflowMoEModelLoader(SchemaNode):
    """A node of its own rather than a second input on the single-file loader: that loader's
    widgets (and every saved workflow's widget values) stay as they are, and the two required
    combos say plainly that Wan2.2 A14B is two files."""

    SCHEMA = NodeSchema(
        node_id="WanflowMoEModelLoader",
        display_name="Wan2.2 A14B Model Loader (high + low noise)",
        category=CATEGORY,
        description="Loads the two experts of Wan2.2 T2V / I2V A14B as one model; the sampler runs the high-noise "
                    "expert first and switches to the low-noise one at the boundary timestep.",
        inputs=(
            Input("high_noise_model", "COMBO", options=lambda: list_models("diffusion_models"),
                  tooltip="e.g. wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
            Input("low_noise_model", "COMBO", options=lambda: list_models("diffusion_models"),
                  tooltip="e.g. wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
            dtype_input(),
            device_input(),
        ),
        outputs=(Output("WANFLOW_MODEL", "model"),),
    )

    def execute(self, high_noise_model: str, low_noise_model: str, weight_dtype: str = "auto", device: str = "auto"):
        if high_noise_model == low_noise_model:
            raise ModelFileError(
                f"high_noise_model and low_noise_model are both {high_noise_model}: select the two experts",
                input_name="low_noise_model", file=low_noise_model)
        high, low = (load_cached("diffusion_models", name, weight_dtype, device, load_diffusion_model)
                     for name in (high_noise_model, low_noise_model))
        return (apply_model_defaults(combine_experts(high, low)),)


WanflowTextEncoderLoader = single_file_loader(
    "WanflowTextEncoderLoader", "Wan Text Encoder Loader (UMT5)",
    "Loads a UMT5-XXL text encoder file; its tokenizer comes from the file itself.",
    "text_encoders", "text_encoder_name", Output("WANFLOW_TEXT_ENCODER", "text_encoder"), load_text_encoder,
)

WanflowVAELoader = single_file_loader(
    "WanflowVAELoader", "Wan VAE Loader", "Loads a Wan VAE file (wan_2.1_vae / wan2.2_vae).",
    "vae", "vae_name", Output("WANFLOW_VAE", "vae"), load_vae,
)


class WanflowDiffusersLoader(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowDiffusersLoader",
        display_name="Wan Diffusers Folder Loader",
        category=CATEGORY,
        description="Loads model, text encoder and VAE from a diffusers-format Wan folder.",
        inputs=(
            Input("folder", "COMBO", options=lambda: list_models("diffusers"), tooltip="folder in models/diffusers"),
            dtype_input(),
            device_input(),
        ),
        outputs=(
            Output("WANFLOW_MODEL", "model"),
            Output("WANFLOW_TEXT_ENCODER", "text_encoder"),
            Output("WANFLOW_VAE", "vae"),
        ),
    )

    def execute(self, folder: str, weight_dtype: str = "auto", device: str = "auto"):
        parts = load_cached("diffusers", folder, weight_dtype, device, load_diffusers_folder)
        return (apply_model_defaults(parts.model), parts.text_encoder, parts.vae)


LOADER_NODES = {
    cls.SCHEMA.node_id: cls
    for cls in (WanflowModelLoader, WanflowMoEModelLoader, WanflowTextEncoderLoader, WanflowVAELoader,
                WanflowDiffusersLoader)
}
