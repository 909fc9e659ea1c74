"""UI-format workflows convert to the API prompts ComfyUI's frontend would queue.

Each `tests/workflow_cases/<case>.json` is a hand-written UI workflow and `<case>.api.json` the
prompt expected from it; the node types are declared below with ComfyUI's core inputs.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from wanflow.nodes.standins import STANDIN_NODES
from wanflow.runtime.errors import WanflowError
from wanflow.runtime.schema import Input, NodeRegistry, NodeSchema, Output, SchemaNode
from wanflow.runtime.workflow import detect_format, load_workflow, to_api, ui_to_api

CASES = Path(__file__).parent / "workflow_cases"


def _node(node_id: str, display: str, inputs: tuple[Input, ...], outputs: tuple[Output, ...]) -> type:
    return type(node_id, (SchemaNode,), {"SCHEMA": NodeSchema(node_id, display, "test", inputs, outputs)})


CORE_LIKE = [
    _node("CheckpointLoaderSimple", "Load Checkpoint", (Input("ckpt_name", "COMBO", options=["model.safetensors"]),),
          (Output("MODEL"), Output("CLIP"), Output("VAE"))),
    _node("CLIPTextEncode", "CLIP Text Encode (Prompt)", (Input("text", "STRING", multiline=True), Input("clip", "CLIP")),
          (Output("CONDITIONING"),)),
    _node("EmptyLatentImage", "Empty Latent Image",
          (Input("width", "INT", 512), Input("height", "INT", 512), Input("batch_size", "INT", 1)), (Output("LATENT"),)),
    _node("KSampler", "KSampler", (
        Input("model", "MODEL"),
        Input("seed", "INT", 0, min=0, control_after_generate=True),
        Input("steps", "INT", 20),
        Input("cfg", "FLOAT", 8.0),
        Input("sampler_name", "COMBO", options=["euler", "dpmpp_2m"]),
        Input("scheduler", "COMBO", options=["normal", "karras"]),
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("latent_image", "LATENT"),
        Input("denoise", "FLOAT", 1.0),
    ), (Output("LATENT"),)),
    _node("VAEDecode", "VAE Decode", (Input("samples", "LATENT"), Input("vae", "VAE")), (Output("IMAGE"),)),
    _node("LatentUpscaleBy", "Upscale Latent By", (
        Input("samples", "LATENT"),
        Input("upscale_method", "COMBO", options=["nearest-exact", "bilinear"]),
        Input("scale_by", "FLOAT", 1.5),
    ), (Output("LATENT"),)),
    _node("LoraLoader", "Load LoRA", (
        Input("model", "MODEL"), Input("clip", "CLIP"), Input("lora_name", "COMBO", options=["a.safetensors"]),
        Input("strength_model", "FLOAT", 1.0), Input("strength_clip", "FLOAT", 1.0),
    ), (Output("MODEL"), Output("CLIP"))),
    _node("PrimitiveInt", "Int", (Input("value", "INT", 0, control_after_generate=True),), (Output("INT"),)),
]


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    return NodeRegistry(classes={**{c.SCHEMA.node_id: c for c in CORE_LIKE}, **STANDIN_NODES})


def _case_names() -> list[str]:
    return sorted(p.name[: -len(".api.json")] for p in CASES.glob("*.api.json"))


@pytest.mark.parametrize("case", _case_names())
def test_ui_workflow_converts_like_the_frontend(case: str, registry: NodeRegistry) -> None:
    ui = json.loads((CASES / f"{case}.json").read_text())
    expected = json.loads((CASES / f"{case}.api.json").read_text())
    assert ui_to_api(ui, registry) == expected


def test_every_conversion_rule_has_a_case() -> None:
    assert set(_case_names()) >= {
        "widgets_basic", "widget_converted_to_input", "reroute_chain", "primitive_node", "notes_dropped",
        "muted_removed", "bypass", "subgraph_v1", "subgraph_nested", "save_prefix_replacements",
    }


def test_widget_values_follow_required_then_optional_order(registry: NodeRegistry) -> None:
    node = _node("OptFirst", "Opt first", (Input("extra", "INT", 5, optional=True), Input("main", "STRING")), ())
    reg = NodeRegistry(classes={"OptFirst": node})
    ui = {"nodes": [{"id": 1, "type": "OptFirst", "mode": 0, "widgets_values": ["text", 9]}], "links": []}
    assert ui_to_api(ui, reg)["1"]["inputs"] == {"main": "text", "extra": 9}


def test_missing_widget_values_take_the_schema_default(registry: NodeRegistry) -> None:
    ui = {"nodes": [{"id": 1, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [640]}], "links": []}
    assert ui_to_api(ui, registry)["1"]["inputs"] == {"width": 640, "height": 512, "batch_size": 1}


def test_list_widget_values_are_wrapped_so_they_do_not_read_as_links() -> None:
    node = _node("Lists", "Lists", (Input("points", "STRING"),), ())
    ui = {"nodes": [{"id": 1, "type": "Lists", "mode": 0, "widgets_values": [[1, 2]]}], "links": []}
    assert ui_to_api(ui, NodeRegistry(classes={"Lists": node}))["1"]["inputs"] == {"points": {"__value__": [1, 2]}}


def test_save_prefix_date_pattern_is_expanded(registry: NodeRegistry) -> None:
    ui = {"nodes": [{"id": 1, "type": "SaveImage", "mode": 0, "widgets_values": ["%date:yyyy-MM-dd%/clip"]}], "links": []}
    today = datetime.now().strftime("%Y-%m-%d")
    assert ui_to_api(ui, registry)["1"]["inputs"]["filename_prefix"] == f"{today}/clip"


def test_link_to_a_missing_node_names_the_node_and_input(registry: NodeRegistry) -> None:
    ui = {"nodes": [{"id": 8, "type": "VAEDecode", "mode": 0, "inputs": [{"name": "vae", "type": "VAE", "link": 3}]}],
          "links": [[3, 99, 0, 8, 0, "VAE"]]}
    with pytest.raises(WanflowError, match=r"'vae' of node 8 .*node 99"):
        ui_to_api(ui, registry)


def test_load_workflow_detects_ui_and_api_files(tmp_path: Path) -> None:
    ui_file = tmp_path / "ui.json"
    ui_file.write_text((CASES / "widgets_basic.json").read_text())
    api_file = tmp_path / "api.json"
    api_file.write_text((CASES / "widgets_basic.api.json").read_text())
    assert load_workflow(ui_file).format == "ui"
    assert load_workflow(str(api_file)).format == "api"
    assert load_workflow(json.loads(api_file.read_text())).source == "<dict>"


def test_to_api_converts_ui_and_copies_api(registry: NodeRegistry) -> None:
    api = json.loads((CASES / "widgets_basic.api.json").read_text())
    ui = load_workflow(CASES / "widgets_basic.json")
    assert to_api(ui, registry) == api
    loaded = load_workflow(api)
    converted = to_api(loaded, registry)
    converted["3"]["inputs"]["steps"] = 1
    assert api["3"]["inputs"]["steps"] == 20


@pytest.mark.parametrize("content", ['{"hello": 1}', "[1, 2]", "{}"])
def test_json_that_is_no_workflow_is_rejected_naming_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "odd.json"
    path.write_text(content)
    assert detect_format(json.loads(content)) is None
    with pytest.raises(WanflowError, match="odd.json is neither"):
        load_workflow(path)


def test_unparsable_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{nodes: ")
    with pytest.raises(WanflowError, match="broken.json is not valid JSON"):
        load_workflow(path)
