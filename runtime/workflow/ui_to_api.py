"""UI-format workflow (what the ComfyUI editor saves) -> API-format prompt (what it queues).

Follows the frontend's `graphToPrompt` / `ExecutableNodeDTO` rules, which no Python library
implements:
- widget values map onto the node's widget inputs in /object_info order; a number widget with
  `control_after_generate` (and every INT named seed / noise_seed) stores one extra value after
  its own, a combo with it two (mode + filter);
- a linked input (also a widget converted to a socket) takes the link;
- virtual nodes are resolved away: Reroute forwards its input, PrimitiveNode's first widget value
  flows into the widget it feeds, Note / MarkdownNote vanish;
- muted nodes (mode 2) are left out and produce nothing; bypassed ones (mode 4) hand a consumer
  their first input of the consumer's type (same slot index preferred);
- subgraph instances are flattened: inner nodes get ids `"<instance id>:<inner id>"` (nested
  instances chain further), subgraph inputs/outputs are wired through;
- groups and native reroutes are layout only;
- `filename_prefix` of ComfyUI's save nodes gets the editor's text replacements
  (`%date:yyyy-MM-dd%`, `%<node name or title>.<widget>%`).
Nodes of types the registry does not know are still emitted (links only) so that validation
can name them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from ..errors import WanflowError
from ..io_dirs import format_date
from ..schema import Input, NodeRegistry, NodeSchema, schema_of

log = logging.getLogger(__name__)

MODE_NEVER = 2
MODE_BYPASS = 4
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = NOTE_TYPES | {"Reroute", "PrimitiveNode"}
SEED_NAMES = frozenset({"seed", "noise_seed"})
SAVE_NODE_TYPES = frozenset({
    "SaveImage", "SaveImageAdvanced", "SaveSVGNode", "SaveVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio",
    "SaveAudioMP3", "SaveAudioOpus", "SaveAudioAdvanced", "SaveGLB", "Save3DAdvanced", "SaveGaussianSplat",
    "SavePointCloud", "SaveAnimatedPNG", "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent",
})
"""The nodes whose filename_prefix the editor runs its text replacements on."""
_REPLACEMENT = re.compile(r"%([^%]+)%")
_UNSAFE_IN_NAMES = re.compile(r'[/?<>\\:*|"\x00-\x1F\x7F]')
SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20


class WorkflowFormatError(WanflowError):
    """A UI workflow is malformed (a link or node it refers to is missing, a link loops)."""

    error_type = "invalid_workflow"


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int


@dataclass
class _Graph:
    """One level of a workflow: the root graph or a subgraph definition."""

    nodes: dict[str, dict[str, Any]]
    links: dict[int, _Link]
    input_node_id: str = str(SUBGRAPH_INPUT_NODE)
    output_node_id: str = str(SUBGRAPH_OUTPUT_NODE)


@dataclass(frozen=True)
class _Scope:
    """Where a node lives: its graph and the chain of subgraph instances that leads there."""

    graph: _Graph
    path: tuple[str, ...] = ()
    instance: dict[str, Any] | None = None
    parent: "_Scope | None" = None

    def exec_id(self, node_id: str) -> str:
        return ":".join((*self.path, node_id))


@dataclass(frozen=True)
class _FromLink:
    node_id: str
    slot: int


@dataclass(frozen=True)
class _FromValue:
    value: Any


_Resolved = _FromLink | _FromValue | None


def _parse_link(raw: Any) -> tuple[int, _Link]:
    # 0.4 files store links as arrays, schema 1.0 and subgraph definitions as objects.
    if isinstance(raw, dict):
        return int(raw["id"]), _Link(
            str(raw["origin_id"]), int(raw["origin_slot"]), str(raw["target_id"]), int(raw["target_slot"])
        )
    link_id, origin_id, origin_slot, target_id, target_slot = raw[:5]
    return int(link_id), _Link(str(origin_id), int(origin_slot), str(target_id), int(target_slot))


def _parse_graph(data: dict[str, Any]) -> _Graph:
    links = dict(_parse_link(raw) for raw in data.get("links") or [] if raw)
    graph = _Graph(nodes={str(n["id"]): n for n in data.get("nodes") or []}, links=links)
    if "inputNode" in data:
        graph.input_node_id = str(data["inputNode"].get("id", SUBGRAPH_INPUT_NODE))
    if "outputNode" in data:
        graph.output_node_id = str(data["outputNode"].get("id", SUBGRAPH_OUTPUT_NODE))
    return graph


def _collect_definitions(data: dict[str, Any], into: dict[str, _Graph]) -> dict[str, _Graph]:
    for sub in (data.get("definitions") or {}).get("subgraphs") or []:
        into[str(sub["id"])] = _parse_graph(sub)
        _collect_definitions(sub, into)
    return into


def _types_compatible(a: Any, b: Any) -> bool:
    """LiteGraph's isValidConnection: empty or `*` matches all; comma lists must overlap."""
    if not a or not b or a == "*" or b == "*":
        return True
    left = {t.strip().lower() for t in str(a).split(",")}
    right = {t.strip().lower() for t in str(b).split(",")}
    return bool(left & right)


