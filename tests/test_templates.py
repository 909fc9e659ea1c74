"""Generation requests -> workflow templates (`wanflow generate`, the OpenAI shim)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, paths
from wanflow.runtime.demo import write_tiny_images
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.media import read_video_frames
from wanflow.runtime.models import VARIANTS
from wanflow.runtime.workflow.executor import Executor
from wanflow.runtime.workflow.run import output_files
from wanflow.runtime.workflow.templates import (
    MODELS,
    TEMPLATES,
    GenerationRequest,
    RequestLora,
    build_prompt,
    find_node,
    frames_for,
    generate,
    load_generation_config,
    load_template,
    model_entry,
)
from wanflow.runtime.workflow.validate import validate_prompt

TINY = "tiny-wan2.1-t2v"
TINY_MODELS = sorted(m for m in MODELS if m.startswith("tiny-"))
START, END = "wanflow_tiny_start.png", "wanflow_tiny_end.png"
"""The images `write_tiny_images` puts in the input folder."""


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


def test_start_image_on_a_text_to_video_model_is_refused(registry):
    with pytest.raises(InputValueError, match="'tiny-wan2.1-t2v' is text-to-video; remove input_reference") as info:
        build_prompt(GenerationRequest(model=TINY, prompt="x", image="start.png"), registry=registry)
    assert info.value.key == "image"


@pytest.mark.parametrize("model", ["tiny-wan2.1-i2v", "tiny-wan2.2-i2v-a14b", "wan2.1-flf2v-14b-720p"])
def test_an_image_to_video_model_without_a_start_image_is_refused(registry, model):
    with pytest.raises(InputValueError, match=f"'{re.escape(model)}' is [a-z-]+: give it a start image") as info:
        build_prompt(GenerationRequest(model=model, prompt="x"), registry=registry)
    assert info.value.key == "image"


def test_a_first_last_frame_model_without_an_end_image_is_refused(registry):
    with pytest.raises(InputValueError, match="give it an end image too") as info:
        build_prompt(GenerationRequest(model="tiny-wan2.1-flf2v", prompt="x", image=START), registry=registry)
    assert info.value.key == "end_image"


def test_an_end_image_on_a_start_image_model_is_refused(registry):
    with pytest.raises(InputValueError, match="takes no end image"):
        build_prompt(GenerationRequest(model="tiny-wan2.1-i2v", prompt="x", image=START, end_image=END),
                     registry=registry)


def test_the_start_image_lands_in_the_templates_load_image(registry):
    prompt = build_prompt(GenerationRequest.from_dict({"model": "tiny-wan2.1-i2v", "prompt": "x",
                                                       "input_reference": START}), registry=registry)
    assert _by_title(prompt, "Start Image")["image"] == START


def test_ti2v_without_an_image_runs_its_text_to_video_graph(registry):
    model = "tiny-wan2.2-ti2v-5b"
    with_image = build_prompt(GenerationRequest(model=model, prompt="x", image=START), registry=registry)
    text_only = build_prompt(GenerationRequest(model=model, prompt="x"), registry=registry)
    assert _by_title(with_image, "Start Image")["image"] == START
    assert "LoadImage" not in {n["class_type"] for n in text_only.values()}
    assert _by_title(text_only, "Load Diffusion Model")["model_name"] == \
        _by_title(with_image, "Load Diffusion Model")["model_name"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_maps_onto_a_shipped_template(model):
    entry = MODELS[model]
    for name in filter(None, (entry.template, entry.text_template)):
        template, prompt = TEMPLATES[name], load_template(name)
        assert set(entry.files) <= set(template.fields)
        for field_name, (ref, input_name) in template.fields.items():
            node = prompt[find_node(prompt, ref, name)]
            assert input_name in node["inputs"], f"{name}: {field_name} -> {ref}.{input_name}"


@pytest.mark.parametrize("model", ["wan2.2-t2v-a14b", "tiny-wan2.2-i2v-a14b"])
def test_expert_models_get_their_variants_guidance_2_and_boundary(registry, model):
    variant = VARIANTS[model_entry(model).variant]
    prompt = build_prompt(GenerationRequest(model=model, prompt="x", **_images_for(model)), registry=registry)
    sampler = _by_title(prompt, "Sampler")
    assert (sampler["cfg"], sampler["cfg_2"], sampler["boundary"]) == \
        (variant.default_guidance, variant.default_guidance_2, variant.boundary_ratio)


def test_release_defaults_are_the_variants(registry):
    prompt = build_prompt(GenerationRequest(model="wan2.2-ti2v-5b", prompt="x"), registry=registry)
    variant = VARIANTS["wan2.2-ti2v-5b"]
    size = _by_title(prompt, "Video Size")
    assert (size["width"], size["height"], size["length"]) == \
        (variant.default_width, variant.default_height, variant.default_frames)
    assert _by_title(prompt, "Sampler")["steps"] == variant.default_steps
    assert _by_title(prompt, "Save Video")["fps"] == variant.default_fps


def test_hugging_face_names_are_aliases_in_any_case():
    assert model_entry("Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers") is MODELS["wan2.1-flf2v-14b-720p"]
    assert model_entry("Wan-AI/Wan2.2-I2V-A14B-Diffusers") is MODELS["wan2.2-i2v-a14b"]


def test_ti2v_sizes_must_be_multiples_of_32(registry):
    with pytest.raises(InputValueError, match="width 48 is not a multiple of 32"):
        build_prompt(GenerationRequest(model="tiny-wan2.2-ti2v-5b", prompt="x", width=48), registry=registry)


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


def _images_for(model: str) -> dict[str, str]:
    """The images the tiny model's template takes."""
    fields = TEMPLATES[MODELS[model].template].fields
    return {k: v for k, v in (("image", START), ("end_image", END)) if k in fields}


@pytest.mark.parametrize("model", TINY_MODELS)
def test_every_tiny_model_generates_a_video(registry, tiny_env, model):
    write_tiny_images(io_dirs.input_dir())
    request = GenerationRequest(model=model, prompt="a red fox", seed=3, **_images_for(model))
    result = generate(request, registry=registry, executor=Executor(registry))
    assert result.status == "success", result.error
    defaults = MODELS[model].defaults
    assert _frames(result).shape[:3] == (defaults["num_frames"], defaults["height"], defaults["width"])


def test_ti2v_generates_a_video_from_text_alone(registry, tiny_env):
    result = generate(GenerationRequest(model="tiny-wan2.2-ti2v-5b", prompt="a red fox", seed=3), registry=registry,
                      executor=Executor(registry))
    assert result.status == "success", result.error
    assert _frames(result).shape[0] == MODELS["tiny-wan2.2-ti2v-5b"].defaults["num_frames"]


def _frames(result) -> np.ndarray:
    (video,) = output_files(result)
    return read_video_frames(video).numpy()


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
