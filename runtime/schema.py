"""One declaration per node, from which everything else is derived.

ComfyUI's own node schema API (`comfy_api` `define_schema`) cannot be imported outside ComfyUI,
so wanflow carries a tiny equivalent: a node declares its inputs and outputs once, and
ComfyUI's class attributes (`INPUT_TYPES`, `RETURN_TYPES`, ...), the headless validator and the
server's `/object_info` all read that one declaration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass(frozen=True)
class Input:
    name: str
    type: str
    """INT, FLOAT, STRING, BOOLEAN, COMBO (widgets) or a link type such as LATENT."""
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[], Sequence[str]] | None = None
    """COMBO choices; a callable is re-evaluated on each query (file lists change)."""
    multiline: bool = False
    tooltip: str = ""
    optional: bool = False
    control_after_generate: bool = False
    """Seed-like INT: ComfyUI's UI stores one extra widget value right after this one."""
    force_input: bool = False
    extra: tuple[tuple[str, Any], ...] = ()
    """Further ComfyUI spec options passed through as they are (e.g. ("image_upload", True))."""

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def choices(self) -> list[str]:
        opts = self.options() if callable(self.options) else self.options
        return list(opts or [])

    def comfy_spec(self) -> tuple:
        """The `(type, options)` tuple ComfyUI's INPUT_TYPES and /object_info use."""
        opts: dict[str, Any] = {}
        if self.default is not None:
            opts["default"] = self.default
        for key in ("min", "max", "step"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.multiline:
            opts["multiline"] = True
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.force_input:
            opts["forceInput"] = True
        opts.update(self.extra)
        if self.type == "COMBO":
            return (self.choices(), opts)
        return (self.type, opts)


@dataclass(frozen=True)
class Output:
    type: str
    name: str = ""
    tooltip: str = ""

    @property
    def display_name(self) -> str:
        return self.name or self.type


@dataclass(frozen=True)
class Hidden:
    """Values the executor supplies: ComfyUI's hidden inputs."""

    name: str
    kind: str  # PROMPT | EXTRA_PNGINFO | UNIQUE_ID


@dataclass(frozen=True)
class NodeSchema:
    node_id: str
    display_name: str
    category: str
    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()
    hidden: tuple[Hidden, ...] = ()
    description: str = ""
    output_node: bool = False

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def widget_inputs(self) -> list[Input]:
        """Widgets in the order ComfyUI's frontend stores their values: required, then optional."""
        widgets = [i for i in self.inputs if i.is_widget]
        return [i for i in widgets if not i.optional] + [i for i in widgets if i.optional]

    def input_types(self) -> dict[str, dict[str, Any]]:
        required = {i.name: i.comfy_spec() for i in self.inputs if not i.optional}
        optional = {i.name: i.comfy_spec() for i in self.inputs if i.optional}
        result: dict[str, dict[str, Any]] = {"required": required}
        if optional:
            result["optional"] = optional
        if self.hidden:
            result["hidden"] = {h.name: h.kind for h in self.hidden}
        return result

    def object_info(self, python_module: str = "custom_nodes.wanflow") -> dict[str, Any]:
        types = self.input_types()
        return {
            "input": types,
            "input_order": {k: list(v) for k, v in types.items()},
            "output": [o.type for o in self.outputs],
            "output_is_list": [False for _ in self.outputs],
            "output_name": [o.display_name for o in self.outputs],
            "output_tooltips": [o.tooltip for o in self.outputs],
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": python_module,
            "category": self.category,
            "output_node": self.output_node,
        }


class SchemaNode:
    """Base for every wanflow node: subclasses set `SCHEMA` and implement `execute`.

    The ComfyUI class attributes are derived here so they can never disagree with the schema.
    """

    SCHEMA: ClassVar[NodeSchema]
    FUNCTION: ClassVar[str] = "execute"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        schema = cls.__dict__.get("SCHEMA")
        if schema is None:
            return
        cls.RETURN_TYPES = tuple(o.type for o in schema.outputs)
        cls.RETURN_NAMES = tuple(o.display_name for o in schema.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in schema.outputs)
        cls.CATEGORY = schema.category
        cls.OUTPUT_NODE = schema.output_node
        cls.DESCRIPTION = schema.description

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # noqa: N802 - ComfyUI's name
        return cls.SCHEMA.input_types()


def schema_of(node_class: type) -> NodeSchema | None:
    return getattr(node_class, "SCHEMA", None)


@dataclass
class NodeRegistry:
    """class_type -> node class; what the executor, validator and /object_info consult."""

    classes: dict[str, type] = field(default_factory=dict)
    display_names: dict[str, str] = field(default_factory=dict)

    def get(self, class_type: str) -> type | None:
        return self.classes.get(class_type)

    def object_info(self) -> dict[str, Any]:
        info = {}
        for name, cls in self.classes.items():
            schema = schema_of(cls)
            if schema is not None:
                info[name] = schema.object_info()
        return info
