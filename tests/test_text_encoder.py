"""UMT5 loading and prompt encoding: ComfyUI single files (tokenizer embedded as `spiece_model`)
and diffusers folders give what diffusers' Wan pipeline computes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, UMT5EncoderModel

from wanflow.runtime.errors import ModelFileError
from wanflow.runtime.text import MAX_LENGTH, encode_prompts, load_text_encoder

PROMPTS = [
    "A red car drives along a coastal road at sunset.",
    "  two   astronauts walk on the moon &amp; the earth rises  ",
    "Zebras! 1234 über café, 🚀 unknown glyphs",
    "",
]

# Measured: relative L2 error of the fp8_scaled file's embeds vs the bf16 file's, both
# computed in fp32, is 5.0e-2 on the tiny encoder (fp8 keeps 3 mantissa bits); dropped or
# doubled scales give errors of order 1 and more.
FP8_MAX_RELATIVE_ERROR = 0.1


@pytest.fixture(scope="module")
def single_file_te(tiny_models):
    return load_text_encoder(tiny_models.text_encoder, dtype=torch.float32)


@pytest.fixture(scope="module")
def diffusers_pipe_parts(tiny_models):
    """What WanPipeline holds, loaded by transformers alone (independent of wanflow)."""
    folder = tiny_models.diffusers
    return SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32),
    )


@pytest.mark.parametrize("text", PROMPTS)
def test_embedded_spiece_tokenizer_equals_the_folders_tokenizer(single_file_te, tiny_models, text):
    folder_te = load_text_encoder(tiny_models.diffusers, dtype=torch.float32)
    ids, mask = single_file_te.tokenizer([text], MAX_LENGTH)
    folder_ids, folder_mask = folder_te.tokenizer([text], MAX_LENGTH)
    assert torch.equal(ids, folder_ids) and torch.equal(mask, folder_mask)


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_prompts_equals_diffusers_get_t5_prompt_embeds(single_file_te, diffusers_pipe_parts, text):
    with torch.no_grad():  # as inside WanPipeline.__call__
        expected = WanPipeline._get_t5_prompt_embeds(
            diffusers_pipe_parts, prompt=text, max_sequence_length=MAX_LENGTH, device=torch.device("cpu"),
            dtype=torch.float32,
        )
    embeds = encode_prompts(single_file_te, text, None)
    assert embeds.positive.shape == (1, MAX_LENGTH, 64) and embeds.positive.dtype == torch.float32
    assert torch.equal(embeds.positive, expected)


def test_embeds_are_zero_exactly_past_the_prompts_tokens(single_file_te):
    text = PROMPTS[0]
    _, mask = single_file_te.tokenizer([text], MAX_LENGTH)
    length = int(mask.sum())
    embeds = encode_prompts(single_file_te, text, None).positive[0]
    assert 1 < length < MAX_LENGTH
    assert embeds[length:].abs().sum() == 0
    assert (embeds[:length].abs().sum(dim=-1) > 0).all()


def test_different_prompts_give_different_embeds(single_file_te):
    embeds = encode_prompts(single_file_te, PROMPTS[0], PROMPTS[1])
    assert not torch.allclose(embeds.positive, embeds.negative)
    assert (embeds.positive_text, embeds.negative_text) == (PROMPTS[0], PROMPTS[1])


def test_no_negative_prompt_gives_no_negative_embeds(single_file_te):
    assert encode_prompts(single_file_te, PROMPTS[0], None).negative is None


def test_fp8_scaled_file_loads_as_bf16_and_stays_close(tiny_models, single_file_te):
    fp8 = load_text_encoder(tiny_models.text_encoder_fp8_scaled)
    assert fp8.dtype == torch.bfloat16
    fp8_fp32 = load_text_encoder(tiny_models.text_encoder_fp8_scaled, dtype=torch.float32)
    a = encode_prompts(fp8_fp32, PROMPTS[0], None).positive
    b = encode_prompts(single_file_te, PROMPTS[0], None).positive
    assert 0 < ((a - b).norm() / b.norm()).item() <= FP8_MAX_RELATIVE_ERROR


def test_file_without_embedded_tokenizer_is_refused(tiny_models, tmp_path):
    tensors = load_file(str(tiny_models.text_encoder))
    del tensors["spiece_model"]
    path = tmp_path / "umt5_no_tokenizer.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelFileError, match="umt5_no_tokenizer.safetensors has no embedded tokenizer"):
        load_text_encoder(path)


def test_t5_encoder_is_refused_as_not_umt5(tiny_models, tmp_path):
    tensors = load_file(str(tiny_models.text_encoder))
    del tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    path = tmp_path / "t5xxl.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelFileError, match="t5xxl.safetensors is a T5 encoder, not UMT5"):
        load_text_encoder(path)
