"""The mapping tables (HF <-> Flax, OpenCLIP -> HF) and architecture inference, numpy only.

The OpenCLIP side is checked against the test's own inverse (fused qkv concat, transposed
projection), written independently of hirm_jax's table.
"""

import numpy as np
import pytest

from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.clip_weights import (MAPPING_TABLE, WeightsError, canonical_hf_state, expand_table, flax_to_hf,
                              hf_to_flax, infer_config, openclip_to_hf)

TINY = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=77)
CONFIGS = {
    "clip_l_like": TextEncoderConfig(**TINY),
    "bigg_like": TextEncoderConfig(**TINY, hidden_act="gelu", projection_dim=64),
}


def random_hf_state(config: TextEncoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A canonical HF state dict with random float32 values, shaped from the model itself."""
    rng = np.random.default_rng(seed)
    state = {}
    shapes = {path: leaf.shape for path, leaf in _flat(TextEncoder(config, None).param_shapes()).items()}
    for hf_key, path, transform in expand_table(config):
        shape = shapes[path] if transform.name == "identity" else shapes[path][::-1]
        state[hf_key] = rng.standard_normal(shape).astype(np.float32)
    return state


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def to_openclip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The test's own inverse: canonical HF names -> OpenCLIP names (fused qkv, [D, P] projection)."""
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.copy()
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in sorted(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = np.concatenate(
                [state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], axis=0)
            for h, o in names.items():
                out[oc + f"{o}.{kind}"] = state[hf + f"{h}.{kind}"]
    return out


def assert_same_state(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_produces_every_leaf_exactly_once(name):
    config = CONFIGS[name]
    rows = list(expand_table(config))
    paths = [path for _, path, _ in rows]
    keys = [key for key, _, _ in rows]
    assert len(set(paths)) == len(paths) and len(set(keys)) == len(keys)
    assert set(paths) == set(_flat(TextEncoder(config, None).param_shapes()))
    assert len(MAPPING_TABLE) == 2 + 16 + 2 + 1  # embeddings, per layer, final norm, projection


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_hf_flax_round_trip_is_bit_exact(name):
    config = CONFIGS[name]
    state = random_hf_state(config)
    assert_same_state(flax_to_hf(hf_to_flax(state, config), config), state)


def test_flat_names_normalise_to_text_model():
    config = CONFIGS["clip_l_like"]
    state = random_hf_state(config)
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    assert "encoder.layers.0.mlp.fc1.weight" in flat
    assert_same_state(flax_to_hf(hf_to_flax(flat, config), config), state)
    both = {**state, "encoder.layers.0.mlp.fc1.weight": flat["encoder.layers.0.mlp.fc1.weight"]}
    with pytest.raises(WeightsError, match="both 'encoder.layers.0.mlp.fc1.weight' and"):
        canonical_hf_state(both)


BAD_STATES = {
    "missing": (lambda s: s.pop("text_model.encoder.layers.1.mlp.fc2.bias"), r"missing \[text_model.encoder.layers.1.mlp.fc2.bias\]"),
    "unexpected": (lambda s: s.update({"text_model.encoder.layers.3.mlp.fc2.bias": np.zeros(128, np.float32)}),
                   r"unexpected \[text_model.encoder.layers.3.mlp.fc2.bias\]"),
    "wrong_shape": (lambda s: s.update({"text_model.encoder.layers.0.self_attn.q_proj.weight": np.zeros((128, 64), np.float32)}),
                    r"q_proj.weight must have shape \(128, 128\) .* but has \(128, 64\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_bad_state_names_the_key(case):
    config = CONFIGS["clip_l_like"]
    state = random_hf_state(config)
    corrupt, message = BAD_STATES[case]
    corrupt(state)
    with pytest.raises(WeightsError, match=message):
        hf_to_flax(state, config)


def test_flax_to_hf_checks_leaves_and_shapes():
    config = CONFIGS["bigg_like"]
    params = hf_to_flax(random_hf_state(config), config)
    params["text_projection"]["kernel"] = params["text_projection"]["kernel"][:, :32]
    with pytest.raises(WeightsError, match="text_projection/kernel"):
        flax_to_hf(params, config)
    del params["text_projection"]
    with pytest.raises(WeightsError, match=r"missing \[text_projection/kernel\]"):
        flax_to_hf(params, config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_openclip_table_inverts_the_fused_layout(name):
    config = CONFIGS[name]
    state = random_hf_state(config)
    openclip = {**to_openclip(state), "logit_scale": np.array(4.6, np.float32), "attn_mask": np.zeros((77, 77), np.float32)}
    assert_same_state(openclip_to_hf(openclip), state)


def test_openclip_drops_trailing_blocks_and_projection():
    config = CONFIGS["bigg_like"]
    state = random_hf_state(config)
    got = openclip_to_hf(to_openclip(state), num_layers=2, with_projection=False)
    want = {k: v for k, v in state.items() if ".layers.2." not in k and k != "text_projection.weight"}
    assert_same_state(got, want)


def test_openclip_unknown_key_is_named():
    openclip = {**to_openclip(random_hf_state(CONFIGS["clip_l_like"])), "transformer.resblocks.0.attn.q_scale": np.ones(1)}
    with pytest.raises(WeightsError, match=r"neither mapped nor ignored: \[transformer.resblocks.0.attn.q_scale\]"):
        openclip_to_hf(openclip)


def _shapes_only(config: TextEncoderConfig) -> dict[str, np.ndarray]:
    """Real-size shapes without the memory: broadcast views of one zero."""
    shapes = _flat(TextEncoder(config, None).param_shapes())
    return {key: np.broadcast_to(np.float32(0), shapes[path].shape if t.name == "identity" else shapes[path].shape[::-1])
            for key, path, t in expand_table(config)}


@pytest.mark.parametrize("family,hidden_act", [
    ("clip_l", "quick_gelu"), ("openclip_h", "gelu"), ("openclip_bigg", "gelu")])
def test_infer_config_recovers_the_reference_architectures(family, hidden_act):
    reference = getattr(TextEncoderConfig, family)()
    inferred = infer_config(_shapes_only(reference), hidden_act=hidden_act)
    assert inferred == reference.replace(bos_token_id=0, eos_token_id=2, pad_token_id=1)


def test_infer_config_refuses_widths_without_64_wide_heads():
    config = TextEncoderConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 2})
    with pytest.raises(WeightsError, match="width must be a multiple of 64 but is 96"):
        infer_config(_shapes_only(config), hidden_act="gelu")


def test_infer_config_refuses_gaps_in_block_indices():
    state = random_hf_state(CONFIGS["clip_l_like"])
    state = {k.replace(".layers.2.", ".layers.5."): v for k, v in state.items()}
    with pytest.raises(WeightsError, match=r"block indices must run 0..n-1 but are \[0, 1, 5\]"):
        infer_config(state, hidden_act="quick_gelu")
