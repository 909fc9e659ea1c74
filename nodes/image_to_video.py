"""Image-to-video nodes: CLIP vision loader and encode (Wan2.1 I2V / FLF2V), and the node that
turns start / end images into the sampler's conditioning and latent (every I2V variant, TI2V)."""
from __future__ import annotations

import torch

from ..runtime.sampling.conditioning import image_to_video, with_image
from ..runtime.sampling.latent_format import latent_shape
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode
from ..runtime.vision import CROP_MODES, encode_images, load_clip_vision
from .loaders import single_file_loader

CLIP_VISION = "WANFLOW_CLIP_VISION"
CLIP_VISION_OUTPUT = "WANFLOW_CLIP_VISION_OUTPUT"


WanflowCLIPVisionLoader = single_file_loader(
    "WanflowCLIPVisionLoader", "Wan CLIP Vision Loader",
    "Loads the CLIP vision encoder Wan2.1 I2V / FLF2V condition on (clip_vision_h.safetensors).",
    "clip_vision", "clip_name", Output(CLIP_VISION, "clip_vision"), load_clip_vision,
)


class WanflowCLIPVisionEncode(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowCLIPVisionEncode",
        display_name="Wan CLIP Vision Encode",
        category="wanflow/conditioning",
        description="Encodes an image with CLIP vision (penultimate hidden states, what Wan2.1 I2V / FLF2V take).",
        inputs=(
            Input("clip_vision", CLIP_VISION),
            Input("image", "IMAGE"),
            Input("crop", "COMBO", default="center", options=CROP_MODES,
                  tooltip="center: scale and center-crop to a square (ComfyUI, diffusers); none: stretch (official Wan)"),
        ),
        outputs=(Output(CLIP_VISION_OUTPUT, "clip_vision_output"),),
    )

    def execute(self, clip_vision, image, crop: str = "center"):
        return (encode_images(clip_vision, image, crop),)


class WanflowImageToVideo(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowImageToVideo",
        display_name="Wan Image To Video",
        category="wanflow/conditioning",
        description="Conditions the video on a start image and/or an end image: Wan2.1 I2V / FLF2V and Wan2.2 I2V "
                    "A14B with the Wan2.1 VAE, Wan2.2 TI2V-5B (start image) with the Wan2.2 VAE. Outputs the "
                    "conditioning and the empty latent to sample.",
        inputs=(
            Input("conditioning", "WANFLOW_CONDITIONING"),
            Input("vae", "WANFLOW_VAE"),
            Input("width", "INT", default=832, min=16, max=8192, step=16),
            Input("height", "INT", default=480, min=16, max=8192, step=16),
            Input("length", "INT", default=81, min=1, max=1025, step=4, tooltip="frames; must be 4n+1"),
            Input("batch_size", "INT", default=1, min=1, max=64),
            Input("start_image", "IMAGE", optional=True,
                  tooltip="the first frame(s); scaled and center-cropped to width x height"),
            Input("end_image", "IMAGE", optional=True, tooltip="the last frame(s) (first-last-frame models)"),
            Input("clip_vision_start_image", CLIP_VISION_OUTPUT, optional=True,
                  tooltip="Wan2.1 I2V / FLF2V: CLIP Vision Encode of the start image"),
            Input("clip_vision_end_image", CLIP_VISION_OUTPUT, optional=True,
                  tooltip="Wan2.1 FLF2V: CLIP Vision Encode of the end image"),
        ),
        outputs=(Output("WANFLOW_CONDITIONING", "conditioning"), Output("LATENT", "latent")),
    )

    def execute(self, conditioning, vae, width: int, height: int, length: int, batch_size: int = 1,
                start_image=None, end_image=None, clip_vision_start_image=None, clip_vision_end_image=None):
        image = image_to_video(
            vae, width, height, length, start_image=start_image, end_image=end_image,
            clip_vision_start=clip_vision_start_image, clip_vision_end=clip_vision_end_image,
        )
        latent = {"samples": torch.zeros(latent_shape(width, height, length, batch_size, vae.family))}
        return (with_image(conditioning, image), latent)


IMAGE_TO_VIDEO_NODES = {
    cls.SCHEMA.node_id: cls for cls in (WanflowCLIPVisionLoader, WanflowCLIPVisionEncode, WanflowImageToVideo)
}
