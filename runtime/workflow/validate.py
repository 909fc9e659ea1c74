"""Headless validation of an API-format prompt, reporting in ComfyUI's error shape.

Mirrors ComfyUI's `execution.validate_prompt`: only nodes an output node depends on are checked;
values are coerced the way ComfyUI does (`int(v)`, `float(v)`, `str(v)`, `bool(v)`); an output
whose inputs fail is dropped and the prompt stays runnable while at least one output is good.
Where ComfyUI gives up with an exception (a link to a missing node or slot, a cycle) this names
the node and input instead; unknown node types are all listed at once.
"""
from __future__ import annotations

import copy
import logging
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..errors import WanflowError, WorkflowValidationError
from ..schema import WIDGET_TYPES, Input, NodeRegistry, NodeSchema, schema_of

log = logging.getLogger(__name__)

MAX_LISTED_CHOICES = 20
"""ComfyUI leaves longer combo lists (model file names) out of error messages."""


def is_link(value: Any) -> bool:
    """An API-format input that refers to another node's output: `[node_id, slot]`."""
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)
    )


def unwrap_value(value: Any) -> Any:
    """The editor wraps list-valued widgets as `{"__value__": [...]}` (bare lists mean links)."""
    if isinstance(value, dict) and "__value__" in value:
        return value["__value__"]
    return value


def node_schema(registry: NodeRegistry, class_type: str) -> NodeSchema | None:
    """The schema of a registered class_type; None when the type is unknown."""
    cls = registry.get(class_type)
    if cls is None:
        return None
    schema = schema_of(cls)
    if schema is None:
        raise WanflowError(f"node class {class_type} is registered without a SCHEMA", node=class_type)
    return schema


def types_match(received: Any, expected: str) -> bool:
    """Output type vs input type: `*` matches anything, `A,B` unions overlap, combo lists are COMBO."""
    if isinstance(received, (list, tuple)):
        received = "COMBO"
    if received == "*" or expected == "*" or received == expected:
        return True
    left = {t.strip() for t in str(received).split(",")}
    right = {t.strip() for t in str(expected).split(",")}
    return bool(left & right)


