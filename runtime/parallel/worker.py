"""One rank of a multi-device job: its own model copy, its process groups, the job loop.

Ranks never receive weights: a job names the model's files and dtype (`ModelSpec`), and each
rank loads them itself onto its own device. Every rank runs the same single-device `sample()`
loop; inside it the transformer is sequence-parallel (usp_attention) and, with CFG-parallel,
the cond and uncond passes of a step run on the two halves of the ranks at once (`cfg_split`).
Because all ranks then hold identical latents, rank 0's result is the job's result.

Rank 0 feeds the job to the others with a broadcast on a control group whose timeout is long
(an idle group waits there between jobs); the work itself runs on groups with the job timeout,
so a dead or hung peer turns into an error instead of a wait without end. The same loop serves
ranks spawned by the worker group (worker_group.py) and ranks started by `torchrun`
(`worker_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..cache.distributed import RankLayout, rank_layout
from ..cache.job import release_cache
from ..errors import InputValueError, JobInterrupted, WanflowError
from ..progress import ProgressReporter
from ..sampling.request import SamplingRequest, SamplingResult
from .config import ParallelConfig
from .sharding import call_arguments
from .usp_attention import ParallelGroups, init_groups, sequence_parallel

log = logging.getLogger(__name__)

IDLE_TIMEOUT = datetime.timedelta(days=30)
"""How long ranks wait for the next job on the control group."""
STARTUP_TIMEOUT = datetime.timedelta(minutes=10)
"""Of the default group: ranks meet there after imports whose time varies a lot between ranks.
Job collectives run on groups with the job's own timeout (usp_attention.init_groups)."""


@dataclass(frozen=True)
class ModelSpec:
    """What a rank needs to build its own copy of the caller's model (never the weights)."""

    sources: tuple[str, ...]
    dtype: torch.dtype
    loras: tuple = ()
    attention: str = "auto"
    """runtime.attention backend name; "auto" keeps the loaded processors, as one device does."""

    @classmethod
    def of(cls, model: Any) -> "ModelSpec":
        if not model.sources:
            raise InputValueError(
                "the multi-GPU sampler needs a model loaded from files (the ranks load it themselves); "
                "this model has no source files",
                input_name="model",
            )
        return cls(sources=tuple(model.sources), dtype=model.dtype, loras=tuple(model.loras),
                   attention=model.attention)

    def key(self) -> tuple:
        return (self.sources, str(self.dtype), repr(self.loras), self.attention)


@dataclass
class Job:
    job_id: int
    spec: ModelSpec
    config: ParallelConfig
    request: SamplingRequest
    cache: Any = None
    """The caller's `WanModel.cache`; cache state is per job, so it is not part of the group key."""


def load_rank_model(spec: ModelSpec, device: torch.device) -> Any:
    """This rank's own WanModel, loaded from the spec's files like the single-device loader does."""
    from ..attention import apply_attention_backend  # noqa: PLC0415 - heavy
    from ..lora import apply_loras  # noqa: PLC0415
    from ..models.loader import combine_experts, load_diffusion_model  # noqa: PLC0415

    parts = [load_diffusion_model(path, dtype=spec.dtype, device=device) for path in spec.sources]
    model = parts[0] if len(parts) == 1 else combine_experts(*parts)
    if spec.loras:
        model = apply_loras(model, spec.loras)  # each rank reads the LoRA files itself
    if spec.attention != "auto":
        for transformer in model.experts():
            apply_attention_backend(transformer, spec.attention)
    return model.replace(attention=spec.attention)


def device_for(config: ParallelConfig, local_rank: int) -> torch.device:
    if config.uses_cuda():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class _CfgSplit:
    """CFG-parallel for one expert: the sampling loop calls it cond then uncond each step (like
    diffusers' WanPipeline); the first call computes this rank's half (cond on cfg index 0,
    uncond on 1), all-gathers both halves, and the second call returns the gathered other half.

    Calls it cannot pair (other embeds, a step without CFG) run normally on every rank, which is
    correct, only not faster. All ranks see identical inputs, so they always take the same path.
    """

    def __init__(self, transformer: torch.nn.Module, groups: ParallelGroups,
                 branches: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.transformer = transformer
        self.forward = type(transformer).forward.__get__(transformer)
        self.groups = groups
        self.branches = branches
        self.pending: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor] | None = None
        self.split_steps = 0

    def _branches_of(self, embeds: torch.Tensor) -> list[int]:
        """Which of (positive, negative) these embeds are; both when the prompts are equal."""
        return [
            index
            for index, branch in enumerate(self.branches)
            if embeds.shape == branch.shape and torch.equal(embeds, branch.to(embeds))
        ]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = call_arguments(self.transformer, args, kwargs)
        return_dict = arguments.pop("return_dict", True)
        hidden, timestep = arguments["hidden_states"], arguments["timestep"]
        matches = self._branches_of(arguments["encoder_hidden_states"])
        pending, self.pending = self.pending, None
        if (
            pending is not None
            and pending[2] in matches
            and torch.equal(hidden, pending[0])
            and torch.equal(timestep, pending[1])
        ):
            out = pending[3]
        elif not matches:
            out = self.forward(**arguments, return_dict=False)[0]
        else:
            branch = matches[0]
            mine = self.branches[self.groups.cfg_index].to(arguments["encoder_hidden_states"])
            local = self.forward(**{**arguments, "encoder_hidden_states": mine}, return_dict=False)[0]
            halves = [torch.empty_like(local) for _ in self.branches]
            dist.all_gather(halves, local.contiguous(), group=self.groups.cfg_group)
            self.pending = (hidden, timestep, 1 - branch, halves[1 - branch])
            self.split_steps += 1
            out = halves[branch]
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput  # noqa: PLC0415

            return Transformer2DModelOutput(sample=out)
        return (out,)


