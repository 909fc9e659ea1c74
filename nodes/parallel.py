"""The multi-GPU node: attaches a parallel config to the model; the sampler then runs the job
on a group of ranks (runtime.parallel) instead of one device."""
from __future__ import annotations

from ..runtime.parallel import ParallelConfig
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode


class WanflowParallelConfig(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowParallelConfig",
        display_name="Wan Multi-GPU (USP)",
        category="wanflow/model",
        description="Samples one video on several GPUs: the video tokens are split over the GPUs "
        "(Ulysses and/or ring attention) and, with cfg_parallel, the cond and uncond passes run at "
        "once on two halves. gpus = ulysses_degree x ring_degree (x 2 with cfg_parallel).",
        inputs=(
            Input("model", "WANFLOW_MODEL"),
            Input("gpus", "INT", default=2, min=1, max=64, tooltip="ranks to run; one GPU each"),
            Input("ulysses_degree", "INT", default=2, min=1, max=64,
                  tooltip="Ulysses sequence parallel: must divide the attention heads (1.3B: 12, 14B: 40)"),
            Input("ring_degree", "INT", default=1, min=1, max=64, tooltip="ring attention (CUDA only)"),
            Input("cfg_parallel", "BOOLEAN", default=False,
                  tooltip="run the cond and uncond passes on two halves of the GPUs at once"),
        ),
        outputs=(Output("WANFLOW_MODEL", "model"),),
    )

    def execute(self, model, gpus: int, ulysses_degree: int, ring_degree: int = 1, cfg_parallel: bool = False):
        config = ParallelConfig(
            gpus=gpus, ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_parallel=cfg_parallel
        ).validate(num_heads=model.transformer.config.num_attention_heads)
        return (model.replace(parallel=config),)


PARALLEL_NODES = {WanflowParallelConfig.SCHEMA.node_id: WanflowParallelConfig}
