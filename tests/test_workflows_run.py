"""Every saved workflow in workflows/ (UI file and API twin) runs end to end on the tiny models
through `wanflow run`'s runner and writes a valid video; the files are what make_workflows
generates."""
from __future__ import annotations

import json

import pytest

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, paths
from wanflow.runtime.demo import TINY_VIDEO, TINY_WORKFLOWS, tiny_overrides, write_tiny_images
from wanflow.runtime.media import read_video_info
from wanflow.runtime.workflow.run import run_workflow
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


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_on_tiny_models_and_writes_a_video(dirs, tiny_models, workflow):
    summary = run_workflow(workflow, node_registry(), overrides=tiny_overrides(tiny_models, workflow.stem), seed=1)
    assert summary.status == "success", summary.error
    (video,) = summary.files
    info = read_video_info(video)
    assert (info.frames, info.width, info.height) == (TINY_VIDEO["length"], TINY_VIDEO["width"], TINY_VIDEO["height"])


def test_wanflow_run_command_runs_an_image_to_video_workflow(dirs, tiny_models, capsys):
    sets = [a for o in tiny_overrides(tiny_models, "flf2v_wan21") for a in ("--set", o)]
    args = ["run", str(paths.workflows_dir() / "flf2v_wan21.json"), "--models", str(tiny_models.root),
            "--input", str(dirs / "input"), "--output", str(dirs / "cli"), "--json", *sets]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    (video,) = summary["files"]
    assert read_video_info(video).frames == TINY_VIDEO["length"]
