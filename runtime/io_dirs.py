"""Where user files go: ComfyUI's input / output / temp folders, or wanflow's own.

Inside ComfyUI its `folder_paths` decides; outside, `set_io_dirs()` (the CLI and server call it
from their options) or the environment (`WANFLOW_INPUT`, `WANFLOW_OUTPUT`, `WANFLOW_TEMP`),
falling back to `./input`, `./output`, `./temp`.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import InputValueError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_dirs: dict[str, Path] = {}
_ENV = {"input": "WANFLOW_INPUT", "output": "WANFLOW_OUTPUT", "temp": "WANFLOW_TEMP"}
_COMFY_GETTER = {"input": "get_input_directory", "output": "get_output_directory", "temp": "get_temp_directory"}


def set_io_dirs(
    input: str | os.PathLike | None = None,  # noqa: A002 - ComfyUI's folder name
    output: str | os.PathLike | None = None,
    temp: str | os.PathLike | None = None,
) -> None:
    """Set (or, with None, reset to the default) each folder."""
    for kind, value in (("input", input), ("output", output), ("temp", temp)):
        if value is None:
            _dirs.pop(kind, None)
        else:
            _dirs[kind] = Path(value).expanduser().resolve()


def _dir(kind: str) -> Path:
    # Only consult ComfyUI when it is already loaded (see paths.py for why).
    fp = sys.modules.get("folder_paths")
    if fp is not None:
        return Path(getattr(fp, _COMFY_GETTER[kind])())
    if kind in _dirs:
        return _dirs[kind]
    env = os.environ.get(_ENV[kind])
    return Path(env).expanduser().resolve() if env else (Path.cwd() / kind).resolve()


def input_dir() -> Path:
    return _dir("input")


def output_dir() -> Path:
    return _dir("output")


def temp_dir() -> Path:
    return _dir("temp")


def list_input_images() -> list[str]:
    """Image files directly in the input folder: LoadImage's choices."""
    root = input_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _inside(root: Path, relative: str, what: str) -> Path:
    full = (root / relative).resolve()
    if full != root.resolve() and root.resolve() not in full.parents:
        raise InputValueError(f"{what} '{relative}' points outside {root}", file=relative)
    return full


def resolve_input_file(name: str) -> Path:
    """Full path of a file named relative to the input folder (sub-folders allowed)."""
    full = _inside(input_dir(), name, "input file")
    if not full.is_file():
        raise InputValueError(f"input file '{name}' not found in {input_dir()}", file=str(full))
    return full


@dataclass(frozen=True)
class SaveTarget:
    """Where the next file of a save node goes, named like ComfyUI's: `<name>_<counter:05>_.ext`."""

    folder: Path
    name: str
    counter: int
    subfolder: str

    def filename(self, index: int, extension: str) -> str:
        return f"{self.name}_{self.counter + index:05}_.{extension}"


_DATE_TOKEN = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


def format_date(pattern: str, now: datetime | None = None) -> str:
    """The ComfyUI editor's `%date:<pattern>%` formatting (yyyy, yy, MM, dd, hh, mm, ss; single
    letters unpadded)."""
    now = now or datetime.now()
    fields = {"d": now.day, "M": now.month, "h": now.hour, "m": now.minute, "s": now.second}

    def token(match: re.Match) -> str:
        text = match.group(0)
        if text == "yy":
            return str(now.year)[2:]
        if text == "yyyy":
            return str(now.year)
        if text[0] in fields:
            return str(fields[text[0]]).zfill(len(text))
        return text

    return _DATE_TOKEN.sub(token, pattern)


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    """ComfyUI's backend placeholders, plus the editor's %date:...% (which the editor expands only
    for ComfyUI's own save nodes, so wanflow's must do it themselves)."""
    now = datetime.now()
    prefix = re.sub(r"%date:([^%]+)%", lambda m: format_date(m.group(1), now), prefix)
    values = {
        "width": str(width), "height": str(height), "year": str(now.year), "month": f"{now.month:02}",
        "day": f"{now.day:02}", "hour": f"{now.hour:02}", "minute": f"{now.minute:02}", "second": f"{now.second:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


def save_target(prefix: str, root: Path, width: int = 0, height: int = 0) -> SaveTarget:
    """The folder, base name and first free counter for `prefix` (which may hold `sub/dirs`).

    Counts like ComfyUI's `get_save_image_path`: one past the highest counter among existing
    `<name>_NNNNN_*` files, so numbering continues across runs and file types.
    """
    prefix = _expand_prefix(prefix, width, height)
    normalized = os.path.normpath(prefix)
    subfolder, name = os.path.dirname(normalized), os.path.basename(normalized)
    folder = _inside(root, subfolder or ".", "filename_prefix")
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(name) + r"_(\d+)_", re.IGNORECASE)
    counters = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return SaveTarget(folder, name, max(counters, default=0) + 1, subfolder)
