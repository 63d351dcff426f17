"""The Flax T5 encoder against transformers' `T5EncoderModel`, and its weight files.

Parity (float32, <= 1e-4 max |diff|) on last_hidden_state, every block's output (forward hooks
on `T5Block`) and every feed-forward output (hooks on `DenseReluDense`), with and without
padding masks, at 77 and 512 positions and at T5-XXL width. Round trips are bit-exact.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hirm_jax.errors import HirmError, OutputError  # noqa: E402
from hirm_jax.fileio import save_safetensors  # noqa: E402
from hirm_jax.encoder.t5 import T5Encoder, T5EncoderConfig, relative_position_buckets  # noqa: E402
from hirm_jax.encoder.files import WEIGHTS_INDEX_NAME  # noqa: E402
from hirm_jax.encoder.layouts import load_text_encoder, save_text_encoder  # noqa: E402
from hirm_jax.encoder.t5_weights import (T5_MAPPING_TABLE, expand_t5_table, load_t5_folder, save_t5_folder,  # noqa: E402
                                 t5_flax_to_hf, t5_hf_to_flax)
from hirm_jax.encoder.clip_weights import WeightsError  # noqa: E402

SMALL = dict(vocab_size=200, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4)
CONFIGS = {
    "v1_1": T5EncoderConfig(**SMALL, feed_forward_proj="gated-gelu"),
    "v1_0": T5EncoderConfig(**SMALL, feed_forward_proj="relu"),
    # T5 v1.1 small-like: heads * d_kv (48) != d_model, fewer buckets and a short max distance.
    "narrow": T5EncoderConfig(**{**SMALL, "num_heads": 6, "d_kv": 8}, relative_attention_num_buckets=16,
                              relative_attention_max_distance=40),
}
# What Flux's text_encoder_2 / SD3's text_encoder_3 config.json says about the architecture.
T5_XXL_CONFIG_JSON = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": True, "num_heads": 64,
    "num_layers": 24, "vocab_size": 32128, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-06, "torch_dtype": "bfloat16",
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "dropout_rate": 0.1,
}
TOL = 1e-4


def torch_model(config: T5EncoderConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.T5Config(**config.to_hf_dict())
    return transformers.T5EncoderModel(hf).eval()


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def torch_outputs(model, ids: np.ndarray, mask):
    """last_hidden_state, block outputs and DenseReluDense outputs through forward hooks."""
    blocks, ffs, handles = [], [], []
    for block in model.encoder.block:
        handles.append(block.register_forward_hook(lambda m, i, o: blocks.append(o[0].numpy().copy())))
        handles.append(block.layer[1].DenseReluDense.register_forward_hook(lambda m, i, o: ffs.append(o.numpy().copy())))
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(ids).long(), attention_mask=None if mask is None else torch.from_numpy(mask),
                        output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, blocks, ffs


def padded_prompts(length: int, prompt_lengths: list[int], vocab: int, seed: int = 0):
    """Token ids as a T5 tokenizer pads them: prompt tokens, EOS (1), then PAD (0); mask 1/0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(prompt_lengths), length), np.int32)
    mask = np.zeros((len(prompt_lengths), length), np.int32)
    for row, n in enumerate(prompt_lengths):
        ids[row, :n - 1] = rng.integers(2, vocab, n - 1)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask


def max_diffs(flax_out, torch_out, blocks, ffs) -> dict[str, float]:
    diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
    config_layers = len(blocks)
    assert len(flax_out["hidden_states"]) == config_layers + 1 and len(flax_out["mlp_out"]) == config_layers
    return {
        "last_hidden_state": diff(flax_out["last_hidden_state"], torch_out.last_hidden_state.numpy()),
        "blocks": max(diff(a, b) for a, b in zip(flax_out["hidden_states"][1:], blocks, strict=True)),
        "mlp_out": max(diff(a, b) for a, b in zip(flax_out["mlp_out"], ffs, strict=True)),
        # transformers' hidden_states: embeddings, block outputs, the last replaced by the final norm.
        "hf_hidden_states": max(diff(a, b.numpy()) for a, b in
                                zip(flax_out["hidden_states"][:-1], torch_out.hidden_states[:-1], strict=True)),
    }


