"""Cache-DiT on several ranks: every rank takes the same cache decision at every step.

DBCache decides per transformer call whether to reuse the middle blocks by comparing the
residual of the first `fn` blocks with the previous step's: relative L1, mean|R(t-1) - R(t)| /
mean|R(t-1)|. Under sequence parallelism each rank holds only its token shard of that residual,
so a metric computed per rank would differ between ranks; a rank that reuses while its peers
compute would leave them waiting in the middle blocks' all-to-alls. Here the two sums behind the
metric are all-reduced over the sequence-parallel group, which gives every rank the metric of the
whole sequence: the one-device decision, up to float summation order.

With CFG-parallel the cond and the uncond pass run on different ranks; each rank's cache-dit
context then sees one call per step (its branch) and decides as one device decides for that
branch, and the branches' stats are gathered so the job reports both.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from .stats import BranchStats

if TYPE_CHECKING:
    from ..parallel.sharding import SequenceShard

CFG_BRANCHES = ("cond", "uncond")
"""Branch of CFG-parallel cfg index 0 and 1."""


@dataclass(frozen=True)
class RankLayout:
    """How the multi-rank worker spread the current job, as far as the cache is concerned."""

    shard: "SequenceShard"
    """This rank's place in its sequence-parallel group (degree 1: the whole sequence)."""
    cfg_group: Any = None
    """Process group of the rank computing the other CFG branch (None: no CFG-parallel)."""
    cfg_index: int = 0
    """0: this rank computes the cond pass of CFG-split experts, 1: the uncond pass."""
    cfg_split: tuple[torch.nn.Module, ...] = ()
    """Experts whose cond/uncond calls run one per CFG half: a rank's blocks see one call a step."""

    def splits_cfg(self, transformer: torch.nn.Module) -> bool:
        return any(transformer is split for split in self.cfg_split)


_layout: contextvars.ContextVar[RankLayout | None] = contextvars.ContextVar("wanflow_rank_layout", default=None)


@contextlib.contextmanager
def rank_layout(layout: RankLayout) -> Iterator[None]:
    """The worker runs a job's `sample()` inside this, so `job_cache` knows the layout."""
    token = _layout.set(layout)
    try:
        yield
    finally:
        _layout.reset(token)


def current_layout() -> RankLayout | None:
    return _layout.get()


def agree_across_ranks(transformer: torch.nn.Module, shard: "SequenceShard | None") -> None:
    """Make the decisions of cache-dit's hooks on `transformer` (installed, not yet run) depend on
    the whole sequence only, with no collective over anything but `shard`'s group.

    shard None (or of degree 1): this rank holds the whole sequence; the metric stays local (also
    for a one-device job in a process that belongs to a larger process group, e.g. torchrun's
    rank 0, whose peers are not running this job).
    """
    _patch_cache_dit()
    manager = transformer._context_manager
    setattr(manager, _SHARD_ATTR, shard if shard is not None and shard.degree > 1 else None)


def gather_cfg_branches(layout: RankLayout, mine: BranchStats) -> list[BranchStats]:
    """Both CFG branches' stats of a CFG-split expert, cond first, on every rank."""
    branches: list[Any] = [None] * len(CFG_BRANCHES)
    dist.all_gather_object(branches, mine, group=layout.cfg_group)
    return branches


_SHARD_ATTR = "_wanflow_sequence_shard"
"""On a cache-dit context manager that `agree_across_ranks` prepared: the SequenceShard of its
transformer's tokens, or None for the whole sequence. Absent: cache-dit's own behaviour."""
_PATCHED_ATTR = "_wanflow_patched"
_CACHE_DIT_VERSION = "1.5.3"


