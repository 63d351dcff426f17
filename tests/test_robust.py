"""Robust HiRM (objective.adversarial, hirm_jax.erase.adversarial): the inner attack's prompts join
the concept prompts with the same targets; only block 0 trains; batch, joint and resume hold;
and the erasure measurably resists an attack of another family than the one it trained with."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import tiny
from hirm_jax.attack.search import AttackJob, AttackSettings, run_attacks
from hirm_jax.config_lib import ConfigError
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.encoder.layouts import load_text_encoder
from hirm_jax.erase import adversarial
from hirm_jax.erase.prompts import PromptPair, load_tokenizer
from hirm_jax.erase.setup import plan_erase
from hirm_jax.erase.workdir import load_run
from hirm_jax.run import train_and_evaluate
from tests.test_scale import mesh_of

CONCEPTS = ("Van Gogh", "Monet")


def robust_config(encoder_dir, attack="continuous", concepts=("Van Gogh",), joint=True, epochs=10):
    c = tiny.get_config("hirm_s")
    c.encoder.path = str(encoder_dir)
    c.concepts = concepts
    c.super_categories = {name: "painting" for name in concepts}
    c.joint = joint
    c.train.epochs = epochs
    c.train.checkpoint_every = 4
    c.objective.adversarial.enabled = True
    c.objective.adversarial.attack = attack
    c.objective.adversarial.steps = 3
    c.objective.adversarial.top_k = 8
    c.objective.adversarial.candidates = 8
    return c


def test_the_concepts_token_positions_are_found_and_a_glued_concept_is_refused(encoder_dir):
    tokenizer = load_tokenizer(encoder_dir, None, None)
    pairs = [PromptPair("a painting by Van Gogh", None, "Van Gogh"), PromptPair("Monet", None, "Monet")]
    ids = tokenizer([p.prompt for p in pairs], padding="max_length", max_length=77)["input_ids"]
    slots, mask = adversarial.concept_slots(tokenizer, pairs, np.array(ids))
    van_gogh = tokenizer("Van Gogh", add_special_tokens=False)["input_ids"]
    assert [ids[0][i] for i, m in zip(slots[0], mask[0]) if m] == van_gogh
    assert mask[1].sum() == len(tokenizer("Monet", add_special_tokens=False)["input_ids"]) and slots[1][0] == 1
    glued = [PromptPair("Monetesque", None, "Monet")]
    with pytest.raises(ConfigError, match="tokens of concept 'Monet' are not found in the prompt 'Monetesque'"):
        adversarial.concept_slots(tokenizer, glued, np.array(tokenizer(["Monetesque"])["input_ids"]))


@pytest.mark.parametrize("field, value, match", [
    ("attack", "genetic", "objective.adversarial.attack must be one of"),
    ("every", 0, "objective.adversarial.every must be >= 1 but is 0"),
    ("weight", 0.0, "objective.adversarial.weight must be > 0"),
    ("hook", "last_layer", "objective.hooks entries must be one of")])
def test_bad_adversarial_settings_are_one_line_errors(encoder_dir, tmp_path, field, value, match):
    c = robust_config(encoder_dir)
    setattr(c.objective.adversarial, field, value)
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(c, tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_at_the_base_the_attack_rests_on_the_concept_and_its_term_equals_the_misdirection(encoder_dir, tmp_path):
    # Before training the erasing encoder IS the original: the concept's own embeddings already
    # reach the attack's target, so the attack cannot move, and the adversarial prompts (the
    # concept prompts, with the same targets) give the same loss term. Later they part. Two
    # concepts erased jointly: one job, each prompt attacked at its own concept's tokens.
    train_and_evaluate(robust_config(encoder_dir, concepts=CONCEPTS, epochs=4), tmp_path / "wd", mesh=mesh_of(1))
    rows = [json.loads(line) for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    # Up to rounding: the attack's target was computed in another XLA program than the step's
    # forward, and where the CPU's kernels round the two differently (AMD EPYC, avx2: 1.026 vs
    # 0.983) the soft prompt's Adam turns that rounding-level gradient into real steps.
    assert rows[0]["adversarial"] == pytest.approx(rows[0]["misdirection"], rel=0.05)
    assert rows[-1]["adversarial"] > 1.05 * rows[-1]["misdirection"]


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["continuous", "gcg"])
def test_batch_robust_erasure_keeps_frozen_weights_moves_the_attack_and_resumes_bit_identical(encoder_dir, tmp_path,
                                                                                             attack):
    config = robust_config(encoder_dir, attack, CONCEPTS, joint=False, epochs=6)
    plan = plan_erase(config, mesh_of(2, concept=2))
    frozen = {k: np.asarray(v).copy() for k, v in plan.frozen.items()}
    state = plan.new_state()
    start = np.asarray(state["attack"]).copy()
    for step in range(2):
        state, _ = plan.step_fn(state, *plan.step_args(plan.place_jobs(*plan.chunks[0]), step))
    assert not np.array_equal(np.asarray(state["attack"]), start)
    if attack == "gcg":  # tokens drawn at the first attack, never the concept's own
        tokens = np.asarray(state["attack"])
        banned = plan.jobs.per_job["adv_banned"][0, 0]
        used = tokens[0][plan.jobs.per_job["adv_slot_mask"][0] > 0]
        assert (tokens >= 0).all() and not banned[used].any()
    for k, v in plan.frozen.items():
        assert np.asarray(v).tobytes() == frozen[k].tobytes(), k

    train_and_evaluate(config, tmp_path / "full", mesh=mesh_of(2, concept=2))
    assert train_and_evaluate(config, tmp_path / "resumed", stop_after=5, mesh=mesh_of(2, concept=2))["status"] == \
        "interrupted"
    train_and_evaluate(config, tmp_path / "resumed", mesh=mesh_of(2, concept=2))
    index = json.loads((tmp_path / "full" / "index.json").read_text())
    for name, folder in index["concepts"].items():
        a = load_file(str(tmp_path / "full" / folder / "erased_trainable.safetensors"))
        b = load_file(str(tmp_path / "resumed" / folder / "erased_trainable.safetensors"))
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a), name
        assert all(k.startswith("encoder/layers/0/") for k in a)


@pytest.mark.slow(seconds=30)
def test_robust_erasure_resists_a_token_attack_it_did_not_train_against(encoder_dir, tmp_path):
    # Trained against the continuous attack; attacked with GCG (another family, another budget),
    # with the same search against the plain HiRM-S erasure as the comparison.
    original = load_text_encoder(encoder_dir)
    tokenizer = load_tokenizer(encoder_dir, None, None)
    plain = robust_config(encoder_dir, epochs=30)
    plain.objective.adversarial.enabled = False
    cos = {}
    for name, config in (("plain", plain), ("robust", robust_config(encoder_dir, epochs=30))):
        train_and_evaluate(config, tmp_path / name, mesh=mesh_of(1))
        erased = TextEncoder(original.config, load_run(tmp_path / name).erased_params)
        results = run_attacks(erased, original, tokenizer, AttackJob(["Van Gogh"], ("a painting by {}", "{}")),
                              AttackSettings(k=2, steps=15, restarts=2, top_k=32, candidates=64), "gcg")
        cos[name] = np.mean([r.cos_to_original for r in results])
        own = np.mean([r.cos_erased for r in results])
        assert cos[name] > own  # the attack brings the erased concept part of the way back
    assert cos["robust"] < cos["plain"] - 0.02, cos


@pytest.mark.slow(seconds=220)
def test_world_benchmark_measures_attack_success_and_robust_hirm_lowers_it(tmp_path):
    # `hirm-jax eval --suite=demo-world --attacks`: the GCG attack (4 tokens) brings hearts back
    # through plain HiRM-S far more often than through robust HiRM-S, which trained against
    # another attack (continuous); measured on images, with the original encoder as control.
    # Run as a user runs it, in its own process on one CPU device (the 8 fake devices of the test
    # process made it 4x slower on 2 cores).
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "hirm_jax.cli", "eval", "--suite=demo-world",
                           f"--out={tmp_path / 'bench'}", "--methods", "hirm_s", "hirm_s_adv", "--concepts", "heart",
                           "--seeds-per-cell=1", "--attacks", "gcg_k4"],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(root)}, cwd=root, timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "bench" / "results.json").read_text())
    plain, robust = (report["methods"][m]["attacks"]["gcg_k4"] for m in ("hirm_s", "hirm_s_adv"))
    from hirm_jax import world as w
    from hirm_jax.world.attack_success import PROMPTS_PER_TEMPLATE
    assert plain["images"] == robust["images"] == len(w.HELDOUT_TEMPLATES) * PROMPTS_PER_TEMPLATE * 5
    assert plain["control"] >= 0.5  # the prompts found against plain HiRM-S make hearts without erasure
    assert robust["ASR"] < plain["ASR"] - 0.3, (plain["ASR"], robust["ASR"])
    assert report["methods"]["hirm_s_adv"]["object"]["UA"] >= 0.9
    assert "gcg_k4 ASR" in (tmp_path / "bench" / "results.md").read_text()
