"""Evaluation results: one JSON (schema below), a Markdown table printed from it, and a PNG grid.

results.json (sorted, indented):
    schema, schema_version, suite {name, version, spec_sha256}, partial, budget {limit, images_per_prompt},
    n_images, images [{dir, manifest_sha256, generation: {pipeline, fingerprints, settings}}],
    original (same, or null), metrics [{name, value, interval, interval_method, n, higher_is_better,
    unit, description}], settings (thresholds, classes, classifier/detector versions and hashes),
    tables {name: [rows]}, notes, provenance {hirm_jax_version, git_hash, package_versions}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from hirm_jax.fileio import atomic_file, write_json

SCHEMA = "hirm_jax.eval_results"
SCHEMA_VERSION = 1
RESULTS_JSON, RESULTS_MD, GRID_PNG = "results.json", "results.md", "grid.png"


def _format(value, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if unit == "fraction" else f"{value:.4g}"


def markdown(results: dict) -> str:
    """The metrics table (and small tables) of a results.json, as Markdown."""
    suite = results["suite"]
    lines = [f"## {suite['name']} (suite version {suite['version']})" + (" - PARTIAL" if results["partial"] else ""),
             "", "| metric | value | 95% interval | n | better |", "|---|---|---|---|---|"]
    for m in results["metrics"]:
        interval = ("[" + ", ".join(_format(v, m["unit"]) for v in m["interval"]) + f"] ({m['interval_method']})"
                    if m["interval"] else "n/a")
        lines.append(f"| {m['name']} | {_format(m['value'], m['unit'])} | {interval} | {m['n']} | "
                     f"{'higher' if m['higher_is_better'] else 'lower'} |")
    for name, rows in sorted(results.get("tables", {}).items()):
        if not rows or len(rows) > 50:
            continue
        keys = list(rows[0])
        lines += ["", f"### {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    if results.get("settings"):
        lines += ["", "Settings: `" + json.dumps(results["settings"], sort_keys=True) + "`"]
    lines += ["", f"{results['n_images']} images; hirm_jax {results['provenance']['hirm_jax_version']} "
              f"(git {results['provenance']['git_hash']})"]
    lines += [f"- {note}" for note in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def comparison_grid(pairs: Sequence[tuple[Path, Path, str]], out_path: Path, cell: int = 256) -> Path:
    """A PNG with one row per pair: original | erased, same prompt and seed, captioned."""
    from PIL import Image, ImageDraw
    caption_h = 28
    grid = Image.new("RGB", (2 * cell, len(pairs) * (cell + caption_h) + 20), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "original", fill="black")
    draw.text((cell + 4, 4), "erased", fill="black")
    for i, (original, erased, caption) in enumerate(pairs):
        top = 20 + i * (cell + caption_h)
        for j, path in enumerate((original, erased)):
            grid.paste(Image.open(path).convert("RGB").resize((cell, cell)), (j * cell, top))
        draw.text((4, top + cell + 4), caption[:2 * cell // 6], fill="black")
    with atomic_file(out_path, "wb") as f:
        grid.save(f, format="PNG")
    return out_path


def write_results(out_dir: Path, results: dict, pairs: Sequence[tuple[Path, Path, str]] = ()) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / RESULTS_JSON, "markdown": out_dir / RESULTS_MD}
    write_json(paths["json"], results)
    with atomic_file(paths["markdown"]) as f:
        f.write(markdown(results))
    if pairs:
        paths["grid"] = comparison_grid(pairs, out_dir / GRID_PNG)
    return paths
