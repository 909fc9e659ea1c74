"""`wanflow run` / `wanflow validate` on the shipped T2V workflow with tiny models."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, model_cache, paths
from wanflow.runtime.demo import tiny_overrides
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.media import read_video_frames, read_video_info
from wanflow.runtime.workflow.executor import Executor
from wanflow.runtime.workflow.run import run_workflow
from wanflow.scripts.cli import main

T2V = paths.workflows_dir() / "t2v_wan21.json"
T2V_API = paths.workflows_dir() / "t2v_wan21_api.json"


@pytest.fixture()
def dirs(tiny_models, tmp_path):
    yield tiny_models, tmp_path / "out"
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


def cli(tiny, out, *args: str) -> list[str]:
    return ["--models", str(tiny.root), "--output", str(out), *[a for o in tiny_overrides(tiny) for a in ("--set", o)], *args]


@pytest.mark.parametrize("workflow", [T2V, T2V_API], ids=["ui", "api"])
def test_run_writes_the_video_and_prints_a_json_summary(dirs, capsys, workflow):
    tiny, out = dirs
    assert main(["run", str(workflow), *cli(tiny, out, "--json", "--seed", "3")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "success"
    (video,) = summary["files"]
    info = read_video_info(video)
    assert (info.frames, info.width, info.height) == (9, 64, 64)


def test_run_set_by_title_changes_the_prompt_in_the_saved_metadata(dirs, capsys):
    tiny, out = dirs
    assert main(["run", str(T2V), *cli(tiny, out, "--json", "--set", "Prompt.positive=a heron at dusk")]) == 0
    (video,) = json.loads(capsys.readouterr().out)["files"]
    prompt = json.loads(read_video_info(video).metadata["prompt"])
    assert prompt["4"]["inputs"]["positive"] == "a heron at dusk"


def test_run_with_an_unknown_set_target_exits_2_naming_it(dirs, caplog):
    tiny, out = dirs
    assert main(["run", str(T2V), *cli(tiny, out, "--set", "Nope.text=x")]) == 2
    assert "no node with id or title 'Nope'" in caplog.text


def test_run_with_an_unknown_input_names_the_node_inputs(dirs):
    tiny, _ = dirs
    paths.set_models_dir(tiny.root)
    with pytest.raises(InputValueError, match="has no input 'colour'"):
        run_workflow(T2V, node_registry(), overrides=["Sampler.colour=red"])


def test_validate_reports_a_value_out_of_range_and_exits_1(dirs, capsys):
    tiny, out = dirs
    assert main(["validate", str(T2V), *cli(tiny, out, "--json", "--set", "Sampler.steps=0")]) == 1
    errors = json.loads(capsys.readouterr().out)["node_errors"]["6"]["errors"]
    assert errors[0]["type"] == "value_smaller_than_min"
    assert errors[0]["extra_info"]["input_name"] == "steps"


def test_validate_names_a_model_file_that_is_not_there(dirs, capsys):
    tiny, out = dirs
    code = main(["validate", str(T2V), "--models", str(tiny.root), "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == 1
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


def test_rerun_with_only_the_seed_changed_reuses_models_and_text_embeds(dirs):
    tiny, out = dirs
    paths.set_models_dir(tiny.root)
    io_dirs.set_io_dirs(output=out)
    executor = Executor(node_registry())
    first = run_workflow(T2V, executor.registry, overrides=tiny_overrides(tiny), seed=1, executor=executor)
    loads = dict(model_cache.load_counts)
    second = run_workflow(T2V, executor.registry, overrides=tiny_overrides(tiny), seed=2, executor=executor)
    assert first.status == second.status == "success"
    assert model_cache.load_counts == loads
    assert set(second.executed) == {"6", "7", "8"}  # sampler, decode, save
    assert {"1", "2", "3", "4", "5"} <= set(second.cached)


def test_run_with_cache_dit_flag_reports_cache_stats_in_the_summary(dirs, capsys):
    tiny, out = dirs
    args = cli(tiny, out, "--json", "--set", "Sampler.steps=12", "--cache-dit", "--cache-warmup", "2")
    assert main(["run", str(T2V), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    (text,) = summary["outputs"]["6"]["text"]
    assert "Cache-DiT" in text
    assert main(["run", str(T2V), *cli(tiny, out, "--json")]) == 0  # defaults reset: no cache
    assert "text" not in json.loads(capsys.readouterr().out)["outputs"]["6"]


def test_perf_dump_holds_node_timings_and_per_step_seconds(dirs, tmp_path):
    tiny, out = dirs
    dump = tmp_path / "perf.json"
    assert main(["run", str(T2V), *cli(tiny, out, "--perf-dump", str(dump))]) == 0
    perf = json.loads(dump.read_text())
    assert {"1", "4", "6", "7", "8"} <= set(perf["timings"])
    (sampling,) = perf["outputs"]["6"]["sampling"]
    assert len(sampling["step_seconds"]) == sampling["steps"] == 6
    assert all(s > 0 for s in sampling["step_seconds"])


def test_generate_from_flags_and_from_a_yaml_config_give_the_same_video(dirs, capsys, tmp_path):
    tiny, out = dirs
    fields = {"model": "tiny-wan2.1-t2v", "prompt": "a fox", "size": "64x64", "num_frames": 9, "steps": 4, "seed": 5}
    config = tmp_path / "req.yaml"
    config.write_text("".join(f"{k}: {v!r}\n" if isinstance(v, str) else f"{k}: {v}\n" for k, v in fields.items()))
    common = ["--models", str(tiny.root), "--output", str(out), "--json"]
    flags = ["--model", "tiny-wan2.1-t2v", "--prompt", "a fox", "--size", "64x64", "--num-frames", "9", "--steps", "4", "--seed", "5"]
    assert main(["generate", *flags, *common]) == 0
    (from_flags,) = json.loads(capsys.readouterr().out)["files"]
    assert main(["generate", "--config", str(config), *common]) == 0
    (from_config,) = json.loads(capsys.readouterr().out)["files"]
    assert from_flags != from_config
    assert json.loads(read_video_info(from_flags).metadata["prompt"]) == json.loads(read_video_info(from_config).metadata["prompt"])
    # Same frames up to H.264 rounding (x264 did not always give identical bytes here).
    assert (read_video_frames(from_flags) - read_video_frames(from_config)).abs().mean() < 0.01


def test_serve_starts_answers_and_stops(tmp_path, tiny_models):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanflow.scripts.cli", "serve", "--port", str(port), "--models", str(tiny_models.root),
         "--output", str(tmp_path / "out"), "--user-dir", str(tmp_path / "user")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2) as r:
                    assert json.loads(r.read())["system"]["python_version"]
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "server did not start in 120 s"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
