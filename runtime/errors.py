"""User-facing errors. Each names what is wrong (node, input, file, key) so the edge
(executor, CLI, server) can turn it into ComfyUI `node_errors` or an OpenAI error body."""
from __future__ import annotations

from typing import Any


class WanflowError(Exception):
    """Base of every error meant for the user; `str(e)` is the message to show."""

    error_type = "wanflow_error"

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        input_name: str | None = None,
        file: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.input_name = input_name
        self.file = file
        self.key = key

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.error_type,
            "message": self.message,
            "node": self.node,
            "input_name": self.input_name,
            "file": self.file,
            "key": self.key,
        }


class ModelFileError(WanflowError):
    """A model file is missing, truncated, of the wrong kind or of an unknown variant."""

    error_type = "model_file_error"


class InputValueError(WanflowError):
    """A node input holds a value the stage cannot use (size not a multiple of 16, ...)."""

    error_type = "invalid_input"


class JobInterrupted(WanflowError):
    """The user interrupted the running job."""

    error_type = "interrupted"

    def __init__(self, message: str = "interrupted", **kw: Any) -> None:
        super().__init__(message, **kw)


class WorkflowValidationError(WanflowError):
    """A workflow failed validation; `node_errors` uses ComfyUI's shape."""

    error_type = "prompt_outputs_failed_validation"

    def __init__(self, message: str, node_errors: dict[str, Any], details: str = "") -> None:
        super().__init__(message)
        self.node_errors = node_errors
        self.details = details
