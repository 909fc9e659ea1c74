"""The OpenAI shim and LoRA endpoints, driven by the official `openai` client (tiny models)."""
from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import openai
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, paths
from wanflow.runtime.media import read_video_frames
from wanflow.runtime.server.app import RunningServer
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG

MODEL = "tiny-wan2.1-t2v"
TINY = {"size": "64x64", "extra_body": {"num_frames": 5, "num_inference_steps": 2, "seed": 3}}

# The Videos API is marked deprecated in the client (Sora's shutdown); it is still the API.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _write_lora(path) -> None:
    """A rank-2 LoRA on two projections of the tiny transformer, in ComfyUI's Wan key format."""
    dim = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        out_f, in_f = (dim, TINY_TRANSFORMER_CONFIG["ffn_dim"]) if module.endswith("ffn.2") else (dim, dim)
        tensors[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(2, in_f, generator=gen)
        tensors[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(out_f, 2, generator=gen)
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, serve_options):
    tmp = tmp_path_factory.mktemp("openai_server")
    _write_lora(tiny_models.root / "loras" / "style.safetensors")
    registry = node_registry()
    with RunningServer(serve_options(tmp), registry) as running:
        yield running
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def healthy(server):
    yield
    assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def finished_video(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return client.videos.create_and_poll(model=MODEL, prompt="a red fox", seconds="4", **TINY)


def _frames(content: bytes, tmp_path) -> np.ndarray:
    path = tmp_path / "v.mp4"
    path.write_bytes(content)
    return read_video_frames(path).numpy()


def test_create_and_poll_completes(finished_video):
    assert (finished_video.status, finished_video.progress, finished_video.size) == ("completed", 100, "64x64")
    assert finished_video.seconds == "4" and finished_video.model == MODEL
    assert finished_video.completed_at >= finished_video.created_at


def test_download_content_is_the_mp4(client, finished_video, tmp_path, healthy):
    content = client.videos.download_content(finished_video.id).content
    assert content[4:8] == b"ftyp"
    assert _frames(content, tmp_path).shape[:3] == (5, 64, 64)


def test_the_video_is_an_ordinary_job_in_comfyui_history(server, finished_video, healthy):
    entry = requests.get(f"{server.url}/history/{finished_video.id}", timeout=10).json()[finished_video.id]
    assert entry["status"]["status_str"] == "success"


def test_list_and_retrieve(client, finished_video, healthy):
    assert finished_video.id in [v.id for v in client.videos.list()]
    assert client.videos.retrieve(finished_video.id).status == "completed"


def test_images_generate_returns_one_png_frame(client, healthy):
    result = client.images.generate(model=MODEL, prompt="a red fox", size="64x48", response_format="b64_json",
                                    extra_body={"seed": 1, "num_inference_steps": 2})
    (image,) = result.data
    png = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
    assert (png.format, png.size) == ("PNG", (64, 48))


def test_delete_removes_the_video(client, healthy):
    video = client.videos.create_and_poll(model=MODEL, prompt="to delete", **TINY)
    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_unknown_model_is_404_model_not_found(client, healthy):
    with pytest.raises(openai.NotFoundError) as info:
        client.videos.create(model="sora-2", prompt="x")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_bad_field_names_its_param(client, healthy):
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(model=MODEL, prompt="x", size="100x64")
    assert info.value.body["param"] == "width" and "multiple of 16" in info.value.body["message"]


def test_input_reference_on_a_text_to_video_model_is_refused(client, healthy):
    image = io.BytesIO()
    Image.new("RGB", (64, 64)).save(image, format="PNG")
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(model=MODEL, prompt="x", input_reference=("start.png", image.getvalue(), "image/png"))
    assert info.value.body["param"] == "image"


def test_input_reference_starts_an_image_to_video_model(server, client, tmp_path, healthy):
    start = tmp_path / "start.png"
    Image.new("RGB", (80, 96), (200, 40, 40)).save(start)
    with open(start, "rb") as image:
        video = client.videos.create_and_poll(model="tiny-wan2.1-i2v", prompt="the fox turns", input_reference=image,
                                              **TINY)
    assert video.status == "completed", video.error
    (loaded,) = [n["inputs"]["image"] for n in server.server.store.get(video.id).prompt.values()
                 if n["class_type"] == "LoadImage"]
    assert (io_dirs.input_dir() / loaded).read_bytes() == start.read_bytes()
    assert _frames(client.videos.download_content(video.id).content, tmp_path).shape[:3] == (5, 64, 64)


def test_an_image_to_video_model_without_input_reference_is_refused(client, healthy):
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(model="tiny-wan2.1-i2v", prompt="x")
    assert info.value.body["param"] == "image" and "start image" in info.value.body["message"]


def test_non_json_body_gets_openai_error_shape(server, healthy):
    response = requests.post(f"{server.url}/v1/videos", data=b"{oops", headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_content_of_an_unknown_video_is_404(server, healthy):
    response = requests.get(f"{server.url}/v1/videos/video_nope/content", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_models_lists_the_tiny_model_as_available(client, healthy):
    models = {m.id: m for m in client.models.list()}
    assert models[MODEL].model_extra["available"] is True


# --- LoRA endpoints ----------------------------------------------------------------------------


def _lora_nodes(server, video_id: str) -> list[dict]:
    prompt = server.server.store.get(video_id).prompt
    return [n["inputs"] for n in prompt.values() if n["class_type"] == "WanflowLoRA"]


def test_lora_endpoints_steer_later_jobs(server, client, finished_video, tmp_path, healthy):
    url = server.url
    body = requests.post(f"{url}/v1/set_lora", json={"lora_nickname": "style", "lora_path": "style.safetensors",
                                                     "strength": 0.8}, timeout=30).json()
    assert body["loaded_adapters"][0]["nickname"] == "style"
    (active,) = body["active"]["transformer"]
    assert (active["merged"], active["strength"]) == (True, 0.8)
    assert requests.get(f"{url}/v1/list_loras", timeout=10).json() == body

    with_lora = client.videos.create_and_poll(model=MODEL, prompt="a red fox", seconds="4", **TINY)
    assert with_lora.status == "completed"
    (node,) = _lora_nodes(server, with_lora.id)
    assert (node["lora_name"], node["strength"], node["target"]) == ("style.safetensors", 0.8, "all")

    unmerged = requests.post(f"{url}/v1/unmerge_lora_weights", json={}, timeout=30).json()
    assert unmerged["active"]["transformer"][0]["merged"] is False
    without = client.videos.create(model=MODEL, prompt="a red fox", **TINY)
    assert _lora_nodes(server, without.id) == []

    merged = requests.post(f"{url}/v1/merge_lora_weights", json={"strength": 0.5}, timeout=30).json()
    assert merged["active"]["transformer"][0] == {**active, "strength": 0.5}
    requests.post(f"{url}/v1/unmerge_lora_weights", json={}, timeout=30)


def test_a_lora_set_on_the_server_changes_the_video(server, client, finished_video, tmp_path, healthy):
    requests.post(f"{server.url}/v1/set_lora", json={"lora_nickname": "style", "lora_path": "style.safetensors",
                                                     "strength": 1.0}, timeout=30)
    try:
        styled = client.videos.create_and_poll(model=MODEL, prompt="a red fox", seconds="4", **TINY)
    finally:
        requests.post(f"{server.url}/v1/unmerge_lora_weights", json={}, timeout=30)
    plain = _frames(client.videos.download_content(finished_video.id).content, tmp_path)
    assert not np.array_equal(plain, _frames(client.videos.download_content(styled.id).content, tmp_path))


def test_per_request_loras_override_the_server_stack(server, client, healthy):
    video = client.videos.create(model=MODEL, prompt="x", size="64x64",
                                 extra_body={"loras": '[{"name": "style.safetensors", "strength": 0.3}]'})
    (node,) = _lora_nodes(server, video.id)
    assert (node["lora_name"], node["strength"]) == ("style.safetensors", 0.3)


@pytest.mark.parametrize("lora_path", ["../../etc/passwd", "/etc/passwd", "missing.safetensors"])
def test_set_lora_refuses_files_outside_models_loras(server, lora_path, healthy):
    response = requests.post(f"{server.url}/v1/set_lora", json={"lora_nickname": "x", "lora_path": lora_path},
                             timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
