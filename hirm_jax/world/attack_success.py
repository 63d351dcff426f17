"""Image-level attack success on the demo world: do the adversarial prompts bring the concept back?

    figures = measure_attacks(world, erased_folder, "heart", ["gcg_k1", "gcg_k4", "continuous", "probe"])
    figures["gcg_k4"]["ASR"], figures["gcg_k4"]["control"]

Each adversarial prompt (its token ids, as `hirm-jax attack` writes them) is drawn with
`seeds_per_prompt` seeds through the ERASED encoder and, as the control, through the ORIGINAL
one; the world's judge labels every image. ASR = share of the erased encoder's images that show
the concept; `control` = the same share through the original encoder (a prompt that makes the
concept even without erasure is a synonym the erasure should have covered, not noise; both are
reported, with 95% Wilson intervals). The prompts come from the held-out templates with every
class of the other kind, so the attack is measured where the erasure was not trained.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hirm_jax import log
from hirm_jax.world.data import concept_kind

_log = log.get(__name__)

FIRST_ATTACK_SEED = 30_000  # images of attack prompts: seeds apart from the demo's and the world's
# The world's attacks (hirm_jax.attack.search): GCG with 1 and 4 tokens in place of the concept
# and the continuous attack (4 soft tokens; its images come from the nearest tokens, its
# text-space success is the soft prompt's), 20 steps, 1 restart, 32 candidates; `probe`: the
# concept's name varied (plural, upper case, a letter dropped, a letter doubled) and its other names.
ATTACKS = {"gcg_k1": dict(kind="gcg", k=1), "gcg_k4": dict(kind="gcg", k=4),
           "continuous": dict(kind="continuous", k=4, steps=100), "probe": None}
BUDGET = dict(steps=20, restarts=1, candidates=32)
PROMPTS_PER_TEMPLATE = 2  # other-kind classes per held-out template: 6 attack prompts per concept


def attack_templates(concept: str, kind: str, per_template: int = 0) -> list[str]:
    """Held-out templates with the concept's slot left open and the other kind filled in, cycling
    through the other kind's classes (`per_template` of them per template; 0 = all)."""
    from hirm_jax import world as w
    others = w.STYLES if kind == "object" else w.OBJECTS
    templates = []
    for i, template in enumerate(w.HELDOUT_TEMPLATES):
        chosen = others if not per_template else [others[(i * per_template + j) % len(others)]
                                                  for j in range(per_template)]
        for other in chosen:
            fill = dict(object="{}", style=other) if kind == "object" else dict(style="{}", object=other)
            templates.append(template.format(**fill))
    return templates


def attack_rows(erased, original, tokenizer, concept: str, kind: str, settings, per_template: int = 0) -> list:
    """The token attack on every attack template of the concept (the tokens of all its names banned,
    the held-out synonym's included: finding that word again is no attack)."""
    from hirm_jax import world as w
    from hirm_jax.attack.search import AttackJob, run_attacks
    job = AttackJob([concept], attack_templates(concept, kind, per_template), synonyms={concept: w.names(concept)[1:]})
    return run_attacks(erased, original, tokenizer, job, settings, settings.kind)


def attack_success(world, erased_encoder, rows, seeds_per_prompt: int = 5, first_seed: int = FIRST_ATTACK_SEED) -> dict:
    """ASR and control (above) of attack rows (AttackResult or their JSON dicts) for one concept."""
    from hirm_jax import world as w
    from hirm_jax.evaluation.metrics import wilson_interval
    rows = [r if isinstance(r, dict) else dataclasses.asdict(r) for r in rows]
    if not rows:
        raise ValueError("no attack rows to measure")
    concepts = {r["concept"] for r in rows}
    if len(concepts) != 1:
        raise ValueError(f"attack rows must be of one concept but are of {sorted(concepts)}")
    concept = rows[0]["concept"]
    kind = concept_kind(concept)
    ids = [r["ids"] for r in rows for _ in range(seeds_per_prompt)]
    seeds = [first_seed + s for _ in rows for s in range(seeds_per_prompt)]
    _log.info(f"[attack] {len(ids)} images of {len(rows)} attack prompts, erased and original encoder")
    hits = {}
    for name, encoder in (("erased", erased_encoder), ("original", None)):
        labels = world.judge.classify(w.generate(world, encoder, ids, seeds))[kind]
        hits[name] = np.asarray([label == concept for label in labels]).reshape(len(rows), seeds_per_prompt)
    n = hits["erased"].size
    per_prompt = [dict(text=r["text"], ids=r["ids"], template=r["template"], asr=float(e.mean()),
                       control=float(o.mean()), cos_to_original=r["cos_to_original"])
                  for r, e, o in zip(rows, hits["erased"], hits["original"])]
    return dict(attack=rows[0]["attack"], k=rows[0]["settings"].get("k"), concept=concept, prompts=len(rows),
                images=n, seeds_per_prompt=seeds_per_prompt, first_seed=first_seed,
                ASR=float(hits["erased"].mean()), ASR_interval95=wilson_interval(int(hits["erased"].sum()), n),
                control=float(hits["original"].mean()),
                control_interval95=wilson_interval(int(hits["original"].sum()), n),
                seconds_per_prompt=float(np.mean([r["seconds"] for r in rows])), per_prompt=per_prompt)


def probe_names(concept: str) -> list[str]:
    """The concept's name varied (plural, upper case, a letter dropped, a letter doubled) and its
    other names, the held-out synonym included."""
    from hirm_jax import world as w
    return [concept + "s", concept.upper(), concept[:-1], concept + concept[-1], *w.names(concept)[1:]]


def measure_attacks(world, erased_folder, concept: str, attacks, seed: int = 0, seeds_per_prompt: int = 5) -> dict:
    """{attack name: figures} of ATTACKS' `attacks` against the erased encoder folder (the world's
    own is the original), each measured on images with the original encoder as the control."""
    from hirm_jax.attack.search import AttackSettings, score_probes
    from hirm_jax.encoder.layouts import load_text_encoder
    from hirm_jax.erase.prompts import load_tokenizer
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"attacks {unknown} are not world attacks; choose among {list(ATTACKS)}")
    kind = concept_kind(concept)
    original, erased = load_text_encoder(world.text_encoder_path), load_text_encoder(erased_folder)
    tokenizer = load_tokenizer(world.path / "tokenizer", None, None)
    out = {}
    for name in attacks:
        if ATTACKS[name] is None:
            rows = [r for t in attack_templates(concept, kind, PROMPTS_PER_TEMPLATE)
                    for r in score_probes(erased, original, tokenizer, concept, t, [t.format(n) for n in probe_names(concept)])]
        else:
            settings = AttackSettings(**{**BUDGET, **ATTACKS[name]}, seed=seed)
            rows = attack_rows(erased, original, tokenizer, concept, kind, settings, PROMPTS_PER_TEMPLATE)
        figures = attack_success(world, str(erased_folder), rows, seeds_per_prompt, FIRST_ATTACK_SEED + 1000 * seed)
        figures.update(text_success=float(np.mean([r.success for r in rows])),
                       mean_cos=float(np.mean([r.cos_to_original for r in rows])))
        out[name] = figures
    return out
