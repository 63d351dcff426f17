"""`hirm-jax demo`: erase a concept from the shipped demo world and measure it, in minutes on a CPU.

    from hirm_jax.world.demo import run_demo
    report = run_demo("heart", method="hirm_s", workdir="workdirs/demo")

Steps: load the shipped world; erase the concept from the world's text encoder in JAX
(`hirm_jax.erase.loop`, config `configs/demo.py`); export the erased encoder as a transformers
folder (what a PyTorch user receives); generate the benchmark grid (every object x style,
held-out caption templates and seeds) with the original and the erased encoder through the
world's diffusers UNet; judge every image; print UA / IRA / CRA beside the before-erasure
figures; write DIR/demo_report.json and DIR/demo_grid.png.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from hirm_jax import log, provenance
from hirm_jax.config_lib import ConfigError, base_config
from hirm_jax.world.data import concept_kind
from hirm_jax.fileio import atomic_file, write_json

_log = log.get(__name__)

DEFAULT_CONCEPT = "heart"
ROBUST = "hirm_s_adv"  # robust HiRM-S: objective.adversarial on (hirm_jax.erase.adversarial)
METHODS = ("hirm_s", "hirm_r", ROBUST)
FIRST_EVAL_SEED = 20_000  # the world trains on seeds < 10_000 and reports its quality from 10_000


def demo_config(method: str = "hirm_s"):
    """The demo's erase hyper-parameters (configs/demo.py is this, for the command line).

    HiRM as specified (block 0 updated, last_mlp_out supervised) plus the project's preservation
    term: the world's encoder has CLIP-L's 12 blocks but width 128, far less redundant than
    CLIP-L's 768, and without a retain term other captions move with the erased one (measured in
    docs/world.md)."""
    c = base_config()
    c.encoder.component = ""
    c.objective.name = "hirm_s" if method in (None, "", ROBUST) else method
    c.objective.adversarial.enabled = method == ROBUST
    c.train.learning_rate = 3e-4
    c.train.epochs = 40
    c.train.log_every = 25
    c.train.checkpoint_every = 1000
    c.preservation.weight = 10.0
    c.preservation.batch_size = 0
    c.report.enabled = False
    return c


def erase_config(world, concept: str, method: str, workdir: Path):
    """The demo config filled in for one concept: every trained name of it (all but the held-out
    synonym) erased together, each toward the world's anchor, in the world's first training
    template with every class of the other kind; retain prompts = the first template for every
    cell without the concept. No prompt here uses a held-out name."""
    from hirm_jax import world as w
    kind = concept_kind(concept)
    c = demo_config(method)
    c.encoder.path = str(world.text_encoder_path)
    c.encoder.tokenizer = str(world.path / "tokenizer")
    c.concepts = w.trained_names(concept)
    c.concept_type = kind
    c.super_categories = {name: w.super_category(concept) for name in c.concepts}
    if kind == "object":
        c.templates = tuple(w.caption("{}", s, t) for t in w.TRAIN_TEMPLATES[:1] for s in w.STYLES)
    else:
        c.templates = tuple(w.caption(o, "{}", t) for t in w.TRAIN_TEMPLATES[:1] for o in w.OBJECTS)
    retain = retain_prompts((concept,), w.OBJECTS, w.STYLES)
    retain_file = workdir / "retain_prompts.txt"
    retain_file.parent.mkdir(parents=True, exist_ok=True)
    retain_file.write_text("\n".join(retain) + "\n")
    with c.unlocked():
        c.preservation.prompts_file = str(retain_file)
    return c


def retain_prompts(concepts, objects, styles) -> list[str]:
    """The first training template over every (object, style) cell given, without the cells of
    the erased concepts."""
    from hirm_jax import world as w
    return [w.caption(o, s, w.TRAIN_TEMPLATES[0]) for o in objects for s in styles
            if o not in concepts and s not in concepts]


def benchmark_grid(seeds_per_cell: int, synonyms_of=()) -> list[dict]:
    """Every (object, style) cell x `seeds_per_cell` held-out seeds, cycling the held-out templates,
    every class named by its own name; then, for each concept in `synonyms_of`, its cells again
    (same templates and seeds) with the concept called by its held-out synonym (`renamed`: the
    concept so renamed)."""
    from hirm_jax import world as w
    rows = []
    for o in w.OBJECTS:
        for s in w.STYLES:
            for k in range(seeds_per_cell):
                template = w.HELDOUT_TEMPLATES[k % len(w.HELDOUT_TEMPLATES)]
                rows.append(dict(object=o, style=s, prompt=w.caption(o, s, template), seed=FIRST_EVAL_SEED + k,
                                 template=template, renamed=None))
    for concept in synonyms_of:
        kind, synonym = concept_kind(concept), w.heldout_name(concept)
        for row in [r for r in rows if r[kind] == concept and r["renamed"] is None]:
            names = {"object": row["object"], "style": row["style"], kind: synonym}
            rows.append(dict(row, prompt=w.caption(names["object"], names["style"], row["template"]), renamed=concept))
    return rows


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows naming every class by its own name, rows naming a concept by its held-out synonym)."""
    return [r for r in rows if r["renamed"] is None], [r for r in rows if r["renamed"] is not None]


