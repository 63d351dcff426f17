"""Text-space report: zero drift for an unchanged encoder, positive for a perturbed block, files."""

import json

import numpy as np
import pytest

from tests.fixtures_pipelines import fabricate_workdir, perturb_block, save_encoder_folder, tiny_encoder, tiny_tokenizer
from hirm_jax import config_lib
from hirm_jax.report import textreport
from hirm_jax.erase.masking import flatten, unflatten
from hirm_jax.resources import data_path

TARGETS = ["Van Gogh", "a painting by Van Gogh"]
PARAPHRASES = ["a landscape by Van Gogh"]
ORDINARY = ["a cat on a sofa", "two dogs in the park", "a bowl of fruit on the table"]


@pytest.fixture(scope="module")
def base():
    return tiny_encoder(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_unchanged_encoder_has_no_drift_and_files_are_written(base, tokenizer, tmp_path):
    report = textreport.text_report(base, base.params, tokenizer, textreport.PromptSets(TARGETS, ORDINARY, PARAPHRASES))
    textreport.write_report(report, tmp_path)
    for name in ("targets", "paraphrases", "ordinary"):
        s = report["sets"][name]
        assert s["drift"]["max"] == 0.0
        assert s["cos_to_original"]["min"] == pytest.approx(1.0, abs=1e-6)
        assert "cos_to_target" not in s
    assert report["sets"]["ordinary"]["num_prompts"] == 3 and report["selectivity"] is None
    saved = json.loads((tmp_path / "text_report.json").read_text())
    assert saved["sets"]["targets"]["per_prompt"][1]["prompt"] == TARGETS[1]
    assert saved["provenance"]["hirm_jax_version"] and "package_versions" in saved["provenance"]
    table = (tmp_path / "text_report.md").read_text()
    assert "| ordinary | 3 |" in table and "| targets | 2 |" in table
    assert (tmp_path / "text_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_perturbed_block_drifts_toward_its_target(base, tokenizer):
    erased = unflatten({**flatten(base.params), **perturb_block(base.params, scale=0.2)})
    hook_dim = base.config.hidden_size
    shared_target = np.random.default_rng(0).standard_normal((77, hook_dim)).astype(np.float32)
    sets = textreport.PromptSets(TARGETS, ORDINARY, PARAPHRASES, targets=shared_target)
    at_final_ln = textreport.ReportOptions(hook="final_ln")
    report = textreport.text_report(base, erased, tokenizer, sets, at_final_ln)
    for name in ("targets", "paraphrases", "ordinary"):
        s = report["sets"][name]
        assert s["drift"]["min"] > 0 and s["cos_to_original"]["max"] < 1.0
    paraphrases = report["sets"]["paraphrases"]
    assert "cos_to_target" in paraphrases  # the 2-D target is reused for the paraphrases
    assert paraphrases["cos_to_target_before"]["mean"] != paraphrases["cos_to_target"]["mean"]
    assert "cos_to_target" not in report["sets"]["ordinary"]
    assert report["selectivity"] == pytest.approx(
        report["sets"]["targets"]["drift"]["mean"] / report["sets"]["ordinary"]["drift"]["mean"])
    # a batch shares the base encoder's pass over the ordinary prompts (and only those) between reports
    originals = {}
    first = textreport.text_report(base, erased, tokenizer, sets, at_final_ln, originals=originals)
    assert sorted(originals) == sorted(ORDINARY)
    originals = {p: v + 1.0 for p, v in originals.items()}  # the memo is what the next report reads
    second = textreport.text_report(base, erased, tokenizer, sets, at_final_ln, originals=originals)
    assert first["sets"] == report["sets"] and second["sets"]["targets"] == report["sets"]["targets"]
    assert second["sets"]["ordinary"]["drift"] != report["sets"]["ordinary"]["drift"]


def test_compare_representations_uses_only_the_masked_positions():
    original = np.ones((1, 3, 2), np.float32)
    erased = original.copy()
    erased[0, 0] = [5.0, -5.0]  # only position 0 moves
    positions = np.array([[False, True, True]])
    out = textreport.compare_representations(original, erased, positions, target=erased)
    assert out["drift"][0] == 0.0 and out["cos_to_original"][0] == pytest.approx(1.0)
    out = textreport.compare_representations(original, erased, np.ones((1, 3), bool), target=-original)
    assert out["drift"][0] == pytest.approx(np.sqrt(16 + 36) / np.sqrt(6))
    assert out["cos_to_target"][0] == pytest.approx(-2 / 3)


@pytest.mark.slow
def test_report_for_run_rebuilds_targets_from_the_workdir(base, tmp_path):
    folder = save_encoder_folder(base, tmp_path / "enc")
    tiny_tokenizer(out_dir=folder)
    workdir, _ = fabricate_workdir(tmp_path / "work", base, source=folder)
    config = config_lib.base_config()
    config.encoder.path, config.encoder.component = str(folder), ""
    config.concepts, config.super_categories = ("Van Gogh",), {"Van Gogh": "painting"}
    config.templates = ("{}", "a painting by {}")
    config.report.max_ordinary_prompts = 8
    paraphrases = tmp_path / "paraphrases.txt"
    paraphrases.write_text("a landscape by {}\nthe sky as van gogh saw it\n")
    config.report.paraphrases_file = str(paraphrases)
    (workdir / "config.json").write_text(config_lib.resolve_defaults(config).to_json())

    [report] = textreport.report_for_run(workdir)
    sets = report["sets"]
    assert [p["prompt"] for p in sets["targets"]["per_prompt"]] == ["Van Gogh", "a painting by Van Gogh"]
    assert [p["prompt"] for p in sets["paraphrases"]["per_prompt"]] == [
        "a landscape by Van Gogh", "the sky as Van Gogh saw it"]
    assert sets["ordinary"]["num_prompts"] == 8 and sets["targets"]["drift"]["min"] > 0
    assert sets["targets"]["cos_to_target"] is not None
    assert report["provenance"]["workdir"] == str(workdir.resolve())
    assert (workdir / "text_report.md").is_file() and (workdir / "text_report.png").is_file()


def test_shipped_data_files():
    ordinary = [l for l in data_path("ordinary_prompts.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert len(ordinary) >= 252 and len(set(ordinary)) == len(ordinary)  # 220 held out beyond 32 retain prompts
    keywords = [l for l in data_path("nudity_keywords.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert keywords == ["naked", "nude", "bare", "exposed", "Stripped", "topless", "male genitalia", "penis", "buttocks"]
    assert not [p for p in ordinary if any(k.lower() in p.lower().split() for k in keywords)]
    rows = [l.split("\t") for l in data_path("nudity_pairs.tsv").read_text().splitlines()]
    assert rows[0] == ["with_concept", "without_concept"] and len(rows) > 60
    assert all(len(r) == 2 and r[0] != r[1] for r in rows[1:])
    with pytest.raises(FileNotFoundError, match="ships"):
        data_path("missing.txt")
