"""OpenAI's Videos and Images APIs (with SGLang's extras) on the server's one queue.

A request becomes a `GenerationRequest`, then a workflow from its model's template
(`workflow.templates`), then an ordinary job: the ComfyUI queue, history, websocket and
the editor see it like any other. Video objects are views of the job record.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import io_dirs
from ..errors import WanflowError
from ..workflow.templates import (
    MODELS,
    GenerationRequest,
    build_prompt,
    model_available,
    model_entry,
    resolve_values,
)
from ..workflow.validate import validate_prompt
from .jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, PENDING, Job
from .lora_routes import active_stack, nicknames
from .security import ErrorResponse, confined_path, openai_error

POLL_AFTER_MS = 250
"""Told to polling clients (`openai-poll-after-ms`): jobs here finish in seconds, not minutes."""
IMAGE_TIMEOUT_S = 3600.0
MAX_IMAGES = 4
_STATUS = {PENDING: "queued", IN_PROGRESS: "in_progress", COMPLETED: "completed", FAILED: "failed",
           CANCELLED: "failed"}
_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _fail(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    """An OpenAI-shaped client error, raised from anywhere in a handler (the middleware answers)."""
    return ErrorResponse(openai_error(status, message, param=param, code=code))


def _save_reference(data: bytes, extension: str, video_id: str) -> str:
    """Store an input_reference image in the input folder; the name LoadImage will take.

    Directly in the folder, not a sub-folder: LoadImage's choices (what validation accepts)
    are the images there, as in ComfyUI."""
    name = f"openai_{video_id}{extension}"
    path = confined_path(io_dirs.input_dir(), "", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def _data_url(value: str, video_id: str) -> str:
    header, _, payload = value.partition(",")
    mime = header[5:].split(";")[0]
    if not header.startswith("data:") or ";base64" not in header or mime not in _IMAGE_TYPES:
        raise _fail(400, "input_reference.image_url must be a base64 data: URL of a PNG, JPEG or WebP image",
                        "input_reference")
    try:
        return _save_reference(base64.b64decode(payload, validate=True), _IMAGE_TYPES[mime], video_id)
    except binascii.Error:
        raise _fail(400, "input_reference holds invalid base64", "input_reference") from None


async def _read_fields(request: web.Request, video_id: str) -> dict[str, Any]:
    """The request's fields from a JSON body or a multipart form (the `openai` client sends forms)."""
    if request.content_type.startswith("multipart/"):
        fields: dict[str, Any] = {}
        form = await request.post()
        for key, value in form.items():
            if isinstance(value, web.FileField):
                if key != "input_reference":
                    raise _fail(400, f"unexpected file field '{key}'", key)
                extension = _IMAGE_TYPES.get(value.content_type or "") or \
                    next((e for e in _IMAGE_TYPES.values() if value.filename.lower().endswith(e)), None)
                if extension is None:
                    raise _fail(400, "input_reference must be a PNG, JPEG or WebP image", key)
                fields["image"] = _save_reference(value.file.read(), extension, video_id)
            elif key.endswith("[]"):
                fields.setdefault(key[:-2], []).append(value)
            elif "[" in key:
                raise _fail(400, f"nested form field '{key}': send it as JSON text", key)
            else:
                fields[key] = value
        return fields
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(400, f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _fail(400, "body must be a JSON object")
    reference = body.pop("input_reference", None)
    if isinstance(reference, dict) and reference.get("image_url"):
        body["image"] = _data_url(str(reference["image_url"]), video_id)
    elif reference is not None:
        raise _fail(400, "input_reference in JSON must be {\"image_url\": \"data:image/...;base64,...\"}; "
                             "or upload the file as multipart", "input_reference")
    return body


# OpenAI parameters that mean nothing here: accepted and ignored, as OpenAI-compatible servers do.
_IGNORED = {"user", "response_format", "n", "quality", "style", "background", "moderation", "output_format",
            "output_compression"}


def _generation_request(fields: dict[str, Any], server: Any) -> GenerationRequest:
    data = {k: v for k, v in fields.items() if k not in _IGNORED}
    if not data.get("model"):
        if server.options.preload:
            data["model"] = server.options.preload
        else:
            available = [m for m in MODELS if model_available(m)]
            if len(available) != 1:
                raise _fail(400, "model is required (GET /v1/models lists them)", "model")
            data["model"] = available[0]
    if not data.get("prompt"):
        raise _fail(400, "prompt is required", "prompt")
    try:
        return GenerationRequest.from_dict(data, source="request")
    except WanflowError as e:
        raise _fail(400, e.message, e.key or e.input_name, e.error_type) from None


def _build(request: GenerationRequest, server: Any, *, output: str, prefix: str) -> dict[str, Any]:
    try:
        model_entry(request.model)
    except WanflowError as e:
        raise _fail(404, e.message, "model", "model_not_found") from None
    try:
        prompt = build_prompt(request, registry=server.registry, output=output, filename_prefix=prefix,
                              workflows_dir=server.options.workflows_dir, default_loras=active_stack(server.loras),
                              lora_nicknames=nicknames(server.loras))
    except WanflowError as e:
        raise _fail(400, e.message, e.key or e.input_name, e.error_type) from None
    validation = validate_prompt(prompt, server.registry)
    if not validation.ok:
        raise _fail(400, validation.summary(), None, validation.error["type"] if validation.error else None)
    return prompt


def _describe(request: GenerationRequest) -> dict[str, Any]:
    """What the Video object reports: the resolved size and duration."""
    values = resolve_values(request, model_entry(request.model))
    seconds = request.seconds if request.seconds is not None else values["num_frames"] / values["fps"]
    return {"model": request.model, "prompt": request.prompt, "size": f"{values['width']}x{values['height']}",
            "seconds": f"{seconds:g}", "kind": "video"}


def video_object(job: Job) -> dict[str, Any]:
    info = job.request or {}
    status = _STATUS[job.status]
    error = None
    if status == "failed":
        error = {"code": "cancelled" if job.status == CANCELLED else "generation_failed",
                 "message": (job.error or {}).get("exception_message") or "the job was cancelled"}
    return {
        "id": job.id, "object": "video", "model": info.get("model", ""), "status": status,
        # 100 only once the file exists: sampling reaching its last step is not "done".
        "progress": 100 if status == "completed" else min(99, int(job.progress * 100)),
        "created_at": int(job.created_at),
        "completed_at": int(job.finished_at) if job.finished_at and status == "completed" else None,
        "expires_at": None, "seconds": info.get("seconds", ""), "size": info.get("size", ""),
        "prompt": info.get("prompt"), "remixed_from_video_id": None, "error": error,
    }


def output_file(job: Job, extensions: tuple[str, ...]) -> Path | None:
    """The first output file of the job with one of `extensions` (path on disk), or None."""
    for ui in job.outputs.values():
        for items in ui.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and str(item.get("filename", "")).lower().endswith(extensions):
                    root = {"output": io_dirs.output_dir, "temp": io_dirs.temp_dir}.get(item.get("type", "output"))
                    if root is not None:
                        return confined_path(root(), item.get("subfolder", ""), item["filename"])
    return None


def _openai_job(server: Any, video_id: str, kind: str = "video") -> Job:
    job = server.store.get(video_id)
    if job is None or job.source != "openai" or (job.request or {}).get("kind") != kind:
        raise _fail(404, f"no video with id '{video_id}'", "video_id", "not_found")
    return job


def add_routes(routes: web.RouteTableDef, server: Any) -> None:  # server: app.WanflowServer
    store = server.store

    @routes.post("/v1/videos")
    async def create_video(request: web.Request) -> web.Response:
        video_id = f"video_{uuid.uuid4().hex}"
        generation = _generation_request(await _read_fields(request, video_id), server)
        prompt = _build(generation, server, output="video", prefix=f"openai/{video_id}")
        job = server.enqueue(prompt, source="openai", request=_describe(generation), job_id=video_id,
                             extra_data={"create_time": int(time.time() * 1000)})
        return web.json_response(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    @routes.get("/v1/videos")
    async def list_videos(request: web.Request) -> web.Response:
        try:
            limit = min(100, max(1, int(request.query.get("limit", 20))))
        except ValueError:
            raise _fail(400, "limit must be an integer", "limit") from None
        order = request.query.get("order", "desc")
        videos = [j for j in store.list(source="openai", newest_first=order != "asc")
                  if (j.request or {}).get("kind") == "video"]
        after = request.query.get("after")
        if after:
            ids = [j.id for j in videos]
            if after not in ids:
                raise _fail(400, f"after: no video with id '{after}'", "after")
            videos = videos[ids.index(after) + 1:]
        page = videos[:limit]
        return web.json_response({
            "object": "list", "data": [video_object(j) for j in page], "has_more": len(videos) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
        })

    @routes.get("/v1/videos/{video_id}")
    async def get_video(request: web.Request) -> web.Response:
        job = _openai_job(server, request.match_info["video_id"])
        return web.json_response(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    @routes.get("/v1/videos/{video_id}/content")
    async def video_content(request: web.Request) -> web.StreamResponse:
        job = _openai_job(server, request.match_info["video_id"])
        variant = request.query.get("variant", "video")
        if variant != "video":
            raise _fail(400, f"variant '{variant}' is not available (only 'video')", "variant")
        if job.status != COMPLETED:
            raise _fail(409, f"video {job.id} is {_STATUS[job.status]}, not completed", "video_id", "video_not_ready")
        path = output_file(job, (".mp4", ".webm"))
        if path is None or not path.is_file():
            raise _fail(404, f"the file of video {job.id} is gone", "video_id", "not_found")
        content_type = "video/webm" if path.suffix == ".webm" else "video/mp4"
        return web.FileResponse(path, headers={"Content-Type": content_type})

    @routes.delete("/v1/videos/{video_id}")
    async def delete_video(request: web.Request) -> web.Response:
        job = _openai_job(server, request.match_info["video_id"])
        if job.status == IN_PROGRESS:
            raise _fail(409, f"video {job.id} is being generated; delete it once it has finished",
                            "video_id", "video_in_progress")
        path = output_file(job, (".mp4", ".webm")) if job.status == COMPLETED else None
        if not store.delete([job.id], statuses=(PENDING, COMPLETED, FAILED, CANCELLED)):
            raise _fail(409, f"video {job.id} started meanwhile; delete it once it has finished", "video_id")
        if path is not None and path.is_file():
            path.unlink()
        server.hub.queue_updated()
        return web.json_response({"id": job.id, "object": "video.deleted", "deleted": True})

    @routes.post("/v1/images/generations")
    async def generate_images(request: web.Request) -> web.Response:
        fields = await _read_fields(request, f"image_{uuid.uuid4().hex}")
        try:
            count = int(fields.get("n") or 1)
        except (TypeError, ValueError):
            count = 0
        if not 1 <= count <= MAX_IMAGES:
            raise _fail(400, f"n must be an integer from 1 to {MAX_IMAGES}", "n")
        if fields.get("response_format", "b64_json") != "b64_json":
            raise _fail(400, "only response_format 'b64_json' is supported", "response_format")
        generation = _generation_request(fields, server)
        jobs = []
        for index in range(count):
            # n images of one request differ by seed, as n samples of one prompt should.
            one = generation if generation.seed is None else replace(generation, seed=generation.seed + index)
            image_id = f"image_{uuid.uuid4().hex}"
            prompt = _build(one, server, output="image", prefix=f"openai/{image_id}")
            jobs.append(server.enqueue(prompt, source="openai", job_id=image_id,
                                       request={"kind": "image", "model": one.model, "prompt": one.prompt},
                                       extra_data={"create_time": int(time.time() * 1000)}))
        data = []
        for job in jobs:
            try:
                done = await server.wait_for(job.id, timeout=IMAGE_TIMEOUT_S)
            except (LookupError, TimeoutError) as e:
                return openai_error(500, str(e), code="generation_failed")
            path = output_file(done, (".png",)) if done.status == COMPLETED else None
            if path is None or not path.is_file():
                message = (done.error or {}).get("exception_message") or f"image job {done.id} {done.status}"
                return openai_error(500, message, code="generation_failed")
            data.append({"b64_json": base64.b64encode(path.read_bytes()).decode(), "revised_prompt": None})
        return web.json_response({"created": int(time.time()), "data": data})

    @routes.get("/v1/models")
    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "wanflow", "available": model_available(name),
             "description": entry.description}
            for name, entry in MODELS.items()
        ]})
