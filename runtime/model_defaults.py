"""Process-wide defaults for how models run, set from CLI flags / environment at start-up.

A workflow's loader nodes attach them to the models they load, so `wanflow run --cache-dit`
or `SGLANG_CACHE_DIT_ENABLED=true wanflow serve` accelerate every job without editing the
workflow; a Cache-DiT or Multi-GPU node in the workflow still wins over the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models.wan_model import WanModel


@dataclass
class ModelDefaults:
    cache: Any = None
    """runtime.cache.CacheConfig or None."""
    parallel: Any = None
    """runtime.parallel.ParallelConfig or None."""


_defaults = ModelDefaults()


def set_model_defaults(*, cache: Any = None, parallel: Any = None) -> None:
    _defaults.cache, _defaults.parallel = cache, parallel


def apply_model_defaults(model: WanModel) -> WanModel:
    changes = {}
    if model.cache is None and _defaults.cache is not None:
        changes["cache"] = _defaults.cache
    if model.parallel is None and _defaults.parallel is not None:
        changes["parallel"] = _defaults.parallel
    return model.replace(**changes) if changes else model
