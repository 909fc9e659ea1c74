"""LoRA stacks on Wan transformers: load (cached), check, merge / adapter, unmerge.

The rule for shared transformers: model caches hand the same transformer object to several
`WanModel` copies, so a transformer carries exactly one applied stack, recorded on the
transformer itself (attribute `_wanflow_lora_state`). A `WanModel`'s `loras` says which
stack *it* wants; `sync_loras(model)` makes the transformer(s) match it: nothing to do when
they already do, else the previous stack is taken off first (weights restored bit-exactly)
and the new one applied from the original weights. Every stage that runs a transformer must
call `sync_loras` first; nodes only record the stack (`add_lora`), so a chain of LoRA nodes
applies its whole stack once, in one order, from the original weights.

Modes (per LoRA):
- merge: ``W = cast(W_orig(fp32) + sum strength * (scale * up @ down + diff))``; the original
  tensors of touched parameters are kept on the CPU for `unmerge`.
- adapter: low-rank parts run unmerged as peft LoRA layers (diffusers' peft integration:
  `add_adapter` / `set_adapters` / `unload_lora`), so switching is cheap. Full-tensor patches
  (`diff`, `diff_b`, `diff_m`) are merged in both modes: peft has no layer type for patches of
  norms or of the modulation table, and a full-size patch costs the same to add once as to
  keep separately.

fp8: a model holding float8 weights has every parameter a LoRA touches dequantised to the
compute dtype (the model's dtype, bf16 if that is itself fp8), and kept so while the LoRA is
applied: re-quantising would round the LoRA away, and peft casts its layers to the base
layer's dtype. `unmerge` restores the original fp8 tensors.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .errors import InputValueError
from .lora_formats import LoraError, LoraWeights, LowRank, key_examples, read_lora
from .models.single_file import FP8_DTYPES
from .paths import resolve_model

if TYPE_CHECKING:
    from .models.wan_model import WanModel

log = logging.getLogger(__name__)

TARGETS = ("all", "transformer", "transformer_2")
MODES = ("merge", "adapter")
_STATE_ATTR = "_wanflow_lora_state"
_ADAPTER_PREFIX = "wanflow_lora_"
_LOCK = threading.RLock()  # one transformer state change at a time (server worker + API calls)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a stack."""

    path: str
    strength: float = 1.0
    target: str = "all"
    """"all" | "transformer" (Wan2.2 high-noise expert, or the only one) | "transformer_2" (low-noise)."""
    mode: str | None = None
    """"merge" | "adapter"; None takes the mode given to `apply_loras` / `add_lora`."""
    allow_partial: bool = False
    """A LoRA some of whose keys match nothing is an error unless this is set (then a warning)."""

    def applies_to(self, expert: str) -> bool:
        return self.target in ("all", expert)


@dataclass
class _AppliedState:
    signature: tuple
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Match:
    low_rank: dict[str, LowRank]
    diffs: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Plan:
    transformer: torch.nn.Module
    expert: str
    specs: tuple[LoraSpec, ...]
    signature: tuple
    matches: tuple[_Match, ...]


# --------------------------------------------------------------------------- loading


@lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int) -> LoraWeights:
    return read_lora(path)


