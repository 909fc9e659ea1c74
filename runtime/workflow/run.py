"""Run a saved workflow file headless: load (UI or API), apply overrides, validate, execute.

What `wanflow run`, `wanflow demo` and `wanflow generate` share; the CLI only parses flags
and prints.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputValueError
from ..io_dirs import output_dir, temp_dir
from ..schema import NodeRegistry
from .events import ExecutionListener
from .executor import ExecutionResult, Executor
from .formats import load_workflow, to_api

SEED_INPUTS = ("seed", "noise_seed")


@dataclass
class RunSummary:
    prompt_id: str
    status: str
    files: list[Path]
    timings: dict[str, float]
    executed: list[str]
    cached: list[str]
    error: str | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "status": self.status,
            "files": [str(p) for p in self.files],
            "timings": self.timings,
            "executed": self.executed,
            "cached": self.cached,
            "error": self.error,
            "outputs": self.outputs,
        }

    def texts(self) -> list[str]:
        """UI text lines nodes reported (e.g. the sampler's Cache-DiT statistics)."""
        return [t for ui in self.outputs.values() for t in ui.get("text", []) if isinstance(t, str)]


def _parse_value(text: str) -> Any:
    """`--set` values: JSON where it parses (numbers, booleans, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _find_node(prompt: dict[str, Any], ref: str) -> str:
    if ref in prompt:
        return ref
    matches = [nid for nid, node in prompt.items() if node.get("_meta", {}).get("title") == ref]
    if len(matches) == 1:
        return matches[0]
    titles = ", ".join(f"{nid} ({n.get('_meta', {}).get('title', n.get('class_type'))})" for nid, n in prompt.items())
    if not matches:
        raise InputValueError(f"--set: no node with id or title '{ref}' (nodes: {titles})", input_name=ref)
    raise InputValueError(f"--set: title '{ref}' is used by nodes {', '.join(matches)}; use the node id", input_name=ref)


def apply_overrides(prompt: dict[str, Any], overrides: list[str], registry: NodeRegistry) -> None:
    """Apply `NODE.INPUT=VALUE` (NODE = id or title) in place; the input must exist on the node."""
    for item in overrides:
        target, sep, value = item.partition("=")
        ref, dot, input_name = target.rpartition(".")
        if not sep or not dot or not ref or not input_name:
            raise InputValueError(f"--set '{item}': expected NODE.INPUT=VALUE (NODE is an id or a title)")
        node_id = _find_node(prompt, ref)
        node = prompt[node_id]
        cls = registry.get(node["class_type"])
        schema = getattr(cls, "SCHEMA", None)
        if schema is not None and schema.input(input_name) is None:
            names = ", ".join(i.name for i in schema.inputs)
            raise InputValueError(
                f"--set '{item}': node {node_id} ({node['class_type']}) has no input '{input_name}' (inputs: {names})",
                node=node_id, input_name=input_name,
            )
        node.setdefault("inputs", {})[input_name] = _parse_value(value)


def apply_seed(prompt: dict[str, Any], seed: int) -> int:
    """Set every seed widget (not linked) to `seed`; returns how many were set."""
    count = 0
    for node in prompt.values():
        for name in SEED_INPUTS:
            if name in node.get("inputs", {}) and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = seed
                count += 1
    return count


def output_files(result: ExecutionResult) -> list[Path]:
    roots = {"output": output_dir(), "temp": temp_dir()}
    files = []
    for ui in result.outputs.values():
        for items in ui.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    root = roots.get(item.get("type", "output"), output_dir())
                    files.append(root / item.get("subfolder", "") / item["filename"])
    return files


def load_prompt(source: str | Path | dict[str, Any], registry: NodeRegistry) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The API prompt and, for UI files, the UI workflow (embedded in outputs' metadata)."""
    workflow = load_workflow(source)
    return to_api(workflow, registry), workflow.ui


def run_workflow(
    source: str | Path | dict[str, Any],
    registry: NodeRegistry,
    *,
    overrides: list[str] | None = None,
    seed: int | None = None,
    executor: Executor | None = None,
    listener: ExecutionListener | None = None,
) -> RunSummary:
    """Validation problems raise `WorkflowValidationError`; node failures come back as a
    summary with status "error" (so callers can still report timings of what ran)."""
    prompt, ui = load_prompt(source, registry)
    apply_overrides(prompt, overrides or [], registry)
    if seed is not None:
        apply_seed(prompt, seed)
    executor = executor or Executor(registry)
    prompt_id = str(uuid.uuid4())
    extra = {"extra_pnginfo": {"workflow": ui}} if ui else {}
    result = executor.execute(prompt, prompt_id=prompt_id, listener=listener, extra_data=extra)
    return summarize(result)


def summarize(result: ExecutionResult) -> RunSummary:
    """What a headless caller reports of an executed prompt: status, files, timings, UI texts."""
    error = None
    if result.error is not None:
        error = getattr(result.error, "exception_message", None) or "interrupted"
    return RunSummary(
        prompt_id=result.prompt_id,
        status=result.status,
        files=output_files(result),
        timings=result.timings,
        executed=result.executed,
        cached=result.cached,
        error=error,
        outputs=result.outputs,
    )


__all__ = ["RunSummary", "summarize", "apply_overrides", "apply_seed", "load_prompt", "run_workflow"]
