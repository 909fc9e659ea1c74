"""Wan transformer detection and loading: single files (bf16/fp16/fp8/fp8_scaled), diffusers
folders, meta-device construction, and the errors for bad files."""
from __future__ import annotations

import functools
import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from wanflow.runtime.errors import ModelFileError
from wanflow.runtime.models import (
    combine_experts,
    detect_file_kind,
    detect_transformer,
    load_diffusers_folder,
    load_diffusion_model,
    load_shipped_config,
)
from wanflow.runtime.models.detect import ensure_kind
from wanflow.runtime.models.single_file import read_header, transformer_keys_to_original
from wanflow.runtime.models.variants import arch_of, variant_for_config
from wanflow.runtime.text import load_text_encoder
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG
from wanflow.runtime.vae import load_vae

# Measured on the tiny model: relative L2 error of one forward vs the bf16 file is 5.1e-3
# (plain fp8) and 4.8e-3 (fp8_scaled). The bound leaves room for other BLAS builds yet fails
# if scales were dropped or applied twice (errors of order 1).
FP8_MAX_RELATIVE_ERROR = 2e-2


def _original_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Original-layout key shapes of a transformer with `config`, built on the meta device."""
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    sd = model.state_dict()
    return {o: tuple(sd[d].shape) for o, d in transformer_keys_to_original(sd).items()}


def _forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    context = torch.randn(1, 16, TINY_TRANSFORMER_CONFIG["text_dim"], generator=g)
    with torch.no_grad():
        return model.transformer(x, torch.tensor([500.0]), context, return_dict=False)[0].float()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def bf16_output(tiny_models) -> torch.Tensor:
    return _forward(load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32))


# --------------------------------------------------------------------------- detection


def test_tiny_single_file_is_detected_as_a_custom_wan21_t2v(tiny_models):
    header = read_header(tiny_models.transformer_bf16, strip_prefixes=("model.diffusion_model.",))
    variant, config = detect_transformer(header.shapes(), header.name)
    assert (variant.generation, variant.family, variant.released) == ("wan2.1", "t2v", False)
    assert variant.name == "wan2.1-t2v (custom: dim 256, 4 layers)"
    assert arch_of(config) == arch_of({**config, **TINY_TRANSFORMER_CONFIG})


@pytest.mark.parametrize(
    "name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.1-flf2v-14b",
             "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"],
)
def test_each_released_variant_is_detected_from_its_shapes(name):
    shipped = load_shipped_config(name)
    variant, config = detect_transformer(_original_shapes(shipped), f"{name}.safetensors")
    assert variant.name == name
    assert arch_of(config) == arch_of(shipped)


def test_a_single_t2v_14b_expert_reads_as_wan21_and_a_pair_as_wan22_a14b():
    shipped = load_shipped_config("wan2.2-t2v-a14b")
    variant, config = detect_transformer(_original_shapes(shipped), "high_noise.safetensors")
    assert variant.name == "wan2.1-t2v-14b"
    pair = variant_for_config(config, two_experts=True)
    assert (pair.name, pair.boundary_ratio, pair.default_guidance_2) == ("wan2.2-t2v-a14b", 0.875, 3.0)


def test_two_tiny_experts_combine_into_a_wan22_moe(tiny_models):
    high = load_diffusion_model(tiny_models.transformer_bf16)
    low = load_diffusion_model(tiny_models.transformer_fp16)
    moe = combine_experts(high, low)
    assert moe.transformer is high.transformer and moe.transformer_2 is low.transformer
    assert (moe.variant.generation, moe.variant.family, moe.variant.boundary_ratio) == ("wan2.2", "t2v", 0.875)


@pytest.mark.parametrize(
    "attr, kind",
    [("transformer_bf16", "diffusion_model"), ("transformer_fp8_scaled", "diffusion_model"),
     ("text_encoder", "text_encoder"), ("vae", "vae")],
)
def test_file_kind_is_detected_from_keys(tiny_models, attr, kind):
    assert detect_file_kind(read_header(getattr(tiny_models, attr)).tensors) == kind


@pytest.mark.parametrize(
    "keys, kind, message",
    [
        (["vision_model.embeddings.patch_embedding.weight"], "clip_vision",
         "x.safetensors is a CLIP-vision model file, not a diffusion model: load it with the CLIP vision loader"),
        (["diffusion_model.blocks.0.self_attn.q.lora_down.weight"], "lora",
         "x.safetensors is a LoRA file, not a diffusion model: load it with the LoRA loader"),
        (["cond_stage_model.transformer.text_model.embeddings.position_ids"], "unknown",
         "x.safetensors is not a diffusion model file (its keys match no known model kind)"),
    ],
)
def test_other_kinds_are_recognised_and_refused_by_name(keys, kind, message):
    assert detect_file_kind(keys) == kind
    with pytest.raises(ModelFileError, match=f"^{re.escape(message)}$"):
        ensure_kind(kind, "diffusion_model", "x.safetensors")


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("attr", ["transformer_fp16", "diffusers"])
def test_fp16_file_and_diffusers_folder_match_the_bf16_file(tiny_models, bf16_output, attr):
    model = load_diffusion_model(getattr(tiny_models, attr), dtype=torch.float32)
    assert _relative_error(_forward(model), bf16_output) <= 1e-6


@pytest.mark.parametrize("attr", ["transformer_fp8_e4m3fn", "transformer_fp8_scaled"])
def test_fp8_files_stay_close_to_the_bf16_file(tiny_models, bf16_output, attr):
    error = _relative_error(_forward(load_diffusion_model(getattr(tiny_models, attr), dtype=torch.float32)), bf16_output)
    assert 0 < error <= FP8_MAX_RELATIVE_ERROR


@pytest.mark.parametrize(
    "attr, dtype",
    [("transformer_bf16", torch.bfloat16), ("transformer_fp16", torch.float16),
     ("transformer_fp8_scaled", torch.bfloat16)],
)
def test_default_dtype_is_the_files_own_and_bf16_for_fp8(tiny_models, attr, dtype):
    model = load_diffusion_model(getattr(tiny_models, attr))
    assert model.dtype == dtype
    assert model.transformer.blocks[0].attn1.to_q.weight.dtype == dtype


def test_single_file_keeps_the_same_fp32_modules_as_diffusers_from_pretrained(tiny_models):
    single = load_diffusion_model(tiny_models.transformer_bf16).transformer
    folder = load_diffusion_model(tiny_models.diffusers).transformer
    assert {k: v.dtype for k, v in single.state_dict().items()} == {k: v.dtype for k, v in folder.state_dict().items()}
    assert single.scale_shift_table.dtype == torch.float32


def test_single_file_is_built_on_meta_and_fully_materialised(tiny_models, monkeypatch):
    seen: list[set[str]] = []
    original_init = WanTransformer3DModel.__init__

    @functools.wraps(original_init)
    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(WanTransformer3DModel, "__init__", recording_init)
    model = load_diffusion_model(tiny_models.transformer_fp8_scaled)
    assert seen == [{"meta"}]  # constructed once, without allocating weights
    tensors = [*model.transformer.parameters(), *model.transformer.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"}


def test_diffusers_folder_gives_all_components(tiny_models):
    parts = load_diffusers_folder(tiny_models.diffusers, dtype=torch.float32)
    assert parts.model.variant.family == "t2v" and parts.model.transformer_2 is None
    assert parts.vae.family == "wan2.1"
    assert parts.text_encoder.model.config.d_model == TINY_TRANSFORMER_CONFIG["text_dim"]
    assert parts.scheduler_config["flow_shift"] == 3.0


# --------------------------------------------------------------------------- errors


def _edited_copy(src, dst, edit) -> str:
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst))
    return str(dst)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFileError, match="not found: .*nothing.safetensors"):
        load_diffusion_model(tmp_path / "nothing.safetensors")


def test_truncated_file_is_reported(tiny_models, tmp_path):
    data = tiny_models.transformer_bf16.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="cut.safetensors is not a valid .safetensors file"):
        load_diffusion_model(truncated)


def test_non_safetensors_file_is_reported(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("this is not a model")
    with pytest.raises(ModelFileError, match="model.safetensors is not a valid .safetensors file"):
        load_diffusion_model(bogus)


@pytest.mark.parametrize(
    "loader, attr, message",
    [
        (load_diffusion_model, "vae", "is a VAE file, not a diffusion model: load it with the VAE loader"),
        (load_diffusion_model, "text_encoder", "is a text encoder file, not a diffusion model: load it with the text encoder loader"),
        (load_text_encoder, "transformer_bf16", "is a diffusion model file, not a text encoder: load it with the diffusion model loader"),
        (load_text_encoder, "vae", "is a VAE file, not a text encoder: load it with the VAE loader"),
        (load_vae, "transformer_fp16", "is a diffusion model file, not a VAE: load it with the diffusion model loader"),
        (load_vae, "text_encoder", "is a text encoder file, not a VAE: load it with the text encoder loader"),
    ],
)
def test_wrong_kind_of_file_names_the_right_loader(tiny_models, loader, attr, message):
    path = getattr(tiny_models, attr)
    with pytest.raises(ModelFileError, match=f"^{re.escape(path.name)} {re.escape(message)}$"):
        loader(path)


def test_unknown_variant_is_reported(tiny_models, tmp_path):
    def widen_input(t):
        t["model.diffusion_model.patch_embedding.weight"] = torch.zeros(256, 20, 1, 2, 2, dtype=torch.bfloat16)

    path = _edited_copy(tiny_models.transformer_bf16, tmp_path / "odd.safetensors", widen_input)
    with pytest.raises(ModelFileError, match="unknown Wan variant: 20 input channels"):
        load_diffusion_model(path)


def test_file_without_wan_keys_is_an_unknown_variant(tiny_models, tmp_path):
    def drop_head(t):
        del t["model.diffusion_model.patch_embedding.weight"]

    path = _edited_copy(tiny_models.transformer_bf16, tmp_path / "headless.safetensors", drop_head)
    with pytest.raises(ModelFileError, match=r"unknown Wan variant: headless.safetensors has no 'patch_embedding.weight' \(keys: blocks"):
        load_diffusion_model(path)


def test_missing_key_is_named(tiny_models, tmp_path):
    path = _edited_copy(tiny_models.transformer_bf16, tmp_path / "holey.safetensors",
                        lambda t: t.pop("model.diffusion_model.blocks.2.ffn.2.bias"))
    with pytest.raises(ModelFileError, match=r"holey.safetensors is missing 1 key\(s\) .* blocks.2.ffn.net.2.bias"):
        load_diffusion_model(path)


def test_extra_key_is_named(tiny_models, tmp_path):
    def add(t):
        t["model.diffusion_model.blocks.0.mystery.weight"] = torch.zeros(3)

    path = _edited_copy(tiny_models.transformer_bf16, tmp_path / "extra.safetensors", add)
    with pytest.raises(ModelFileError, match=r"extra.safetensors has 1 key\(s\) the model does not use, e.g. blocks.0.mystery.weight"):
        load_diffusion_model(path)


def test_shape_mismatch_names_key_and_both_shapes(tiny_models, tmp_path):
    def squeeze(t):
        t["model.diffusion_model.blocks.1.self_attn.q.weight"] = torch.zeros(256, 255, dtype=torch.bfloat16)

    path = _edited_copy(tiny_models.transformer_bf16, tmp_path / "bent.safetensors", squeeze)
    with pytest.raises(ModelFileError, match=r"tensor 'blocks.1.self_attn.q.weight' has shape \[256, 255\], the model expects \[256, 256\]"):
        load_diffusion_model(path)


def test_folder_of_another_component_is_refused(tiny_models):
    with pytest.raises(ModelFileError, match="holds an AutoencoderKLWan, not a Wan transformer"):
        load_diffusion_model(tiny_models.diffusers / "vae")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_scaled_file_loads_straight_onto_the_gpu(tiny_models, bf16_output):
    model = load_diffusion_model(tiny_models.transformer_fp8_scaled, dtype=torch.float32, device="cuda")
    assert {p.device.type for p in model.transformer.parameters()} == {"cuda"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g).cuda()
    context = torch.randn(1, 16, TINY_TRANSFORMER_CONFIG["text_dim"], generator=g).cuda()
    with torch.no_grad():
        out = model.transformer(x, torch.tensor([500.0], device="cuda"), context, return_dict=False)[0].float().cpu()
    assert _relative_error(out, bf16_output) <= FP8_MAX_RELATIVE_ERROR
