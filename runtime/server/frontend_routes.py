"""The graph editor: comfyui-frontend-package's static files and the routes it calls at boot.

Single-user, like ComfyUI without --multi-user: settings and saved workflows live under
`<user_dir>/default/`. Every path a client names is confined to that folder.
"""
from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from PIL import Image, ImageDraw, ImageFont

from .. import io_dirs, paths
from ..paths import FOLDER_TYPES, list_models
from .comfy_routes import read_json
from .security import UnsafePathError, comfy_error, confined_path

USER = "default"
SETTINGS_FILE = "comfy.settings.json"
TEMPLATE_MODULE = "wanflow"
"""The editor lists our saved workflows under this name in its template browser."""
UNWRITTEN_USER_FILES = {"user.css": ("", "text/css"), "comfy.templates.json": ("[]", "application/json")}
"""User files the editor always asks for at boot: until the user saves one, answer with the
empty file rather than a 404 (which the browser logs as an error on every page load)."""


def _file_info(path: Path, root: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": path.relative_to(root).as_posix(), "size": stat.st_size, "modified": stat.st_mtime,
            "created": stat.st_ctime}


def add_api_routes(routes: web.RouteTableDef, server: Any) -> None:  # server: app.WanflowServer
    user_root = server.user_dir / USER
    user_root.mkdir(parents=True, exist_ok=True)
    workflows_dir = Path(server.options.workflows_dir or Path(__file__).resolve().parents[2] / "workflows")

    def user_path(name: str) -> Path:
        return confined_path(user_root, "", unquote(name))

    def read_settings() -> dict[str, Any]:
        path = user_root / SETTINGS_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def write_settings(settings: dict[str, Any]) -> None:
        (user_root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")

    # --- users and settings ----------------------------------------------------------------

    @routes.get("/users")
    async def get_users(request: web.Request) -> web.Response:
        return web.json_response({"storage": "server", "migrated": True})

    @routes.post("/users")
    async def post_users(request: web.Request) -> web.Response:
        return comfy_error(400, "this server has a single user", error_type="single_user")

    @routes.get("/settings")
    async def get_settings(request: web.Request) -> web.Response:
        return web.json_response(read_settings())

    @routes.get("/settings/{id}")
    async def get_setting(request: web.Request) -> web.Response:
        return web.json_response(read_settings().get(request.match_info["id"]))

    @routes.post("/settings")
    async def post_settings(request: web.Request) -> web.Response:
        write_settings({**read_settings(), **(await read_json(request))})
        return web.Response(status=200)

    @routes.post("/settings/{id}")
    async def post_setting(request: web.Request) -> web.Response:
        settings = read_settings()
        settings[request.match_info["id"]] = await read_json(request, require_object=False)
        write_settings(settings)
        return web.Response(status=200)

    # --- user data (saved workflows, keybindings, ...) --------------------------------------

    @routes.get("/userdata")
    async def list_userdata(request: web.Request) -> web.Response:
        directory = request.query.get("dir", "")
        if not directory:
            return comfy_error(400, "dir is required", error_type="invalid_request")
        root = user_path(directory)
        if not root.is_dir():
            # The editor lists workflows/ and subgraphs/ at boot; before the user saved anything
            # they do not exist, which is the same as empty.
            return web.json_response([])
        recurse = request.query.get("recurse", "").lower() == "true"
        full = request.query.get("full_info", "").lower() == "true"
        split = request.query.get("split", "").lower() == "true"
        files = sorted(p for p in (root.rglob("*") if recurse else root.glob("*")) if p.is_file())
        if full:
            return web.json_response([_file_info(p, root) for p in files])
        rels = [p.relative_to(root).as_posix() for p in files]
        return web.json_response([[r, *r.split("/")] for r in rels] if split else rels)

    @routes.get("/v2/userdata")
    async def list_userdata_v2(request: web.Request) -> web.Response:
        relative = unquote(request.query.get("path", ""))
        root = user_path(relative) if relative else user_root
        if not root.exists():
            return comfy_error(404, f"userdata path '{relative}' not found", error_type="not_found")
        if not root.is_dir():
            return comfy_error(400, f"userdata path '{relative}' is not a folder", error_type="invalid_request")
        entries = []
        for p in sorted(root.rglob("*")):
            entry: dict[str, Any] = {"name": p.name, "path": p.relative_to(user_root).as_posix(),
                                     "type": "directory" if p.is_dir() else "file"}
            if p.is_file():
                entry.update(size=p.stat().st_size, modified=p.stat().st_mtime)
            entries.append(entry)
        entries.sort(key=lambda e: (e["type"] != "directory", e["name"].lower()))
        return web.json_response(entries)

    @routes.get("/userdata/{file}")
    async def get_userdata(request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        path = user_path(name)
        if not path.is_file():
            if unquote(name) in UNWRITTEN_USER_FILES:
                text, content_type = UNWRITTEN_USER_FILES[unquote(name)]
                return web.Response(text=text, content_type=content_type)
            return comfy_error(404, f"userdata file '{unquote(name)}' not found", error_type="not_found")
        return web.FileResponse(path)

    @routes.post("/userdata/{file}")
    async def post_userdata(request: web.Request) -> web.Response:
        path = user_path(request.match_info["file"])
        if request.query.get("overwrite", "true") == "false" and path.exists():
            return comfy_error(409, "file already exists", error_type="conflict")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(await request.read())
        if request.query.get("full_info", "false").lower() == "true":
            return web.json_response(_file_info(path, user_root))
        return web.json_response(path.relative_to(user_root).as_posix())

    @routes.delete("/userdata/{file}")
    async def delete_userdata(request: web.Request) -> web.Response:
        path = user_path(request.match_info["file"])
        if not path.is_file():
            return comfy_error(404, "file not found", error_type="not_found")
        path.unlink()
        return web.Response(status=204)

    @routes.post("/userdata/{file}/move/{dest}")
    async def move_userdata(request: web.Request) -> web.Response:
        source, dest = user_path(request.match_info["file"]), user_path(request.match_info["dest"])
        if not source.is_file():
            return comfy_error(404, "file not found", error_type="not_found")
        if request.query.get("overwrite", "true") == "false" and dest.exists():
            return comfy_error(409, "file already exists", error_type="conflict")
        dest.parent.mkdir(parents=True, exist_ok=True)
        source.replace(dest)
        if request.query.get("full_info", "false").lower() == "true":
            return web.json_response(_file_info(dest, user_root))
        return web.json_response(dest.relative_to(user_root).as_posix())

    # --- translations, templates, models for the editor's side panels -----------------------

    @routes.get("/i18n")
    async def i18n(request: web.Request) -> web.Response:
        return web.json_response({})

    def saved_workflows() -> list[Path]:
        if not workflows_dir.is_dir():
            return []
        return sorted(p for p in workflows_dir.glob("*.json") if not p.stem.endswith("_api"))

    @routes.get("/workflow_templates")
    async def workflow_templates(request: web.Request) -> web.Response:
        return web.json_response({TEMPLATE_MODULE: [p.stem for p in saved_workflows()]})

    @routes.get("/workflow_templates/{module}/{file}")
    async def workflow_template(request: web.Request) -> web.StreamResponse:
        if request.match_info["module"] != TEMPLATE_MODULE:
            return comfy_error(404, "unknown template module", error_type="not_found")
        path = confined_path(workflows_dir, "", request.match_info["file"])
        if path.suffix == ".jpg" and path.with_suffix(".json") in saved_workflows():
            return web.Response(body=_thumbnail(path.stem), content_type="image/jpeg")
        if path not in saved_workflows():
            return comfy_error(404, "template not found", error_type="not_found")
        return web.FileResponse(path)

    @routes.get("/experiment/models")
    async def experiment_models(request: web.Request) -> web.Response:
        return web.json_response([{"name": f, "folders": [str(paths.models_dir() / f)]} for f in FOLDER_TYPES])

    @routes.get("/experiment/models/{folder}")
    async def experiment_model_files(request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in FOLDER_TYPES:
            return comfy_error(404, f"unknown model folder '{folder}'", error_type="not_found")
        return web.json_response([{"name": name, "pathIndex": 0} for name in list_models(folder)])

    @routes.get("/global_subgraphs")
    async def global_subgraphs(request: web.Request) -> web.Response:
        return web.json_response({})

    # --- /internal: the editor's log panel and file pickers -----------------------------------

    @routes.get("/internal/logs")
    async def logs(request: web.Request) -> web.Response:
        return web.json_response("")

    @routes.get("/internal/logs/raw")
    async def raw_logs(request: web.Request) -> web.Response:
        return web.json_response({"entries": [], "size": {"cols": 80, "rows": 24}})

    @routes.patch("/internal/logs/subscribe")
    async def subscribe_logs(request: web.Request) -> web.Response:
        return web.Response(status=200)

    @routes.get("/internal/folder_paths")
    async def folder_paths(request: web.Request) -> web.Response:
        return web.json_response({f: [str(paths.models_dir() / f)] for f in FOLDER_TYPES})

    @routes.get("/internal/files/{directory_type}")
    async def internal_files(request: web.Request) -> web.Response:
        getter = {"input": io_dirs.input_dir, "output": io_dirs.output_dir, "temp": io_dirs.temp_dir}
        kind = request.match_info["directory_type"]
        if kind not in getter:
            return web.json_response({"error": "Invalid directory type"}, status=400)
        root = getter[kind]()
        files = sorted((p for p in root.iterdir() if p.is_file()), key=lambda p: -p.stat().st_mtime) if root.is_dir() else []
        return web.json_response([p.name for p in files])


@lru_cache(maxsize=32)
def _thumbnail(name: str) -> bytes:
    """The template browser's card image for a saved workflow: its name on a plain tile."""
    image = Image.new("RGB", (256, 256), (32, 36, 44))
    draw = ImageDraw.Draw(image)
    draw.text((128, 128), name, fill=(220, 220, 220), anchor="mm", font=ImageFont.load_default(size=22))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def add_static_routes(app: web.Application, server: Any) -> None:
    root = server.frontend_dir
    if root is None or not (root / "index.html").is_file():
        async def no_editor(request: web.Request) -> web.Response:
            return web.Response(text="wanflow API server: the graph editor (comfyui-frontend-package) is not installed.\n")

        app.router.add_get("/", no_editor)
        return

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})

    async def user_css(request: web.Request) -> web.Response:
        return web.Response(text="", content_type="text/css")

    async def no_core_templates(request: web.Request) -> web.Response:
        # ComfyUI's own template gallery (the comfyui-workflow-templates package) is not part of
        # wanflow: an empty gallery; our workflows appear under "wanflow" instead.
        return web.json_response({} if request.path.endswith("_logo.json") else [])

    async def static_file(request: web.Request) -> web.StreamResponse:
        # A catch-all of our own rather than aiohttp's static route: a missing file must raise
        # (so the error middleware answers /api and /v1 paths in their JSON shape), and a
        # method other than GET on an unknown path is a 404, not a 405.
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPNotFound()
        try:
            path = confined_path(root, "", request.match_info["path"])
        except UnsafePathError:
            raise web.HTTPNotFound() from None
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/", index)
    if not (root / "user.css").is_file():
        app.router.add_get("/user.css", user_css)
    app.router.add_get(r"/templates/{index:index[^/]*\.json}", no_core_templates)
    app.router.add_route("*", "/{path:.+}", static_file)
