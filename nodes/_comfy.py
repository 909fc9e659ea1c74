"""Bridges to ComfyUI that only work when running inside it.

Never imported at module import time of ComfyUI itself: we only look at modules ComfyUI has
already loaded, so the package imports the same way headless and inside ComfyUI.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from ..runtime.progress import ProgressReporter, current_reporter, reporting


def inside_comfyui() -> bool:
    return "comfy.utils" in sys.modules and "comfy.model_management" in sys.modules


@contextlib.contextmanager
def node_progress() -> Iterator[ProgressReporter]:
    """The reporter a long-running node should use: ComfyUI's progress bar and interrupt
    inside ComfyUI, otherwise whatever the headless executor installed."""
    if not inside_comfyui():
        yield current_reporter()
        return
    import comfy.model_management as mm  # noqa: PLC0415 - only inside ComfyUI
    import comfy.utils  # noqa: PLC0415

    bar: list = []

    def on_progress(value: int, total: int, preview: object) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(value, total)

    def interrupted() -> bool:
        # Raises ComfyUI's own exception so ComfyUI reports an interrupt, not a node error.
        mm.throw_exception_if_processing_interrupted()
        return False

    with reporting(ProgressReporter(on_progress=on_progress, extra_interrupt_check=interrupted)) as r:
        yield r