@pytest.fixture(scope="module")
def models():
    """name -> (torch model, Flax encoder with the same weights)."""
    out = {}
    for name, config in CONFIGS.items():
        model = torch_model(config, seed=len(out))
        out[name] = (model, T5Encoder(config, t5_hf_to_flax(numpy_state(model), config)))
    return out


# ---------------------------------------------------------------------------------------------
# Numerics.

@pytest.mark.parametrize("buckets,distance", [(32, 128), (16, 40), (8, 20), (64, 256)])
def test_relative_position_buckets_equal_transformers(buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    ours = relative_position_buckets(600, 600, buckets, distance)
    relative = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    theirs = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets,
                                                   max_distance=distance).numpy()
    np.testing.assert_array_equal(ours, theirs)
    # Far beyond max_distance, both ways.
    far = relative_position_buckets(1, 20000, buckets, distance)
    theirs_far = T5Attention._relative_position_bucket(torch.arange(20000)[None], True, buckets, distance).numpy()
    np.testing.assert_array_equal(far, theirs_far)


CASES = [("v1_1", 77, False), ("v1_1", 77, True), ("v1_1", 512, False), ("v1_1", 512, True),
         ("v1_0", 77, True), ("narrow", 77, False), ("narrow", 512, True)]


@pytest.mark.parametrize("name,length,masked", CASES)
def test_parity_with_transformers(models, name, length, masked):
    model, encoder = models[name]
    ids, mask = padded_prompts(length, [length, 37, 5], encoder.config.vocab_size, seed=length)
    mask = mask if masked else None
    flax_out = jax.jit(encoder.apply)(encoder.params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    torch_out, blocks, ffs = torch_outputs(model, ids, mask)
    diffs = max_diffs(flax_out, torch_out, blocks, ffs)
    print(f"{name} length {length} masked {masked}: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    assert flax_out["pooled_output"] is None and flax_out["text_embeds"] is None
    # transformers' last hidden state entry is the final-norm output, not the raw last block.
    np.testing.assert_array_equal(torch_out.hidden_states[-1].numpy(), torch_out.last_hidden_state.numpy())


def test_padding_does_not_change_the_prompt(models):
    """With a mask, a prompt's states do not depend on how far it is padded (T5 has no absolute positions)."""
    _, encoder = models["v1_1"]
    short_ids, short_mask = padded_prompts(12, [9], encoder.config.vocab_size)
    long_ids = np.zeros((1, 100), np.int32)
    long_mask = np.zeros((1, 100), np.int32)
    long_ids[:, :12], long_mask[:, :12] = short_ids, short_mask
    apply = jax.jit(encoder.apply)
    a = apply(encoder.params, short_ids, short_mask)["last_hidden_state"][:, :9]
    b = apply(encoder.params, long_ids, long_mask)["last_hidden_state"][:, :9]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def random_t5_state(config: T5EncoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A PyTorch-layout state dict drawn with numpy (much faster than torch's initialisation at
    T5-XXL width), scaled as transformers initialises T5; norms near 1."""
    rng = np.random.default_rng(seed)
    leaves = jax.tree_util.tree_flatten_with_path(T5Encoder(config, None).param_shapes())[0]
    shapes = {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}
    state = {}
    for key, path, transform in expand_t5_table(config):
        shape = shapes[path] if transform.name == "identity" else shapes[path][::-1]
        value = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith("layer_norm.weight"):
            value = 1 + np.float32(0.1) * value
        elif key.endswith("relative_attention_bias.weight"):
            value *= np.float32(config.d_model ** -0.5)
        elif key != "shared.weight":
            value *= np.float32(shape[1] ** -0.5)  # 1/sqrt(fan_in)
        state[key] = value
    return state


def torch_model_from_state(config: T5EncoderConfig, state: dict[str, np.ndarray]):
    """A T5EncoderModel built on the meta device (no initialisation) holding `state` (shared memory)."""
    with torch.device("meta"):
        model = transformers.T5EncoderModel(transformers.T5Config(**config.to_hf_dict()))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    model.load_state_dict(tensors, assign=True, strict=True)
    return model.eval()


@pytest.mark.slow
def test_parity_at_t5_xxl_width():
    """T5-XXL's width (d_model 4096, d_ff 10240, 64 heads of 64) with 2 layers and a small vocabulary."""
    start = time.perf_counter()
    config = T5EncoderConfig.t5_v1_1_xxl(num_layers=2, vocab_size=256)
    state = random_t5_state(config, seed=3)
    model = torch_model_from_state(config, state)
    encoder = T5Encoder(config, t5_hf_to_flax(state, config))
    ids, mask = padded_prompts(16, [11], config.vocab_size, seed=7)
    flax_out = jax.jit(encoder.apply)(encoder.params, jnp.asarray(ids), jnp.asarray(mask))
    torch_out, blocks, ffs = torch_outputs(model, ids, mask)
    diffs = max_diffs(flax_out, torch_out, blocks, ffs)
    scale = float(np.max(np.abs(torch_out.last_hidden_state.numpy())))
    print(f"T5-XXL width, 2 layers: {diffs}; max |last_hidden_state| {scale:.3g}; "
          f"{time.perf_counter() - start:.1f} s")
    assert all(d <= TOL for d in diffs.values()), diffs


def test_bfloat16_compute_stays_close_to_float32(models):
    _, encoder = models["v1_1"]
    ids, mask = padded_prompts(77, [77, 20], encoder.config.vocab_size)
    f32 = jax.jit(encoder.apply)(encoder.params, ids, mask)
    bf16_encoder = encoder.with_dtype("bfloat16")
    bf16 = jax.jit(bf16_encoder.apply)(bf16_encoder.params, ids, mask)
    assert bf16["last_hidden_state"].dtype == jnp.bfloat16 and bf16["mlp_out"][0].dtype == jnp.bfloat16
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(bf16_encoder.params))
    for key in ("last_hidden_state", "mlp_out"):
        want = np.asarray(f32[key] if key == "last_hidden_state" else f32[key][-1], np.float32)
        got = np.asarray(bf16[key] if key == "last_hidden_state" else bf16[key][-1], np.float32)
        relative = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        print(f"bf16 vs float32 {key}: max |diff| / max |x| = {relative:.3g}")
        assert relative <= 5e-2, (key, relative)
    # The dtype argument of apply is the same switch.
    again = jax.jit(lambda p, i, m: encoder.apply(p, i, m, dtype="bfloat16"))(encoder.params, ids, mask)
    again = again["last_hidden_state"]
    np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(bf16["last_hidden_state"], np.float32))


@pytest.mark.slow
def test_apply_is_pure_and_differentiable(models):
    _, encoder = models["v1_1"]
    ids, mask = padded_prompts(16, [16, 6], encoder.config.vocab_size)
    loss = lambda p: jnp.sum(encoder.apply(p, ids, mask)["mlp_out"][-1] ** 2)
    grads = jax.jit(jax.grad(loss))(encoder.params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    bias_grad = grads["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]["embedding"]
    assert float(jnp.max(jnp.abs(bias_grad))) > 0  # the shared table is used (and trained) by every block


@pytest.mark.slow
def test_init_draws_what_transformers_loads(models):
    """T5Encoder.init gives every tensor transformers' T5EncoderModel has, with its shape and
    roughly its initial scale (norms 1, shared N(0, 1), q N(0, (d_model d_kv)^-1/2), ...)."""
    model, _ = models["narrow"]
    config = CONFIGS["narrow"]
    state = t5_flax_to_hf(T5Encoder.init(config, seed=1).params, config)
    want = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: v.shape for k, v in state.items()} == {k: tuple(v.shape) for k, v in want.items()}
    for key, value in state.items():
        if key.endswith("layer_norm.weight"):
            assert np.all(value == 1), key
        else:
            ratio = float(np.std(value) / want[key].float().std())
            assert 0.7 < ratio < 1.4, (key, ratio)


# ---------------------------------------------------------------------------------------------
# Config and table.

def test_config_round_trips_through_hf_dict():
    for config in (*CONFIGS.values(), T5EncoderConfig.t5_v1_1_xxl()):
        hf = config.to_hf_dict()
        assert T5EncoderConfig.from_hf_dict(hf) == config
        built = transformers.T5Config(**hf)
        assert (built.dense_act_fn, built.is_gated_act) == (config.dense_act_fn, config.is_gated_act)
    assert T5EncoderConfig.from_hf_dict(T5_XXL_CONFIG_JSON) == T5EncoderConfig.t5_v1_1_xxl()
    xxl = T5EncoderConfig.t5_v1_1_xxl()
    assert (xxl.dense_act_fn, xxl.is_gated_act, xxl.hidden_size, xxl.num_hidden_layers) == ("gelu_new", True, 4096, 24)
    assert CONFIGS["v1_0"].dense_act_fn == "relu" and not CONFIGS["v1_0"].is_gated_act
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5EncoderConfig(feed_forward_proj="gated-gelu-x")


def test_inconsistent_activation_fields_follow_feed_forward_proj(capsys):
    config = T5EncoderConfig.from_hf_dict({**T5_XXL_CONFIG_JSON, "dense_act_fn": "relu"})
    assert config.dense_act_fn == "gelu_new" and "feed_forward_proj" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_produces_every_leaf_exactly_once(name):
    config = CONFIGS[name]
    rows = list(expand_t5_table(config))
    paths, keys = [p for _, p, _ in rows], [k for k, _, _ in rows]
    assert len(set(paths)) == len(paths) and len(set(keys)) == len(keys)
    leaves = jax.tree_util.tree_flatten_with_path(T5Encoder(config, None).param_shapes())[0]
    assert set(paths) == {tuple(k.key for k in path) for path, _ in leaves}
    assert len(T5_MAPPING_TABLE) == 1 + 4 + 1 + 1 + 3 + 1 + 1 + 1


# ---------------------------------------------------------------------------------------------
# Files.

def assert_same_params(got, want):
    got_flat = jax.tree_util.tree_flatten_with_path(got)[0]
    want_flat = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in got_flat] == [p for p, _ in want_flat]
    for (path, a), (_, b) in zip(got_flat, want_flat):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), path


