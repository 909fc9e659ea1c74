"""The one worker: drains the job store's queue in order, in a thread, through the executor.

One executor instance lives as long as the server, so its per-node output cache and the model
cache keep models warm between jobs. Every event of the running job goes three ways: to the
websocket hub (ComfyUI clients, the graph editor), to the job store (progress for the OpenAI
shim and the jobs API) and into the job's history entry (ComfyUI's `status.messages`).
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable

from ..errors import WorkflowValidationError
from ..workflow.events import ExecutionErrorInfo, ExecutionListener, InterruptedInfo, RecordingListener
from .jobs import CANCELLED, COMPLETED, FAILED, Job, JobStore
from .ws import WebSocketHub, encode_png, preview_frame

log = logging.getLogger(__name__)

_FINAL_EVENTS = frozenset({"execution_success", "execution_error", "execution_interrupted"})
PROGRESS_WRITE_STEP = 0.01
"""Write progress to sqlite only when it moved by at least 1 %: the bar needs no more."""


def render_preview(preview: Any) -> bytes | None:
    """PNG bytes of a progress preview: a latent tensor (projected to RGB) or a PIL image."""
    if preview is None:
        return None
    if hasattr(preview, "save"):
        return encode_png(preview)
    try:
        from ..sampling.preview import latent_preview_rgb  # noqa: PLC0415 - torch-heavy, only when previews flow
    except ImportError:  # previews are optional: a build without them still runs jobs
        return None
    return encode_png(latent_preview_rgb(preview))


class _JobListener(ExecutionListener):
    """Forwards one job's events to the websocket hub and the job store."""

    def __init__(self, job: Job, store: JobStore, hub: WebSocketHub, previews: bool) -> None:
        self.job, self.store, self.hub, self.previews = job, store, hub, previews
        self.sid = job.client_id
        self.recorder = RecordingListener()
        self.meta: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.final: list[tuple[str, Any]] = []
        self._written_progress = 0.0

    def _forward(self) -> None:
        # RecordingListener builds ComfyUI's exact message shapes; send what it just recorded.
        event, data = self.recorder.messages.pop()
        if event in _FINAL_EVENTS:
            # Held back until the job is in the store: a client that reads /history or the
            # video on `execution_success` must find it there.
            self.final.append((event, data))
        else:
            self.hub.send_sync(event, data, self.sid)

    def send_final(self) -> None:
        for event, data in self.final:
            self.hub.send_sync(event, data, self.sid)
        # ComfyUI's "this queue item is done" signal; always last.
        self.hub.send_sync("executing", {"node": None, "prompt_id": self.job.id}, self.sid)

    def on_execution_start(self, prompt_id: str) -> None:
        self.recorder.on_execution_start(prompt_id)
        self._forward()

    def on_execution_cached(self, prompt_id: str, nodes: list[str]) -> None:
        self.recorder.on_execution_cached(prompt_id, nodes)
        self._forward()

    def on_executing(self, prompt_id: str, node_id: str | None, display_node: str | None) -> None:
        if node_id is None:
            return  # the end-of-job signal: `send_final` sends it once the job is stored
        self.recorder.on_executing(prompt_id, node_id, display_node)
        self._forward()

    def on_progress(self, prompt_id: str, node_id: str, value: int, max: int, preview: Any) -> None:  # noqa: A002
        self.recorder.on_progress(prompt_id, node_id, value, max, None)
        self._forward()
        if self.previews and preview is not None:
            try:
                png = render_preview(preview)
            except Exception:  # noqa: BLE001 - a failed preview must never fail the job
                log.debug("preview rendering failed", exc_info=True)
                png = None
            if png is not None:
                self.hub.send_sync("preview", preview_frame(png), self.sid)
        fraction = value / max if max else 0.0
        if abs(fraction - self._written_progress) >= PROGRESS_WRITE_STEP or fraction >= 1.0:
            self._written_progress = fraction
            self.store.set_progress(self.job.id, fraction)

    def on_executed(self, prompt_id: str, node_id: str, display_node: str, output: dict[str, Any]) -> None:
        self.outputs[node_id] = output
        self.meta[node_id] = {"node_id": node_id, "display_node": display_node, "parent_node": None,
                              "real_node_id": display_node}
        self.recorder.on_executed(prompt_id, node_id, display_node, output)
        self._forward()

    def on_execution_success(self, prompt_id: str) -> None:
        self.recorder.on_execution_success(prompt_id)
        self._forward()

    def on_execution_error(self, prompt_id: str, data: ExecutionErrorInfo) -> None:
        self.recorder.on_execution_error(prompt_id, data)
        self._forward()

    def on_execution_interrupted(self, prompt_id: str, data: InterruptedInfo) -> None:
        self.recorder.on_execution_interrupted(prompt_id, data)
        self._forward()


