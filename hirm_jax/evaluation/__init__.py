"""`hirm-jax eval`: evaluation suites over generated images, results with provenance and uncertainty.

    hirm-jax eval --suite=nudity --images=imgs/erased --original=imgs/sd14 [--out=eval/] [--option threshold=0.6]
    hirm-jax eval --suite=unlearncanvas --pipeline=uc-sd15 --delta=deltas/van_gogh --out=eval/vg \
        --option style_classifier=style.pth --option object_classifier=object.pth --option allow_pickle=true
    hirm-jax eval --list

With --pipeline the suite's prompts are generated first (erased into OUT/erased, and the
original pipeline into OUT/original for the comparison grid and FID), then evaluated.
`--limit=N` (first N prompts) and `--images-per-prompt=K` evaluate a budget; such results
are marked partial, as are results over a folder generated from the suite's prompts
(`generate --suite`) that holds fewer images than the suite's protocol.
Writes OUT/results.json, OUT/results.md and OUT/grid.png (original vs erased, same prompt and seed).

Inputs are checked before anything is written: a missing --images / --original / --pipeline
says "does not exist", and --out may not equal, contain or lie inside any of them (nor a
--delta or --denoiser). A new OUT appears only complete: a failing suite leaves no folder.
The default OUT is a sibling of the first --images folder, IMAGES-eval-SUITE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from hirm_jax import log
from hirm_jax.evaluation.suites import (SUITES_DIR, EvalContext, Suite, SuiteError, SuiteResult, check_options,
                                        get_suite, list_suites, parse_options, register_suite, sha256_of)

_log = log.get(__name__)

__all__ = ["main", "evaluate", "load_records", "register_suite", "get_suite", "EvalContext", "SuiteResult",
           "SuiteError"]


def load_records(images_dir: str | Path, limit: Optional[int] = None, images_per_prompt: Optional[int] = None,
                 flag: str = "--images") -> list[dict]:
    """Manifest records of an images folder (with absolute "path" and "images_dir"), within a budget."""
    from hirm_jax.errors import InputMissingError
    from hirm_jax.pipelines.generate import read_manifest
    images_dir = Path(images_dir)
    records = read_manifest(images_dir, flag)
    if images_per_prompt is not None:
        records = [r for r in records if r["sample"] < images_per_prompt]
    if limit is not None:
        ids = list(dict.fromkeys(r["id"] for r in records))[:limit]
        keep = set(ids)
        records = [r for r in records if r["id"] in keep]
    for r in records:
        r["images_dir"] = str(images_dir)
        r["path"] = str((images_dir / r["file"]).resolve())
        if not Path(r["path"]).is_file():
            raise InputMissingError(f"{flag} {images_dir}: its manifest.jsonl lists {r['file']}, which does not exist")
    return records


def _is_partial(suite: Suite, records: list[dict], budget: dict) -> bool:
    """True under a budget, or when a folder generated from this suite's prompts holds fewer images than
    the suite's protocol (its prompts, with the options recorded at generation, times images_per_prompt)."""
    from hirm_jax.pipelines.generate import GENERATION
    if budget["limit"] is not None or budget["images_per_prompt"] is not None:
        return True
    by_dir: dict[str, int] = {}
    for r in records:
        by_dir[r["images_dir"]] = by_dir.get(r["images_dir"], 0) + 1
    for images_dir, count in by_dir.items():
        path = Path(images_dir) / GENERATION
        made_from = json.loads(path.read_text()).get("suite") if path.is_file() else None
        if not made_from or made_from.get("name") != suite.name or suite.prompts is None:
            continue  # the user's own prompt file: its size is the protocol
        expected = len(suite.prompt_rows(made_from.get("options", {}))) * suite.spec.get("images_per_prompt", 1)
        if count < expected:
            return True
    return False


