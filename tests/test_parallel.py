"""Multi-rank sampling on CPU/gloo: Ulysses and CFG-parallel give the single-device latent, the
worker group persists per key, faults name the rank, interrupts reach every rank, every rank
applies the model's LoRA stack.

Ranks are real spawned processes loading the tiny model file; spawning costs seconds, so the
tests share one group per parallel config (the module's order starts each config once, plus
the rebuilds the fault tests ask for)."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import save_file

from wanflow.nodes.parallel import PARALLEL_NODES, WanflowParallelConfig
from wanflow.runtime.errors import InputValueError, JobInterrupted
from wanflow.runtime.lora import LoraSpec, apply_loras
from wanflow.runtime.models.loader import load_diffusion_model
from wanflow.runtime.parallel import ModelSpec, ParallelConfig, WorkerGroupError, active_group, sample_parallel, unload
from wanflow.runtime.parallel.sharding import SequenceShard, check_ring_split
from wanflow.runtime.progress import ProgressReporter
from wanflow.runtime.sampling.loop import sample
from wanflow.runtime.sampling.request import SamplingRequest

ULYSSES = ParallelConfig(gpus=2, ulysses_degree=2, timeout_s=10)
CFG = ParallelConfig(gpus=2, ulysses_degree=1, cfg_parallel=True, timeout_s=10)
DIVIDES = (1, 16, 2, 8, 8)  # 2 x 4 x 4 = 32 tokens
ODD = (1, 16, 3, 6, 10)  # 3 x 3 x 5 = 45 tokens: padded to 46 over 2 ranks
STEPS = 3


@pytest.fixture(scope="module")
def model(tiny_models):
    yield load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32)
    unload()


def _request(shape=DIVIDES, steps=STEPS) -> SamplingRequest:
    g = torch.Generator().manual_seed(7)
    return SamplingRequest(
        positive=torch.randn(1, 12, 64, generator=g),
        negative=torch.randn(1, 9, 64, generator=g),
        latent_shape=shape,
        seed=11,
        steps=steps,
        guidance_scale=5.0,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _run(model, config, request=None, reporter=None):
    return sample_parallel(model.replace(parallel=config), request or _request(), reporter)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, num_heads, field, says",
    [
        (dict(gpus=4, ulysses_degree=2), 2, "gpus", "must equal the GPU count"),
        (dict(gpus=2, ulysses_degree=2, cfg_parallel=True), 2, "gpus", "x 2 (cfg_parallel) = 4, but gpus is 2"),
        (dict(gpus=3, ulysses_degree=3), 2, "ulysses_degree", "2 attention heads"),
        (dict(gpus=2, ulysses_degree=1, ring_degree=2), 2, "ring_degree", "ring attention needs CUDA"),
        (dict(gpus=0, ulysses_degree=1), 2, "gpus", ">= 1"),
        (dict(gpus=2, backend="mpi"), 2, "backend", "one of auto, nccl, gloo"),
    ],
)
def test_config_errors_name_the_field(fields, num_heads, field, says):
    with pytest.raises(InputValueError) as info:
        ParallelConfig(**{"backend": "gloo", **fields}).validate(num_heads=num_heads)
    assert info.value.input_name == field
    assert info.value.node == "WanflowParallelConfig"
    assert says in info.value.message


def test_config_counts_cfg_halves_in_the_gpus():
    config = ParallelConfig(gpus=4, ulysses_degree=2, cfg_parallel=True, backend="gloo").validate(num_heads=2)
    assert (config.sp_degree, config.cfg_degree, config.world_size) == (2, 2, 4)


def test_split_pads_the_last_slice_with_zeros():
    tokens = torch.arange(1.0, 6.0).reshape(1, 5, 1)  # 5 tokens over 2 ranks: 3 + 2 and 1 pad
    first = SequenceShard(group=None, rank=0, degree=2, seq_len=5).split(tokens)
    last = SequenceShard(group=None, rank=1, degree=2, seq_len=5).split(tokens)
    assert first.flatten().tolist() == [1.0, 2.0, 3.0]
    assert last.flatten().tolist() == [4.0, 5.0, 0.0]


def test_ring_refuses_a_token_count_that_does_not_divide():
    ring = ParallelConfig(gpus=2, ulysses_degree=1, ring_degree=2)
    check_ring_split(DIVIDES, (1, 2, 2), ring)
    with pytest.raises(InputValueError, match="45 tokens, which ring attention cannot split") as info:
        check_ring_split(ODD, (1, 2, 2), ring)
    assert info.value.input_name == "ring_degree"


def test_node_attaches_a_validated_config(model):
    (out,) = WanflowParallelConfig().execute(model, gpus=2, ulysses_degree=2, ring_degree=1, cfg_parallel=False)
    assert out.parallel == ParallelConfig(gpus=2, ulysses_degree=2)
    assert model.parallel is None
    assert "WanflowParallelConfig" in PARALLEL_NODES
    with pytest.raises(InputValueError, match="gpus"):
        WanflowParallelConfig().execute(model, gpus=3, ulysses_degree=2, ring_degree=1, cfg_parallel=False)


def test_a_model_without_source_files_is_refused(model):
    with pytest.raises(InputValueError, match="no source files"):
        ModelSpec.of(model.replace(sources=()))


# --------------------------------------------------------------------------- Ulysses


def test_ulysses_on_two_ranks_gives_the_single_device_latent(model):
    request = _request()
    expected = sample(model, request).latent
    result = _run(model, ULYSSES, request)
    assert result.latent.shape == expected.shape
    assert _rel(result.latent, expected) <= 1e-5
    assert result.stats["parallel"]["ulysses"] == 2


def test_ulysses_pads_a_token_count_that_does_not_divide(model):
    request = _request(ODD)
    expected = sample(model, request).latent
    assert _rel(_run(model, ULYSSES, request).latent, expected) <= 1e-5


def test_the_group_is_reused_while_the_key_stays_the_same(model):
    _run(model, ULYSSES)
    group, pids = active_group(), active_group().pids
    _run(model, ULYSSES, _request(ODD))
    assert active_group() is group
    assert active_group().pids == pids


def test_progress_and_previews_from_rank_0_reach_the_reporter(model):
    seen = []
    _run(model, ULYSSES, reporter=ProgressReporter(on_progress=lambda v, t, p: seen.append((v, t, p))))
    assert [(v, t) for v, t, _ in seen] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert all(p.shape == DIVIDES for _, _, p in seen)


def test_an_interrupt_stops_every_rank_and_keeps_the_group(model):
    _run(model, ULYSSES)
    pids = active_group().pids
    reporter = ProgressReporter()
    reporter.on_progress = lambda v, t, p: reporter.interrupt_event.set()
    with pytest.raises(JobInterrupted):
        _run(model, ULYSSES, _request(steps=40), reporter)
    assert active_group().pids == pids
    assert _run(model, ULYSSES).latent.shape == DIVIDES


# --------------------------------------------------------------------------- CFG-parallel


def test_a_new_key_rebuilds_the_group(model):
    _run(model, ULYSSES)
    old = active_group()
    _run(model, CFG)
    assert active_group() is not old
    assert not set(active_group().pids) & set(old.pids)
    assert not old.alive()


def test_cfg_parallel_gives_the_single_device_latent(model):
    request = _request(ODD)
    expected = sample(model, request).latent
    result = _run(model, CFG, request)
    assert _rel(result.latent, expected) <= 1e-5
    assert result.stats["parallel"]["cfg_split_steps"] == STEPS  # each step ran split, not twice


# --------------------------------------------------------------------------- faults


def _signal_rank_1_at_step_2(sig):
    def on_progress(value, total, preview):
        if value == 2:
            os.kill(active_group().pids[1], sig)

    return ProgressReporter(on_progress=on_progress)


def test_a_killed_rank_fails_the_job_naming_it_and_the_next_job_rebuilds(model):
    _run(model, CFG)
    with pytest.raises(WorkerGroupError, match="rank 1 exited unexpectedly") as info:
        _run(model, CFG, _request(steps=8), _signal_rank_1_at_step_2(signal.SIGKILL))
    assert info.value.rank == 1
    assert active_group() is None
    request = _request(ODD)
    assert _rel(_run(model, CFG, request).latent, sample(model, request).latent) <= 1e-5


def test_a_hung_rank_fails_the_job_naming_it(model):
    _run(model, CFG)
    with pytest.raises(WorkerGroupError, match="rank 1 stopped responding") as info:
        _run(model, CFG, _request(steps=8), _signal_rank_1_at_step_2(signal.SIGSTOP))
    assert info.value.rank == 1
    assert active_group() is None


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    """A Wan-format LoRA on every block's self-attention query."""
    g = torch.Generator().manual_seed(3)
    dim, rank = 256, 4
    tensors = {}
    for i in range(4):
        name = f"diffusion_model.blocks.{i}.self_attn.q"
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path = tmp_path_factory.mktemp("loras") / "q.safetensors"
    save_file(tensors, str(path))
    return str(path)


def test_every_rank_applies_the_lora_stack(model, tiny_models, lora_file):
    # Its own model: applying a LoRA changes the loaded transformer's weights.
    lora_model = apply_loras(load_diffusion_model(tiny_models.transformer_bf16, dtype=torch.float32),
                             [LoraSpec(lora_file, strength=0.8)])
    request = _request()
    expected = sample(lora_model, request).latent
    assert _rel(sample(model, request).latent, expected) > 1e-3  # the LoRA matters
    assert _rel(_run(lora_model, ULYSSES, request).latent, expected) <= 1e-5
