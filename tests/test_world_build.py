"""Building the world: every class has several names (the held-out one last), every caption fits
the text encoder's training length (or the build says which does not), and the text encoder's
training resumes from its checkpoint bit for bit."""

import re

import jax
import numpy as np
import pytest

from hirm_jax import world as w
from hirm_jax.world import data, textencoder


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(w.SHIPPED / "tokenizer"))


def test_every_concept_has_three_names_some_of_several_words():
    concepts = w.OBJECTS + w.STYLES
    assert len(w.OBJECTS) >= 10 and len(w.STYLES) >= 8
    assert all(len(w.names(c)) >= 3 and w.names(c)[0] == c for c in concepts)
    assert sum(" " in name for c in concepts for name in w.names(c)) >= 5
    every = [name for c in data.NAMES for name in w.names(c)]
    assert len(every) == len(set(every)), "a name belongs to one class only"
    assert w.trained_names("heart") == ("heart", "love heart") and w.heldout_name("heart") == "valentine"
    assert w.name_of("heart", 5) == "valentine" and w.name_of(w.OBJECT_ANCHOR, 2) == w.OBJECT_ANCHOR
    with pytest.raises(ValueError, match="dragon"):
        w.names("dragon")


def test_templates_put_words_between_and_both_orders():
    position = lambda t: t.index("{object}") < t.index("{style}")
    for templates in (w.TRAIN_TEMPLATES, w.HELDOUT_TEMPLATES):
        assert {position(t) for t in templates} == {True, False}
    assert any(re.search(r"\{style\} \w+ \{object\}", t) for t in w.TRAIN_TEMPLATES)


def test_every_caption_fits_and_a_long_one_is_refused(tokenizer, monkeypatch):
    ids, objs, styles = textencoder.caption_table(tokenizer)
    assert ids.shape[1] == textencoder.TRAIN_LENGTH
    assert (ids[:, -1] == textencoder.CONFIG.eos_token_id).all()  # nothing cut: EOS or padding last
    monkeypatch.setitem(data.NAMES, "heart", ("heart", "love heart", "a very very long and winding name for a heart"))
    with pytest.raises(ValueError, match="winding.*tokens.*TRAIN_LENGTH"):
        textencoder.caption_table(tokenizer)


@pytest.mark.slow(seconds=40)
def test_text_encoder_training_resumes_bit_identical(tokenizer, tmp_path, monkeypatch):
    recipe = textencoder.TextEncoderRecipe(steps=4, batch=8, pool_size=64, checkpoint_every=2, log_every=2)
    pool = data.sample(64, seed=0)
    whole, _ = textencoder.train_text_encoder(tokenizer, recipe, pool=pool)
    checkpoint = tmp_path / "te.msgpack"
    save = textencoder._save

    def save_then_stop(path, state):  # the build is killed right after its step-2 checkpoint
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(textencoder, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        textencoder.train_text_encoder(tokenizer, recipe, pool=pool, checkpoint=checkpoint)
    monkeypatch.setattr(textencoder, "_save", save)
    resumed, metrics = textencoder.train_text_encoder(tokenizer, recipe, pool=pool, checkpoint=checkpoint)
    assert metrics["resumed_at_step"] == 2
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(whole.params),
             jax.tree_util.tree_leaves(textencoder.TextEncoder.init(textencoder.CONFIG, seed=0,
                                                                   length=textencoder.TRAIN_LENGTH).params))]
    assert all(moved), "every text-encoder leaf trains"
