"""The `hirm-jax` command: thin wrappers over importable functions.

    hirm-jax erase  --config=sd14_style:hirm_s --workdir=DIR [--config.field=value ...]
    hirm-jax export --workdir=DIR --out=OUT [--format=full|delta|pipeline] [--pipeline=PIPE]
    hirm-jax apply  --delta=D --base=PIPELINE_OR_ENCODER --out=OUT [--check]
    hirm-jax report --workdir=DIR [--out=OUT]      text-space report (also written by erase)
    hirm-jax attack --erased=DIR --concept=NAME --out=OUT [--attack=gcg|continuous|probe]
                                                   prompts that bring an erased concept back
    hirm-jax compare --joint=DIR --independent=DIR --out=OUT   joint erasure vs averaged deltas
    hirm-jax demo [--concept NAME] [--method hirm_s|hirm_r|hirm_s_adv] [--workdir DIR]
    hirm-jax world train --out DIR                 rebuild the demo world (seeded)
    hirm-jax generate --pipeline=DIR [--delta=D ...] --prompts=FILE --out=DIR
        (several processes: accelerate launch --num_processes=8 -m hirm_jax.cli generate ...)
    hirm-jax eval --suite=NAME --images=DIR [--out=DIR] | --list

Progress and messages go to stderr. A bad input exits with status 2 and one line that names
the value and the rule; a machine that refuses a write (disk full, read-only) exits with 3.
`hirm-jax --debug COMMAND ...` (or HIRM_JAX_DEBUG=1) shows the traceback as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from hirm_jax import log
from hirm_jax.errors import HirmError, OutputError, UsageError, report
from hirm_jax.fileio import check_output_location

USAGE = __doc__


def enable_compilation_cache() -> None:
    """Persistent XLA cache, so a second run with the same shapes does not compile again.
    HIRM_JAX_CACHE_DIR overrides the location; set it to "off" to disable."""
    import jax
    location = os.environ.get("HIRM_JAX_CACHE_DIR", str(Path.home() / ".cache" / "hirm_jax" / "xla"))
    if location != "off":
        jax.config.update("jax_compilation_cache_dir", location)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def convert_main(argv: Optional[Sequence[str]], description: str, save: Callable, src_help: str,
                 out_help: str) -> int:
    """The body of convert/to_flax.py and convert/to_torch.py: load any layout, save with `save`
    (encoder, out, overwrite=) -> folder. Exit 2 with a message on bad input, nothing written."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--component", default=None, help="text_encoder or text_encoder_2 (pipelines, SDXL files)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin (runs the unpickler)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    log.install_handler()
    from hirm_jax.encoder.layouts import load_text_encoder
    try:
        if Path(args.out).exists() and not args.overwrite:  # before the (slow) load, not after
            raise OutputError(f"output folder {args.out} already exists; choose another, remove it, or pass "
                              "--overwrite to replace it (the old folder is kept until the new one is complete)")
        encoder = load_text_encoder(args.src, args.component, allow_pickle=args.allow_pickle)
        out = save(encoder, args.out, overwrite=args.overwrite, inputs={"--src": args.src})
    except Exception as e:  # noqa: BLE001  (user errors get one line; bugs keep their traceback)
        return report(e)
    print(out)
    return 0


