"""Tiny random Wan models in the real file formats (smoke-test models, not for real use).

No model hub is reachable from tests, CI or the demo, so every code path that loads real
files is exercised on these: same key names, layouts and dtypes as the real releases,
only the sizes are small. The attention head size stays 128 so the real detection rule
(heads = dim / 128) holds.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Shared by the tiny-model writer and by tests that build a transformer directly.
TINY_TRANSFORMER_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 64,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

TINY_TEXT_ENCODER_CONFIG: dict = {
    "d_model": TINY_TRANSFORMER_CONFIG["text_dim"],
    "num_layers": 2,
    "num_heads": 2,
    "d_kv": 32,
    "d_ff": 128,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
}

# dim_mult, resnets per stage and attention layout stay Wan2.1's: the original-layout key
# names (and diffusers' converter) depend on them. Only the widths shrink.
TINY_VAE_CONFIG: dict = {"base_dim": 8, "z_dim": 16}

SMOKE_TEST_METADATA = {"wanflow": "tiny random smoke-test model, not for real use"}
TINY_VERSION = 1
_STAMP = "wanflow-tiny.json"
_PREFIX = "model.diffusion_model."

# The tokenizer is trained on this at build time (deterministic, ~10 ms) so that the
# embedded `spiece_model` is a real sentencepiece model, as in ComfyUI's umt5 files.
_CORPUS = """\
A cat sits on the mat while the quick brown fox jumps over the lazy dog.
A video of a red car driving along a coastal road at sunset, cinematic lighting.
Blurry, low quality, static, overexposed, worst quality, jpeg artifacts, ugly, deformed.
Two astronauts walk across the surface of the moon while the earth rises slowly.
A drone shot of waves crashing against black volcanic rocks, slow motion, 4k.
Close-up portrait of an old fisherman with a grey beard in soft window light.
A panda eats bamboo in a misty forest; birds sing and leaves fall gently.
Timelapse of clouds moving over snowy mountains at golden hour, high detail.
Children play football in a narrow street in the rain, handheld camera.
A steaming cup of coffee on a wooden table next to an open book and glasses.
Neon signs reflect on wet pavement in a busy city at night, people with umbrellas.
An orange kitten chases a ball of yarn across a sunny living room floor.
A hot air balloon floats above green hills and a winding river in the morning.
A chef slices vegetables quickly in a bright kitchen, steam rising from a pot.
Fireworks explode over a harbor, their colors mirrored in the calm water below.
A horse gallops through a field of tall yellow grass under a stormy sky.
An underwater scene with colorful fish swimming around a coral reef.
A train crosses a stone bridge in the mountains, smoke drifting behind it.
Snow falls softly on a quiet village street lit by warm lamps in the evening.
A robot walks through an abandoned factory, dust floating in beams of light.
A woman in a blue dress dances on a rooftop garden, the skyline behind her.
Static camera, still image, no motion, extra fingers, bad hands, messy background.
Raindrops slide down a window while a candle flickers on the sill inside.
A butterfly lands on a purple flower in a meadow, shallow depth of field.
Autumn leaves swirl in the wind around a bench in an empty park.
"""


@dataclass(frozen=True)
class TinyModelPaths:
    root: Path
    transformer_bf16: Path
    """With the `model.diffusion_model.` prefix, as ComfyUI saves models."""
    transformer_fp16: Path
    """Without a prefix."""
    transformer_fp8_e4m3fn: Path
    transformer_fp8_scaled: Path
    text_encoder: Path
    text_encoder_fp8_scaled: Path
    vae: Path
    diffusers: Path
    """A diffusers WanPipeline folder holding the same weights (bf16)."""


def tiny_model_paths(root: Path) -> TinyModelPaths:
    root = Path(root)
    dm, te = root / "diffusion_models", root / "text_encoders"
    return TinyModelPaths(
        root=root,
        transformer_bf16=dm / "tiny_wan21_t2v_bf16.safetensors",
        transformer_fp16=dm / "tiny_wan21_t2v_fp16.safetensors",
        transformer_fp8_e4m3fn=dm / "tiny_wan21_t2v_fp8_e4m3fn.safetensors",
        transformer_fp8_scaled=dm / "tiny_wan21_t2v_fp8_scaled.safetensors",
        text_encoder=te / "tiny_umt5_bf16.safetensors",
        text_encoder_fp8_scaled=te / "tiny_umt5_fp8_scaled.safetensors",
        vae=root / "vae" / "tiny_wan21_vae.safetensors",
        diffusers=root / "diffusers" / "tiny-wan21-t2v",
    )


def make_tiny_models(root: Path, *, seed: int = 0) -> TinyModelPaths:
    """Write the tiny models under `root` (ComfyUI's models layout); a no-op when a build
    of this version and seed is already there."""
    paths = tiny_model_paths(root)
    stamp = {"version": TINY_VERSION, "seed": seed}
    stamp_file = paths.root / _STAMP
    files = [p for p in vars(paths).values() if p != paths.root]
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and all(p.exists() for p in files):
        return paths
    for p in files:
        p.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        transformer = _write_transformers(paths)
        text_encoder, spiece = _write_text_encoders(paths)
        vae = _write_vae(paths)
    _write_diffusers_folder(paths.diffusers, transformer, text_encoder, spiece, vae)
    stamp_file.write_text(json.dumps(stamp))
    log.info("wrote tiny smoke-test models under %s", paths.root)
    return paths


# --------------------------------------------------------------------------- helpers


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={**(metadata or {}), **SMOKE_TEST_METADATA})


def _bf16_and_fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16, zeroing what fp16 cannot hold exactly (|x| < 2^-14, fp16's smallest
    normal): the bf16 and fp16 files then hold identical values."""
    t = t.to(torch.bfloat16)
    return torch.where(t.abs() < 2.0**-14, torch.zeros_like(t), t)


def _quantized(key: str, t: torch.Tensor, block_prefix: str) -> bool:
    """The tensors ComfyUI's fp8 files store in fp8: linear weights inside the blocks."""
    return key.startswith(block_prefix) and key.endswith(".weight") and t.dim() == 2


def _fp8(tensors: dict[str, torch.Tensor], block_prefix: str, *, scaled: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not _quantized(key, t, block_prefix):
            out[key] = t
            continue
        if not scaled:
            out[key] = t.to(torch.float8_e4m3fn)
            continue
        name = key[: -len(".weight")]
        scale = t.float().abs().max() / torch.finfo(torch.float8_e4m3fn).max
        out[key] = (t.float() / scale).to(torch.float8_e4m3fn)
        out[f"{name}.scale_weight"] = scale.reshape(())
        out[f"{name}.scale_input"] = torch.ones(())
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _write_transformers(paths: TinyModelPaths):
    from diffusers import WanTransformer3DModel

    from .models.single_file import transformer_keys_to_original

    model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    # Assigned, not cast with .to() (which diffusers warns against for its fp32-kept modules):
    # every file and the folder then hold exactly these values.
    model.load_state_dict({k: _bf16_and_fp16_exact(v) for k, v in model.state_dict().items()}, assign=True)
    sd = model.state_dict()
    original = {o: sd[d] for o, d in transformer_keys_to_original(sd).items()}
    _save({_PREFIX + k: v for k, v in original.items()}, paths.transformer_bf16)
    _save({k: v.half() for k, v in original.items()}, paths.transformer_fp16)
    for path, scaled in ((paths.transformer_fp8_e4m3fn, False), (paths.transformer_fp8_scaled, True)):
        quantized = _fp8(original, "blocks.", scaled=scaled)
        # ComfyUI's files prefix the model keys; its fp8_scaled marker sits at the top level.
        _save({(k if k == "scaled_fp8" else _PREFIX + k): v for k, v in quantized.items()}, path)
    return model


def _train_spiece() -> bytes:
    import sentencepiece

    model = io.BytesIO()
    # T5's ids: <pad> 0, </s> 1, <unk> 2, no <s>. Identity normalisation keeps the model
    # small and lets the tokenizers-library copy of it (diffusers folder) tokenise alike.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_writer=model, vocab_size=320,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _write_text_encoders(paths: TinyModelPaths):
    import sentencepiece
    from transformers import UMT5Config, UMT5EncoderModel

    spiece = _train_spiece()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).vocab_size()
    model = UMT5EncoderModel(UMT5Config(vocab_size=vocab, **TINY_TEXT_ENCODER_CONFIG)).eval()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    model.tie_weights()
    # ComfyUI's files store the (tied) input embedding once, as `shared`.
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    tokenizer = {"spiece_model": torch.frombuffer(bytearray(spiece), dtype=torch.uint8)}
    _save({**sd, **tokenizer}, paths.text_encoder)
    _save({**_fp8(sd, "encoder.block.", scaled=True), **tokenizer}, paths.text_encoder_fp8_scaled)
    return model, spiece


def _write_vae(paths: TinyModelPaths):
    from diffusers import AutoencoderKLWan

    from .models.single_file import vae_keys_to_original

    model = AutoencoderKLWan(**TINY_VAE_CONFIG).eval()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    sd = model.state_dict()
    _save({o: sd[d] for o, d in vae_keys_to_original(sd, "wan2.1").items()}, paths.vae)
    return model


def _write_diffusers_folder(folder: Path, transformer, text_encoder, spiece: bytes, vae) -> None:
    import sentencepiece
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from safetensors import safe_open
    from transformers import T5Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    # Built from the pieces and scores directly: transformers' own spiece.model reader needs
    # protobuf, which is not a dependency.
    tokenizer = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())],
                            extra_ids=0)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for path in folder.rglob("*.safetensors"):  # mark the library-written files too
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
        _save(tensors, path, metadata)
