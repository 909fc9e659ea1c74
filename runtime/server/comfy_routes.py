"""ComfyUI's HTTP API over the job store: prompt, queue, history, jobs, object_info, files.

Shapes follow ComfyUI's server so its API examples, common clients and the graph editor work
unchanged; every route here is also served under /api (see app.py).
"""
from __future__ import annotations

import asyncio

import json
import mimetypes
import os
import platform
import sys
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from .. import io_dirs, model_cache
from ..paths import FOLDER_TYPES, list_models
from ..workflow.validate import validate_prompt
from .jobs import COMPLETED, FAILED, FINISHED_STATUSES, IN_PROGRESS, PENDING, Job
from .security import ErrorResponse, comfy_error, confined_path

UPLOAD_EXTENSIONS = io_dirs.IMAGE_EXTENSIONS + (".mp4", ".webm", ".mov", ".mkv")
"""What /upload/image accepts: images, plus the videos the editor uploads through it too."""
_NO_INLINE = {"text/html", "text/javascript", "application/javascript", "application/xhtml+xml", "text/css",
              "image/svg+xml"}
"""Served as downloads, never rendered: a generated file must not run script in our origin."""
_PREVIEWABLE = {"images", "video", "audio", "gifs", "3d", "text"}


def _bad_body(kind: str, message: str) -> ErrorResponse:
    return ErrorResponse(web.json_response(
        {"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, "node_errors": {}},
        status=400))


async def read_json(request: web.Request, *, require_object: bool = True, optional: bool = False) -> Any:
    """The JSON body (an object unless `require_object` is False); a ComfyUI-shaped 400 otherwise.

    `optional`: an empty body reads as {} (POST /interrupt and /free are often sent bare).
    """
    if optional and not (await request.read()).strip():
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_body("invalid_json", f"body is not JSON: {e}") from None
    if require_object and not isinstance(body, dict):
        raise _bad_body("invalid_json", "body must be a JSON object")
    return body


def _number(job: Job) -> int | float:
    return int(job.number) if float(job.number).is_integer() else job.number


def queue_item(job: Job) -> list[Any]:
    """ComfyUI's queue tuple: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
    return [_number(job), job.id, job.prompt, job.extra_data, job.outputs_to_execute]


def history_entry(job: Job) -> dict[str, Any]:
    return {
        "prompt": queue_item(job),
        "outputs": job.outputs,
        "status": {"status_str": "success" if job.status == COMPLETED else "error",
                   "completed": job.status == COMPLETED, "messages": job.messages},
        "meta": job.meta,
    }


def _ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds is not None else None


def _output_files(outputs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(node id, media type, item) for every file in a job's UI outputs."""
    found = []
    for node_id, ui in outputs.items():
        for media, items in (ui or {}).items():
            if media == "animated" or not isinstance(items, list):
                continue
            found.extend((node_id, media, item) for item in items if isinstance(item, dict) and "filename" in item)
    return found


def job_summary(job: Job, *, detail: bool = False) -> dict[str, Any]:
    """An entry of ComfyUI's jobs API (`GET /api/jobs`, `/api/jobs/{id}` with `detail`)."""
    files = _output_files(job.outputs)
    previewable = [f for f in files if f[1] in _PREVIEWABLE]
    preview = next((f for f in previewable if f[2].get("type") == "output"), previewable[0] if previewable else None)
    entry: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "priority": _number(job),
        "create_time": _ms(job.created_at),
        "execution_start_time": _ms(job.started_at),
        "execution_end_time": _ms(job.finished_at),
        "outputs_count": len(files),
        "previewable_outputs_count": len(previewable),
        "workflow_id": (job.extra_data.get("extra_pnginfo") or {}).get("workflow", {}).get("id"),
    }
    if preview is not None:
        entry["preview_output"] = {**preview[2], "nodeId": preview[0], "mediaType": preview[1]}
    if job.status == FAILED and job.error:
        entry["execution_error"] = {"node_id": job.error.get("node_id") or "", "node_type": job.error.get("node_type") or "",
                                    "exception_message": job.error.get("exception_message", ""),
                                    "exception_type": job.error.get("exception_type", ""),
                                    "traceback": job.error.get("traceback", []), "prompt_id": job.id}
    if detail:
        entry["outputs"] = job.outputs
        entry["execution_status"] = history_entry(job)["status"]
        entry["workflow"] = {"prompt": job.prompt, "extra_data": job.extra_data}
    return {k: v for k, v in entry.items() if v is not None}


def _int_query(request: web.Request, name: str, default: int | None) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ErrorResponse(comfy_error(400, f"'{name}' must be an integer", error_type="invalid_request")) from None


def _system_memory() -> tuple[int, int]:
    try:
        pages, free, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, free * size
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 0, 0


def _devices() -> list[dict[str, Any]]:
    import torch  # noqa: PLC0415 - already loaded by the nodes; kept out of import time

    if torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append({"name": f"cuda:{index} {torch.cuda.get_device_name(index)}", "type": "cuda", "index": index,
                            "vram_total": total, "vram_free": free, "torch_vram_total": total, "torch_vram_free": free})
        return devices
    total, free = _system_memory()
    return [{"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
             "torch_vram_total": total, "torch_vram_free": free}]


