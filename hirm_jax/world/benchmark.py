"""`hirm-jax eval --suite=demo-world`: the demo world as a local UnlearnCanvas.

Erases each object and each style in turn with each method, generates the benchmark grid
(every object x style, held-out templates and seeds) with the erased encoder, judges it and
reports mean UA / IRA / CRA per kind (JSON + Markdown), and with `--attacks` the image-level
success of prompt attacks on each erased encoder (hirm_jax.world.attack_success: ASR, with the
original encoder as the control) and the erase seconds per concept:

    hirm_r          HiRM, random target (c = 500)
    hirm_s          HiRM, super-category target (the world's neutral anchor)
    early_block     "no decoupling": supervise block 0's own output (block_out:0), where it updates
    full_finetune   the same loss, every parameter of the encoder trained
    hirm_s_adv      robust HiRM-S (objective.adversarial: continuous inner attack), block 0 only
    full_finetune_adv  the same min-max loop with the whole encoder trained (AdvUnlearn-like)
    joint           several concepts erased into one encoder (first 3 objects, first 3 styles, all objects)
    averaged        the same groups by averaging the single-concept HiRM-S deltas (the paper's way)

Every method uses the demo's settings (`hirm_jax.world.demo.demo_config`, preservation term included);
Each concept is erased by its trained names; its held-out synonym is measured apart (UA held-out).
`--methods`, `--concepts` and `--seeds-per-cell` set a budget, and a run that does not cover
the full protocol is marked partial. The world and the arguments are checked before anything is
written, and --out may not equal, contain or lie inside the world folder (--world, default the
shipped one).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from hirm_jax import log
from hirm_jax.errors import UsageError
from hirm_jax.fileio import atomic_file, check_output_location, write_json

_log = log.get(__name__)
METHODS = ("hirm_r", "hirm_s", "early_block", "full_finetune", "joint", "averaged", "hirm_s_adv", "full_finetune_adv")
PAPER_METHODS = METHODS[:6]  # the full protocol without the robust methods
FULL_SEEDS_PER_CELL = 5


def _configure(config, method: str, preservation_weight=None):
    with config.unlocked():
        if preservation_weight is not None:
            config.preservation.weight = preservation_weight
        if method == "hirm_r":
            config.objective.name = "hirm_r"
        if method == "early_block":
            config.objective.hooks = ("block_out:0",)
        if method.startswith("full_finetune"):
            config.train.trainable_regex = ".*"
        config.objective.adversarial.enabled = method.endswith("_adv")
    return config


def _erase(world, concepts: list[str], method: str, out: Path, preservation_weight=None):
    """Erase `concepts` (jointly when several, all of one kind), each by its trained names;
    (exported encoder folder, the run in memory)."""
    from hirm_jax import world as w
    from hirm_jax.artifacts.export import export_full
    from hirm_jax.run import train_and_evaluate
    from hirm_jax.world.demo import erase_config
    config = _configure(erase_config(world, concepts[0], "hirm_s", out), method, preservation_weight)
    if len(concepts) > 1:
        (out / "retain_prompts.txt").write_text("\n".join(joint_retain(concepts)) + "\n")
        with config.unlocked():
            config.concepts = tuple(name for c in concepts for name in w.trained_names(c))
            config.super_categories = {name: w.super_category(c) for c in concepts for name in w.trained_names(c)}
    shutil.rmtree(out / "erase", ignore_errors=True)
    run = train_and_evaluate(config, out / "erase", keep_trained=True).erased_run()
    return export_full(run, out / "text_encoder", overwrite=True), run


def joint_retain(concepts) -> list[str]:
    """Retain prompts of a joint erasure: the first training template over every cell, anchors
    included, without the erased concepts (with all objects erased, the anchor's cells remain)."""
    from hirm_jax import world as w
    from hirm_jax.world.demo import retain_prompts
    return retain_prompts(concepts, w.ALL_OBJECTS, w.ALL_STYLES)


def _average(runs: list, out: Path) -> Path:
    """The encoder of the averaged single-concept deltas (runs in memory, one base)."""
    from hirm_jax.encoder.layouts import save_text_encoder
    from hirm_jax.report.compare import average_runs
    return save_text_encoder(runs[0].base, out / "text_encoder", params=average_runs(runs), overwrite=True)


def _judge(world, encoder_folder, grid, targets: list[str]) -> list[dict]:
    """Images of the grid from the encoder, judged, as rows for ua_ira_cra (one set per target);
    of the held-out-synonym rows only the targets' own are drawn."""
    from hirm_jax import world as w
    from hirm_jax.world.demo import judged_rows
    grid = [r for r in grid if r["renamed"] in (None, *targets)]
    images = w.generate(world, str(encoder_folder), [r["prompt"] for r in grid], [r["seed"] for r in grid])
    return judged_rows(world, images, grid, targets)


@dataclasses.dataclass(frozen=True)
class _Bench:
    world: object
    grid: list
    concepts: list
    out_dir: Path
    preservation_weight: object
    single: dict  # concept -> its HiRM-S run, in memory (for `averaged`)
    attacks: tuple = ()  # hirm_jax.world.attack_success.ATTACKS names
    attack_seeds: int = 1
    measured: dict = dataclasses.field(default_factory=dict)  # method -> {"attacks": {...}, "erase_seconds": [...]}


def run_benchmark(out_dir: str | Path, methods: Sequence[str] = PAPER_METHODS, concepts: Sequence[str] = (),
                  seeds_per_cell: int = 2, world=None, preservation_weight=None, attacks: Sequence[str] = (),
                  attack_seeds: int = 1) -> dict:
    """`world`: a world folder or a loaded World (default: the shipped one, pictures by torch).
    `preservation_weight` overrides the demo's (10); 0 gives the methods as the paper has them.
    `attacks` (attack_success.ATTACKS names) are run `attack_seeds` times on every single-concept erasure."""
    from hirm_jax import provenance
    from hirm_jax import world as w
    from hirm_jax.world.data import concept_kind
    from hirm_jax.world.demo import benchmark_grid, figures, judged_rows
    out_dir = Path(out_dir)
    check_output_location(out_dir, {"--world": world.path if isinstance(world, w.World) else world or w.SHIPPED})
    concepts = list(concepts) or list(w.OBJECTS + w.STYLES)
    _check_arguments(concepts, methods, seeds_per_cell, attacks)
    if not isinstance(world, w.World):
        world = w.load_world(world)  # every file checked before anything is written
    bench = _Bench(world, benchmark_grid(seeds_per_cell, synonyms_of=concepts), concepts, out_dir, preservation_weight, {}, tuple(attacks),
                   attack_seeds)
    t0 = time.perf_counter()
    original = w.generate(world, None, [r["prompt"] for r in bench.grid], [r["seed"] for r in bench.grid])
    before = {c: figures(judged_rows(world, original, bench.grid, [c])) for c in concepts}
    results = {}
    order = [m for m in methods if m != "averaged"]  # averaged needs the single-concept HiRM-S runs first
    if "averaged" in methods:
        order = (["hirm_s"] if "hirm_s" not in order else []) + order + ["averaged"]
    for method in order:
        _log.info(f"[demo-world] method {method}")
        rows = _method_rows(bench, method)
        if method in methods:
            results[method] = {**_per_kind(rows), **_attack_table(bench.measured.get(method, {}))}
    results = {m: results[m] for m in methods}
    partial = (seeds_per_cell < FULL_SEEDS_PER_CELL or set(concepts) != set(w.OBJECTS + w.STYLES)
               or not set(PAPER_METHODS) <= set(methods))
    report = dict(suite="demo-world", version="2.0", partial=partial, seeds_per_cell=seeds_per_cell, concepts=concepts,
                  preservation_weight=preservation_weight, attacks=list(attacks), attack_seeds=attack_seeds,
                  heldout_names={c: w.heldout_name(c) for c in concepts},
                  methods=results, before=_kinds({c: (concept_kind(c), f) for c, f in before.items()}),
                  seconds=time.perf_counter() - t0, world_sha256=world.config.get("sha256"), provenance=provenance.provenance())
    write_json(out_dir / "results.json", report)
    with atomic_file(out_dir / "results.md") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


def _method_rows(bench: _Bench, method: str) -> list[dict]:
    """Judged rows of one method: each concept alone (attacked with bench.attacks), or (joint,
    averaged) the joint_groups, each row tagged with its group."""
    from hirm_jax.world.attack_success import measure_attacks
    rows = []
    if method not in ("joint", "averaged"):
        for c in bench.concepts:
            folder = bench.out_dir / method / c
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            encoder, run = _erase(bench.world, [c], method, folder, bench.preservation_weight)
            measured = bench.measured.setdefault(method, {"attacks": {}, "erase_seconds": []})
            measured["erase_seconds"].append(time.perf_counter() - t)
            if method == "hirm_s":
                bench.single[c] = run
            rows += _judge(bench.world, encoder, bench.grid, [c])
            for seed in range(bench.attack_seeds if bench.attacks else 0):
                _log.info(f"[demo-world] attacks {list(bench.attacks)} on {method} {c!r}, seed {seed}")
                for name, figures in measure_attacks(bench.world, encoder, c, bench.attacks, seed).items():
                    measured["attacks"].setdefault(name, []).append(figures)
        return rows
    for group in joint_groups(bench.concepts):
        folder = bench.out_dir / method / "_".join(group)
        folder.mkdir(parents=True, exist_ok=True)
        if method == "joint":
            encoder, _ = _erase(bench.world, group, "hirm_s", folder, bench.preservation_weight)
        else:
            encoder = _average([bench.single[c] for c in group], folder)
        rows += [dict(r, group="+".join(group)) for r in _judge(bench.world, encoder, bench.grid, group)]
    return rows


def joint_groups(concepts) -> list[tuple]:
    """The groups `joint` and `averaged` erase together: the first 3 objects, the first 3
    styles, and every object at once (each when it has more than one concept)."""
    from hirm_jax import world as w
    objects = tuple(c for c in concepts if c in w.OBJECTS)
    styles = tuple(c for c in concepts if c in w.STYLES)
    groups = [objects[:3], styles[:3]] + ([objects] if len(objects) > 3 else [])
    return [g for g in groups if len(g) > 1]


def _attack_table(measured: dict) -> dict:
    """Per attack: ASR and control pooled over the concepts' images (Wilson 95% intervals), the
    text-space success, per concept; and the erase seconds per concept."""
    from hirm_jax.evaluation.metrics import wilson_interval
    if not measured:
        return {}
    table = {}
    for name, runs in measured["attacks"].items():
        hits = {k: sum(round(f[k] * f["images"]) for f in runs) for k in ("ASR", "control")}
        n = sum(f["images"] for f in runs)
        table[name] = dict(ASR=hits["ASR"] / n, ASR_interval95=wilson_interval(hits["ASR"], n),
                           control=hits["control"] / n, control_interval95=wilson_interval(hits["control"], n),
                           images=n, text_success=float(np.mean([f["text_success"] for f in runs])),
                           mean_cos=float(np.mean([f["mean_cos"] for f in runs])),
                           per_concept={f"{f['concept']}#{i}": f["ASR"] for i, f in enumerate(runs)})
    seconds = measured["erase_seconds"]
    return dict(attacks=table, erase_seconds_per_concept=float(np.mean(seconds)) if seconds else None)


def _check_arguments(concepts: Sequence[str], methods: Sequence[str], seeds_per_cell: int, attacks=()) -> None:
    """Concepts are the world's objects and styles, methods are METHODS, seeds_per_cell >= 1,
    attacks are the world's."""
    from hirm_jax.world.attack_success import ATTACKS
    unknown_attacks = [a for a in attacks if a not in ATTACKS]
    if unknown_attacks:
        raise UsageError(f"--attacks {unknown_attacks} are not world attacks; choose among {list(ATTACKS)}")
    from hirm_jax import world as w
    unknown = [c for c in concepts if c not in w.OBJECTS + w.STYLES]
    if unknown:
        raise UsageError(f"--concepts {unknown} are not concepts of the demo world; choose among the objects "
                         f"{list(w.OBJECTS)} and the styles {list(w.STYLES)}")
    bad_methods = [m for m in methods if m not in METHODS]
    if bad_methods:
        raise UsageError(f"--methods {bad_methods} are not benchmark methods; choose among {list(METHODS)}")
    if seeds_per_cell < 1:
        raise UsageError(f"--seeds-per-cell must be at least 1 but is {seeds_per_cell}")


KIND_METRICS = ("UA", "UA_heldout_name", "IRA", "CRA")


def _per_kind(rows: list[dict]) -> dict:
    """Per target figures (demo.figures; a target erased in several joint groups counts once per
    group, as "group:target") and, per kind, their mean with the 95% interval of the pooled images."""
    from hirm_jax.world.demo import figures
    keys = sorted({(r.get("group"), r["target"], r["target_kind"]) for r in rows}, key=str)
    return _kinds({(f"{g}:{t}" if g else t): (kind, figures([r for r in rows if r.get("group") == g and r["target"] == t]))
                   for g, t, kind in keys})


def _kinds(per_target: dict) -> dict:
    """per_target: {key: (kind, figures)} -> {kind: {metric: mean over the kind's targets,
    metric_interval95: Wilson interval of the pooled counts}, "per_target": {key: {metric: value}}}."""
    from hirm_jax.evaluation.metrics import wilson_interval
    table = {}
    for kind in ("object", "style"):
        figs = [f for k, f in per_target.values() if k == kind]
        table[kind] = {}
        for m in KIND_METRICS:
            counted = [f for f in figs if f.get(m) is not None]
            n = sum(f[f"{m}_n"] for f in counted)
            hits = sum(round(f[m] * f[f"{m}_n"]) for f in counted)
            table[kind][m] = float(np.mean([f[m] for f in counted])) if counted else None
            table[kind][f"{m}_interval95"] = wilson_interval(hits, n) if n else None
    table["per_target"] = {t: {m: f.get(m) for m in KIND_METRICS} for t, (_, f) in per_target.items()}
    return table


def markdown(report: dict) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"
    weight = report.get("preservation_weight")
    lines = [f"Demo-world benchmark ({'partial: ' if report['partial'] else ''}{len(report['concepts'])} concepts, "
             f"{report['seeds_per_cell']} seeds per cell, preservation weight "
             f"{'10 (demo default)' if weight is None else weight}), mean over erased concepts, %", "",
             "UA held-out: UA on the concept's held-out synonym, a name no erasure prompt used. "
             "In brackets: 95% interval of the pooled images.", "",
             "| method | " + " | ".join(f"{k} {m.replace('_heldout_name', ' held-out')}" for k in ("object", "style")
                                      for m in KIND_METRICS) + " |", "|---|" + "---|" * 2 * len(KIND_METRICS)]
    rows = [("before erasure", report["before"])] + list(report["methods"].items())
    cell = lambda f, m: (pct(f[m]) + (f" ({pct(f[m + '_interval95'][0])}-{pct(f[m + '_interval95'][1])})"
                                      if f.get(m + "_interval95") else ""))
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(cell(r[k], m) for k in ("object", "style") for m in KIND_METRICS) + " |")
    attacks = report.get("attacks") or []
    if attacks:
        lines += ["", f"Attack success on images, % (95% interval), control = the same prompts through the original "
                      f"encoder; {report.get('attack_seeds', 1)} attack seed(s) per concept", "",
                  "| method | " + " | ".join(f"{a} ASR | {a} control" for a in attacks) + " | erase s per concept |",
                  "|---|" + "---|---|" * len(attacks) + "---|"]
        for name, r in report["methods"].items():
            if "attacks" not in r:
                continue
            cells = [(f"{pct(a['ASR'])} ({pct(a['ASR_interval95'][0])}-{pct(a['ASR_interval95'][1])})", pct(a["control"]))
                     for a in (r["attacks"][x] for x in attacks)]
            lines.append(f"| {name} | " + " | ".join(f"{c[0]} | {c[1]}" for c in cells)
                         + f" | {r['erase_seconds_per_concept']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    from hirm_jax import world as w
    parser = argparse.ArgumentParser(prog="hirm-jax eval --suite=demo-world", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="demo-world")
    parser.add_argument("--out", default="workdirs/demo-world")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), choices=METHODS)
    parser.add_argument("--concepts", nargs="*", default=[])
    parser.add_argument("--seeds-per-cell", type=int, default=FULL_SEEDS_PER_CELL)
    parser.add_argument("--world")
    parser.add_argument("--preservation-weight", type=float, help="override the demo's 10 (0: the paper's methods)")
    parser.add_argument("--attacks", nargs="*", default=[], help="world prompt attacks: gcg_k1 gcg_k4 continuous probe")
    parser.add_argument("--attack-seeds", type=int, default=1)
    parser.add_argument("--backend", default="torch", choices=w.BACKENDS,
                        help="how pictures are drawn: torch (diffusers) or jax (Flax UNet; another noise stream)")
    args = parser.parse_args(argv)
    check_output_location(args.out, {"--world": args.world or w.SHIPPED})  # before the world is read
    world = w.load_world(args.world, backend=args.backend)
    run_benchmark(args.out, args.methods, args.concepts, args.seeds_per_cell, world, args.preservation_weight,
                  args.attacks, args.attack_seeds)
    return 0