def _patch_cache_dit() -> None:
    """Patch two cache-dit internals, once per process (written against cache-dit 1.5.3).

    cache-dit has no hook for either, so they are patched here, on its classes; the patched
    methods behave as the originals unless the context manager carries `_SHARD_ATTR`, which only
    `agree_across_ranks` sets, so other users of cache-dit in the same process are unaffected.

    1. `CachedContextManager.similarity` computes the metric; in any process group of several
       ranks it averages the per-rank means over the *default* group. That mixes the cond and the
       uncond ranks of CFG-parallel, waits for ranks that do not run the job (a one-device job on
       torchrun's rank 0) and counts the zero padding that makes the sequence divide as tokens.
       Replaced (for prepared managers) by sums over the real tokens, all-reduced over the
       sequence-parallel group only.
    2. `CachedBlocks_Pattern_Base._get_Fn_residual` subtracts the blocks' input from the output of
       the first `fn` blocks. The sequence is split by a pre-hook of `blocks[0]` (parallel.sharding),
       i.e. inside those blocks, so the input is whole and the output a shard; cache-dit only
       knows how to shard the input for diffusers' own context-parallel hooks. The input is
       split here like the pre-hook splits it.
    """
    try:
        from cache_dit.caching.cache_blocks.pattern_base import CachedBlocks_Pattern_Base  # noqa: PLC0415
        from cache_dit.caching.cache_contexts.cache_manager import CachedContextManager  # noqa: PLC0415
    except ImportError as e:
        raise _version_error(f"cannot import {e.name}") from e
    if getattr(CachedContextManager, _PATCHED_ATTR, False):
        return
    _expect(CachedContextManager, "similarity", ("t1", "t2", "threshold", "parallelized", "prefix"))
    _expect(CachedBlocks_Pattern_Base, "_get_Fn_residual", ("original_hidden_states", "hidden_states"))
    original_similarity = CachedContextManager.similarity
    original_residual = CachedBlocks_Pattern_Base._get_Fn_residual

    def similarity(self, t1, t2, *, threshold, parallelized=False, prefix="Fn"):
        if not hasattr(self, _SHARD_ATTR):
            return original_similarity(self, t1, t2, threshold=threshold, parallelized=parallelized, prefix=prefix)
        shard = getattr(self, _SHARD_ATTR)
        # Thresholds outside (0, 1) and shape changes have fixed answers, which cache-dit gives
        # (and records) itself; its other ways of computing the metric (reusing the cond pass's
        # diff, "important tokens" only) stay off: job._prepare leaves their options at default.
        if shard is None or not 0.0 < threshold < 1.0 or t1.shape != t2.shape:
            return original_similarity(self, t1, t2, threshold=threshold, parallelized=False, prefix=prefix)
        diff = sequence_relative_l1(t1, t2, shard)
        self.add_residual_diff(diff)
        return diff < threshold

    def _get_Fn_residual(self, original_hidden_states, hidden_states):
        shard = getattr(self.context_manager, _SHARD_ATTR, None)
        if shard is not None and original_hidden_states.shape != hidden_states.shape:
            original_hidden_states = shard.split(original_hidden_states)
        return original_residual(self, original_hidden_states, hidden_states)

    CachedContextManager.similarity = torch.compiler.disable(similarity)
    CachedBlocks_Pattern_Base._get_Fn_residual = _get_Fn_residual
    setattr(CachedContextManager, _PATCHED_ATTR, True)


def sequence_relative_l1(t1: torch.Tensor, t2: torch.Tensor, shard: "SequenceShard") -> float:
    """cache-dit's metric mean|t1 - t2| / mean|t1| over the whole sequence, from this rank's
    [batch, tokens, channels] shards; collective over `shard.group`."""
    real = max(0, min(shard.local_len, shard.seq_len - shard.rank * shard.local_len))
    t1, t2 = t1[:, :real], t2[:, :real]  # the zero padding of the last shard is no token
    sums = torch.stack([(t1 - t2).abs().sum(dtype=torch.float32), t1.abs().sum(dtype=torch.float32)])
    dist.all_reduce(sums, group=shard.group)
    # Means rounded to the residual's dtype and divided there, as cache-dit's own `.mean()`s are,
    # so a bf16 run decides like one device up to summation order, not up to bf16 rounding.
    count = t1.shape[0] * shard.seq_len * math.prod(t1.shape[2:])
    mean_diff, mean_t1 = (sums / count).to(t1.dtype)
    return (mean_diff / mean_t1).item()


def _expect(owner: type, name: str, parameters: tuple[str, ...]) -> None:
    method = getattr(owner, name, None)
    if not callable(method) or not set(parameters) <= set(inspect.signature(method).parameters):
        raise _version_error(f"{owner.__name__}.{name}({', '.join(parameters)}) is missing or changed")


def _version_error(detail: str) -> RuntimeError:
    import cache_dit  # noqa: PLC0415

    found = getattr(cache_dit, "__version__", "unknown")
    return RuntimeError(
        f"Cache-DiT on several ranks patches cache-dit internals written against cache-dit "
        f"{_CACHE_DIT_VERSION}, and the installed cache-dit {found} differs: {detail}. "
        f"Install cache-dit=={_CACHE_DIT_VERSION}, or run multi-GPU jobs without Cache-DiT."
    )