def judged_rows(world, images, grid: list[dict], targets: list[str]) -> list[dict]:
    """Rows for `ua_ira_cra`, one set per erased target. With several targets (a joint erasure),
    the images prompted with another of them are left out of each target's set; an image that
    calls a concept by its held-out synonym counts for that concept only."""
    preds = world.judge.classify(images)
    rows = []
    for target in targets:
        kind, others = concept_kind(target), [x for x in targets if x != target]
        rows += [dict(row, target=target, target_kind=kind, object_pred=o, style_pred=s)
                 for row, o, s in zip(grid, preds["object"], preds["style"])
                 if row["object"] not in others and row["style"] not in others and row["renamed"] in (None, target)]
    return rows


def figures(rows: list[dict]) -> dict:
    """UA / IRA / CRA (with 95% intervals and counts) of the rows naming classes by their own
    names, and UA_heldout_name: UA over the rows that call the concept by its held-out synonym."""
    from hirm_jax.evaluation.metrics import wilson_interval
    from hirm_jax.evaluation.unlearncanvas import ua_ira_cra
    own, renamed = split_rows(rows)
    result = ua_ira_cra(own)
    out = {}
    for m in ("UA", "IRA", "CRA"):
        f = result[m]
        out[m] = f["value"]
        out[f"{m}_interval95"] = wilson_interval(f["successes"], f["n"])
        out[f"{m}_n"] = f["n"]
    if renamed:
        f = ua_ira_cra(renamed)["UA"]
        out.update(UA_heldout_name=f["value"], UA_heldout_name_interval95=wilson_interval(f["successes"], f["n"]),
                   UA_heldout_name_n=f["n"])
    out["object_accuracy"] = float(np.mean([r["object_pred"] == r["object"] for r in own]))
    out["style_accuracy"] = float(np.mean([r["style_pred"] == r["style"] for r in own]))
    return out


