"""Load test of `wanflow serve` on loopback: N concurrent clients x M requests each.

Every client submits its requests one after another and waits for each to finish (ComfyUI
clients over the websocket, OpenAI clients by polling), then checks the result is in the
history. Reported per job, from the client's clock and the server's job record:
  submit_ms    POST round trip (validation + enqueue)
  queue_ms     waiting behind other jobs (server: start - create)
  exec_ms      running in the executor (server: end - start)
  notify_ms    from the job ending to the client knowing (websocket message / poll)
  overhead_ms  end-to-end minus queue and execution: what the server adds to a job
and the worker's dispatch gaps (idle time between jobs while the queue was not empty).

Without --url it builds the tiny models, starts a server on an ephemeral loopback port and
stops it afterwards. Only loopback addresses are accepted.

Usage: python -m wanflow.scripts.load_test [--clients 20] [--requests 10] [--api comfy|openai|mixed]
       [--mode distinct|cached] [--out load.json] [--url http://127.0.0.1:8188]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp

from ..runtime.workflow.templates import GenerationRequest, build_prompt

log = logging.getLogger(__name__)

MODEL = "tiny-wan2.1-t2v"
POLL_S = 0.02


@dataclass
class JobTiming:
    client: int
    api: str
    job_id: str = ""
    submit_ms: float = 0.0
    e2e_ms: float = 0.0
    queue_ms: float = 0.0
    exec_ms: float = 0.0
    notify_ms: float = 0.0
    overhead_ms: float = 0.0
    start_ms: int = 0
    end_ms: int = 0
    create_ms: int = 0
    ok: bool = False
    error: str = ""
    started: float = field(default_factory=time.time, repr=False)
    """Client clock (epoch seconds) when the job was submitted: end-to-end times start here."""


@dataclass
class LoadReport:
    clients: int
    requests_per_client: int
    api: str
    mode: str
    submitted: int = 0
    completed: int = 0
    lost: int = 0
    failed: int = 0
    wall_s: float = 0.0
    jobs_per_s: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))], 2)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2)}


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"load_test only targets loopback servers, not {host!r}")


async def _server_times(session: aiohttp.ClientSession, url: str, timing: JobTiming) -> None:
    async with session.get(f"{url}/api/jobs/{timing.job_id}") as response:
        job = await response.json()
    timing.create_ms, timing.start_ms, timing.end_ms = job["create_time"], job["execution_start_time"], \
        job["execution_end_time"]
    timing.queue_ms = timing.start_ms - timing.create_ms
    timing.exec_ms = timing.end_ms - timing.start_ms
    timing.ok = job["status"] == "completed"
    if not timing.ok:
        timing.error = json.dumps(job.get("execution_error", job["status"]))[:300]


async def _submit(session: aiohttp.ClientSession, url: str, body: dict, timing: JobTiming) -> dict | None:
    """POST a job, timing the round trip; the reply, or None (error recorded) when it was refused."""
    async with session.post(url, json=body) as response:
        reply = await response.json()
    timing.submit_ms = (time.time() - timing.started) * 1000
    if response.status != 200:
        timing.error = json.dumps(reply)[:300]
        return None
    return reply


async def _finished(session: aiohttp.ClientSession, url: str, timing: JobTiming) -> None:
    """The client knows the job ended: end-to-end and notification times, then the server's times."""
    done = time.time()
    timing.e2e_ms = (done - timing.started) * 1000
    await _server_times(session, url, timing)
    timing.notify_ms = done * 1000 - timing.end_ms


async def _comfy_client(index: int, url: str, prompts: list[dict], timeout: float) -> list[JobTiming]:
    client_id = uuid.uuid4().hex
    timings = []
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        for prompt in prompts:
            timing = JobTiming(index, "comfy")
            timings.append(timing)
            reply = await _submit(session, f"{url}/prompt", {"prompt": prompt, "client_id": client_id}, timing)
            if reply is None:
                continue
            timing.job_id = reply["prompt_id"]
            while True:
                msg = await ws.receive(timeout=timeout)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data["type"] == "executing" and data["data"].get("node") is None \
                        and data["data"].get("prompt_id") == timing.job_id:
                    break
            await _finished(session, url, timing)
            async with session.get(f"{url}/history/{timing.job_id}") as response:
                history = await response.json()
            timing.ok = timing.ok and bool(history.get(timing.job_id, {}).get("outputs"))
    return timings


