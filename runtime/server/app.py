"""`wanflow serve`: one aiohttp process, one port, one queue.

The ComfyUI API (+ websocket), the graph editor's files and boot routes, the OpenAI shim and
the LoRA endpoints are route tables over one `WanflowServer`: one job store, one worker, one
executor (so models stay warm whichever API a job came from).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import io_dirs, paths
from ..schema import NodeRegistry
from ..workflow.executor import Executor
from .jobs import PENDING, QUEUED_STATUSES, Job, JobStore
from .lora_routes import new_manager
from .security import api_key_middleware, error_middleware
from .worker import Worker
from .ws import WebSocketHub

log = logging.getLogger(__name__)

MiB = 1024 * 1024
WAIT_RECHECK_S = 1.0


@dataclass
class ServeOptions:
    models_dir: Path | None = None
    """ComfyUI-layout models folder (diffusion_models/, text_encoders/, vae/, loras/)."""
    output_dir: Path | None = None
    input_dir: Path | None = None
    temp_dir: Path | None = None
    user_dir: Path = Path("user")
    """Editor settings and saved workflows (ComfyUI's user/ folder)."""
    db_path: Path | None = None
    """The job store; default <user_dir>/wanflow_jobs.sqlite."""
    listen: str = "127.0.0.1"
    port: int = 8188
    api_key: str | None = None
    preload: str | None = None
    """A model name (see `templates.MODELS`) to load before the first request."""
    max_upload_mb: float = 100.0
    """Largest request body (uploads, prompts) in MiB."""
    previews: bool = True
    frontend_dir: Path | None = None
    """Static files of the graph editor; default: the installed comfyui-frontend-package."""
    workflows_dir: Path | None = None
    """Generation templates (default: the package's workflows/)."""


def _frontend_root() -> Path | None:
    try:
        import comfyui_frontend_package  # noqa: PLC0415 - optional: the API works without the editor
    except ImportError:
        return None
    return Path(comfyui_frontend_package.__file__).parent / "static"


class WanflowServer:
    """Everything the route handlers share."""

    def __init__(self, options: ServeOptions, registry: NodeRegistry, executor: Any | None = None) -> None:
        self.options = options
        self.registry = registry
        if options.models_dir is not None:
            paths.set_models_dir(options.models_dir)
        io_dirs.set_io_dirs(options.input_dir, options.output_dir, options.temp_dir)
        for folder in (io_dirs.input_dir(), io_dirs.output_dir(), io_dirs.temp_dir()):
            folder.mkdir(parents=True, exist_ok=True)
        self.user_dir = Path(options.user_dir).resolve()
        self.user_dir.mkdir(parents=True, exist_ok=True)
        self.frontend_dir = options.frontend_dir or _frontend_root()
        self.store = JobStore(options.db_path or self.user_dir / "wanflow_jobs.sqlite")
        self.executor = executor if executor is not None else Executor(registry)
        self.features = {"supports_preview_metadata": False, "max_upload_size": int(options.max_upload_mb * MiB)}
        self.hub = WebSocketHub(self.queue_info, self.features)
        self.loras = new_manager()
        self.lora_lock = asyncio.Lock()
        self.worker = Worker(self.store, self.executor, self.hub, previews=options.previews, on_finish=self._finished)
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- queue -----------------------------------------------------------------------------

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.store.count(QUEUED_STATUSES)}}

    def enqueue(self, prompt: dict[str, Any], *, source: str, extra_data: dict[str, Any] | None = None,
                outputs: list[str] | None = None, request: dict[str, Any] | None = None,
                job_id: str | None = None, front: bool = False) -> Job:
        job = self.store.add(job_id or str(uuid.uuid4()), prompt, source=source, extra_data=extra_data,
                             outputs_to_execute=outputs, request=request, front=front)
        self.worker.wake()
        self.hub.queue_updated()
        return job

    def cancel(self, job_ids: list[str]) -> list[str]:
        """Drop pending jobs and interrupt the running one among `job_ids`; returns those acted on."""
        done = self.store.delete(job_ids, statuses=(PENDING,))
        running = self.worker.running
        if running is not None and running.id in job_ids and self.worker.interrupt(running.id):
            done.append(running.id)
        if done:
            self.hub.queue_updated()
        return done

    async def wait_for(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has finished (completed, failed or cancelled); LookupError if deleted."""
        future = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(job_id, [])
        waiters.append(future)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # Registered before looking, so a job finishing in between still wakes us; the
                # look every second also notices a job deleted from the queue meanwhile.
                job = self.store.get(job_id)
                if job is None:
                    raise LookupError(f"job {job_id} was deleted")
                if job.finished_at is not None:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")
                try:
                    return await asyncio.wait_for(asyncio.shield(future), WAIT_RECHECK_S)
                except asyncio.TimeoutError:
                    continue
        finally:
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(job_id, None)

    def _finished(self, job: Job) -> None:
        """Worker thread -> event loop: wake whoever waits for this job."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._resolve, job)

    def _resolve(self, job: Job) -> None:
        for future in self._waiters.pop(job.id, []):
            if not future.done():
                future.set_result(job)

    # --- lifecycle -------------------------------------------------------------------------

    async def _startup(self, app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        await self.hub.start()
        requeued = self.store.requeue_unfinished()
        if requeued:
            log.info("re-queued %d job(s) left running by the previous server", requeued)
        pending = self.store.count((PENDING,))
        if pending:
            log.info("%d queued job(s) from before the restart will run now", pending)
        if self.options.preload:
            await asyncio.to_thread(self._preload, self.options.preload)
        self.worker.start()

    def _preload(self, model: str) -> None:
        from ..workflow.templates import GenerationRequest, build_prompt  # noqa: PLC0415 - avoids a cycle at import

        # Loading = running the template's loader nodes: their outputs land in the executor's
        # and the model cache, exactly where the first real job will look for them.
        prompt = build_prompt(GenerationRequest(model=model, prompt=""), workflows_dir=self.options.workflows_dir,
                              registry=self.registry, require_images=False)
        for node in prompt.values():
            cls = self.registry.get(node["class_type"])
            if cls.SCHEMA.category.endswith("/loaders"):
                getattr(cls(), cls.FUNCTION)(**node["inputs"])
        log.info("preloaded %s", model)

    async def _cleanup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.worker.stop)
        await self.hub.stop()
        self.store.close()

    def make_app(self) -> web.Application:
        from . import comfy_routes, frontend_routes, lora_routes, openai_routes  # noqa: PLC0415

        middlewares = [error_middleware]
        if self.options.api_key:
            middlewares.append(api_key_middleware(self.options.api_key))
        app = web.Application(client_max_size=int(self.options.max_upload_mb * MiB), middlewares=middlewares)
        comfy = web.RouteTableDef()
        comfy_routes.add_routes(comfy, self)
        frontend_routes.add_api_routes(comfy, self)
        # ComfyUI serves every API route twice, bare and under /api (the editor uses /api).
        app.add_routes([web.route(r.method, "/api" + r.path, r.handler) for r in comfy
                        if isinstance(r, web.RouteDef)])
        app.add_routes(comfy)
        openai = web.RouteTableDef()
        openai_routes.add_routes(openai, self)
        lora_routes.add_routes(openai, self)
        app.add_routes(openai)
        frontend_routes.add_static_routes(app, self)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app


def serve(options: ServeOptions, registry: NodeRegistry) -> None:
    """Run the server until interrupted (Ctrl-C)."""
    server = WanflowServer(options, registry)
    if not options.api_key and options.listen not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach this port can run jobs and read "
                    "outputs", options.listen)
    log.info("wanflow serving on http://%s:%d (jobs: %s)", options.listen, options.port, server.store.path)
    web.run_app(server.make_app(), host=options.listen, port=options.port, print=None, access_log=None)


class RunningServer:
    """A server on its own event loop in a background thread (tests, benchmarks, notebooks).

    `port=0` in the options picks a free port; `url` says which.
    """

    def __init__(self, options: ServeOptions, registry: NodeRegistry, executor: Any | None = None) -> None:
        self.server = WanflowServer(options, registry, executor)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="wanflow-server", daemon=True)
        self.url = ""

    def start(self) -> RunningServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        return self

    async def _start(self) -> None:
        options = self.server.options
        self._runner = web.AppRunner(self.server.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, options.listen, options.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
