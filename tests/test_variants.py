"""Every Wan variant from its tiny single files: detection, the Wan2.2 A14B expert pair (two
files, a diffusers folder, the loader node), A14B T2V and TI2V-5B text-to-video sampling against
diffusers' WanPipeline, and the sampler node's per-expert settings. CPU, fp32.

Image-to-video sampling (I2V, FLF2V, Wan2.2 I2V A14B, TI2V-5B with an image) is in test_i2v.py.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from wanflow import NODE_CLASS_MAPPINGS
from wanflow.runtime.workflow.executor import split_node_result
from wanflow.runtime import paths
from wanflow.runtime.errors import ModelFileError
from wanflow.runtime.models import combine_experts, load_diffusion_model
from wanflow.runtime.models.detect import detect_transformer
from wanflow.runtime.models.single_file import DIFFUSION_PREFIXES, read_header
from wanflow.runtime.progress import ProgressReporter
from wanflow.runtime.sampling.latent_format import normalize
from wanflow.runtime.sampling.loop import sample
from wanflow.runtime.sampling.request import SamplingRequest, SamplingResult
from wanflow.runtime.sampling.schedulers import make_scheduler
from wanflow.runtime.text import PromptEmbeds
from wanflow.runtime.vae import load_vae

WIDTH, HEIGHT, FRAMES = 64, 64, 9
TEXT_DIM = 64


def call(node_type: str, **kwargs):
    """Run a node the way ComfyUI does; returns its outputs tuple."""
    cls = NODE_CLASS_MAPPINGS[node_type]
    return split_node_result(getattr(cls(), cls.FUNCTION)(**kwargs))[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 12, TEXT_DIM, generator=g), torch.randn(1, 7, TEXT_DIM, generator=g)


def _load(tiny_models, attr: str):
    return load_diffusion_model(getattr(tiny_models, attr), dtype=torch.float32)


def _pair(tiny_models, kind: str):
    return combine_experts(_load(tiny_models, f"{kind}_high_noise"), _load(tiny_models, f"{kind}_low_noise"))


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "attr, generation, family",
    [
        ("transformer_bf16", "wan2.1", "t2v"),
        ("i2v", "wan2.1", "i2v"),
        ("flf2v", "wan2.1", "flf2v"),
        ("ti2v", "wan2.2", "ti2v"),
        ("i2v_high_noise", "wan2.2", "i2v"),  # no CLIP cross-attention: only Wan2.2 I2V is like that
        ("t2v_high_noise", "wan2.1", "t2v"),  # one T2V expert alone cannot be told from Wan2.1 T2V
    ],
)
def test_each_variant_is_detected_from_its_single_file(tiny_models, attr, generation, family):
    header = read_header(getattr(tiny_models, attr), strip_prefixes=DIFFUSION_PREFIXES)
    variant, config = detect_transformer(header.shapes(), header.name)
    assert (variant.generation, variant.family) == (generation, family)
    assert variant.vae_family == ("wan2.2" if family == "ti2v" else "wan2.1")
    assert variant.needs_clip_vision == (generation == "wan2.1" and family in ("i2v", "flf2v"))


def test_flf2v_file_carries_the_image_position_embedding_of_two_images(tiny_models):
    model = _load(tiny_models, "flf2v")
    config = model.transformer.config
    assert config.pos_embed_seq_len == 2 * 17  # two 17-token tiny CLIP images
    assert model.transformer.condition_embedder.image_embedder.pos_embed.abs().sum() > 0


@pytest.mark.parametrize("kind, boundary, guidance_2", [("t2v", 0.875, 3.0), ("i2v", 0.900, 3.5)])
def test_high_and_low_noise_files_pair_into_wan22_a14b(tiny_models, kind, boundary, guidance_2):
    moe = _pair(tiny_models, kind)
    assert (moe.variant.generation, moe.variant.family, moe.variant.is_moe) == ("wan2.2", kind, True)
    assert (moe.variant.boundary_ratio, moe.variant.default_guidance_2) == (boundary, guidance_2)
    assert moe.transformer is not moe.transformer_2


def test_diffusers_a14b_folder_holds_the_same_two_experts(tiny_models):
    folder = load_diffusion_model(tiny_models.diffusers_a14b, dtype=torch.float32)
    files = _pair(tiny_models, "t2v")
    assert (folder.variant.family, folder.variant.boundary_ratio) == ("t2v", 0.875)
    for ours, theirs in ((folder.transformer, files.transformer), (folder.transformer_2, files.transformer_2)):
        reference = theirs.state_dict()
        assert all(torch.equal(t, reference[k]) for k, t in ours.state_dict().items())


def test_a_t2v_and_an_i2v_expert_do_not_pair(tiny_models):
    with pytest.raises(ModelFileError, match="differ in architecture"):
        combine_experts(_load(tiny_models, "t2v_high_noise"), _load(tiny_models, "i2v_low_noise"))


# --------------------------------------------------------------------------- sampling vs diffusers


def _request(embeds, shape, **kw) -> SamplingRequest:
    return SamplingRequest(positive=embeds[0], negative=embeds[1], latent_shape=shape, seed=7, steps=6,
                           guidance_scale=4.0, shift=12.0, **kw)


def _wan_pipeline(model, request: SamplingRequest, vae, **config) -> torch.Tensor:
    """diffusers' WanPipeline on the same transformers: its NORMALIZED final latent."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.model, scheduler=make_scheduler("unipc", request.shift),
                       transformer=model.transformer, transformer_2=model.transformer_2, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=request.positive, negative_prompt_embeds=request.negative, height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
        guidance_scale_2=request.guidance_scale_2, generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent", return_dict=False,
    )[0]


