"""Image-to-video on the tiny models in their real formats: CLIP vision (ComfyUI file, diffusers
folder), the conditioning (frame mask, resize), sampling against diffusers'
WanImageToVideoPipeline for Wan2.1 I2V, FLF2V, Wan2.2 I2V A14B and TI2V-5B, the validation
messages, and the nodes. CPU, fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from wanflow import NODE_CLASS_MAPPINGS
from wanflow.runtime.workflow.executor import split_node_result
from wanflow.runtime import paths
from wanflow.runtime.errors import InputValueError, ModelFileError
from wanflow.runtime.models import combine_experts, load_diffusion_model
from wanflow.runtime.models.detect import detect_file_kind
from wanflow.runtime.models.single_file import read_header
from wanflow.runtime.progress import ProgressReporter
from wanflow.runtime.sampling.conditioning import (
    CLIP_EMBEDS,
    IMAGE_LATENT,
    IMAGE_MASK,
    fit_image,
    image_to_video,
)
from wanflow.runtime.sampling.latent_format import normalize
from wanflow.runtime.sampling.loop import sample
from wanflow.runtime.sampling.request import SamplingRequest
from wanflow.runtime.sampling.schedulers import make_scheduler
from wanflow.runtime.text import PromptEmbeds
from wanflow.runtime.vae import load_vae
from wanflow.runtime.vision import ClipVisionOutput, encode_images, load_clip_vision

WIDTH, HEIGHT, FRAMES = 64, 48, 9
TI2V_HEIGHT = 96  # multiples of 32 for the Wan2.2 VAE
CLIP_TOKENS, CLIP_WIDTH = 17, 128  # tiny ViT: 32 px / 8 px patches + class token
F32 = torch.float32


def call(node_type: str, **kwargs):
    """Run a node the way ComfyUI does; returns its outputs tuple."""
    cls = NODE_CLASS_MAPPINGS[node_type]
    return split_node_result(getattr(cls(), cls.FUNCTION)(**kwargs))[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _picture(seed: int, width: int = WIDTH, height: int = HEIGHT) -> tuple[Image.Image, torch.Tensor]:
    """A random picture as PIL (diffusers' input) and as a ComfyUI IMAGE [1, H, W, 3]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels), torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def pictures():
    return _picture(1), _picture(2)


@pytest.fixture(scope="module")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 12, 64, generator=g), torch.randn(1, 7, 64, generator=g)


@pytest.fixture(scope="module")
def clip(tiny_models):
    return load_clip_vision(tiny_models.clip_vision, dtype=F32)


@pytest.fixture(scope="module")
def vae(tiny_models):
    return load_vae(tiny_models.vae, dtype=F32)


@pytest.fixture(scope="module")
def vae22(tiny_models):
    return load_vae(tiny_models.vae_wan22, dtype=F32)


@pytest.fixture(scope="module")
def models(tiny_models):
    load = lambda attr: load_diffusion_model(getattr(tiny_models, attr), dtype=F32)  # noqa: E731
    return {
        "t2v": load("transformer_bf16"),
        "i2v": load("i2v"),
        "flf2v": load("flf2v"),
        "i2v_a14b": combine_experts(load("i2v_high_noise"), load("i2v_low_noise")),
        "ti2v": load("ti2v"),
    }


# --------------------------------------------------------------------------- CLIP vision


def test_clip_vision_file_is_recognised_as_such(tiny_models):
    assert detect_file_kind(read_header(tiny_models.clip_vision).tensors) == "clip_vision"


def test_clip_vision_gives_penultimate_states_of_each_image(clip, pictures):
    images = torch.cat([pictures[0][1], pictures[1][1]])
    out = encode_images(clip, images)
    assert out.penultimate_hidden_states.shape == (2, CLIP_TOKENS, CLIP_WIDTH)
    assert out.image_count == 2


def test_clip_vision_file_and_diffusers_folder_match_diffusers_encode_image(tiny_models, clip, pictures):
    folder = load_clip_vision(tiny_models.diffusers_i2v, dtype=F32)
    pil, image = pictures[0]
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                   image_processor=folder.processor, image_encoder=folder.model)
    reference = pipe.encode_image(pil, torch.device("cpu"))
    assert torch.equal(encode_images(folder, image).penultimate_hidden_states, reference)
    assert torch.allclose(encode_images(clip, image).penultimate_hidden_states, reference, atol=1e-5)


