"""Prompt attacks on the demo world, in text space: erase a concept with HiRM-S as `hirm-jax demo`
does, attack the erased encoder (GCG k = 1 and 4, the continuous attack) on every attack
template of the concept in one batched search each, with the original encoder as the control;
then the search's cost per prompt when 1, 16 and 64 prompts are searched together (prompts of
every world concept). Prints the CPU and two tables; not a test.

    python bench/bench_attack.py [--concept heart] [--steps 20] [--sizes 1 16 64] [--repeats 3]

Text-space success: mean positional cosine between the erased encoder's representation of the
attack prompt and the original encoder's of the concept's prompt, >= 0.9. Images decide in the
end (`hirm-jax demo --method hirm_s_adv`, `hirm-jax eval --suite=demo-world --attacks`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu


def _erase(concept: str):
    from hirm_jax import world as w
    from hirm_jax.encoder.clip import TextEncoder
    from hirm_jax.encoder.layouts import load_text_encoder
    from hirm_jax.erase.prompts import load_tokenizer
    from hirm_jax.run import train_and_evaluate
    from hirm_jax.world.demo import erase_config
    world = w.load_world()
    root = Path(tempfile.mkdtemp(prefix="bench_attack_"))
    t0 = time.perf_counter()
    run = train_and_evaluate(erase_config(world, concept, "hirm_s", root), root / "erase", keep_trained=True)
    seconds = time.perf_counter() - t0
    original = load_text_encoder(world.text_encoder_path)
    erased = TextEncoder(original.config, run.erased_run().erased_params)
    return erased, original, load_tokenizer(world.path / "tokenizer", None, None), seconds


def attack_table(erased, original, tokenizer, concept: str, steps: int) -> None:
    from hirm_jax.attack.search import AttackJob, AttackSettings, run_attacks
    from hirm_jax.world.attack_success import attack_templates
    from hirm_jax.world.data import concept_kind
    job = AttackJob([concept], attack_templates(concept, concept_kind(concept)))
    print(f"\n{len(job.templates)} attack prompts of {concept!r}, one search per attack, {steps} steps, 1 restart; "
          "success = cos >= 0.9")
    print("| attack | success | mean cos (erased, attack) | mean cos (erased, own prompt) "
          "| mean cos (original, attack) | s per prompt |")
    print("|---|---|---|---|---|---|")
    examples = []
    for name, settings in (("gcg, k = 1", AttackSettings(k=1, steps=steps, restarts=1, candidates=32)),
                           ("gcg, k = 4", AttackSettings(k=4, steps=steps, restarts=1, candidates=32)),
                           ("continuous, k = 4", AttackSettings(kind="continuous", k=4, steps=5 * steps, restarts=1))):
        results = run_attacks(erased, original, tokenizer, job, settings, settings.kind)
        mean = lambda field: statistics.mean(getattr(r, field) for r in results)
        print(f"| {name} | {sum(r.success for r in results)}/{len(results)} | {mean('cos_to_original'):.3f} | "
              f"{mean('cos_erased'):.3f} | {mean('cos_control'):.3f} | {mean('seconds'):.2f} |")
        examples.append(f"  {name}: " + "; ".join(repr(r.text) for r in results[:3]))
    print("\n".join(examples))


def scaling_table(erased, original, tokenizer, sizes, steps: int, repeats: int) -> None:
    """Seconds per prompt of one GCG search (k = 4) over P prompts, compiled once per P (not timed)."""
    from hirm_jax import world as w
    from hirm_jax.attack.search import AttackSettings, Item, banned_tokens, search
    from hirm_jax.world.attack_success import attack_templates
    from hirm_jax.world.data import concept_kind
    vocab = original.config.vocab_size
    items = [Item(c, t, banned_tokens(tokenizer, w.names(c), vocab)) for c in (*w.OBJECTS, *w.STYLES)
             for t in attack_templates(c, concept_kind(c))]
    items = (items * (1 + max(sizes) // len(items)))[:max(sizes)]
    settings = AttackSettings(k=4, steps=steps, restarts=1, candidates=32, prompts_per_search=max(sizes))
    print(f"\nGCG k = 4, {steps} steps, 32 candidates, 1 restart; median of {repeats} searches after one compile")
    print("| prompts in one search | s per search | s per prompt | vs 1 prompt |")
    print("|---|---|---|---|")
    first = None
    for size in sizes:
        search(erased, original, tokenizer, items[:size], settings)  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            search(erased, original, tokenizer, items[:size], settings)
            times.append(time.perf_counter() - t0)
        per_prompt = statistics.median(times) / size
        first = first or per_prompt
        print(f"| {size} | {statistics.median(times):.2f} | {per_prompt:.3f} | {first / per_prompt:.1f}x faster |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concept", default="heart")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    erased, original, tokenizer, erase_seconds = _erase(args.concept)
    print(f"demo world, {args.concept!r} erased with HiRM-S in {erase_seconds:.0f}s; CPU: {cpu()}")
    attack_table(erased, original, tokenizer, args.concept, args.steps)
    scaling_table(erased, original, tokenizer, args.sizes, args.steps, args.repeats)


if __name__ == "__main__":
    main()
