"""End to end from the command line: erase -> export full + delta -> apply the delta to a tiny
diffusers pipeline -> its text encoder equals the full export."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from hirm_jax.cli import main
from hirm_jax.encoder.clip_weights import canonical_hf_state
from tests.fixtures_pipelines import save_encoder_folder, save_sd_pipeline, tiny_encoder, tiny_tokenizer

TINY_CONFIG = "configs/tiny.py"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    encoder_folder = save_encoder_folder(tiny_encoder(seed=3), root / "encoder")
    tiny_tokenizer(out_dir=root / "tokenizer")
    return save_sd_pipeline(root / "pipeline", encoder_folder)


@pytest.mark.slow
def test_erase_export_apply_from_the_command_line(pipeline_dir, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["erase", f"--config={TINY_CONFIG}", f"--workdir={work}", f"--config.encoder.path={pipeline_dir}",
            "--config.encoder.component=text_encoder", "--config.train.epochs=4", "--config.concepts=('cat',)",
            "--config.super_categories={'cat': 'animal'}", "--config.report.enabled=True"]
    assert main(args) == 0
    assert (work / "run.json").is_file() and (work / "loss.png").is_file() and (work / "text_report.json").is_file()
    assert main(["export", f"--workdir={work}", f"--out={tmp_path / 'full'}", "--format=full"]) == 0
    assert main(["export", f"--workdir={work}", f"--out={tmp_path / 'delta'}"]) == 0
    assert main(["apply", f"--delta={tmp_path / 'delta'}", f"--base={pipeline_dir}", "--check"]) == 0
    assert main(["apply", f"--delta={tmp_path / 'delta'}", f"--base={pipeline_dir}", f"--out={tmp_path / 'erased'}"]) == 0

    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    applied = canonical_hf_state(load_file(str(tmp_path / "erased" / "text_encoder" / "model.safetensors")))
    assert full.keys() == applied.keys()
    for key in full:
        np.testing.assert_array_equal(applied[key], full[key], err_msg=key)
    delta_keys = set(load_file(str(tmp_path / "delta" / "hirm_delta.safetensors")))
    assert delta_keys and all(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in delta_keys)
    config = json.loads((tmp_path / "delta" / "hirm_config.json").read_text())
    assert config["concepts"] == ["cat"] and config["objective"]["name"] == "hirm_s"


def test_bad_inputs_exit_2_with_a_message(pipeline_dir, tmp_path, capsys):
    assert main(["erase", f"--config={TINY_CONFIG}", f"--workdir={tmp_path / 'w'}",
                 f"--config.encoder.path={pipeline_dir}", "--config.trian.epochs=3"]) == 2
    assert "train" in capsys.readouterr().err
    assert main(["erase", f"--config={TINY_CONFIG}", f"--workdir={tmp_path / 'w'}",
                 f"--config.encoder.path={pipeline_dir}", "--config.encoder.component=text_encoder",
                 "--config.concepts=()"]) == 2
    assert "concepts is empty" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert not (tmp_path / "w").exists()
