"""Runs an API-format prompt the way ComfyUI's `PromptExecutor` does, without ComfyUI.

- Only nodes some output node depends on run, each after its inputs (outputs as early as they
  can, like ComfyUI's UX-friendly order).
- Each node's outputs are cached under a signature of its class, its own input values and its
  ancestors' signatures (ComfyUI's input-signature cache), so re-running a prompt recomputes only
  what changed downstream of a change. `IS_CHANGED` / `fingerprint_inputs` join the signature
  (NaN: always re-run); nodes declaring `NOT_IDEMPOTENT` or a UNIQUE_ID hidden input are keyed by
  their id too. As in ComfyUI's classic cache, entries the current prompt does not use are freed
  when it starts, and output nodes whose signature is unchanged are not re-run: their cached UI
  output is re-sent.
- Nodes are called ComfyUI's way (`getattr(cls(), cls.FUNCTION)(**inputs)`; a tuple or
  `{"ui": ..., "result": (...)}`); node instances are kept per node id between runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import JobInterrupted, WanflowError
from ..progress import ProgressReporter, reporting
from ..schema import NodeRegistry, NodeSchema
from .events import (
    STATUS_EVENTS,
    ExecutionErrorInfo,
    ExecutionListener,
    FanOutListener,
    InterruptedInfo,
    RecordingListener,
)
from .validate import full_type_name, is_link, node_schema, unwrap_value, validate_prompt

log = logging.getLogger(__name__)

Status = Literal["success", "error", "interrupted"]


class _Always:
    """Marks a node whose outputs must never be reused (its IS_CHANGED said NaN or failed)."""


_ALWAYS = _Always()


@dataclass
class ExecutionResult:
    prompt_id: str
    status: Status
    outputs: dict[str, dict[str, Any]]
    """Output node id -> its UI dict (`{"images": [...]}`), cached ones included: history's `outputs`."""
    timings: dict[str, float]
    """Seconds per node that ran this time."""
    executed: list[str]
    """Nodes that ran this time, in order."""
    cached: list[str]
    """Nodes whose cached outputs were reused."""
    error: ExecutionErrorInfo | InterruptedInfo | None = None
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """ComfyUI's history `status.messages`: start, cached, and success / error / interrupted."""


def _format_value(value: Any) -> Any:
    """How ComfyUI shows an input in an error report: scalars as they are, the rest as str()."""
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def split_node_result(raw: Any, node_id: str = "?", class_type: str = "?") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A node function's return value as (outputs, ui): a tuple, or ComfyUI's {"ui", "result"}."""
    ui: dict[str, Any] = {}
    result = raw
    if isinstance(raw, dict):
        ui = dict(raw.get("ui") or {})
        result = raw.get("result", ())
    if result is None:
        result = ()
    if not isinstance(result, (tuple, list)):
        raise WanflowError(
            f"node {node_id} ({class_type}) returned {type(result).__name__}; a node returns a tuple of outputs",
            node=node_id,
        )
    return tuple(result), ui


class Executor:
    """Runs prompts one at a time; keeps node outputs cached between `execute` calls."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._outputs: dict[str, tuple[Any, ...]] = {}
        self._ui: dict[str, dict[str, Any]] = {}
        self._objects: dict[tuple[str, str], Any] = {}
        self._default_interrupt = threading.Event()
        self._running_interrupt: threading.Event | None = None

    def interrupt(self) -> None:
        """Stop the running job at the next node or progress step (ComfyUI's POST /interrupt)."""
        (self._running_interrupt or self._default_interrupt).set()

    def clear_cache(self) -> None:
        """Forget every cached output and node instance (ComfyUI's POST /free)."""
        with self._lock:
            self._outputs.clear()
            self._ui.clear()
            self._objects.clear()

    def execute(
        self,
        prompt: dict[str, Any],
        *,
        prompt_id: str,
        listener: ExecutionListener | None = None,
        extra_data: dict[str, Any] | None = None,
        interrupt: threading.Event | None = None,
        outputs: list[str] | None = None,
    ) -> ExecutionResult:
        """Validate and run `prompt`; `outputs` limits the run to some output nodes.

        Raises `WorkflowValidationError` when no output can run; node failures and interrupts are
        reported through the listener and the result's status instead. Without `interrupt`, the
        executor's own event is used (and cleared at the start of each job, as ComfyUI does).
        """
        validation = validate_prompt(prompt, self.registry)
        validation.raise_if_invalid()
        targets = [o for o in validation.outputs if outputs is None or o in outputs]
        status_log = RecordingListener(only=STATUS_EVENTS)
        events = FanOutListener(status_log, listener or ExecutionListener())
        with self._lock:
            if interrupt is None:
                # Cleared only once this job owns the executor: an earlier job may still be stopping.
                interrupt = self._default_interrupt
                interrupt.clear()
            self._running_interrupt = interrupt
            try:
                run = _Run(self, validation.prompt, prompt_id, events, extra_data or {}, interrupt)
                result = run.execute(targets)
            finally:
                self._running_interrupt = None
        events.on_executing(prompt_id, None, None)
        result.messages = status_log.messages
        return result


