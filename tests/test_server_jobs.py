"""The server's job store and worker: order, persistence, restarts."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import requests

from wanflow.nodes import node_registry
from wanflow.runtime import io_dirs, model_cache, paths
from wanflow.runtime.server.app import RunningServer
from wanflow.runtime.server.jobs import CANCELLED, COMPLETED, IN_PROGRESS, PENDING, JobStore
from wanflow.runtime.workflow.executor import ExecutionResult
from wanflow.runtime.workflow.templates import GenerationRequest, build_prompt
from wanflow.scripts.load_test import run_load

TIMEOUT = 120


@pytest.fixture(autouse=True)
def _reset_dirs():
    yield
    paths.set_models_dir(None)
    io_dirs.set_io_dirs()


# --- the store on its own --------------------------------------------------------------------


def test_pending_jobs_are_claimed_in_submission_order(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for name in "abc":
        store.add(name, {}, source="comfy")
    assert [store.claim_next().id for _ in range(3)] == ["a", "b", "c"]
    assert store.claim_next() is None


def test_front_puts_a_job_before_the_queue(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add("a", {}, source="comfy")
    store.add("urgent", {}, source="comfy", front=True)
    assert store.claim_next().id == "urgent"


def test_queued_and_finished_jobs_survive_reopening(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add("done", {"1": {}}, source="openai", request={"kind": "video"})
    store.add("waiting", {}, source="comfy")
    store.claim_next()
    store.finish("done", COMPLETED, outputs={"8": {"images": []}}, messages=[["execution_success", {}]], meta={})
    store.close()

    reopened = JobStore(tmp_path / "jobs.sqlite")
    done = reopened.get("done")
    assert (done.status, done.source, done.request, done.outputs) == (COMPLETED, "openai", {"kind": "video"},
                                                                      {"8": {"images": []}})
    assert reopened.get("waiting").status == PENDING


def test_a_job_left_running_by_a_dead_process_is_queued_again(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add("crashed", {}, source="comfy")
    store.claim_next()
    store.close()  # no finish: the process died mid-job

    reopened = JobStore(tmp_path / "jobs.sqlite")
    assert reopened.get("crashed").status == IN_PROGRESS
    assert reopened.requeue_unfinished() == 1
    assert reopened.claim_next().id == "crashed"


def test_delete_only_touches_jobs_in_the_given_states(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add("queued", {}, source="comfy")
    store.add("running", {}, source="comfy", front=True)
    store.claim_next()
    assert store.delete(["queued", "running"], statuses=(PENDING,)) == ["queued"]
    assert store.get("running") is not None


# --- the worker, across a restart --------------------------------------------------------------


class _StalledExecutor:
    """Runs nothing: each job waits until interrupted (the server shutting down)."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def execute(self, prompt, *, prompt_id, listener=None, extra_data=None, interrupt=None, outputs=None):
        self.started.set()
        interrupt.wait()
        return ExecutionResult(prompt_id, "interrupted", {}, {}, [], [])


def _wait_finished(url: str, ids: list[str]) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        history = requests.get(f"{url}/history", timeout=10).json()
        if all(i in history for i in ids):
            return history
        time.sleep(0.2)
    raise AssertionError(f"jobs did not finish in {TIMEOUT} s")


def test_jobs_queued_when_the_server_stops_run_after_a_restart(tmp_path, serve_options):
    registry = node_registry()
    stalled = _StalledExecutor()
    prompts = [build_prompt(GenerationRequest(model="tiny-wan2.1-t2v", prompt="a fox", seed=s), registry=registry)
               for s in range(3)]
    with RunningServer(serve_options(tmp_path), registry, executor=stalled) as first:
        ids = [requests.post(f"{first.url}/prompt", json={"prompt": p}, timeout=30).json()["prompt_id"]
               for p in prompts]
        assert stalled.started.wait(30)
        queue = requests.get(f"{first.url}/queue", timeout=10).json()
        assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == ids

    with RunningServer(serve_options(tmp_path), registry) as second:
        history = _wait_finished(second.url, ids)
        assert [history[i]["status"]["status_str"] for i in ids] == ["success"] * 3
        # One worker drains in order: each job starts after the previous one ended.
        jobs = [second.server.store.get(i) for i in ids]
        assert all(a.finished_at <= b.started_at for a, b in zip(jobs, jobs[1:]))
        assert requests.get(f"{second.url}/queue", timeout=10).json() == {"queue_running": [], "queue_pending": []}


def test_history_from_before_a_restart_is_still_served(tmp_path, serve_options):
    registry = node_registry()
    prompt = build_prompt(GenerationRequest(model="tiny-wan2.1-t2v", prompt="a fox", seed=1), registry=registry)
    with RunningServer(serve_options(tmp_path), registry) as first:
        job_id = requests.post(f"{first.url}/prompt", json={"prompt": prompt}, timeout=30).json()["prompt_id"]
        before = _wait_finished(first.url, [job_id])[job_id]
    with RunningServer(serve_options(tmp_path), registry) as second:
        after = requests.get(f"{second.url}/history/{job_id}", timeout=10).json()[job_id]
    assert after == before
    assert after["outputs"]


def test_interrupt_cancels_the_running_job_and_the_next_one_runs(tmp_path, serve_options):
    registry = node_registry()
    stalled = _StalledExecutor()
    with RunningServer(serve_options(tmp_path), registry, executor=stalled) as server:
        prompt = build_prompt(GenerationRequest(model="tiny-wan2.1-t2v", prompt="x", seed=0), registry=registry)
        first = requests.post(f"{server.url}/prompt", json={"prompt": prompt}, timeout=30).json()["prompt_id"]
        second = requests.post(f"{server.url}/prompt", json={"prompt": prompt}, timeout=30).json()["prompt_id"]
        assert stalled.started.wait(30)
        stalled.started.clear()
        assert requests.post(f"{server.url}/interrupt", json={"prompt_id": first}, timeout=10).status_code == 200
        assert stalled.started.wait(30), "the next job did not start"
        assert server.server.store.get(first).status == CANCELLED
        assert server.server.store.get(second).status == IN_PROGRESS


def test_twenty_clients_times_ten_requests_all_complete(tmp_path, serve_options):
    """20 concurrent clients (half ComfyUI over the websocket, half OpenAI polling) x 10 requests:
    every job completes and is found again; none is lost or run twice. Identical requests keep it
    fast (the executor's cache answers), so this measures the server, not the model."""
    registry = node_registry()
    with RunningServer(serve_options(tmp_path), registry) as server:
        report = asyncio.run(run_load(server.url, registry, clients=20, requests=10, api="mixed", mode="cached",
                                      timeout=TIMEOUT))
        assert server.server.store.count() == 200
    assert (report.completed, report.lost, report.failed) == (200, 0, 0), report.errors
    assert report.stats["overhead_ms"]["p99"] < 2000


def test_preload_loads_the_model_before_the_first_job(tmp_path, serve_options):
    model_cache.clear()
    loads = dict(model_cache.load_counts)
    with RunningServer(serve_options(tmp_path, preload="tiny-wan2.1-t2v"), node_registry()) as server:
        assert server.server.store.count() == 0
        for kind in ("diffusion_models", "text_encoders", "vae"):
            assert model_cache.load_counts.get(kind, 0) == loads.get(kind, 0) + 1, kind
