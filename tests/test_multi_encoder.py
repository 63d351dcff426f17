"""One erase over every text encoder of a pipeline: Flux (CLIP-L + T5) and SD3 (two CLIPs + T5).

The shipped configs (flux.py "both", sd3.py "all") erase each component into
WORKDIR/components/<component>/; export writes one delta keyed by component; the delta applied
to the pipeline folder (`hirm-jax apply`), applied in memory to a loaded pipeline, and loaded
by plain diffusers from the applied folder give the same encoders and the same images, and the
erased torch encoders compute what the erased Flax encoders compute."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from configs import flux, sd3  # noqa: E402
from hirm_jax.artifacts import export  # noqa: E402
from hirm_jax.artifacts.delta import load_delta  # noqa: E402
from hirm_jax.config_lib import ConfigError, validate  # noqa: E402
from hirm_jax.encoder.layouts import load_text_encoder  # noqa: E402
from hirm_jax.erase.workdir import Workdir  # noqa: E402
from hirm_jax.pipelines import generate as gen  # noqa: E402
from hirm_jax.pipelines.patch import apply_delta_to_pipeline  # noqa: E402
from hirm_jax.run import train_and_evaluate  # noqa: E402
from tests.fixtures_pipelines import (TINY_CONFIG, TINY_CONFIG_PROJ, save_encoder_folder, tiny_encoder,  # noqa: E402
                                      tiny_flux_pipeline, tiny_sd3_pipeline)

T5_LENGTH = 24  # the tiny T5 tokenizer's prompts fit; Flux uses 512, SD3 256


def erase_config(module, arg, pipeline_dir):
    c = module.get_config(arg)
    c.encoder.path = str(pipeline_dir)
    c.train.epochs = 6
    c.train.learning_rate = 1e-3
    c.report.enabled = False
    c.templates = ("{}", "a painting by {}")
    c.components = {name: {**fields, **({"encoder.max_length": T5_LENGTH} if "encoder.max_length" in fields else {})}
                    for name, fields in c.components.items()}
    return c


def images(pipe, prompt="a painting by Van Gogh"):
    out = pipe(prompt=[prompt], num_inference_steps=2, height=32, width=32, output_type="np",
               generator=[torch.Generator("cpu").manual_seed(0)], guidance_scale=2.0)
    return out.images


def assert_same_encoders(a, b, components):
    for name in components:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def run_pipeline_family(tmp_path, pipe, module, arg, pipeline_class):
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    result = train_and_evaluate(erase_config(module, arg, folder), tmp_path / "erase", keep_trained=True)
    components = sorted(result.components)
    assert result["status"] == "done" and components == sorted(module.COMPONENT_FIELDS)
    assert sorted(Workdir(tmp_path / "erase").component_workdirs()) == components
    delta_dir = export.export_delta(tmp_path / "erase", tmp_path / "delta")
    assert sorted(load_delta(delta_dir).components()) == components
    assert export.export_delta(result.erased_runs(), tmp_path / "delta_from_memory")  # the same from memory
    assert (tmp_path / "delta" / "hirm_delta.safetensors").read_bytes() == \
        (tmp_path / "delta_from_memory" / "hirm_delta.safetensors").read_bytes()
    applied = export.apply_delta(delta_dir, folder, tmp_path / "applied")
    exported = export.export_pipeline(tmp_path / "erase", folder, tmp_path / "exported")
    full = export.export_full(tmp_path / "erase", tmp_path / "full")
    for component in components:  # the three export formats carry the same erased encoder
        weights = sorted((applied / component).glob("*.safetensors"))
        assert weights and all(w.read_bytes() == (exported / component / w.name).read_bytes() for w in weights)
        assert load_text_encoder(full / component).config == result.components[component].erased_run().base.config

    in_memory = apply_delta_to_pipeline(pipeline_class.from_pretrained(str(folder)), delta_dir)
    plain = pipeline_class.from_pretrained(str(applied))
    original = pipeline_class.from_pretrained(str(folder))
    assert_same_encoders(in_memory, plain, components)
    via_generate = gen.load_pipeline(folder, [delta_dir], dtype="float32", device="cpu")
    assert_same_encoders(via_generate, plain, components)
    erased_images = images(plain)
    np.testing.assert_array_equal(images(in_memory), erased_images)
    assert not np.array_equal(images(original), erased_images), "the erasure must change the images"
    return result, plain


def assert_flax_equals_torch(result, pipe, component, hook_torch):
    """The erased Flax encoder and the erased torch encoder of the pipeline agree."""
    run = result.components[component].erased_run()
    ids = np.array([[1, 5, 6, 7, 1] + [0] * 3]) if "T5" in type(getattr(pipe, component)).__name__ else None
    if ids is None:
        ids = np.array([[TINY_CONFIG.vocab_size - 2, 5, 6, 7, TINY_CONFIG.vocab_size - 1] + [TINY_CONFIG.vocab_size - 1] * 72])
    flax_out = run.base.apply(run.erased_params, ids)
    with torch.no_grad():
        torch_out = getattr(pipe, component)(torch.from_numpy(ids), output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(flax_out["last_hidden_state"]), hook_torch(torch_out).numpy(), atol=1e-4)


@pytest.mark.slow
def test_flux_both_encoders_erased_exported_and_applied(tmp_path):
    from diffusers import FluxPipeline
    clip = save_encoder_folder(tiny_encoder(seed=0), tmp_path / "clip")
    result, plain = run_pipeline_family(tmp_path, tiny_flux_pipeline(clip), flux, "both", FluxPipeline)
    for component in ("text_encoder", "text_encoder_2"):
        assert_flax_equals_torch(result, plain, component, lambda out: out.last_hidden_state)


@pytest.mark.slow
def test_sd3_three_encoders_erased_exported_and_applied(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    clip_l = save_encoder_folder(tiny_encoder(seed=0, config=TINY_CONFIG_PROJ), tmp_path / "clip_l")
    clip_g = save_encoder_folder(tiny_encoder(seed=1, config=TINY_CONFIG_PROJ), tmp_path / "clip_g")
    result, plain = run_pipeline_family(tmp_path, tiny_sd3_pipeline(clip_l, clip_g), sd3, "all",
                                        StableDiffusion3Pipeline)
    assert_flax_equals_torch(result, plain, "text_encoder_3", lambda out: out.last_hidden_state)


def test_component_overrides_are_checked_before_anything_runs():
    c = flux.get_config()
    c.encoder.path = "/nowhere"
    validate(c)
    c.components = {**c.components, "text_encoder_2": {"encoder.max_lenght": 512}}
    with pytest.raises(ConfigError, match=r"components\['text_encoder_2'\] overrides 'encoder.max_lenght'"):
        validate(c)
    c.components = {"text_encoder": {"encoder.max_length": -3}}
    with pytest.raises(ConfigError, match="encoder.max_length must be >= 0"):
        validate(c)
