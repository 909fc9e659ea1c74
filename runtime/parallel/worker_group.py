"""The rank processes behind `sample_parallel`, kept warm between jobs.

One group at a time, keyed by (model files, dtype, LoRA stack, attention backend, parallel
config): a job with the
same key reuses the running ranks (their models stay loaded), another key or `unload()` stops
them. Ranks are spawned on this machine, one per GPU (or per CPU share with gloo); a rank that
fails, dies or goes silent fails the job with an error naming it, and the group is torn down so
the next job starts a fresh one. Under `torchrun` this process is rank 0 itself and the other
ranks run `worker_main` (worker.py).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.machinery
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import InputValueError, JobInterrupted, WanflowError
from ..progress import ProgressReporter, current_reporter
from ..sampling.request import SamplingRequest, SamplingResult
from .config import ParallelConfig
from .sharding import check_ring_split
from .worker import Job, ModelSpec, Rank, init_from_env, spawned_rank_main

log = logging.getLogger(__name__)

POLL_S = 0.05
BLAME_GRACE_S = 2.0
"""After a rank reports a failed collective, how long to wait for the rank that caused it."""
SILENCE_GRACE_S = 30.0
"""Beyond timeout_s: ranks' own collective timeouts should have reported by then."""
STARTUP_MIN_S = 300.0
"""Loading a model on every rank can take long; the start-up wait is at least this."""


class WorkerGroupError(WanflowError):
    """A rank of the multi-GPU group failed, died or hung; `rank` names it (None: unknown)."""

    error_type = "parallel_worker_error"

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message, node="WanflowParallelConfig")
        self.rank = rank


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _importable_by_children() -> None:
    """Spawned ranks import this package by its name in this process; inside ComfyUI that name is
    the custom-node folder's, importable only with the folder's parent on sys.path (children
    inherit sys.path at spawn)."""
    top = __name__.split(".")[0]
    if importlib.machinery.PathFinder.find_spec(top) is None:
        parent = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules[top].__file__)))
        if parent not in sys.path:
            sys.path.append(parent)


def _on_cpu(request: SamplingRequest) -> SamplingRequest:
    """The request with its tensors on the CPU: it is pickled to every rank, each of which moves
    it to its own device (embeds from a text encoder on GPU 0 would otherwise all land there)."""
    def cpu(value: Any) -> Any:
        return value.cpu() if isinstance(value, torch.Tensor) else value

    return dataclasses.replace(
        request,
        positive=cpu(request.positive),
        negative=cpu(request.negative),
        init_latent=cpu(request.init_latent),
        conditioning={key: cpu(value) for key, value in request.conditioning.items()},
    )


def _rank_failure(rank: int, error: BaseException | str, during: str) -> WanflowError:
    if isinstance(error, WanflowError):
        return error  # a user-facing error every rank raises alike (bad input): keep its shape
    return WorkerGroupError(f"multi-GPU rank {rank} failed {during}:\n{error}", rank)


class _JobState:
    """What the caller has heard from the ranks about one job."""

    def __init__(self, job_id: int, reporter: ProgressReporter) -> None:
        self.job_id = job_id
        self.reporter = reporter
        self.last_heard = time.monotonic()
        self.comm_failures: dict[int, str] = {}
        self.first_comm_failure = 0.0
        self.stop: BaseException | None = None

    def handle(self, event: tuple) -> SamplingResult | None:
        """The job's result, None to keep waiting; raises the job's failure or interrupt."""
        kind, job_id, rank, *payload = event
        if job_id != self.job_id:
            return None  # late news of an earlier, interrupted job
        self.last_heard = time.monotonic()
        if kind == "progress":
            self.reporter.progress(*payload)
        elif kind == "result":
            return payload[0]
        elif kind == "interrupted":
            raise self.stop or JobInterrupted()
        elif kind == "error":
            error, is_comm = payload
            if not is_comm:
                raise _rank_failure(rank, error, "during the job")
            self.comm_failures.setdefault(rank, str(error))
            self.first_comm_failure = self.first_comm_failure or time.monotonic()
        return None

    def poll_interrupt(self, interrupt: Any) -> None:
        """Pass the caller's interrupt on to the ranks (once); they stop together and report."""
        if self.stop is not None:
            return
        try:
            if self.reporter.interrupted():
                self.stop = JobInterrupted()
        except BaseException as exc:  # noqa: BLE001 - ComfyUI signals interrupts by raising
            self.stop = exc
        if self.stop is not None:
            interrupt.set()


