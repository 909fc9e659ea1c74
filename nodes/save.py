"""Save video: frames -> mp4 / webm (+ optional PNG frames) in the output folder."""
from __future__ import annotations

from ..runtime import io_dirs, media
from ..runtime.schema import Hidden, Input, NodeSchema, SchemaNode

FORMATS = {"mp4 (h264)": "mp4", "webm (vp9)": "webm"}


class WanflowSaveVideo(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowSaveVideo",
        display_name="Wan Save Video",
        category="wanflow/output",
        description="Writes the frames as a video (workflow and prompt embedded in its metadata).",
        inputs=(
            Input("images", "IMAGE"),
            Input("fps", "FLOAT", default=16.0, min=1.0, max=120.0, step=1.0, tooltip="Wan2.1: 16, Wan2.2 TI2V-5B: 24"),
            Input("filename_prefix", "STRING", default="wanflow/video", tooltip="may contain sub-folders and %date% style fields"),
            Input("format", "COMBO", default="mp4 (h264)", options=tuple(FORMATS)),
            Input("crf", "INT", default=19, min=0, max=63, tooltip="quality: lower is better (mp4 0-51, webm 0-63)"),
            Input("save_png_frames", "BOOLEAN", default=False, tooltip="also write every frame as PNG"),
        ),
        hidden=(Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
        output_node=True,
    )

    def execute(self, images, fps: float, filename_prefix: str, format: str = "mp4 (h264)",  # noqa: A002 - ComfyUI input name
                crf: int = 19, save_png_frames: bool = False, prompt=None, extra_pnginfo=None):
        fmt = FORMATS.get(format, format)
        height, width = int(images.shape[1]), int(images.shape[2])
        target = io_dirs.save_target(filename_prefix, io_dirs.output_dir(), width, height)
        workflow = (extra_pnginfo or {}).get("workflow")
        filename = target.filename(0, fmt)
        media.write_video(
            images, target.folder / filename, fps=fps, fmt=fmt, crf=crf,
            metadata=media.comfy_metadata(prompt, workflow, with_comment=True),
        )
        results = [{"filename": filename, "subfolder": target.subfolder, "type": "output", "format": f"video/{fmt}"}]
        if save_png_frames:
            frames_dir = target.folder / filename.rsplit(".", 1)[0]
            media.write_png_frames(images, frames_dir, target.name, media.comfy_metadata(prompt, workflow))
        return {"ui": {"images": results, "animated": [True]}, "result": ()}


SAVE_NODES = {WanflowSaveVideo.SCHEMA.node_id: WanflowSaveVideo}
