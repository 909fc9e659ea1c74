"""Image conditioning of Wan's image-to-video variants: built once from images (the
image-to-video node), checked against the model and turned into transformer inputs at every
step (the sampling loop).

Two styles; the VAE that encodes the images fixes which one a conditioning has, the model
which one it needs:
- concat (Wan2.1 I2V / FLF2V, Wan2.2 I2V A14B; Wan2.1 VAE): the video of the given frames,
  gray elsewhere, is VAE-encoded; a 4-channel frame mask and that latent (normalized) are
  concatenated to the noisy latent's channels (16 + 4 + 16 = the model's 36 inputs).
- first frames (Wan2.2 TI2V-5B; Wan2.2 VAE): the given frames' latent replaces the leading
  latent frames before every step and after the last one, and their tokens get timestep 0.
Both follow diffusers' `WanImageToVideoPipeline` (prepare_latents, expand_timesteps), which the
tests compare against.

The conditioning is a plain dict of CPU tensors (`SamplingRequest.conditioning`), so it
pickles to parallel workers like the rest of the request.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import InputValueError
from ..text import PromptEmbeds
from ..vae import WanVAE, encode
from .latent_format import latent_format, normalize, validate_video_size

if TYPE_CHECKING:
    from ..models.wan_model import WanModel
    from ..vision import ClipVisionOutput

log = logging.getLogger(__name__)

IMAGE_LATENT = "image_latent"
"""Raw VAE latent [1, C, T', h, w] of the given frames (concat: the whole video, T' = T)."""
IMAGE_MASK = "image_mask"
"""1 where frames are given, else 0. concat: [1, 4, T, h, w] (the 4 video frames behind each
latent frame, Wan's layout); first frames: [1, 1, T, h, w] per latent frame."""
CLIP_EMBEDS = "clip_embeds"
"""[1, tokens, width]: CLIP-vision penultimate states of the start (then end) image."""

_GRAY = 0.5
"""Frames not given are mid-gray (0 in the VAE's -1..1 range), as in Wan and ComfyUI."""


@dataclass
class ImagePromptEmbeds(PromptEmbeds):
    """The prompt embeds with an image conditioning attached (what an image-to-video node
    passes on to the sampler)."""

    image: dict[str, torch.Tensor] = field(default_factory=dict)


def with_image(prompt: PromptEmbeds, image: dict[str, torch.Tensor]) -> ImagePromptEmbeds:
    """`prompt` carrying `image` (replacing any image conditioning it had)."""
    fields = {f.name: getattr(prompt, f.name) for f in dataclasses.fields(PromptEmbeds)}
    return ImagePromptEmbeds(**fields, image=image)


def image_of(prompt: PromptEmbeds) -> dict[str, torch.Tensor]:
    """The image conditioning `prompt` carries; empty for plain prompt embeds."""
    return prompt.image if isinstance(prompt, ImagePromptEmbeds) else {}


# --------------------------------------------------------------------------- building


def fit_image(images: torch.Tensor, width: int, height: int, input_name: str) -> torch.Tensor:
    """IMAGE [N, H, W, C] scaled (bilinear) and center-cropped to width x height, keeping the
    aspect ratio, like ComfyUI's `common_upscale(..., "center")`."""
    if images.dim() != 4 or images.shape[-1] < 3 or images.shape[0] < 1:
        raise InputValueError(f"{input_name} of shape {list(images.shape)} is not an IMAGE [N, H, W, 3]",
                              input_name=input_name)
    images = images[..., :3].float().cpu()
    in_h, in_w = images.shape[1:3]
    if (in_h, in_w) == (height, width):
        return images
    log.info("%s: %dx%d resized and center-cropped to %dx%d", input_name, in_w, in_h, width, height)
    scale = max(width / in_w, height / in_h)
    new_h, new_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    resized = F.interpolate(images.movedim(-1, 1), size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[:, :, top:top + height, left:left + width].movedim(1, -1).clamp(0, 1)


def _latent_frame_mask(given: torch.Tensor, temporal: int) -> torch.Tensor:
    """Per-video-frame mask [F] -> [temporal, T]: the first frame stands for a whole latent
    frame (repeated), the others go `temporal` to a latent frame."""
    padded = torch.cat([given[:1].repeat(temporal), given[1:]])
    return padded.view(-1, temporal).transpose(0, 1)


def _clip_embeds(start: ClipVisionOutput | None, end: ClipVisionOutput | None) -> torch.Tensor | None:
    parts = []
    for name, output in (("clip_vision_start_image", start), ("clip_vision_end_image", end)):
        if output is None:
            continue
        if output.image_count != 1:
            raise InputValueError(
                f"{name} holds {output.image_count} images; encode exactly one image with CLIP Vision Encode",
                input_name=name)
        parts.append(output.penultimate_hidden_states)
    # One sequence, start tokens then end tokens (FLF2V's image position embedding spans both).
    return torch.cat(parts, dim=1) if parts else None


def image_to_video(
    vae: WanVAE,
    width: int,
    height: int,
    length: int,
    *,
    start_image: torch.Tensor | None = None,
    end_image: torch.Tensor | None = None,
    clip_vision_start: ClipVisionOutput | None = None,
    clip_vision_end: ClipVisionOutput | None = None,
) -> dict[str, torch.Tensor]:
    """The conditioning of a `length`-frame video at width x height starting with the frames of
    `start_image` and/or ending with those of `end_image` (IMAGEs, resized to fit), encoded by
    `vae` (its family fixes the style, see the module doc)."""
    validate_video_size(width, height, length, vae.family)
    if start_image is None and end_image is None:
        raise InputValueError(
            "connect a start_image (and/or an end_image); for text-to-video use Wan Empty Latent Video",
            input_name="start_image")
    fmt = latent_format(vae.family)
    start = None if start_image is None else fit_image(start_image, width, height, "start_image")
    end = None if end_image is None else fit_image(end_image, width, height, "end_image")
    n_start = 0 if start is None else start.shape[0]
    n_end = 0 if end is None else end.shape[0]
    if n_start + n_end > length:
        raise InputValueError(
            f"start_image ({n_start} frames) and end_image ({n_end} frames) do not fit in a {length}-frame video",
            input_name="end_image" if n_end else "start_image")
    frames = (length - 1) // fmt.temporal + 1
    lat_h, lat_w = height // fmt.spatial, width // fmt.spatial
    if vae.family == "wan2.2":
        latent, mask = _first_frames(vae, start, n_end, frames, fmt.temporal)
    else:
        video = torch.full((length, height, width, 3), _GRAY)
        given = torch.zeros(length)
        if start is not None:
            video[:n_start], given[:n_start] = start, 1.0
        if end is not None:
            video[length - n_end:], given[length - n_end:] = end, 1.0
        latent = encode(vae, video)
        mask = _latent_frame_mask(given, fmt.temporal)[None, :, :, None, None].expand(1, -1, -1, lat_h, lat_w)
    conditioning = {IMAGE_LATENT: latent, IMAGE_MASK: mask.contiguous()}
    clip = _clip_embeds(clip_vision_start, clip_vision_end)
    if clip is not None:
        conditioning[CLIP_EMBEDS] = clip
    return conditioning


def _first_frames(vae: WanVAE, start: torch.Tensor, n_end: int, frames: int, temporal: int):
    if n_end:
        raise InputValueError("Wan2.2 TI2V-5B continues a start image only; remove the end_image",
                              input_name="end_image")
    n_start = start.shape[0]
    if (n_start - 1) % temporal:
        raise InputValueError(
            f"start_image has {n_start} frames; with the Wan2.2 VAE give {temporal}n+1 frames (1, 5, 9, ...)",
            input_name="start_image")
    latent = encode(vae, start)
    mask = torch.zeros(1, 1, frames, *latent.shape[-2:])
    mask[:, :, : latent.shape[2]] = 1.0
    return latent, mask


# --------------------------------------------------------------------------- checking


def conditioning_style(model: WanModel) -> str | None:
    """"concat" | "first_frames" | None (T2V: no image conditioning)."""
    return {"i2v": "concat", "flf2v": "concat", "ti2v": "first_frames"}.get(model.variant.family)


def check_conditioning(model: WanModel, conditioning: dict, latent_shape: tuple[int, ...]) -> None:
    """Raise InputValueError (input "conditioning") when the conditioning and the model do not
    go together; the latent's own shape is already checked."""
    name = model.variant.name
    style = conditioning_style(model)
    if style is None:
        if conditioning:
            raise InputValueError(
                f"this is a T2V model ({name}) and takes no image conditioning: connect an I2V model "
                "or remove the start image", input_name="conditioning")
        return
    if not conditioning:
        if style == "concat":
            raise InputValueError(
                f"this is an image-to-video model ({name}): connect a Wan Image To Video node with a start "
                "image between the prompt and the sampler", input_name="conditioning")
        return  # TI2V without an image is text-to-video
    missing = [k for k in (IMAGE_LATENT, IMAGE_MASK) if k not in conditioning]
    if missing:
        raise InputValueError(f"image conditioning lacks {', '.join(missing)}", input_name="conditioning")
    _check_image_latent(model, conditioning, latent_shape, style)
    _check_clip(model, conditioning.get(CLIP_EMBEDS))


def _check_image_latent(model: WanModel, conditioning: dict, latent_shape: tuple[int, ...], style: str) -> None:
    name, vae_family = model.variant.name, model.variant.vae_family
    latent, mask = conditioning[IMAGE_LATENT], conditioning[IMAGE_MASK]
    channels = latent_format(vae_family).channels
    if latent.dim() != 5 or latent.shape[1] != channels:
        raise InputValueError(
            f"the image conditioning has latent shape {list(latent.shape)}; {name} needs images encoded by the "
            f"{vae_family} VAE ({channels} channels): connect that VAE to the Image To Video node",
            input_name="conditioning")
    frames, size = latent_shape[2], tuple(latent_shape[3:])
    mask_channels = 1 if style == "first_frames" else model.transformer.config.in_channels - 2 * channels
    wanted_latent_frames = latent.shape[2] <= frames if style == "first_frames" else latent.shape[2] == frames
    if (tuple(latent.shape[3:]) != size or not wanted_latent_frames
            or tuple(mask.shape) != (1, mask_channels, frames, *size)):
        raise InputValueError(
            f"the image conditioning (latent {list(latent.shape)}, mask {list(mask.shape)}) does not fit the "
            f"latent {list(latent_shape)}: sample the latent the Image To Video node outputs",
            input_name="conditioning")


def _check_clip(model: WanModel, clip: torch.Tensor | None) -> None:
    config = model.transformer.config
    if config.image_dim is None:
        return  # Wan2.2 I2V / TI2V have no image cross-attention: CLIP embeds are not used
    name = model.variant.name
    if clip is None:
        raise InputValueError(
            f"{name} needs CLIP vision embeds of the start image: load clip_vision_h with CLIP Vision Loader, "
            "encode the image with CLIP Vision Encode and connect it to clip_vision_start_image",
            input_name="conditioning")
    if clip.dim() != 3 or clip.shape[0] != 1 or clip.shape[-1] != config.image_dim:
        raise InputValueError(
            f"CLIP vision embeds of shape {list(clip.shape)} do not fit {name}, which takes width "
            f"{config.image_dim} (clip_vision_h)", input_name="conditioning")
    if config.pos_embed_seq_len and clip.shape[1] != config.pos_embed_seq_len:
        raise InputValueError(
            f"{name} (first-last-frame) needs CLIP vision embeds of both the start and the end image "
            f"({config.pos_embed_seq_len} tokens); got {clip.shape[1]}: connect clip_vision_end_image",
            input_name="conditioning")


# --------------------------------------------------------------------------- per step


class ConditioningInputs:
    """One job's conditioning as transformer inputs, prepared once on the model's device."""

    def __init__(self, model: WanModel, conditioning: dict, batch: int) -> None:
        self.style = conditioning_style(model)
        device = model.device
        self.image_embeds = None
        self.concat = self.keep = self.given = None
        self.patch = tuple(model.transformer.config.patch_size)
        if self.style is None or not conditioning:
            return
        latent = normalize(conditioning[IMAGE_LATENT].to(device, torch.float32), model.variant.vae_family)
        mask = conditioning[IMAGE_MASK].to(device, torch.float32)
        if self.style == "concat":
            self.concat = torch.cat([mask, latent], dim=1).expand(batch, -1, -1, -1, -1)
        else:
            # diffusers' `first_frame_mask`: 1 where the model denoises, 0 on the given frames.
            self.keep = 1.0 - mask
            self.given = torch.zeros(1, latent.shape[1], *mask.shape[2:], device=device)
            self.given[:, :, : latent.shape[2]] = latent
        clip = conditioning.get(CLIP_EMBEDS)
        config = model.transformer.config
        if clip is not None and config.image_dim is not None:
            if config.pos_embed_seq_len:
                # diffusers' FLF2V embedder takes the two images as consecutive batch rows and
                # joins each pair itself: [2 * batch, tokens per image, width].
                clip = clip.reshape(-1, config.pos_embed_seq_len // 2, clip.shape[-1]).repeat(batch, 1, 1)
            else:
                clip = clip.expand(batch, -1, -1)
            self.image_embeds = clip.to(device, model.dtype)

    def hidden_states(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.concat is not None:
            return torch.cat([latents, self.concat], dim=1).to(dtype)
        return self.finish(latents).to(dtype)

    def timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        batch = latents.shape[0]
        if self.style != "first_frames":
            return t.expand(batch)
        # TI2V always takes one timestep per token (diffusers' expand_timesteps), 0 on given frames.
        keep = self.keep if self.keep is not None else torch.ones(1, 1, *latents.shape[2:], device=latents.device)
        _, p_h, p_w = self.patch
        return (keep[0][0][:, ::p_h, ::p_w] * t).flatten().unsqueeze(0).expand(batch, -1)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent with the given frames put back (first-frames style), else unchanged."""
        if self.keep is None:
            return latents
        return (1 - self.keep) * self.given + self.keep * latents