def run_demo(concept: str = DEFAULT_CONCEPT, method: str = "hirm_s", workdir: str | Path = "workdirs/demo",
             seeds_per_cell: int = 5, world_path: Optional[str] = None, backend: str = "torch") -> dict:
    from hirm_jax import world as w
    timings, t0 = {}, time.perf_counter()
    kind = concept_kind(concept)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)} but is {method!r}")
    workdir = Path(workdir)
    _log.info(f"[demo] loading the demo world ({world_path or 'shipped'})")
    world = w.load_world(world_path, backend=backend)
    timings["load_world_s"] = time.perf_counter() - t0
    erase_dir, erased_folder = _erase_and_export(world, concept, method, workdir, timings)
    attacks = _attacks(world, concept, workdir, erased_folder, timings) if method == ROBUST else None

    grid = benchmark_grid(seeds_per_cell, synonyms_of=[concept])
    prompts, seeds = [r["prompt"] for r in grid], [r["seed"] for r in grid]
    _log.info(f"[demo] generating {len(grid)} images with the original encoder")
    t = time.perf_counter()
    original = w.generate(world, None, prompts, seeds)
    _log.info(f"[demo] generating {len(grid)} images with the erased encoder (loaded from {erased_folder})")
    erased = w.generate(world, str(erased_folder), prompts, seeds)
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    before = figures(judged_rows(world, original, grid, [concept]))
    after = figures(judged_rows(world, erased, grid, [concept]))
    timings["classify_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report = dict(
        concept=concept, kind=kind, method=method, UA=after["UA"], UA_heldout_name=after["UA_heldout_name"],
        IRA=after["IRA"], CRA=after["CRA"], heldout_name=w.heldout_name(concept), erased_names=list(w.trained_names(concept)),
        after=after, before=before,
        relative_to_before={m: (after[m] / before[m] if before[m] else None) for m in ("IRA", "CRA")},
        n_images=len(grid), seeds_per_cell=seeds_per_cell, first_seed=FIRST_EVAL_SEED,
        templates=list(w.HELDOUT_TEMPLATES), world=str(world.path), world_sha256=world.config.get("sha256"),
        erase_workdir=str(erase_dir), erased_text_encoder=str(erased_folder), timings=timings,
        definitions=DEFINITIONS, provenance=provenance.provenance())
    if attacks is not None:
        report.update(ASR={name: a["ASR"] for name, a in attacks[ROBUST].items()},
                      attacks={m: {name: {k: v for k, v in a.items() if k != "images"} for name, a in by.items()}
                               for m, by in attacks.items()})
    write_json(workdir / "demo_report.json", report)
    _write_grid(workdir / "demo_grid.png", (original, erased, grid), concept, kind, attacks)
    print(format_table(report))
    _log.info(f"[demo] wrote {workdir / 'demo_report.json'} and {workdir / 'demo_grid.png'} in {timings['total_s']:.0f}s")
    return report


DEFINITIONS = dict(UA="share of images prompted with the concept that the judge no longer labels as it",
                   IRA="judge accuracy, on the erased concept's kind, over images prompted without it",
                   CRA="judge accuracy on the other kind over images prompted without the concept",
                   ASR="share of images from the token attack's prompts (searched against the erased encoder, "
                       "held-out templates) that the judge labels as the erased concept; 'control': the same "
                       "prompts through the original encoder")
DEMO_ATTACKS = ("gcg_k1", "gcg_k4")  # hirm_jax.world.attack_success.ATTACKS


def _attacks(world, concept: str, workdir: Path, robust_folder: Path, timings: dict) -> dict:
    """Robust mode: erase with plain HiRM-S too, then run the token attacks against both encoders
    and measure them on images -> {method: {attack: figures (with the images of its prompts)}}."""
    from hirm_jax import world as w
    from hirm_jax.world.attack_success import FIRST_ATTACK_SEED, measure_attacks
    _, plain_folder = _erase_and_export(world, concept, "hirm_s", workdir, timings, key="erase_plain_s")
    t = time.perf_counter()
    out = {}
    for method, folder in (("hirm_s", plain_folder), (ROBUST, robust_folder)):
        _log.info(f"[demo] token attacks {list(DEMO_ATTACKS)} against the {method} encoder")
        out[method] = measure_attacks(world, folder, concept, DEMO_ATTACKS)
        for figures in out[method].values():  # the grid shows each prompt's first measured image
            ids = [row["ids"] for row in figures["per_prompt"]]
            figures["images"] = w.generate(world, str(folder), ids, [FIRST_ATTACK_SEED] * len(ids))
    timings["attack_s"] = time.perf_counter() - t
    return out


