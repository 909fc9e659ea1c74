"""Progress and interrupt plumbing shared by every entry point.

The executor (CLI, server) installs a `ProgressReporter` for the running job; stages deep in
the runtime (the sampling loop, VAE decode) report through `current_reporter()` without knowing
who listens. Inside ComfyUI the nodes install a reporter backed by ComfyUI's own progress bar.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import JobInterrupted

ProgressFn = Callable[[int, int, Any], None]
"""(value, total, preview) -> None; preview is a latent tensor or None."""


@dataclass
class ProgressReporter:
    on_progress: ProgressFn | None = None
    interrupt_event: threading.Event = field(default_factory=threading.Event)
    extra_interrupt_check: Callable[[], bool] | None = None

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        if self.on_progress is not None:
            self.on_progress(value, total, preview)

    def interrupted(self) -> bool:
        if self.interrupt_event.is_set():
            return True
        return bool(self.extra_interrupt_check and self.extra_interrupt_check())

    def raise_if_interrupted(self) -> None:
        if self.interrupted():
            raise JobInterrupted()


_NULL = ProgressReporter()
_current: contextvars.ContextVar[ProgressReporter] = contextvars.ContextVar(
    "wanflow_progress", default=_NULL
)


def current_reporter() -> ProgressReporter:
    return _current.get()


@contextlib.contextmanager
def reporting(reporter: ProgressReporter) -> Iterator[ProgressReporter]:
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        _current.reset(token)
