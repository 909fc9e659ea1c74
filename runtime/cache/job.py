"""Per-job cache-dit state on the (shared) transformers of a WanModel.

Loaded transformers are shared between WanModel copies (the loader caches them), so a job must
bring each expert into exactly the state its own `model.cache` asks for: hooks installed with
this config, a fresh context for this job's step count, or no hooks at all.

cache-dit is used in its transformer-only mode (`enable_cache(transformer, ...)`): every expert
gets its own persistent context, which `refresh_context` resets per job. The sampling loop calls
each expert like diffusers' WanPipeline does (per step: cond, then uncond when CFG is on), which
is what `enable_separate_cfg` tells cache-dit to expect.

On the ranks of a multi-rank job (`distributed.current_layout()`, set by the worker) the hooks
live for one job: cache-dit wraps the forward wrappers the worker installs per job (CFG-parallel's
splitter), so it goes on fresh after them (the worker calls `release_cache` first) and comes off
before them, also when the job fails; torchrun's rank 0 shares its transformers with one-device
jobs, which must find them clean. Every rank takes the same decisions (distributed.py).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..devices import in_multi_rank_group
from .config import SCM_MIN_STEPS, CacheConfig
from .distributed import CFG_BRANCHES, RankLayout, agree_across_ranks, current_layout, gather_cfg_branches
from .stats import EXPERT_NAMES, BranchStats, CacheStats, ExpertStats

if TYPE_CHECKING:
    from ..models.wan_model import WanModel

logger = logging.getLogger(__name__)


def _cache_dit():
    """cache-dit, imported on first use (heavy), with its console log moved to stderr: it logs
    to stdout, which would corrupt `wanflow run --json` and anything else that pipes stdout."""
    import cache_dit  # noqa: PLC0415

    for handler in logging.getLogger("CACHE_DIT").handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)
            handler.flush = sys.stderr.flush
    return cache_dit


_STATE_ATTR = "_wanflow_cache_state"
"""Set on a transformer while cache-dit hooks are installed: what they were installed for."""


@contextlib.contextmanager
def job_cache(
    model: "WanModel",
    num_inference_steps: int,
    *,
    expert_steps: Sequence[int] | None = None,
    cfg: bool | Sequence[bool] = True,
) -> Iterator[CacheStats]:
    """Wrap one job's denoising loop; the yielded stats are filled in when the block exits.

    num_inference_steps: steps the loop will actually run (after denoise).
    expert_steps: steps each of `model.experts()` runs, in order (Wan2.2: high-noise steps
        first); required with two experts, defaults to all steps on the single one.
    cfg: per expert (or one for all), whether every step calls it twice, cond then uncond.
    """
    experts = model.experts()
    plan_steps = _expert_steps(experts, num_inference_steps, expert_steps)
    plan_cfg = [cfg] * len(experts) if isinstance(cfg, bool) else list(cfg)
    if len(plan_cfg) != len(experts):
        raise ValueError(f"cfg has {len(plan_cfg)} entries for {len(experts)} experts")

    config: CacheConfig | None = model.cache
    stats = CacheStats()
    if config is None or not config.enabled:
        for transformer in experts:
            _uninstall(transformer)
        yield stats
        return

    layout = current_layout()
    # A one-device job in a process of a larger group (torchrun's rank 0) must not let cache-dit
    # all-reduce with ranks that are not running it.
    other_ranks = layout is not None or in_multi_rank_group()
    stats.enabled = True
    first_steps = [sum(plan_steps[:i]) for i in range(len(experts))]
    masks: list[list[int] | None] = []
    # Per expert: whether cache-dit sees cond and uncond calls; CFG-parallel gives each rank one.
    separate = [uses_cfg and not (layout is not None and layout.splits_cfg(t)) for t, uses_cfg in zip(experts, plan_cfg)]
    for index, (transformer, steps) in enumerate(zip(experts, plan_steps)):
        config.check_blocks(len(transformer.blocks))
        mask = _scm_mask(config, steps, index, len(experts), stats.notes)
        masks.append(mask)
        if steps:
            _prepare(transformer, config, steps, mask, separate[index])
            if other_ranks:
                agree_across_ranks(transformer, layout.shard if layout is not None else None)
    try:
        yield stats
        for index, (transformer, steps) in enumerate(zip(experts, plan_steps)):
            if steps:
                branches = _branch_stats(transformer, first_steps[index], separate[index], layout)
                stats.experts.append(_expert_stats(transformer, config, index, first_steps[index], branches, masks[index]))
    finally:
        if layout is not None:
            for transformer in experts:
                _uninstall(transformer)


def release_cache(model: "WanModel") -> None:
    """Take cache-dit's hooks off every expert of `model` (a no-op without any).

    The multi-rank worker calls it before it wraps the experts' forward for a job: job_cache then
    installs cache-dit over those wrappers, so hooks left by an earlier one-device job on the same
    transformers (torchrun's rank 0 shares the caller's) must not lie beneath them.
    """
    for transformer in model.experts():
        _uninstall(transformer)


def _expert_steps(experts: list[torch.nn.Module], total: int, expert_steps: Sequence[int] | None) -> list[int]:
    if expert_steps is None:
        if len(experts) != 1:
            raise ValueError("expert_steps is required for a model with two experts")
        return [total]
    steps = list(expert_steps)
    if len(steps) != len(experts) or sum(steps) != total or min(steps) < 0:
        raise ValueError(f"expert_steps {steps} must give each of {len(experts)} experts a share of {total} steps")
    return steps


def _scm_mask(config: CacheConfig, steps: int, expert: int, num_experts: int, notes: list[str]) -> list[int] | None:
    """The steps computation mask for one expert's share of the job, or None without SCM."""
    if not config.scm_requested or steps == 0:
        return None
    if steps < SCM_MIN_STEPS:
        who = f" for the {EXPERT_NAMES[expert]} expert" if num_experts > 1 else ""
        note = f"SCM off{who}: {steps} steps < {SCM_MIN_STEPS} (DBCache still applies)"
        logger.info("Cache-DiT: %s", note)
        notes.append(note)
        return None
    cache_dit = _cache_dit()

    if config.scm_compute_bins is None:
        return cache_dit.steps_mask(total_steps=steps, mask_policy=config.scm_preset)
    # cache-dit insists that custom bins cover every step; a user's bins cannot know how many
    # steps each Wan2.2 expert gets, so the steps past them compute (the safe side).
    mask = cache_dit.steps_mask(compute_bins=list(config.scm_compute_bins), cache_bins=list(config.scm_cache_bins))
    return (mask + [1] * steps)[:steps]