def _schema(registry: NodeRegistry, class_type: str) -> NodeSchema | None:
    cls = registry.get(class_type)
    return schema_of(cls) if cls is not None else None



def _extra_widget_values(inp: Input) -> int:
    """How many values the editor stores after this widget's own (its value-control widgets)."""
    controlled = inp.control_after_generate or (inp.type == "INT" and inp.name in SEED_NAMES)
    if not controlled:
        return 0
    return 2 if inp.type == "COMBO" else 1


def map_widget_values(widgets: list[Input], values: Any) -> dict[str, Any]:
    """Widget name -> value, from a node's `widgets_values` (a list, or a dict by name)."""
    if isinstance(values, dict):
        return {w.name: values[w.name] for w in widgets if w.name in values}
    values = list(values or [])
    mapped: dict[str, Any] = {}
    index = 0
    for widget in widgets:
        if index < len(values):
            mapped[widget.name] = values[index]
        elif widget.default is not None:
            # The editor creates every widget with its default before applying saved values.
            mapped[widget.name] = widget.default
        index += 1 + _extra_widget_values(widget)
    return mapped


def _wrap_value(value: Any) -> Any:
    # A list in the API format means a link, so list-valued widgets travel wrapped.
    return {"__value__": value} if isinstance(value, list) else value


Node = dict[str, Any]


