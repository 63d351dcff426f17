"""UnlearnCanvas: the benchmark's prompt grid, its classifiers, and UA / IRA / CRA over erased targets.

    hirm-jax generate --pipeline=uc-sd15 --delta=deltas/van_gogh --suite=unlearncanvas --out=imgs/van_gogh
    hirm-jax eval --suite=unlearncanvas --images=imgs/van_gogh --images=imgs/cubism \
        --option style_classifier=style.pth --option object_classifier=object.pth --option allow_pickle=true

Each --images folder holds the grid made with ONE target erased (read from its generation.json,
or --option target=NAME). `ua_ira_cra(rows)` is the aggregation, a pure function over a table
of predictions; the benchmark's own repository ships classifiers but not this aggregation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hirm_jax.errors import InputMissingError
from hirm_jax.evaluation import suites
from hirm_jax.evaluation.metrics import Metric, wilson_interval
from hirm_jax.pipelines.generate import GENERATION, PromptRow


def ua_ira_cra(rows: Iterable[Mapping[str, Any]], kinds: Sequence[str] = ("style", "object")) -> dict[str, Any]:
    """UA / IRA / CRA from a table of classifier predictions.

    Each row is one image: `target` (the concept erased in the model that made it), `target_kind`
    (one of `kinds`), and for every kind k the prompted label `row[k]` and the prediction
    `row[k + "_pred"]`. For a target t of kind K:
      UA(t)  = share of images with row[K] == t whose K prediction != t;
      IRA(t) = K accuracy on images with row[K] != t;
      CRA(t) = accuracy of every other kind on images with row[K] != t.
    Returns {"UA"|"IRA"|"CRA": {"successes", "n", "value" (pooled), "macro" (mean over targets)},
    "per_target": {t: {"kind", "UA"|"IRA"|"CRA": {"successes", "n", "value"}}}}.
    """
    counts: dict[str, dict[str, list[int]]] = {}
    kinds_of: dict[str, str] = {}
    for row in rows:
        target, kind = row["target"], row["target_kind"]
        if kind not in kinds:
            raise ValueError(f"target_kind must be one of {list(kinds)} but is {kind!r}")
        if kinds_of.setdefault(target, kind) != kind:
            raise ValueError(f"target {target!r} is given as both {kinds_of[target]} and {kind}")
        c = counts.setdefault(target, {"UA": [0, 0], "IRA": [0, 0], "CRA": [0, 0]})
        if row[kind] == target:
            c["UA"][0] += row[f"{kind}_pred"] != target
            c["UA"][1] += 1
        else:
            c["IRA"][0] += row[f"{kind}_pred"] == row[kind]
            c["IRA"][1] += 1
            for other in kinds:
                if other != kind:
                    c["CRA"][0] += row[f"{other}_pred"] == row[other]
                    c["CRA"][1] += 1

    def figure(k: int, n: int) -> dict:
        return {"successes": k, "n": n, "value": k / n if n else None}

    per_target = {t: {"kind": kinds_of[t], **{m: figure(*c[m]) for m in ("UA", "IRA", "CRA")}}
                  for t, c in sorted(counts.items())}
    result: dict[str, Any] = {"per_target": per_target}
    for m in ("UA", "IRA", "CRA"):
        k = sum(c[m][0] for c in counts.values())
        n = sum(c[m][1] for c in counts.values())
        values = [p[m]["value"] for p in per_target.values() if p[m]["value"] is not None]
        result[m] = {**figure(k, n), "macro": float(np.mean(values)) if values else None}
    return result


# ---------------------------------------------------------------- prompts

def class_lists(suite: suites.Suite) -> tuple[list[str], list[str]]:
    read = lambda key: [l.strip() for l in suites.suite_file(suite, key).read_text().splitlines() if l.strip()]  # noqa: E731
    return read("styles"), read("objects")


def _subset(options: dict, key: str, full: list[str]) -> list[str]:
    if key not in options:
        return full
    chosen = [s.strip() for s in options[key].split(",") if s.strip()]
    unknown = [s for s in chosen if s not in full]
    if unknown:
        raise suites.SuiteError(f"option {key} names {unknown}, which are not UnlearnCanvas {key}: {full}")
    return chosen


def prompt_rows(options: dict) -> list[PromptRow]:
    suite = suites.get_suite("unlearncanvas")
    styles, objects = class_lists(suite)
    excluded = set(suite.spec["prompt_styles_exclude"])
    styles = _subset(options, "styles", [s for s in styles if s not in excluded])
    objects = _subset(options, "objects", objects)
    seeds = tuple(suite.spec["seeds"])
    return [PromptRow(f"{style}__{obj}", suite.spec["prompt_template"].format(object=obj, style=style.replace("_", " ")),
                      seeds, None, {"style": style, "object": obj})
            for style in styles for obj in objects]


# ---------------------------------------------------------------- classifiers

def load_classifier(path: str, n_classes: int, allow_pickle: bool, device: str = "cpu"):
    """A torch module mapping (N, 3, 224, 224) images in [0, 1] to (N, n_classes) logits.

    TorchScript files load as they are. The benchmark's checkpoints are pickles: with allow_pickle
    they are read with torch.load(weights_only=True) into timm's vit_large_patch16_224.augreg_in21k with a
    Linear(1024, n_classes) head, as the benchmark's evaluation code builds it."""
    import torch
    if not Path(path).is_file():
        raise InputMissingError(f"classifier {path} does not exist")
    try:
        return torch.jit.load(path, map_location=device).eval()
    except RuntimeError:
        pass
    if not allow_pickle:
        raise suites.SuiteError(f"{path} is not TorchScript; the benchmark's .pth checkpoints are pickles: pass "
                                "--option allow_pickle=true to read it with torch.load(weights_only=True)")
    try:
        import timm
    except ImportError as e:
        raise suites.SuiteError("loading the benchmark's classifier checkpoints needs timm (pip install timm)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and key in state:
            state = state[key]
            break
    model = timm.create_model("vit_large_patch16_224.augreg_in21k", pretrained=False, num_classes=n_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise suites.SuiteError(f"{path} does not fit ViT-L/16 with {n_classes} classes: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    return model.to(device).eval()


def preprocess(path: Path, size: int = 224) -> np.ndarray:
    """Resize the shorter side to `size` (bilinear), centre-crop, scale to [0, 1]: the benchmark's transform."""
    from PIL import Image
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0


def classify(model, paths: Sequence[Path], classes: Sequence[str], batch_size: int = 32) -> list[str]:
    import torch
    device = next(iter(model.parameters()), torch.empty(0)).device
    out = []
    for i in range(0, len(paths), batch_size):
        batch = torch.from_numpy(np.stack([preprocess(p) for p in paths[i:i + batch_size]])).to(device)
        with torch.no_grad():
            logits = model(batch)
        if logits.shape[-1] != len(classes):
            raise suites.SuiteError(f"the classifier gives {logits.shape[-1]} logits but there are {len(classes)} classes")
        out.extend(classes[j] for j in logits.argmax(-1).tolist())
    return out


# ---------------------------------------------------------------- the suite

def _normalise(name: str) -> str:
    return name.strip().replace(" ", "_").lower()


def _target_of(images_dir: str, options: dict, single: bool, styles: list[str], objects: list[str]) -> tuple[str, str]:
    name = options.get("target") if single else None
    if name is None:
        generation = Path(images_dir) / GENERATION
        concepts = []
        if generation.is_file():
            for delta in json.loads(generation.read_text()).get("fingerprints", {}).get("deltas", []):
                concepts += delta.get("concepts") or []
        if len(concepts) != 1:
            raise suites.SuiteError(f"{images_dir}: UnlearnCanvas needs the ONE erased concept of each --images folder; "
                                    f"its generation.json names {concepts}. Pass --option target=NAME (one folder)")
        name = concepts[0]
    for kind, names in (("style", styles), ("object", objects)):
        match = [n for n in names if _normalise(n) == _normalise(name)]
        if match:
            return match[0], kind
    raise suites.SuiteError(f"erased concept {name!r} is not an UnlearnCanvas style or object")


def run(ctx: suites.EvalContext) -> suites.SuiteResult:
    options = ctx.options
    styles, objects = class_lists(ctx.suite)
    by_dir: dict[str, list[dict]] = {}
    for record in ctx.records:
        by_dir.setdefault(record["images_dir"], []).append(record)
    if "predictions" in options:
        with open(options["predictions"], newline="") as f:
            reader = csv.DictReader(f)
            needed = {"images_dir", "file", "style_pred", "object_pred"}
            if not needed <= set(reader.fieldnames or []):
                raise suites.SuiteError(f"{options['predictions']} must have columns {sorted(needed)} but has "
                                        f"{reader.fieldnames}")
            given = {(str(Path(r["images_dir"]).resolve()), r["file"]): r for r in reader}
        predictions = {}
        for record in ctx.records:
            key = (str(Path(record["images_dir"]).resolve()), record["file"])
            if key not in given:
                raise suites.SuiteError(f"{options['predictions']} has no row for {key}")
            predictions[(record["images_dir"], record["file"])] = (given[key]["style_pred"], given[key]["object_pred"])
        settings = {"classifier": "predictions file", "predictions_sha256": suites.sha256_of(Path(options["predictions"]))}
    else:
        missing = [k for k in ("style_classifier", "object_classifier") if k not in options]
        if missing:
            raise suites.SuiteError(f"unlearncanvas needs --option {missing[0]}=FILE (or --option predictions=CSV)")
        allow_pickle = suites.flag(options, "allow_pickle")
        batch = int(options.get("batch_size", 32))
        paths = [Path(r["path"]) for r in ctx.records]
        style_pred = classify(load_classifier(options["style_classifier"], len(styles), allow_pickle), paths, styles, batch)
        object_pred = classify(load_classifier(options["object_classifier"], len(objects), allow_pickle), paths, objects,
                               batch)
        predictions = {(r["images_dir"], r["file"]): (s, o) for r, s, o in zip(ctx.records, style_pred, object_pred)}
        settings = {"classifier": {k: {"path": options[k], "sha256": suites.sha256_of(Path(options[k]))}
                                   for k in ("style_classifier", "object_classifier")}}
    rows = []
    for images_dir, records in sorted(by_dir.items()):
        target, kind = _target_of(images_dir, options, len(by_dir) == 1, styles, objects)
        for r in records:
            s, o = predictions[(images_dir, r["file"])]
            rows.append({"images_dir": images_dir, "file": r["file"], "target": target, "target_kind": kind,
                         "style": r["meta"]["style"], "object": r["meta"]["object"], "style_pred": s, "object_pred": o})
    scores = ua_ira_cra(rows)
    definitions = ctx.suite.metric_definitions()
    metrics = [Metric(m, scores[m]["value"], scores[m]["n"], definitions[m]["higher_is_better"],
                      wilson_interval(scores[m]["successes"], scores[m]["n"]), "wilson95", "fraction",
                      definitions[m]["description"]) for m in ("UA", "IRA", "CRA")]
    per_target = [{"target": t, "kind": p["kind"], **{m: p[m]["value"] for m in ("UA", "IRA", "CRA")},
                   **{f"n_{m}": p[m]["n"] for m in ("UA", "IRA", "CRA")}} for t, p in scores["per_target"].items()]
    settings["macro_mean_over_targets"] = {m: scores[m]["macro"] for m in ("UA", "IRA", "CRA")}
    return suites.SuiteResult(metrics, {"per_target": per_target, "predictions": rows}, settings)


suites.register_suite("unlearncanvas", run, prompts=prompt_rows)
