"""Terminal progress for headless runs: one tqdm bar per node that reports steps."""
from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

from ..runtime.workflow.events import ExecutionListener

log = logging.getLogger("wanflow")


class TqdmListener(ExecutionListener):
    def __init__(self, titles: dict[str, str], stream: Any = sys.stderr) -> None:
        self.titles = titles
        self.stream = stream
        self.bar: tqdm | None = None
        self.bar_node: str | None = None

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_node = None, None

    def on_executing(self, prompt_id: str, node_id: str | None, display_node: str | None) -> None:
        self._close()
        if node_id is not None:
            log.info("running node %s (%s)", node_id, self.titles.get(node_id, "?"))

    def on_progress(self, prompt_id: str, node_id: str, value: int, max: int, preview: Any) -> None:  # noqa: A002
        if self.bar_node != node_id:
            self._close()
            self.bar = tqdm(total=max, desc=self.titles.get(node_id, node_id), file=self.stream, unit="step")
            self.bar_node = node_id
        self.bar.n = value
        self.bar.refresh()

    def on_execution_success(self, prompt_id: str) -> None:
        self._close()

    def on_execution_error(self, prompt_id: str, data: Any) -> None:
        self._close()

    def on_execution_interrupted(self, prompt_id: str, data: Any) -> None:
        self._close()
