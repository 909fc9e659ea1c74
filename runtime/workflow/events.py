"""What an executing job tells the outside world.

The executor calls an `ExecutionListener`; the server turns the calls into ComfyUI websocket
messages, the CLI into progress bars. `RecordingListener` writes them down in exactly the
websocket shapes (`{type, data}` as ComfyUI sends them), which is what the server's history and
the tests need.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable


def _timestamp() -> int:
    """ComfyUI stamps its status messages with milliseconds since the epoch."""
    return int(time.time() * 1000)


@dataclass
class _NodeStop:
    """Where a job stopped: the fields ComfyUI's error and interrupt payloads share."""

    node_id: str
    node_type: str
    executed: list[str]

    def message(self, prompt_id: str) -> dict[str, Any]:
        return {"prompt_id": prompt_id, "node_id": self.node_id, "node_type": self.node_type,
                "executed": list(self.executed)}


@dataclass
class ExecutionErrorInfo(_NodeStop):
    """ComfyUI's `execution_error` payload (less prompt_id), plus the exception itself."""

    exception_message: str
    exception_type: str
    traceback: list[str]
    current_inputs: dict[str, list[Any]]
    current_outputs: list[str]
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """The original exception, for callers that want its details (not sent to clients)."""

    def message(self, prompt_id: str) -> dict[str, Any]:
        return {
            **super().message(prompt_id),
            "exception_message": self.exception_message,
            "exception_type": self.exception_type,
            "traceback": list(self.traceback),
            "current_inputs": dict(self.current_inputs),
            "current_outputs": list(self.current_outputs),
        }


@dataclass
class InterruptedInfo(_NodeStop):
    """ComfyUI's `execution_interrupted` payload (less prompt_id)."""


class ExecutionListener:
    """Receives a job's events; every method is a no-op so listeners override what they need.

    Order within one job (ComfyUI's): execution_start, execution_cached, then per node
    executing -> progress* -> executed (output nodes), then execution_success |
    execution_error | execution_interrupted, and last `on_executing(prompt_id, None, None)`
    (ComfyUI's "queue item done" signal).
    """

    def on_execution_start(self, prompt_id: str) -> None:
        pass

    def on_execution_cached(self, prompt_id: str, nodes: list[str]) -> None:
        pass

    def on_executing(self, prompt_id: str, node_id: str | None, display_node: str | None) -> None:
        pass

    # `max` shadows the builtin on purpose: it is ComfyUI's field name.
    def on_progress(self, prompt_id: str, node_id: str, value: int, max: int, preview: Any) -> None:  # noqa: A002
        pass

    def on_executed(self, prompt_id: str, node_id: str, display_node: str, output: dict[str, Any]) -> None:
        pass

    def on_execution_success(self, prompt_id: str) -> None:
        pass

    def on_execution_error(self, prompt_id: str, data: ExecutionErrorInfo) -> None:
        pass

    def on_execution_interrupted(self, prompt_id: str, data: InterruptedInfo) -> None:
        pass


STATUS_EVENTS = frozenset(
    {"execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted"}
)
"""The events ComfyUI keeps in a history entry's `status.messages`."""


class RecordingListener(ExecutionListener):
    """Records `(type, data)` pairs in ComfyUI's websocket message shapes.

    `only` restricts the recorded types (e.g. `STATUS_EVENTS` for a history entry). Previews
    travel as binary websocket frames in ComfyUI, so they are kept apart in `previews` as
    `(node_id, preview)` pairs.
    """

    def __init__(self, only: Iterable[str] | None = None) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.previews: list[tuple[str, Any]] = []
        self._only = frozenset(only) if only is not None else None

    def types(self) -> list[str]:
        return [t for t, _ in self.messages]

    def _record(self, event: str, data: dict[str, Any]) -> None:
        if self._only is None or event in self._only:
            self.messages.append((event, data))

    def on_execution_start(self, prompt_id: str) -> None:
        self._record("execution_start", {"prompt_id": prompt_id, "timestamp": _timestamp()})

    def on_execution_cached(self, prompt_id: str, nodes: list[str]) -> None:
        self._record(
            "execution_cached", {"nodes": list(nodes), "prompt_id": prompt_id, "timestamp": _timestamp()}
        )

    def on_executing(self, prompt_id: str, node_id: str | None, display_node: str | None) -> None:
        data: dict[str, Any] = {"node": node_id, "prompt_id": prompt_id}
        if node_id is not None:
            data["display_node"] = display_node
        self._record("executing", data)

    def on_progress(self, prompt_id: str, node_id: str, value: int, max: int, preview: Any) -> None:  # noqa: A002
        self._record("progress", {"value": value, "max": max, "prompt_id": prompt_id, "node": node_id})
        if preview is not None:
            self.previews.append((node_id, preview))

    def on_executed(self, prompt_id: str, node_id: str, display_node: str, output: dict[str, Any]) -> None:
        self._record(
            "executed", {"node": node_id, "display_node": display_node, "output": output, "prompt_id": prompt_id}
        )

    def on_execution_success(self, prompt_id: str) -> None:
        self._record("execution_success", {"prompt_id": prompt_id, "timestamp": _timestamp()})

    def on_execution_error(self, prompt_id: str, data: ExecutionErrorInfo) -> None:
        self._record("execution_error", {**data.message(prompt_id), "timestamp": _timestamp()})

    def on_execution_interrupted(self, prompt_id: str, data: InterruptedInfo) -> None:
        self._record("execution_interrupted", {**data.message(prompt_id), "timestamp": _timestamp()})


class FanOutListener(ExecutionListener):
    """Forwards every event to several listeners, in order."""

    def __init__(self, *listeners: ExecutionListener) -> None:
        self._listeners = listeners

    def on_execution_start(self, prompt_id: str) -> None:
        for listener in self._listeners:
            listener.on_execution_start(prompt_id)

    def on_execution_cached(self, prompt_id: str, nodes: list[str]) -> None:
        for listener in self._listeners:
            listener.on_execution_cached(prompt_id, nodes)

    def on_executing(self, prompt_id: str, node_id: str | None, display_node: str | None) -> None:
        for listener in self._listeners:
            listener.on_executing(prompt_id, node_id, display_node)

    def on_progress(self, prompt_id: str, node_id: str, value: int, max: int, preview: Any) -> None:  # noqa: A002
        for listener in self._listeners:
            listener.on_progress(prompt_id, node_id, value, max, preview)

    def on_executed(self, prompt_id: str, node_id: str, display_node: str, output: dict[str, Any]) -> None:
        for listener in self._listeners:
            listener.on_executed(prompt_id, node_id, display_node, output)

    def on_execution_success(self, prompt_id: str) -> None:
        for listener in self._listeners:
            listener.on_execution_success(prompt_id)

    def on_execution_error(self, prompt_id: str, data: ExecutionErrorInfo) -> None:
        for listener in self._listeners:
            listener.on_execution_error(prompt_id, data)

    def on_execution_interrupted(self, prompt_id: str, data: InterruptedInfo) -> None:
        for listener in self._listeners:
            listener.on_execution_interrupted(prompt_id, data)
