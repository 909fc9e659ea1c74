"""Where model files live: ComfyUI's `folder_paths` inside ComfyUI, a models dir outside.

The layout of a models dir is ComfyUI's own (`diffusion_models/`, `text_encoders/`, `vae/`,
`clip_vision/`, `loras/`, `diffusers/`), so one folder serves both.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import ModelFileError

FOLDER_TYPES = ("diffusion_models", "text_encoders", "vae", "clip_vision", "loras", "diffusers")
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")

_models_dir: Path | None = None


def set_models_dir(path: str | os.PathLike | None) -> None:
    global _models_dir
    _models_dir = Path(path).expanduser().resolve() if path else None


def models_dir() -> Path:
    if _models_dir is not None:
        return _models_dir
    env = os.environ.get("WANFLOW_MODELS")
    return Path(env).expanduser().resolve() if env else Path.cwd() / "models"


def _comfy_folder_paths():
    # Only look at ComfyUI when it is already loaded: importing it ourselves would drag in its
    # whole start-up, and outside ComfyUI it is absent anyway.
    return sys.modules.get("folder_paths")


def list_models(folder: str) -> list[str]:
    """Names selectable in a loader's combo: files (and, for `diffusers`, folders)."""
    fp = _comfy_folder_paths()
    if fp is not None:
        try:
            return sorted(fp.get_filename_list(folder))
        except Exception:  # folder type unknown to this ComfyUI version
            return []
    root = models_dir() / folder
    if not root.is_dir():
        return []
    if folder == "diffusers":
        return sorted(p.name for p in root.iterdir() if (p / "model_index.json").exists() or (p / "transformer").is_dir())
    names = []
    for p in root.rglob("*"):
        if p.is_file() and p.suffix in MODEL_EXTENSIONS:
            names.append(p.relative_to(root).as_posix())
    return sorted(names)


def resolve_model(folder: str, name: str) -> Path:
    """Full path of `name` in `folder`; a clear error naming both when it is not there."""
    if not name:
        raise ModelFileError(f"no {folder} file selected", file=name)
    candidate = Path(name)
    if candidate.is_absolute():
        if candidate.exists():
            return candidate
        raise ModelFileError(f"model file not found: {name}", file=name)
    fp = _comfy_folder_paths()
    if fp is not None:
        full = fp.get_full_path(folder, name)
        if full:
            return Path(full)
        raise ModelFileError(f"'{name}' not found in ComfyUI's models/{folder}", file=name)
    root = models_dir() / folder
    full = (root / name).resolve()
    if root.resolve() not in full.parents:
        raise ModelFileError(f"'{name}' is outside models/{folder}", file=name)
    if not full.exists():
        available = ", ".join(list_models(folder)[:10]) or "none"
        raise ModelFileError(
            f"'{name}' not found in {root} (available: {available})", file=str(full)
        )
    return full


def workflows_dir() -> Path:
    """The saved workflows shipped with the package (`workflows/` at the package root)."""
    return Path(__file__).resolve().parent.parent / "workflows"
