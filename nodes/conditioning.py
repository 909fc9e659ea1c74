"""Prompt encoding and the empty video latent."""
from __future__ import annotations

import torch

from ..runtime.sampling.latent_format import latent_shape, validate_video_size
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode
from ..runtime.text import encode_prompts

# The negative prompt the official Wan repositories sample with (their `sample_neg_prompt`).
WAN_DEFAULT_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class WanflowTextEncode(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowTextEncode",
        display_name="Wan Text Encode",
        category="wanflow/conditioning",
        description="Encodes the positive and negative prompts with UMT5 (512 tokens).",
        inputs=(
            Input("text_encoder", "WANFLOW_TEXT_ENCODER"),
            Input("positive", "STRING", default="", multiline=True, tooltip="what the video should show"),
            Input("negative", "STRING", default=WAN_DEFAULT_NEGATIVE, multiline=True, tooltip="what to steer away from (used with cfg > 1)"),
            Input("offload", "BOOLEAN", default=False, optional=True,
                  tooltip="keep the text encoder in CPU memory, on its device only while encoding"),
        ),
        outputs=(Output("WANFLOW_CONDITIONING", "conditioning"),),
    )

    def execute(self, text_encoder, positive: str, negative: str = "", offload: bool = False):
        return (encode_prompts(text_encoder, positive, negative, offload=offload),)


class WanflowEmptyLatentVideo(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowEmptyLatentVideo",
        display_name="Wan Empty Latent Video",
        category="wanflow/latent",
        description="An empty video latent for width x height x length frames (length = 4n+1): Wan2.1 VAE "
                    "layout, or the layout of the connected VAE (Wan2.2 TI2V-5B: connect the Wan2.2 VAE).",
        inputs=(
            Input("width", "INT", default=832, min=16, max=8192, step=16),
            Input("height", "INT", default=480, min=16, max=8192, step=16),
            Input("length", "INT", default=81, min=1, max=1025, step=4, tooltip="frames; must be 4n+1"),
            Input("batch_size", "INT", default=1, min=1, max=64),
            Input("vae", "WANFLOW_VAE", optional=True,
                  tooltip="the VAE whose latent layout to use (48 channels, x16 for the Wan2.2 VAE); "
                          "without it, the Wan2.1 VAE's (16 channels, x8)"),
        ),
        outputs=(Output("LATENT", "latent"),),
    )

    def execute(self, width: int, height: int, length: int, batch_size: int = 1, vae=None):
        family = "wan2.1" if vae is None else vae.family
        validate_video_size(width, height, length, family)
        return ({"samples": torch.zeros(latent_shape(width, height, length, batch_size, family))},)


CONDITIONING_NODES = {cls.SCHEMA.node_id: cls for cls in (WanflowTextEncode, WanflowEmptyLatentVideo)}