def _generation_info(images_dir: Path) -> dict:
    from hirm_jax.pipelines.generate import GENERATION, MANIFEST
    info = {"dir": str(images_dir), "manifest_sha256": sha256_of(images_dir / MANIFEST)}
    if (images_dir / GENERATION).is_file():
        generation = json.loads((images_dir / GENERATION).read_text())
        info["generation"] = {k: generation.get(k) for k in ("pipeline", "pipeline_source", "pipeline_class",
                                                             "fingerprints", "settings")}
    return info


def image_inputs(images: Sequence[str | Path], original: Optional[str | Path]) -> list[tuple[str, Optional[str | Path]]]:
    """The (flag, path) pairs of the image folders an evaluation reads."""
    return [*(("--images", d) for d in images), ("--original", original)]


@contextlib.contextmanager
def _results_folder(out: Path) -> Iterator[Path]:
    """Where results are written. A new `out` is built in a hidden sibling and appears only complete
    (fileio.atomic_dir: a failing suite leaves nothing); an existing folder (a rerun, or the folder of
    `eval --pipeline` that holds the generated images) keeps its other files, each result file
    being replaced atomically."""
    if out.is_dir():
        yield out
        return
    from hirm_jax.fileio import atomic_dir
    with atomic_dir(out) as staging:
        yield staging


def evaluate(suite_name: str, images: Sequence[str | Path], out: str | Path, *, original: Optional[str | Path] = None,
             options: Optional[dict] = None, limit: Optional[int] = None,
             images_per_prompt: Optional[int] = None, inputs: Optional[Sequence[tuple]] = None) -> dict:
    """Run a suite over generated images and write results.json / results.md / grid.png to `out`.

    Every input is checked before `out` is touched. inputs: the (flag, path) pairs `out` may not
    equal, contain or lie inside (default: `images` and `original`; `eval --pipeline`, whose
    images are generated into `out`, passes the pipeline, deltas and denoiser instead)."""
    from hirm_jax.fileio import check_output_location, require_inputs
    suite = get_suite(suite_name)
    options = dict(options or {})
    check_options(suite, options)
    out = Path(out)
    require_inputs(image_inputs(images, original))
    check_output_location(out, image_inputs(images, original) if inputs is None else inputs)
    records = [r for d in images for r in load_records(d, limit, images_per_prompt)]
    if not records:
        raise SuiteError(f"no images to evaluate in {list(map(str, images))} (after --limit/--images-per-prompt)")
    original_records = None
    if original is not None:
        by_key = {(r["id"], r["sample"]): r for r in load_records(original, flag="--original")}
        original_records = []
        for r in records:
            match = by_key.get((r["id"], r["sample"]))
            if match is None or match["seed"] != r["seed"]:
                raise SuiteError(f"--original={original} has no image of prompt {r['id']!r} sample {r['sample']} with "
                                 f"seed {r['seed']}; generate both with the same prompts and --seed")
            original_records.append(match)
    with _results_folder(out) as folder:
        return _run_suite(suite, images, original, records, original_records, options,
                          {"limit": limit, "images_per_prompt": images_per_prompt}, folder)