class WorkerGroup:
    """`config.gpus` spawned rank processes serving jobs for one model spec."""

    def __init__(self, spec: ModelSpec, config: ParallelConfig) -> None:
        self.spec = spec
        self.config = config
        self.key = (spec.key(), config)
        self._job_ids = itertools.count(1)
        _importable_by_children()
        ctx = mp.get_context("spawn")
        self._events = ctx.Queue()
        self._jobs = ctx.Queue()  # read by rank 0 only; it broadcasts each job to the others
        self._interrupt = ctx.Event()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._procs = [
            ctx.Process(
                target=spawned_rank_main,
                args=(rank, config, init_method, spec, self._jobs, self._events, self._interrupt),
                name=f"wanflow-rank-{rank}",
                daemon=True,
            )
            for rank in range(config.world_size)
        ]
        for proc in self._procs:
            proc.start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def _dead(self) -> list[int]:
        return [rank for rank, proc in enumerate(self._procs) if proc.exitcode is not None]

    def _died(self, rank: int, during: str) -> WorkerGroupError:
        code = self._procs[rank].exitcode
        return WorkerGroupError(f"multi-GPU rank {rank} exited unexpectedly (exit code {code}) {during}", rank)

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + max(self.config.timeout_s, STARTUP_MIN_S)
        while len(ready) < len(self._procs):
            event = self._next_event()
            if event is not None and event[0] == "ready":
                ready.add(event[2])
            elif event is not None and event[0] == "error":
                raise _rank_failure(event[2], event[3], "while starting")
            for rank in self._dead():
                raise self._died(rank, "while starting")
            if time.monotonic() > deadline:
                missing = sorted(set(range(len(self._procs))) - ready)
                raise WorkerGroupError(f"multi-GPU ranks {missing} did not start in time", missing[0])

    def _next_event(self) -> tuple | None:
        try:
            return self._events.get(timeout=POLL_S)
        except queue.Empty:
            return None

    def run(self, request: SamplingRequest, reporter: ProgressReporter, *, cache: Any = None) -> SamplingResult:
        """Run one job; on any failure but an interrupt the group is closed before raising."""
        job_id = next(self._job_ids)
        self._interrupt.clear()
        self._jobs.put(Job(job_id, self.spec, self.config, _on_cpu(request), cache=cache))
        try:
            return self._collect(job_id, reporter)
        except JobInterrupted:
            raise
        except BaseException:
            self.close()
            raise

    def _collect(self, job_id: int, reporter: ProgressReporter) -> SamplingResult:
        state = _JobState(job_id, reporter)
        while True:
            event = self._next_event()
            state.poll_interrupt(self._interrupt)
            if event is not None:
                result = state.handle(event)
                if result is not None:
                    return result
                continue
            if self._dead():
                # A rank's last events precede its exit: read them all before judging the death.
                while (event := self._next_event()) is not None:
                    result = state.handle(event)
                    if result is not None:
                        return result
                for rank in self._dead():
                    if rank not in state.comm_failures:
                        raise self._died(rank, "during the job")
            now = time.monotonic()
            if state.first_comm_failure and now - state.first_comm_failure > BLAME_GRACE_S:
                raise self._blame_silent(state.comm_failures)
            if now - state.last_heard > self.config.timeout_s + SILENCE_GRACE_S:
                raise self._blame_silent(state.comm_failures)

    def _blame_silent(self, comm_failures: dict[int, str]) -> WorkerGroupError:
        """The ranks whose peers' collectives failed while they said nothing are the hung ones."""
        silent = [rank for rank in range(len(self._procs)) if rank not in comm_failures]
        timeout = self.config.timeout_s
        if silent:
            names = ", ".join(str(r) for r in silent)
            return WorkerGroupError(
                f"multi-GPU rank {names} stopped responding (no reply within {timeout:g} s; "
                "the other ranks' collectives failed waiting for it)",
                silent[0],
            )
        rank, error = next(iter(comm_failures.items()))
        return WorkerGroupError(f"multi-GPU rank {rank} failed in a collective:\n{error}", rank)

    def close(self) -> None:
        """Stop every rank: politely if it is idle, by force if it hangs."""
        with contextlib.suppress(Exception):
            self._jobs.put(None)
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL: a stopped or deadlocked rank ignores SIGTERM
            proc.join(timeout=5.0)
        for q in (self._jobs, self._events):
            q.cancel_join_thread()
            q.close()


