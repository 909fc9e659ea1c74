"""The repository as ComfyUI sees it: a custom-node folder of any name, its folder_paths for
model names, its progress bar and interrupt — simulated with stand-in modules."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

import wanflow
from wanflow.runtime import paths
from wanflow.runtime.models import load_diffusion_model
from wanflow.runtime.sampling.request import SamplingRequest

REPO = Path(wanflow.__file__).resolve().parent


def load_as_custom_node(folder: Path, name: str) -> types.ModuleType:
    """What ComfyUI's `load_custom_node` does with a folder in custom_nodes/."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_tree_loads_as_a_custom_node_folder_of_any_name(tmp_path):
    folder = tmp_path / "custom_nodes" / "ComfyUI-wanflow-main"
    top_level_skip = {".git", ".venv", "tests", "output", "models", "user"}
    shutil.copytree(REPO, folder, ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                                          or (Path(d) == REPO and n in top_level_skip)])
    try:
        module = load_as_custom_node(folder, "ComfyUI-wanflow-main")
        assert set(module.NODE_CLASS_MAPPINGS) == set(wanflow.NODE_CLASS_MAPPINGS)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
        # The stand-ins for ComfyUI's own core nodes are never exported into ComfyUI.
        assert not {"LoadImage", "SaveImage", "PreviewImage"} & set(module.NODE_CLASS_MAPPINGS)
    finally:
        for key in [k for k in sys.modules if k.startswith("ComfyUI-wanflow-main")]:
            del sys.modules[key]


def test_pyproject_declares_the_registry_table_and_the_console_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"PublisherId", "DisplayName", "Icon"} <= set(project["tool"]["comfy"])
    assert project["project"]["scripts"]["wanflow"] == "wanflow.scripts.cli:main"
    assert project["project"]["name"] == "comfyui-wanflow"


@pytest.fixture()
def fake_comfyui(monkeypatch, tiny_models):
    """Minimal `folder_paths`, `comfy.utils` and `comfy.model_management` modules."""
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: sorted(p.name for p in (tiny_models.root / folder).glob("*.safetensors"))
    folder_paths.get_full_path = lambda folder, name: str(tiny_models.root / folder / name)
    bars: list = []

    class ProgressBar:
        def __init__(self, total):
            self.total, self.values = total, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append(value)

    class InterruptProcessingException(Exception):
        pass

    state = {"interrupt": False}

    def throw_exception_if_processing_interrupted():
        if state["interrupt"]:
            raise InterruptProcessingException()

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.InterruptProcessingException = InterruptProcessingException
    comfy.utils, comfy.model_management = utils, mm
    for name, module in (("folder_paths", folder_paths), ("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(bars=bars, state=state, InterruptProcessingException=InterruptProcessingException)


def run_sampler(model, steps: int):
    cls = wanflow.NODE_CLASS_MAPPINGS["WanflowSampler"]
    dim = model.transformer.config.text_dim
    cond = types.SimpleNamespace(positive=torch.randn(1, 8, dim), negative=None)
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    return getattr(cls(), cls.FUNCTION)(model=model, conditioning=cond, latent=latent, seed=1, steps=steps,
                                        cfg=1.0, shift=5.0)


def test_loader_choices_come_from_comfyui_folder_paths(fake_comfyui, tiny_models):
    schema = wanflow.NODE_CLASS_MAPPINGS["WanflowModelLoader"].SCHEMA
    assert tiny_models.transformer_bf16.name in schema.input("model_name").choices()
    assert paths.resolve_model("diffusion_models", tiny_models.transformer_bf16.name) == tiny_models.transformer_bf16


def test_sampler_drives_comfyui_progress_bar(fake_comfyui, tiny_models):
    model = load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32)
    run_sampler(model, steps=3)
    (bar,) = fake_comfyui.bars
    assert bar.total == 3 and bar.values == [1, 2, 3]


def test_comfyui_interrupt_raises_comfyui_own_exception(fake_comfyui, tiny_models):
    model = load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32)
    fake_comfyui.state["interrupt"] = True
    with pytest.raises(fake_comfyui.InterruptProcessingException):
        run_sampler(model, steps=3)
