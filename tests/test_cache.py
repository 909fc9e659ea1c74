"""Cache-DiT on the tiny Wan transformer (CPU): configuration sources, per-job state, stats."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from wanflow.nodes.cache import CACHE_NODES, WanflowCacheDiT
from wanflow.runtime.cache import (
    CacheConfig,
    CacheStats,
    add_cache_cli_args,
    cache_config_from_args,
    cache_config_from_env,
    job_cache,
)
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.models.wan_model import WanModel
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG

NUM_BLOCKS = TINY_TRANSFORMER_CONFIG["num_layers"]
GUIDANCE = 5.0

# Measured on this tiny model (seeded weights, 20 steps, SGLang defaults): relative L2 error of
# the final latent 0.0125 with 24 of 40 calls cached. The bound leaves room for BLAS differences
# between CPUs while still failing if caching reused the wrong residuals (errors of order 1).
MAX_RELATIVE_ERROR = 0.03


# --- fixtures: tiny transformers and a minimal WanPipeline-style loop -------------------------

@pytest.fixture(scope="session")
def weights() -> list[dict[str, torch.Tensor]]:
    """Two sets of tiny weights (Wan2.2 has two experts), built once."""
    result = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        result.append(WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).state_dict())
    return result


@pytest.fixture
def make_model(weights):
    """A WanModel over brand-new transformers (never touched by cache-dit) with these weights."""

    def make(experts: int = 1, cache: CacheConfig | None = None) -> WanModel:
        transformers = []
        for state in weights[:experts]:
            transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
            transformer.load_state_dict(state)
            transformers.append(transformer)
        return WanModel(
            transformer=transformers[0],
            transformer_2=transformers[1] if experts == 2 else None,
            variant=None,
            dtype=torch.float32,
            device=torch.device("cpu"),
            cache=cache,
        )

    return make


@pytest.fixture(scope="session")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    text_dim = TINY_TRANSFORMER_CONFIG["text_dim"]
    return torch.randn(1, 8, text_dim, generator=generator), torch.randn(1, 8, text_dim, generator=generator)


@pytest.fixture
def denoise(embeds):
    """Runs one job the way diffusers' WanPipeline calls the transformer: per step a cond call
    and, with CFG, a separate uncond call; Wan2.2's second expert from `switch_at` on."""
    positive, negative = embeds

    def run(model: WanModel, steps: int, *, cfg: bool = True, switch_at: int | None = None) -> tuple[torch.Tensor, CacheStats]:
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
        scheduler.set_timesteps(steps)
        experts = model.experts()
        plan = [0 if switch_at is None or i < switch_at else 1 for i in range(steps)]
        expert_steps = [plan.count(k) for k in range(len(experts))] if len(experts) > 1 else None
        latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(3))
        with job_cache(model, steps, expert_steps=expert_steps, cfg=cfg) as stats, torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                transformer = experts[plan[i]]
                cond = transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=positive, return_dict=False)[0]
                velocity = cond
                if cfg:
                    uncond = transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=negative, return_dict=False)[0]
                    velocity = uncond + GUIDANCE * (cond - uncond)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents, stats

    return run


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- caching on ----------------------------------------------------------------------------

def test_caching_skips_blocks_and_stays_close_to_the_uncached_latent(make_model, denoise):
    reference, _ = denoise(make_model(), 20)
    latent, stats = denoise(make_model(cache=CacheConfig()), 20)

    assert stats.enabled and stats.calls == 40
    assert stats.cached_calls > 0
    assert stats.blocks_computed < stats.blocks_total
    # A cached call runs only the first fn (1) of the 4 blocks.
    assert stats.blocks_computed == stats.computed_calls * NUM_BLOCKS + stats.cached_calls * 1
    assert relative_error(latent, reference) < MAX_RELATIVE_ERROR


