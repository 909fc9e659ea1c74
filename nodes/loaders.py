"""Loader nodes: diffusion model (one file, or Wan2.2 A14B's two experts), text encoder, VAE
(ComfyUI single files) and diffusers folders."""
from __future__ import annotations

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


class WanflowModelLoader(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowModelLoader",
        display_name="Wan Diffusion Model Loader",
        category=CATEGORY,
        description="Loads a Wan2.1 / Wan2.2 diffusion model file (fp16, bf16, fp8, fp8_scaled); the variant is detected from the file's contents.",
        inputs=(
            Input("model_name", "COMBO", options=lambda: list_models("diffusion_models"), tooltip="file in models/diffusion_models"),
            dtype_input(),
            device_input(),
        ),
        outputs=(Output("WANFLOW_MODEL", "model"),),
    )

    def execute(self, model_name: str, weight_dtype: str = "auto", device: str = "auto"):
        return (apply_model_defaults(load_cached("diffusion_models", model_name, weight_dtype, device, load_diffusion_model)),)


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


class WanflowTextEncoderLoader(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowTextEncoderLoader",
        display_name="Wan Text Encoder Loader (UMT5)",
        category=CATEGORY,
        description="Loads a UMT5-XXL text encoder file; its tokenizer comes from the file itself.",
        inputs=(
            Input("text_encoder_name", "COMBO", options=lambda: list_models("text_encoders"), tooltip="file in models/text_encoders"),
            dtype_input(),
            device_input(),
        ),
        outputs=(Output("WANFLOW_TEXT_ENCODER", "text_encoder"),),
    )

    def execute(self, text_encoder_name: str, weight_dtype: str = "auto", device: str = "auto"):
        return (load_cached("text_encoders", text_encoder_name, weight_dtype, device, load_text_encoder),)


class WanflowVAELoader(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowVAELoader",
        display_name="Wan VAE Loader",
        category=CATEGORY,
        description="Loads a Wan VAE file (wan_2.1_vae / wan2.2_vae).",
        inputs=(
            Input("vae_name", "COMBO", options=lambda: list_models("vae"), tooltip="file in models/vae"),
            dtype_input(),
            device_input(),
        ),
        outputs=(Output("WANFLOW_VAE", "vae"),),
    )

    def execute(self, vae_name: str, weight_dtype: str = "auto", device: str = "auto"):
        return (load_cached("vae", vae_name, weight_dtype, device, load_vae),)


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
