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
TINY_VAE22_CONFIG: dict = {"base_dim": 8, "decoder_base_dim": 16}
"""Over the shipped Wan2.2 VAE config (z_dim 48, x16 spatial): only the widths shrink."""

# A ViT in clip_vision_h's layout (penultimate states feed Wan2.1 I2V): 32 px / 8 px patches
# = 17 tokens of width 128 (two 64-wide heads, which is what wanflow derives for this width).
TINY_CLIP_VISION_CONFIG: dict = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
_CLIP_TOKENS = (TINY_CLIP_VISION_CONFIG["image_size"] // TINY_CLIP_VISION_CONFIG["patch_size"]) ** 2 + 1
_DIM = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]

# The other variants, as the changes to the T2V config that make them what they are (FACTS §2);
# two layers each keep the build and the tests that sample them quick.
_I2V = {"in_channels": 36, "image_dim": TINY_CLIP_VISION_CONFIG["hidden_size"], "added_kv_proj_dim": _DIM}
TINY_VARIANT_CONFIGS: dict[str, dict] = {
    name: {**TINY_TRANSFORMER_CONFIG, "num_layers": 2, **changes}
    for name, changes in {
        "i2v": _I2V,
        "flf2v": {**_I2V, "pos_embed_seq_len": 2 * _CLIP_TOKENS},
        "t2v_high_noise": {},
        "t2v_low_noise": {},
        "i2v_high_noise": {"in_channels": 36},  # Wan2.2 I2V: no CLIP image cross-attention
        "i2v_low_noise": {"in_channels": 36},
        "ti2v": {"in_channels": 48, "out_channels": 48},
    }.items()
}
"""TinyModelPaths attribute -> transformer config."""

# A rank-4 LoRA on the self-attention of the first two T2V blocks: enough to change every
# video it touches, small enough to merge in no time.
TINY_LORA_MODULES = tuple(f"blocks.{b}.self_attn.{p}" for b in (0, 1) for p in ("q", "k", "v", "o"))
TINY_LORA_RANK = 4

SMOKE_TEST_METADATA = {"wanflow": "tiny random smoke-test model, not for real use"}
TINY_VERSION = 3
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
    i2v: Path
    """Wan2.1 I2V (36 input channels, CLIP image cross-attention)."""
    flf2v: Path
    """Wan2.1 FLF2V (I2V + the image position embedding of start and end image)."""
    t2v_high_noise: Path
    t2v_low_noise: Path
    """The two experts of Wan2.2 T2V A14B (each on its own reads as a Wan2.1 T2V)."""
    i2v_high_noise: Path
    i2v_low_noise: Path
    """The two experts of Wan2.2 I2V A14B."""
    ti2v: Path
    """Wan2.2 TI2V-5B (48 channels in and out)."""
    vae_wan22: Path
    """A Wan2.2 VAE (z_dim 48, x16 spatial) in its nested original layout."""
    clip_vision: Path
    """A CLIP vision tower in clip_vision_h's layout (fp16)."""
    diffusers_i2v: Path
    """A diffusers WanImageToVideoPipeline folder: the I2V transformer, image_encoder/ (the
    same CLIP weights) and image_processor/."""
    diffusers_a14b: Path
    """A diffusers Wan2.2 T2V A14B folder: transformer/ and transformer_2/ (the T2V experts)."""
    lora: Path
    """A LoRA for the T2V transformer in ComfyUI's Wan format (`diffusion_model.` keys,
    lora_down / lora_up + alpha)."""


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
        i2v=dm / "tiny_wan21_i2v_bf16.safetensors",
        flf2v=dm / "tiny_wan21_flf2v_bf16.safetensors",
        t2v_high_noise=dm / "tiny_wan22_t2v_high_noise_bf16.safetensors",
        t2v_low_noise=dm / "tiny_wan22_t2v_low_noise_bf16.safetensors",
        i2v_high_noise=dm / "tiny_wan22_i2v_high_noise_bf16.safetensors",
        i2v_low_noise=dm / "tiny_wan22_i2v_low_noise_bf16.safetensors",
        ti2v=dm / "tiny_wan22_ti2v_5b_bf16.safetensors",
        vae_wan22=root / "vae" / "tiny_wan22_vae.safetensors",
        clip_vision=root / "clip_vision" / "tiny_clip_vision_h.safetensors",
        diffusers_i2v=root / "diffusers" / "tiny-wan21-i2v",
        diffusers_a14b=root / "diffusers" / "tiny-wan22-t2v-a14b",
        lora=root / "loras" / "tiny_wan21_t2v_lora.safetensors",
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
        variants = {name: _write_variant(getattr(paths, name), config)
                    for name, config in TINY_VARIANT_CONFIGS.items()}
        _write_vae22(paths)
        clip = _write_clip_vision(paths)
    shared = _shared_components(text_encoder, spiece, vae)
    _write_diffusers_folder(paths.diffusers, transformer=transformer, **shared)
    _write_diffusers_folder(paths.diffusers_i2v, transformer=variants["i2v"], image_encoder=clip.vision_model_only,
                            image_processor=clip.processor, **shared)
    _write_diffusers_folder(paths.diffusers_a14b, transformer=variants["t2v_high_noise"],
                            transformer_2=variants["t2v_low_noise"], boundary_ratio=0.875, **shared)
    _write_lora(paths.lora, seed)
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


