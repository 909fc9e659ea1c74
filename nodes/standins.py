"""Stand-ins for the ComfyUI core nodes that Wan workflows use around wanflow's own nodes, so
saved workflows run headless. Same names, inputs and outputs as ComfyUI's.

Only used outside ComfyUI (inside it, ComfyUI's own nodes are there). Reroute, PrimitiveNode,
Note and MarkdownNote are not declared: they are editor-only nodes that the frontend defines
itself (ComfyUI's /object_info does not list them) and UI->API conversion resolves away.
"""
from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..runtime import io_dirs
from ..runtime.schema import Hidden, Input, NodeSchema, Output, SchemaNode


class LoadImage(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="LoadImage",
        display_name="Load Image",
        category="image",
        inputs=(Input("image", "COMBO", options=io_dirs.list_input_images, tooltip="An image in the input folder.", extra=(("image_upload", True),)),),
        outputs=(Output("IMAGE"), Output("MASK")),
    )

    def execute(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(io_dirs.resolve_input_file(image)) as opened:
            frame = ImageOps.exif_transpose(opened)
            rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
            if "A" in frame.getbands():
                alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
                # ComfyUI's MASK marks the transparent parts.
                mask = 1.0 - torch.from_numpy(alpha)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
        return torch.from_numpy(rgb)[None], mask[None]

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:  # noqa: N802 - ComfyUI's name
        # Re-run when the file's content changes under the same name (an upload overwrote it).
        return hashlib.sha256(io_dirs.resolve_input_file(image).read_bytes()).hexdigest()


def _save_pngs(
    images: torch.Tensor,
    prefix: str,
    root: Path,
    kind: str,
    compress_level: int,
    prompt: dict[str, Any] | None,
    extra_pnginfo: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write a [B,H,W,C] batch as PNGs carrying the prompt and workflow, like ComfyUI's SaveImage."""
    target = io_dirs.save_target(prefix, root, images.shape[2], images.shape[1])
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    results = []
    for index, image in enumerate(images):
        pixels = (image.detach().float().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
        filename = target.filename(index, "png")
        Image.fromarray(pixels).save(target.folder / filename, pnginfo=metadata, compress_level=compress_level)
        results.append({"filename": filename, "subfolder": target.subfolder, "type": kind})
    return {"ui": {"images": results}}


class SaveImage(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="SaveImage",
        display_name="Save Image",
        category="image",
        inputs=(
            Input("images", "IMAGE", tooltip="The images to save."),
            Input(
                "filename_prefix", "STRING", default="ComfyUI",
                tooltip="Prefix of the file names; may hold sub-folders and %date% parts.",
            ),
        ),
        hidden=(Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
        description="Saves the input images to the output directory.",
        output_node=True,
    )

    def execute(
        self,
        images: torch.Tensor,
        filename_prefix: str = "ComfyUI",
        prompt: dict | None = None,
        extra_pnginfo: dict | None = None,
    ) -> dict[str, Any]:
        return _save_pngs(images, filename_prefix, io_dirs.output_dir(), "output", 4, prompt, extra_pnginfo)


class PreviewImage(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="PreviewImage",
        display_name="Preview Image",
        category="image",
        inputs=(Input("images", "IMAGE"),),
        hidden=(Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
        description="Saves the input images to the temp directory for a preview.",
        output_node=True,
    )

    def execute(
        self, images: torch.Tensor, prompt: dict | None = None, extra_pnginfo: dict | None = None
    ) -> dict[str, Any]:
        # A random suffix keeps previews of concurrent servers sharing a temp folder apart.
        prefix = "ComfyUI_temp_" + "".join(random.choices(string.ascii_lowercase, k=5))
        return _save_pngs(images, prefix, io_dirs.temp_dir(), "temp", 1, prompt, extra_pnginfo)


STANDIN_NODES: dict[str, type] = {cls.SCHEMA.node_id: cls for cls in (LoadImage, SaveImage, PreviewImage)}
STANDIN_DISPLAY_NAMES: dict[str, str] = {name: cls.SCHEMA.display_name for name, cls in STANDIN_NODES.items()}
