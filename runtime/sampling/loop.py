"""The single-device denoising loop: flow matching with CFG and the Wan2.2 expert switch.

Numerically it follows diffusers' WanPipeline (same noise, schedulers, CFG formula and expert
rule, so the same seed gives the same video); the loop is ours because the pipeline cannot
take a ComfyUI-style partial denoise, report progress/previews, or stop on interrupt.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..cache import job_cache
from ..errors import InputValueError
from ..model_setup import prepare_for_sampling
from ..progress import ProgressReporter, current_reporter
from .conditioning import ConditioningInputs, check_conditioning
from .latent_format import denormalize, latent_format, normalize
from .request import SamplingRequest, SamplingResult, StepTrace
from .schedulers import make_scheduler

if TYPE_CHECKING:
    from ..models.wan_model import WanModel

log = logging.getLogger(__name__)

PREVIEW_EVERY = 1
"""Steps between previews. A preview is one small CPU copy of the latent, negligible next to
a transformer step, and ComfyUI users expect one per step."""

_FULL_DENOISE = 0.9999
"""ComfyUI treats denoise above this as 1 (schedule not truncated)."""


@dataclass(frozen=True)
class StepPlan:
    """Which part of a schedule to run: build it for `total` steps, run from `start`."""

    total: int
    start: int

    @property
    def steps(self) -> int:
        return self.total - self.start


def plan_steps(steps: int, denoise: float) -> StepPlan:
    """ComfyUI's partial-denoise rule: a schedule of int(steps / denoise) steps of which only
    the last `steps` run (comfy.samplers.KSampler.set_steps); denoise <= 0 runs nothing."""
    if steps < 1:
        raise InputValueError(f"steps {steps} must be at least 1", input_name="steps")
    if not 0.0 <= denoise <= 1.0:
        raise InputValueError(f"denoise {denoise} must be between 0 and 1", input_name="denoise")
    if denoise > _FULL_DENOISE:
        return StepPlan(total=steps, start=0)
    if denoise <= 0.0:
        return StepPlan(total=0, start=0)
    total = int(steps / denoise)
    return StepPlan(total=total, start=total - steps)


@torch.no_grad()
def sample(
    model: "WanModel",
    request: SamplingRequest,
    reporter: ProgressReporter | None = None,
    *,
    preview_every: int = PREVIEW_EVERY,
) -> SamplingResult:
    """Denoise `request.latent_shape` (or `request.init_latent` when denoise < 1).

    Progress goes to `reporter` (default: the job's current reporter) once per step as
    (step, steps, preview); the preview, every `preview_every` steps and at the last step, is
    the model's current estimate of the clean latent (raw VAE space, CPU), else None.
    An interrupt stops the loop before the next step (JobInterrupted).
    """
    if preview_every < 1:
        raise ValueError(f"preview_every must be at least 1, got {preview_every}")
    reporter = reporter or current_reporter()
    # Transformers are shared between WanModel copies: make them carry this model's LoRA stack,
    # attention kernel, offload and compile (no-ops when they already do) before anything runs.
    model = prepare_for_sampling(model)
    vae_family = model.variant.vae_family
    plan = plan_steps(request.steps, request.denoise)
    _check_request(model, request)
    started = time.perf_counter()
    if plan.steps == 0:
        return SamplingResult(latent=request.init_latent.detach().float().cpu().clone(), stats={"steps": 0})

    device = model.device
    scheduler = make_scheduler(request.scheduler, request.shift)
    scheduler.set_timesteps(plan.total, device=device)
    # Partial denoise starts mid-schedule; the multistep solvers warm up from first order there.
    scheduler.set_begin_index(plan.start)
    timesteps = scheduler.timesteps[plan.start:]
    sigmas = scheduler.sigmas.tolist()

    # CPU generator: the same noise on every device, and the same as diffusers' randn_tensor.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    noise = torch.randn(request.latent_shape, generator=generator, dtype=torch.float32).to(device)
    if plan.start == 0:
        latents = noise
    else:
        # Flow matching: x_sigma = sigma * noise + (1 - sigma) * x0 (ComfyUI's CONST noise scaling).
        x0 = normalize(request.init_latent.to(device, torch.float32), vae_family)
        sigma = sigmas[plan.start]
        latents = sigma * noise + (1.0 - sigma) * x0

    guide = _Guidance(model, request, latents.shape[0], scheduler.config.num_train_timesteps)
    # The cache needs the whole job's shape up front: steps per expert and which use CFG.
    step_experts = [guide.expert_for(t)[0] for t in timesteps]
    expert_steps = [step_experts.count(k) for k in range(len(guide.experts))]
    cfg = [guide.negative is not None and guide.guidance[k] > 1.0 for k in range(len(guide.experts))]
    trace: list[StepTrace] = []
    with job_cache(model, plan.steps, expert_steps=expert_steps, cfg=cfg) as cache_stats:
        for i, t in enumerate(timesteps):
            reporter.raise_if_interrupted()
            step_started = time.perf_counter()
            expert, guidance_scale = guide.expert_for(t)
            velocity = guide.predict(expert, latents, t, guidance_scale)
            preview = None
            if (i + 1) % preview_every == 0 or i + 1 == plan.steps:
                # x0 = x_t - sigma_t * v for a flow prediction v = noise - x0.
                estimate = guide.inputs.finish(latents - sigmas[plan.start + i] * velocity)
                preview = denormalize(estimate, vae_family).cpu()
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            if latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)
            trace.append(StepTrace(index=i, timestep=float(t), expert=expert, guidance_scale=guidance_scale,
                                   seconds=time.perf_counter() - step_started))
            reporter.progress(i + 1, plan.steps, preview)

    elapsed = time.perf_counter() - started
    log.debug("sampled %d steps (%s) in %.2f s", plan.steps, request.scheduler, elapsed)
    stats = {"steps": plan.steps, "seconds": elapsed}
    if cache_stats.enabled:
        stats["cache"] = cache_stats.as_dict()
        stats["cache_summary"] = cache_stats.summary_text()
    latents = guide.inputs.finish(latents)
    return SamplingResult(latent=denormalize(latents, vae_family).cpu(), trace=trace, stats=stats)


class _Guidance:
    """Which expert runs at a timestep, and the CFG-combined velocity it predicts."""

    def __init__(self, model: "WanModel", request: SamplingRequest, batch: int, train_steps: int) -> None:
        self.experts = model.experts()
        self.dtype = model.dtype
        self.positive = _batched(request.positive, batch).to(model.device, model.dtype)
        self.negative = (
            None if request.negative is None else _batched(request.negative, batch).to(model.device, model.dtype)
        )
        self.inputs = ConditioningInputs(model, request.conditioning, batch)
        self.guidance = (request.guidance_scale, _or(request.guidance_scale_2, request.guidance_scale))
        boundary_ratio = _or(request.boundary_ratio, model.variant.boundary_ratio)
        # One loaded expert (e.g. a single Wan2.2 file) runs every step.
        self.boundary = (
            boundary_ratio * train_steps if boundary_ratio is not None and len(self.experts) > 1 else None
        )

    def expert_for(self, t: torch.Tensor) -> tuple[int, float]:
        # Same rule as WanPipeline: the high-noise expert while t >= boundary.
        expert = 0 if self.boundary is None or float(t) >= self.boundary else 1
        return expert, self.guidance[expert]

    def predict(self, expert: int, latents: torch.Tensor, t: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        transformer = self.experts[expert]
        # Image conditioning (I2V channels, TI2V first frames and per-token timesteps, CLIP
        # embeds) is the same for the cond and the uncond pass, as in diffusers.
        hidden = self.inputs.hidden_states(latents, self.dtype)
        timestep = self.inputs.timestep(t, latents)
        image = self.inputs.image_embeds
        cond = transformer(
            hidden_states=hidden, timestep=timestep, encoder_hidden_states=self.positive,
            encoder_hidden_states_image=image, return_dict=False,
        )[0]
        if self.negative is None or guidance_scale <= 1.0:
            return cond.float()
        uncond = transformer(
            hidden_states=hidden, timestep=timestep, encoder_hidden_states=self.negative,
            encoder_hidden_states_image=image, return_dict=False,
        )[0]
        # In float32, so the latent stays float32 between steps whatever the model dtype.
        return uncond.float() + guidance_scale * (cond.float() - uncond.float())


def _or(value: float | None, default: float | None) -> float | None:
    return default if value is None else value


def _batched(embeds: torch.Tensor, batch: int) -> torch.Tensor:
    return embeds.expand(batch, -1, -1) if embeds.shape[0] == 1 else embeds


def _check_request(model: "WanModel", request: SamplingRequest) -> None:
    fmt = latent_format(model.variant.vae_family)
    shape = tuple(request.latent_shape)
    if len(shape) != 5:
        raise InputValueError(f"latent must be [B,C,T,H,W], got shape {shape}", input_name="latent")
    batch, channels, _, height, width = shape
    if channels != fmt.channels:
        raise InputValueError(
            f"latent has {channels} channels but {model.variant.name} uses {fmt.channels} "
            f"({model.variant.vae_family} VAE)",
            input_name="latent",
        )
    if height % 2 or width % 2:
        raise InputValueError(
            f"latent height and width must be even (got {height}x{width}); video width and height "
            f"must be multiples of {fmt.size_multiple}",
            input_name="latent",
        )
    check_conditioning(model, request.conditioning, shape)
    text_dim = model.transformer.config.text_dim
    for name, embeds in (("positive", request.positive), ("negative", request.negative)):
        if embeds is None:
            continue
        if embeds.ndim != 3 or embeds.shape[-1] != text_dim or embeds.shape[0] not in (1, batch):
            raise InputValueError(
                f"{name} prompt embeds have shape {tuple(embeds.shape)}; this model needs "
                f"[1 or {batch}, tokens, {text_dim}] (is the text encoder the model's UMT5?)",
                input_name=name,
            )
    if request.denoise <= _FULL_DENOISE:
        if request.init_latent is None:
            raise InputValueError(
                f"denoise {request.denoise} < 1 needs a latent to start from (init_latent)", input_name="latent"
            )
        if tuple(request.init_latent.shape) != shape:
            raise InputValueError(
                f"init latent has shape {tuple(request.init_latent.shape)}, expected {shape}", input_name="latent"
            )
    if len(model.experts()) > 1 and _or(request.boundary_ratio, model.variant.boundary_ratio) is None:
        raise InputValueError(
            f"{model.variant.name} has two experts but no boundary_ratio to switch between them",
            input_name="model",
        )