def _run_suite(suite: Suite, images, original, records: list[dict], original_records: Optional[list[dict]],
               options: dict, budget: dict, out: Path) -> dict:
    """Run the suite's runner over checked records and write its results into `out`.
    budget: {"limit": N or None, "images_per_prompt": K or None}."""
    from hirm_jax.evaluation.results import SCHEMA, SCHEMA_VERSION, write_results
    from hirm_jax.provenance import provenance
    partial = _is_partial(suite, records, budget)
    result = suite.runner(EvalContext(suite, records, original_records, options, out, partial))
    spec_path = SUITES_DIR / f"{suite.name}.json"
    results = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "suite": {"name": suite.name, "version": suite.version,
                  "spec_sha256": sha256_of(spec_path) if spec_path.is_file() else None,
                  "metric_definitions": suite.metric_definitions()},
        "partial": partial, "budget": budget, "options": options, "n_images": len(records),
        "images": [_generation_info(Path(d)) for d in images],
        "original": _generation_info(Path(original)) if original is not None else None,
        "metrics": [m.to_json() for m in result.metrics], "settings": result.settings, "tables": result.tables,
        "notes": result.notes, "provenance": provenance(),
    }
    pairs = []
    if original_records:
        step = max(1, len(records) // 8)
        pairs = [(Path(o["path"]), Path(r["path"]), f"{r['prompt']} (seed {r['seed']})")
                 for o, r in list(zip(original_records, records))[::step][:8]]
    write_results(out, results, pairs)
    return results


def main(argv: Sequence[str]) -> int:
    from hirm_jax.pipelines.generate import add_generation_arguments
    parser = argparse.ArgumentParser(prog="hirm-jax eval", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", help="suite name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the registered suites and their versions")
    parser.add_argument("--images", action="append", default=[], help="folder written by `hirm-jax generate` (repeatable)")
    parser.add_argument("--original", help="the original pipeline's images of the same prompts and seeds")
    parser.add_argument("--out", help="results folder (default: IMAGES-eval-SUITE, beside the first --images)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="suite option")
    parser.add_argument("--limit", type=int, help="evaluate only the first N prompts (partial result)")
    parser.add_argument("--images-per-prompt", type=int, help="use only the first K images of each prompt (partial)")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the Markdown table")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    if args.list:
        print(json.dumps(list_suites(), indent=2))
        return 0
    if not args.suite or bool(args.images) == bool(args.pipeline):
        parser.error("eval needs --suite=NAME and either --images=DIR or --pipeline=DIR (generate, then evaluate)")
    suite = get_suite(args.suite)
    options = parse_options(args.option)
    images, original, inputs = args.images, args.original, None
    if args.pipeline:
        if not args.out:
            parser.error("eval --pipeline needs --out=DIR")
        out = Path(args.out)
        inputs = _generate_suite_images(args, suite, options, out)
        from hirm_jax.pipelines.generate import distributed_state
        if not distributed_state().is_main_process:  # under accelerate launch, process 0 evaluates
            return 0
        images, original = [str(out / "erased")], str(out / "original")
    else:
        out = Path(args.out) if args.out else default_out(images[0], suite.name)
    results = evaluate(args.suite, images, out, original=original, options=options, limit=args.limit,
                       images_per_prompt=args.images_per_prompt, inputs=inputs)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        from hirm_jax.evaluation.results import markdown
        print(markdown(results), end="")
    _log.info(f"results: {out / 'results.json'}")
    return 0


def default_out(images_dir: str | Path, suite_name: str) -> Path:
    """IMAGES-eval-SUITE beside the images folder (not inside it: an output may not lie inside an input)."""
    images_dir = Path(os.path.abspath(images_dir))
    return images_dir.with_name(f"{images_dir.name}-eval-{suite_name}")


def _generate_suite_images(args: argparse.Namespace, suite: Suite, options: dict, out: Path) -> list[tuple]:
    """`eval --pipeline`: the suite's prompts generated into OUT/erased (with the deltas and denoiser
    weights) and OUT/original; the inputs are checked (and OUT against them) before anything is
    written. Returns the (flag, path) inputs OUT may not equal, contain or lie inside."""
    from hirm_jax.fileio import check_output_location, require_inputs
    from hirm_jax.pipelines.generate import generate, generation_kwargs, pipeline_inputs, resolve_pipeline
    source = resolve_pipeline(args.pipeline)
    inputs = pipeline_inputs(source.path, args.delta, args.denoiser)
    require_inputs(inputs)
    check_output_location(out, inputs)
    rows = suite.prompt_rows(options)[:args.limit] if args.limit else suite.prompt_rows(options)
    kwargs = generation_kwargs(args, suite.generation_defaults())
    if args.images_per_prompt:
        kwargs["images_per_prompt"] = args.images_per_prompt
    extra = {"suite": {"name": suite.name, "version": suite.version, "options": options}}
    generate(source, rows, out / "erased", deltas=args.delta, denoiser=args.denoiser, allow_pickle=args.allow_pickle,
             extra=extra, **kwargs)
    generate(source, rows, out / "original", extra=extra, **kwargs)
    return inputs