_lock = threading.Lock()
_group: WorkerGroup | None = None
_torchrun_rank: Rank | None = None


def active_group() -> WorkerGroup | None:
    """The running group, if any (tests and the server's status use it)."""
    return _group


def unload() -> None:
    """Stop the worker group (ComfyUI's / the server's "free memory")."""
    global _group
    with _lock:
        if _group is not None:
            _group.close()
            _group = None


atexit.register(unload)


def sample_parallel(model: Any, request: SamplingRequest, reporter: ProgressReporter | None = None) -> SamplingResult:
    """`sample()` for a model with `model.parallel` set: the same request in, the same result out.

    Spawned ranks load `model.sources` themselves (the caller's transformer stays idle); under
    torchrun this process is rank 0 and runs its share on the caller's own model.
    """
    global _group
    config: ParallelConfig = model.parallel
    config.validate(num_heads=model.transformer.config.num_attention_heads)
    spec = ModelSpec.of(model)
    check_ring_split(request.latent_shape, tuple(model.transformer.config.patch_size), config)
    reporter = reporter or current_reporter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _sample_as_torchrun_rank0(model, spec, config, request, reporter)
    config.check_local_devices()
    with _lock:
        if _group is not None and (_group.key != (spec.key(), config) or not _group.alive()):
            _group.close()
            _group = None
        if _group is None:
            log.info("starting %d multi-GPU ranks for %s", config.world_size, spec.sources)
            _group = WorkerGroup(spec, config)
        group = _group
        try:
            return group.run(request, reporter, cache=model.cache)
        finally:
            if not group.alive():
                _group = None


def _sample_as_torchrun_rank0(model: Any, spec: ModelSpec, config: ParallelConfig,
                              request: SamplingRequest, reporter: ProgressReporter) -> SamplingResult:
    """Under torchrun this process is rank 0: broadcast the job, then run its share in-process."""
    global _torchrun_rank
    if int(os.environ.get("RANK", "0")) != 0:
        raise WorkerGroupError("under torchrun only rank 0 runs the workflow; the others run `wanflow worker`")
    world = int(os.environ["WORLD_SIZE"])
    if config.world_size != world:
        raise InputValueError(
            f"the parallel config needs {config.world_size} ranks but torchrun started {world}",
            node="WanflowParallelConfig", input_name="gpus",
        )
    if _torchrun_rank is None:
        _torchrun_rank = init_from_env()
        atexit.register(lambda: _torchrun_rank.receive(None))
    _torchrun_rank.adopt(model, spec)
    job = Job(0, spec, config, _on_cpu(request), cache=model.cache)
    _torchrun_rank.receive(job)
    return _torchrun_rank.run(job, reporter.progress, reporter.interrupted)
