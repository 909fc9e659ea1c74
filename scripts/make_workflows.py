"""Writes the saved workflows in workflows/ (UI format + API twin) from one graph description.

Generating both formats from the node schemas keeps them in step with the nodes: a widget
added to a node shows up in the saved files the next time this runs.
Usage: python -m wanflow.scripts.make_workflows [OUT_DIR]
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nodes import NODE_CLASS_MAPPINGS
from ..nodes.standins import STANDIN_NODES
from ..runtime.schema import NodeSchema


@dataclass
class GraphNode:
    id: int
    type: str
    title: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    """input name -> (source node id, output slot)."""


def _schema(node_type: str) -> NodeSchema:
    # ComfyUI core nodes the graphs use (LoadImage) are declared by the headless stand-ins.
    return {**STANDIN_NODES, **NODE_CLASS_MAPPINGS}[node_type].SCHEMA


def to_api(nodes: list[GraphNode]) -> dict[str, Any]:
    prompt = {}
    for n in nodes:
        inputs: dict[str, Any] = {}
        for inp in _schema(n.type).inputs:
            if inp.name in n.links:
                src, slot = n.links[inp.name]
                inputs[inp.name] = [str(src), slot]
            elif inp.name in n.widgets:
                inputs[inp.name] = n.widgets[inp.name]
            elif inp.is_widget and inp.default is not None:
                inputs[inp.name] = inp.default
        prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title}}
    return prompt


def to_ui(nodes: list[GraphNode]) -> dict[str, Any]:
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_link: dict[tuple[int, str], int] = {}
    for n in nodes:
        for name, (src, slot) in n.links.items():
            link_id = len(links) + 1
            src_type = _schema(next(m.type for m in nodes if m.id == src)).outputs[slot].type
            target_slot = [i.name for i in _schema(n.type).inputs if not i.is_widget].index(name)
            links.append([link_id, src, slot, n.id, target_slot, src_type])
            out_links.setdefault((src, slot), []).append(link_id)
            in_link[(n.id, name)] = link_id
    ui_nodes = []
    for order, n in enumerate(nodes):
        schema = _schema(n.type)
        widgets_values: list[Any] = []
        for inp in schema.widget_inputs():
            widgets_values.append(n.widgets.get(inp.name, inp.default))
            if inp.control_after_generate:
                widgets_values.append("fixed")
        ui_nodes.append({
            "id": n.id,
            "type": n.type,
            "title": n.title,
            "pos": [60 + 340 * (order % 4), 80 + 360 * (order // 4)],
            "size": [315, 130],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [
                {"name": i.name, "type": i.type, "link": in_link.get((n.id, i.name))}
                for i in schema.inputs if not i.is_widget
            ],
            "outputs": [
                {"name": o.display_name, "type": o.type, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                for slot, o in enumerate(schema.outputs)
            ],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": widgets_values,
        })
    return {
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def t2v_wan21() -> list[GraphNode]:
    return [
        GraphNode(1, "WanflowModelLoader", "Load Diffusion Model", {"model_name": "wan2.1_t2v_1.3B_fp16.safetensors"}),
        GraphNode(2, "WanflowTextEncoderLoader", "Load Text Encoder", {"text_encoder_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors"}),
        GraphNode(3, "WanflowVAELoader", "Load VAE", {"vae_name": "wan_2.1_vae.safetensors"}),
        GraphNode(4, "WanflowTextEncode", "Prompt", {"positive": PROMPT_T2V}, {"text_encoder": (2, 0)}),
        GraphNode(5, "WanflowEmptyLatentVideo", "Video Size", {"width": 832, "height": 480, "length": 81}),
        GraphNode(6, "WanflowSampler", "Sampler", {"seed": 42, "steps": 30, "cfg": 6.0, "shift": 8.0},
                  {"model": (1, 0), "conditioning": (4, 0), "latent": (5, 0)}),
        GraphNode(7, "WanflowVAEDecode", "Decode", {}, {"vae": (3, 0), "samples": (6, 0)}),
        GraphNode(8, "WanflowSaveVideo", "Save Video", {"filename_prefix": "wanflow/t2v", "fps": 16}, {"images": (7, 0)}),
    ]


# Shared by the workflows below; titles are what `--set Title.input=...` and the tiny-model
# overrides (runtime.demo) address.
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE_21 = "wan_2.1_vae.safetensors"
START_IMAGE = "example.png"
"""ComfyUI ships input/example.png; replace it with your own first frame."""
END_IMAGE = "end_frame.png"
PROMPT_T2V = "A red fox trotting through a snowy birch forest at dawn, soft light, cinematic"
PROMPT_I2V = "The woman in the picture turns towards the camera and smiles as the wind moves her hair, cinematic"


def _tail(first_id: int, sampler_links: dict[str, tuple[int, int]], vae_id: int, sampler: dict[str, Any],
          prefix: str, fps: int) -> list[GraphNode]:
    """Sampler -> decode -> save, the end of every graph."""
    return [
        GraphNode(first_id, "WanflowSampler", "Sampler", {"seed": 42, **sampler}, sampler_links),
        GraphNode(first_id + 1, "WanflowVAEDecode", "Decode", {}, {"vae": (vae_id, 0), "samples": (first_id, 0)}),
        GraphNode(first_id + 2, "WanflowSaveVideo", "Save Video", {"filename_prefix": prefix, "fps": fps},
                  {"images": (first_id + 1, 0)}),
    ]


def _clip_i2v(model_name: str, size: dict[str, int], sampler: dict[str, Any], prefix: str,
              end_image: bool) -> list[GraphNode]:
    """Wan2.1 I2V / FLF2V: CLIP vision of the start (and end) image + their latents."""
    nodes = [
        GraphNode(1, "WanflowModelLoader", "Load Diffusion Model", {"model_name": model_name}),
        GraphNode(2, "WanflowTextEncoderLoader", "Load Text Encoder", {"text_encoder_name": TEXT_ENCODER}),
        GraphNode(3, "WanflowVAELoader", "Load VAE", {"vae_name": VAE_21}),
        GraphNode(4, "WanflowCLIPVisionLoader", "Load CLIP Vision", {"clip_name": "clip_vision_h.safetensors"}),
        GraphNode(5, "LoadImage", "Start Image", {"image": START_IMAGE}),
        GraphNode(6, "WanflowCLIPVisionEncode", "CLIP Vision Start", {}, {"clip_vision": (4, 0), "image": (5, 0)}),
        GraphNode(7, "WanflowTextEncode", "Prompt", {"positive": PROMPT_I2V}, {"text_encoder": (2, 0)}),
    ]
    links = {"conditioning": (7, 0), "vae": (3, 0), "start_image": (5, 0), "clip_vision_start_image": (6, 0)}
    if end_image:
        nodes += [
            GraphNode(8, "LoadImage", "End Image", {"image": END_IMAGE}),
            GraphNode(9, "WanflowCLIPVisionEncode", "CLIP Vision End", {}, {"clip_vision": (4, 0), "image": (8, 0)}),
        ]
        links |= {"end_image": (8, 0), "clip_vision_end_image": (9, 0)}
    nodes.append(GraphNode(10, "WanflowImageToVideo", "Image To Video", size, links))
    return nodes + _tail(11, {"model": (1, 0), "conditioning": (10, 0), "latent": (10, 1)}, 3, sampler, prefix, 16)


def i2v_wan21() -> list[GraphNode]:
    # 480p: the official repo samples I2V with 40 steps and shift 3.0 there (FACTS §3).
    return _clip_i2v("wan2.1_i2v_480p_14B_fp16.safetensors", {"width": 832, "height": 480, "length": 81},
                     {"steps": 40, "cfg": 5.0, "shift": 3.0}, "wanflow/i2v", end_image=False)


def flf2v_wan21() -> list[GraphNode]:
    return _clip_i2v("wan2.1_flf2v_720p_14B_fp16.safetensors", {"width": 1280, "height": 720, "length": 81},
                     {"steps": 50, "cfg": 5.0, "shift": 16.0}, "wanflow/flf2v", end_image=True)


def _experts(kind: str) -> GraphNode:
    return GraphNode(1, "WanflowMoEModelLoader", "Load Experts", {
        "high_noise_model": f"wan2.2_{kind}_high_noise_14B_fp8_scaled.safetensors",
        "low_noise_model": f"wan2.2_{kind}_low_noise_14B_fp8_scaled.safetensors",
    })


def t2v_wan22_a14b() -> list[GraphNode]:
    return [
        _experts("t2v"),
        GraphNode(2, "WanflowTextEncoderLoader", "Load Text Encoder", {"text_encoder_name": TEXT_ENCODER}),
        GraphNode(3, "WanflowVAELoader", "Load VAE", {"vae_name": VAE_21}),
        GraphNode(4, "WanflowTextEncode", "Prompt", {"positive": PROMPT_T2V}, {"text_encoder": (2, 0)}),
        GraphNode(5, "WanflowEmptyLatentVideo", "Video Size", {"width": 1280, "height": 720, "length": 81}),
        *_tail(6, {"model": (1, 0), "conditioning": (4, 0), "latent": (5, 0)}, 3,
               {"steps": 40, "cfg": 4.0, "cfg_2": 3.0, "shift": 12.0, "boundary": 0.875}, "wanflow/t2v_a14b", 16),
    ]


def i2v_wan22_a14b() -> list[GraphNode]:
    # Wan2.2's I2V experts have no CLIP image cross-attention: the start image's latent only.
    return [
        _experts("i2v"),
        GraphNode(2, "WanflowTextEncoderLoader", "Load Text Encoder", {"text_encoder_name": TEXT_ENCODER}),
        GraphNode(3, "WanflowVAELoader", "Load VAE", {"vae_name": VAE_21}),
        GraphNode(4, "LoadImage", "Start Image", {"image": START_IMAGE}),
        GraphNode(5, "WanflowTextEncode", "Prompt", {"positive": PROMPT_I2V}, {"text_encoder": (2, 0)}),
        GraphNode(6, "WanflowImageToVideo", "Image To Video", {"width": 1280, "height": 720, "length": 81},
                  {"conditioning": (5, 0), "vae": (3, 0), "start_image": (4, 0)}),
        *_tail(7, {"model": (1, 0), "conditioning": (6, 0), "latent": (6, 1)}, 3,
               {"steps": 40, "cfg": 3.5, "cfg_2": 3.5, "shift": 5.0, "boundary": 0.9}, "wanflow/i2v_a14b", 16),
    ]


def _loaders_wan22_5b() -> list[GraphNode]:
    return [
        GraphNode(1, "WanflowModelLoader", "Load Diffusion Model", {"model_name": "wan2.2_ti2v_5B_fp16.safetensors"}),
        GraphNode(2, "WanflowTextEncoderLoader", "Load Text Encoder", {"text_encoder_name": TEXT_ENCODER}),
        GraphNode(3, "WanflowVAELoader", "Load VAE", {"vae_name": "wan2.2_vae.safetensors"}),
    ]


def ti2v_wan22_5b() -> list[GraphNode]:
    # Image-to-video; text-to-video with the same model is t2v_wan22_5b.
    return [
        *_loaders_wan22_5b(),
        GraphNode(4, "LoadImage", "Start Image", {"image": START_IMAGE}),
        GraphNode(5, "WanflowTextEncode", "Prompt", {"positive": PROMPT_I2V}, {"text_encoder": (2, 0)}),
        GraphNode(6, "WanflowImageToVideo", "Image To Video", {"width": 1280, "height": 704, "length": 121},
                  {"conditioning": (5, 0), "vae": (3, 0), "start_image": (4, 0)}),
        *_tail(7, {"model": (1, 0), "conditioning": (6, 0), "latent": (6, 1)}, 3,
               {"steps": 50, "cfg": 5.0, "shift": 5.0}, "wanflow/ti2v", 24),
    ]


def t2v_wan22_5b() -> list[GraphNode]:
    # TI2V-5B without an image: its empty latent takes the Wan2.2 VAE's 48 channels.
    return [
        *_loaders_wan22_5b(),
        GraphNode(4, "WanflowTextEncode", "Prompt", {"positive": PROMPT_T2V}, {"text_encoder": (2, 0)}),
        GraphNode(5, "WanflowEmptyLatentVideo", "Video Size", {"width": 1280, "height": 704, "length": 121},
                  {"vae": (3, 0)}),
        *_tail(6, {"model": (1, 0), "conditioning": (4, 0), "latent": (5, 0)}, 3,
               {"steps": 50, "cfg": 5.0, "shift": 5.0}, "wanflow/t2v_5b", 24),
    ]


# A placeholder: pick one of your LoRAs (models/loras) in the node.
LORA_21 = "my_wan2.1_t2v_1.3B_lora.safetensors"


def _t2v_wan21_with(node_type: str, title: str, widgets: dict[str, Any], prefix: str) -> list[GraphNode]:
    """The Wan2.1 T2V graph with one model -> model node (LoRA, multi-GPU, cache) between the
    loader and the sampler; the other nodes keep their ids and titles."""
    loader, *rest = t2v_wan21()
    patch = GraphNode(9, node_type, title, widgets, {"model": (loader.id, 0)})
    for node in rest:
        if node.type == "WanflowSampler":
            node.links["model"] = (patch.id, 0)
        if node.type == "WanflowSaveVideo":
            node.widgets["filename_prefix"] = prefix
    return [loader, patch, *rest]


def t2v_wan21_lora() -> list[GraphNode]:
    return _t2v_wan21_with("WanflowLoRA", "LoRA", {"lora_name": LORA_21, "strength": 1.0}, "wanflow/t2v_lora")


def t2v_wan21_usp() -> list[GraphNode]:
    # Two GPUs share the video's tokens (Ulysses); 1.3B's 12 heads split evenly.
    return _t2v_wan21_with("WanflowParallelConfig", "Multi-GPU", {"gpus": 2, "ulysses_degree": 2},
                           "wanflow/t2v_usp")


def t2v_wan21_usp_cfg() -> list[GraphNode]:
    # Two GPUs run the cond and the uncond pass of each step at once (no token split).
    return _t2v_wan21_with("WanflowParallelConfig", "Multi-GPU",
                           {"gpus": 2, "ulysses_degree": 1, "cfg_parallel": True}, "wanflow/t2v_usp_cfg")


def t2v_wan21_cache() -> list[GraphNode]:
    return _t2v_wan21_with("WanflowCacheDiT", "Cache-DiT", {"enabled": True}, "wanflow/t2v_cache")


WORKFLOWS = {
    "t2v_wan21": t2v_wan21,
    "t2v_wan21_lora": t2v_wan21_lora,
    "t2v_wan21_usp": t2v_wan21_usp,
    "t2v_wan21_usp_cfg": t2v_wan21_usp_cfg,
    "t2v_wan21_cache": t2v_wan21_cache,
    "i2v_wan21": i2v_wan21,
    "flf2v_wan21": flf2v_wan21,
    "t2v_wan22_a14b": t2v_wan22_a14b,
    "i2v_wan22_a14b": i2v_wan22_a14b,
    "ti2v_wan22_5b": ti2v_wan22_5b,
    "t2v_wan22_5b": t2v_wan22_5b,
}


def write_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in WORKFLOWS.items():
        nodes = build()
        for suffix, doc in (("", to_ui(nodes)), ("_api", to_api(nodes))):
            path = out_dir / f"{name}{suffix}.json"
            path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "workflows"
    for p in write_all(out):
        sys.stdout.write(f"{p}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