def test_stats_count_each_cfg_branch_and_respect_warmup(make_model, denoise):
    _, stats = denoise(make_model(cache=CacheConfig(warmup_steps=4)), 12)

    [expert] = stats.experts
    assert [b.branch for b in expert.branches] == ["cond", "uncond"]
    assert [b.calls for b in expert.branches] == [12, 12]
    for branch in expert.branches:
        assert branch.cached_steps and min(branch.cached_steps) >= 4 and max(branch.cached_steps) < 12


def test_without_cfg_there_is_one_branch_per_step(make_model, denoise):
    _, stats = denoise(make_model(cache=CacheConfig()), 12, cfg=False)

    [expert] = stats.experts
    assert [(b.branch, b.calls) for b in expert.branches] == [("cond", 12)]
    assert expert.cached_calls > 0


def test_stats_as_dict_and_summary_text_report_the_counts(make_model, denoise):
    _, stats = denoise(make_model(cache=CacheConfig()), 12)

    data = stats.as_dict()
    assert data["calls"] == 24 and data["cached_calls"] == stats.cached_calls > 0
    assert data["experts"][0]["branches"]["uncond"]["cached_steps"] == stats.experts[0].branches[1].cached_steps
    text = stats.summary_text()
    assert text.startswith(f"Cache-DiT: {stats.computed_calls}/24 transformer calls computed, {stats.cached_calls} cached")
    assert f"{24 / stats.computed_calls:.2f}x fewer" in text


# --- caching off: bit-identical -------------------------------------------------------------

@pytest.mark.parametrize("off", [None, CacheConfig(enabled=False)], ids=["no-config", "enabled-false"])
def test_caching_off_is_bit_identical_even_after_a_cached_job(make_model, denoise, off):
    reference, _ = denoise(make_model(), 12)
    model = make_model(cache=CacheConfig())
    denoise(model, 12)

    latent, stats = denoise(model.replace(cache=off), 12)

    assert torch.equal(latent, reference)
    assert not stats.enabled and stats.summary_text() == "Cache-DiT: off"
    assert not hasattr(model.transformer, "_context_manager")


# --- per-job refresh --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((CacheConfig(), 12), (CacheConfig(), 20)),
        ((CacheConfig(scm_preset="fast"), 12), (CacheConfig(scm_preset="fast"), 6)),
        ((CacheConfig(), 12), (CacheConfig(taylorseer=True, taylorseer_order=2), 12)),
        ((CacheConfig(taylorseer=True), 12), (CacheConfig(residual_diff_threshold=0.1), 12)),
    ],
    ids=["12-then-20-steps", "scm-mask-then-too-few-steps", "config-gains-taylorseer", "config-loses-taylorseer"],
)
def test_a_job_after_another_behaves_like_the_first_job_on_a_fresh_transformer(make_model, denoise, first, second):
    shared = make_model()
    _, first_stats = denoise(shared.replace(cache=first[0]), first[1])
    latent, stats = denoise(shared.replace(cache=second[0]), second[1])
    fresh_latent, fresh_stats = denoise(make_model(cache=second[0]), second[1])

    assert first_stats.experts[0].steps == first[1]
    assert stats.experts[0].steps == second[1] and stats.calls == 2 * second[1]
    assert stats.as_dict() == fresh_stats.as_dict()
    assert torch.equal(latent, fresh_latent)


def test_consecutive_jobs_with_different_step_counts_both_cache(make_model, denoise):
    model = make_model(cache=CacheConfig())
    _, stats_12 = denoise(model, 12)
    _, stats_20 = denoise(model, 20)

    for stats, steps in ((stats_12, 12), (stats_20, 20)):
        [expert] = stats.experts
        assert expert.steps == steps and expert.cached_calls > 0
        assert all(4 <= s < steps for b in expert.branches for s in b.cached_steps)
    # The second job's warmup restarted at its own step 0 and it cached past the first job's length.
    assert max(stats_20.experts[0].branches[0].cached_steps) >= 12


# --- SCM --------------------------------------------------------------------------------------

