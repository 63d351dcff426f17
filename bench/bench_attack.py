"""Prompt attacks on the demo world (text space): erase a concept with HiRM-S as `hirm-jax demo`
does, then attack the erased encoder with GCG (k = 1 and 4) and the continuous attack, one
prompt per held-out template, with the original encoder as the control. Prints a table and the
CPU model; not a test.

    python bench/bench_attack.py [--concept heart] [--steps 40] [--restarts 4]

Text-space success: mean positional cosine between the erased encoder's representation of the
attack prompt and the original encoder's of the concept's prompt, >= 0.9. Images decide in the
end (the attack issue's part 2); this measures the search.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concept", default="heart")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--restarts", type=int, default=4)
    args = parser.parse_args()

    from hirm_jax import world as w
    from hirm_jax.attack.search import AttackSettings, attack_prompt, banned_tokens, score_probes
    from hirm_jax.encoder.clip import TextEncoder
    from hirm_jax.encoder.layouts import load_text_encoder
    from hirm_jax.erase.prompts import load_tokenizer
    from hirm_jax.run import train_and_evaluate
    from hirm_jax.world.demo import erase_config

    world = w.load_world()
    root = Path(tempfile.mkdtemp(prefix="bench_attack_"))
    t0 = time.perf_counter()
    run = train_and_evaluate(erase_config(world, args.concept, "hirm_s", root), root / "erase", keep_trained=True)
    erase_s = time.perf_counter() - t0
    loaded = run.erased_run()
    original = load_text_encoder(world.text_encoder_path)
    erased = TextEncoder(original.config, loaded.erased_params)
    tokenizer = load_tokenizer(world.path / "tokenizer", None, None)
    kind = "object" if args.concept in w.OBJECTS else "style"
    other = w.STYLES[1] if kind == "object" else w.OBJECTS[0]
    templates = [t.format(object="{}", style=other) if kind == "object" else t.format(style="{}", object=other)
                 for t in w.HELDOUT_TEMPLATES]
    banned = banned_tokens(tokenizer, [args.concept], original.config.vocab_size)
    rows = []
    for name, settings in (("gcg k=1", AttackSettings(k=1, steps=args.steps, restarts=args.restarts)),
                           ("gcg k=4", AttackSettings(k=4, steps=args.steps, restarts=args.restarts)),
                           ("continuous k=4", AttackSettings(kind="continuous", k=4, steps=args.steps * 5,
                                                             restarts=args.restarts))):
        results = [attack_prompt(erased, original, tokenizer, t, args.concept, settings, banned) for t in templates]
        rows.append((name, results))
    probes = score_probes(erased, original, tokenizer, args.concept, templates[0],
                          [t.replace("{}", args.concept) for t in templates])
    print(f"demo world, concept {args.concept!r} erased with HiRM-S in {erase_s:.0f}s; CPU {cpu_model()}; "
          f"{len(templates)} held-out templates; success = cos >= 0.9")
    print("| attack | success | mean cos (erased, attack) | mean cos (erased, own prompt) | mean cos (original, attack) | s per prompt |")
    print("|---|---|---|---|---|---|")
    for name, results in rows:
        print(f"| {name} | {sum(r.success for r in results)}/{len(results)} | "
              f"{statistics.mean(r.cos_to_original for r in results):.3f} | "
              f"{statistics.mean(r.cos_erased for r in results):.3f} | "
              f"{statistics.mean(r.cos_control for r in results):.3f} | "
              f"{statistics.mean(r.seconds for r in results):.1f} |")
    print(f"| the concept's own prompts (probes) | {sum(p.success for p in probes)}/{len(probes)} | "
          f"{statistics.mean(p.cos_to_original for p in probes):.3f} | | | |")
    for name, results in rows:
        print(f"  {name}: " + "; ".join(repr(r.text) for r in results))


if __name__ == "__main__":
    main()