def full_type_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _error(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


@dataclass
class ValidationResult:
    ok: bool
    """True when at least one output node can run (ComfyUI queues such a prompt)."""
    prompt: dict[str, Any]
    """The prompt with values coerced to their input types: what the executor should run."""
    outputs: list[str] = field(default_factory=list)
    """The output nodes that passed validation."""
    error: dict[str, Any] | None = None
    node_errors: dict[str, Any] = field(default_factory=dict)

    def response(self) -> dict[str, Any]:
        """ComfyUI's body for POST /prompt errors: `{error, node_errors}`."""
        return {"error": self.error, "node_errors": self.node_errors}

    def summary(self) -> str:
        lines = [self.error["message"]] if self.error else []
        if self.error and self.error.get("details") and not self.node_errors:
            lines.append(self.error["details"])
        for node_id, entry in self.node_errors.items():
            for err in entry["errors"]:
                where = f"node {node_id} ({entry['class_type']})"
                name = err.get("extra_info", {}).get("input_name")
                if name:
                    where += f" input '{name}'"
                lines.append(f"{where}: {err['message']}" + (f" [{err['details']}]" if err.get("details") else ""))
        return "\n".join(lines)

    def raise_if_invalid(self) -> None:
        if self.ok:
            return
        assert self.error is not None
        exc = WorkflowValidationError(self.summary(), self.node_errors, details=self.error.get("details", ""))
        exc.error_type = self.error["type"]  # prompt_no_outputs, missing_node_type, ...
        raise exc


class _Validator:
    def __init__(self, prompt: dict[str, Any], registry: NodeRegistry) -> None:
        self.prompt = prompt
        self.registry = registry
        self.validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}

    def node(self, node_id: str, stack: tuple[str, ...] = ()) -> bool:
        if node_id in self.validated:
            return self.validated[node_id][0]
        node = self.prompt[node_id]
        schema = node_schema(self.registry, node["class_type"])
        assert schema is not None  # unknown types were rejected before
        inputs = node.setdefault("inputs", {})
        errors: list[dict[str, Any]] = []
        valid = True
        for inp in schema.inputs:
            if inp.name not in inputs:
                if not inp.optional:
                    errors.append(
                        _error("required_input_missing", "Required input is missing", inp.name, input_name=inp.name)
                    )
                continue
            if isinstance(inputs[inp.name], list):
                error, upstream_ok = self._check_link(node_id, inp, inputs, stack)
                valid = valid and upstream_ok
            else:
                error = self._check_value(inp, inputs)
            if error is not None:
                errors.append(error)
        result = (valid and not errors, errors)
        self.validated[node_id] = result
        return result[0]

    def _check_link(
        self, node_id: str, inp: Input, inputs: dict[str, Any], stack: tuple[str, ...]
    ) -> tuple[dict[str, Any] | None, bool]:
        """(error on this input or None, whether the upstream node validated)."""
        value = inputs[inp.name]
        config = self._config(inp)
        if not is_link(value):
            return _error(
                "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                inp.name, input_name=inp.name, input_config=config, received_value=value,
            ), True
        source_id, slot = str(value[0]), value[1]
        inputs[inp.name] = [source_id, slot]
        source = self.prompt.get(source_id)
        if source is None:
            return _error(
                "bad_linked_input", f"Input is linked to node {source_id}, which is not in the prompt",
                f"{inp.name}: node {source_id} not found",
                input_name=inp.name, input_config=config, linked_node=value,
            ), True
        source_schema = node_schema(self.registry, source["class_type"])
        assert source_schema is not None
        if not 0 <= slot < len(source_schema.outputs):
            return _error(
                "bad_linked_input",
                f"Input is linked to output {slot} of node {source_id} ({source['class_type']}), "
                f"which has {len(source_schema.outputs)} outputs",
                f"{inp.name}: bad output slot {slot}", input_name=inp.name, input_config=config, linked_node=value,
            ), True
        received = source_schema.outputs[slot].type
        if not types_match(received, inp.type):
            return _error(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{inp.name}, received_type({received}) mismatch input_type({inp.type})",
                input_name=inp.name, input_config=config, received_type=received, linked_node=[source_id, slot],
            ), True
        if source_id in stack or source_id == node_id:
            loop = stack[stack.index(source_id):] if source_id in stack else ()
            cycle = " -> ".join((*loop, node_id, source_id))
            return _error(
                "dependency_cycle", "Dependency cycle detected", f"{inp.name}: {cycle}",
                input_name=inp.name, linked_node=[source_id, slot],
            ), True
        return None, self.node(source_id, (*stack, node_id))

    def _check_value(self, inp: Input, inputs: dict[str, Any]) -> dict[str, Any] | None:
        value = unwrap_value(inputs[inp.name])
        inputs[inp.name] = value
        config = self._config(inp)
        if inp.type not in WIDGET_TYPES and inp.type != "*":
            return _error(
                "invalid_input_type", f"Input expects a link from a {inp.type} output, got a value",
                f"{inp.name}, {value!r}", input_name=inp.name, input_config=config, received_value=value,
            )
        coerce = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(inp.type)
        if coerce is not None:
            try:
                value = coerce(value)
            except Exception as ex:  # noqa: BLE001 - any failed conversion is the user's value
                return _error(
                    "invalid_input_type", f"Failed to convert an input value to a {inp.type} value",
                    f"{inp.name}, {value}, {ex}", input_name=inp.name, input_config=config,
                    received_value=value, exception_message=str(ex),
                )
            inputs[inp.name] = value
        if inp.min is not None and value < inp.min:
            return _error(
                "value_smaller_than_min", f"Value {value} smaller than min of {inp.min}", inp.name,
                input_name=inp.name, input_config=config, received_value=value,
            )
        if inp.max is not None and value > inp.max:
            return _error(
                "value_bigger_than_max", f"Value {value} bigger than max of {inp.max}", inp.name,
                input_name=inp.name, input_config=config, received_value=value,
            )
        if inp.type == "COMBO":
            choices = inp.choices()
            if value not in choices:
                listed = f"(list of length {len(choices)})" if len(choices) > MAX_LISTED_CHOICES else str(choices)
                return _error(
                    "value_not_in_list", "Value not in list", f"{inp.name}: '{value}' not in {listed}",
                    input_name=inp.name, input_config=config, received_value=value,
                )
        return None

    @staticmethod
    def _config(inp: Input) -> list[Any] | None:
        if inp.type == "COMBO" and len(inp.choices()) > MAX_LISTED_CHOICES:
            return None
        return list(inp.comfy_spec())


