"""What the user asks of cache-dit: one frozen dataclass, validated once where it is built.

Field defaults are SGLang's (`SGLANG_CACHE_DIT_*`), so a Wan model cached here behaves like
the same model cached by SGLang. The dataclass is frozen (hashable) because the job runner
compares it with the config a shared transformer was last enabled with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputValueError

SCM_PRESETS = ("none", "slow", "medium", "fast", "ultra")
SCM_POLICIES = ("dynamic", "static")
SCM_MIN_STEPS = 8
"""cache-dit's step-mask presets only cover 4, 6 or >= 8 steps; below 8 SCM is switched off."""


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    # DBCache (dual block cache): the first `fn` blocks always run and their residual decides
    # whether the middle blocks are reused; the last `bn` blocks always run to correct it.
    fn: int = 1
    bn: int = 0
    warmup_steps: int = 4
    residual_diff_threshold: float = 0.24
    max_cached_steps: int = -1
    """-1: unlimited."""
    max_continuous_cached_steps: int = 3
    """-1: unlimited."""
    # TaylorSeer forecasts the cached residual instead of reusing it as is.
    taylorseer: bool = False
    taylorseer_order: int = 1
    # SCM (steps computation mask): which steps must compute, decided before the run.
    scm_preset: str = "none"
    scm_policy: str = "dynamic"
    """dynamic: masked steps may still compute when the residual changed too much; static: never."""
    scm_compute_bins: tuple[int, ...] | None = None
    scm_cache_bins: tuple[int, ...] | None = None
    """Custom bins (both or neither): compute c0 steps, cache k0, compute c1, ... They win
    over the preset; steps past their total are computed."""

    def __post_init__(self) -> None:
        _at_least(self, "fn", 1)
        _at_least(self, "bn", 0)
        _at_least(self, "warmup_steps", 0)
        _at_least(self, "max_cached_steps", -1)
        _at_least(self, "max_continuous_cached_steps", -1)
        if not 0.0 <= self.residual_diff_threshold <= 1.0:
            raise InputValueError(
                f"residual_diff_threshold must be between 0 and 1, got {self.residual_diff_threshold}",
                input_name="residual_diff_threshold",
            )
        if self.taylorseer_order not in (1, 2):
            raise InputValueError(
                f"taylorseer_order must be 1 or 2, got {self.taylorseer_order}", input_name="taylorseer_order"
            )
        _one_of(self, "scm_preset", SCM_PRESETS)
        _one_of(self, "scm_policy", SCM_POLICIES)
        for name in ("scm_compute_bins", "scm_cache_bins"):
            bins = getattr(self, name)
            if bins is not None and (not bins or any(type(b) is not int or b < 1 for b in bins)):
                raise InputValueError(f"{name} must be a non-empty list of positive integers, got {bins}", input_name=name)
        if (self.scm_compute_bins is None) != (self.scm_cache_bins is None):
            given = "scm_compute_bins" if self.scm_cache_bins is None else "scm_cache_bins"
            raise InputValueError(
                "scm_compute_bins and scm_cache_bins must be given together", input_name=given
            )

    @property
    def scm_requested(self) -> bool:
        return self.scm_compute_bins is not None or self.scm_preset != "none"

    def check_blocks(self, num_blocks: int) -> None:
        """Fn/Bn depend on the model: they must leave middle blocks for the cache to skip."""
        if self.fn + self.bn >= num_blocks:
            raise InputValueError(
                f"fn ({self.fn}) + bn ({self.bn}) must be less than the model's {num_blocks} "
                "transformer blocks, or nothing is left to cache",
                input_name="bn" if self.bn else "fn",
            )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("scm_compute_bins", "scm_cache_bins"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data


def parse_bins(text: str, input_name: str) -> tuple[int, ...] | None:
    """"8, 3,3" -> (8, 3, 3); blank -> None (SGLang's comma-separated format)."""
    if not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputValueError(
            f"{input_name} must be comma-separated integers such as '8,3,3,2', got {text!r}",
            input_name=input_name,
        ) from None


def _at_least(config: CacheConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    if type(value) is not int or value < low:
        raise InputValueError(f"{name} must be an integer >= {low}, got {value!r}", input_name=name)


def _one_of(config: CacheConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise InputValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}", input_name=name)
