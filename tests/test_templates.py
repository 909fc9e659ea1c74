"""Generation requests -> workflow templates (`wanflow generate`, the OpenAI shim)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, paths
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.media import read_video_frames
from wanflow.runtime.workflow.executor import Executor
from wanflow.runtime.workflow.templates import (
    GenerationRequest,
    RequestLora,
    build_prompt,
    frames_for,
    generate,
    load_generation_config,
    load_template,
)
from wanflow.runtime.workflow.validate import validate_prompt

TINY = "tiny-wan2.1-t2v"


@pytest.fixture(scope="module")
def registry():
    return node_registry()


@pytest.fixture()
def tiny_env(tiny_models, tmp_path):
    paths.set_models_dir(tiny_models.root)
    io_dirs.set_io_dirs(output=tmp_path / "output", input=tmp_path / "input", temp=tmp_path / "temp")
    yield tmp_path
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


def _by_title(prompt: dict, title: str) -> dict:
    return next(n for n in prompt.values() if n["_meta"]["title"] == title)["inputs"]


def test_sglang_names_are_accepted_and_strings_coerced():
    request = GenerationRequest.from_dict(
        {"model": TINY, "prompt": "a fox", "num_inference_steps": "7", "guidance_scale": "3.5", "seed": "11"}
    )
    assert (request.steps, request.guidance, request.seed) == (7, 3.5, 11)


def test_unknown_field_is_named():
    with pytest.raises(InputValueError, match="stepz") as info:
        GenerationRequest.from_dict({"model": TINY, "prompt": "x", "stepz": 3})
    assert info.value.key == "stepz"


def test_missing_prompt_is_named():
    with pytest.raises(InputValueError, match="'prompt' is required"):
        GenerationRequest.from_dict({"model": TINY})


def test_non_integer_steps_is_named():
    with pytest.raises(InputValueError, match="'steps' must be an integer"):
        GenerationRequest.from_dict({"model": TINY, "prompt": "x", "steps": "many"})


def test_seconds_become_4n_plus_1_frames():
    assert frames_for(4, 16) == 65
    assert frames_for(5, 16) == 81
    assert frames_for(0.1, 16) == 1


def test_values_land_in_the_mapped_inputs(registry):
    request = GenerationRequest(model=TINY, prompt="a fox", negative_prompt="blur", size="96x48", seconds=1,
                                fps=8, steps=3, guidance=2.0, shift=4.0, seed=5)
    prompt = build_prompt(request, registry=registry, filename_prefix="run/x")
    assert _by_title(prompt, "Prompt")["positive"] == "a fox"
    assert _by_title(prompt, "Prompt")["negative"] == "blur"
    assert {k: _by_title(prompt, "Video Size")[k] for k in ("width", "height", "length")} == \
        {"width": 96, "height": 48, "length": 9}
    sampler = _by_title(prompt, "Sampler")
    assert (sampler["steps"], sampler["cfg"], sampler["shift"], sampler["seed"]) == (3, 2.0, 4.0, 5)
    assert _by_title(prompt, "Save Video")["fps"] == 8
    assert _by_title(prompt, "Save Video")["filename_prefix"] == "run/x"
    assert _by_title(prompt, "Load Diffusion Model")["model_name"] == "tiny_wan21_t2v_bf16.safetensors"


def test_model_defaults_fill_what_the_request_leaves_out(registry):
    prompt = build_prompt(GenerationRequest(model=TINY, prompt="x"), registry=registry)
    assert _by_title(prompt, "Video Size")["width"] == 64
    assert _by_title(prompt, "Sampler")["steps"] == 2


def test_width_not_multiple_of_16_is_refused(registry):
    with pytest.raises(InputValueError, match="width 100 is not a multiple of 16"):
        build_prompt(GenerationRequest(model=TINY, prompt="x", width=100), registry=registry)


def test_unknown_model_lists_the_known_ones(registry):
    with pytest.raises(InputValueError, match="unknown model 'sora-2'.*tiny-wan2.1-t2v"):
        build_prompt(GenerationRequest(model="sora-2", prompt="x"), registry=registry)


def test_start_image_on_a_text_to_video_template_is_refused(registry):
    with pytest.raises(InputValueError, match="no place for 'image'"):
        build_prompt(GenerationRequest(model=TINY, prompt="x", image="start.png"), registry=registry)


def test_cache_inserts_the_cache_node_before_the_sampler(registry, tiny_env):
    prompt = build_prompt(GenerationRequest(model=TINY, prompt="x", cache={"warmup_steps": 1}), registry=registry)
    cache_id, cache = next((i, n) for i, n in prompt.items() if n["class_type"] == "WanflowCacheDiT")
    assert _by_title(prompt, "Sampler")["model"] == [cache_id, 0]
    assert cache["inputs"]["model"] == ["1", 0]
    assert cache["inputs"]["warmup_steps"] == 1 and cache["inputs"]["enabled"] is True
    assert validate_prompt(prompt, registry).ok


def test_loras_are_chained_in_request_order(registry):
    loras = (RequestLora("a.safetensors", 0.5), RequestLora("b.safetensors", 1.0, "transformer"))
    prompt = build_prompt(GenerationRequest(model=TINY, prompt="x", loras=loras), registry=registry)
    chain, link = [], _by_title(prompt, "Sampler")["model"]
    while prompt[link[0]]["class_type"] == "WanflowLoRA":
        chain.append(prompt[link[0]]["inputs"]["lora_name"])
        link = prompt[link[0]]["inputs"]["model"]
    assert chain == ["b.safetensors", "a.safetensors"]  # the sampler sees the last one added


def test_image_output_is_one_frame_saved_as_png(registry):
    prompt = build_prompt(GenerationRequest(model=TINY, prompt="x"), registry=registry, output="image")
    assert _by_title(prompt, "Video Size")["length"] == 1
    saver = next(n for n in prompt.values() if n["_meta"]["title"] == "Save Image")
    assert saver["class_type"] == "SaveImage"


def test_yaml_and_json_configs_load_the_same(tmp_path):
    fields = {"model": TINY, "prompt": "a fox", "num_inference_steps": 2, "seed": 3}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(fields))
    (tmp_path / "r.json").write_text(json.dumps(fields))
    assert load_generation_config(tmp_path / "r.yaml") == load_generation_config(tmp_path / "r.json") == fields


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "r.yaml").write_text("model: tiny-wan2.1-t2v\nprompt: from file\nsteps: 4\n")
    request = GenerationRequest.from_dict(load_generation_config(tmp_path / "r.yaml")).with_overrides(
        {"prompt": "from flag", "steps": None}
    )
    assert (request.prompt, request.steps) == ("from flag", 4)


def _frames(result) -> np.ndarray:
    (ui,) = result.outputs.values()
    item = ui["images"][0]
    return read_video_frames(io_dirs.output_dir() / item["subfolder"] / item["filename"]).numpy()


def test_generate_from_flags_and_yaml_matches_the_template_run_by_hand(registry, tiny_env):
    values = {"model": TINY, "prompt": "a red fox", "seed": 7, "num_inference_steps": 2, "size": "64x48",
              "num_frames": 5}
    config = tiny_env / "request.yaml"
    config.write_text(yaml.safe_dump(values))
    from_flags = generate(GenerationRequest.from_dict(values), registry=registry, executor=Executor(registry))
    from_yaml = generate(GenerationRequest.from_dict(load_generation_config(config)), registry=registry,
                         executor=Executor(registry))

    by_hand = load_template("t2v_wan21")
    by_hand["1"]["inputs"]["model_name"] = "tiny_wan21_t2v_bf16.safetensors"
    by_hand["2"]["inputs"]["text_encoder_name"] = "tiny_umt5_bf16.safetensors"
    by_hand["3"]["inputs"]["vae_name"] = "tiny_wan21_vae.safetensors"
    by_hand["4"]["inputs"]["positive"] = "a red fox"
    by_hand["5"]["inputs"].update(width=64, height=48, length=5)
    by_hand["6"]["inputs"].update(seed=7, steps=2, cfg=5.0, shift=5.0)
    by_hand["8"]["inputs"]["fps"] = 8
    manual = Executor(registry).execute(by_hand, prompt_id="by-hand")

    assert from_flags.status == from_yaml.status == manual.status == "success"
    reference = _frames(manual)
    assert reference.shape[0] == 5
    np.testing.assert_array_equal(_frames(from_flags), reference)
    np.testing.assert_array_equal(_frames(from_yaml), reference)
