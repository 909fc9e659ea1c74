"""Writing and reading videos and image sequences (PyAV + PIL), with ComfyUI-style metadata.

Frames everywhere are ComfyUI IMAGE tensors: [N, H, W, 3] float in 0..1.

Metadata: ComfyUI embeds the API prompt and the UI workflow as JSON text under the keys
`prompt` and `workflow` (PNG text chunks in SaveImage; container tags in SaveVideo / SaveWEBM,
mp4 with `movflags=use_metadata_tags`); VideoHelperSuite writes one `comment` tag holding
{"prompt", "workflow"}. `comfy_metadata` builds these; the writers store any str -> str map.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import InputValueError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Codec:
    encoder: str
    crf_max: int
    default_crf: int
    options: tuple[tuple[str, str], ...] = ()
    container_options: tuple[tuple[str, str], ...] = ()


VIDEO_FORMATS: dict[str, _Codec] = {
    # use_metadata_tags: without it the mp4 muxer drops every tag it has no atom for
    # (`prompt`, `workflow`); with it ComfyUI's frontend finds them on drag-and-drop.
    "mp4": _Codec("libx264", crf_max=51, default_crf=19, container_options=(("movflags", "use_metadata_tags"),)),
    # b=0 makes libvpx-vp9 constant-quality (crf alone would be capped by its default bitrate).
    "webm": _Codec("libvpx-vp9", crf_max=63, default_crf=32, options=(("b", "0"),)),
}
PNG_COMPRESS_LEVEL = 4
"""ComfyUI's SaveImage level: much faster than 9 for a few percent more bytes."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str
    metadata: dict[str, str]
    """Container tags with lower-cased keys (Matroska stores tag names upper-case)."""


def comfy_metadata(
    prompt: Mapping[str, Any] | None = None,
    workflow: Mapping[str, Any] | None = None,
    *,
    with_comment: bool = False,
) -> dict[str, str]:
    """ComfyUI's `prompt` / `workflow` JSON text; `with_comment` adds VideoHelperSuite's
    `comment` tag ({"prompt", "workflow"} in one JSON) for videos."""
    parts = {k: v for k, v in (("prompt", prompt), ("workflow", workflow)) if v is not None}
    tags = {key: json.dumps(value) for key, value in parts.items()}
    if with_comment and parts:
        tags["comment"] = json.dumps(parts)
    return tags


def write_video(
    frames: torch.Tensor,
    path: Path,
    *,
    fps: float,
    fmt: str = "mp4",
    metadata: Mapping[str, str] | None = None,
    crf: int | None = None,
) -> Path:
    """Encode frames as mp4 (H.264) or webm (VP9), yuv420p, with `metadata` as container tags.

    yuv420p needs even width and height: odd sizes are padded by one repeated edge row/column
    (a video of a 1-pixel-larger size beats failing at the end of a long job).
    crf: None = 19 for mp4, 32 for webm (lower is better quality, larger file).
    """
    codec = VIDEO_FORMATS.get(fmt)
    if codec is None:
        raise InputValueError(f"unknown video format '{fmt}' (choose one of {', '.join(VIDEO_FORMATS)})", input_name="format")
    if not fps > 0:
        raise InputValueError(f"fps {fps} must be greater than 0", input_name="fps")
    crf = codec.default_crf if crf is None else crf
    if not 0 <= crf <= codec.crf_max:
        raise InputValueError(f"crf {crf} must be between 0 and {codec.crf_max} for {fmt}", input_name="crf")
    _check_frames(frames)
    _, height, width, _ = frames.shape
    padded = (height + height % 2, width + width % 2)
    if padded != (height, width):
        log.info("padding %dx%d frames to %dx%d for yuv420p", width, height, padded[1], padded[0])

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=fmt, options=dict(codec.container_options)) as container:
        for key, value in (metadata or {}).items():
            container.metadata[key] = value
        # Millisecond precision keeps NTSC-like rates (23.976) exact enough and 16/24 exact.
        stream = container.add_stream(codec.encoder, rate=Fraction(round(fps * 1000), 1000))
        stream.height, stream.width = padded
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), **dict(codec.options)}
        for frame in frames:
            pixels = _to_uint8(frame, padded)
            video_frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return path


def write_png_frames(
    frames: torch.Tensor, directory: Path, prefix: str, metadata: Mapping[str, str] | None = None
) -> list[Path]:
    """One PNG per frame, `<prefix>_00000.png`, ..., each carrying `metadata` as text chunks."""
    _check_frames(frames)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)  # PIL switches to iTXt for non-Latin-1 text
    paths = []
    for index, frame in enumerate(frames):
        path = directory / f"{prefix}_{index:05d}.png"
        Image.fromarray(_to_uint8(frame, tuple(frame.shape[:2]))).save(
            path, pnginfo=info, compress_level=PNG_COMPRESS_LEVEL
        )
        paths.append(path)
    return paths


def read_video_info(path: Path) -> VideoInfo:
    with _open_for_reading(path) as container:
        stream = container.streams.video[0]
        # Matroska does not store a frame count; counting packets needs no decoding.
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            frames=frames,
            width=stream.width,
            height=stream.height,
            fps=float(rate) if rate else 0.0,
            codec=stream.codec_context.name,
            metadata={key.lower(): value for key, value in container.metadata.items()},
        )


def read_video_frames(path: Path) -> torch.Tensor:
    """All frames as [N, H, W, 3] float32 in 0..1."""
    with _open_for_reading(path) as container:
        arrays = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def _open_for_reading(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise InputValueError(f"video file not found: {path}", file=str(path)) from None
    except av.error.FFmpegError as e:
        raise InputValueError(f"cannot read video {path}: {e}", file=str(path)) from None
    if not container.streams.video:
        container.close()
        raise InputValueError(f"{path} has no video stream", file=str(path))
    return container


def _check_frames(frames: Any) -> None:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputValueError(f"frames must be a tensor [N, H, W, 3], got {shape}", input_name="images")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise InputValueError(f"frames are empty (shape {tuple(frames.shape)})", input_name="images")
    if not frames.is_floating_point():
        raise InputValueError(f"frames must be float in 0..1, got {frames.dtype}", input_name="images")
    low, high = float(frames.min()), float(frames.max())
    # A little slack for decoder rounding; anything further off is not a 0..1 image.
    if not (low >= -1e-3 and high <= 1 + 1e-3):
        raise InputValueError(f"frames must be in 0..1, got values from {low:g} to {high:g}", input_name="images")


def _to_uint8(frame: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    pixels = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pad_h, pad_w = size[0] - pixels.shape[0], size[1] - pixels.shape[1]
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(pixels)
