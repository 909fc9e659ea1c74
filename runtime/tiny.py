"""Tiny random Wan models in the real file formats (smoke-test models, not for real use).

No model hub is reachable from tests, CI or the demo, so every code path that loads real
files is exercised on these: same key names, layouts and dtypes as the real releases,
only the sizes are small. The attention head size stays 128 so the real detection rule
(heads = dim / 128) holds.
"""
from __future__ import annotations

# Shared by the tiny-model writer and by tests that build a transformer directly.
TINY_TRANSFORMER_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 64,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