class _Run:
    """One `execute` call: the prompt, its cache keys and where it has got to."""

    def __init__(
        self,
        executor: Executor,
        prompt: dict[str, Any],
        prompt_id: str,
        events: ExecutionListener,
        extra_data: dict[str, Any],
        interrupt: threading.Event,
    ) -> None:
        self.ex = executor
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.events = events
        self.extra_data = extra_data
        self.interrupt = interrupt
        self.keys: dict[str, str] = {}
        self.executed: list[str] = []
        self.timings: dict[str, float] = {}

    def schema(self, node_id: str) -> NodeSchema:
        schema = node_schema(self.ex.registry, self.prompt[node_id]["class_type"])
        assert schema is not None  # validated
        return schema

    def links(self, node_id: str) -> list[str]:
        """Nodes this one takes links from, in schema input order."""
        inputs = self.prompt[node_id]["inputs"]
        return [str(inputs[i.name][0]) for i in self.schema(node_id).inputs if is_link(inputs.get(i.name))]

    # -- cache keys ------------------------------------------------------------------------------

    def key(self, node_id: str) -> str:
        if node_id not in self.keys:
            self.keys[node_id] = self._signature(node_id)
        return self.keys[node_id]

    def _signature(self, node_id: str) -> str:
        node = self.prompt[node_id]
        cls = self.ex.registry.get(node["class_type"])
        schema = self.schema(node_id)
        changed = self._is_changed(node_id, cls, schema)
        if changed is _ALWAYS:
            return f"uncacheable:{uuid.uuid4()}"
        parts: list[Any] = [node["class_type"], changed]
        if getattr(cls, "NOT_IDEMPOTENT", False) or any(h.kind == "UNIQUE_ID" for h in schema.hidden):
            parts.append(node_id)
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            parts.append([name, ["link", self.key(str(value[0])), value[1]] if is_link(value) else value])
        # A digest keeps keys small however deep the graph (nested tuples would rehash every ancestor).
        text = json.dumps(parts, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def _is_changed(self, node_id: str, cls: Any, schema: NodeSchema) -> Any:
        check = getattr(cls, "fingerprint_inputs", None) or getattr(cls, "IS_CHANGED", None)
        if check is None:
            return None
        try:
            # Like ComfyUI: constants only; linked inputs are not computed yet and arrive as None.
            value = check(**self.inputs(node_id, schema, links_as_none=True))
        except Exception as ex:  # noqa: BLE001 - a failing check means "re-run", as in ComfyUI
            log.warning("IS_CHANGED of node %s failed (%s); it will re-run", node_id, ex)
            return _ALWAYS
        if isinstance(value, float) and math.isnan(value):
            return _ALWAYS
        return value

    # -- inputs ----------------------------------------------------------------------------------

    def inputs(self, node_id: str, schema: NodeSchema, links_as_none: bool = False) -> dict[str, Any]:
        given = self.prompt[node_id]["inputs"]
        kwargs: dict[str, Any] = {}
        for inp in schema.inputs:
            if inp.name not in given:
                continue
            value = given[inp.name]
            if not is_link(value):
                kwargs[inp.name] = unwrap_value(value)
            elif links_as_none:
                kwargs[inp.name] = None
            else:
                kwargs[inp.name] = self._upstream_value(node_id, inp.name, str(value[0]), value[1])
        for hidden in schema.hidden:
            if hidden.kind == "PROMPT":
                kwargs[hidden.name] = self.prompt
            elif hidden.kind == "EXTRA_PNGINFO":
                kwargs[hidden.name] = self.extra_data.get("extra_pnginfo")
            elif hidden.kind == "UNIQUE_ID":
                kwargs[hidden.name] = node_id
        return kwargs

    def _upstream_value(self, node_id: str, input_name: str, source: str, slot: int) -> Any:
        produced = self.ex._outputs[self.key(source)]
        if slot >= len(produced):
            raise WanflowError(
                f"input '{input_name}' of node {node_id} needs output {slot} of node {source} "
                f"({self.prompt[source]['class_type']}), which returned only {len(produced)} outputs",
                node=node_id,
                input_name=input_name,
            )
        return produced[slot]

    # -- running ---------------------------------------------------------------------------------

    def is_cached(self, node_id: str) -> bool:
        return self.key(node_id) in self.ex._outputs

    def order(self, targets: list[str]) -> list[str]:
        """Post-order from each output: its missing dependencies, then the output itself."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for source in self.links(node_id):
                if not self.is_cached(source):
                    visit(source)
            order.append(node_id)

        for target in targets:
            visit(target)
        return order

    def needed(self, targets: list[str]) -> list[str]:
        seen: dict[str, None] = {}
        pending = list(targets)
        while pending:
            node_id = pending.pop()
            if node_id not in seen:
                seen[node_id] = None
                pending.extend(self.links(node_id))
        return [n for n in self.prompt if n in seen]

    def _free_unused(self, used: set[str]) -> None:
        for cache in (self.ex._outputs, self.ex._ui):
            for key in [k for k in cache if k not in used]:
                del cache[key]
        for obj_key in [k for k in self.ex._objects if self.prompt.get(k[0], {}).get("class_type") != k[1]]:
            del self.ex._objects[obj_key]

    def execute(self, targets: list[str]) -> ExecutionResult:
        self.events.on_execution_start(self.prompt_id)
        needed = self.needed(targets)
        self._free_unused({self.key(n) for n in needed})
        cached = [n for n in needed if self.is_cached(n)]
        self.events.on_execution_cached(self.prompt_id, cached)

        error: ExecutionErrorInfo | InterruptedInfo | None = None
        for node_id in self.order(targets):
            if self.is_cached(node_id):
                ui = self.ex._ui.get(self.key(node_id))
                if ui:
                    self.events.on_executed(self.prompt_id, node_id, node_id, ui)
                continue
            error = self._run_node(node_id)
            if error is not None:
                break

        if error is None:
            status: Status = "success"
            self.events.on_execution_success(self.prompt_id)
        elif isinstance(error, InterruptedInfo):
            status = "interrupted"
            self.events.on_execution_interrupted(self.prompt_id, error)
        else:
            status = "error"
            self.events.on_execution_error(self.prompt_id, error)
        outputs = {n: self.ex._ui[self.key(n)] for n in needed if self.key(n) in self.ex._ui}
        return ExecutionResult(
            prompt_id=self.prompt_id,
            status=status,
            outputs=outputs,
            timings=self.timings,
            executed=list(self.executed),
            cached=cached,
            error=error,
        )

    def _run_node(self, node_id: str) -> ExecutionErrorInfo | InterruptedInfo | None:
        class_type = self.prompt[node_id]["class_type"]
        cls = self.ex.registry.get(class_type)
        kwargs: dict[str, Any] | None = None
        try:
            if self.interrupt.is_set():
                raise JobInterrupted()
            kwargs = self.inputs(node_id, self.schema(node_id))
            self.events.on_executing(self.prompt_id, node_id, node_id)
            obj = self.ex._objects.get((node_id, class_type))
            if obj is None:
                obj = self.ex._objects[(node_id, class_type)] = cls()  # type: ignore[misc]

            def on_progress(value: int, total: int, preview: Any = None) -> None:
                self.events.on_progress(self.prompt_id, node_id, value, total, preview)

            started = time.perf_counter()
            with reporting(ProgressReporter(on_progress=on_progress, interrupt_event=self.interrupt)):
                raw = getattr(obj, cls.FUNCTION)(**kwargs)  # type: ignore[union-attr]
            self.timings[node_id] = time.perf_counter() - started
            produced, ui = split_node_result(raw, node_id, class_type)
        except JobInterrupted:
            log.info("job %s interrupted at node %s", self.prompt_id, node_id)
            return InterruptedInfo(node_id, class_type, list(self.executed))
        except Exception as ex:  # noqa: BLE001 - any node failure is reported, never raised
            typ, _, tb = sys.exc_info()
            log.exception("node %s (%s) failed", node_id, class_type)
            available = [n for n in self.prompt if n in self.keys and self.keys[n] in self.ex._outputs]
            return ExecutionErrorInfo(
                node_id=node_id,
                node_type=class_type,
                executed=list(self.executed),
                exception_message=str(ex),
                exception_type=full_type_name(typ),  # type: ignore[arg-type]
                traceback=traceback.format_tb(tb),
                current_inputs={k: [_format_value(v)] for k, v in (kwargs or {}).items()},
                current_outputs=available,
                exception=ex,
            )
        key = self.key(node_id)
        self.ex._outputs[key] = produced
        if ui:
            self.ex._ui[key] = ui
            self.events.on_executed(self.prompt_id, node_id, node_id, ui)
        self.executed.append(node_id)
        log.debug("node %s (%s) ran in %.3f s", node_id, class_type, self.timings[node_id])
        return None