def _prepare(transformer: torch.nn.Module, config: CacheConfig, steps: int, mask: list[int] | None, separate_cfg: bool) -> None:
    """Hooks installed for `config`, context fresh for this job."""
    cache_dit = _cache_dit()

    cache_config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=config.fn,
        Bn_compute_blocks=config.bn,
        max_warmup_steps=config.warmup_steps,
        residual_diff_threshold=config.residual_diff_threshold,
        max_cached_steps=config.max_cached_steps,
        max_continuous_cached_steps=config.max_continuous_cached_steps,
        enable_separate_cfg=separate_cfg,
        num_inference_steps=steps,
        steps_computation_mask=mask,
        steps_computation_policy=config.scm_policy,
    )
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=config.taylorseer_order) if config.taylorseer else None
    # refresh_context merges the new config into the old one field by field and skips None
    # fields, so it cannot take a mask or a calibrator away: those changes re-install instead.
    state = (config, mask is not None)
    if getattr(transformer, _STATE_ATTR, None) == state and getattr(transformer, "_is_cached", False):
        cache_dit.refresh_context(transformer, cache_config=cache_config, calibrator_config=calibrator)
        return
    _uninstall(transformer)
    cache_dit.enable_cache(transformer, cache_config=cache_config, calibrator_config=calibrator)
    setattr(transformer, _STATE_ATTR, state)


def _uninstall(transformer: torch.nn.Module) -> None:
    if getattr(transformer, "_is_cached", False):
        import cache_dit  # noqa: PLC0415 - already imported by whoever installed the hooks

        cache_dit.disable_cache(transformer)
    if hasattr(transformer, _STATE_ATTR):
        delattr(transformer, _STATE_ATTR)


def _branch_stats(
    transformer: torch.nn.Module, first_step: int, separate_cfg: bool, layout: RankLayout | None
) -> list[BranchStats]:
    # Read from the context itself: cache_dit.summary() only sees numbers copied at a
    # context's last step, so a job cut short would report the previous job's.
    (name,) = transformer._context_names
    context = transformer._context_manager.get_context(name)
    if layout is not None and layout.splits_cfg(transformer):
        mine = BranchStats(CFG_BRANCHES[layout.cfg_index], context.executed_steps,
                           [first_step + s for s in context.cached_steps])
        return gather_cfg_branches(layout, mine)
    branches = [BranchStats("cond", context.executed_steps, [first_step + s for s in context.cached_steps])]
    if separate_cfg:
        uncond_calls = context.transformer_executed_steps - context.executed_steps
        branches.append(BranchStats("uncond", uncond_calls, [first_step + s for s in context.cfg_cached_steps]))
    return branches


def _expert_stats(
    transformer: torch.nn.Module, config: CacheConfig, expert: int, first_step: int,
    branches: list[BranchStats], mask: list[int] | None,
) -> ExpertStats:
    return ExpertStats(
        expert=expert,
        first_step=first_step,
        steps=branches[0].calls,
        num_blocks=len(transformer.blocks),
        blocks_per_cached_call=config.fn + config.bn,
        branches=branches,
        scm_mask=mask,
    )