@contextlib.contextmanager
def cfg_split(model: Any, groups: ParallelGroups, request: SamplingRequest) -> Iterator[list[_CfgSplit]]:
    """Split each CFG step's two transformer calls over the cond / uncond halves of the ranks;
    yields the installed splitters (their `split_steps` say how many steps ran split)."""
    second = request.guidance_scale if request.guidance_scale_2 is None else request.guidance_scale_2
    guidance = (request.guidance_scale, second)
    if groups.cfg_group is None or request.negative is None:
        yield []
        return
    batch = request.latent_shape[0]
    branches = tuple(
        (e.expand(batch, -1, -1) if e.shape[0] == 1 else e).to(model.device, model.dtype)
        for e in (request.positive, request.negative)
    )
    splitters = []
    for transformer, scale in zip(model.experts(), guidance):
        # The loop skips the uncond call at guidance <= 1 (its rule, mirrored here): nothing to pair.
        if scale > 1.0:
            splitter = _CfgSplit(transformer, groups, branches)
            # A bound method, as a forward usually is: Cache-DiT wraps it for the job and, when
            # it takes its hooks off, puts it back with `forward.__get__(transformer)`.
            transformer.forward = splitter.__call__
            splitters.append(splitter)
    try:
        yield splitters
    finally:
        for splitter in splitters:
            del splitter.transformer.forward  # drops the instance attribute: the class's forward is back


def run_job(model: Any, groups: ParallelGroups, request: SamplingRequest, reporter: ProgressReporter) -> SamplingResult:
    """The single-device sampling loop, run with this rank's share of the work."""
    from ..sampling.loop import sample  # noqa: PLC0415 - the loop imports the model stack

    with contextlib.ExitStack() as stack:
        release_cache(model)  # the cache's hooks go on top of the wrappers below, per job
        for transformer in model.experts():
            stack.enter_context(sequence_parallel(transformer, groups))
        splitters = stack.enter_context(cfg_split(model, groups, request))
        layout = RankLayout(shard=groups.shard, cfg_group=groups.cfg_group, cfg_index=groups.cfg_index,
                            cfg_split=tuple(s.transformer for s in splitters))
        stack.enter_context(rank_layout(layout))
        result = sample(model, request, reporter)
    config = groups.config
    result.stats["parallel"] = {
        "ranks": config.world_size,
        "ulysses": config.ulysses_degree,
        "ring": config.ring_degree,
        "cfg_parallel": config.cfg_parallel,
        "cfg_split_steps": sum(s.split_steps for s in splitters),
    }
    return result


