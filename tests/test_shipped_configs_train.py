"""Every shipped config, with every documented arg, runs one erase step with its own objective,
hooks and options: on a tiny CLIP encoder (with a projection, the real CLIP tokenizer) for CLIP
components, on a tiny T5 (its own tokenizer) for T5 components; every component of a
several-encoder config (flux "both", sd3 "all"). Only the encoder is swapped for a tiny one."""

import importlib.util

import jax
import numpy as np
import pytest

from hirm_jax import config_lib
from hirm_jax.erase import masking
from hirm_jax.erase.setup import plan_erase

T5_COMPONENTS = {("flux", "text_encoder_2"), ("sd3", "text_encoder_3")}


def shipped_cases():
    return [(name, arg) for name, path in sorted(config_lib.shipped_configs().items())
            for arg in (config_lib.config_args(path) or (None,))]


def load_shipped(name, arg):
    path = config_lib.shipped_configs()[name]
    spec = importlib.util.spec_from_file_location(f"shipped_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from hirm_jax.encoder.clip import TextEncoderConfig
    from hirm_jax.encoder.testing import random_encoder_folder
    from tests.fixtures_pipelines import tiny_t5, tiny_t5_tokenizer
    root = tmp_path_factory.mktemp("shipped")
    clip = random_encoder_folder(root / "clip", TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                                  num_attention_heads=2, projection_dim=16), seed=0)
    tokenizer = tiny_t5_tokenizer()
    tiny_t5(tokenizer).save_pretrained(str(root / "t5"))
    tokenizer.save_pretrained(str(root / "t5"))
    return {"clip": clip, "t5": root / "t5"}


def component_configs(name, config):
    if not config.components:
        return [(config.encoder.component, config)]
    return [(c, config_lib.component_config(config, c)) for c in sorted(config.components)]


@pytest.mark.slow
@pytest.mark.parametrize("name, arg", shipped_cases())
def test_every_shipped_config_runs_an_erase_step(name, arg, tiny_folders):
    config = load_shipped(name, arg)
    for component, sub in component_configs(name, config):
        t5 = (name, component) in T5_COMPONENTS
        with sub.unlocked():
            sub.encoder.path = str(tiny_folders["t5" if t5 else "clip"])
            sub.encoder.component = ""
            sub.encoder.tokenizer = ""
            sub.train.epochs = 1
            sub.train.batch_size = 0
            if not sub.concepts and not sub.concepts_file:  # the default config names no concept
                sub.concepts, sub.super_categories = ("Van Gogh",), {"Van Gogh": "painting"}
            if sub.preservation.weight > 0:
                sub.preservation.batch_size = 4
        plan = plan_erase(sub)
        state, per_job = plan.new_state(), plan.place_jobs(*plan.chunks[0])
        before = {p: np.asarray(v) for p, v in masking.flatten(state["trainable"]).items()}
        state, metrics = plan.step_fn(state, *plan.step_args(per_job, 0))
        loss = np.asarray(metrics["loss"])[: plan.jobs.num_jobs]
        assert np.isfinite(loss).all() and (loss > 0).all(), (name, arg, component, loss)
        after = masking.flatten(jax.device_get(state["trainable"]))
        assert any(not np.array_equal(before[p], np.asarray(after[p])) for p in before), (name, arg, component)
        assert tuple(plan.config.objective.hooks) == tuple(sub.objective.hooks)