def test_scm_static_policy_caches_exactly_the_masked_steps(make_model, denoise):
    _, stats = denoise(make_model(cache=CacheConfig(scm_preset="fast", scm_policy="static")), 12)

    [expert] = stats.experts
    masked = [i for i, m in enumerate(expert.scm_mask) if m == 0]
    assert len(expert.scm_mask) == 12 and masked
    assert [b.cached_steps for b in expert.branches] == [masked, masked]


def test_custom_scm_bins_win_over_the_preset_and_steps_past_them_compute(make_model, denoise):
    config = CacheConfig(scm_preset="ultra", scm_policy="static", scm_compute_bins=(4, 2, 2), scm_cache_bins=(1, 1))
    _, stats = denoise(make_model(cache=config), 12)

    assert stats.experts[0].scm_mask == [1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1]
    assert stats.experts[0].branches[0].cached_steps == [4, 7]


def test_scm_with_fewer_than_8_steps_is_off_with_a_log_line_and_dbcache_still_caches(make_model, denoise, caplog):
    with caplog.at_level(logging.INFO, logger="wanflow.runtime.cache"):
        _, stats = denoise(make_model(cache=CacheConfig(scm_preset="fast", warmup_steps=2)), 6)

    assert stats.experts[0].scm_mask is None
    assert stats.cached_calls > 0
    assert any("SCM off" in r.getMessage() and "6 steps" in r.getMessage() for r in caplog.records)
    assert "SCM off" in stats.summary_text()


# --- Wan2.2: two experts ----------------------------------------------------------------------

def test_two_experts_have_separate_contexts_and_stats(make_model, denoise):
    model = make_model(experts=2, cache=CacheConfig(warmup_steps=4))
    _, stats = denoise(model, 16, switch_at=6)

    high, low = stats.experts
    assert (high.expert, high.first_step, high.steps, high.calls) == (0, 0, 6, 12)
    assert (low.expert, low.first_step, low.steps, low.calls) == (1, 6, 10, 20)
    # Each expert warms up from its own first step: a shared context would let the low-noise
    # expert cache from step 6 on.
    assert all(4 <= s < 6 for b in high.branches for s in b.cached_steps)
    assert low.cached_calls > 0 and all(s >= 6 + 4 for b in low.branches for s in b.cached_steps)
    assert model.transformer._context_manager is not model.transformer_2._context_manager
    assert "high-noise" in stats.summary_text() and "low-noise" in stats.summary_text()


def test_two_experts_need_their_step_split(make_model):
    with pytest.raises(ValueError, match="expert_steps"):
        with job_cache(make_model(experts=2, cache=CacheConfig()), 10):
            pass


# --- validation -------------------------------------------------------------------------------

def test_fn_plus_bn_must_leave_blocks_to_cache(make_model, denoise):
    with pytest.raises(InputValueError, match="fn \\(3\\) \\+ bn \\(1\\)") as caught:
        denoise(make_model(cache=CacheConfig(fn=3, bn=1)), 8)
    assert caught.value.input_name == "bn"


@pytest.mark.parametrize(
    ("fields", "input_name"),
    [
        ({"fn": 0}, "fn"),
        ({"residual_diff_threshold": 1.5}, "residual_diff_threshold"),
        ({"taylorseer_order": 3}, "taylorseer_order"),
        ({"scm_preset": "turbo"}, "scm_preset"),
        ({"scm_policy": "lazy"}, "scm_policy"),
        ({"scm_compute_bins": (4, 2)}, "scm_compute_bins"),
        ({"scm_compute_bins": (4, 0), "scm_cache_bins": (1,)}, "scm_compute_bins"),
    ],
)
def test_bad_config_values_name_the_field(fields, input_name):
    with pytest.raises(InputValueError) as caught:
        CacheConfig(**fields)
    assert caught.value.input_name == input_name


# --- environment variables and CLI ------------------------------------------------------------

def test_no_cache_variables_means_no_config():
    assert cache_config_from_env({"PATH": "/bin"}) is None


