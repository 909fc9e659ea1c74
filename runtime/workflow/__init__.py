"""Workflow JSON: loading (UI or API format), UI->API conversion, validation in ComfyUI's error
shape, and the executor with output caching and progress events."""
from .events import (
    STATUS_EVENTS,
    ExecutionErrorInfo,
    ExecutionListener,
    FanOutListener,
    InterruptedInfo,
    RecordingListener,
)
from .executor import ExecutionResult, Executor
from .formats import Workflow, detect_format, load_workflow, to_api
from .ui_to_api import WorkflowFormatError, ui_to_api
from .validate import ValidationResult, validate_prompt

__all__ = [
    "STATUS_EVENTS",
    "ExecutionErrorInfo",
    "ExecutionListener",
    "ExecutionResult",
    "Executor",
    "FanOutListener",
    "InterruptedInfo",
    "RecordingListener",
    "ValidationResult",
    "Workflow",
    "WorkflowFormatError",
    "detect_format",
    "load_workflow",
    "to_api",
    "ui_to_api",
    "validate_prompt",
]