def _erase_and_export(world, concept: str, method: str, workdir: Path, timings: dict,
                      key: str = "erase_s") -> tuple[Path, Path]:
    """Erase in JAX, then export the erased encoder (from memory) as a transformers folder."""
    from hirm_jax.artifacts.export import export_full
    from hirm_jax.run import train_and_evaluate
    _log.info(f"[demo] erasing {concept_kind(concept)} {concept!r} with {method} (JAX, block 0 only)")
    t = time.perf_counter()
    config = erase_config(world, concept, method, workdir)
    erase_dir = workdir / f"erase_{concept}_{method}"
    shutil.rmtree(erase_dir, ignore_errors=True)  # the demo always erases afresh
    result = train_and_evaluate(config, erase_dir, keep_trained=True)
    timings[key] = time.perf_counter() - t
    t = time.perf_counter()
    name = "erased_text_encoder" if key == "erase_s" else f"erased_text_encoder_{method}"
    erased_folder = export_full(result.erased_run(), workdir / name, overwrite=True)
    timings["export_s"] = time.perf_counter() - t
    return erase_dir, erased_folder


def format_table(report: dict) -> str:
    b, a = report["before"], report["after"]
    pct = lambda v: "–" if v is None else f"{100 * v:5.1f}%"
    lines = [f"HiRM demo: erase {report['kind']} {report['concept']!r} ({report['method']}), "
             f"{report['n_images']} images per encoder, held-out templates and seeds",
             "| metric | before | after |", "|---|---|---|"]
    for m in ("UA", "UA_heldout_name", "IRA", "CRA", "object_accuracy", "style_accuracy"):
        lines.append(f"| {m} | {pct(b[m])} | {pct(a[m])} |")
    for method, by_attack in report.get("attacks", {}).items():
        for name, f in by_attack.items():
            lines.append(f"| ASR {name} vs {method} (control: original encoder) | {pct(f['control'])} | {pct(f['ASR'])} |")
    return "\n".join(lines)


def _write_grid(path: Path, images: tuple, concept: str, kind: str, attacks: Optional[dict] = None) -> None:
    """Two rows (original, erased) for the concept, two for the concept called by its held-out
    synonym and two for a neighbour, one column per class of the other kind; same prompts and
    seeds in each pair of rows. With `attacks`, one row per
    attacked encoder and attack: the images of its adversarial prompts (one per column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hirm_jax import world as w
    original, erased, grid = images
    own, other = (w.OBJECTS, w.STYLES) if kind == "object" else (w.STYLES, w.OBJECTS)
    neighbour = next(c for c in own if c != concept)
    other_kind = "style" if kind == "object" else "object"
    first = lambda c, x, renamed=None: next(i for i, r in enumerate(grid) if r[kind] == c and r[other_kind] == x
                                            and r["renamed"] == renamed)
    rows = [(f"{label}\n{name}", [images[first(c, x, renamed)] for x in other])
            for label, c, renamed, pairs in (
                (concept, concept, None, (("original", original), ("erased", erased))),
                (f"'{w.heldout_name(concept)}'", concept, concept, (("original", original), ("erased", erased))),
                (neighbour, neighbour, None, (("original", original), ("erased", erased))))
            for name, images in pairs]
    for method, by_attack in (attacks or {}).items():
        rows += [(f"{name}\nvs {method}", list(a["images"][:len(other)])) for name, a in by_attack.items()]
    fig, axes = plt.subplots(len(rows), len(other), figsize=(1.3 * len(other), 1.45 * len(rows)), dpi=110)
    for r, (label, row_images) in enumerate(rows):
        for col in range(len(other)):
            ax = axes[r, col]
            ax.axis("off") if col >= len(row_images) else ax.imshow(row_images[col], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(other[col], fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    title = f"HiRM: {kind} '{concept}' erased (same prompts and seeds per column"
    fig.suptitle(title + ("; attack rows: one adversarial prompt per column)" if attacks else ")"), fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