def test_sglang_variables_are_read_with_sglang_defaults():
    assert cache_config_from_env({"SGLANG_CACHE_DIT_ENABLED": "true"}) == CacheConfig()
    assert cache_config_from_env({"SGLANG_CACHE_DIT_FN": "2"}) == CacheConfig(enabled=False, fn=2)


def test_every_sglang_variable_maps_to_its_field():
    env = {
        "SGLANG_CACHE_DIT_ENABLED": "1", "SGLANG_CACHE_DIT_FN": "2", "SGLANG_CACHE_DIT_BN": "1",
        "SGLANG_CACHE_DIT_WARMUP": "6", "SGLANG_CACHE_DIT_RDT": "0.12", "SGLANG_CACHE_DIT_MC": "-1",
        "SGLANG_CACHE_DIT_TAYLORSEER": "true", "SGLANG_CACHE_DIT_TS_ORDER": "2",
        "SGLANG_CACHE_DIT_SCM_PRESET": "medium", "SGLANG_CACHE_DIT_SCM_POLICY": "static",
        "SGLANG_CACHE_DIT_SCM_COMPUTE_BINS": "8,3,3,2,2", "SGLANG_CACHE_DIT_SCM_CACHE_BINS": "1, 2,2,2,3",
    }
    assert cache_config_from_env(env) == CacheConfig(
        fn=2, bn=1, warmup_steps=6, residual_diff_threshold=0.12, max_continuous_cached_steps=-1,
        taylorseer=True, taylorseer_order=2, scm_preset="medium", scm_policy="static",
        scm_compute_bins=(8, 3, 3, 2, 2), scm_cache_bins=(1, 2, 2, 2, 3),
    )


def test_wanflow_variables_win_over_sglang_ones():
    env = {"SGLANG_CACHE_DIT_ENABLED": "false", "WANFLOW_CACHE_DIT_ENABLED": "true",
           "SGLANG_CACHE_DIT_RDT": "0.5", "WANFLOW_CACHE_DIT_RDT": "0.1", "WANFLOW_CACHE_DIT_MAX_CACHED": "10"}
    assert cache_config_from_env(env) == CacheConfig(residual_diff_threshold=0.1, max_cached_steps=10)


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"SGLANG_CACHE_DIT_FN": "two"}, "SGLANG_CACHE_DIT_FN"),
        ({"WANFLOW_CACHE_DIT_ENABLED": "maybe"}, "WANFLOW_CACHE_DIT_ENABLED"),
        ({"SGLANG_CACHE_DIT_TS_ORDER": "3"}, "SGLANG_CACHE_DIT_TS_ORDER"),
        ({"WANFLOW_CACHE_DIT_SCM_COMPUTE_BINS": "8;3"}, "WANFLOW_CACHE_DIT_SCM_COMPUTE_BINS"),
        ({"SGLANG_CACHE_DIT_SCM_CACHE_BINS": "1,2"}, "SGLANG_CACHE_DIT_SCM_CACHE_BINS"),
    ],
)
def test_a_bad_variable_is_named_in_the_error(env, var):
    with pytest.raises(InputValueError, match=var) as caught:
        cache_config_from_env(env)
    assert caught.value.key == var


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cache_cli_args(parser)
    return parser.parse_args(argv)


