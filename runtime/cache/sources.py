"""Where a CacheConfig comes from outside the node graph: environment variables and CLI flags.

Both read the same table of fields, so `WANFLOW_CACHE_DIT_FN=2` and `--cache-fn 2` cannot drift
apart. SGLang's `SGLANG_CACHE_DIT_*` names are read too, so a deployment's existing settings
carry over; a `WANFLOW_` variable wins over its `SGLANG_` twin.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import InputValueError
from .config import SCM_POLICIES, SCM_PRESETS, CacheConfig, parse_bins

ENV_PREFIXES = ("WANFLOW_CACHE_DIT_", "SGLANG_CACHE_DIT_")
"""In precedence order."""
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError("expected true/false (or 1/0, yes/no, on/off)")


@dataclass(frozen=True)
class _Field:
    name: str
    """CacheConfig field."""
    env: str
    """Suffix after the prefix: SGLang's spelling."""
    flag: str
    parse: Callable[[str], Any]
    flag_kwargs: Mapping[str, Any]
    help: str


_FIELDS = (
    _Field("enabled", "ENABLED", "--cache-dit", _parse_bool,
           {"action": argparse.BooleanOptionalAction}, "turn Cache-DiT acceleration on/off"),
    _Field("fn", "FN", "--cache-fn", int, {"type": int}, "DBCache: first N blocks always computed (1)"),
    _Field("bn", "BN", "--cache-bn", int, {"type": int}, "DBCache: last N blocks always computed (0)"),
    _Field("warmup_steps", "WARMUP", "--cache-warmup", int, {"type": int}, "steps computed before caching starts (4)"),
    _Field("residual_diff_threshold", "RDT", "--cache-rdt", float, {"type": float},
           "residual difference below which a step is reused (0.24)"),
    _Field("max_cached_steps", "MAX_CACHED", "--cache-max-cached", int, {"type": int},
           "most cached steps per job, -1 unlimited (-1)"),
    _Field("max_continuous_cached_steps", "MC", "--cache-max-continuous", int, {"type": int},
           "most cached steps in a row, -1 unlimited (3)"),
    _Field("taylorseer", "TAYLORSEER", "--taylorseer", _parse_bool,
           {"action": argparse.BooleanOptionalAction}, "forecast cached residuals with TaylorSeer"),
    _Field("taylorseer_order", "TS_ORDER", "--taylorseer-order", int, {"type": int, "choices": (1, 2)},
           "TaylorSeer order (1)"),
    _Field("scm_preset", "SCM_PRESET", "--scm-preset", lambda s: s.strip().lower(), {"choices": SCM_PRESETS},
           "steps computation mask preset (none)"),
    _Field("scm_policy", "SCM_POLICY", "--scm-policy", lambda s: s.strip().lower(), {"choices": SCM_POLICIES},
           "masked steps: dynamic (may still compute) or static (always cached)"),
    _Field("scm_compute_bins", "SCM_COMPUTE_BINS", "--scm-compute-bins", lambda s: parse_bins(s, "scm_compute_bins"),
           {}, "custom SCM compute bins, e.g. 8,3,3,2,2 (with --scm-cache-bins)"),
    _Field("scm_cache_bins", "SCM_CACHE_BINS", "--scm-cache-bins", lambda s: parse_bins(s, "scm_cache_bins"),
           {}, "custom SCM cache bins, e.g. 1,2,2,2,3 (with --scm-compute-bins)"),
)


def cache_config_from_env(environ: Mapping[str, str] = os.environ) -> CacheConfig | None:
    """None when no cache variable is set; otherwise the config they describe (SGLang's
    defaults fill the rest, including ENABLED=false)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in _FIELDS:
        var = next((p + f.env for p in ENV_PREFIXES if environ.get(p + f.env, "").strip()), None)
        if var is None:
            continue
        raw = environ[var]
        try:
            values[f.name] = f.parse(raw)
        except (ValueError, InputValueError) as e:
            raise InputValueError(f"environment variable {var}={raw!r}: {_reason(e)}", key=var) from None
        sources[f.name] = var
    if not values:
        return None
    values.setdefault("enabled", False)
    return _build(values, sources, lambda var: {"key": var})


def add_cache_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Cache-DiT", "cache-dit acceleration (also read from "
                                      "WANFLOW_CACHE_DIT_* / SGLANG_CACHE_DIT_* variables; flags win)")
    for f in _FIELDS:
        group.add_argument(f.flag, dest=_dest(f), default=None, help=f.help, **f.flag_kwargs)


def cache_config_from_args(ns: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> CacheConfig | None:
    """Flags layered over the environment; None when neither says anything about caching."""
    base = cache_config_from_env(environ)
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in _FIELDS:
        value = getattr(ns, _dest(f), None)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = f.parse(value)
            except InputValueError as e:
                raise InputValueError(f"{f.flag}: {e.message}", input_name=f.flag) from None
        overrides[f.name] = value
        sources[f.name] = f.flag
    if base is None and not overrides:
        return None
    values = {**(base.as_dict() if base else {"enabled": False}), **overrides}
    tuning = [sources[n] for n in overrides if n != "enabled"]
    if tuning and not values["enabled"]:
        # A tuning flag that silently does nothing is worse than an error.
        raise InputValueError(f"{', '.join(tuning)} has no effect without --cache-dit", input_name=tuning[0])
    return _build(values, sources, lambda flag: {"input_name": flag})


def _dest(f: _Field) -> str:
    return f.flag.lstrip("-").replace("-", "_")


def _build(values: dict[str, Any], sources: dict[str, str], where: Callable[[str], dict]) -> CacheConfig:
    """Validate, re-wording a field error to name the variable or flag that set it."""
    for name in ("scm_compute_bins", "scm_cache_bins"):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    try:
        return CacheConfig(**values)
    except InputValueError as e:
        source = sources.get(e.input_name or "")
        if source is None:
            raise
        raise InputValueError(f"{source}: {e.message}", **where(source)) from None


def _reason(error: Exception) -> str:
    return error.message if isinstance(error, InputValueError) else str(error)
