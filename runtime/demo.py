"""The demo: the shipped T2V workflow, run through the real nodes on tiny smoke-test models.

The same overrides let tests run every shipped workflow on tiny models: only file names,
images and sizes change, the graph is the one users load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputValueError
from .paths import workflows_dir
from .schema import NodeRegistry
from .tiny import TinyModelPaths, make_tiny_models
from .workflow.events import ExecutionListener
from .workflow.run import RunSummary, run_workflow

log = logging.getLogger(__name__)

# Small enough for a 2-core CPU in seconds, large enough to be a real video (9 frames); 64 is a
# multiple of every variant's size step (TI2V-5B: 32).
TINY_VIDEO = {"width": 64, "height": 64, "length": 9, "steps": 6}

TINY_IMAGES = {"Start Image": "wanflow_tiny_start.png", "End Image": "wanflow_tiny_end.png"}
"""LoadImage titles in the shipped workflows -> the images `write_tiny_images` makes."""
_TINY_IMAGE_SIZE = (96, 80)
"""Not the video's size or aspect: the image-to-video node's resize and crop run too."""


@dataclass(frozen=True)
class TinyWorkflow:
    """How one shipped workflow runs on the tiny models."""

    files: dict[str, str]
    """"Node title.input" -> the TinyModelPaths attribute whose file it loads."""
    size_node: str = "Video Size"
    """The node holding width / height / length."""
    images: tuple[str, ...] = ()
    """Titles of its LoadImage nodes."""


_TEXT = {"Load Text Encoder.text_encoder_name": "text_encoder"}
_WAN21 = {**_TEXT, "Load VAE.vae_name": "vae"}
_CLIP = {"Load CLIP Vision.clip_name": "clip_vision"}
_T2V = {"Load Diffusion Model.model_name": "transformer_bf16", **_WAN21}
_TI2V = {"Load Diffusion Model.model_name": "ti2v", **_TEXT, "Load VAE.vae_name": "vae_wan22"}
TINY_WORKFLOWS: dict[str, TinyWorkflow] = {
    "t2v_wan21": TinyWorkflow(_T2V),
    "t2v_wan21_lora": TinyWorkflow({**_T2V, "LoRA.lora_name": "lora"}),
    # The multi-GPU graphs run as they ship: 2 ranks, on gloo when there is no GPU.
    "t2v_wan21_usp": TinyWorkflow(_T2V),
    "t2v_wan21_usp_cfg": TinyWorkflow(_T2V),
    "t2v_wan21_cache": TinyWorkflow(_T2V),
    "i2v_wan21": TinyWorkflow({"Load Diffusion Model.model_name": "i2v", **_CLIP, **_WAN21},
                              "Image To Video", ("Start Image",)),
    "flf2v_wan21": TinyWorkflow({"Load Diffusion Model.model_name": "flf2v", **_CLIP, **_WAN21},
                                "Image To Video", ("Start Image", "End Image")),
    "t2v_wan22_a14b": TinyWorkflow({"Load Experts.high_noise_model": "t2v_high_noise",
                                    "Load Experts.low_noise_model": "t2v_low_noise", **_WAN21}),
    "i2v_wan22_a14b": TinyWorkflow({"Load Experts.high_noise_model": "i2v_high_noise",
                                    "Load Experts.low_noise_model": "i2v_low_noise", **_WAN21},
                                   "Image To Video", ("Start Image",)),
    "ti2v_wan22_5b": TinyWorkflow(_TI2V, "Image To Video", ("Start Image",)),
    "t2v_wan22_5b": TinyWorkflow(_TI2V),
}
"""Shipped workflow name (its file name without `.json` / `_api.json`) -> its tiny-model plan."""


def tiny_overrides(tiny: TinyModelPaths, workflow: str = "t2v_wan21", **video: int) -> list[str]:
    """`--set` overrides pointing a shipped workflow's loaders and images at the tiny models
    (images: see `write_tiny_images`) and its size at `TINY_VIDEO`."""
    name = workflow.removesuffix("_api")
    if name not in TINY_WORKFLOWS:
        raise InputValueError(f"no tiny-model plan for workflow '{workflow}' (known: {', '.join(TINY_WORKFLOWS)})")
    plan = TINY_WORKFLOWS[name]
    size = {**TINY_VIDEO, **video}
    return [
        *(f"{target}={getattr(tiny, attr).name}" for target, attr in plan.files.items()),
        *(f"{title}.image={TINY_IMAGES[title]}" for title in plan.images),
        *(f"{plan.size_node}.{key}={size[key]}" for key in ("width", "height", "length")),
        f"Sampler.steps={size['steps']}",
    ]


def write_tiny_images(folder: Path) -> list[Path]:
    """The start / end images the tiny overrides name, written into `folder` (the input folder)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = []
    for name in TINY_IMAGES.values():
        width, height = _TINY_IMAGE_SIZE
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        written.append(folder / name)
    return written


def demo_workflow() -> Path:
    return workflows_dir() / "t2v_wan21.json"


def run_demo(registry: NodeRegistry, models_dir: Path, listener: ExecutionListener | None = None) -> RunSummary:
    log.info("making tiny smoke-test models in %s (skipped when present)", models_dir)
    tiny = make_tiny_models(models_dir)
    return run_workflow(demo_workflow(), registry, overrides=tiny_overrides(tiny), listener=listener)
