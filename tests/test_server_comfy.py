"""The ComfyUI-compatible API over real HTTP on 127.0.0.1 (tiny models)."""
from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import uuid

import aiohttp
import pytest
import requests
from PIL import Image

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, model_cache, paths
from wanflow.runtime.server.app import RunningServer
from wanflow.runtime.workflow.templates import GenerationRequest, build_prompt

TIMEOUT = 120
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def registry():
    return node_registry()


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_options, registry):
    tmp = tmp_path_factory.mktemp("comfy_server")
    with RunningServer(serve_options(tmp, max_upload_mb=1), registry) as running:
        yield running
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


@pytest.fixture()
def healthy(server):
    """Every test leaves the server answering."""
    yield
    assert requests.get(f"{server.url}/system_stats", timeout=10).status_code == 200


def _prompt(registry, seed: int = 0) -> dict:
    return build_prompt(GenerationRequest(model="tiny-wan2.1-t2v", prompt="a fox", seed=seed), registry=registry)


async def _run_over_websocket(url: str, prompt: dict) -> tuple[str, list[dict], list[bytes]]:
    """Queue `prompt` as a websocket client would; returns (prompt_id, JSON messages, binary frames)."""
    client_id = uuid.uuid4().hex
    messages, frames = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                assert response.status == 200, await response.text()
                prompt_id = (await response.json())["prompt_id"]
            while True:
                msg = await ws.receive(timeout=TIMEOUT)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    frames.append(msg.data)
                    continue
                message = json.loads(msg.data)
                messages.append(message)
                data = message["data"]
                if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    return prompt_id, messages, frames


@pytest.fixture(scope="module")
def finished_run(server, registry):
    return asyncio.run(_run_over_websocket(server.url, _prompt(registry, seed=1)))


def test_websocket_events_come_in_comfyui_order(finished_run):
    prompt_id, messages, _ = finished_run
    assert messages[0]["type"] == "status" and "sid" in messages[0]["data"]
    ours = [m for m in messages if m["data"].get("prompt_id") == prompt_id]
    types = [m["type"] for m in ours]
    assert types[:2] == ["execution_start", "execution_cached"]
    assert types[-3:] == ["executed", "execution_success", "executing"]
    sampler = [m["data"]["node"] for m in ours if m["type"] == "executing" and m["data"]["node"]]
    assert sampler.index("6") < sampler.index("7") < sampler.index("8")
    progress = [m["data"] for m in ours if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2] and all(p["max"] == 2 and p["node"] == "6" for p in progress)


def test_previews_arrive_as_binary_png_frames(finished_run):
    _, _, frames = finished_run
    assert frames, "no preview frames"
    event, image_format = struct.unpack(">II", frames[0][:8])
    assert (event, image_format) == (1, 2)
    assert frames[0][8:16] == PNG_MAGIC
    assert Image.open(io.BytesIO(frames[0][8:])).size[0] > 0