def _upstream(prompt: dict[str, Any], node_id: str) -> set[str]:
    """The node and every node it (transitively) takes a link from."""
    seen: set[str] = set()
    pending = [node_id]
    while pending:
        current = pending.pop()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        inputs = prompt[current].get("inputs")
        if isinstance(inputs, dict):
            pending.extend(str(v[0]) for v in inputs.values() if is_link(v))
    return seen


def _invalid(
    prompt: dict[str, Any], error: dict[str, Any], node_errors: dict[str, Any] | None = None
) -> ValidationResult:
    return ValidationResult(ok=False, prompt=prompt, error=error, node_errors=node_errors or {})


def _missing_types(prompt: dict[str, Any], registry: NodeRegistry) -> ValidationResult | None:
    missing = [
        (node_id, node["class_type"], (node.get("_meta") or {}).get("title"))
        for node_id, node in prompt.items()
        if node_schema(registry, node["class_type"]) is None
    ]
    if not missing:
        return None
    types = sorted({class_type for _, class_type, _ in missing})
    message = (
        f"Node '{types[0]}' not found. The custom node may not be installed."
        if len(types) == 1
        else f"{len(types)} node types not found: {', '.join(types)}. The custom nodes may not be installed."
    )
    details = ", ".join(f"Node ID '#{node_id}'" for node_id, _, _ in missing)
    error = _error(
        "missing_node_type", message, details,
        missing_nodes=[{"node_id": i, "class_type": t, "node_title": title} for i, t, title in missing],
    )
    node_errors = {
        node_id: {
            "errors": [_error(
                "missing_node_type", f"Node type '{class_type}' not found", f"Node ID '#{node_id}'", class_type=class_type
            )],
            "dependent_outputs": [],
            "class_type": class_type,
        }
        for node_id, class_type, _ in missing
    }
    return _invalid(prompt, error, node_errors)


def validate_prompt(prompt: dict[str, Any], registry: NodeRegistry) -> ValidationResult:
    """Validate an API-format prompt; the input is not modified (the result holds a coerced copy)."""
    if not isinstance(prompt, dict):
        return _invalid(
            {}, _error("invalid_prompt", "Prompt must be an object of nodes keyed by id", type(prompt).__name__)
        )
    prompt = {str(k): v for k, v in copy.deepcopy(prompt).items()}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _invalid(prompt, _error(
                "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            ))
    missing = _missing_types(prompt, registry)
    if missing is not None:
        return missing

    schemas = {node_id: node_schema(registry, node["class_type"]) for node_id, node in prompt.items()}
    outputs = [node_id for node_id, schema in schemas.items() if schema is not None and schema.output_node]
    if not outputs:
        return _invalid(prompt, _error("prompt_no_outputs", "Prompt has no outputs", ""))

    validator = _Validator(prompt, registry)
    good: list[str] = []
    failures: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        try:
            ok = validator.node(output_id)
        except Exception as ex:  # noqa: BLE001 - reported like ComfyUI does, never raised
            ok = False
            typ, _, tb = sys.exc_info()
            validator.validated[output_id] = (False, [_error(
                "exception_during_validation", "Exception when validating node", str(ex),
                exception_type=full_type_name(typ), traceback=traceback.format_tb(tb),
            )])
        if ok:
            good.append(output_id)
            continue
        failures.append((output_id, validator.validated[output_id][1]))
        # Nodes downstream of a bad node fail too, but only nodes with errors of their own are reported.
        upstream = _upstream(prompt, output_id)
        for node_id, (_, reasons) in validator.validated.items():
            if reasons and node_id in upstream:
                entry = node_errors.setdefault(
                    node_id, {"errors": reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]}
                )
                entry["dependent_outputs"].append(output_id)
        log.info("output %s failed validation and will be ignored", output_id)

    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errors in failures for e in errors)
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return _invalid(prompt, error, node_errors)
    return ValidationResult(ok=True, prompt=prompt, outputs=good, node_errors=node_errors)
