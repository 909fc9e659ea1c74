"""What keeps a local server local: the API key, error bodies in each API's shape, and paths
that can never leave their directory.

API key (optional, `--api-key`): when set, every route needs it, the graph editor's static
files included (the editor is a full client of the API, so hiding only the API would protect
nothing). Scripts send `Authorization: Bearer KEY` (what the `openai` client does) or
`X-API-Key: KEY`. A browser cannot add headers to its own page loads and websocket, so opening
`http://host:port/?token=KEY` once stores the key in an HttpOnly cookie that the browser then
sends with every request.
"""
from __future__ import annotations

import hmac
import logging
import os
import re
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from ..errors import WanflowError

log = logging.getLogger(__name__)

COOKIE = "wanflow_api_key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UnsafePathError(WanflowError):
    """A client-supplied file name or subfolder points outside its directory."""

    error_type = "invalid_path"


class ErrorResponse(Exception):
    """Raised by helpers deep in a handler to answer with a ready error response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def confined_path(root: str | os.PathLike, subfolder: str, filename: str) -> Path:
    """`root/subfolder/filename`, refusing anything that could name a file outside `root`.

    Refused: absolute paths, drive letters, `..` components, backslashes and NUL bytes, and
    (after resolving symlinks) any result that is not inside `root`.
    """
    base = Path(root).resolve()
    parts: list[str] = []
    for label, value in (("subfolder", subfolder or ""), ("filename", filename)):
        if "\x00" in value or "\\" in value or re.match(r"^[A-Za-z]:", value) or value.startswith("/"):
            raise UnsafePathError(f"{label} '{value}' is not a plain relative name", key=label)
        for part in value.split("/"):
            if part == "..":
                raise UnsafePathError(f"{label} '{value}' may not contain '..'", key=label)
            if part not in ("", "."):
                parts.append(part)
    if not filename or not parts:
        raise UnsafePathError("filename is empty", key="filename")
    full = base.joinpath(*parts).resolve()
    if full != base and base not in full.parents:
        raise UnsafePathError(f"'{'/'.join(parts)}' resolves outside its directory", key="filename")
    return full


_COMFY_ROOTS = frozenset({
    "api", "prompt", "queue", "history", "object_info", "view", "interrupt", "free", "system_stats",
    "upload", "internal", "jobs", "users", "settings", "userdata", "v2", "models", "embeddings",
    "extensions", "features", "i18n", "workflow_templates", "experiment", "ws",
})
"""First path segments of ComfyUI's API routes (they are also served without the /api prefix)."""


def api_flavour(path: str) -> str:
    """Which error shape a path's clients expect: "openai", "comfy" (JSON) or "web" (static)."""
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    first = path.split("/", 2)[1] if path.count("/") else ""
    if first in _COMFY_ROOTS:
        return "comfy"
    return "web"


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    """OpenAI's error body: {"error": {message, type, param, code}}."""
    body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return web.json_response(body, status=status)


def comfy_error(status: int, message: str, *, error_type: str = "error", details: str = "") -> web.Response:
    """ComfyUI's error body for non-validation failures."""
    body = {"error": {"type": error_type, "message": message, "details": details, "extra_info": {}}}
    return web.json_response(body, status=status)


def error_response(request: web.Request, status: int, message: str, *, code: str | None = None) -> web.StreamResponse:
    flavour = api_flavour(request.path)
    if flavour == "openai":
        return openai_error(status, message, code=code)
    if flavour == "comfy":
        return comfy_error(status, message, error_type=code or "error")
    return web.Response(status=status, text=message)


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-API-Key") or request.query.get("token") or request.cookies.get(COOKIE)


def api_key_middleware(api_key: str) -> Callable:
    expected = api_key.encode()

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = _presented_key(request)
        if presented is None or not hmac.compare_digest(presented.encode(), expected):
            return error_response(request, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
        response = await handler(request)
        if "token" in request.query and request.cookies.get(COOKIE) != presented:
            response.set_cookie(COOKIE, presented, httponly=True, samesite="Strict")
        return response

    return check_key


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes, oversized bodies and unexpected failures answered in the caller's shape."""
    try:
        return await handler(request)
    except ErrorResponse as exc:
        return exc.response
    except web.HTTPException as exc:
        if exc.status < 400 or api_flavour(request.path) == "web":
            raise
        message = {404: f"no route {request.method} {request.path}",
                   405: f"method {request.method} not allowed on {request.path}",
                   413: "request body too large"}.get(exc.status, exc.reason)
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        return error_response(request, exc.status, message, code=code)
    except UnsafePathError as exc:
        return error_response(request, 400, exc.message, code=exc.error_type)
    except Exception:  # noqa: BLE001 - the edge: log it, answer 500, keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(request, 500, "internal server error", code="internal_error")
