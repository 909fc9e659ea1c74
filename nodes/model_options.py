"""Speed / memory options for a loaded model: attention kernel, regional compile, offload."""
from __future__ import annotations

from ..runtime.attention import BACKENDS
from ..runtime.fp8_linear import LINEAR_MODES
from ..runtime.model_setup import MODEL_OFFLOAD_MODES
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode


class WanflowModelOptions(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowModelOptions",
        display_name="Wan Speed / Memory Options",
        category="wanflow/model",
        description="How the diffusion model runs: attention kernel (auto: INT8/FP8 attention on Hopper, "
                    "SDPA elsewhere), torch.compile of the repeated blocks, and block streaming from CPU memory.",
        inputs=(
            Input("model", "WANFLOW_MODEL"),
            Input("attention", "COMBO", default="auto", options=BACKENDS,
                  tooltip="auto picks per GPU; sdpa is PyTorch's default; int8/fp8 are wanflow's quantized kernels (Hopper)"),
            Input("compile", "BOOLEAN", default=False, tooltip="regional torch.compile (CUDA; ~30 s warm-up on the first job)"),
            Input("offload", "COMBO", default="none", options=MODEL_OFFLOAD_MODES,
                  tooltip="block: keep one block at a time on the GPU (14B in ~10 GiB); leaf: one layer at a time"),
            Input("linear", "COMBO", default="bf16", options=LINEAR_MODES, optional=True,
                  tooltip="fp8: FP8 linear layers (Hopper/Ada; ~10% faster at 14B, less memory, slightly less "
                          "accurate; not with LoRAs; stays until the model is loaded again)"),
        ),
        outputs=(Output("WANFLOW_MODEL", "model"),),
    )

    def execute(self, model, attention: str = "auto", compile: bool = False, offload: str = "none",  # noqa: A002
                linear: str = "bf16"):
        return (model.replace(attention=attention, compile=compile, offload=offload, linear=linear),)


MODEL_OPTION_NODES = {WanflowModelOptions.SCHEMA.node_id: WanflowModelOptions}
