"""The demo: the shipped T2V workflow, run through the real nodes on tiny smoke-test models.

The same overrides let tests run every shipped workflow on tiny models: only file names and
sizes change, the graph is the one users load.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .paths import workflows_dir
from .schema import NodeRegistry
from .tiny import TinyModelPaths, make_tiny_models
from .workflow.events import ExecutionListener
from .workflow.run import RunSummary, run_workflow

log = logging.getLogger(__name__)

# Small enough for a 2-core CPU in seconds, large enough to be a real video (9 frames).
TINY_VIDEO = {"width": 64, "height": 64, "length": 9, "steps": 6}


def tiny_overrides(tiny: TinyModelPaths, **video: int) -> list[str]:
    """`--set` overrides pointing the shipped T2V workflow's loaders at the tiny models."""
    size = {**TINY_VIDEO, **video}
    return [
        f"Load Diffusion Model.model_name={tiny.transformer_bf16.name}",
        f"Load Text Encoder.text_encoder_name={tiny.text_encoder.name}",
        f"Load VAE.vae_name={tiny.vae.name}",
        f"Video Size.width={size['width']}",
        f"Video Size.height={size['height']}",
        f"Video Size.length={size['length']}",
        f"Sampler.steps={size['steps']}",
    ]


def run_demo(registry: NodeRegistry, models_dir: Path, listener: ExecutionListener | None = None) -> RunSummary:
    log.info("making tiny smoke-test models in %s (skipped when present)", models_dir)
    tiny = make_tiny_models(models_dir)
    return run_workflow(workflows_dir() / "t2v_wan21.json", registry, overrides=tiny_overrides(tiny), listener=listener)
