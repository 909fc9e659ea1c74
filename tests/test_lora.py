"""LoRA support on tiny Wan transformers (CPU): formats, merge / adapter, stacks, unmerge, errors,
per-expert targets, the node chain, shared transformers, fp8, the server manager.

Every LoRA here is written by the test in its format from tensors the test keeps, and the
expected weights are computed from those tensors by hand (W + strength * alpha/rank * up @ down
+ strength * diff), so the conversion is checked against an independent statement of it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from wanflow.nodes.lora import LORA_NODES, WanflowLoRA
from wanflow.runtime import lora as lora_rt
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.lora import LoraManager, LoraSpec, apply_loras, load_lora, sync_loras, unmerge
from wanflow.runtime.lora_formats import LoraError
from wanflow.runtime.models.variants import get_variant
from wanflow.runtime.models.wan_model import WanModel
from wanflow.runtime.paths import set_models_dir
from wanflow.runtime.tiny import TINY_TRANSFORMER_CONFIG

DIM = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
FFN = TINY_TRANSFORMER_CONFIG["ffn_dim"]
LAYERS = TINY_TRANSFORMER_CONFIG["num_layers"]
OUT = TINY_TRANSFORMER_CONFIG["out_channels"] * 4  # proj_out: out_channels * patch (1*2*2)
IMAGE_DIM = 32
I2V_CONFIG = {**TINY_TRANSFORMER_CONFIG, "image_dim": IMAGE_DIM, "added_kv_proj_dim": DIM}
RANK = 4
REL_TOL = 1e-5


# --- LoRAs as the test states them: original Wan name, diffusers name, tensors ----------------

@dataclass
class HandLora:
    """Low-rank parts (orig module, diffusers module, down, up, alpha) and full patches
    (orig key without prefix, diffusers parameter, tensor)."""

    low_rank: list[tuple[str, str, torch.Tensor, torch.Tensor, float | None]] = field(default_factory=list)
    diffs: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)

    def expected(self, state: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """Weights after merging this LoRA at `strength` into `state` (fp32)."""
        out = {k: v.clone() for k, v in state.items()}
        for _, module, down, up, alpha in self.low_rank:
            scale = 1.0 if alpha is None else alpha / RANK
            out[module + ".weight"] += strength * scale * (up @ down)
        for _, param, diff in self.diffs:
            out[param] += strength * diff.reshape(out[param].shape)
        return out


def _lr(gen, out_features: int, in_features: int, alpha: float | None):
    return torch.randn(RANK, in_features, generator=gen) * 0.05, torch.randn(out_features, RANK, generator=gen) * 0.05, alpha


def make_lora(seed: int, *, alpha: float | None = 2.0, patches: bool = False, i2v: bool = False,
              dim: int = DIM) -> HandLora:
    gen = torch.Generator().manual_seed(seed)
    lora = HandLora()
    for i in range(LAYERS):
        lora.low_rank.append((f"blocks.{i}.self_attn.q", f"blocks.{i}.attn1.to_q", *_lr(gen, dim, dim, alpha)))
        lora.low_rank.append((f"blocks.{i}.cross_attn.o", f"blocks.{i}.attn2.to_out.0", *_lr(gen, dim, dim, alpha)))
        lora.low_rank.append((f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.net.0.proj", *_lr(gen, FFN, dim, alpha)))
        if i2v:
            lora.low_rank.append((f"blocks.{i}.cross_attn.k_img", f"blocks.{i}.attn2.add_k_proj", *_lr(gen, dim, dim, alpha)))
            lora.low_rank.append((f"blocks.{i}.cross_attn.v_img", f"blocks.{i}.attn2.add_v_proj", *_lr(gen, dim, dim, alpha)))
        if patches:  # lightx2v distill style: norm, bias and modulation patches
            lora.diffs.append((f"blocks.{i}.norm3.diff", f"blocks.{i}.norm2.weight", torch.randn(dim, generator=gen) * 0.05))
            lora.diffs.append((f"blocks.{i}.cross_attn.q.diff_b", f"blocks.{i}.attn2.to_q.bias", torch.randn(dim, generator=gen) * 0.05))
            lora.diffs.append((f"blocks.{i}.diff_m", f"blocks.{i}.scale_shift_table", torch.randn(1, 6, dim, generator=gen) * 0.05))
    if patches:
        lora.diffs.append(("head.head.diff", "proj_out.weight", torch.randn(OUT, dim, generator=gen) * 0.05))
        lora.diffs.append(("head.diff_m", "scale_shift_table", torch.randn(1, 2, dim, generator=gen) * 0.05))
    if i2v:
        lora.low_rank.append(("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj",
                              *_lr(gen, IMAGE_DIM, IMAGE_DIM, alpha)))
        lora.diffs.append(("img_emb.proj.0.diff", "condition_embedder.image_embedder.norm1.weight",
                           torch.randn(IMAGE_DIM, generator=gen) * 0.05))
    return lora


def wan_keys(lora: HandLora, down="lora_down", up="lora_up", prefix="diffusion_model.") -> dict[str, torch.Tensor]:
    sd = {}
    for orig, _, d, u, alpha in lora.low_rank:
        sd[f"{prefix}{orig}.{down}.weight"], sd[f"{prefix}{orig}.{up}.weight"] = d, u
        if alpha is not None:
            sd[f"{prefix}{orig}.alpha"] = torch.tensor(alpha)
    for key, _, diff in lora.diffs:
        sd[prefix + key] = diff
    return sd


def kohya_keys(lora: HandLora) -> dict[str, torch.Tensor]:
    sd = {}
    for orig, _, d, u, alpha in lora.low_rank:
        name = "lora_unet_" + orig.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"] = d, u, torch.tensor(alpha)
    return sd


def diffusers_keys(lora: HandLora) -> dict[str, torch.Tensor]:
    sd = {}
    for _, module, d, u, _ in lora.low_rank:
        sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = d, u
    return sd


# Each format with the LoRA it carries and how it is written.
FORMATS = {
    "wan": (lambda: make_lora(1), wan_keys, {}),
    "kohya": (lambda: make_lora(2), kohya_keys, {}),
    # diffusers keeps alpha in the peft config it stores in the safetensors metadata.
    "diffusers": (lambda: make_lora(3), diffusers_keys,
                  {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 2.0}'}),
    "lightx2v": (lambda: make_lora(4, alpha=None, patches=True),
                 lambda lo: wan_keys(lo, down="lora_A", up="lora_B"), {}),
}
DETECTED = {"wan": "wan", "kohya": "kohya", "diffusers": "diffusers", "lightx2v": "wan"}


# --- fixtures -------------------------------------------------------------------------------

def _transformer(seed: int, config: dict = TINY_TRANSFORMER_CONFIG) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


@pytest.fixture(scope="session")
def t2v_transformer():
    return _transformer(0)


@pytest.fixture(scope="session")
def i2v_transformer():
    return _transformer(1, I2V_CONFIG)


@pytest.fixture(scope="session")
def expert_pair():
    return _transformer(2), _transformer(3)


def _wan_model(transformer, variant: str, transformer_2=None, dtype=torch.float32) -> WanModel:
    return WanModel(transformer=transformer, transformer_2=transformer_2, variant=get_variant(variant),
                    dtype=dtype, device=torch.device("cpu"))


@pytest.fixture
def t2v(t2v_transformer):
    model = _wan_model(t2v_transformer, "wan2.1-t2v-1.3b")
    yield model
    unmerge(model)  # the session transformer leaves every test as it came


@pytest.fixture
def i2v(i2v_transformer):
    model = _wan_model(i2v_transformer, "wan2.1-i2v-14b")
    yield model
    unmerge(model)


@pytest.fixture
def moe(expert_pair):
    model = _wan_model(expert_pair[0], "wan2.2-t2v-a14b", transformer_2=expert_pair[1])
    yield model
    unmerge(model)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def lora_dir(models_root):
    (models_root / "loras").mkdir()
    return models_root / "loras"


@pytest.fixture(scope="session")
def lora_files(lora_dir):
    """format -> (path, HandLora), plus an I2V LoRA."""
    files = {}
    for name, (build, write, metadata) in FORMATS.items():
        lora = build()
        path = lora_dir / f"{name}.safetensors"
        save_file(write(lora), str(path), metadata=metadata or None)
        files[name] = (str(path), lora)
    i2v = make_lora(5, patches=True, i2v=True)
    save_file(wan_keys(i2v), str(lora_dir / "i2v.safetensors"))
    files["i2v"] = (str(lora_dir / "i2v.safetensors"), i2v)
    return files


def forward(model: WanModel, transformer=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    transformer = transformer or model.transformer
    kwargs = dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, TINY_TRANSFORMER_CONFIG["text_dim"], generator=gen),
        return_dict=False,
    )
    if transformer.config.image_dim:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 4, IMAGE_DIM, generator=gen)
    with torch.no_grad():
        return transformer(**kwargs)[0]


def snapshot(transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


def assert_weights(transformer, expected: dict[str, torch.Tensor]) -> None:
    state = transformer.state_dict()
    for name, want in expected.items():
        torch.testing.assert_close(state[name].float(), want, rtol=1e-6, atol=1e-6, msg=name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_format_is_detected_from_key_names(lora_files, fmt):
    path, _ = lora_files[fmt]
    assert load_lora(path).format == DETECTED[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_merging_each_format_gives_the_hand_computed_weights(t2v, lora_files, fmt):
    path, lora = lora_files[fmt]
    expected = lora.expected(snapshot(t2v.transformer), 0.8)
    apply_loras(t2v, [LoraSpec(path, 0.8)], mode="merge")
    assert_weights(t2v.transformer, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_changes_the_output_and_merged_equals_adapter(t2v, lora_files, fmt):
    path, _ = lora_files[fmt]
    base = forward(t2v)
    apply_loras(t2v, [LoraSpec(path, 0.8)], mode="merge")
    merged = forward(t2v)
    apply_loras(t2v, [LoraSpec(path, 0.8)], mode="adapter")
    adapter = forward(t2v)
    assert rel(merged, base) > 1e-3
    assert rel(adapter, merged) <= REL_TOL


def test_adapter_handles_ranks_and_alphas_that_differ_per_layer(t2v, tmp_path):
    gen = torch.Generator().manual_seed(15)
    sd = {}
    for i, (rank, alpha) in enumerate([(2, 1.0), (4, 8.0), (8, 8.0), (8, 8.0)]):
        key = f"diffusion_model.blocks.{i}.self_attn.k"
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, DIM, generator=gen) * 0.05
        sd[f"{key}.lora_up.weight"] = torch.randn(DIM, rank, generator=gen) * 0.05
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "ranks.safetensors"
    save_file(sd, str(path))
    apply_loras(t2v, [LoraSpec(str(path), 1.5)], mode="merge")
    merged = forward(t2v)
    apply_loras(t2v, [LoraSpec(str(path), 1.5)], mode="adapter")
    assert rel(forward(t2v), merged) <= REL_TOL


def test_i2v_lora_patches_k_img_v_img_and_img_emb(i2v, lora_files):
    path, lora = lora_files["i2v"]
    expected = lora.expected(snapshot(i2v.transformer), 1.0)
    apply_loras(i2v, [LoraSpec(path)], mode="merge")
    assert_weights(i2v.transformer, expected)
    merged = forward(i2v)
    apply_loras(i2v, [LoraSpec(path)], mode="adapter")
    assert rel(forward(i2v), merged) <= REL_TOL


# --- stacks, unmerge, shared transformers -------------------------------------------------------

def test_stack_of_two_equals_the_analytic_sum(t2v, lora_files):
    (path_a, a), (path_b, b) = lora_files["wan"], lora_files["lightx2v"]
    expected = b.expected(a.expected(snapshot(t2v.transformer), 0.7), 0.4)
    apply_loras(t2v, [LoraSpec(path_a, 0.7), LoraSpec(path_b, 0.4)])
    assert_weights(t2v.transformer, expected)


def test_unmerge_restores_every_weight_bit_for_bit(t2v, lora_files):
    original = snapshot(t2v.transformer)
    apply_loras(t2v, [LoraSpec(lora_files["lightx2v"][0], 0.7, mode="merge"),
                      LoraSpec(lora_files["wan"][0], 0.4, mode="adapter")])
    assert not same_bits(snapshot(t2v.transformer), original)
    unmerge(t2v)
    assert same_bits(snapshot(t2v.transformer), original)


def test_models_sharing_a_transformer_each_get_their_own_stack(t2v, lora_files):
    """Model caches share transformers: whichever model runs syncs it, never stacking twice."""
    original = snapshot(t2v.transformer)
    path, lora = lora_files["wan"]
    with_lora = apply_loras(t2v, [LoraSpec(path, 0.5)])
    without = t2v.replace(loras=())
    sync_loras(with_lora)
    sync_loras(with_lora)  # already carried: no second application
    assert_weights(t2v.transformer, lora.expected(original, 0.5))
    sync_loras(without)
    assert same_bits(snapshot(t2v.transformer), original)


def test_switching_stacks_applies_the_new_one_from_the_original_weights(t2v, lora_files):
    original = snapshot(t2v.transformer)
    (path_a, _), (path_b, b) = lora_files["wan"], lora_files["kohya"]
    apply_loras(t2v, [LoraSpec(path_a, 1.0)], mode="adapter")
    apply_loras(t2v, [LoraSpec(path_b, 0.3)], mode="merge")
    assert_weights(t2v.transformer, b.expected(original, 0.3))


def test_loaded_loras_are_cached_until_the_file_changes(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(wan_keys(make_lora(11)), str(path))
    first = load_lora(path)
    assert load_lora(path) is first
    save_file(wan_keys(make_lora(12)), str(path))
    os.utime(path, ns=(1, 1))  # a different mtime whatever the clock's resolution
    assert load_lora(path) is not first


# --- per-expert targets -----------------------------------------------------------------------

def test_target_transformer_2_changes_only_the_low_noise_expert(moe, lora_files):
    high, low = snapshot(moe.transformer), snapshot(moe.transformer_2)
    path, lora = lora_files["wan"]
    apply_loras(moe, [LoraSpec(path, 1.0, target="transformer_2")])
    assert same_bits(snapshot(moe.transformer), high)
    assert_weights(moe.transformer_2, lora.expected(low, 1.0))


def test_target_transformer_2_on_a_one_expert_model_is_an_error(t2v, lora_files):
    with pytest.raises(InputValueError, match="two-expert"):
        apply_loras(t2v, [LoraSpec(lora_files["wan"][0], target="transformer_2")])


# --- errors -----------------------------------------------------------------------------------

def test_lora_matching_nothing_says_so_with_counts_and_examples(t2v, tmp_path):
    path = tmp_path / "other.safetensors"
    lora = make_lora(13)
    sd = {k.replace("blocks.", "blocks.9"): v for k, v in wan_keys(lora).items()}  # blocks 90..93
    save_file(sd, str(path))
    with pytest.raises(LoraError, match=rf"none of its {len(sd)} keys match transformer.*blocks\.9") as e:
        apply_loras(t2v, [LoraSpec(str(path))])
    assert e.value.file == str(path)


def test_partial_match_is_an_error_by_default(t2v, lora_files):
    path, lora = lora_files["i2v"]  # k_img / v_img / img_emb do not exist in a T2V model
    n_keys = len(wan_keys(lora))
    unmatched = 3 * LAYERS * 2 + 3 + 1  # k_img, v_img (down, up, alpha) per block, img_emb lora + norm patch
    with pytest.raises(LoraError, match=rf"{unmatched} of {n_keys} keys match nothing in transformer.*k_img"):
        apply_loras(t2v, [LoraSpec(path)])


def test_partial_match_applies_with_allow_partial_and_warns(t2v, lora_files, caplog):
    path, _ = lora_files["i2v"]
    base = forward(t2v)
    with caplog.at_level(logging.WARNING, logger=lora_rt.__name__):
        apply_loras(t2v, [LoraSpec(path, allow_partial=True)])
    assert "match nothing" in caplog.text
    assert rel(forward(t2v), base) > 1e-3


def test_lora_for_a_bigger_model_names_both_dims(t2v, tmp_path):
    path = tmp_path / "big.safetensors"
    save_file(wan_keys(make_lora(14, dim=2 * DIM)), str(path))
    with pytest.raises(LoraError, match=rf"LoRA for dim {2 * DIM} model, this model \(transformer\) has dim {DIM}"):
        apply_loras(t2v, [LoraSpec(str(path))])


def test_unknown_format_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "weird.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraError, match=r"weird\.safetensors.*unknown format.*encoder\.layer\.0\.weight"):
        load_lora(path)


def test_missing_file_is_an_error_naming_it(t2v, tmp_path):
    missing = str(tmp_path / "gone.safetensors")
    with pytest.raises(LoraError, match="not found") as e:
        apply_loras(t2v, [LoraSpec(missing)])
    assert e.value.file == missing


def test_failed_apply_leaves_the_previous_stack(t2v, lora_files, tmp_path):
    path, lora = lora_files["wan"]
    apply_loras(t2v, [LoraSpec(path)])
    expected = snapshot(t2v.transformer)
    with pytest.raises(LoraError):
        apply_loras(t2v, [LoraSpec(str(tmp_path / "gone.safetensors"))])
    assert same_bits(snapshot(t2v.transformer), expected)


# --- fp8 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_fp8_weights_touched_by_a_lora_are_dequantised_and_restored_on_unmerge(lora_files, mode):
    transformer = _transformer(0).to(torch.float8_e4m3fn)
    model = _wan_model(transformer, "wan2.1-t2v-1.3b", dtype=torch.bfloat16)
    original = snapshot(transformer)
    path, lora = lora_files["lightx2v"]
    apply_loras(model, [LoraSpec(path, 0.5)], mode=mode)
    touched = {m + ".weight" for _, m, *_ in lora.low_rank} | {p for _, p, _ in lora.diffs}
    params = dict(transformer.named_parameters())
    assert all(params[n if n in params else n.replace(".weight", ".base_layer.weight")].dtype == torch.bfloat16
               for n in touched)
    assert params["blocks.0.attn1.to_k.weight"].dtype == torch.float8_e4m3fn  # untouched stays fp8
    if mode == "merge":
        expected = lora.expected({k: v.float() for k, v in original.items()}, 0.5)
        for name in touched:  # within bf16 rounding of the exact fp32 result
            torch.testing.assert_close(params[name].float(), expected[name], rtol=2**-8, atol=1e-6, msg=name)
    unmerge(model)
    assert same_bits(snapshot(transformer), original)


# --- node -------------------------------------------------------------------------------------

def _run_node(**kwargs):
    node = LORA_NODES["WanflowLoRA"]
    return getattr(node(), node.FUNCTION)(**kwargs)[0]


@pytest.fixture
def models_dir(models_root, lora_files):
    set_models_dir(models_root)
    yield
    set_models_dir(None)


def test_node_is_declared_as_the_issue_asks():
    schema = WanflowLoRA.SCHEMA
    assert schema.display_name == "Wan LoRA"
    assert WanflowLoRA.RETURN_TYPES == ("WANFLOW_MODEL",)
    strength = schema.input("strength")
    assert (strength.default, strength.min, strength.max, strength.step) == (1.0, -10.0, 10.0, 0.01)
    assert schema.input("target").choices() == ["all", "transformer", "transformer_2"]
    assert schema.input("mode").choices() == ["merge", "adapter"]


def test_node_lists_files_in_models_loras(models_dir):
    assert "wan.safetensors" in WanflowLoRA.SCHEMA.input("lora_name").choices()


def test_chained_nodes_give_the_same_weights_as_one_stack(t2v, lora_files, models_dir):
    first = _run_node(model=t2v, lora_name="wan.safetensors", strength=0.7, target="all", mode="merge")
    second = _run_node(model=first, lora_name="lightx2v.safetensors", strength=0.4, target="all", mode="adapter")
    assert [(s.strength, s.mode) for s in second.loras] == [(0.7, "merge"), (0.4, "adapter")]
    sync_loras(second)
    chained_weights, chained_output = snapshot(t2v.transformer), forward(second)
    unmerge(t2v)
    apply_loras(t2v, [LoraSpec(lora_files["wan"][0], 0.7, mode="merge"),
                      LoraSpec(lora_files["lightx2v"][0], 0.4, mode="adapter")])
    assert same_bits(snapshot(t2v.transformer), chained_weights)
    assert torch.equal(forward(t2v), chained_output)


def test_node_error_names_the_node_and_input(t2v, models_dir):
    with pytest.raises(LoraError) as e:
        _run_node(model=t2v, lora_name="i2v.safetensors", strength=1.0, target="all", mode="merge")
    assert (e.value.node, e.value.input_name) == ("WanflowLoRA", "lora_name")


# --- server / CLI manager ----------------------------------------------------------------------

def test_manager_set_merge_unmerge_and_list(moe, lora_files):
    (path_a, a), (path_b, _) = lora_files["wan"], lora_files["kohya"]
    high, low = snapshot(moe.transformer), snapshot(moe.transformer_2)
    manager = LoraManager(moe, resolve=str)
    listing = manager.set_lora(["a", "b"], [path_a, path_b], target=["transformer", "transformer_2"], strength=[0.5, 1.0])
    assert listing["loaded_adapters"] == [{"nickname": "a", "path": path_a}, {"nickname": "b", "path": path_b}]
    assert listing["active"] == {
        "transformer": [{"nickname": "a", "path": path_a, "merged": True, "strength": 0.5}],
        "transformer_2": [{"nickname": "b", "path": path_b, "merged": True, "strength": 1.0}],
    }
    assert_weights(moe.transformer, a.expected(high, 0.5))
    manager.unmerge()
    assert same_bits(snapshot(moe.transformer), high) and same_bits(snapshot(moe.transformer_2), low)
    assert manager.list_loras()["active"]["transformer"][0]["merged"] is False
    manager.merge("transformer", strength=0.25)
    assert_weights(moe.transformer, a.expected(high, 0.25))
    assert same_bits(snapshot(moe.transformer_2), low)


def test_manager_request_loras_by_nickname_or_path(t2v, lora_files):
    (path_a, a), (path_b, b) = lora_files["wan"], lora_files["kohya"]
    original = snapshot(t2v.transformer)
    manager = LoraManager(t2v, resolve=str)
    manager.set_lora("a", path_a)
    model = manager.model_for(loras=[{"nickname": "a", "strength": 0.2}, {"path": path_b, "strength": 0.6}])
    assert [s.path for s in model.loras] == [path_a, path_b]
    assert_weights(t2v.transformer, b.expected(a.expected(original, 0.2), 0.6))
    manager.model_for()  # back to the server-wide stack
    assert_weights(t2v.transformer, a.expected(original, 1.0))


def test_manager_set_lora_needs_a_path_for_unknown_nicknames(t2v):
    with pytest.raises(InputValueError, match="not loaded"):
        LoraManager(t2v, resolve=str).set_lora("nobody")


def test_manager_without_a_model_keeps_the_stack_as_specs(lora_files):
    path = lora_files["wan"][0]
    manager = LoraManager(resolve=str)
    manager.set_lora("a", path, strength=0.5)
    assert set(manager.list_loras()["active"]) == {"transformer", "transformer_2"}
    manager.unmerge("transformer_2")  # the "all" LoRA stays in effect on the high-noise expert only
    assert manager.server_stack() == [LoraSpec(path, 0.5, "transformer", mode="merge")]
