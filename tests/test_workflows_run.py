"""Every saved workflow in workflows/ (UI file and API twin) runs end to end on the tiny models
through `wanflow run`'s runner and writes a valid video; the files are what make_workflows
generates. The LoRA, multi-GPU and Cache-DiT workflows do what their extra node is for.

Each workflow runs once per module (`run`); the multi-GPU ones spawn 2 gloo ranks on CPU,
stopped when the module ends."""
from __future__ import annotations

import json
import re
from typing import Callable, Iterator, NamedTuple

import pytest
import torch

from wanflow.nodes import node_registry
from wanflow.nodes.sampler import WanflowSampler
from wanflow.runtime import io_dirs, parallel, paths
from wanflow.runtime.demo import TINY_VIDEO, TINY_WORKFLOWS, tiny_overrides, write_tiny_images
from wanflow.runtime.media import read_video_info
from wanflow.runtime.workflow.run import RunSummary, run_workflow
from wanflow.scripts import make_workflows
from wanflow.scripts.cli import main

WORKFLOWS = sorted(paths.workflows_dir().glob("*.json"))


@pytest.fixture(scope="module")
def dirs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow_runs")
    write_tiny_images(root / "input")
    paths.set_models_dir(tiny_models.root)
    io_dirs.set_io_dirs(input=root / "input", output=root / "output")
    yield root
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


def test_every_variant_has_a_shipped_workflow_and_a_tiny_plan():
    names = {p.name.removesuffix(".json").removesuffix("_api") for p in WORKFLOWS}
    assert names == set(TINY_WORKFLOWS) == set(make_workflows.WORKFLOWS)
    assert {"i2v_wan21", "flf2v_wan21", "t2v_wan22_a14b", "i2v_wan22_a14b", "ti2v_wan22_5b"} <= names


def test_shipped_files_are_what_make_workflows_writes(tmp_path):
    written = make_workflows.write_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in WORKFLOWS)
    for path in written:
        assert json.loads(path.read_text()) == json.loads((paths.workflows_dir() / path.name).read_text()), path.name


class _LatentSpy(WanflowSampler):
    """The sampler, keeping the latent it returned last (mp4 bytes are not reproducible)."""

    last: torch.Tensor | None = None

    def execute(self, *args, **kwargs):
        out = super().execute(*args, **kwargs)
        type(self).last = out["result"][0]["samples"]
        return out


class Run(NamedTuple):
    summary: RunSummary
    latent: torch.Tensor | None


@pytest.fixture(scope="module")
def run(dirs, tiny_models) -> Iterator[Callable[[str], Run]]:
    """Runs a shipped workflow (file stem) on the tiny models with seed 1, once per module."""
    registry = node_registry()
    registry.classes[WanflowSampler.SCHEMA.node_id] = _LatentSpy
    done: dict[str, Run] = {}

    def run_one(stem: str) -> Run:
        if stem not in done:
            _LatentSpy.last = None
            summary = run_workflow(paths.workflows_dir() / f"{stem}.json", registry,
                                   overrides=tiny_overrides(tiny_models, stem), seed=1)
            done[stem] = Run(summary, _LatentSpy.last)
        return done[stem]

    yield run_one
    parallel.unload()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_on_tiny_models_and_writes_a_video(run, workflow):
    summary = run(workflow.stem).summary
    assert summary.status == "success", summary.error
    (video,) = summary.files
    info = read_video_info(video)
    assert (info.frames, info.width, info.height) == (TINY_VIDEO["length"], TINY_VIDEO["width"], TINY_VIDEO["height"])


def test_the_same_seed_samples_the_same_latent(run):
    # What makes the LoRA test below mean something: nothing else differs between two runs.
    assert torch.equal(run("t2v_wan21").latent, run("t2v_wan21_api").latent)


def test_the_lora_workflow_changes_the_sampled_latent(run):
    plain, with_lora = run("t2v_wan21_api").latent, run("t2v_wan21_lora_api").latent
    assert with_lora.shape == plain.shape
    assert _rel(with_lora, plain) > 1e-3


@pytest.mark.parametrize("workflow, cfg_parallel", [("t2v_wan21_usp_api", False), ("t2v_wan21_usp_cfg_api", True)])
def test_the_multi_gpu_workflows_sample_the_single_device_latent_on_two_ranks(run, workflow, cfg_parallel):
    result = run(workflow)
    (stats,) = result.summary.outputs["6"]["sampling"]  # node 6: the sampler
    assert (stats["parallel"]["ranks"], stats["parallel"]["cfg_parallel"]) == (2, cfg_parallel)
    assert _rel(result.latent, run("t2v_wan21_api").latent) <= 1e-5


def test_the_cache_workflow_reuses_transformer_calls(run):
    (line,) = run("t2v_wan21_cache_api").summary.texts()
    cached = re.search(r"(\d+) cached", line)
    assert cached is not None and int(cached.group(1)) > 0, line


def test_wanflow_run_command_runs_an_image_to_video_workflow(dirs, tiny_models, capsys):
    sets = [a for o in tiny_overrides(tiny_models, "flf2v_wan21") for a in ("--set", o)]
    args = ["run", str(paths.workflows_dir() / "flf2v_wan21.json"), "--models", str(tiny_models.root),
            "--input", str(dirs / "input"), "--output", str(dirs / "cli"), "--json", *sets]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    (video,) = summary["files"]
    assert read_video_info(video).frames == TINY_VIDEO["length"]
