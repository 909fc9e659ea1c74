"""The benchmark script: its CPU smoke mode runs end to end, and its FLOP count is right."""
from __future__ import annotations

import json

import pytest
import torch

from wanflow.scripts import bench


def test_smoke_run_writes_rows_for_every_forward_variant(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--sections", "forward", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["section"] == "forward" and "seconds" in r]
    assert [r["variant"] for r in rows] == ["diffusers", "sdpa", "math", "sdpa+fuse", "sdpa B=2"]
    assert all(r["seconds"] > 0 for r in rows)
    # fp32 on CPU: every variant computes the same function as diffusers' default.
    assert all(r["rel_err"] < 1e-5 and r["rel_err_fp32"] < 1e-5 for r in rows)


def test_attention_is_most_of_the_flops_at_wan_video_sizes():
    """Self-attention grows with S²: at 480p x 81 frames it is ~70% of the 1.3B forward."""
    size = bench.SIZES["1.3B"]
    cfg = size.config()
    shape = size.latent_shape(1, cfg)
    _, _, t, h, w = shape
    seq = t * (h // 2) * (w // 2)
    attention = cfg["num_layers"] * 4 * seq * seq * cfg["num_attention_heads"] * cfg["attention_head_dim"]
    total = bench.forward_flops(cfg, shape)
    assert seq == 32760
    assert 0.65 < attention / total < 0.75
    assert bench.forward_flops(cfg, (2, *shape[1:])) == 2 * total


def test_cache_smoke_reports_each_setting_against_the_uncached_job(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--sections", "cache", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["section"] == "cache"]
    assert [r["variant"] for r in rows] == list(bench.CACHE_VARIANTS)
    baseline, *cached = rows
    assert baseline["rel_err"] == 0 and baseline["cache"] is None
    for row in cached:
        counts = row["cache"]
        assert counts["calls"] == 2 * 8  # 8 smoke steps, cond + uncond each
        assert 0 < counts["cached_calls"] < counts["calls"]
        assert counts["blocks_computed"] < counts["blocks_total"]
        assert 0 < row["rel_err"] < 5e-2


def test_cache_variant_names_map_to_cache_configs():
    from wanflow.runtime.cache import CacheConfig

    assert bench.cache_config_for("none") is None
    assert bench.cache_config_for("dbcache") == CacheConfig()
    assert bench.cache_config_for("scm-fast+taylorseer") == CacheConfig(scm_preset="fast", taylorseer=True)
    assert bench.cache_config_for("dbcache+taylorseer2") == CacheConfig(taylorseer=True, taylorseer_order=2)


def test_unknown_cache_variant_is_rejected():
    with pytest.raises(ValueError, match="scm-turbo"):
        bench.cache_config_for("dbcache+scm-turbo")


def test_job_smoke_reports_the_cached_fast_path_against_diffusers_and_our_uncached_loop(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--sections", "job", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"] if r["section"] == "job"}
    assert list(rows) == ["diffusers WanPipeline", "wanflow loop", "wanflow loop sdpa", "wanflow loop sdpa+dbcache"]
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows["wanflow loop sdpa"]["cache"] is None and rows["wanflow loop sdpa"]["rel_err_loop"] < 1e-5
    cached = rows["wanflow loop sdpa+dbcache"]
    assert 0 < cached["cache"]["cached_calls"] < cached["cache"]["calls"] == 2 * 8  # 8 smoke steps
    assert 0 < cached["rel_err_loop"] < 5e-2
    assert 0 < cached["rel_err"] < 5e-2  # against diffusers' pipeline


def test_job_variants_split_into_forward_variant_and_cache_config():
    from wanflow.runtime.cache import CacheConfig

    assert bench.split_job_variant("int8+compile+dbcache") == ("int8+compile", CacheConfig())
    assert bench.split_job_variant("fp8+compile") == ("fp8+compile", None)
    assert bench.split_job_variant("dbcache+taylorseer") == ("diffusers", CacheConfig(taylorseer=True))


def test_loop_jobs_run_the_attention_the_bench_configured():
    """sample() re-applies a model's attention choice; the bench's own must survive it."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.transformers.transformer_wan import WanAttention

    cpu = torch.device("cpu")
    job = bench.loop_job(bench.SMOKE_SIZE, 1, cpu, torch.float32)
    bench.configure(job.transformer, "math", cpu)
    job.run_loop()
    backends = {m.processor._attention_backend for m in job.transformer.modules() if isinstance(m, WanAttention)}
    assert backends == {AttentionBackendName("_native_math")}
