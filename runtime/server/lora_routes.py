"""SGLang's LoRA endpoints: a server-wide LoRA stack for the OpenAI shim's jobs.

`/v1/set_lora` names the active LoRAs (files in models/loras, under a nickname), `unmerge`
takes them out of effect and `merge` puts them back (optionally at a new strength). Jobs
submitted through /v1/videos and /v1/images/generations afterwards carry that stack as LoRA
nodes in their workflow, unless the request names its own `loras`. ComfyUI prompts are left
alone: a graph says exactly what it runs.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import PurePosixPath
from typing import Any

from aiohttp import web

from ..errors import WanflowError
from ..lora import LoraManager
from ..paths import models_dir, resolve_model
from ..workflow.templates import RequestLora
from .security import openai_error


def resolve_confined(name: str) -> str:
    """A LoRA named relative to models/loras; absolute paths and `..` are refused."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise WanflowError(f"lora_path '{name}' must be a file name inside models/loras", key="lora_path")
    return str(resolve_model("loras", name))


def new_manager() -> LoraManager:
    return LoraManager(resolve=resolve_confined)


def active_stack(manager: LoraManager) -> list[RequestLora]:
    """The merged LoRAs of the server-wide stack, as per-request LoRA entries."""
    root = models_dir() / "loras"
    return [RequestLora(os.path.relpath(spec.path, root).replace(os.sep, "/"), spec.strength, spec.target)
            for spec in manager.server_stack()]


def nicknames(manager: LoraManager) -> dict[str, str]:
    root = models_dir() / "loras"
    return {a["nickname"]: os.path.relpath(a["path"], root).replace(os.sep, "/")
            for a in manager.list_loras()["loaded_adapters"]}


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json() if request.can_read_body else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return openai_error(400, f"body is not JSON: {e}")
    if not isinstance(body, dict):
        return openai_error(400, "body must be a JSON object")
    return body


def add_routes(routes: web.RouteTableDef, server: Any) -> None:  # server: app.WanflowServer
    manager = server.loras

    async def run(call, *args: Any) -> web.Response:
        # File reads (set_lora checks each LoRA) stay off the event loop; the lock keeps two
        # changes from interleaving.
        try:
            async with server.lora_lock:
                return web.json_response(await asyncio.to_thread(call, *args))
        except WanflowError as e:
            return openai_error(400, e.message, param=e.key or e.input_name, code=e.error_type)

    @routes.post("/v1/set_lora")
    async def set_lora(request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        if not body.get("lora_nickname"):
            return openai_error(400, "lora_nickname is required", param="lora_nickname")
        return await run(manager.set_lora, body["lora_nickname"], body.get("lora_path"),
                         body.get("target", "all"), body.get("strength", 1.0))

    @routes.post("/v1/merge_lora_weights")
    async def merge(request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        return await run(manager.merge, body.get("target", "all"), body.get("strength"))

    @routes.post("/v1/unmerge_lora_weights")
    async def unmerge(request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        return await run(manager.unmerge, body.get("target", "all"))

    @routes.get("/v1/list_loras")
    async def list_loras(request: web.Request) -> web.Response:
        return web.json_response(manager.list_loras())
