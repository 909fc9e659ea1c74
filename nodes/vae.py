"""VAE decode: LATENT -> IMAGE (frames stacked on the batch axis, ComfyUI's video convention)."""
from __future__ import annotations

from ..runtime import vae as vae_runtime
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode


class WanflowVAEDecode(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowVAEDecode",
        display_name="Wan VAE Decode",
        category="wanflow/latent",
        description="Decodes a Wan video latent into frames (IMAGE, one per frame).",
        inputs=(
            Input("vae", "WANFLOW_VAE"),
            Input("samples", "LATENT"),
            Input("tiled", "BOOLEAN", default=False, optional=True,
                  tooltip="decode in spatial tiles: ~5x less VRAM at 480p, about twice the time"),
        ),
        outputs=(Output("IMAGE", "images"),),
    )

    def execute(self, vae, samples, tiled: bool = False):
        return (vae_runtime.decode(vae, samples["samples"], tiled=tiled),)


VAE_NODES = {WanflowVAEDecode.SCHEMA.node_id: WanflowVAEDecode}