@pytest.mark.slow
def test_flax_folder_flax_is_bit_exact_and_byte_deterministic(tmp_path):
    encoder = T5Encoder.init(CONFIGS["v1_1"], seed=5)
    first = save_t5_folder(encoder, tmp_path / "a")
    second = save_t5_folder(encoder, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    loaded = load_t5_folder(first)
    assert loaded.config == encoder.config
    assert_same_params(loaded.params, encoder.params)
    with pytest.raises(OutputError, match="already exists"):
        save_t5_folder(encoder, first)
    save_t5_folder(encoder, first, overwrite=True)


@pytest.mark.parametrize("name", ["v1_1", "v1_0"])
def test_torch_flax_torch_is_bit_exact_and_loads_cleanly(models, tmp_path, name):
    model, encoder = models[name]
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # In memory: every key but the tied alias comes back unchanged.
    state = t5_flax_to_hf(encoder.params, encoder.config)
    assert sorted(state) == sorted(k for k in want if k != "encoder.embed_tokens.weight")
    for key, value in state.items():
        assert value.dtype == np.float32 and np.array_equal(value, want[key].numpy()), key
    # Through a folder that transformers loads with nothing missing, unexpected or mismatched.
    folder = save_t5_folder(encoder, tmp_path / "t5")
    loaded, info = transformers.T5EncoderModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key
    assert loaded.config.is_gated_act == encoder.config.is_gated_act
    assert loaded.config.dense_act_fn == encoder.config.dense_act_fn


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_is_upcast_exactly(models, tmp_path, dtype):
    model, _ = models["v1_1"]
    half = torch_model(CONFIGS["v1_1"]).to(getattr(torch, dtype))
    half.load_state_dict(model.state_dict())
    half.save_pretrained(tmp_path / "half")
    header_len = int.from_bytes((tmp_path / "half" / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "half" / "model.safetensors").read_bytes()[8:8 + header_len])
    stored = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert stored == {"F16" if dtype == "float16" else "BF16"}
    encoder = load_t5_folder(tmp_path / "half")
    want = {k: v.float().numpy() for k, v in half.state_dict().items()}
    for key, value in t5_flax_to_hf(encoder.params, encoder.config).items():
        assert value.dtype == np.float32 and np.array_equal(value, want[key]), key


def test_sharded_folder_with_index(models, tmp_path):
    model, encoder = models["v1_1"]
    folder = tmp_path / "sharded"
    folder.mkdir()
    state = numpy_state(model)  # holds both shared.weight and the tied encoder.embed_tokens.weight
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, names in shards.items():
        save_safetensors({k: state[k] for k in names}, folder / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in names})
    total = sum(v.nbytes for v in state.values())
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(encoder.config.to_hf_dict()))
    assert_same_params(load_t5_folder(folder).params, encoder.params)
    # An index that lists a tensor its shard lacks is refused by name.
    weight_map["encoder.block.9.layer.0.layer_norm.weight"] = "model-00001-of-00002.safetensors"
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match=r"encoder\.block\.9\.layer\.0\.layer_norm\.weight"):
        load_t5_folder(folder)