def load_lora(path: str | Path) -> LoraWeights:
    """The converted LoRA, cached by (path, mtime, size): a rewritten file is read again."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        raise LoraError(f"LoRA file not found: {path}", file=str(path)) from None
    return _read_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


def resolve_lora_path(name: str) -> str:
    """An absolute path, or a name inside models/loras (ComfyUI's folders inside ComfyUI)."""
    return str(resolve_model("loras", name))


# --------------------------------------------------------------------------- public API


def apply_loras(model: "WanModel", stack: Sequence[LoraSpec], *, mode: str = "merge") -> "WanModel":
    """Make the model's transformer(s) carry exactly `stack` (in order) and return the model
    recording it. LoRAs without a mode get `mode`."""
    specs = tuple(_resolved(spec, mode) for spec in stack)
    with _LOCK:
        # Every file of every expert is read and checked before any weight changes.
        plans = [_plan(transformer, name, tuple(s for s in specs if s.applies_to(name)))
                 for name, transformer in _experts(model, specs)]
        for plan in plans:
            if plan is not None:
                _carry(plan, _compute_dtype(model))
    return model.replace(loras=specs)


def add_lora(model: "WanModel", spec: LoraSpec, *, mode: str = "merge") -> "WanModel":
    """The model with `spec` appended to its stack; the file is read and checked against the
    model now (so errors name the node that added it) but weights change at `sync_loras`."""
    spec = _resolved(spec, mode)
    for name, transformer in _experts(model, (spec,)):
        if spec.applies_to(name):
            _match(load_lora(spec.path), transformer, name, spec.allow_partial)
    return model.replace(loras=tuple(model.loras) + (spec,))


def sync_loras(model: "WanModel") -> "WanModel":
    """Make the transformer(s) carry the model's own stack; call before running the model."""
    return apply_loras(model, model.loras)


def unmerge(model: "WanModel") -> "WanModel":
    """Take every LoRA off the model's transformer(s): all weights equal the originals bit for bit."""
    with _LOCK:
        for transformer in model.experts():
            _restore(transformer)
    return model.replace(loras=())


# --------------------------------------------------------------------------- checks


def _resolved(spec: LoraSpec, mode: str) -> LoraSpec:
    spec = spec if spec.mode is not None else replace(spec, mode=mode)
    _check_choice(spec.mode, MODES, "mode")
    _check_choice(spec.target, TARGETS, "target")
    return spec


def _check_choice(value: str, choices: Sequence[str], input_name: str) -> None:
    if value not in choices:
        raise InputValueError(f"LoRA {input_name} must be one of {', '.join(choices)}, got '{value}'",
                              input_name=input_name)


def _experts(model: "WanModel", specs: Sequence[LoraSpec]) -> list[tuple[str, torch.nn.Module]]:
    experts = [("transformer", model.transformer)]
    if model.transformer_2 is not None:
        experts.append(("transformer_2", model.transformer_2))
    elif any(s.target == "transformer_2" for s in specs):
        raise InputValueError(
            f"LoRA target 'transformer_2' needs a two-expert model (Wan2.2 A14B); "
            f"{model.variant.name} has one transformer: use 'all' or 'transformer'",
            input_name="target",
        )
    return experts


def _plain_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, as if no peft layers were injected (another stack may be applied)."""
    shapes = {}
    for name, param in transformer.named_parameters():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        shapes[".".join(p for p in parts if p != "base_layer")] = tuple(param.shape)
    return shapes


def _model_dim(transformer: torch.nn.Module) -> int | None:
    config = getattr(transformer, "config", None)
    try:
        return int(config.num_attention_heads * config.attention_head_dim)
    except (AttributeError, TypeError):
        return None


def _lora_dim(weights: LoraWeights) -> int | None:
    """The model dim a LoRA was made for, from its self-attention or modulation shapes."""
    for name, lr in weights.low_rank.items():
        if re.search(r"\.attn1\.to_[qkv]\.weight$", name):
            return lr.up.shape[0]
    for name, diff in weights.diffs.items():
        if name.endswith("scale_shift_table"):
            return diff.shape[-1]
    return None


def _match(weights: LoraWeights, transformer: torch.nn.Module, expert: str, allow_partial: bool) -> _Match:
    """The parts of `weights` that apply to `transformer`; LoraError when they do not fit."""
    shapes = _plain_shapes(transformer)
    low_rank, diffs, missing, misfits = {}, {}, [], []
    for name, lr in weights.low_rank.items():
        shape = shapes.get(name)
        if shape is None:
            missing.append(name)
        elif not lr.fits(shape):
            misfits.append((name, (lr.up.shape[0], lr.down[0].numel()), (shape[0], math.prod(shape[1:]))))
        else:
            low_rank[name] = lr
    for name, diff in weights.diffs.items():
        shape = shapes.get(name)
        if shape is None:
            missing.append(name)
        elif diff.numel() != math.prod(shape):
            misfits.append((name, tuple(diff.shape), shape))
        else:
            diffs[name] = diff

    if misfits:
        raise LoraError(_misfit_message(weights, transformer, expert, misfits), file=weights.path)
    unmatched = list(weights.unused) + [k for name in missing for k in weights.sources.get(name, (name,))]
    if len(unmatched) >= weights.num_keys:
        raise LoraError(
            f"LoRA '{weights.name}' ({weights.format} format): none of its {weights.num_keys} keys "
            f"match {expert} (e.g. {key_examples(unmatched)}); is it a LoRA for another model?",
            file=weights.path,
        )
    if unmatched:
        message = (
            f"LoRA '{weights.name}' ({weights.format} format): {len(unmatched)} of {weights.num_keys} keys "
            f"match nothing in {expert} (e.g. {key_examples(unmatched)}); "
            f"{weights.num_keys - len(unmatched)} keys match"
        )
        if not allow_partial:
            raise LoraError(message + ". Enable allow_partial to apply the matching part.", file=weights.path)
        log.warning("%s; applying the matching part (allow_partial)", message)
    return _Match(low_rank=low_rank, diffs=diffs)


def _misfit_message(weights: LoraWeights, transformer: torch.nn.Module, expert: str, misfits: list) -> str:
    name, theirs, ours = misfits[0]
    detail = f"{len(misfits)} tensors differ in shape, e.g. {name}: LoRA {list(theirs)}, model {list(ours)}"
    lora_dim, model_dim = _lora_dim(weights), _model_dim(transformer)
    if lora_dim is not None and model_dim is not None and lora_dim != model_dim:
        return (f"LoRA '{weights.name}' is a LoRA for dim {lora_dim} model, this model ({expert}) "
                f"has dim {model_dim} ({detail})")
    return f"LoRA '{weights.name}' does not fit {expert}: {detail}"


# --------------------------------------------------------------------------- applying


def _signature(specs: Sequence[LoraSpec]) -> tuple:
    """What makes two stacks the same: files (with their mtime), strengths, modes, in order."""
    sig = []
    for s in specs:
        resolved = Path(s.path).expanduser().resolve()
        mtime = resolved.stat().st_mtime_ns if resolved.exists() else None
        sig.append((str(resolved), mtime, s.strength, s.mode, s.allow_partial))
    return tuple(sig)


def _compute_dtype(model: "WanModel") -> torch.dtype:
    return torch.bfloat16 if model.dtype in FP8_DTYPES else model.dtype


def _plan(transformer: torch.nn.Module, expert: str, specs: tuple[LoraSpec, ...]) -> _Plan | None:
    """What it takes to make `transformer` carry `specs`; None when it already does."""
    signature = _signature(specs)
    current: _AppliedState | None = getattr(transformer, _STATE_ATTR, None)
    if (current.signature if current else ()) == signature:
        return None
    matches = tuple(_match(load_lora(s.path), transformer, expert, s.allow_partial) for s in specs)
    return _Plan(transformer, expert, specs, signature, matches)


def _carry(plan: _Plan, compute_dtype: torch.dtype) -> None:
    transformer = plan.transformer
    _restore(transformer)
    if not plan.specs:
        return
    state = _AppliedState(signature=plan.signature)
    setattr(transformer, _STATE_ATTR, state)
    try:
        _merge(transformer, plan.specs, plan.matches, state, compute_dtype)
        _add_adapters(transformer, plan.specs, plan.matches, state)
    except BaseException:
        _restore(transformer)
        raise
    log.info("%s: applied %d LoRA(s): %s", plan.expert, len(plan.specs),
             ", ".join(f"{Path(s.path).name} x{s.strength:g} ({s.mode})" for s in plan.specs))


def _merge(transformer: torch.nn.Module, specs: Sequence[LoraSpec], matches: Sequence[_Match],
           state: _AppliedState, compute_dtype: torch.dtype) -> None:
    """Merge every merged-mode low-rank part and every diff, parameter by parameter, from the
    original weights in fp32, in stack order (so chained and one-shot stacks agree bit for bit)."""
    contributions: dict[str, list[tuple[float, LowRank | None, torch.Tensor | None]]] = {}
    for spec, match in zip(specs, matches):
        if spec.mode == "merge":
            for name, lr in match.low_rank.items():
                contributions.setdefault(name, []).append((spec.strength, lr, None))
        else:
            for name in match.low_rank:  # fp8 weights under an adapter are dequantised, see module doc
                if transformer.get_parameter(name).dtype in FP8_DTYPES:
                    contributions.setdefault(name, [])
        for name, diff in match.diffs.items():
            contributions.setdefault(name, []).append((spec.strength, None, diff))

    with torch.no_grad():
        for name, parts in contributions.items():
            param = transformer.get_parameter(name)
            state.originals[name] = param.detach().to("cpu", copy=True)
            total = param.detach().to(torch.float32, copy=True)
            for strength, lr, diff in parts:
                if lr is not None:
                    total.add_(lr.delta(tuple(param.shape), total.device), alpha=strength)
                if diff is not None:
                    total.add_(diff.to(total.device, torch.float32).reshape(param.shape), alpha=strength)
            if param.dtype in FP8_DTYPES:
                param.data = total.to(compute_dtype)
            else:
                param.data.copy_(total)


def _add_adapters(transformer: torch.nn.Module, specs: Sequence[LoraSpec], matches: Sequence[_Match],
                  state: _AppliedState) -> None:
    from peft import set_peft_model_state_dict

    shapes = _plain_shapes(transformer)
    strengths = []
    for index, (spec, match) in enumerate(zip(specs, matches)):
        if spec.mode != "adapter" or not match.low_rank:
            continue
        name = f"{_ADAPTER_PREFIX}{index}"
        modules = {param[: -len(".weight")]: lr for param, lr in match.low_rank.items()}
        weights = {}
        for module, lr in modules.items():
            down, up = _peft_factors(lr, shapes[module + ".weight"])
            weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"] = down, up
        transformer.add_adapter(_peft_config(modules), adapter_name=name)
        state.adapters.append(name)
        result = set_peft_model_state_dict(transformer, weights, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise LoraError(f"LoRA '{Path(spec.path).name}': peft did not take {key_examples(unexpected)}",
                            file=spec.path)
        strengths.append(spec.strength)
    if state.adapters:
        transformer.set_adapters(state.adapters, weights=strengths)


def _peft_config(modules: dict[str, LowRank]):
    """One peft config for one LoRA: exact module names; per-module ranks / alphas as patterns
    only where they differ from the most common one."""
    from peft import LoraConfig

    ranks = Counter(lr.rank for lr in modules.values())
    rank = ranks.most_common(1)[0][0]
    alphas = {m: (lr.alpha if lr.alpha is not None else float(lr.rank)) for m, lr in modules.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules="^(" + "|".join(re.escape(m) for m in modules) + ")$",
        rank_pattern={f"^{re.escape(m)}$": lr.rank for m, lr in modules.items() if lr.rank != rank},
        alpha_pattern={f"^{re.escape(m)}$": a for m, a in alphas.items() if a != alpha},
        init_lora_weights=False,  # overwritten right away
    )


def _peft_factors(lr: LowRank, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """down/up shaped like peft's lora_A/lora_B of a layer with this weight (Linear or Conv)."""
    kernel_ones = (1,) * (len(weight_shape) - 2)
    return (lr.down.reshape(lr.rank, *weight_shape[1:]),
            lr.up.reshape(weight_shape[0], lr.rank, *kernel_ones))


def _restore(transformer: torch.nn.Module) -> None:
    state: _AppliedState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return
    if state.adapters:
        transformer.unload_lora()
    with torch.no_grad():
        for name, original in state.originals.items():
            param = transformer.get_parameter(name)
            if param.dtype == original.dtype:
                param.data.copy_(original)
            else:
                param.data = original.to(param.device)
    delattr(transformer, _STATE_ATTR)


# --------------------------------------------------------------------------- server / CLI


@dataclass
class _Active:
    nickname: str
    path: str
    strength: float
    target: str = "all"
    merged: bool = True


class LoraManager:
    """SGLang-style LoRA control for the server and CLI: nicknames -> files, one server-wide
    stack, and per-request stacks.

    SGLang's semantics: `set_lora` makes the named LoRAs the active stack (merged);
    `unmerge(target)` takes a target's LoRAs out of effect (weights restored) and
    `merge(target, strength)` puts them back, optionally at a new strength. Without an attached
    model the manager only keeps this state (`server_stack()` gives it as specs); with one, every
    change is applied to it at once and `model_for` gives the model a request runs with.
    """

    def __init__(self, model: "WanModel | None" = None, *, resolve: Callable[[str], str] = resolve_lora_path,
                 request_mode: str = "merge") -> None:
        self.model = model
        self.resolve = resolve
        self.request_mode = request_mode
        self.loaded: dict[str, str] = {}
        self.active: list[_Active] = []

    def attach(self, model: "WanModel") -> None:
        self.model = model
        self._apply()

    def set_lora(self, nickname: str | list[str], path: str | None | list[str | None] = None,
                 target: str | list[str] = "all", strength: float | list[float] = 1.0) -> dict:
        nicknames = [nickname] if isinstance(nickname, str) else list(nickname)
        paths = path if isinstance(path, list) else [path]
        if len(paths) != len(nicknames):
            raise InputValueError(f"{len(nicknames)} nicknames but {len(paths)} paths: give one path per nickname",
                                  input_name="lora_path")
        targets = _broadcast(target, len(nicknames), "target")
        strengths = [float(s) for s in _broadcast(strength, len(nicknames), "strength")]
        for t in targets:
            _check_choice(t, TARGETS, "target")
        loaded = dict(self.loaded)
        for nick, p in zip(nicknames, paths):
            if p is not None:
                resolved = self.resolve(p)
                load_lora(resolved)  # format errors now, not at the next request
                loaded[nick] = resolved
            elif nick not in loaded:
                raise InputValueError(f"LoRA '{nick}' is not loaded: give its lora_path", input_name="lora_nickname")
        previous = (self.loaded, self.active)
        self.loaded = loaded
        self.active = [_Active(n, loaded[n], s, t) for n, t, s in zip(nicknames, targets, strengths)]
        try:
            self._apply()
        except Exception:
            self.loaded, self.active = previous
            raise
        return self.list_loras()

    def merge(self, target: str = "all", strength: float | None = None) -> dict:
        for entry in self._select(target):
            entry.merged = True
            if strength is not None:
                entry.strength = float(strength)
        self._apply()
        return self.list_loras()

    def unmerge(self, target: str = "all") -> dict:
        for entry in self._select(target):
            entry.merged = False
        self._apply()
        return self.list_loras()

    def list_loras(self) -> dict:
        active = {
            module: [{"nickname": e.nickname, "path": e.path, "merged": e.merged, "strength": e.strength}
                     for e in self.active if e.target in ("all", module)]
            for module in self._modules()
        }
        return {
            "loaded_adapters": [{"nickname": n, "path": p} for n, p in self.loaded.items()],
            "active": {module: entries for module, entries in active.items() if entries},
        }

    def server_stack(self, model: "WanModel | None" = None) -> list[LoraSpec]:
        """The merged LoRAs of the server-wide stack as specs; for a one-expert model, LoRAs set
        for transformer_2 only are left out (SGLang skips them too)."""
        model = model or self.model
        one_expert = model is not None and model.transformer_2 is None
        return [LoraSpec(e.path, e.strength, e.target, mode="merge") for e in self.active
                if e.merged and not (one_expert and e.target == "transformer_2")]

    def request_stack(self, loras: Sequence[dict]) -> list[LoraSpec]:
        """A request's `loras: [{path | nickname, strength, target}]` as specs."""
        specs = []
        for i, item in enumerate(loras):
            name = item.get("nickname") or item.get("path")
            if not name:
                raise InputValueError(f"loras[{i}] needs a 'path' or a 'nickname'", input_name=f"loras[{i}]")
            path = self.loaded.get(name) or self.resolve(name)
            specs.append(LoraSpec(path=path, strength=float(item.get("strength", 1.0)),
                                  target=item.get("target", "all"), mode=self.request_mode))
        return specs

    def model_for(self, model: "WanModel | None" = None, loras: Sequence[dict] | None = None) -> "WanModel":
        """The model a request runs with: its own `loras` if given, else the server-wide stack."""
        model = model or self.model
        if model is None:
            raise InputValueError("no model is loaded to apply LoRAs to")
        stack = self.request_stack(loras) if loras else self.server_stack(model)
        return apply_loras(model, stack, mode=self.request_mode)

    def _apply(self) -> None:
        if self.model is not None:
            self.model = apply_loras(self.model, self.server_stack())

    def _modules(self) -> tuple[str, ...]:
        if self.model is not None and self.model.transformer_2 is None:
            return ("transformer",)
        return ("transformer", "transformer_2")

    def _select(self, target: str) -> list[_Active]:
        """The entries `target` addresses; an "all" entry is split per expert first, so one
        expert's LoRAs can be unmerged while the other's stay."""
        _check_choice(target, TARGETS, "target")
        if target == "all":
            return self.active
        self.active = [part for e in self.active
                       for part in ([replace(e, target=m) for m in TARGETS[1:]] if e.target == "all" else [e])]
        return [e for e in self.active if e.target == target]


def _broadcast(value: Any, n: int, name: str) -> list:
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise InputValueError(f"{n} LoRAs but {len(values)} values of {name}", input_name=name)
    return values
