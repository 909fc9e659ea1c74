"""Prompt validation reports ComfyUI's error shape, one error kind per test, and nothing runs."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from wanflow.runtime.errors import WorkflowValidationError
from wanflow.runtime.schema import Input, NodeRegistry, NodeSchema, Output, SchemaNode
from wanflow.runtime.workflow import Executor, ValidationResult, validate_prompt

RUNS: Counter = Counter()


class Source(SchemaNode):
    SCHEMA = NodeSchema("Source", "Source", "test", inputs=(
        Input("count", "INT", 1, min=0, max=10),
        Input("scale", "FLOAT", 0.5, min=0.0, max=1.0),
        Input("mode", "COMBO", options=["fast", "slow"]),
        Input("label", "STRING", "", optional=True),
        Input("flag", "BOOLEAN", False, optional=True),
    ), outputs=(Output("LATENT"), Output("INT")))

    def execute(self, **kwargs: Any) -> tuple:
        RUNS["Source"] += 1
        return ({"latent": kwargs}, kwargs["count"])


class Mid(SchemaNode):
    SCHEMA = NodeSchema("Mid", "Mid", "test", inputs=(Input("latent", "LATENT"),), outputs=(Output("LATENT"),))

    def execute(self, latent: Any) -> tuple:
        RUNS["Mid"] += 1
        return (latent,)


class Anything(SchemaNode):
    SCHEMA = NodeSchema("Anything", "Anything", "test", inputs=(Input("value", "*"),), outputs=(Output("*"),))

    def execute(self, value: Any) -> tuple:
        RUNS["Anything"] += 1
        return (value,)


class ModeSource(SchemaNode):
    SCHEMA = NodeSchema("ModeSource", "Mode source", "test", outputs=(Output("COMBO"),))

    def execute(self) -> tuple:
        RUNS["ModeSource"] += 1
        return ("slow",)


class Sink(SchemaNode):
    SCHEMA = NodeSchema("Sink", "Sink", "test", inputs=(Input("latent", "LATENT"),), output_node=True)

    def execute(self, latent: Any) -> dict:
        RUNS["Sink"] += 1
        return {"ui": {"text": ["ok"]}}


NODES = (Source, Mid, Anything, ModeSource, Sink)


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    return NodeRegistry(classes={c.SCHEMA.node_id: c for c in NODES})


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


def source(**inputs: Any) -> dict[str, Any]:
    return {"class_type": "Source", "inputs": {"count": 3, "scale": 0.5, "mode": "fast", **inputs}}


def sink(link: Any = ("1", 0)) -> dict[str, Any]:
    return {"class_type": "Sink", "inputs": {"latent": list(link)}}


def rejected(prompt: dict[str, Any], registry: NodeRegistry) -> ValidationResult:
    """Validate an invalid prompt; check that executing it raises before any node runs."""
    result = validate_prompt(prompt, registry)
    assert not result.ok
    assert set(result.error) == {"type", "message", "details", "extra_info"}
    with pytest.raises(WorkflowValidationError) as raised:
        Executor(registry).execute(prompt, prompt_id="p")
    assert raised.value.node_errors == result.node_errors
    assert sum(RUNS.values()) == 0
    return result


def only_error(result: ValidationResult, node_id: str) -> dict[str, Any]:
    entry = result.node_errors[node_id]
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    assert len(entry["errors"]) == 1
    error = entry["errors"][0]
    assert set(error) == {"type", "message", "details", "extra_info"}
    return error


def test_valid_prompt_passes_with_every_output(registry: NodeRegistry) -> None:
    result = validate_prompt({"1": source(), "2": sink()}, registry)
    assert result.ok and result.outputs == ["2"] and result.node_errors == {} and result.error is None


def test_unknown_node_types_are_all_listed_at_once(registry: NodeRegistry) -> None:
    prompt = {"1": {"class_type": "WanMystery", "inputs": {}}, "2": sink(), "3": {"class_type": "OtherPack", "inputs": {}}}
    result = rejected(prompt, registry)
    assert result.error["type"] == "missing_node_type"
    assert "WanMystery" in result.error["message"] and "OtherPack" in result.error["message"]
    assert set(result.node_errors) == {"1", "3"}
    assert only_error(result, "3")["type"] == "missing_node_type"
    assert result.node_errors["1"]["class_type"] == "WanMystery"


def test_missing_required_input_is_reported_on_its_node(registry: NodeRegistry) -> None:
    result = rejected({"1": {"class_type": "Source", "inputs": {"count": 3, "scale": 0.5}}, "2": sink()}, registry)
    assert result.error["type"] == "prompt_outputs_failed_validation"
    error = only_error(result, "1")
    assert error["type"] == "required_input_missing"
    assert error["extra_info"]["input_name"] == "mode"
    assert result.node_errors["1"]["dependent_outputs"] == ["2"]
    assert result.node_errors["1"]["class_type"] == "Source"


def test_link_to_a_missing_node_is_a_bad_linked_input(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(), "2": sink(("9", 0))}, registry), "2")
    assert error["type"] == "bad_linked_input"
    assert "node 9" in error["message"] and error["extra_info"]["input_name"] == "latent"


def test_link_to_a_missing_output_slot_is_a_bad_linked_input(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(), "2": sink(("1", 5))}, registry), "2")
    assert error["type"] == "bad_linked_input"
    assert "output 5" in error["message"]


def test_link_of_the_wrong_type_is_a_return_type_mismatch(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(), "2": sink(("1", 1))}, registry), "2")
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "latent, received_type(INT) mismatch input_type(LATENT)"
    assert error["extra_info"]["received_type"] == "INT"


def test_any_type_links_match_every_type(registry: NodeRegistry) -> None:
    prompt = {"1": source(), "2": {"class_type": "Anything", "inputs": {"value": ["1", 1]}}, "3": sink(("2", 0))}
    assert validate_prompt(prompt, registry).ok


def test_combo_input_accepts_a_link_from_a_combo_output_only(registry: NodeRegistry) -> None:
    good = {"1": source(mode=["4", 0]), "2": sink(), "4": {"class_type": "ModeSource", "inputs": {}}}
    assert validate_prompt(good, registry).ok
    bad = {"1": source(mode=["5", 1]), "2": sink(), "5": source()}
    assert only_error(rejected(bad, registry), "1")["type"] == "return_type_mismatch"


def test_value_that_does_not_convert_is_an_invalid_input_type(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(count="three"), "2": sink()}, registry), "1")
    assert error["type"] == "invalid_input_type"
    assert error["extra_info"]["input_name"] == "count" and error["extra_info"]["received_value"] == "three"


def test_values_are_coerced_like_comfyui_in_a_copy(registry: NodeRegistry) -> None:
    prompt = {"1": source(count="7", scale=1, label=12, flag=1), "2": sink()}
    result = validate_prompt(prompt, registry)
    assert result.ok
    assert result.prompt["1"]["inputs"] == {"count": 7, "scale": 1.0, "mode": "fast", "label": "12", "flag": True}
    assert prompt["1"]["inputs"]["count"] == "7"


def test_value_for_a_link_input_is_an_invalid_input_type(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(), "2": {"class_type": "Sink", "inputs": {"latent": 5}}}, registry), "2")
    assert error["type"] == "invalid_input_type"


def test_value_below_min_is_reported(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(count=-1), "2": sink()}, registry), "1")
    assert error["type"] == "value_smaller_than_min"
    assert error["message"] == "Value -1 smaller than min of 0"


def test_value_above_max_is_reported(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(scale=1.5), "2": sink()}, registry), "1")
    assert error["type"] == "value_bigger_than_max"
    assert error["extra_info"]["input_name"] == "scale"


def test_combo_value_not_in_the_list_is_reported(registry: NodeRegistry) -> None:
    error = only_error(rejected({"1": source(mode="turbo"), "2": sink()}, registry), "1")
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "mode: 'turbo' not in ['fast', 'slow']"


def test_cycle_is_reported_on_the_node_that_closes_it(registry: NodeRegistry) -> None:
    prompt = {
        "3": {"class_type": "Mid", "inputs": {"latent": ["4", 0]}},
        "4": {"class_type": "Mid", "inputs": {"latent": ["3", 0]}},
        "2": sink(("3", 0)),
    }
    result = rejected(prompt, registry)
    assert list(result.node_errors) == ["4"]
    error = only_error(result, "4")
    assert error["type"] == "dependency_cycle"
    assert "3 -> 4 -> 3" in error["details"]


def test_prompt_without_output_nodes_is_rejected(registry: NodeRegistry) -> None:
    result = rejected({"1": source()}, registry)
    assert result.error["type"] == "prompt_no_outputs"
    assert result.node_errors == {}


def test_node_without_class_type_is_an_invalid_prompt(registry: NodeRegistry) -> None:
    result = rejected({"1": {"inputs": {}}, "2": sink()}, registry)
    assert result.error["type"] == "invalid_prompt"
    assert result.error["details"] == "Node ID '#1'"


def test_malformed_node_is_an_exception_during_validation(registry: NodeRegistry) -> None:
    error = only_error(rejected({"2": {"class_type": "Sink", "inputs": 5}}, registry), "2")
    assert error["type"] == "exception_during_validation"
    assert error["extra_info"]["exception_type"] == "TypeError"


def test_bad_output_is_dropped_while_a_good_one_still_runs(registry: NodeRegistry) -> None:
    prompt = {"1": source(), "2": sink(), "3": sink(("1", 1))}
    result = validate_prompt(prompt, registry)
    assert result.ok and result.outputs == ["2"]
    assert result.node_errors["3"]["dependent_outputs"] == ["3"]
    Executor(registry).execute(prompt, prompt_id="p")
    assert RUNS == Counter({"Source": 1, "Sink": 1})


def test_raised_error_carries_comfyui_type_and_a_readable_summary(registry: NodeRegistry) -> None:
    with pytest.raises(WorkflowValidationError) as raised:
        validate_prompt({"1": source(count=99), "2": sink()}, registry).raise_if_invalid()
    assert raised.value.error_type == "prompt_outputs_failed_validation"
    assert "node 1 (Source) input 'count': Value 99 bigger than max of 10" in str(raised.value)
