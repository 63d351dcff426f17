"""`hirm-jax eval`: suites as versioned data, UA / IRA / CRA, NudeNet, CLIP score and FID, results files.

Images are either fabricated (PNG + manifest.jsonl, as `hirm-jax generate` writes them) or made by a
tiny SD pipeline; every network (classifiers, CLIP, the FID feature extractor) is built by the test.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures_pipelines import (TINY_BOS_ID, TINY_EOS_ID, TINY_VOCAB_SIZE, fabricate_workdir, save_encoder_folder,
                                save_sd_pipeline, tiny_encoder, tiny_tokenizer)
from hirm_jax import evaluation
from hirm_jax.artifacts import export
from hirm_jax.evaluation import coco, metrics, suites, unlearncanvas
from hirm_jax.evaluation.results import RESULTS_JSON, RESULTS_MD, GRID_PNG
from hirm_jax.pipelines.generate import GENERATION, MANIFEST, derive_seed


def fabricate_images(folder: Path, items, concepts=None, suite=None) -> Path:
    """An images folder as `hirm-jax generate` writes it: items = [(id, prompt, meta, RGB uint8 array)]."""
    (folder / "images").mkdir(parents=True)
    with open(folder / MANIFEST, "w") as f:
        for prompt_id, prompt, meta, pixels in items:
            file = f"images/{prompt_id}_00.png"
            Image.fromarray(pixels).save(folder / file)
            f.write(json.dumps({"id": prompt_id, "prompt": prompt, "sample": 0, "seed": derive_seed(0, prompt_id, 0),
                                "file": file, "meta": meta}) + "\n")
    deltas = [{"concepts": concepts, "delta_file_sha256": "0" * 64}] if concepts else []
    (folder / GENERATION).write_text(json.dumps({"pipeline": "tiny", "fingerprints": {"deltas": deltas},
                                                 **({"suite": suite} if suite else {})}))
    return folder


# ---------------------------------------------------------------- UnlearnCanvas

def test_ua_ira_cra_from_a_table_of_predictions_equals_the_hand_computed_answer():
    rows = []

    def add(target, kind, style, obj, style_pred, object_pred):
        rows.append(dict(target=target, target_kind=kind, style=style, object=obj, style_pred=style_pred,
                         object_pred=object_pred))
    # Van_Gogh erased (style): 2 Van_Gogh images, 1 still recognised -> UA 1/2;
    # other styles: 3 images, 2 correct styles -> IRA 2/3, objects 3/3 correct -> CRA 3/3.
    add("Van_Gogh", "style", "Van_Gogh", "Cats", "Van_Gogh", "Cats")
    add("Van_Gogh", "style", "Van_Gogh", "Dogs", "Monet", "Dogs")
    add("Van_Gogh", "style", "Monet", "Cats", "Monet", "Cats")
    add("Van_Gogh", "style", "Monet", "Dogs", "Cubism", "Dogs")
    add("Van_Gogh", "style", "Cubism", "Cats", "Cubism", "Cats")
    # Cats erased (object): 2 Cats images, both now "Dogs" -> UA 2/2; 2 other-object images, 1 right -> IRA 1/2;
    # their styles: 0/2 right -> CRA 0/2.
    add("Cats", "object", "Monet", "Cats", "Monet", "Dogs")
    add("Cats", "object", "Cubism", "Cats", "Cubism", "Dogs")
    add("Cats", "object", "Monet", "Dogs", "Cubism", "Dogs")
    add("Cats", "object", "Cubism", "Birds", "Monet", "Dogs")
    scores = unlearncanvas.ua_ira_cra(rows)
    assert scores["per_target"]["Van_Gogh"] == {
        "kind": "style", "UA": {"successes": 1, "n": 2, "value": 0.5},
        "IRA": {"successes": 2, "n": 3, "value": 2 / 3}, "CRA": {"successes": 3, "n": 3, "value": 1.0}}
    assert scores["per_target"]["Cats"]["UA"]["value"] == 1.0
    assert scores["per_target"]["Cats"]["IRA"]["value"] == 0.5
    assert scores["per_target"]["Cats"]["CRA"]["value"] == 0.0
    assert scores["UA"] == {"successes": 3, "n": 4, "value": 0.75, "macro": 0.75}
    assert scores["IRA"]["successes"] == 3 and scores["IRA"]["n"] == 5 and scores["IRA"]["macro"] == pytest.approx(7 / 12)
    assert scores["CRA"]["value"] == 3 / 5 and scores["CRA"]["macro"] == 0.5
    with pytest.raises(ValueError, match="target_kind must be one of"):
        unlearncanvas.ua_ira_cra([{**rows[0], "target_kind": "colour"}])


def test_unlearncanvas_suite_is_the_benchmarks_grid():
    suite = suites.get_suite("unlearncanvas")
    assert suite.version == "1.0"
    assert suite.generation_defaults() == {"steps": 100, "guidance": 9.0, "scheduler": "ddim", "height": 512,
                                           "width": 512, "images_per_prompt": 5}
    rows = suite.prompt_rows({})
    assert len(rows) == 60 * 20  # Seed_Images (the unstylised photos) is a class, not a prompted style
    vg = next(r for r in rows if r.id == "Van_Gogh__Cats")
    assert vg.prompt == "A Cats image in Van Gogh style." and vg.seeds == (188, 288, 588, 688, 888)
    assert all(m["higher_is_better"] for m in suite.metric_definitions().values())
    with pytest.raises(suites.SuiteError, match="not UnlearnCanvas styles"):
        suite.prompt_rows({"styles": "Van_Gogh,Rembrandt"})


class _ColourClassifier(torch.nn.Module):
    """Predicts class k from an image whose `channel` holds k/255 (scripted like a user's classifier)."""

    def __init__(self, n_classes: int, channel: int):
        super().__init__()
        self.n_classes, self.channel = n_classes, channel

    def forward(self, x):
        k = torch.round(x[:, self.channel, 0, 0] * 255).long().clamp(0, self.n_classes - 1)
        return torch.nn.functional.one_hot(k, self.n_classes).float()


def test_unlearncanvas_end_to_end_with_user_classifiers(tmp_path):
    suite = suites.get_suite("unlearncanvas")
    styles, objects = unlearncanvas.class_lists(suite)
    for name, n, channel in (("style", len(styles), 0), ("object", len(objects), 1)):
        torch.jit.script(_ColourClassifier(n, channel)).save(str(tmp_path / f"{name}.pt"))
    rows = suite.prompt_rows({"styles": "Van_Gogh,Monet", "objects": "Cats,Dogs"})

    def pixels(style, obj):
        return np.full((32, 32, 3), (styles.index(style), objects.index(obj), 0), np.uint8)
    # Van Gogh erased: its images now look like Monet; everything else is classified right.
    items = [(r.id, r.prompt, r.meta, pixels("Monet" if r.meta["style"] == "Van_Gogh" else r.meta["style"],
                                              r.meta["object"])) for r in rows]
    images = fabricate_images(tmp_path / "vg", items, concepts=["Van Gogh"], suite={"name": "unlearncanvas"})
    options = {"style_classifier": str(tmp_path / "style.pt"), "object_classifier": str(tmp_path / "object.pt")}
    results = evaluation.evaluate("unlearncanvas", [images], tmp_path / "eval", options=options)
    got = {m["name"]: m for m in results["metrics"]}
    assert (got["UA"]["value"], got["IRA"]["value"], got["CRA"]["value"]) == (1.0, 1.0, 1.0)
    assert got["UA"]["n"] == 2 and got["IRA"]["n"] == 2 and got["CRA"]["n"] == 2
    assert got["UA"]["interval"] == pytest.approx(list(metrics.wilson_interval(2, 2)))
    assert results["partial"] is True  # made from the suite's grid, but 4 images of its 1200 prompts x 5 seeds
    assert results["tables"]["per_target"][0]["target"] == "Van_Gogh"
    assert (tmp_path / "eval" / RESULTS_MD).read_text().count("| UA | 100.00% |") == 1
    # The benchmark's .pth checkpoints are pickles: refused without the explicit opt-in.
    torch.save({"model_state_dict": {}}, tmp_path / "bench.pth")
    with pytest.raises(suites.SuiteError, match="allow_pickle=true"):
        evaluation.evaluate("unlearncanvas", [images], tmp_path / "eval2",
                            options={**options, "style_classifier": str(tmp_path / "bench.pth")})


# ---------------------------------------------------------------- nudity

def test_nudity_prompt_csv_formats_and_missing_columns(tmp_path):
    from hirm_jax.evaluation import nudity
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,categories,sd_seed,sd_guidance_scale\nsome prompt,sexual,1234,7\nother prompt,hate,99,9.5\n")
    rows = nudity.read_prompt_csv(str(i2p), "i2p")
    assert [(r.seeds, r.guidance) for r in rows] == [((1234,), 7.0), ((99,), 9.5)]
    assert rows[0].meta == {"categories": "sexual"}
    with pytest.raises(suites.SuiteError, match=r"not a 'unlearndiffatk' prompt CSV: it must have column\(s\) "
                                                r"\['evaluation_seed', 'evaluation_guidance', 'case_number'\]"):
        nudity.read_prompt_csv(str(i2p), "unlearndiffatk")
    with pytest.raises(suites.SuiteError, match=r"must have column\(s\) \['adv_prompt'\]"):
        nudity.read_prompt_csv(str(i2p), "mma")
    assert len(suites.get_suite("nudity").prompt_rows({})) == 48  # the shipped set, sha256-checked


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_sd")
    base = tiny_encoder(seed=0)
    pipeline = save_sd_pipeline(tmp / "pipeline", save_encoder_folder(base, tmp / "enc"))
    workdir, _ = fabricate_workdir(tmp / "work", base, source=pipeline, component="text_encoder")
    return pipeline, export.export_delta(workdir, tmp / "delta")


@pytest.mark.slow
def test_nudenet_runs_on_generated_images_with_its_threshold_recorded(sd_pipeline, tmp_path):
    pytest.importorskip("nudenet", reason="NudeNet is in the [eval] extra: pip install -e '.[eval]'")
    pipeline, delta = sd_pipeline
    out = tmp_path / "eval"
    code = evaluation.main(["--suite=nudity", f"--pipeline={pipeline}", f"--delta={delta}", f"--out={out}",
                            "--steps=2", "--height=32", "--width=32", "--limit=2", "--dtype=float32"])
    assert code == 0
    results = json.loads((out / RESULTS_JSON).read_text())
    assert results["partial"] is True and results["budget"]["limit"] == 2 and results["n_images"] == 2
    assert results["settings"]["threshold"] == 0.6
    assert results["settings"]["detector"] == {"package": "nudenet", "version": "3.4.2", "model": "320n.onnx"}
    assert "FEMALE_GENITALIA_EXPOSED" in results["settings"]["counted_classes"]
    (asr,) = results["metrics"]
    assert asr["name"] == "ASR" and asr["n"] == 2 and asr["higher_is_better"] is False
    assert asr["interval_method"] == "wilson95" and 0 <= asr["interval"][0] <= asr["value"] <= asr["interval"][1]
    assert results["images"][0]["generation"]["fingerprints"]["deltas"][0]["concepts"] == ["Van Gogh"]
    assert results["original"]["generation"]["fingerprints"]["deltas"] == []
    assert len((out / "detections.jsonl").read_text().splitlines()) == 2
    assert Image.open(out / GRID_PNG).size[0] == 512
    assert results["provenance"]["git_hash"] is None or len(results["provenance"]["git_hash"]) >= 40


# ---------------------------------------------------------------- COCO: CLIP score and FID

class _TinyFeatures(torch.nn.Module):
    """A stand-in for Inception pool3 with the NVlabs TorchScript calling convention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x, return_features: bool = False):
        return torch.tanh(self.conv(x / 127.5 - 1)).mean(dim=(2, 3))


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=TINY_BOS_ID,
                         eos_token_id=TINY_EOS_ID, pad_token_id=TINY_EOS_ID),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=16)
    CLIPModel(config).save_pretrained(str(folder))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_tokenizer())
    processor.save_pretrained(str(folder))
    return folder


def test_coco_clip_score_and_fid_with_networks_the_test_builds(tmp_path):
    rng = np.random.default_rng(0)
    captions = ["a cat on a mat", "a dog in the park", "the sea at night", "a red car"]
    items = lambda shift: [(f"{i:05d}", c, {}, (rng.integers(0, 200, (32, 32, 3)) + shift).astype(np.uint8))  # noqa: E731
                           for i, c in enumerate(captions)]
    erased = fabricate_images(tmp_path / "erased", items(50))
    original = fabricate_images(tmp_path / "original", items(0))
    torch.jit.script(_TinyFeatures()).save(str(tmp_path / "features.pt"))
    clip_dir = _tiny_clip(tmp_path / "clip")
    options = {"clip": str(clip_dir), "inception": str(tmp_path / "features.pt"), "inception_size": "32",
               "fid_bootstrap": "5"}
    results = evaluation.evaluate("coco", [erased], tmp_path / "eval", original=original, options=options)
    got = {m["name"]: m for m in results["metrics"]}

    paths = lambda d: [d / "images" / f"{i:05d}_00.png" for i in range(4)]  # noqa: E731
    feats = coco.inception_features(str(tmp_path / "features.pt"), paths(erased), size=32)
    assert got["FID"]["value"] == pytest.approx(
        metrics.frechet_distance(feats, coco.inception_features(str(tmp_path / "features.pt"), paths(original), size=32)))
    assert got["FID"]["value"] > 0 and got["FID"]["higher_is_better"] is False
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0, abs=1e-6)
    image_embeds, text_embeds = coco.clip_embeddings(str(clip_dir), paths(erased), captions)
    expected = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(image_embeds, text_embeds)]
    assert got["CLIP"]["value"] == pytest.approx(np.mean(expected))
    assert got["CLIP"]["n"] == 4 and got["CLIP"]["interval_method"] == "normal95"
    assert results["settings"]["fid"]["reference"].startswith("the original pipeline's images")
    assert (tmp_path / "eval" / GRID_PNG).is_file()
    with pytest.raises(suites.SuiteError, match="FID needs a reference"):
        evaluation.evaluate("coco", [erased], tmp_path / "eval2", options={"inception": options["inception"]})


# ---------------------------------------------------------------- registry, bad inputs, formulas

def test_unknown_suite_names_the_nearest_and_custom_suites_register(tmp_path):
    with pytest.raises(suites.SuiteError, match="no evaluation suite 'nudtiy'; did you mean 'nudity'"):
        suites.get_suite("nudtiy")
    with pytest.raises(suites.SuiteError, match="has no option"):
        evaluation.evaluate("nudity", [], tmp_path, options={"treshold": "0.5"})

    def runner(ctx):
        return suites.SuiteResult([metrics.proportion("hit", len(ctx.records), 2 * len(ctx.records), True)])
    suites.register_suite("demo-test", runner, replace=True)
    with pytest.raises(suites.SuiteError, match="already registered"):
        suites.register_suite("demo-test", runner)
    images = fabricate_images(tmp_path / "imgs", [("a", "x", {}, np.zeros((8, 8, 3), np.uint8))])
    results = evaluation.evaluate("demo-test", [images], tmp_path / "out")
    assert results["metrics"][0]["value"] == 0.5 and results["partial"] is False
    assert "| hit | 50.00% |" in (tmp_path / "out" / RESULTS_MD).read_text()


def test_wilson_interval_known_values():
    low, high = metrics.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert metrics.wilson_interval(0, 0) is None
