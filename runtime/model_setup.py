"""Bringing the shared transformer(s) into the state one job's WanModel asks for.

Loaded transformers are shared between WanModel copies (the model cache), so what a job wants
(LoRA stack, attention kernel, compile, offload) is recorded on each transformer and only
changed when it differs — a second job with the same settings does no work here.
"""
from __future__ import annotations

import logging

from .attention import apply_attention_backend
from .devices import in_multi_rank_group
from .errors import InputValueError
from .fp8_linear import LINEAR_MODES, quantize_linears
from .lora import sync_loras
from .models.wan_model import WanModel
from .offload import apply_offload

log = logging.getLogger(__name__)

_STATE_ATTR = "_wanflow_run_state"
MODEL_OFFLOAD_MODES = ("none", "block", "leaf")
"""DiT offload modes a sampler can run with ("model" would need moving it in for every job)."""


def prepare_for_sampling(model: WanModel) -> WanModel:
    """Apply the model's LoRA stack, attention backend, linear-layer precision,
    offload and compile to its experts."""
    model = sync_loras(model)
    linear = _linear_mode(model)
    if model.offload not in MODEL_OFFLOAD_MODES:
        raise InputValueError(
            f"offload '{model.offload}' is not a transformer mode (choose {', '.join(MODEL_OFFLOAD_MODES)})",
            input_name="offload",
        )
    for transformer in model.experts():
        state = getattr(transformer, _STATE_ATTR, None)
        if state is None:
            state = {"attention": None, "offload": "none", "compiled": False, "linear": "bf16"}
            setattr(transformer, _STATE_ATTR, state)
        if state["linear"] != linear:
            if state["linear"] != "bf16":
                raise InputValueError(
                    f"this model's linear layers are already '{state['linear']}'; load it again to use '{linear}'",
                    input_name="linear",
                )
            # Before offload and compile: both capture the modules as they are.
            quantize_linears(transformer)
            state["linear"] = linear
        if state["offload"] != model.offload:
            if state["offload"] != "none":
                raise InputValueError(
                    f"this model was loaded with offload '{state['offload']}'; load it again to use '{model.offload}'",
                    input_name="offload",
                )
            apply_offload(transformer, model.offload, model.device)
            state["offload"] = model.offload
        # Inside a USP rank the worker group has installed its sequence-parallel processors (and
        # chose the kernel under them); replacing them here would undo the parallelism.
        if state["attention"] != model.attention and not in_multi_rank_group():
            # Offloaded weights sit on the CPU; the kernel choice is for where they compute.
            apply_attention_backend(transformer, model.attention, model.device)
            state["attention"] = model.attention
        if model.compile and not state["compiled"]:
            if model.device.type != "cuda":
                log.info("compile asked on %s: skipped (regional compile pays off on CUDA only)", model.device)
            else:
                transformer.compile_repeated_blocks(fullgraph=True)
                state["compiled"] = True
    return model


def _linear_mode(model: WanModel) -> str:
    linear = model.linear
    if linear not in LINEAR_MODES:
        raise InputValueError(f"linear '{linear}' is unknown (choose {', '.join(LINEAR_MODES)})", input_name="linear")
    if linear != "bf16" and model.loras:
        # LoRA layers wrap the bf16 nn.Linear (peft) or merge into it; FP8 codes have neither.
        raise InputValueError(f"linear '{linear}' cannot be combined with LoRAs; use 'bf16'", input_name="linear")
    return linear
