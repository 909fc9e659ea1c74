"""Video and PNG writing: codecs, sizes, frame rates, embedded metadata, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from wanflow.runtime.errors import InputValueError
from wanflow.runtime.media import (
    comfy_metadata,
    read_video_frames,
    read_video_info,
    write_png_frames,
    write_video,
)

CODECS = {"mp4": "h264", "webm": "vp9"}
PROMPT = {"3": {"class_type": "WanflowSampler", "inputs": {"seed": 5}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "WanflowSampler", "title": "Wan – sampler ✓"}], "links": []}


def _frames(n: int = 5, height: int = 32, width: int = 48) -> torch.Tensor:
    """Flat colour frames that change over time: easy to check after lossy coding."""
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(n, 1, 1, 3, generator=g)
    return colours.expand(n, height, width, 3).contiguous()


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_video_has_the_frames_size_rate_and_codec_asked_for(tmp_path, fmt):
    path = write_video(_frames(7), tmp_path / f"out.{fmt}", fps=16, fmt=fmt)
    info = read_video_info(path)
    assert (info.frames, info.width, info.height, info.fps, info.codec) == (7, 48, 32, 16.0, CODECS[fmt])


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_video_pixels_survive_encoding(tmp_path, fmt):
    frames = _frames(5)
    decoded = read_video_frames(write_video(frames, tmp_path / f"out.{fmt}", fps=24, fmt=fmt))
    assert decoded.shape == frames.shape
    assert (decoded - frames).abs().mean() < 0.03


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_metadata_round_trips_through_the_container(tmp_path, fmt):
    tags = comfy_metadata(PROMPT, WORKFLOW, with_comment=True)
    tags["note"] = "päivää ✓"
    info = read_video_info(write_video(_frames(), tmp_path / f"out.{fmt}", fps=16, fmt=fmt, metadata=tags))
    assert {key: info.metadata[key] for key in tags} == tags
    assert json.loads(info.metadata["workflow"]) == WORKFLOW
    assert json.loads(info.metadata["comment"]) == {"prompt": PROMPT, "workflow": WORKFLOW}


def test_comfy_metadata_leaves_out_what_is_missing():
    assert comfy_metadata(PROMPT) == {"prompt": json.dumps(PROMPT)}
    assert comfy_metadata() == {}


def test_non_integer_frame_rate_is_kept(tmp_path):
    info = read_video_info(write_video(_frames(), tmp_path / "out.mp4", fps=23.976))
    assert info.fps == pytest.approx(23.976, abs=1e-3)


def test_odd_sizes_are_padded_to_even_for_yuv420p(tmp_path):
    info = read_video_info(write_video(_frames(3, height=31, width=45), tmp_path / "odd.mp4", fps=16))
    assert (info.width, info.height) == (46, 32)


def test_lower_crf_gives_a_larger_file(tmp_path):
    noisy = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    small = write_video(noisy, tmp_path / "small.mp4", fps=16, crf=40).stat().st_size
    large = write_video(noisy, tmp_path / "large.mp4", fps=16, crf=5).stat().st_size
    assert large > small


def test_png_frames_carry_prompt_and_workflow_text_chunks(tmp_path):
    paths = write_png_frames(_frames(3), tmp_path / "pngs", "clip", comfy_metadata(PROMPT, WORKFLOW))
    assert [p.name for p in paths] == ["clip_00000.png", "clip_00001.png", "clip_00002.png"]
    with Image.open(paths[1]) as image:
        assert image.size == (48, 32) and image.mode == "RGB"
        assert json.loads(image.text["prompt"]) == PROMPT
        assert json.loads(image.text["workflow"]) == WORKFLOW


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (torch.rand(4, 8, 8), r"\[N, H, W, 3\]"),
        (torch.rand(4, 8, 8, 4), r"\[N, H, W, 3\]"),
        (torch.rand(0, 8, 8, 3), "empty"),
        (torch.rand(2, 8, 8, 3) * 255, "in 0..1"),
        (torch.full((2, 8, 8, 3), float("nan")), "in 0..1"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), "float"),
    ],
)
def test_bad_frames_are_input_errors(tmp_path, frames, message):
    with pytest.raises(InputValueError, match=message):
        write_video(frames, tmp_path / "bad.mp4", fps=16)
    with pytest.raises(InputValueError, match=message):
        write_png_frames(frames, tmp_path, "bad")


@pytest.mark.parametrize(
    ("kwargs", "input_name"),
    [({"fmt": "avi"}, "format"), ({"fps": 0}, "fps"), ({"crf": 52}, "crf"), ({"fmt": "webm", "crf": 64}, "crf")],
)
def test_bad_video_options_are_input_errors(tmp_path, kwargs, input_name):
    with pytest.raises(InputValueError) as info:
        write_video(_frames(), tmp_path / "bad.mp4", **{"fps": 16, **kwargs})
    assert info.value.input_name == input_name


def test_reading_a_missing_video_names_the_file(tmp_path):
    with pytest.raises(InputValueError, match="not found") as info:
        read_video_info(tmp_path / "missing.mp4")
    assert info.value.file == str(tmp_path / "missing.mp4")