class _Converter:
    def __init__(self, ui: dict[str, Any], registry: NodeRegistry) -> None:
        self.registry = registry
        self.definitions = _collect_definitions(ui, {})
        self.root = _Scope(_parse_graph(ui))

    def _all_nodes(self) -> list[Node]:
        return [n for graph in (self.root.graph, *self.definitions.values()) for n in graph.nodes.values()]

    def _title(self, node: Node) -> str:
        class_type = node.get("type", "")
        schema = _schema(self.registry, class_type)
        default = self.registry.display_names.get(class_type) or (schema.display_name if schema else class_type)
        return node.get("title") or default

    def _widget_value(self, node: Node, widget: str) -> Any:
        schema = _schema(self.registry, node.get("type", ""))
        if schema is None:
            return None
        return map_widget_values(schema.widget_inputs(), node.get("widgets_values")).get(widget)

    def replace_text(self, value: str) -> str:
        """The editor's applyTextReplacements: %date:FMT% and %<S&R name or title>.<widget>%."""

        def one(match: re.Match) -> str:
            parts = match.group(1).split(".")
            if len(parts) != 2:
                return format_date(parts[0][5:]) if parts[0].startswith("date:") else match.group(0)
            name, widget = parts
            nodes = self._all_nodes()
            found = [n for n in nodes if (n.get("properties") or {}).get("Node name for S&R") == name]
            found = found or [n for n in nodes if self._title(n) == name]
            if not found:
                log.warning("filename_prefix: no node named %s", name)
                return match.group(0)
            widget_value = self._widget_value(found[0], widget)
            if widget_value is None:
                return match.group(0)
            return _UNSAFE_IN_NAMES.sub("_", str(widget_value))

        return _REPLACEMENT.sub(one, value)

    def _inner_scope(self, scope: _Scope, instance: Node) -> _Scope:
        return _Scope(self.definitions[instance["type"]], scope.path + (str(instance["id"]),), instance, scope)

    # -- resolution of one input, the way ExecutableNodeDTO.resolveInput does it --------------

    def resolve_input(self, scope: _Scope, node: Node, slot: int, visited: set, want: Any = None) -> _Resolved:
        where = scope.exec_id(str(node["id"]))
        if (scope.path, where, "I", slot) in visited:
            raise WorkflowFormatError(f"link loop through input {slot} of node {where}", node=where)
        visited.add((scope.path, where, "I", slot))
        inputs = node.get("inputs") or []
        if slot >= len(inputs):
            raise WorkflowFormatError(f"node {where} has no input slot {slot}", node=where)
        inp = inputs[slot]
        name = inp.get("name")
        if inp.get("link") is None:
            return None
        link = scope.graph.links.get(int(inp["link"]))
        if link is None:
            raise WorkflowFormatError(
                f"input '{name}' of node {where} refers to link {inp['link']}, which is not in the workflow",
                node=where, input_name=name,
            )
        if scope.instance is not None and link.origin_id == scope.graph.input_node_id:
            return self._resolve_subgraph_input(scope, link.origin_slot, visited)
        origin = scope.graph.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowFormatError(
                f"input '{name}' of node {where} is linked to node {link.origin_id}, which is not in the workflow",
                node=where, input_name=name,
            )
        want = want if want is not None else inp.get("type")
        return self.resolve_output(scope, origin, link.origin_slot, want, visited)

    def _resolve_subgraph_input(self, scope: _Scope, slot: int, visited: set) -> _Resolved:
        """A link from a subgraph's input node: continue outside, on the instance's input."""
        instance, parent = scope.instance, scope.parent
        assert instance is not None and parent is not None
        inputs = instance.get("inputs") or []
        if slot >= len(inputs):
            return None
        inp = inputs[slot]
        if inp.get("link") is not None:
            return self.resolve_input(parent, instance, slot, visited)
        if "widget" not in inp:
            return None  # unconnected: the inner node keeps its own widget value
        # A promoted widget: the instance stores one value per widget input, in input order.
        values = instance.get("widgets_values")
        if isinstance(values, dict):
            return _FromValue(values[inp["name"]]) if inp["name"] in values else None
        index = sum(1 for i in inputs[:slot] if "widget" in i)
        if values and index < len(values) and values[index] is not None:
            return _FromValue(values[index])
        return None

    def resolve_output(self, scope: _Scope, node: Node, slot: int, want: Any, visited: set) -> _Resolved:
        where = scope.exec_id(str(node["id"]))
        if (scope.path, where, "O", slot) in visited:
            raise WorkflowFormatError(f"link loop through output {slot} of node {where}", node=where)
        visited.add((scope.path, where, "O", slot))
        mode = node.get("mode", 0)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            index = self._bypass_slot(node, slot, want)
            if index < 0:
                log.warning("bypassed node %s has no input of type %s to pass on", where, want)
                return None
            return self.resolve_input(scope, node, index, visited)
        node_type = node.get("type")
        if node_type in self.definitions:
            return self._resolve_subgraph_output(scope, node, slot, want, visited)
        if node_type == "Reroute":
            return self.resolve_input(scope, node, 0, visited, want)
        if node_type == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return _FromValue(values[0]) if values else None
        if node_type in NOTE_TYPES:
            return None
        return _FromLink(where, slot)

    @staticmethod
    def _bypass_slot(node: Node, slot: int, want: Any) -> int:
        """The frontend's choice of which input a bypassed node passes to output `slot`."""
        types = [i.get("type") for i in node.get("inputs") or []]
        if not types:
            return -1
        if want in ("*", "", None):
            return slot if slot < len(types) else 0
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None

        def fits(t: Any) -> bool:
            return _types_compatible(t, out_type) and _types_compatible(t, want)

        if slot < len(types) and fits(types[slot]):
            return slot
        if want in types:
            return types.index(want)
        return next((i for i, t in enumerate(types) if fits(t)), -1)

    def _resolve_subgraph_output(
        self, scope: _Scope, instance: Node, slot: int, want: Any, visited: set
    ) -> _Resolved:
        inner = self._inner_scope(scope, instance)
        graph = inner.graph
        link = next(
            (l for l in graph.links.values() if l.target_id == graph.output_node_id and l.target_slot == slot), None
        )
        if link is None:
            return None
        if link.origin_id == graph.input_node_id:  # an input wired straight to an output
            return self._resolve_subgraph_input(inner, link.origin_slot, visited)
        origin = graph.nodes.get(link.origin_id)
        if origin is None:
            where = scope.exec_id(str(instance["id"]))
            raise WorkflowFormatError(
                f"output {slot} of subgraph node {where} comes from a missing node {link.origin_id}", node=where
            )
        return self.resolve_output(inner, origin, link.origin_slot, want, visited)

    # -- emission -----------------------------------------------------------------------------

    def executable_nodes(self, scope: _Scope) -> list[tuple[_Scope, Node]]:
        found: list[tuple[_Scope, Node]] = []
        for node in scope.graph.nodes.values():
            if node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
                continue
            if node.get("type") in self.definitions:
                found.extend(self.executable_nodes(self._inner_scope(scope, node)))
            elif node.get("type") not in VIRTUAL_TYPES:
                found.append((scope, node))
        return found

    def node_entry(self, scope: _Scope, node: Node) -> dict[str, Any]:
        class_type = node["type"]
        inputs: dict[str, Any] = {}
        schema = _schema(self.registry, class_type)
        if schema is not None:
            for name, value in map_widget_values(schema.widget_inputs(), node.get("widgets_values")).items():
                inputs[name] = _wrap_value(value)
            if class_type in SAVE_NODE_TYPES and isinstance(inputs.get("filename_prefix"), str):
                inputs["filename_prefix"] = self.replace_text(inputs["filename_prefix"])
        for slot, inp in enumerate(node.get("inputs") or []):
            resolved = self.resolve_input(scope, node, slot, set())
            if isinstance(resolved, _FromValue):
                inputs[inp["name"]] = _wrap_value(resolved.value)
            elif isinstance(resolved, _FromLink):
                inputs[inp["name"]] = [resolved.node_id, resolved.slot]
        return {"inputs": inputs, "class_type": class_type, "_meta": {"title": self._title(node)}}

    def convert(self) -> dict[str, Any]:
        prompt = {
            scope.exec_id(str(node["id"])): self.node_entry(scope, node) for scope, node in self.executable_nodes(self.root)
        }
        # Links into nodes that were left out (inside a muted subgraph, say) are dropped.
        for entry in prompt.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                    del entry["inputs"][name]
        return prompt


def ui_to_api(ui: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """Convert a UI-format workflow (0.4 or 1.0, with subgraphs) to an API-format prompt."""
    if not isinstance(ui.get("nodes"), list):
        raise WorkflowFormatError("not a UI-format workflow: it has no 'nodes' list")
    return _Converter(ui, registry).convert()