def test_clip_vision_crop_none_stretches_instead_of_cropping(clip):
    _, wide = _picture(3, width=96, height=32)
    center = encode_images(clip, wide, "center").penultimate_hidden_states
    stretched = encode_images(clip, wide, "none").penultimate_hidden_states
    assert center.shape == stretched.shape and not torch.allclose(center, stretched)


def test_clip_vision_loader_names_the_right_loader_for_other_files(tiny_models):
    with pytest.raises(ModelFileError, match="diffusion model file, not a CLIP-vision model"):
        load_clip_vision(tiny_models.i2v)


# --------------------------------------------------------------------------- conditioning


def test_i2v_mask_marks_the_first_frame_as_a_whole_latent_frame(vae, pictures):
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1])
    mask = cond[IMAGE_MASK]
    assert cond[IMAGE_LATENT].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert mask.shape == (1, 4, 3, HEIGHT // 8, WIDTH // 8)
    assert mask[0, :, 0].eq(1).all() and mask[0, :, 1:].eq(0).all()


def test_flf2v_mask_also_marks_the_last_video_frame(vae, pictures):
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1], end_image=pictures[1][1])
    per_frame = cond[IMAGE_MASK][0, :, :, 0, 0]  # [4 video frames, latent frames]
    assert per_frame[:, 0].eq(1).all() and per_frame[:, 1].eq(0).all()
    assert per_frame[:, 2].tolist() == [0, 0, 0, 1]  # the video's last frame is the 4th of the last latent frame


def test_clip_embeds_of_start_and_end_are_one_sequence(vae, clip, pictures):
    start, end = (encode_images(clip, p[1]) for p in pictures)
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1], clip_vision_start=start,
                          clip_vision_end=end)
    assert torch.equal(cond[CLIP_EMBEDS], torch.cat([start.penultimate_hidden_states,
                                                     end.penultimate_hidden_states], dim=1))


def test_ti2v_conditioning_is_the_start_frame_latent(vae22, pictures):
    _, image = _picture(4, height=TI2V_HEIGHT)
    cond = image_to_video(vae22, WIDTH, TI2V_HEIGHT, FRAMES, start_image=image)
    assert cond[IMAGE_LATENT].shape == (1, 48, 1, TI2V_HEIGHT // 16, WIDTH // 16)
    assert cond[IMAGE_MASK][0, 0, :, 0, 0].tolist() == [1, 0, 0]


def test_images_of_another_size_are_scaled_and_center_cropped():
    image = torch.zeros(1, 40, 80, 3)
    image[:, :, 20:60] = 1.0  # a white centre square, black left and right
    fitted = fit_image(image, 32, 32, "start_image")
    assert fitted.shape == (1, 32, 32, 3)
    assert fitted[:, :, 2:-2].min() > 0.99  # the crop kept the centre


# --------------------------------------------------------------------------- sampling vs diffusers


def _request(embeds, latent_shape, conditioning, **kw) -> SamplingRequest:
    return SamplingRequest(positive=embeds[0], negative=embeds[1], latent_shape=latent_shape, seed=3, steps=6,
                           guidance_scale=4.0, shift=5.0, conditioning=conditioning, **kw)


def _i2v_pipeline(model, vae, clip, request: SamplingRequest, height: int, **call_kw) -> torch.Tensor:
    """diffusers' WanImageToVideoPipeline on the same weights: its NORMALIZED final latent."""
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae.model, scheduler=make_scheduler("unipc", request.shift),
        image_processor=clip.processor if clip else None, image_encoder=clip.model if clip else None,
        transformer=model.transformer, transformer_2=model.transformer_2,
        boundary_ratio=model.variant.boundary_ratio if model.transformer_2 is not None else None,
        expand_timesteps=model.variant.family == "ti2v",
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=request.positive, negative_prompt_embeds=request.negative, height=height, width=WIDTH,
        num_frames=FRAMES, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
        guidance_scale_2=request.guidance_scale_2, generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent", return_dict=False, **call_kw,
    )[0]


