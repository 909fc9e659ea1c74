"""The sampling loop: equivalence with diffusers' WanPipeline, schedulers, partial denoise,
progress / interrupt, latent formats and previews. CPU, fp32, tiny random transformers."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from wanflow.runtime.errors import InputValueError, JobInterrupted
from wanflow.runtime.models.variants import VARIANTS
from wanflow.runtime.models.wan_model import WanModel
from wanflow.runtime.progress import ProgressReporter, reporting
from wanflow.runtime.sampling.latent_format import (
    LATENT_FORMATS,
    denormalize,
    latent_shape,
    normalize,
    validate_video_size,
)
from wanflow.runtime.sampling.loop import sample
from wanflow.runtime.sampling.preview import latent_preview_rgb
from wanflow.runtime.sampling.request import SamplingRequest
from wanflow.runtime.sampling.schedulers import make_scheduler
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG

SHAPE = (1, 16, 3, 8, 8)  # raw latent of a 64x64, 9-frame video (Wan2.1 VAE)
BOUNDARY = 0.875


def _tiny_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0.0, 0.05)
    return transformer.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def experts() -> tuple[WanTransformer3DModel, WanTransformer3DModel]:
    return _tiny_transformer(0), _tiny_transformer(1)


@pytest.fixture(scope="session")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    text_dim = TINY_TRANSFORMER_CONFIG["text_dim"]
    return torch.randn(1, 12, text_dim, generator=g), torch.randn(1, 7, text_dim, generator=g)


@pytest.fixture(scope="session")
def model(experts) -> WanModel:
    return WanModel(
        transformer=experts[0], variant=VARIANTS["wan2.1-t2v-1.3b"], dtype=torch.float32, device=torch.device("cpu")
    )


@pytest.fixture(scope="session")
def moe_model(experts) -> WanModel:
    return WanModel(
        transformer=experts[0],
        transformer_2=experts[1],
        variant=VARIANTS["wan2.2-t2v-a14b"],
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


@pytest.fixture()
def request_(embeds) -> SamplingRequest:
    return SamplingRequest(
        positive=embeds[0], negative=embeds[1], latent_shape=SHAPE, seed=42, steps=6, guidance_scale=4.0, shift=5.0
    )


def _run(model: WanModel, request: SamplingRequest, **kw):
    return sample(model, request, ProgressReporter(), **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _pipeline_latent(experts, embeds, request: SamplingRequest, two_experts: bool) -> torch.Tensor:
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        scheduler=make_scheduler("unipc", request.shift),
        transformer=experts[0],
        transformer_2=experts[1] if two_experts else None,
        boundary_ratio=BOUNDARY if two_experts else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        guidance_scale_2=request.guidance_scale_2,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent",
        return_dict=False,
    )[0]


# --- equivalence with diffusers ------------------------------------------------------------


def test_unipc_matches_diffusers_wan_pipeline(model, experts, embeds, request_):
    ours = _run(model, request_).latent
    reference = _pipeline_latent(experts, embeds, request_, two_experts=False)  # normalized latent
    assert ours.shape == reference.shape == SHAPE
    assert _rel(normalize(ours, "wan2.1"), reference) <= 1e-4


def test_two_experts_match_diffusers_pipeline_and_switch_at_boundary(moe_model, experts, embeds, request_):
    request = dataclasses.replace(request_, guidance_scale_2=2.5, boundary_ratio=BOUNDARY)
    result = _run(moe_model, request)
    reference = _pipeline_latent(experts, embeds, request, two_experts=True)
    assert _rel(normalize(result.latent, "wan2.1"), reference) <= 1e-4

    experts_used = [step.expert for step in result.trace]
    assert experts_used == [0 if step.timestep >= BOUNDARY * 1000 else 1 for step in result.trace]
    assert 0 < experts_used.count(0) < len(experts_used)
    assert [step.guidance_scale for step in result.trace] == [4.0 if e == 0 else 2.5 for e in experts_used]


def test_two_experts_take_the_boundary_from_the_variant_when_the_request_has_none(moe_model, request_):
    trace = _run(moe_model, request_).trace
    assert [s.expert for s in trace] == [0 if s.timestep >= VARIANTS["wan2.2-t2v-a14b"].boundary_ratio * 1000 else 1 for s in trace]
    assert {s.expert for s in trace} == {0, 1}


def test_guidance_at_most_one_skips_the_negative_pass(model, request_, embeds):
    no_cfg = _run(model, dataclasses.replace(request_, guidance_scale=1.0)).latent
    other_negative = dataclasses.replace(request_, guidance_scale=1.0, negative=embeds[1] + 1.0)
    assert torch.equal(no_cfg, _run(model, other_negative).latent)
    assert torch.equal(no_cfg, _run(model, dataclasses.replace(request_, negative=None)).latent)


# --- schedulers and seeds ------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_other_schedulers_run_and_differ_from_unipc(model, request_, scheduler):
    unipc = _run(model, request_).latent
    other = _run(model, dataclasses.replace(request_, scheduler=scheduler)).latent
    assert torch.isfinite(other).all()
    assert _rel(other, unipc) > 1e-3


def test_same_seed_gives_the_same_latent(model, request_):
    assert torch.equal(_run(model, request_).latent, _run(model, request_).latent)


def test_different_seed_gives_a_different_latent(model, request_):
    other = _run(model, dataclasses.replace(request_, seed=43)).latent
    assert _rel(other, _run(model, request_).latent) > 0.1


def test_unknown_scheduler_is_an_input_error():
    with pytest.raises(InputValueError, match="unknown scheduler 'ddim'") as info:
        make_scheduler("ddim", 5.0)
    assert info.value.input_name == "scheduler"


# --- partial denoise -----------------------------------------------------------------------


def _init_latent() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))


def test_partial_denoise_runs_the_last_steps_of_a_longer_schedule(model, request_):
    request = dataclasses.replace(request_, steps=3, denoise=0.5, init_latent=_init_latent())
    seen = []
    result = sample(model, request, ProgressReporter(on_progress=lambda v, n, p: seen.append((v, n))))
    full = make_scheduler("unipc", request.shift)
    full.set_timesteps(6)
    assert [s.timestep for s in result.trace] == full.timesteps[3:].tolist()
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_tiny_denoise_stays_close_to_the_init_latent(model, request_):
    init = _init_latent()
    kept = _run(model, dataclasses.replace(request_, steps=2, denoise=0.0001, init_latent=init)).latent
    redone = _run(model, dataclasses.replace(request_, steps=2, denoise=1.0, init_latent=init)).latent
    assert _rel(kept, init) < 0.05  # UniPC flow sigmas stop at ~shift/1000, not 0
    assert _rel(redone, init) > 0.5


def test_denoise_zero_returns_the_init_latent_unchanged(model, request_):
    init = _init_latent()
    result = _run(model, dataclasses.replace(request_, denoise=0.0, init_latent=init))
    assert torch.equal(result.latent, init) and result.trace == []


def test_partial_denoise_without_init_latent_is_an_input_error(model, request_):
    with pytest.raises(InputValueError, match="needs a latent to start from"):
        _run(model, dataclasses.replace(request_, denoise=0.5))


# --- progress, previews, interrupt ---------------------------------------------------------


def test_progress_is_reported_once_per_step_with_a_raw_preview(model, request_):
    calls = []
    sample(model, request_, ProgressReporter(on_progress=lambda v, n, p: calls.append((v, n, p))))
    assert [(v, n) for v, n, _ in calls] == [(i, 6) for i in range(1, 7)]
    assert all(p is not None and p.shape == SHAPE and p.device.type == "cpu" for _, _, p in calls)


def test_without_a_reporter_progress_goes_to_the_jobs_current_reporter(model, request_):
    calls = []
    with reporting(ProgressReporter(on_progress=lambda v, n, p: calls.append(v))):
        sample(model, dataclasses.replace(request_, steps=2))
    assert calls == [1, 2]


def test_previews_come_every_preview_every_steps_and_at_the_end(model, request_):
    request = dataclasses.replace(request_, steps=5)
    with_preview = []
    sample(
        model,
        request,
        ProgressReporter(on_progress=lambda v, n, p: with_preview.append(v) if p is not None else None),
        preview_every=2,
    )
    assert with_preview == [2, 4, 5]


def test_last_preview_is_close_to_the_result(model, request_):
    previews = []
    result = sample(model, request_, ProgressReporter(on_progress=lambda v, n, p: previews.append(p)))
    assert _rel(previews[-1], result.latent) < 0.05


def test_interrupt_stops_before_the_next_step(model, request_):
    reporter = ProgressReporter()
    steps_done = []

    def on_progress(value, total, preview):
        steps_done.append(value)
        if value == 2:
            reporter.interrupt_event.set()

    reporter.on_progress = on_progress
    with pytest.raises(JobInterrupted):
        sample(model, request_, reporter)
    assert steps_done == [1, 2]


# --- request validation --------------------------------------------------------------------


def test_image_conditioning_is_refused_until_supported(model, request_):
    request = dataclasses.replace(request_, conditioning={"image_latent": torch.zeros(1)})
    with pytest.raises(InputValueError, match="image conditioning") as info:
        _run(model, request)
    assert info.value.input_name == "conditioning"


def test_latent_with_the_wrong_channel_count_is_an_input_error(model, request_):
    with pytest.raises(InputValueError, match="48 channels") as info:
        _run(model, dataclasses.replace(request_, latent_shape=(1, 48, 3, 8, 8)))
    assert info.value.input_name == "latent"


def test_prompt_embeds_of_the_wrong_width_are_an_input_error(model, request_):
    with pytest.raises(InputValueError, match="positive prompt embeds") as info:
        _run(model, dataclasses.replace(request_, positive=torch.zeros(1, 5, 4096)))
    assert info.value.input_name == "positive"


# --- latent formats ------------------------------------------------------------------------


def test_wan21_statistics_are_diffusers_vae_defaults():
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(LATENT_FORMATS["wan2.1"].mean) == defaults["latents_mean"].default
    assert list(LATENT_FORMATS["wan2.1"].std) == defaults["latents_std"].default


def test_normalize_and_denormalize_are_inverse():
    raw = torch.randn(2, 48, 2, 4, 4)
    assert torch.allclose(denormalize(normalize(raw, "wan2.2"), "wan2.2"), raw, atol=1e-5)


def test_normalize_maps_the_vae_mean_and_std_to_zero_and_one():
    fmt = LATENT_FORMATS["wan2.1"]
    raw = torch.tensor(fmt.mean).view(1, 16, 1, 1, 1) + torch.tensor(fmt.std).view(1, 16, 1, 1, 1)
    assert torch.allclose(normalize(raw, "wan2.1"), torch.ones(1, 16, 1, 1, 1), atol=1e-6)


@pytest.mark.parametrize(
    ("size", "family", "expected"),
    [
        ((832, 480, 81, 1), "wan2.1", (1, 16, 21, 60, 104)),
        ((1280, 704, 121, 2), "wan2.2", (2, 48, 31, 44, 80)),
    ],
)
def test_latent_shape_follows_the_vae_strides(size, family, expected):
    assert latent_shape(*size, family) == expected


@pytest.mark.parametrize(
    ("size", "family", "message", "input_name"),
    [
        ((500, 480, 81), "wan2.1", "width 500 is not a multiple of 16", "width"),
        ((848, 480, 81), "wan2.2", "width 848 is not a multiple of 32", "width"),
        ((832, 472, 81), "wan2.1", "height 472 is not a multiple of 16", "height"),
        ((832, 480, 80), "wan2.1", r"length 80 must be 4n\+1 \(e.g. 77 or 81\)", "length"),
    ],
)
def test_video_sizes_the_model_cannot_use_are_named(size, family, message, input_name):
    with pytest.raises(InputValueError, match=message) as info:
        validate_video_size(*size, family)
    assert info.value.input_name == input_name


# --- previews ------------------------------------------------------------------------------


def _two_region_latent() -> torch.Tensor:
    """Left and right halves hold two different channel vectors (plus a little noise)."""
    g = torch.Generator().manual_seed(3)
    latent = 0.05 * torch.randn(1, 16, 2, 8, 12, generator=g)
    latent[..., :6] += torch.randn(16, generator=g).view(1, 16, 1, 1, 1)
    latent[..., 6:] += torch.randn(16, generator=g).view(1, 16, 1, 1, 1)
    return latent


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).float()


def test_preview_is_an_rgb_image_at_latent_resolution():
    image = latent_preview_rgb(_two_region_latent())
    assert image.mode == "RGB" and image.size == (12, 8)


def test_preview_shows_the_latent_structure():
    pixels = _pixels(latent_preview_rgb(_two_region_latent()))
    left, right = pixels[:, :6], pixels[:, 6:]
    between = (left.mean((0, 1)) - right.mean((0, 1))).abs().max()
    within = max(left.std((0, 1)).max(), right.std((0, 1)).max())
    assert between > 4 * within


def test_preview_does_not_depend_on_latent_normalization():
    latent = _two_region_latent()
    raw = _pixels(latent_preview_rgb(latent))
    normalized = _pixels(latent_preview_rgb(normalize(latent, "wan2.1")))
    assert (raw - normalized).abs().max() <= 1  # rounding only