async def _openai_client(index: int, url: str, requests: list[dict], timeout: float) -> list[JobTiming]:
    timings = []
    async with aiohttp.ClientSession() as session:
        for fields in requests:
            timing = JobTiming(index, "openai")
            timings.append(timing)
            body = await _submit(session, f"{url}/v1/videos", fields, timing)
            if body is None:
                continue
            timing.job_id = body["id"]
            deadline = time.monotonic() + timeout
            while body["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                async with session.get(f"{url}/v1/videos/{timing.job_id}") as response:
                    body = await response.json()
            await _finished(session, url, timing)
            async with session.get(f"{url}/v1/videos/{timing.job_id}/content") as response:
                timing.ok = timing.ok and response.status == 200 and len(await response.read()) > 0
    return timings


def _seeds(clients: int, per_client: int, mode: str) -> list[list[int]]:
    """Seeds per client: all different (every job samples) or all equal (every job is cached)."""
    return [[0 if mode == "cached" else c * per_client + r for r in range(per_client)] for c in range(clients)]


async def run_load(url: str, registry: Any, *, clients: int = 20, requests: int = 10, api: str = "comfy",
                   mode: str = "distinct", timeout: float = 600.0, workflows_dir: Path | None = None) -> LoadReport:
    """Run the load against a server at `url`; returns the report (also for tests)."""
    _check_loopback(url)
    seeds = _seeds(clients, requests, mode)
    tasks = []
    for index, client_seeds in enumerate(seeds):
        client_api = api if api != "mixed" else ("comfy" if index % 2 == 0 else "openai")
        if client_api == "comfy":
            prompts = [build_prompt(GenerationRequest(model=MODEL, prompt="a red fox", seed=s), registry=registry,
                                    workflows_dir=workflows_dir) for s in client_seeds]
            tasks.append(_comfy_client(index, url, prompts, timeout))
        else:
            bodies = [{"model": MODEL, "prompt": "a red fox", "seed": s} for s in client_seeds]
            tasks.append(_openai_client(index, url, bodies, timeout))
    started = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
    wall = time.perf_counter() - started

    report = LoadReport(clients, requests, api, mode, wall_s=round(wall, 2))
    timings: list[JobTiming] = []
    for result in results:
        if isinstance(result, BaseException):
            report.errors.append(f"client failed: {result!r}")
        else:
            timings.extend(result)
    report.submitted = sum(1 for t in timings if t.job_id)
    report.completed = sum(1 for t in timings if t.ok)
    report.failed = sum(1 for t in timings if t.job_id and not t.ok)
    report.lost = clients * requests - report.completed - report.failed
    report.errors += [t.error for t in timings if t.error][:10]
    report.jobs_per_s = round(report.completed / wall, 2) if wall else 0.0
    for t in timings:
        t.overhead_ms = t.e2e_ms - t.queue_ms - t.exec_ms
    done = [t for t in timings if t.ok]
    by_start = sorted(done, key=lambda t: t.start_ms)
    gaps = [b.start_ms - max(b.create_ms, a.end_ms) for a, b in zip(by_start, by_start[1:])]
    report.stats = {
        name: _percentiles([getattr(t, name) for t in done])
        for name in ("submit_ms", "queue_ms", "exec_ms", "notify_ms", "overhead_ms", "e2e_ms")
    }
    report.stats["dispatch_gap_ms"] = _percentiles([float(g) for g in gaps])
    return report


def _start_local_server(models: Path | None):
    from ..nodes import node_registry  # noqa: PLC0415 - scripts may use the nodes; only here
    from ..runtime.server.app import RunningServer, ServeOptions  # noqa: PLC0415
    from ..runtime.tiny import make_tiny_models  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="wanflow-load-"))
    models_root = make_tiny_models(models or work / "models").root
    registry = node_registry()
    options = ServeOptions(models_dir=models_root, output_dir=work / "output", input_dir=work / "input",
                           temp_dir=work / "temp", user_dir=work / "user", port=0, previews=True)
    return RunningServer(options, registry).start(), registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanflow load-test", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--api", choices=("comfy", "openai", "mixed"), default="comfy")
    parser.add_argument("--mode", choices=("distinct", "cached"), default="distinct",
                        help="distinct: every job samples; cached: identical jobs (server overhead only)")
    parser.add_argument("--url", help="an already running loopback server (default: start one on tiny models)")
    parser.add_argument("--models", type=Path, help="where to build / find the tiny models")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, help="write the JSON report here (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from ..nodes import node_registry  # noqa: PLC0415

    server = None
    if args.url:
        url, registry = args.url.rstrip("/"), node_registry()
    else:
        server, registry = _start_local_server(args.models)
        url = server.url
    try:
        report = asyncio.run(run_load(url, registry, clients=args.clients, requests=args.requests, api=args.api,
                                      mode=args.mode, timeout=args.timeout))
    finally:
        if server is not None:
            server.stop()
    text = json.dumps(asdict(report), indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0 if report.lost == 0 and report.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