def erase_main(argv: Sequence[str]) -> int:
    """`hirm-jax erase --config=FILE_OR_NAME[:ARG] --workdir=DIR [--config.field=value ...]`.

    --config names a config file, or a shipped config by name from any folder
    (`--config=sd14_style:hirm_s`; config_lib.resolve_config_argument has the rule)."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    full_argv = ["hirm-jax erase", *_with_resolved_config(argv)]
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Erase config: a file or a shipped name, e.g. sd14_style:hirm_s", flag_values=flag_values,
        sys_argv=full_argv)
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder (resumed when it exists).", flag_values=flag_values)
    try:
        flag_values(full_argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise _flag_error(e, argv) from e
    if config_flag.value is None or not workdir_flag.value:
        raise UsageError("erase needs --config=FILE[:ARG] and --workdir=DIR")
    enable_compilation_cache()
    from hirm_jax.run import train_and_evaluate
    summary = train_and_evaluate(config_flag.value, workdir_flag.value)
    print(os.path.abspath(workdir_flag.value))
    return 0 if summary["status"] == "done" else 1


def _with_resolved_config(argv: Sequence[str]) -> list[str]:
    """argv with the value of --config (`--config=V` or `--config V`) resolved to a file and
    moved first (ml_collections refuses --config.field=value before --config)."""
    from hirm_jax.config_lib import resolve_config_argument
    config, rest, argv = [], [], list(argv)
    while argv:
        arg = argv.pop(0)
        flag, equals, value = arg.partition("=")
        if not (flag.startswith("-") and flag.lstrip("-") == "config"):
            rest.append(arg)
        elif equals:
            config.append(f"{flag}={resolve_config_argument(value)}")
        else:
            config.append(flag)
            if argv:
                config.append(resolve_config_argument(argv.pop(0)))
    return config + rest


def _flag_error(error: Exception, argv: Sequence[str]) -> Exception:
    """One readable line for a command-line error of erase.

    ml_collections reports an unknown field as KeyError("'epoch'\\nDid you mean ...") (nested
    in AttributeError for nested fields), which prints as an escaped repr; and re-raises an
    error of a config file's get_config with the traceback pasted into the message."""
    raised_in_config = [e for e in _context_chain(error) if isinstance(e, HirmError)]
    if raised_in_config:  # by the config file's get_config: the innermost one is the original
        return raised_in_config[-1]
    inner = error
    while isinstance(inner, AttributeError) and inner.args and isinstance(inner.args[0], KeyError):
        inner = inner.args[0]
    if not isinstance(inner, KeyError):
        return UsageError(f"erase: {error}")
    text = str(inner.args[0]) if inner.args else ""
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    flag = next((a.partition("=")[0] for a in argv if a.startswith("--config.")
                 and key in a.partition("=")[0].split(".")), "--config")
    hint = f"; {hint.strip()[:1].lower()}{hint.strip()[1:]}" if hint.strip() else ""
    return UsageError(f"erase: {flag}: the config has no field {key!r}{hint} (fields and their rules: "
                      "hirm_jax/config_lib.py)")


def _context_chain(error: BaseException) -> list[BaseException]:
    """error, the exception it was raised while handling, and so on."""
    chain = [error]
    while chain[-1].__context__ is not None and chain[-1].__context__ not in chain:
        chain.append(chain[-1].__context__)
    return chain


