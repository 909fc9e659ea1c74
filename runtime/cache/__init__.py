"""Cache-DiT acceleration: configuration (node, env, CLI), per-job state, statistics."""
from .config import SCM_MIN_STEPS, SCM_POLICIES, SCM_PRESETS, CacheConfig, parse_bins
from .job import job_cache
from .sources import add_cache_cli_args, cache_config_from_args, cache_config_from_env
from .stats import BranchStats, CacheStats, ExpertStats

__all__ = [
    "SCM_MIN_STEPS",
    "SCM_POLICIES",
    "SCM_PRESETS",
    "BranchStats",
    "CacheConfig",
    "CacheStats",
    "ExpertStats",
    "add_cache_cli_args",
    "cache_config_from_args",
    "cache_config_from_env",
    "job_cache",
    "parse_bins",
]