class Rank:
    """One rank's lasting state: process groups per parallel config, model per spec."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self._groups: ParallelGroups | None = None
        self._model: Any = None
        self._model_key: tuple | None = None

    def prepare(self, spec: ModelSpec, config: ParallelConfig) -> None:
        """Groups and model for a job; collective when the config changes (new_group)."""
        if self._groups is None or self._groups.config != config:
            self._groups = init_groups(config, self.rank)
        if self._model_key != spec.key():
            self._model = None  # free the old copy before loading the next
            self._model = load_rank_model(spec, self.device)
            self._model_key = spec.key()

    def adopt(self, model: Any, spec: ModelSpec) -> None:
        """Use the caller's own loaded model (rank 0 under torchrun, when it sits on this rank's
        device) instead of loading a second copy of the same files."""
        if model.device == self.device:
            self._model, self._model_key = model.replace(parallel=None), spec.key()

    def receive(self, job: Job | None = None) -> Job | None:
        """Rank 0 passes the next job (None: shut down); every rank returns it."""
        box = [job]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def run(self, job: Job, on_progress: Callable, interrupted: Callable[[], bool]) -> SamplingResult:
        self.prepare(job.spec, job.config)
        model = self._model.replace(cache=job.cache)
        reporter = ProgressReporter(
            on_progress=on_progress if self.rank == 0 else None,
            extra_interrupt_check=functools.partial(self._interrupt_flag, interrupted),
        )
        return run_job(model, self._groups, job.request, reporter)

    def _interrupt_flag(self, interrupted: Callable[[], bool]) -> bool:
        # Collective, so every rank stops at the same step: a rank that stopped alone would
        # leave the others waiting in the next step's all-to-all.
        local = self.rank == 0 and interrupted()
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._groups.everyone)
        return bool(flag.item())


def describe_error(exc: BaseException) -> BaseException | str:
    """What a rank sends back: user-facing errors as themselves, anything else as its traceback."""
    if isinstance(exc, WanflowError):
        return exc
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def is_comm_error(exc: BaseException) -> bool:
    """A failed collective: usually the symptom of another rank's death or hang, not the cause."""
    # NCCL failures are DistErrors; gloo's timeouts and closed connections are plain
    # RuntimeErrors whose message starts with the gloo source path.
    return isinstance(exc, dist.DistError) or "gloo/" in str(exc)


def serve(rank: Rank, next_job: Callable[[], Job | None], emit: Callable[[tuple], None],
          interrupted: Callable[[], bool]) -> bool:
    """The job loop of a rank: until rank 0 passes None (returns True), or until a job fails
    (returns False; the caller tears the group down, because a failed rank may have left the
    others mid-collective).

    Events are tuples (kind, job_id, rank, *payload): ("ready", None, r), ("progress", id, 0,
    value, total, preview), ("result", id, 0, SamplingResult), ("interrupted", id, r),
    ("error", id, r, WanflowError or traceback text, is_comm_error).
    """
    while True:
        job = rank.receive(next_job() if rank.rank == 0 else None)
        if job is None:
            return True
        try:
            result = rank.run(job, lambda v, t, p: emit(("progress", job.job_id, 0, v, t, p)), interrupted)
        except JobInterrupted:
            emit(("interrupted", job.job_id, rank.rank))
            continue
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            emit(("error", job.job_id, rank.rank, describe_error(exc), is_comm_error(exc)))
            return False
        if rank.rank == 0:
            emit(("result", job.job_id, 0, result))


def spawned_rank_main(
    rank: int,
    config: ParallelConfig,
    init_method: str,
    spec: ModelSpec,
    jobs: Any,
    events: Any,
    interrupt: Any,
) -> None:
    """Entry point of a rank process started by the worker group (torch.multiprocessing spawn)."""
    logging.basicConfig(level=logging.WARNING, format=f"[wanflow rank {rank}] %(levelname)s %(message)s")
    if not config.uses_cuda():
        # Ranks share the CPU: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    try:
        device = device_for(config, rank)
        dist.init_process_group(
            config.resolved_backend(),
            init_method=init_method,
            rank=rank,
            world_size=config.world_size,
            timeout=STARTUP_TIMEOUT,
        )
        state = Rank(rank, device)
        state.prepare(spec, config)
    except Exception as exc:  # noqa: BLE001
        events.put(("error", None, rank, describe_error(exc), is_comm_error(exc)))
        return
    events.put(("ready", None, rank))
    try:
        serve(state, jobs.get, events.put, interrupt.is_set)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        events.close()
        events.join_thread()  # every event reaches the caller before the process ends
        # Skip the interpreter's teardown of torch/diffusers (seconds per rank): nothing is
        # left to clean up, and the group's unload waits for this exit.
        os._exit(0)


def is_torchrun_worker() -> bool:
    """True in a process `torchrun` started as a rank other than 0 (it should run worker_main)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def init_from_env() -> Rank:
    """Join the torchrun group (env://) as this process's rank."""
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=STARTUP_TIMEOUT)
    return Rank(rank, device)


def worker_main() -> int:
    """`wanflow worker` under torchrun (multi-node): serve the jobs rank 0 broadcasts until it
    shuts the group down. Rank 0 is the process that runs the workflow (sample_parallel)."""
    logging.basicConfig(level=logging.INFO, format=f"[wanflow rank {os.environ.get('RANK', '?')}] %(message)s")
    rank = init_from_env()

    def emit(event: tuple) -> None:
        if event[0] == "error":
            log.error("job %s failed on this rank:\n%s", event[1], event[3])

    clean = serve(rank, lambda: None, emit, lambda: False)
    dist.destroy_process_group()
    return 0 if clean else 1
