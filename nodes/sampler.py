"""The sampler node: one node for one GPU or many (the model's parallel config decides)."""
from __future__ import annotations

from ..runtime.parallel import sample_parallel
from ..runtime.sampling.conditioning import image_of
from ..runtime.sampling.loop import sample
from ..runtime.sampling.request import SCHEDULERS, SamplingRequest
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode
from ._comfy import node_progress


AUTO_CFG_2 = -1.0
AUTO_BOUNDARY = 0.0
"""Widget values meaning "the model variant's default" (a widget cannot hold None)."""


class WanflowSampler(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowSampler",
        display_name="Wan Sampler",
        category="wanflow/sampling",
        description="Denoises a video latent with the Wan model (flow matching, CFG).",
        inputs=(
            Input("model", "WANFLOW_MODEL"),
            Input("conditioning", "WANFLOW_CONDITIONING"),
            Input("latent", "LATENT"),
            Input("seed", "INT", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
            Input("steps", "INT", default=30, min=1, max=200),
            Input("cfg", "FLOAT", default=5.0, min=0.0, max=30.0, step=0.1, tooltip="classifier-free guidance; <= 1 skips the negative pass"),
            Input("shift", "FLOAT", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="flow shift (Wan: 5.0; 8-12 suggested for 1.3B at 480p)"),
            Input("scheduler", "COMBO", default="unipc", options=SCHEDULERS),
            Input("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
            Input("cfg_2", "FLOAT", default=AUTO_CFG_2, min=AUTO_CFG_2, max=30.0, step=0.1, optional=True,
                  tooltip="Wan2.2 A14B: guidance of the low-noise expert (cfg is the high-noise one's); "
                          "-1: the model's default (T2V 3.0, I2V 3.5)"),
            Input("boundary", "FLOAT", default=AUTO_BOUNDARY, min=0.0, max=1.0, step=0.005, optional=True,
                  tooltip="Wan2.2 A14B: the high-noise expert runs while t >= boundary x 1000; "
                          "0: the model's (T2V 0.875, I2V 0.900)"),
        ),
        outputs=(Output("LATENT", "latent"),),
    )

    def execute(self, model, conditioning, latent, seed: int, steps: int, cfg: float, shift: float,
                scheduler: str = "unipc", denoise: float = 1.0, cfg_2: float = AUTO_CFG_2,
                boundary: float = AUTO_BOUNDARY):
        samples = latent["samples"]
        request = SamplingRequest(
            positive=conditioning.positive,
            negative=conditioning.negative,
            latent_shape=tuple(samples.shape),
            seed=seed,
            steps=steps,
            guidance_scale=cfg,
            shift=shift,
            scheduler=scheduler,
            denoise=denoise,
            init_latent=samples if denoise < 1.0 else None,
            guidance_scale_2=model.variant.default_guidance_2 if cfg_2 < 0 else cfg_2,
            boundary_ratio=None if boundary <= 0 else boundary,  # None: the model's own
            conditioning=image_of(conditioning),
        )
        run = sample_parallel if model.parallel is not None else sample
        with node_progress() as reporter:
            result = run(model, request, reporter)
        out = dict(latent)
        out["samples"] = result.latent
        # Step timings and cache statistics travel in the node's UI output: ComfyUI shows the
        # text, and the CLI (--perf-dump) and server job results report the rest.
        ui = {"sampling": [{**{k: v for k, v in result.stats.items() if k != "cache_summary"},
                            "step_seconds": [round(s.seconds, 4) for s in result.trace]}]}
        if "cache_summary" in result.stats:
            ui["text"] = [result.stats["cache_summary"]]
        return {"ui": ui, "result": (out,)}


SAMPLER_NODES = {WanflowSampler.SCHEMA.node_id: WanflowSampler}