def test_wan22_t2v_a14b_matches_diffusers_and_switches_expert_at_its_boundary(tiny_models, embeds):
    moe = _pair(tiny_models, "t2v")
    request = _request(embeds, (1, 16, 3, 8, 8), guidance_scale_2=2.5)  # boundary: the variant's 0.875
    result = sample(moe, request, ProgressReporter())
    reference = _wan_pipeline(moe, request, load_vae(tiny_models.vae, dtype=torch.float32), boundary_ratio=0.875)
    assert _rel(normalize(result.latent, "wan2.1"), reference) <= 1e-4

    experts = [step.expert for step in result.trace]
    assert experts == [0 if step.timestep >= 875 else 1 for step in result.trace]
    switch = experts.index(1)
    assert 0 < switch and set(experts[switch:]) == {1}  # high-noise first, then low-noise only
    assert [step.guidance_scale for step in result.trace] == [4.0] * switch + [2.5] * (len(experts) - switch)


def test_ti2v_text_to_video_matches_diffusers_per_token_timesteps(tiny_models, embeds):
    model = _load(tiny_models, "ti2v")
    vae = load_vae(tiny_models.vae_wan22, dtype=torch.float32)
    request = _request(embeds, (1, 48, 3, 4, 4))
    result = sample(model, request, ProgressReporter())
    reference = _wan_pipeline(model, request, vae, expand_timesteps=True)
    assert result.latent.shape == (1, 48, 3, HEIGHT // 16, WIDTH // 16)
    assert _rel(normalize(result.latent, "wan2.2"), reference) <= 1e-4


# --------------------------------------------------------------------------- nodes


@pytest.fixture()
def models_dir(tiny_models):
    paths.set_models_dir(tiny_models.root)
    yield tiny_models
    paths.set_models_dir(None)


def test_moe_loader_node_gives_one_model_with_both_experts(models_dir):
    (model,) = call("WanflowMoEModelLoader", high_noise_model=models_dir.i2v_high_noise.name,
                    low_noise_model=models_dir.i2v_low_noise.name, weight_dtype="fp32", device="cpu")
    assert model.variant.is_moe and model.transformer_2 is not None
    assert model.sources == (str(models_dir.i2v_high_noise), str(models_dir.i2v_low_noise))


def test_moe_loader_node_refuses_the_same_file_twice(models_dir):
    name = models_dir.t2v_high_noise.name
    with pytest.raises(ModelFileError, match="both") as info:
        call("WanflowMoEModelLoader", high_noise_model=name, low_noise_model=name, weight_dtype="fp32", device="cpu")
    assert info.value.input_name == "low_noise_model"


@pytest.fixture()
def captured(monkeypatch):
    """The request the sampler node builds, instead of sampling."""
    requests: list[SamplingRequest] = []

    def fake_sample(model, request, reporter):
        requests.append(request)
        return SamplingResult(latent=torch.zeros(request.latent_shape))

    monkeypatch.setattr("wanflow.nodes.sampler.sample", fake_sample)
    return requests


def _sampler(model, embeds, **kw):
    prompt = PromptEmbeds(positive=embeds[0], negative=embeds[1], positive_text="", negative_text="")
    return call("WanflowSampler", model=model, conditioning=prompt, latent={"samples": torch.zeros(1, 16, 3, 8, 8)},
                seed=1, steps=4, cfg=4.0, shift=12.0, **kw)


def test_sampler_node_defaults_cfg_2_and_boundary_to_the_variants(tiny_models, embeds, captured):
    moe = _pair(tiny_models, "t2v")
    _sampler(moe, embeds)
    (request,) = captured
    assert (request.guidance_scale, request.guidance_scale_2) == (4.0, 3.0)
    assert request.boundary_ratio is None  # the loop then takes the variant's 0.875


def test_sampler_node_passes_explicit_cfg_2_and_boundary(tiny_models, embeds, captured):
    _sampler(_pair(tiny_models, "t2v"), embeds, cfg_2=2.0, boundary=0.8)
    (request,) = captured
    assert (request.guidance_scale_2, request.boundary_ratio) == (2.0, 0.8)
