"""HiRM training: only the early block moves, the loss falls, targets are reached, resume is exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from configs import tiny
from hirm_jax.erase import masking
from hirm_jax.erase import objectives
from hirm_jax.config_lib import ConfigError
from hirm_jax.encoder.clip import TextEncoder, TextEncoderConfig
from hirm_jax.encoder.tokenizer import PromptTooLongError
from hirm_jax.erase.loop import NonFiniteLossError
from hirm_jax.erase.step import init_state, make_loss_fn, make_optimizer, make_train_step
from hirm_jax.run import train_and_evaluate

TINY = TextEncoderConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def tiny_config(encoder_dir, arg="hirm_s", **train):
    c = tiny.get_config(arg)
    c.encoder.path = str(encoder_dir)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def erased_params(encoder, workdir):
    trained = load_file(str(workdir / "erased_trainable.safetensors"))
    return masking.merge(trained, masking.split(encoder.params, list(trained))[1])


def final_reps(encoder, params, tokenizer_dir, texts, hook):
    from hirm_jax.erase.prompts import load_tokenizer
    from hirm_jax.encoder.tokenizer import encode_prompts
    batch = encode_prompts(load_tokenizer(tokenizer_dir), texts)
    return np.asarray(objectives.read_hook(encoder.apply(params, batch["input_ids"]), hook))


@pytest.mark.slow
def test_only_early_block_moves_and_targets_are_reached(encoder_dir, tmp_path):
    from hirm_jax.encoder.layouts import load_text_encoder
    summary = train_and_evaluate(tiny_config(encoder_dir), tmp_path / "run")
    base = load_text_encoder(encoder_dir)
    params = erased_params(base, tmp_path / "run")

    flat_base, flat_new = masking.flatten(base.params), masking.flatten(params)
    moved = {p for p in flat_base if not np.array_equal(flat_base[p], flat_new[p])}
    assert moved and all(p.startswith("encoder/layers/0/") for p in moved)
    for p in set(flat_base) - set(summary["trainable_paths"]):
        assert np.asarray(flat_new[p]).tobytes() == np.asarray(flat_base[p]).tobytes(), p

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.35 * losses[0]

    # Each target prompt ends nearer its super-category prompt's frozen representation.
    pairs = summary["prompts"]
    erased = final_reps(base, params, encoder_dir, [p["prompt"] for p in pairs], "last_mlp_out")[:, 1:]
    original = final_reps(base, base.params, encoder_dir, [p["prompt"] for p in pairs], "last_mlp_out")[:, 1:]
    target = final_reps(base, base.params, encoder_dir, [p["anchor_prompt"] for p in pairs], "last_mlp_out")[:, 1:]
    before = np.linalg.norm(original - target, axis=-1).mean()
    after = np.linalg.norm(erased - target, axis=-1).mean()
    assert after < 0.5 * before
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_optimizer_state_only_for_trainable_leaves():
    """Fails if someone swaps in optax.masked(adam, mask) over the whole tree."""
    params = TextEncoder.init(TINY).params
    paths = masking.trainable_paths(params, (0,), ("self_attn", "mlp", "layer_norm1", "layer_norm2"))
    trainable, _ = masking.split(params, paths)
    state = init_state(trainable, make_optimizer(tiny.get_config().train))
    trainable_size = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    opt_size = sum(np.size(x) for x in jax.tree_util.tree_leaves(state["opt_state"]))
    assert opt_size == 2 * trainable_size + 1  # Adam mu, nu, count
    assert trainable_size < 0.5 * sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_block_indices_are_checked_at_both_ends():
    params, modules = TextEncoder.init(TINY).params, tiny.get_config().train.trainable_modules
    first = masking.trainable_paths(params, (0,), modules)
    assert first and all(p.startswith("encoder/layers/0/") for p in first)
    assert masking.trainable_paths(params, (-TINY.num_hidden_layers,), modules) == first  # -3 of 3 blocks: block 0
    last = masking.trainable_paths(params, (TINY.num_hidden_layers - 1,), modules)
    assert last and all(p.startswith(f"encoder/layers/{TINY.num_hidden_layers - 1}/") for p in last)
    for bad in (TINY.num_hidden_layers, -TINY.num_hidden_layers - 1):
        with pytest.raises(ConfigError, match=rf"index the 3 blocks but has \[{bad}\]"):
            masking.trainable_paths(params, (bad,), modules)


def test_step_traces_once_and_frozen_is_untouched():
    enc = TextEncoder.init(TINY)
    trainable, frozen = masking.split(enc.params, masking.trainable_paths(enc.params, (0,), ("mlp",)))
    frozen_copy = jax.tree_util.tree_map(np.array, frozen)
    optimizer = optax.adam(1e-2)
    traces = []
    loss_fn = make_loss_fn(enc, ("last_mlp_out",), False, 0.0)

    def counted(*args):
        traces.append(1)
        return loss_fn(*args)
    step = jax.jit(make_train_step(counted, optimizer), donate_argnums=0)
    n, t, d = 4, 77, TINY.hidden_size
    per_job = dict(input_ids=jnp.ones((1, n, t), jnp.int32), attention_mask=jnp.ones((1, n, t), jnp.int32),
                   targets={"last_mlp_out": jnp.ones((1, n, t, d))}, weights={"last_mlp_out": jnp.ones((1, n, t))})
    state = init_state(trainable, optimizer)
    for _ in range(4):
        state, metrics = step(state, frozen, per_job, {}, np.arange(2, dtype=np.int32), np.ones(2, np.float32))
    assert len(traces) == 1
    assert int(state["step"]) == 4
    for p, v in frozen.items():
        assert np.asarray(v).tobytes() == frozen_copy[p].tobytes()


@pytest.mark.slow
def test_resume_is_bit_identical(encoder_dir, tmp_path):
    config = tiny_config(encoder_dir, batch_size=2)  # 3 prompts, 2 per step: shuffled, padded batches
    train_and_evaluate(config, tmp_path / "full")
    first = train_and_evaluate(config, tmp_path / "resumed", stop_after=13)
    assert first["status"] == "interrupted" and first["step"] == 13
    assert not (tmp_path / "resumed" / "erased_trainable.safetensors").exists()
    train_and_evaluate(config, tmp_path / "resumed")
    a = load_file(str(tmp_path / "full" / "erased_trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "erased_trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_hirm_r_targets_are_scaled_unit_vectors_per_concept(encoder_dir):
    from hirm_jax.erase.jobs import concept_key
    v = objectives.random_targets(concept_key(0, "Van Gogh|last_mlp_out"), 77, 64, "uniform")
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    assert (np.asarray(v) >= 0).all()  # RMU: uniform [0, 1) then normalised
    w = objectives.random_targets(concept_key(0, "Monet|last_mlp_out"), 77, 64, "uniform")
    assert not np.allclose(v, w)
    again = objectives.random_targets(concept_key(0, "Van Gogh|last_mlp_out"), 77, 64, "uniform")
    assert np.asarray(v).tobytes() == np.asarray(again).tobytes()


@pytest.mark.slow
def test_nonfinite_loss_stops_with_clear_error(encoder_dir, tmp_path):
    config = tiny_config(encoder_dir)
    config.objective.scale = float("inf")
    with pytest.raises(NonFiniteLossError, match="NaN/inf at step 1"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "erased_trainable.safetensors").exists()


@pytest.mark.parametrize("change, error, match", [
    (lambda c: setattr(c, "concepts", ()), ConfigError, "concepts is empty"),
    (lambda c: setattr(c, "concepts", ("Van Gogh", "Monet")), ConfigError, r"super-category.*\['Monet'\]"),
    (lambda c: c.update(dict(concepts=("word " * 80,), super_categories={"word " * 80: "thing"})),
     PromptTooLongError, "77 tokens"),
    (lambda c: setattr(c.objective, "hooks", ("last_mlp",)), ConfigError, "objective.hooks"),
    (lambda c: setattr(c.train, "trainable_blocks", (7,)), ConfigError, "trainable_blocks"),
])
@pytest.mark.slow
def test_bad_inputs_fail_before_writing(encoder_dir, tmp_path, change, error, match):
    config = tiny_config(encoder_dir)
    change(config)
    with pytest.raises(error, match=match):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_config_field_is_an_error():
    c = tiny.get_config()
    with pytest.raises(AttributeError):
        c.train.epochs_typo = 3


@pytest.mark.slow
def test_preservation_term_reduces_drift(encoder_dir, tmp_path):
    from hirm_jax.encoder.layouts import load_text_encoder
    from hirm_jax.erase.prompts import read_lines
    from hirm_jax.resources import data_path
    retain = read_lines(data_path("ordinary_prompts.txt"), "ordinary prompts")[:16]
    base = load_text_encoder(encoder_dir)
    orig = final_reps(base, base.params, encoder_dir, retain, "last_mlp_out")
    drifts = {}
    for weight in (0.0, 10.0):
        config = tiny_config(encoder_dir)
        config.preservation.weight = weight
        config.preservation.batch_size = 16
        train_and_evaluate(config, tmp_path / f"w{weight}")
        new = final_reps(base, erased_params(base, tmp_path / f"w{weight}"), encoder_dir, retain, "last_mlp_out")
        drifts[weight] = np.linalg.norm(new - orig) / np.linalg.norm(orig)
    assert drifts[10.0] < 0.7 * drifts[0.0]
