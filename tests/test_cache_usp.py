"""Cache-DiT on several ranks (CPU/gloo, 2 spawned ranks): every rank takes the decision one
device takes, so Ulysses and CFG-parallel runs cache the same steps as the single-device run
and give its latent.

The ranks' groups are shared per parallel config (Ulysses tests first, then CFG-parallel): the
cache config travels with each job, so it is not part of a group's key.
"""
from __future__ import annotations

import pytest
import torch

from wanflow.runtime.cache import CacheConfig
from wanflow.runtime.errors import JobInterrupted
from wanflow.runtime.models.loader import load_diffusion_model
from wanflow.runtime.parallel import ParallelConfig, sample_parallel, unload
from wanflow.runtime.progress import ProgressReporter
from wanflow.runtime.sampling.loop import sample
from wanflow.runtime.sampling.request import SamplingRequest

ULYSSES = ParallelConfig(gpus=2, ulysses_degree=2, timeout_s=20)
CFG = ParallelConfig(gpus=2, ulysses_degree=1, cfg_parallel=True, timeout_s=20)
DIVIDES = (1, 16, 2, 8, 8)  # 32 tokens: 16 per rank
ODD = (1, 16, 3, 6, 10)  # 45 tokens: the last rank's shard ends in one padding token
STEPS = 10
# Measured residual differences on this tiny model are 0.11-0.16: this threshold caches some
# steps and computes others, so the step lists below depend on every decision.
CACHE = CacheConfig(warmup_steps=2, residual_diff_threshold=0.125)
# Measured: 0.0 (the ranks' latents are bit-identical to one device's on this CPU).
MAX_RELATIVE_ERROR = 1e-5


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


def _cached_steps(result) -> dict[str, list[int]]:
    [expert] = result.stats["cache"]["experts"]
    return {branch: data["cached_steps"] for branch, data in expert["branches"].items()}


def _assert_same_as_one_device(model, config, cache, request):
    expected = sample(model.replace(cache=cache), request)
    result = sample_parallel(model.replace(cache=cache, parallel=config), request)
    assert any(_cached_steps(expected).values())
    assert result.stats["cache"] == expected.stats["cache"]
    assert _rel(result.latent, expected.latent) <= MAX_RELATIVE_ERROR
    return result


# --------------------------------------------------------------------------- Ulysses


def test_cached_ulysses_caches_the_single_device_steps_with_a_padded_shard(model):
    result = _assert_same_as_one_device(model, ULYSSES, CACHE, _request(ODD))
    assert result.stats["parallel"]["ulysses"] == 2


def _metric(t1: torch.Tensor, t2: torch.Tensor) -> float:
    """cache-dit's residual difference."""
    return ((t1 - t2).abs().mean() / t1.abs().mean()).item()


def test_a_threshold_between_the_two_shards_metrics_still_gives_the_single_device_steps(model, monkeypatch):
    """Without the reduction each rank would compare its own shard's metric with the threshold,
    and here the two shards fall on opposite sides of it at the first step past the warm-up:
    one rank would reuse the middle blocks while the other waits for it in their all-to-all."""
    request = _request(DIVIDES)
    probe = model.replace(cache=CACHE)
    sample(probe, request)  # installs the hooks, which the next job on `probe` refreshes
    compared = []
    manager = probe.transformer._context_manager
    similarity = manager.similarity

    def spy(t1, t2, **kwargs):
        compared.append((t1.clone(), t2.clone()))
        return similarity(t1, t2, **kwargs)

    monkeypatch.setattr(manager, "similarity", spy)
    sample(probe, request)
    monkeypatch.undo()
    t1, t2 = compared[0]  # step 2 (the first past the warm-up), cond pass: whole sequence
    half = t1.shape[1] // 2
    whole = _metric(t1, t2)
    shards = sorted(_metric(t1[:, part], t2[:, part]) for part in (slice(0, half), slice(half, None)))
    # The whole sequence's metric lies between its halves'; put the threshold between it and one
    # half's, so the ranks' own metrics straddle it and the whole's is on a side of its own.
    threshold = (whole + shards[1]) / 2
    assert shards[0] < whole < threshold < shards[1]

    cache = CacheConfig(warmup_steps=2, residual_diff_threshold=threshold)
    result = _assert_same_as_one_device(model, ULYSSES, cache, request)
    assert 2 in _cached_steps(result)["cond"]


# --------------------------------------------------------------------------- CFG-parallel


def test_cached_cfg_parallel_caches_each_branchs_single_device_steps(model):
    result = _assert_same_as_one_device(model, CFG, CACHE, _request(ODD))
    assert result.stats["parallel"]["cfg_split_steps"] == STEPS  # each step ran split, not twice


def test_consecutive_cfg_parallel_jobs_each_cache_like_one_device_and_uncached_stays_uncached(model):
    """Cache-DiT's hooks wrap CFG-parallel's per-job splitter: they come off with it, also
    after an interrupted job."""
    reporter = ProgressReporter()
    reporter.on_progress = lambda value, total, preview: reporter.interrupt_event.set()
    with pytest.raises(JobInterrupted):
        sample_parallel(model.replace(cache=CACHE, parallel=CFG), _request(steps=40), reporter)

    _assert_same_as_one_device(model, CFG, CACHE, _request(DIVIDES, steps=8))
    _assert_same_as_one_device(model, CFG, CACHE, _request(ODD))
    request = _request()
    uncached = sample_parallel(model.replace(parallel=CFG), request)
    assert "cache" not in uncached.stats
    assert _rel(uncached.latent, sample(model, request).latent) <= MAX_RELATIVE_ERROR


# --------------------------------------------------------------------------- one device


def test_a_one_device_job_in_a_multi_rank_process_caches_without_collectives(model, monkeypatch):
    """torchrun's rank 0 runs workflows without the parallel node on its own: cache-dit sees a
    process group of several ranks, but must not all-reduce with peers that are not running."""
    request = _request(steps=8)
    expected = sample(model.replace(cache=CACHE), request)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    result = sample(model.replace(cache=CACHE), request)

    assert result.stats["cache"] == expected.stats["cache"] and any(_cached_steps(result).values())
    assert torch.equal(result.latent, expected.latent)