def test_history_holds_the_outputs_and_view_returns_the_mp4(server, finished_run, healthy):
    prompt_id, _, _ = finished_run
    entry = requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json()[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["prompt"][1] == prompt_id
    video = entry["outputs"]["8"]["images"][0]
    assert video["filename"].endswith(".mp4")
    response = requests.get(f"{server.url}/view", params=video, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "video/mp4"
    assert response.content[4:8] == b"ftyp"


def test_every_route_is_also_under_api(server, finished_run, healthy):
    prompt_id, _, _ = finished_run
    assert prompt_id in requests.get(f"{server.url}/api/history", timeout=10).json()
    assert "WanflowSampler" in requests.get(f"{server.url}/api/object_info", timeout=10).json()


def test_jobs_api_lists_the_finished_job_with_its_preview(server, finished_run, healthy):
    prompt_id, _, _ = finished_run
    listing = requests.get(f"{server.url}/api/jobs", params={"status": "completed"}, timeout=10).json()
    job = next(j for j in listing["jobs"] if j["id"] == prompt_id)
    assert job["preview_output"]["filename"].endswith(".mp4") and job["outputs_count"] == 1
    detail = requests.get(f"{server.url}/api/jobs/{prompt_id}", timeout=10).json()
    assert detail["outputs"]["8"]["images"][0]["filename"] == job["preview_output"]["filename"]


def test_object_info_describes_one_node(server, healthy):
    info = requests.get(f"{server.url}/object_info/WanflowSampler", timeout=10).json()
    assert info["WanflowSampler"]["input"]["required"]["steps"][0] == "INT"


def test_invalid_prompt_gets_comfyui_error_shape_and_is_not_queued(server, registry, healthy):
    prompt = _prompt(registry)
    prompt["6"]["inputs"]["steps"] = 0
    prompt["99"] = {"class_type": "NoSuchNode", "inputs": {}}
    response = requests.post(f"{server.url}/prompt", json={"prompt": prompt}, timeout=10)
    assert response.status_code == 400
    body = response.json()
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert body["error"]["type"] == "missing_node_type" and "NoSuchNode" in body["error"]["message"]
    assert requests.get(f"{server.url}/queue", timeout=10).json()["queue_pending"] == []


def test_out_of_range_value_is_reported_per_node_and_input(server, registry, healthy):
    prompt = _prompt(registry)
    prompt["6"]["inputs"]["steps"] = 0
    body = requests.post(f"{server.url}/prompt", json={"prompt": prompt}, timeout=10).json()
    (error,) = body["node_errors"]["6"]["errors"]
    assert error["type"] == "value_smaller_than_min" and error["extra_info"]["input_name"] == "steps"
    assert body["node_errors"]["6"]["class_type"] == "WanflowSampler"


@pytest.mark.parametrize("body, kind", [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"),
                                        (b'{"client_id": "x"}', "no_prompt")])
def test_bad_bodies_get_json_errors(server, body, kind, healthy):
    response = requests.post(f"{server.url}/prompt", data=body, headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == 400 and response.json()["error"]["type"] == kind


@pytest.mark.parametrize("params", [
    {"filename": "../../etc/passwd"},
    {"filename": "passwd", "subfolder": "../../../etc"},
    {"filename": "/etc/passwd"},
    {"filename": "..\\..\\etc\\passwd"},
    {"filename": "x.png", "subfolder": "/etc"},
    {"filename": "passwd", "type": "../etc"},
])
def test_view_refuses_paths_outside_its_folders(server, params, healthy):
    response = requests.get(f"{server.url}/view", params=params, timeout=10)
    assert response.status_code == 400
    assert "error" in response.json()


def test_upload_then_view_round_trip(server, healthy):
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image, format="PNG")
    response = requests.post(f"{server.url}/upload/image", files={"image": ("red.png", image.getvalue())},
                             data={"subfolder": "tests"}, timeout=10)
    assert response.json() == {"name": "red.png", "subfolder": "tests", "type": "input"}
    viewed = requests.get(f"{server.url}/view", params={"filename": "red.png", "subfolder": "tests",
                                                          "type": "input"}, timeout=10)
    assert viewed.content == image.getvalue()


@pytest.mark.parametrize("filename, subfolder", [("x.png", "../../outside"), ("x.png", "/tmp"), ("evil.html", "")])
def test_upload_refuses_escapes_and_non_media(server, filename, subfolder, healthy, tmp_path):
    response = requests.post(f"{server.url}/upload/image", files={"image": (filename, b"data")},
                             data={"subfolder": subfolder}, timeout=10)
    assert response.status_code == 400 and "error" in response.json()


def test_upload_keeps_only_the_base_name(server, healthy):
    response = requests.post(f"{server.url}/upload/image", files={"image": ("../../sneaky.png", b"png")}, timeout=10)
    assert response.json()["name"] == "sneaky.png"
    assert (io_dirs.input_dir() / "sneaky.png").is_file()


def test_oversized_body_is_refused_in_json(server, healthy):
    response = requests.post(f"{server.url}/prompt", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413 and "error" in response.json()


@pytest.mark.parametrize("path, shape", [("/api/nope", "comfy"), ("/v1/nope", "openai"), ("/history/a/b", "comfy")])
def test_unknown_routes_404_in_their_api_shape(server, path, shape, healthy):
    response = requests.get(f"{server.url}{path}", timeout=10)
    assert response.status_code == 404
    error = response.json()["error"]
    assert ("param" in error) == (shape == "openai") and "message" in error


def test_queue_clear_drops_pending_jobs(server, registry, healthy):
    ids = [requests.post(f"{server.url}/prompt", json={"prompt": _prompt(registry, seed=s)}, timeout=10).json()[
        "prompt_id"] for s in (100, 101, 102)]
    requests.post(f"{server.url}/queue", json={"clear": True}, timeout=10)
    queue = requests.get(f"{server.url}/queue", timeout=10).json()
    assert not {item[1] for item in queue["queue_pending"]} & set(ids)


def test_editor_boot_routes_answer(server, healthy):
    assert requests.get(f"{server.url}/", timeout=10).text.lstrip().lower().startswith("<!doctype html>")
    assert requests.get(f"{server.url}/api/users", timeout=10).json()["storage"] == "server"
    assert requests.post(f"{server.url}/api/settings/Comfy.Test", json=3, timeout=10).status_code == 200
    assert requests.get(f"{server.url}/api/settings", timeout=10).json()["Comfy.Test"] == 3
    assert requests.get(f"{server.url}/api/userdata", params={"dir": "workflows"}, timeout=10).json() == []
    assert "t2v_wan21" in requests.get(f"{server.url}/api/workflow_templates", timeout=10).json()["wanflow"]


def test_userdata_is_confined_to_the_user_folder(server, healthy):
    response = requests.get(f"{server.url}/api/userdata/..%2F..%2Fwanflow_jobs.sqlite", timeout=10)
    assert response.status_code == 400


def test_api_key_guards_every_route(tmp_path, serve_options, registry):
    with RunningServer(serve_options(tmp_path, api_key="s3cret"), registry) as keyed:
        assert requests.get(f"{keyed.url}/api/queue", timeout=10).status_code == 401
        assert requests.get(f"{keyed.url}/v1/models", timeout=10).json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{keyed.url}/", timeout=10).status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{keyed.url}/api/queue", headers=headers, timeout=10).status_code == 200
        browser = requests.Session()
        assert browser.get(f"{keyed.url}/?token=s3cret", timeout=10).status_code == 200
        assert browser.get(f"{keyed.url}/api/queue", timeout=10).status_code == 200  # the cookie carries it


def test_bare_interrupt_and_free_are_accepted(server, healthy):
    assert requests.post(f"{server.url}/interrupt", timeout=10).status_code == 200
    assert requests.post(f"{server.url}/api/free", json={"unload_models": True}, timeout=10).status_code == 200


def test_partial_execution_runs_only_the_chosen_output(server, registry, healthy):
    prompt = _prompt(registry, seed=5)
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    prompt_id = requests.post(f"{server.url}/prompt", json={"prompt": prompt, "partial_execution_targets": ["9"]},
                              timeout=10).json()["prompt_id"]
    deadline = time.monotonic() + TIMEOUT
    while not (entry := requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    outputs = entry[prompt_id]["outputs"]
    # Only node 9 wrote files (the sampler's own UI output carries its statistics).
    assert [node for node, ui in outputs.items() if "images" in ui] == ["9"]


def test_free_with_unload_models_drops_every_loaded_model_and_the_next_job_reloads(server, registry, finished_run, healthy):
    loads = model_cache.load_counts.get("diffusion_models", 0)
    assert requests.post(f"{server.url}/free", json={"unload_models": True}, timeout=60).status_code == 200
    asyncio.run(_run_over_websocket(server.url, _prompt(registry, seed=1)))
    assert model_cache.load_counts["diffusion_models"] == loads + 1
