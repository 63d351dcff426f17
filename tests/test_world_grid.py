"""The benchmark grid of the world: the held-out synonym rows, UA on them counted apart and for
their own concept only, the joint groups, and no erasure prompt that uses a held-out name."""

import re
import types

import numpy as np
import pytest

from hirm_jax import world as w
from hirm_jax.world import benchmark, demo


def _judged(grid, targets, predict):
    """judged_rows with a judge that answers predict(row) -> (object, style)."""
    preds = [predict(r) for r in grid]
    judge = types.SimpleNamespace(classify=lambda images: {"object": [p[0] for p in preds],
                                                           "style": [p[1] for p in preds]})
    return demo.judged_rows(types.SimpleNamespace(judge=judge), None, grid, targets)


def test_grid_renames_only_the_concept_with_the_same_templates_and_seeds():
    grid = demo.benchmark_grid(2, synonyms_of=["heart", "striped"])
    own, renamed = demo.split_rows(grid)
    assert len(own) == len(w.OBJECTS) * len(w.STYLES) * 2
    assert len([r for r in renamed if r["renamed"] == "heart"]) == len(w.STYLES) * 2
    assert len([r for r in renamed if r["renamed"] == "striped"]) == len(w.OBJECTS) * 2
    for row in renamed:
        twin = next(r for r in own if (r["object"], r["style"], r["seed"]) == (row["object"], row["style"], row["seed"]))
        assert row["template"] == twin["template"] and row["prompt"] != twin["prompt"]
        assert w.heldout_name(row["renamed"]) in row["prompt"]


def test_heldout_synonym_is_counted_apart_and_for_its_concept_only():
    grid = demo.benchmark_grid(1, synonyms_of=["heart", "striped"])
    # The erased encoder forgets "heart" by its own name but draws a heart from "valentine";
    # everything else is drawn as asked.
    predict = lambda r: ((w.OBJECT_ANCHOR if r["object"] == "heart" and r["renamed"] is None else r["object"]),
                         r["style"])
    heart = demo.figures(_judged(grid, ["heart"], predict))
    assert heart["UA"] == 1.0 and heart["UA_n"] == len(w.STYLES)
    assert heart["UA_heldout_name"] == 0.0 and heart["UA_heldout_name_n"] == len(w.STYLES)
    assert heart["IRA"] == 1.0 and heart["CRA"] == 1.0
    # "banded heart" rows (striped renamed) are not heart's held-out rows.
    rows = _judged(grid, ["heart"], predict)
    assert all(r["renamed"] in (None, "heart") for r in rows)


def test_joint_groups_are_three_of_a_kind_and_all_objects():
    groups = benchmark.joint_groups(w.OBJECTS + w.STYLES)
    assert groups == [w.OBJECTS[:3], w.STYLES[:3], w.OBJECTS]
    assert benchmark.joint_groups(("heart",)) == []
    retain = benchmark.joint_retain(w.OBJECTS)  # all objects at once: the anchor's cells remain
    assert len(retain) == len(w.ALL_STYLES) and all(w.OBJECT_ANCHOR in p for p in retain)
    assert not [p for p in benchmark.joint_retain(w.STYLES[:3]) if any(s in p for s in w.STYLES[:3])]


@pytest.mark.parametrize("concept", ["heart", "striped"])
def test_no_erasure_prompt_uses_a_heldout_name(concept, tmp_path):
    world = types.SimpleNamespace(text_encoder_path=tmp_path / "te", path=tmp_path)
    config = demo.erase_config(world, concept, "hirm_s", tmp_path)
    assert tuple(config.concepts) == w.trained_names(concept)
    assert set(config.super_categories) == set(w.trained_names(concept))
    prompts = [t.format(name) for t in config.templates for name in config.concepts]
    prompts += (tmp_path / "retain_prompts.txt").read_text().splitlines()
    for c in w.OBJECTS + w.STYLES:
        pattern = re.compile(rf"\b{re.escape(w.heldout_name(c))}\b")
        assert not [p for p in prompts if pattern.search(p)], f"held-out name of {c} in an erasure prompt"
    assert len(np.unique(prompts)) == len(prompts)