def test_wan21_i2v_matches_diffusers(models, vae, clip, embeds, pictures):
    (pil, image), _ = pictures
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=image, clip_vision_start=encode_images(clip, image))
    request = _request(embeds, (1, 16, 3, HEIGHT // 8, WIDTH // 8), cond)
    ours = sample(models["i2v"], request, ProgressReporter()).latent
    reference = _i2v_pipeline(models["i2v"], vae, clip, request, HEIGHT, image=pil)
    assert _rel(normalize(ours, "wan2.1"), reference) <= 1e-4


def test_wan21_flf2v_matches_diffusers(models, vae, clip, embeds, pictures):
    (pil_start, start), (pil_end, end) = pictures
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=start, end_image=end,
                          clip_vision_start=encode_images(clip, start), clip_vision_end=encode_images(clip, end))
    request = _request(embeds, (1, 16, 3, HEIGHT // 8, WIDTH // 8), cond)
    ours = sample(models["flf2v"], request, ProgressReporter()).latent
    reference = _i2v_pipeline(models["flf2v"], vae, clip, request, HEIGHT, image=pil_start, last_image=pil_end)
    assert _rel(normalize(ours, "wan2.1"), reference) <= 1e-4


def test_wan22_i2v_a14b_matches_diffusers_and_switches_expert_at_0_9(models, vae, embeds, pictures):
    (pil, image), _ = pictures
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=image)
    request = _request(embeds, (1, 16, 3, HEIGHT // 8, WIDTH // 8), cond, guidance_scale_2=2.0)
    result = sample(models["i2v_a14b"], request, ProgressReporter())
    reference = _i2v_pipeline(models["i2v_a14b"], vae, None, request, HEIGHT, image=pil)
    assert _rel(normalize(result.latent, "wan2.1"), reference) <= 1e-4

    experts = [step.expert for step in result.trace]
    assert experts == [0 if step.timestep >= 900 else 1 for step in result.trace]
    assert 0 < experts.index(1) and set(experts[experts.index(1):]) == {1}


def test_ti2v_image_to_video_matches_diffusers_and_keeps_the_first_frame(models, vae22, embeds):
    pil, image = _picture(4, height=TI2V_HEIGHT)
    cond = image_to_video(vae22, WIDTH, TI2V_HEIGHT, FRAMES, start_image=image)
    request = _request(embeds, (1, 48, 3, TI2V_HEIGHT // 16, WIDTH // 16), cond)
    ours = sample(models["ti2v"], request, ProgressReporter()).latent
    reference = _i2v_pipeline(models["ti2v"], vae22, None, request, TI2V_HEIGHT, image=pil)
    assert _rel(normalize(ours, "wan2.2"), reference) <= 1e-4
    assert torch.allclose(ours[:, :, :1], cond[IMAGE_LATENT], atol=1e-5)


# --------------------------------------------------------------------------- validation


def _sample_errors(model, embeds, latent_shape, conditioning) -> InputValueError:
    with pytest.raises(InputValueError) as info:
        sample(model, _request(embeds, latent_shape, conditioning), ProgressReporter())
    return info.value


def test_width_off_the_vae_grid_is_rejected_with_its_value(vae, pictures):
    with pytest.raises(InputValueError, match="width 500 is not a multiple of 16") as info:
        image_to_video(vae, 500, HEIGHT, FRAMES, start_image=pictures[0][1])
    assert info.value.input_name == "width"


def test_ti2v_sizes_must_be_multiples_of_32(vae22, pictures):
    with pytest.raises(InputValueError, match="height 48 is not a multiple of 32"):
        image_to_video(vae22, WIDTH, 48, FRAMES, start_image=pictures[0][1])


def test_start_and_end_frames_must_fit_in_the_video(vae):
    frames = torch.rand(5, HEIGHT, WIDTH, 3)
    with pytest.raises(InputValueError, match=r"\(5 frames\) .* \(5 frames\) do not fit in a 9-frame video"):
        image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=frames, end_image=frames)


def test_an_image_is_required(vae):
    with pytest.raises(InputValueError, match="connect a start_image") as info:
        image_to_video(vae, WIDTH, HEIGHT, FRAMES)
    assert info.value.input_name == "start_image"


def test_clip_vision_output_of_several_images_is_refused(vae, pictures):
    two = ClipVisionOutput(torch.zeros(2, CLIP_TOKENS, CLIP_WIDTH))
    with pytest.raises(InputValueError, match="clip_vision_start_image holds 2 images") as info:
        image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1], clip_vision_start=two)
    assert info.value.input_name == "clip_vision_start_image"


def test_ti2v_refuses_an_end_image(vae22):
    image = torch.rand(1, TI2V_HEIGHT, WIDTH, 3)
    with pytest.raises(InputValueError, match="remove the end_image"):
        image_to_video(vae22, WIDTH, TI2V_HEIGHT, FRAMES, start_image=image, end_image=image)


def test_t2v_model_with_a_start_image_names_the_mismatch(models, vae, embeds, pictures):
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1])
    error = _sample_errors(models["t2v"], embeds, (1, 16, 3, 6, 8), cond)
    assert "this is a T2V model" in error.message
    assert "connect an I2V model or remove the start image" in error.message
    assert error.input_name == "conditioning"


@pytest.mark.parametrize("name", ["i2v", "flf2v", "i2v_a14b"])
def test_i2v_model_without_an_image_asks_for_the_image_to_video_node(models, embeds, name):
    error = _sample_errors(models[name], embeds, (1, 16, 3, 6, 8), {})
    assert "image-to-video model" in error.message and "Wan Image To Video" in error.message


def test_wan21_i2v_without_clip_vision_asks_for_it(models, vae, embeds, pictures):
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1])
    error = _sample_errors(models["i2v"], embeds, (1, 16, 3, 6, 8), cond)
    assert "needs CLIP vision embeds" in error.message and "clip_vision_start_image" in error.message


