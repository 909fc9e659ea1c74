"""The LoRA node: adds one LoRA to the model's stack; chain nodes to stack several."""
from __future__ import annotations

from ..runtime.errors import WanflowError
from ..runtime.lora import MODES, TARGETS, LoraSpec, add_lora
from ..runtime.paths import list_models, resolve_model
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode


class WanflowLoRA(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowLoRA",
        display_name="Wan LoRA",
        category="wanflow/model",
        description="Adds a LoRA (diffusers, ComfyUI/Wan, kohya or lightx2v distill format) to the model. "
        "Chain several to stack them; the whole stack is applied once, from the original weights, "
        "when the model runs.",
        inputs=(
            Input("model", "WANFLOW_MODEL"),
            Input("lora_name", "COMBO", options=lambda: list_models("loras"), tooltip="file in models/loras"),
            Input("strength", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
            Input("target", "COMBO", default="all", options=TARGETS,
                  tooltip="Wan2.2 A14B: transformer = high-noise expert, transformer_2 = low-noise expert"),
            Input("mode", "COMBO", default="merge", options=MODES,
                  tooltip="merge: into the weights (fastest steps); adapter: unmerged peft layers (fast switching)"),
            Input("allow_partial", "BOOLEAN", default=False, optional=True,
                  tooltip="apply a LoRA some of whose keys match nothing in the model (otherwise an error)"),
        ),
        outputs=(Output("WANFLOW_MODEL", "model"),),
    )

    def execute(self, model, lora_name: str, strength: float = 1.0, target: str = "all", mode: str = "merge",
                allow_partial: bool = False):
        try:
            path = resolve_model("loras", lora_name)
            spec = LoraSpec(str(path), strength=strength, target=target, mode=mode, allow_partial=allow_partial)
            return (add_lora(model, spec),)
        except WanflowError as e:
            e.node = e.node or self.SCHEMA.node_id
            e.input_name = e.input_name or "lora_name"
            raise


LORA_NODES = {WanflowLoRA.SCHEMA.node_id: WanflowLoRA}