def _split_annotation(filename: str, default_type: str) -> tuple[str, str]:
    """ComfyUI lets a file name carry its folder: `name.png [input]`."""
    for kind in ("input", "output", "temp"):
        suffix = f" [{kind}]"
        if filename.endswith(suffix):
            return filename[: -len(suffix)], kind
    return filename, default_type


_DIRS = {"input": io_dirs.input_dir, "output": io_dirs.output_dir, "temp": io_dirs.temp_dir}


def add_routes(routes: web.RouteTableDef, server: Any) -> None:  # server: app.WanflowServer
    store = server.store

    @routes.get("/ws")
    async def websocket(request: web.Request) -> web.StreamResponse:
        return await server.hub.handle(request)

    # --- prompts and the queue -----------------------------------------------------------

    @routes.get("/prompt")
    async def get_prompt(request: web.Request) -> web.Response:
        return web.json_response(server.queue_info())

    @routes.post("/prompt")
    async def post_prompt(request: web.Request) -> web.Response:
        body = await read_json(request)
        if "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        if store.get(prompt_id) is not None:
            error = {"type": "duplicate_prompt_id", "message": f"prompt_id {prompt_id} is already used",
                     "details": "", "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        validation = validate_prompt(body["prompt"], server.registry)
        if not validation.ok:
            return web.json_response(validation.response(), status=400)
        outputs = validation.outputs
        targets = body.get("partial_execution_targets")
        if isinstance(targets, list):  # the editor's "run selected output nodes"
            outputs = [o for o in outputs if o in {str(t) for t in targets}]
            if not outputs:
                error = {"type": "prompt_no_outputs", "message": "none of partial_execution_targets is a valid output",
                         "details": ", ".join(map(str, targets)), "extra_info": {}}
                return web.json_response({"error": error, "node_errors": validation.node_errors}, status=400)
        extra_data = dict(body.get("extra_data") or {})
        if body.get("client_id"):
            extra_data["client_id"] = body["client_id"]
        extra_data.setdefault("create_time", int(time.time() * 1000))
        job = server.enqueue(body["prompt"], source="comfy", extra_data=extra_data, outputs=outputs,
                             job_id=prompt_id, front=bool(body.get("front")))
        return web.json_response({"prompt_id": job.id, "number": _number(job), "node_errors": validation.node_errors})

    @routes.get("/queue")
    async def get_queue(request: web.Request) -> web.Response:
        return web.json_response({
            "queue_running": [queue_item(j) for j in store.list((IN_PROGRESS,))],
            "queue_pending": [queue_item(j) for j in store.list((PENDING,))],
        })

    @routes.post("/queue")
    async def post_queue(request: web.Request) -> web.Response:
        body = await read_json(request)
        if body.get("clear"):
            store.clear((PENDING,))
        if body.get("delete"):
            store.delete([str(i) for i in body["delete"]], statuses=(PENDING,))
        server.hub.queue_updated()
        return web.Response(status=200)

    @routes.post("/interrupt")
    async def post_interrupt(request: web.Request) -> web.Response:
        body = await read_json(request, optional=True)
        server.worker.interrupt(body.get("prompt_id"))
        return web.Response(status=200)

    @routes.post("/free")
    async def post_free(request: web.Request) -> web.Response:
        body = await read_json(request, optional=True)
        if body.get("unload_models") or body.get("free_memory"):
            server.executor.clear_cache()
            model_cache.clear()
            # Multi-GPU ranks hold their own copies of the model: stop them too.
            from ..parallel import unload  # noqa: PLC0415 - heavy, and only needed here

            await asyncio.to_thread(unload)
        return web.Response(status=200)

    # --- history and jobs ------------------------------------------------------------------

    @routes.get("/history")
    async def get_history(request: web.Request) -> web.Response:
        max_items = _int_query(request, "max_items", None)
        offset = _int_query(request, "offset", 0) or 0
        jobs = store.list(FINISHED_STATUSES, newest_first=True, limit=max_items, offset=offset)
        return web.json_response({j.id: history_entry(j) for j in reversed(jobs)})

    @routes.get("/history/{prompt_id}")
    async def get_history_item(request: web.Request) -> web.Response:
        job = store.get(request.match_info["prompt_id"])
        if job is None or job.status not in FINISHED_STATUSES:
            return web.json_response({})
        return web.json_response({job.id: history_entry(job)})

    @routes.post("/history")
    async def post_history(request: web.Request) -> web.Response:
        body = await read_json(request)
        if body.get("clear"):
            store.clear(FINISHED_STATUSES)
        if body.get("delete"):
            store.delete([str(i) for i in body["delete"]], statuses=FINISHED_STATUSES)
        return web.Response(status=200)

    @routes.get("/jobs")
    async def get_jobs(request: web.Request) -> web.Response:
        statuses = [s for s in request.query.get("status", "").split(",") if s] or list(
            (PENDING, IN_PROGRESS, *FINISHED_STATUSES))
        limit = _int_query(request, "limit", None)
        offset = _int_query(request, "offset", 0) or 0
        jobs = store.list(statuses, newest_first=request.query.get("sort_order", "desc") != "asc",
                          limit=limit, offset=offset)
        total = store.count(statuses)
        return web.json_response({
            "jobs": [job_summary(j) for j in jobs],
            "pagination": {"offset": offset, "limit": limit, "total": total,
                           "has_more": offset + len(jobs) < total},
        })

    @routes.get("/jobs/{job_id}")
    async def get_job(request: web.Request) -> web.Response:
        job = store.get(request.match_info["job_id"])
        if job is None:
            return web.json_response({"error": "job not found"}, status=404)
        return web.json_response(job_summary(job, detail=True))

    @routes.post("/jobs/{job_id}/cancel")
    async def cancel_job(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if store.get(job_id) is None:
            return web.json_response({"error": "job not found"}, status=404)
        return web.json_response({"cancelled": server.cancel([job_id])})

    @routes.post("/jobs/cancel")
    async def cancel_jobs(request: web.Request) -> web.Response:
        ids = (await read_json(request)).get("job_ids")
        if not isinstance(ids, list):
            return comfy_error(400, "body must be {\"job_ids\": [...]}", error_type="invalid_request")
        return web.json_response({"cancelled": server.cancel([str(i) for i in ids])})

    # --- nodes, models, system ---------------------------------------------------------------

    @routes.get("/object_info")
    async def object_info(request: web.Request) -> web.Response:
        return web.json_response(server.registry.object_info())

    @routes.get("/object_info/{node_class}")
    async def object_info_node(request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        info = server.registry.object_info()
        return web.json_response({name: info[name]} if name in info else {})

    @routes.get("/models")
    async def model_folders(request: web.Request) -> web.Response:
        return web.json_response(list(FOLDER_TYPES))

    @routes.get("/models/{folder}")
    async def model_files(request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in FOLDER_TYPES:
            return comfy_error(404, f"unknown model folder '{folder}'", error_type="not_found")
        return web.json_response(list_models(folder))

    @routes.get("/embeddings")
    async def embeddings(request: web.Request) -> web.Response:
        return web.json_response([])

    @routes.get("/extensions")
    async def extensions(request: web.Request) -> web.Response:
        # wanflow ships no editor extensions; the editor's own core ones are bundled in its JS.
        return web.json_response([])

    @routes.get("/features")
    async def features(request: web.Request) -> web.Response:
        return web.json_response(server.features)

    @routes.get("/system_stats")
    async def system_stats(request: web.Request) -> web.Response:
        import torch  # noqa: PLC0415

        ram_total, ram_free = _system_memory()
        return web.json_response({
            "system": {
                "os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                "comfyui_version": _installed_version("comfyui-wanflow"),
                "required_frontend_version": _installed_version("comfyui-frontend-package"),
                "python_version": sys.version, "pytorch_version": torch.__version__,
                # --disable-api-nodes is how ComfyUI tells the editor not to call comfy.org
                # (release checks, paid API nodes): wanflow is a local server and needs neither.
                "embedded_python": False, "argv": [*sys.argv, "--disable-api-nodes"],
                "platform": platform.platform(),
            },
            "devices": _devices(),
        })

    # --- files -------------------------------------------------------------------------------

    @routes.get("/view")
    async def view(request: web.Request) -> web.StreamResponse:
        if "filename" not in request.query:
            return comfy_error(400, "filename is required", error_type="invalid_request")
        filename, kind = _split_annotation(request.query["filename"], request.query.get("type") or "output")
        if kind not in _DIRS:
            return comfy_error(400, f"type must be input, output or temp, not '{kind}'", error_type="invalid_request")
        path = confined_path(_DIRS[kind](), request.query.get("subfolder", ""), filename)
        if not path.is_file():
            return comfy_error(404, f"{kind} file '{filename}' not found", error_type="not_found")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type in _NO_INLINE:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": content_type,
                                               "Content-Disposition": f'filename="{path.name}"'})

    @routes.post("/upload/image")
    async def upload_image(request: web.Request) -> web.Response:
        form = await request.post()
        image = form.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return comfy_error(400, "multipart field 'image' (a file) is required", error_type="invalid_request")
        kind = str(form.get("type") or "input")
        if kind not in _DIRS:
            return comfy_error(400, f"type must be input, output or temp, not '{kind}'", error_type="invalid_request")
        subfolder = str(form.get("subfolder") or "")
        name = os.path.basename(image.filename)
        if os.path.splitext(name)[1].lower() not in UPLOAD_EXTENSIONS:
            return comfy_error(400, f"'{name}' is not an image or video file ({', '.join(UPLOAD_EXTENSIONS)})",
                               error_type="invalid_request")
        target = confined_path(_DIRS[kind](), subfolder, name)
        data = image.file.read()
        if str(form.get("overwrite", "")).lower() not in ("true", "1"):
            stem, ext, counter = target.stem, target.suffix, 1
            while target.exists() and target.read_bytes() != data:
                target = target.with_name(f"{stem} ({counter}){ext}")
                counter += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return web.json_response({"name": target.name, "subfolder": subfolder, "type": kind})


def _installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "0.0.0"