def _tiny_transformer(config: dict):
    """A random transformer of `config` in bf16 and its original-layout state dict."""
    from diffusers import WanTransformer3DModel

    from .models.single_file import transformer_keys_to_original

    model = WanTransformer3DModel(**config).eval()
    pos_embed = getattr(model.condition_embedder.image_embedder, "pos_embed", None)
    if pos_embed is not None:  # diffusers starts FLF2V's position embedding at zero
        torch.nn.init.normal_(pos_embed, std=0.02)
    # Assigned, not cast with .to() (which diffusers warns against for its fp32-kept modules):
    # every file and the folder then hold exactly these values.
    model.load_state_dict({k: _bf16_and_fp16_exact(v) for k, v in model.state_dict().items()}, assign=True)
    sd = model.state_dict()
    return model, {o: sd[d] for o, d in transformer_keys_to_original(sd).items()}


def _write_variant(path: Path, config: dict):
    model, original = _tiny_transformer(config)
    _save({_PREFIX + k: v for k, v in original.items()}, path)
    return model


def _write_transformers(paths: TinyModelPaths):
    model, original = _tiny_transformer(TINY_TRANSFORMER_CONFIG)
    _save({_PREFIX + k: v for k, v in original.items()}, paths.transformer_bf16)
    _save({k: v.half() for k, v in original.items()}, paths.transformer_fp16)
    for path, scaled in ((paths.transformer_fp8_e4m3fn, False), (paths.transformer_fp8_scaled, True)):
        quantized = _fp8(original, "blocks.", scaled=scaled)
        # ComfyUI's files prefix the model keys; its fp8_scaled marker sits at the top level.
        _save({(k if k == "scaled_fp8" else _PREFIX + k): v for k, v in quantized.items()}, path)
    return model


def _write_lora(path: Path, seed: int) -> None:
    """The tiny LoRA, from its own generator: the models above stay what earlier versions wrote."""
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for module in TINY_LORA_MODULES:
        # down ~ 1/sqrt(dim) and up ~ 0.1 give a delta about a third of the random weights' size.
        down = torch.randn(TINY_LORA_RANK, _DIM, generator=gen) / _DIM**0.5
        up = torch.randn(_DIM, TINY_LORA_RANK, generator=gen) * 0.1
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down.to(torch.bfloat16)
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up.to(torch.bfloat16)
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(float(TINY_LORA_RANK), dtype=torch.bfloat16)
    _save(tensors, path)


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


def _write_vae22(paths: TinyModelPaths) -> None:
    from diffusers import AutoencoderKLWan

    from .models.single_file import vae_keys_to_original
    from .models.variants import load_shipped_config

    model = AutoencoderKLWan.from_config({**load_shipped_config("vae-wan2.2"), **TINY_VAE22_CONFIG}).eval()
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    _save({o: sd[d] for o, d in vae_keys_to_original(sd, "wan2.2").items()}, paths.vae_wan22)


@dataclass(frozen=True)
class _TinyClip:
    vision_model_only: torch.nn.Module
    """The same weights as transformers' CLIPVisionModel (a diffusers image_encoder)."""
    processor: object


def _write_clip_vision(paths: TinyModelPaths) -> _TinyClip:
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG)
    # With the projection head, as clip_vision_h.safetensors stores it (Wan does not use it).
    full = CLIPVisionModelWithProjection(config).eval()
    sd = {k: v.half() for k, v in full.state_dict().items()}
    _save(sd, paths.clip_vision)
    vision = CLIPVisionModel(config).eval()
    prefix = "vision_model."  # transformers 5's CLIPVisionModel has no such level
    vision.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, assign=True)
    size = config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return _TinyClip(vision_model_only=vision, processor=processor)


def _shared_components(text_encoder, spiece: bytes, vae) -> dict:
    """The pipeline parts every tiny diffusers folder shares."""
    import sentencepiece
    from diffusers import UniPCMultistepScheduler
    from transformers import T5Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    # Built from the pieces and scores directly: transformers' own spiece.model reader needs
    # protobuf, which is not a dependency.
    tokenizer = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())],
                            extra_ids=0)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler}


def _write_diffusers_folder(folder: Path, **components) -> None:
    """A WanPipeline folder, or a WanImageToVideoPipeline one when there is an image encoder."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from safetensors import safe_open

    pipeline = WanImageToVideoPipeline if "image_encoder" in components else WanPipeline
    pipe = pipeline(**components)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for path in folder.rglob("*.safetensors"):  # mark the library-written files too
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
        _save(tensors, path, metadata)
