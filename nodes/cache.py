"""The Cache-DiT node: attaches a cache config to the model; the sampler applies it per job."""
from __future__ import annotations

from ..runtime.cache import SCM_POLICIES, SCM_PRESETS, CacheConfig, parse_bins
from ..runtime.errors import InputValueError
from ..runtime.schema import Input, NodeSchema, Output, SchemaNode

_DEFAULTS = CacheConfig()


class WanflowCacheDiT(SchemaNode):
    SCHEMA = NodeSchema(
        node_id="WanflowCacheDiT",
        display_name="Wan Cache-DiT",
        category="wanflow/model",
        description="Speeds up sampling by reusing transformer block outputs between steps (cache-dit "
        "DBCache, optional TaylorSeer and steps computation mask). Defaults are SGLang's.",
        inputs=(
            Input("model", "WANFLOW_MODEL"),
            Input("enabled", "BOOLEAN", default=_DEFAULTS.enabled, tooltip="off: the model runs exactly as without this node"),
            Input("fn", "INT", default=_DEFAULTS.fn, min=1, max=64,
                  tooltip="first N blocks always computed; their change decides whether the rest is reused"),
            Input("bn", "INT", default=_DEFAULTS.bn, min=0, max=64, tooltip="last N blocks always computed to correct reused output"),
            Input("warmup_steps", "INT", default=_DEFAULTS.warmup_steps, min=0, max=200, tooltip="steps always computed at the start"),
            Input("residual_diff_threshold", "FLOAT", default=_DEFAULTS.residual_diff_threshold, min=0.0, max=1.0, step=0.01,
                  tooltip="higher: more reuse, faster, less exact"),
            Input("max_cached_steps", "INT", default=_DEFAULTS.max_cached_steps, min=-1, max=200, tooltip="-1: unlimited"),
            Input("max_continuous_cached_steps", "INT", default=_DEFAULTS.max_continuous_cached_steps, min=-1, max=200,
                  tooltip="most reused steps in a row; -1: unlimited"),
            Input("taylorseer", "BOOLEAN", default=_DEFAULTS.taylorseer, tooltip="forecast reused outputs (TaylorSeer)"),
            Input("taylorseer_order", "INT", default=_DEFAULTS.taylorseer_order, min=1, max=2),
            Input("scm_preset", "COMBO", default=_DEFAULTS.scm_preset, options=SCM_PRESETS,
                  tooltip="steps computation mask: fixes which steps may be reused (needs >= 8 steps)"),
            Input("scm_policy", "COMBO", default=_DEFAULTS.scm_policy, options=SCM_POLICIES,
                  tooltip="dynamic: masked steps still compute when the change is large; static: always reused"),
            Input("scm_compute_bins", "STRING", default="", tooltip="custom mask, e.g. 8,3,3,2,2 (overrides the preset)"),
            Input("scm_cache_bins", "STRING", default="", tooltip="custom mask, e.g. 1,2,2,2,3 (with compute bins)"),
        ),
        outputs=(Output("WANFLOW_MODEL", "model"),),
    )

    def execute(self, model, enabled: bool, fn: int, bn: int, warmup_steps: int, residual_diff_threshold: float,
                max_cached_steps: int, max_continuous_cached_steps: int, taylorseer: bool, taylorseer_order: int,
                scm_preset: str, scm_policy: str, scm_compute_bins: str = "", scm_cache_bins: str = ""):
        node = self.SCHEMA.node_id
        try:
            config = CacheConfig(
                enabled=enabled,
                fn=fn,
                bn=bn,
                warmup_steps=warmup_steps,
                residual_diff_threshold=residual_diff_threshold,
                max_cached_steps=max_cached_steps,
                max_continuous_cached_steps=max_continuous_cached_steps,
                taylorseer=taylorseer,
                taylorseer_order=taylorseer_order,
                scm_preset=scm_preset,
                scm_policy=scm_policy,
                scm_compute_bins=parse_bins(scm_compute_bins, "scm_compute_bins"),
                scm_cache_bins=parse_bins(scm_cache_bins, "scm_cache_bins"),
            )
            if config.enabled:
                config.check_blocks(len(model.transformer.blocks))
        except InputValueError as e:
            raise InputValueError(e.message, node=node, input_name=e.input_name) from None
        return (model.replace(cache=config),)


CACHE_NODES = {WanflowCacheDiT.SCHEMA.node_id: WanflowCacheDiT}
