"""UMT5 prompt encoding, computed exactly as diffusers' Wan pipelines do.

Text encoders come as ComfyUI single files (HF T5 key names, the sentencepiece tokenizer
embedded as the uint8 tensor `spiece_model`; fp16/bf16/fp8_scaled) or as a diffusers
`text_encoder/` + `tokenizer/` pair.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import ModelFileError
from .offload import onloaded
from .models.detect import block_count, detect_file_kind, ensure_kind
from .models.single_file import SafetensorsHeader, fp8_layout, load_into_empty, load_pretrained, read_header, read_tensors

log = logging.getLogger(__name__)

MAX_LENGTH = 512
SPIECE_KEY = "spiece_model"


class PromptTokenizer(Protocol):
    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each [len(texts), max_length] int64."""


class SentencePieceTokenizer:
    """The tokenizer embedded in a ComfyUI text-encoder file, with the T5 conventions of
    HF's tokenizer (`</s>` appended, padded with `<pad>` to max_length, truncated to keep
    the `</s>`)."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.sp.encode(text)[: max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


class HFTokenizer:
    """A transformers tokenizer called exactly as diffusers' `_get_t5_prompt_embeds` calls it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return out.input_ids, out.attention_mask


@dataclass
class TextEncoder:
    model: torch.nn.Module
    """transformers `UMT5EncoderModel`."""
    tokenizer: PromptTokenizer
    dtype: torch.dtype
    device: torch.device
    max_length: int = MAX_LENGTH
    source: str = ""


@dataclass
class PromptEmbeds:
    positive: torch.Tensor
    """[1, max_length, d_model] float32 on CPU, zero past the prompt's tokens."""
    negative: torch.Tensor | None
    positive_text: str
    negative_text: str


def load_text_encoder(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> TextEncoder:
    """A UMT5 text encoder from a ComfyUI single file, a diffusers pipeline folder, or its
    `text_encoder/` folder (the tokenizer then comes from the sibling `tokenizer/`)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, dtype, device)
    return _load_single_file(path, dtype, device)


def _load_folder(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> TextEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = path if (path / "text_encoder").is_dir() else path.parent
    model, dtype = load_pretrained(UMT5EncoderModel, root / "text_encoder", dtype=dtype, device=device,
                                   what="UMT5 text encoder")
    tokenizer_dir = root / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise ModelFileError(f"{root} has no tokenizer/ folder next to text_encoder/", file=str(root))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return TextEncoder(model=model, tokenizer=HFTokenizer(tokenizer), dtype=dtype,
                       device=torch.device(device), source=str(path))


def _umt5_config(header: SafetensorsHeader):
    from transformers import UMT5Config

    layers = block_count(header.tensors, r"^encoder\.block\.(\d+)\.")
    bias = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    if layers > 1 and bias.format(1) not in header.tensors:
        raise ModelFileError(
            f"{header.name} is a T5 encoder, not UMT5 (relative attention bias only in its first "
            "layer): Wan needs umt5-xxl", file=str(header.path))
    buckets, heads = header.shape(bias.format(0))
    vocab, d_model = header.shape("shared.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in header.tensors
    d_ff = header.shape(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=header.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=d_ff, num_layers=layers, relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def _load_single_file(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> TextEncoder:
    from transformers import UMT5EncoderModel

    header = read_header(path)
    ensure_kind(detect_file_kind(header.tensors), "text_encoder", header.name, file=str(path))
    if SPIECE_KEY not in header.tensors:
        raise ModelFileError(
            f"{header.name} has no embedded tokenizer ('{SPIECE_KEY}'): use ComfyUI's umt5_xxl "
            "files or a diffusers folder", file=str(path), key=SPIECE_KEY)
    layout = fp8_layout(header.tensors)
    names = {k: k for k in header.tensors if k not in layout.aux_keys and k != SPIECE_KEY}
    # ComfyUI's files store the input embedding once, as `shared` (the encoder's is tied to it).
    names.setdefault("encoder.embed_tokens.weight", "shared.weight")
    dtype = dtype or header.float_dtype()
    config = _umt5_config(header)
    model = load_into_empty(header, lambda: UMT5EncoderModel(config), names, dtype=dtype, device=device)
    proto = read_tensors(header, {SPIECE_KEY: SPIECE_KEY}, dtype_for=lambda _: torch.uint8)[SPIECE_KEY]
    tokenizer = SentencePieceTokenizer(proto.numpy().tobytes())
    log.info("loaded text encoder %s (%d layers, d_model %d, %s)", header.name, config.num_layers,
             config.d_model, dtype)
    return TextEncoder(model=model, tokenizer=tokenizer, dtype=dtype, device=torch.device(device),
                       source=str(path))


@torch.no_grad()
def _encode(te: TextEncoder, text: str) -> torch.Tensor:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    ids, mask = te.tokenizer([prompt_clean(text)], te.max_length)
    hidden = te.model(ids.to(te.device), mask.to(te.device)).last_hidden_state.float().cpu()
    # As diffusers: keep the prompt's own tokens (its </s> included), zero the padding.
    length = int(mask.gt(0).sum())
    hidden[:, length:] = 0
    return hidden


def encode_prompts(te: TextEncoder, positive: str, negative: str | None, *, offload: bool = False) -> PromptEmbeds:
    """Prompt embeds as diffusers' `WanPipeline._get_t5_prompt_embeds` computes them (same
    `prompt_clean`, tokenisation, masking and zeroing); `negative` None gives no negative.
    offload: keep the encoder in CPU memory between encodes (UMT5-XXL holds ~11 GB in bf16),
    moving it to its device only while encoding."""
    with onloaded(te.model, te.device) if offload else contextlib.nullcontext():
        return PromptEmbeds(
            positive=_encode(te, positive),
            negative=None if negative is None else _encode(te, negative),
            positive_text=positive,
            negative_text=negative or "",
        )