class Worker:
    def __init__(
        self,
        store: JobStore,
        executor: Any,
        hub: WebSocketHub,
        *,
        previews: bool = True,
        on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        self.store, self.executor, self.hub = store, executor, hub
        self.previews = previews
        self.on_finish = on_finish
        self.running: Job | None = None
        self._interrupt = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wanflow-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running job (interrupted, so that is at most one sampling step)."""
        self._stop.set()
        self._interrupt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """A job was queued: look at the queue now rather than at the next poll."""
        self._wake.set()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running job (only if it is `prompt_id`, when given)."""
        running = self.running
        if running is None or (prompt_id is not None and running.id != prompt_id):
            return False
        self._interrupt.set()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                continue
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - the store or hub failed: keep the worker alive
                log.exception("worker could not complete job %s", job.id)
                self.running = None

    def _run(self, job: Job) -> None:
        self._interrupt.clear()
        self.running = job
        self.hub.queue_updated()
        listener = _JobListener(job, self.store, self.hub, self.previews)
        started = time.perf_counter()
        error: dict[str, Any] | None = None
        timings: dict[str, float] = {}
        messages: list[list[Any]] = []
        outputs = listener.outputs
        try:
            result = self.executor.execute(
                job.prompt, prompt_id=job.id, listener=listener, extra_data=job.extra_data,
                interrupt=self._interrupt, outputs=job.outputs_to_execute or None,
            )
            status = {"success": COMPLETED, "interrupted": CANCELLED}.get(result.status, FAILED)
            timings, messages = result.timings, [list(m) for m in result.messages]
            outputs = result.outputs
            if status == FAILED:
                error = _error_of(result)
        except WorkflowValidationError as exc:
            # Valid when queued, invalid now (a model file removed meanwhile, a restart with
            # other nodes): ComfyUI's validation shape, so clients show it like a POST /prompt error.
            status = FAILED
            error = {"exception_message": exc.message, "exception_type": exc.error_type,
                     "node_errors": exc.node_errors, "traceback": [], "node_id": None, "node_type": None}
        except Exception as exc:  # noqa: BLE001 - the executor failed outside any node: record it, go on
            log.exception("job %s failed outside the executor's error handling", job.id)
            status = FAILED
            error = {"exception_message": str(exc), "exception_type": type(exc).__name__,
                     "traceback": traceback.format_exception(exc), "node_id": None, "node_type": None}
        elapsed = time.perf_counter() - started
        if status == CANCELLED and self._stop.is_set():
            # Interrupted by the server shutting down, not by a user: it runs again after a restart.
            self.store.requeue(job.id)
            self.running = None
            log.info("job %s (%s) stopped by shutdown after %.2f s; back in the queue", job.id, job.source, elapsed)
            return
        self.store.finish(job.id, status, outputs=outputs, messages=messages, meta=listener.meta, error=error)
        self.running = None
        listener.send_final()
        self.hub.queue_updated()
        waited = (job.started_at or 0) - job.created_at
        slowest = sorted(timings.items(), key=lambda kv: -kv[1])[:3]
        log.info(
            "job %s (%s) %s in %.2f s after %.2f s queued%s", job.id, job.source, status, elapsed, waited,
            "; slowest nodes " + ", ".join(f"{n} {t:.2f} s" for n, t in slowest) if slowest else "",
        )
        if self.on_finish is not None:
            finished = self.store.get(job.id)
            if finished is not None:
                self.on_finish(finished)


def _error_of(result: Any) -> dict[str, Any] | None:
    info = getattr(result, "error", None)
    if info is None:
        return None
    if isinstance(info, ExecutionErrorInfo):
        return {k: v for k, v in info.message("").items() if k != "prompt_id"}
    if isinstance(info, dict):
        return info
    return {"exception_message": str(info), "exception_type": type(info).__name__}