def _pipeline(tmp_path, encoder, components: dict[str, str]):
    """A diffusers-like pipeline folder; components: name -> "t5" | "clip"."""
    pipe = tmp_path / "pipe"
    pipe.mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for name, kind in components.items():
        if kind == "t5":
            save_t5_folder(encoder, pipe / name)
        else:
            (pipe / name).mkdir()
            (pipe / name / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    return pipe


def test_diffusers_pipeline_components(models, tmp_path):
    _, encoder = models["v1_1"]
    flux = _pipeline(tmp_path / "flux", encoder, {"text_encoder": "clip", "text_encoder_2": "t5"})
    for loaded in (load_t5_folder(flux), load_t5_folder(flux, "text_encoder_2"),
                   load_t5_folder(flux / "text_encoder_2", dtype="bfloat16")):
        assert_same_params(loaded.params, encoder.params)
    assert load_t5_folder(flux / "text_encoder_2", dtype="bfloat16").config.dtype == "bfloat16"
    with pytest.raises(WeightsError, match="must describe a T5"):
        load_t5_folder(flux, "text_encoder")
    with pytest.raises(WeightsError, match="no component 'text_encoder_3'"):
        load_t5_folder(flux, "text_encoder_3")
    with pytest.raises(WeightsError, match="component must be None"):
        load_t5_folder(flux / "text_encoder_2", "text_encoder_2")
    two = _pipeline(tmp_path / "two", encoder, {"text_encoder_2": "t5", "text_encoder_3": "t5"})
    with pytest.raises(WeightsError, match="pass component="):
        load_t5_folder(two)
    assert_same_params(load_t5_folder(two, "text_encoder_3").params, encoder.params)


# ---------------------------------------------------------------------------------------------
# Refusals, each naming what is wrong.

def test_tied_embedding_spellings(models):
    model, encoder = models["v1_1"]
    state = numpy_state(model)
    assert "encoder.embed_tokens.weight" in state and "shared.weight" in state
    assert_same_params(t5_hf_to_flax(state, encoder.config), encoder.params)  # both, equal
    only_alias = {k: v for k, v in state.items() if k != "shared.weight"}
    assert_same_params(t5_hf_to_flax(only_alias, encoder.config), encoder.params)
    state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"] + 1
    with pytest.raises(WeightsError, match=r"'shared\.weight' and 'encoder\.embed_tokens\.weight'"):
        t5_hf_to_flax(state, encoder.config)


def test_bad_keys_and_shapes_are_named(models):
    model, encoder = models["v1_1"]
    config = encoder.config
    state = numpy_state(model)
    renamed = dict(state)
    renamed["encoder.block.1.layer.1.DenseReluDense.wi_9.weight"] = renamed.pop(
        "encoder.block.1.layer.1.DenseReluDense.wi_1.weight")
    with pytest.raises(WeightsError, match=r"missing \[encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight\], "
                                           r"unexpected \[encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_9\.weight\]"):
        t5_hf_to_flax(renamed, config)
    wrong = dict(state)
    wrong["encoder.block.2.layer.0.SelfAttention.o.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(WeightsError, match=r"encoder\.block\.2\.layer\.0\.SelfAttention\.o\.weight must have shape "
                                           r"\(64, 64\) .* but has \(64, 32\)"):
        t5_hf_to_flax(wrong, config)
    # A relative bias in block 1 (umT5 has one per block; T5 only in block 0) is unexpected.
    extra = {**state, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": np.zeros((32, 4))}
    with pytest.raises(WeightsError, match=r"unexpected \[encoder\.block\.1\.layer\.0\.SelfAttention\."
                                           r"relative_attention_bias\.weight\]"):
        t5_hf_to_flax(extra, config)
    # A gated checkpoint under a relu config: wi missing, wi_0/wi_1 unexpected.
    with pytest.raises(WeightsError, match=r"DenseReluDense\.wi\.weight"):
        t5_hf_to_flax(state, CONFIGS["v1_0"])
    assert isinstance(WeightsError("x"), HirmError)
    # Flax side: a wrong shape is named with both shapes.
    params = jax.tree_util.tree_map(np.asarray, encoder.params)
    params["encoder"]["final_layer_norm"]["scale"] = np.ones(63, np.float32)
    with pytest.raises(WeightsError, match=r"encoder/final_layer_norm/scale \(63,\) \(expected \(64,\)\)"):
        t5_flax_to_hf(params, config)


def test_full_t5_checkpoint_decoder_is_ignored(models, capsys):
    model, encoder = models["v1_1"]
    state = {**numpy_state(model), "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((64, 64)),
             "lm_head.weight": np.zeros((200, 64))}
    assert_same_params(t5_hf_to_flax(state, encoder.config), encoder.params)
    assert "ignoring 2 decoder" in capsys.readouterr().err


def test_folder_refusals(models, tmp_path):
    _, encoder = models["v1_1"]
    folder = save_t5_folder(encoder, tmp_path / "t5")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "clip_text_model",
                                                    "architectures": ["CLIPTextModel"]}))
    with pytest.raises(WeightsError, match="must describe a T5 encoder"):
        load_t5_folder(folder)
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_t5_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="pytorch_model.bin is a pickle.*refused"):
        load_t5_folder(folder)
    with pytest.raises(WeightsError, match="not a folder"):
        load_t5_folder(tmp_path / "missing")


@pytest.mark.slow
def test_load_text_encoder_picks_t5_from_config_json(tmp_path):
    """The one entry point reads a T5 folder (and a pipeline's T5 component) as a T5Encoder, and
    save_text_encoder writes it back bit for bit."""
    encoder = T5Encoder.init(CONFIGS["v1_1"], seed=3)
    folder = save_t5_folder(encoder, tmp_path / "t5")
    loaded = load_text_encoder(folder, dtype="bfloat16")
    assert isinstance(loaded, T5Encoder) and loaded.config.dtype == "bfloat16"
    assert_same_params(loaded.params, encoder.params)
    again = save_text_encoder(loaded, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()

