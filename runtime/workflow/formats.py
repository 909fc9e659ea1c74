"""Loading workflow JSON and telling its two formats apart.

API format (what the editor queues, "Export (API)"): `{id: {class_type, inputs, _meta}}`.
UI format (what the editor saves): `{nodes, links, widgets_values..., version}`; schema 0.4
stores links as arrays, 1.0 as objects; both may carry `definitions.subgraphs`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import WanflowError
from ..schema import NodeRegistry
from .ui_to_api import WorkflowFormatError, ui_to_api

WorkflowFormat = Literal["api", "ui"]


@dataclass(frozen=True)
class Workflow:
    format: WorkflowFormat
    data: dict[str, Any]
    source: str
    """The file it came from, or "<dict>" / "<json>"; used in error messages."""

    @property
    def ui(self) -> dict[str, Any] | None:
        """The editor's workflow (what SaveImage embeds as `workflow`), when this is one."""
        return self.data if self.format == "ui" else None


def detect_format(data: Any) -> WorkflowFormat | None:
    if not isinstance(data, dict) or not data:
        return None
    if isinstance(data.get("nodes"), list):
        return "ui"
    if all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    return None


def _read(source: str | Path) -> tuple[Any, str]:
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text, name = source, "<json>"
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise WanflowError(f"cannot read workflow file {path}: {e.strerror or e}", file=str(path)) from e
        name = str(path)
    try:
        return json.loads(text), name
    except json.JSONDecodeError as e:
        raise WorkflowFormatError(f"{name} is not valid JSON: {e}", file=name) from e


def load_workflow(source: str | Path | dict[str, Any]) -> Workflow:
    """A workflow from a file path, a JSON string or an already parsed dict."""
    if isinstance(source, dict):
        data, name = source, "<dict>"
    else:
        data, name = _read(source)
    fmt = detect_format(data)
    if fmt is None:
        raise WorkflowFormatError(
            f"{name} is neither an API-format prompt ({{id: {{class_type, inputs}}}}) nor a UI-format "
            "workflow (with a 'nodes' list)",
            file=name,
        )
    return Workflow(fmt, data, name)


def to_api(workflow: Workflow, registry: NodeRegistry) -> dict[str, Any]:
    """The API-format prompt of a workflow (a copy: callers may mutate it)."""
    if workflow.format == "api":
        return copy.deepcopy(workflow.data)
    return ui_to_api(workflow.data, registry)
