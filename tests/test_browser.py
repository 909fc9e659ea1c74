"""The graph editor served by `wanflow serve`, in Debian's Chromium driven by Playwright.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`:
the system browser is used). Skipped, with the reason, when either is missing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, paths
from wanflow.runtime.server.app import RunningServer
from wanflow.scripts import make_workflows

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "output" / "test-artifacts"
TINY_WIDGETS = {"model_name": "tiny_wan21_t2v_bf16.safetensors", "text_encoder_name": "tiny_umt5_bf16.safetensors",
                "vae_name": "tiny_wan21_vae.safetensors", "width": 64, "height": 64, "length": 5, "steps": 2}
TIMEOUT_MS = 120_000

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def _tiny_workflow(folder: Path) -> str:
    """The saved t2v workflow, pointed at the tiny models and a tiny size: what a user would load."""
    nodes = make_workflows.t2v_wan21()
    for node in nodes:
        node.widgets.update({k: v for k, v in TINY_WIDGETS.items() if k in {i.name for i in
                             make_workflows.NODE_CLASS_MAPPINGS[node.type].SCHEMA.inputs}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_t2v.json").write_text(json.dumps(make_workflows.to_ui(nodes)))
    return "tiny_t2v"


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_options):
    tmp = tmp_path_factory.mktemp("browser_server")
    registry = node_registry()
    _tiny_workflow(tmp / "workflows")
    with RunningServer(serve_options(tmp, workflows_dir=tmp / "workflows"), registry) as running:
        yield running
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.problems = []
        page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
        page.on("response", lambda r: page.problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        page.goto(f"{server.url}/?template=tiny_t2v&source=wanflow", wait_until="load")
        page.wait_for_function("() => window.app?.graph?._nodes?.some(n => n.type === 'WanflowSampler')",
                               timeout=TIMEOUT_MS)
        yield page
        browser.close()


def test_editor_boots_without_console_errors(page):
    page.wait_for_timeout(2000)  # late boot requests (templates, releases, settings)
    assert page.problems == []


def test_wanflow_nodes_are_in_the_node_library(page):
    registered = set(page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))
    wanflow = {name for name in node_registry().classes if name.startswith("Wanflow")}
    assert wanflow and wanflow <= registered


def test_a_workflow_queued_from_the_page_completes(page, server, tmp_path):
    page.evaluate("""() => {
        window.__done = null;
        for (const t of ['execution_success', 'execution_error'])
            window.app.api.addEventListener(t, e => { window.__done = {type: t, id: e.detail.prompt_id}; });
    }""")
    page.get_by_role("button", name="Run").first.click()
    page.wait_for_function("() => window.__done !== null", timeout=TIMEOUT_MS)
    done = page.evaluate("() => window.__done")
    assert done["type"] == "execution_success"
    history = requests.get(f"{server.url}/history/{done['id']}", timeout=10).json()[done["id"]]
    (video,) = [item for ui in history["outputs"].values() for item in ui.get("images", [])]
    assert requests.get(f"{server.url}/view", params=video, timeout=10).content[4:8] == b"ftyp"
    page.wait_for_timeout(1500)  # let the output node render its video
    shot = tmp_path / "editor.png"
    page.screenshot(path=str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "editor.png")
    assert page.problems == []
