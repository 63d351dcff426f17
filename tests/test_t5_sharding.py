"""A T5 erase step sharded over fsdp (and concepts over the concept axis) on 8 fake CPU devices
equals the unsharded one, and places what it should where it should.

A tiny random T5 (d_model 64, 3 blocks, the tiny tokenizer of tests/test_t5_erase.py), two
concepts erased as independent jobs (joint=False), three steps of `plan_erase`'s jitted step:
- on meshes (concept 2, fsdp 4) and (concept 1, fsdp 8) the losses and the updated trainable
  leaves equal those of a single device within 1e-6;
- every frozen leaf is split over fsdp (its spec names "fsdp", its shards are 1/fsdp of it);
  the trainable leaves and their Adam moments are split over concept and fsdp by the same rule,
  before and after the step (sharding.job_state);
- bench/bench_t5_memory.py's abstract builder (ShapeDtypeStruct arguments, no weights) lowers to
  exactly the HLO of plan_erase's step, so the T5-XXL memory numbers measure what users run.
"""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from hirm_jax.erase import sharding
from hirm_jax.erase.setup import plan_erase
from tests.test_t5_erase import MAX_LENGTH, t5_folder

REPO = Path(__file__).resolve().parent.parent
CONCEPTS = {"van gogh": "painting", "a red car": "a photo"}
STEPS = 3


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return t5_folder(tmp_path_factory.mktemp("t5_sharding") / "t5")


def config_for(t5_dir):
    c = tiny.get_config("hirm_s")
    c.encoder.path = str(t5_dir)
    c.encoder.max_length = MAX_LENGTH
    c.concepts = tuple(CONCEPTS)
    c.super_categories = dict(CONCEPTS)
    c.joint = False
    return c


def mesh_of(devices, concept=1, data=1, fsdp=1):
    cfg = type("M", (), dict(concept=concept, data=data, fsdp=fsdp))
    return sharding.make_mesh(cfg, devices=jax.devices()[:devices])


def run_steps(run, steps=STEPS):
    state, losses = run.new_state(), []
    for step in range(steps):
        state, metrics = run.step_fn(state, *run.step_args(run.place_jobs(*run.chunks[0]), step))
        losses.append(np.asarray(metrics["loss"])[: run.jobs.num_jobs])
    return state, np.stack(losses)


@pytest.fixture(scope="module")
def unsharded(t5_dir):
    run = plan_erase(config_for(t5_dir), mesh_of(1))
    base = {k: np.asarray(v) for k, v in run.new_state()["trainable"].items()}  # (the step donates the state)
    state, losses = run_steps(run)
    nu = state["opt_state"][0].nu  # optax.adam: (ScaleByAdamState(count, mu, nu), EmptyState())
    return ({k: np.asarray(v) for k, v in state["trainable"].items()}, losses, base,
            {k: np.sqrt(np.asarray(v)) for k, v in nu.items()})


def assert_split(leaf, spec, fsdp):
    """`leaf` carries `spec`, and its shards are 1/fsdp of it along the fsdp axis."""
    assert leaf.sharding.spec == spec, (leaf.shape, leaf.sharding.spec, spec)
    axis = list(spec).index("fsdp")
    shard = leaf.sharding.shard_shape(leaf.shape)
    assert shard[axis] * fsdp == leaf.shape[axis]
    assert leaf.addressable_shards[0].data.shape == shard


@pytest.mark.parametrize("concept,fsdp", [(2, 4), (1, 8)])
@pytest.mark.slow
def test_t5_step_sharded_over_fsdp_and_concepts_equals_unsharded(t5_dir, unsharded, concept, fsdp):
    run = plan_erase(config_for(t5_dir), mesh_of(8, concept=concept, fsdp=fsdp))
    assert dict(run.mesh.shape) == dict(concept=concept, data=8 // concept // fsdp, fsdp=fsdp)

    # every frozen leaf of this T5 (vocab 120, d_model 64, d_ff 128, 8 buckets x 4 heads) divides
    assert len(run.frozen) > 20
    for path, leaf in run.frozen.items():
        spec = sharding.frozen_spec(leaf.shape, fsdp)
        assert "fsdp" in spec, path
        assert_split(leaf, spec, fsdp)

    def check_state(state):
        for tree in (state["trainable"], state["opt_state"]):
            for leaf in jax.tree_util.tree_leaves(tree):
                if leaf.ndim == 1:  # Adam's per-job count
                    assert leaf.sharding.spec == P("concept")
                    continue
                spec = P("concept", *sharding.frozen_spec(leaf.shape[1:], fsdp))
                assert_split(leaf, spec, fsdp)
                assert leaf.sharding.shard_shape(leaf.shape)[0] == leaf.shape[0] // concept
        assert state["bad_step"].sharding.spec == P("concept")

    check_state(run.new_state())
    state, losses = run_steps(run)
    check_state(state)

    trained, expected_losses, base, grad_rms = unsharded
    assert all(np.abs(trained[p] - base[p]).max() > 1e-4 for p in trained)  # every trainable leaf moved
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6, atol=1e-6)
    assert state["trainable"].keys() == trained.keys()
    for path, leaf in state["trainable"].items():
        diff = np.abs(np.asarray(leaf)[: run.jobs.num_jobs] - trained[path])
        # Adam moves a coordinate by lr * g / (|g| + eps): where g is at rounding level (it cancels
        # to ~1e-5 of the leaf's typical gradient) the sharded sum's other rounding changes that
        # ratio by ~1e-3, i.e. the weight by ~1e-6 (one wi_0 entry here: g = 4.3e-7 vs 4.6e-7,
        # median |g| 0.055). Which coordinates cancel so depends on the summation order (threads,
        # shard layout), so the rule is by count: all within lr / 100, 99.9% within 1e-6.
        assert diff.max(initial=0) <= 1e-5, (path, diff.max())
        assert (diff > 1e-6).mean() < 1e-3, (path, int((diff > 1e-6).sum()))


@pytest.mark.slow
def test_bench_abstract_step_lowers_to_plan_erases_step(t5_dir):
    spec = importlib.util.spec_from_file_location("bench_t5_memory", REPO / "bench" / "bench_t5_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = plan_erase(config_for(t5_dir), mesh_of(8, concept=2, fsdp=4))
    step_fn, args = bench.build_abstract_step(run.config, run.encoder.config, run.mesh, run.jobs.num_jobs,
                                              run.jobs.prompts_per_job)
    ours = step_fn.lower(*args).as_text()
    theirs = run.step_fn.lower(run.new_state(), *run.step_args(run.place_jobs(*run.chunks[0]), 0)).as_text()
    assert ours == theirs