def export_main(argv: Sequence[str]) -> int:
    from hirm_jax.artifacts import export
    parser = argparse.ArgumentParser(prog="hirm-jax export", description="Export an erased encoder from a workdir.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", choices=("full", "delta", "pipeline"), default="delta")
    parser.add_argument("--pipeline", help="diffusers pipeline folder (for --format=pipeline)")
    parser.add_argument("--component", help="pipeline component to replace (default: the one trained)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.format == "pipeline" and not args.pipeline:
        raise UsageError("--format=pipeline needs --pipeline=DIR (the base diffusers pipeline folder)")
    if args.format == "full":
        out = export.export_full(args.workdir, args.out, overwrite=args.overwrite)
    elif args.format == "delta" and (Path(args.workdir) / "index.json").is_file():
        out = export.export_batch_deltas(args.workdir, args.out, overwrite=args.overwrite)
    elif args.format == "delta":
        out = export.export_delta(args.workdir, args.out, overwrite=args.overwrite)
    else:
        out = export.export_pipeline(args.workdir, args.pipeline, args.out, component=args.component,
                                     overwrite=args.overwrite)
    print(out)
    return 0


def apply_main(argv: Sequence[str]) -> int:
    from hirm_jax.artifacts import delta
    parser = argparse.ArgumentParser(prog="hirm-jax apply", description="Apply a HiRM delta to a base pipeline or encoder folder.")
    parser.add_argument("--delta", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", help="output folder (not needed with --check)")
    parser.add_argument("--component", help="pipeline component to patch (default: the delta's)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--check", action="store_true", help="only verify the fingerprints; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        print(json.dumps(delta.check_delta(args.delta, args.base, component=args.component), indent=2, sort_keys=True))
        return 0
    if not args.out:
        raise UsageError("apply needs --out=DIR (or --check)")
    print(delta.apply_delta(args.delta, args.base, args.out, component=args.component, overwrite=args.overwrite))
    return 0


def report_main(argv: Sequence[str]) -> int:
    from hirm_jax.report import textreport
    parser = argparse.ArgumentParser(prog="hirm-jax report", description="Text-space report of an erase workdir.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", help="output folder (default: the workdir)")
    args = parser.parse_args(argv)
    textreport.report_for_run(args.workdir, args.out)
    print(args.out or args.workdir)
    return 0


def attack_main(argv: Sequence[str]) -> int:
    """`hirm-jax attack`: search prompts that make the erased encoder produce the original's
    representation of the concept (hirm_jax.attack.search); writes OUT/attacks.jsonl (text and
    token ids per prompt) and OUT/attack_summary.json."""
    from hirm_jax.attack import search
    parser = argparse.ArgumentParser(prog="hirm-jax attack", description=attack_main.__doc__.split("\n")[0])
    parser.add_argument("--erased", required=True, help="an erase workdir, or an erased encoder folder")
    parser.add_argument("--original", help="the original encoder folder or pipeline (default: the workdir's base)")
    parser.add_argument("--component", default=None, help="the encoder slot in a pipeline folder (text_encoder, ...)")
    parser.add_argument("--concept", action="append", default=[], help="a concept to bring back (repeatable)")
    parser.add_argument("--ban", action="append", default=[], metavar="CONCEPT=NAME,NAME",
                        help="further names (synonyms) whose tokens the search may not use")
    parser.add_argument("--template", action="append", default=[], help="prompt template with '{}' (default '{}')")
    parser.add_argument("--attack", default="gcg", choices=(*search.KINDS, "probe"))
    parser.add_argument("--probes", help="a file of prompts to score (--attack=probe)")
    defaults = search.AttackSettings()
    for name in ("k", "steps", "restarts", "top_k", "candidates", "prompts_per_search", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("learning_rate", "threshold"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--placement", default=defaults.placement, choices=search.PLACEMENTS)
    parser.add_argument("--hook", help="the representation the pipeline consumes, '+'-joined for several (default: "
                        "the original pipeline's, e.g. penultimate+text_embeds for SDXL's text_encoder_2; else final_ln)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    job = search.AttackJob(args.concept, tuple(args.template) or ("{}",), _bans(args.ban),
                           _probe_lines(args.probes) if args.attack == "probe" else ())
    erased, original, tokenizer, inputs, component = _attack_encoders(args)
    args.hook = args.hook or _pipeline_hook(inputs["--original"], component)
    settings = search.AttackSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(search.AttackSettings)
                                        if f.name != "kind"}, kind=args.attack if args.attack != "probe" else "gcg")
    settings.check(erased.config.vocab_size)
    check_output_location(args.out, inputs)
    results = search.run_attacks(erased, original, tokenizer, job, settings, args.attack)
    _write_attacks(results, Path(args.out), args.overwrite, inputs)
    print(json.dumps(search.summary(results), indent=2, sort_keys=True))
    return 0


def _pipeline_hook(original: Optional[str], component: Optional[str]) -> str:
    """The hook(s) the original's pipeline consumes from the attacked component; final_ln (SD 1.x,
    the demo world) for a plain encoder folder."""
    from hirm_jax.attack import search
    from hirm_jax.pipelines.generate import pipeline_family
    if not original or not (Path(original) / "model_index.json").is_file():
        return "final_ln"
    return search.pipeline_hook(pipeline_family(original)["family"], component)


def _bans(pairs: Sequence[str]) -> dict:
    bans = {}
    for pair in pairs:
        concept, sep, names = pair.partition("=")
        if not sep or not concept:
            raise UsageError(f"--ban must be CONCEPT=NAME[,NAME...] but is {pair!r}")
        bans.setdefault(concept, []).extend(n.strip() for n in names.split(",") if n.strip())
    return bans


def _probe_lines(path: Optional[str]) -> list:
    if not path:
        raise UsageError("--attack=probe needs --probes=FILE (one prompt per line)")
    from hirm_jax.erase.prompts import read_lines
    return read_lines(path, "--probes")


def _attack_encoders(args):
    """(erased, original, tokenizer, inputs, component): a workdir gives both (its base is the original); a
    folder needs --original; the tokenizer is the original's."""
    from hirm_jax.encoder.architectures import architecture_of
    from hirm_jax.encoder.clip import TextEncoder
    from hirm_jax.encoder.layouts import load_text_encoder
    from hirm_jax.encoder.tokenizer import TOKENIZER_FILES
    from hirm_jax.erase.prompts import load_tokenizer
    from hirm_jax.erase.workdir import Workdir, load_run
    if Workdir(args.erased).saved_config() is not None or (Path(args.erased) / "run.json").is_file():
        loaded = load_run(args.erased)
        erased = TextEncoder(loaded.base.config, loaded.erased_params)
        source = args.original or (loaded.base_path and str(loaded.base_path))
        original = load_text_encoder(args.original, args.component) if args.original else loaded.base
        component = args.component if args.original else loaded.record.base.component
    else:
        if not args.original:
            raise UsageError(f"--erased={args.erased} is an encoder folder: give the original with --original=DIR")
        erased, original = load_text_encoder(args.erased), load_text_encoder(args.original, args.component)
        source, component = args.original, args.component
    tokenizer = load_tokenizer(source, component, None, architecture_of(original))
    if any((Path(args.erased) / f).is_file() for f in TOKENIZER_FILES):  # a folder with its own tokenizer
        own = load_tokenizer(args.erased, None, None, architecture_of(erased))
        if own.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"the erased encoder's tokenizer ({args.erased}) and the original's ({source}) differ: "
                             "an attack needs one vocabulary")
    return erased, original, tokenizer, {"--erased": args.erased, "--original": source}, component


def _write_attacks(results, out: Path, overwrite: bool, inputs: dict) -> None:
    from hirm_jax.attack import search
    from hirm_jax.fileio import atomic_dir
    from hirm_jax.provenance import provenance
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        with open(tmp / "attacks.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(dataclasses.asdict(r), sort_keys=True) + "\n")
        summary = {"summary": search.summary(results), "inputs": {k: str(v) for k, v in inputs.items()},
                   "settings": results[0].settings if results else None, "provenance": provenance()}
        (tmp / "attack_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def compare_main(argv: Sequence[str]) -> int:
    from hirm_jax.report import compare
    parser = argparse.ArgumentParser(prog="hirm-jax compare",
                                     description="Joint multi-concept erasure vs the average of single-concept deltas.")
    parser.add_argument("--joint", required=True, help="workdir of a joint=True run")
    parser.add_argument("--independent", required=True, help="workdir of a joint=False run over the same concepts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = compare.compare_joint_vs_average(args.joint, args.independent, args.out)
    print(json.dumps(result["methods"], indent=2, sort_keys=True))
    return 0


def generate_main(argv: Sequence[str]) -> int:
    from hirm_jax.evaluation.suites import suite_prompts
    from hirm_jax.pipelines import generate
    return generate.main(list(argv), suite_prompts=suite_prompts)


def eval_main(argv: Sequence[str]) -> int:
    if "--suite=demo-world" in argv or any(a == "--suite" and b == "demo-world" for a, b in zip(argv, argv[1:])):
        from hirm_jax.world import benchmark as world_benchmark  # it generates its own images, so it has its own options
        enable_compilation_cache()
        return world_benchmark.main(list(argv))
    from hirm_jax import evaluation
    return evaluation.main(list(argv))


def demo_main(argv: Sequence[str]) -> int:
    from hirm_jax.world import BACKENDS
    from hirm_jax.world.demo import DEFAULT_CONCEPT, METHODS, ROBUST, run_demo
    parser = argparse.ArgumentParser(prog="hirm-jax demo", description="Erase a concept in the shipped demo world and measure it.")
    parser.add_argument("--concept", default=DEFAULT_CONCEPT)
    parser.add_argument("--method", default="hirm_s", choices=METHODS,
                        help=f"{ROBUST}: robust HiRM-S, attacked with GCG beside plain HiRM-S")
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--seeds-per-cell", type=int, default=5)
    parser.add_argument("--world", help="a world folder (default: the shipped one)")
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="how pictures are drawn: torch (diffusers) or jax (Flax UNet; another noise stream)")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    run_demo(args.concept, args.method, args.workdir, args.seeds_per_cell, args.world, args.backend)
    return 0


def world_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hirm-jax world", description="The demo world.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="rebuild the world from scratch (seeded; resumes an interrupted build)")
    train.add_argument("--out", required=True)
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    enable_compilation_cache()
    from hirm_jax.world.train import train_world
    print(train_world(args.out, seed=args.seed))
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "erase": erase_main,
    "export": export_main,
    "apply": apply_main,
    "report": report_main,
    "attack": attack_main,
    "compare": compare_main,
    "demo": demo_main,
    "world": world_main,
    "generate": generate_main,
    "eval": eval_main,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":
        os.environ["HIRM_JAX_DEBUG"] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    log.install_handler()
    try:
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; choose one of {sorted(COMMANDS)}")
        return COMMANDS[command](rest)
    except Exception as e:  # noqa: BLE001  (user errors get one line; anything else propagates)
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