def test_flf2v_with_only_the_start_clip_asks_for_the_end_image(models, vae, clip, embeds, pictures):
    image = pictures[0][1]
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=image, clip_vision_start=encode_images(clip, image))
    error = _sample_errors(models["flf2v"], embeds, (1, 16, 3, 6, 8), cond)
    assert "both the start and the end image" in error.message


def test_conditioning_from_the_other_vae_is_named(models, vae22, embeds):
    cond = image_to_video(vae22, WIDTH, TI2V_HEIGHT, FRAMES, start_image=torch.rand(1, TI2V_HEIGHT, WIDTH, 3))
    error = _sample_errors(models["i2v_a14b"], embeds, (1, 16, 3, TI2V_HEIGHT // 8, WIDTH // 8), cond)
    assert "wan2.1 VAE" in error.message


def test_conditioning_for_another_video_size_is_refused(models, vae, embeds, pictures):
    cond = image_to_video(vae, WIDTH, HEIGHT, FRAMES, start_image=pictures[0][1])
    error = _sample_errors(models["i2v_a14b"], embeds, (1, 16, 3, 8, 8), cond)
    assert "does not fit the latent" in error.message


# --------------------------------------------------------------------------- nodes


@pytest.fixture()
def models_dir(tiny_models):
    paths.set_models_dir(tiny_models.root)
    yield tiny_models
    paths.set_models_dir(None)


def _prompt(embeds) -> PromptEmbeds:
    return PromptEmbeds(positive=embeds[0], negative=embeds[1], positive_text="a", negative_text="b")


def test_nodes_run_wan21_i2v_from_files_to_latent(models_dir, embeds):
    (clip_vision,) = call("WanflowCLIPVisionLoader", clip_name=models_dir.clip_vision.name, weight_dtype="fp32",
                          device="cpu")
    (model,) = call("WanflowModelLoader", model_name=models_dir.i2v.name, weight_dtype="fp32", device="cpu")
    (vae,) = call("WanflowVAELoader", vae_name=models_dir.vae.name, weight_dtype="fp32", device="cpu")
    _, image = _picture(5, width=80, height=72)  # resized to the video's size by the node
    (clip_out,) = call("WanflowCLIPVisionEncode", clip_vision=clip_vision, image=image, crop="center")
    conditioning, latent = call("WanflowImageToVideo", conditioning=_prompt(embeds), vae=vae, width=WIDTH,
                                height=HEIGHT, length=FRAMES, batch_size=1, start_image=image,
                                clip_vision_start_image=clip_out)
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(conditioning.positive, embeds[0])
    (out,) = call("WanflowSampler", model=model, conditioning=conditioning, latent=latent, seed=1, steps=2, cfg=4.0,
                  shift=3.0)
    assert out["samples"].shape == latent["samples"].shape and out["samples"].abs().sum() > 0


def test_empty_latent_node_takes_the_layout_of_a_connected_wan22_vae(vae22):
    (latent,) = call("WanflowEmptyLatentVideo", width=WIDTH, height=TI2V_HEIGHT, length=FRAMES, batch_size=2, vae=vae22)
    assert latent["samples"].shape == (2, 48, 3, TI2V_HEIGHT // 16, WIDTH // 16)


def test_image_to_video_node_gives_the_wan22_latent_for_ti2v(vae22, embeds):
    image = torch.rand(1, TI2V_HEIGHT, WIDTH, 3)
    conditioning, latent = call("WanflowImageToVideo", conditioning=_prompt(embeds), vae=vae22, width=WIDTH,
                                height=TI2V_HEIGHT, length=FRAMES, batch_size=1, start_image=image)
    assert latent["samples"].shape == (1, 48, 3, TI2V_HEIGHT // 16, WIDTH // 16)
    assert conditioning.image[IMAGE_LATENT].shape[1] == 48
