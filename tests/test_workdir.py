"""The workdir contract (erase/workdir.py) and the in-memory handoff from the trainer.

What the trainer hands over in memory must be what a later process reads from the workdir:
the same erased parameters, the same records, the same text report."""

import json

import numpy as np
import pytest

from configs import tiny
from hirm_jax.erase import masking
from hirm_jax.erase.workdir import SCHEMA_VERSION, BaseRecord, IndexRecord, RunError, RunRecord, Workdir, load_run
from hirm_jax.report import textreport
from hirm_jax.run import train_and_evaluate


def tiny_config(encoder_dir, **fields):
    c = tiny.get_config("hirm_s")
    c.encoder.path = str(encoder_dir)
    c.train.epochs = 4
    c.report.enabled = True
    c.report.max_ordinary_prompts = 20
    c.super_categories = {"Van Gogh": "painting", "Monet": "painting"}
    for key, value in fields.items():
        setattr(c, key, value)
    return c


def test_records_round_trip_and_a_0_1_record_loads_with_defaults():
    base = BaseRecord(source="/models/sd", component="text_encoder", trainable_sha256={"a": "0" * 64})
    record = RunRecord(base=base, concepts=["Van Gogh"], trainable_paths=["a"], final_loss=0.5, seed=3)
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.to_json()["schema_version"] == SCHEMA_VERSION == 2
    assert "revision" not in record.to_json()["base"] and "timings_s" not in record.to_json()
    hub = BaseRecord(source="org/sd", revision="abc", snapshot="/cache/abc")
    assert BaseRecord.from_json(hub.to_json()) == hub and hub.to_json()["revision"] == "abc"
    old = {"base": {"source": "/models/sd", "component": None}, "concepts": ["x"], "trainable_paths": ["a"],
           "method": "hirm", "some_field_of_the_future": 1}  # hirm_jax 0.1: no schema_version, no fingerprints
    loaded = RunRecord.from_json(old)
    assert loaded.schema_version == 1 and loaded.base.trainable_sha256 is None and loaded.component_name == "text_encoder"
    with pytest.raises(TypeError):
        RunRecord.from_json({"base": {"source": "x"}, "concepts": ["x"]})  # trainable_paths is required
    index = IndexRecord(concepts={"x": "concepts/x-1"}, base=base, chunks=[[0, 1]], timings_s={"train": 1.0})
    assert IndexRecord.from_json(index.to_json()) == index


def test_a_broken_index_is_a_run_error_naming_it(tmp_path):
    wd = Workdir(tmp_path)
    (tmp_path / "index.json").write_text('{"concepts": {}, "base": {"source": "x"}}')
    with pytest.raises(RunError, match="index.json lists no concepts"):
        wd.read_index()
    (tmp_path / "index.json").write_text('{"concepts": ["x"]}')
    with pytest.raises(RunError, match="index.json is corrupt"):
        wd.read_index()


@pytest.mark.slow
def test_what_the_trainer_hands_over_equals_what_the_workdir_holds(encoder_dir, tmp_path):
    """keep_trained: the erased run in memory is the one load_run reads back, bit for bit, and the
    text report written from memory during training equals the one `hirm-jax report` writes."""
    workdir = tmp_path / "run"
    result = train_and_evaluate(tiny_config(encoder_dir), workdir, keep_trained=True)
    in_memory, on_disk = result.erased_run(), load_run(workdir)
    assert in_memory.record == on_disk.record == Workdir(workdir).read_run()
    flat_memory, flat_disk = masking.flatten(in_memory.erased_params), masking.flatten(on_disk.erased_params)
    assert sorted(flat_memory) == sorted(flat_disk)
    assert all(np.asarray(flat_memory[p]).tobytes() == np.asarray(flat_disk[p]).tobytes() for p in flat_disk)
    written = json.loads((workdir / "text_report.json").read_text())
    [reread] = textreport.report_for_run(workdir, tmp_path / "again")
    for name in ("targets", "paraphrases", "ordinary"):
        assert set(written["sets"][name]) == set(reread["sets"][name])
        for metric in set(written["sets"][name]) & {"drift", "cos_to_original", "cos_to_target"}:
            assert written["sets"][name][metric] == pytest.approx(reread["sets"][name][metric], rel=1e-5, abs=1e-7)
    assert written["sets"]["targets"]["prompts_sha256"] == reread["sets"]["targets"]["prompts_sha256"]
    assert written["sets"]["targets"]["cos_to_target"]["mean"] > written["sets"]["targets"]["cos_to_target_before"]["mean"]
    with pytest.raises(ValueError, match="keep_trained"):
        train_and_evaluate(tiny_config(encoder_dir), tmp_path / "other").erased_run()


@pytest.mark.slow
def test_batch_reports_from_memory_cover_every_concept_with_a_summary(encoder_dir, tmp_path):
    workdir = tmp_path / "batch"
    result = train_and_evaluate(tiny_config(encoder_dir, joint=False, concepts=("Van Gogh", "Monet")), workdir)
    concepts = Workdir(workdir).concept_workdirs()
    assert sorted(concepts) == ["Monet", "Van Gogh"] and result["status"] == "done"
    assert all((wd.path / "text_report.json").is_file() for wd in concepts.values())
    summary = json.loads((workdir / "text_report_summary.json").read_text())
    assert sorted(summary["concepts"]) == ["Monet", "Van Gogh"]
    assert [j["concepts"] for j in result["jobs"]] == [["Van Gogh"], ["Monet"]]