def test_cli_flags_give_the_same_config_as_the_variables():
    argv = ["--cache-dit", "--cache-fn", "2", "--cache-bn", "1", "--cache-warmup", "6", "--cache-rdt", "0.12",
            "--cache-max-cached", "10", "--cache-max-continuous", "-1", "--taylorseer", "--taylorseer-order", "2",
            "--scm-preset", "medium", "--scm-policy", "static",
            "--scm-compute-bins", "8,3,3,2,2", "--scm-cache-bins", "1,2,2,2,3"]
    env = {
        "WANFLOW_CACHE_DIT_ENABLED": "true", "WANFLOW_CACHE_DIT_FN": "2", "WANFLOW_CACHE_DIT_BN": "1",
        "WANFLOW_CACHE_DIT_WARMUP": "6", "WANFLOW_CACHE_DIT_RDT": "0.12", "WANFLOW_CACHE_DIT_MAX_CACHED": "10",
        "WANFLOW_CACHE_DIT_MC": "-1", "WANFLOW_CACHE_DIT_TAYLORSEER": "on", "WANFLOW_CACHE_DIT_TS_ORDER": "2",
        "WANFLOW_CACHE_DIT_SCM_PRESET": "medium", "WANFLOW_CACHE_DIT_SCM_POLICY": "static",
        "WANFLOW_CACHE_DIT_SCM_COMPUTE_BINS": "8,3,3,2,2", "WANFLOW_CACHE_DIT_SCM_CACHE_BINS": "1,2,2,2,3",
    }
    from_cli = cache_config_from_args(_parse(argv), environ={})
    assert from_cli == cache_config_from_env(env)
    assert from_cli.fn == 2 and from_cli.scm_cache_bins == (1, 2, 2, 2, 3)


def test_cli_flags_override_the_environment_and_absent_flags_keep_it():
    env = {"SGLANG_CACHE_DIT_ENABLED": "true", "SGLANG_CACHE_DIT_FN": "2"}
    assert cache_config_from_args(_parse(["--cache-rdt", "0.1"]), environ=env) == CacheConfig(fn=2, residual_diff_threshold=0.1)
    assert cache_config_from_args(_parse(["--no-cache-dit"]), environ=env) == CacheConfig(enabled=False, fn=2)
    assert cache_config_from_args(_parse([]), environ={}) is None


def test_a_tuning_flag_without_cache_dit_is_an_error():
    with pytest.raises(InputValueError, match="--cache-fn has no effect without --cache-dit"):
        cache_config_from_args(_parse(["--cache-fn", "2"]), environ={})


def test_bad_cli_values_name_the_flag():
    with pytest.raises(InputValueError, match="--cache-fn"):
        cache_config_from_args(_parse(["--cache-dit", "--cache-fn", "0"]), environ={})
    with pytest.raises(InputValueError, match="--scm-compute-bins"):
        cache_config_from_args(_parse(["--cache-dit", "--scm-compute-bins", "a,b", "--scm-cache-bins", "1"]), environ={})


# --- the node ---------------------------------------------------------------------------------

def _widget_defaults() -> dict:
    return {i.name: i.default for i in WanflowCacheDiT.SCHEMA.widget_inputs()}


def test_node_defaults_are_sglangs_and_it_attaches_the_config_to_a_copy(make_model):
    model = make_model()
    (cached,) = WanflowCacheDiT().execute(model, **_widget_defaults())

    assert cached.cache == cache_config_from_env({"SGLANG_CACHE_DIT_ENABLED": "true"})
    assert cached.transformer is model.transformer and model.cache is None
    assert CACHE_NODES["WanflowCacheDiT"] is WanflowCacheDiT
    assert WanflowCacheDiT.RETURN_TYPES == ("WANFLOW_MODEL",)
    assert WanflowCacheDiT.SCHEMA.display_name == "Wan Cache-DiT"


def test_node_parses_bin_strings(make_model):
    widgets = {**_widget_defaults(), "scm_compute_bins": "8, 3,3", "scm_cache_bins": "1,2"}
    (cached,) = WanflowCacheDiT().execute(make_model(), **widgets)
    assert (cached.cache.scm_compute_bins, cached.cache.scm_cache_bins) == ((8, 3, 3), (1, 2))


@pytest.mark.parametrize(
    ("changes", "input_name"),
    [({"fn": 4}, "fn"), ({"scm_cache_bins": "1,x"}, "scm_cache_bins"), ({"scm_compute_bins": "4,2"}, "scm_compute_bins")],
)
def test_node_errors_name_the_node_and_the_input(make_model, changes, input_name):
    with pytest.raises(InputValueError) as caught:
        WanflowCacheDiT().execute(make_model(), **{**_widget_defaults(), **changes})
    assert (caught.value.node, caught.value.input_name) == ("WanflowCacheDiT", input_name)
