"""Prompt attacks in text space (hirm_jax.attack.search) and `hirm-jax attack`."""

import json

import numpy as np
import pytest

from hirm_jax import cli
from hirm_jax.attack.search import (AttackError, AttackJob, AttackSettings, attack_prompt, banned_tokens,
                                    run_attacks, score_probes)
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.erase import masking
from tests.fixtures_pipelines import (TINY_CONFIG, TINY_CONFIG_PROJ, fabricate_workdir, perturb_block,
                                      save_encoder_folder, tiny_encoder, tiny_sdxl_pipeline, tiny_tokenizer)


@pytest.fixture(scope="module")
def encoders():
    original = tiny_encoder(seed=0)
    erased = TextEncoder(original.config, masking.unflatten({**masking.flatten(original.params),
                                                               **perturb_block(original.params, scale=0.5)}))
    return original, erased, tiny_tokenizer()


@pytest.mark.slow
def test_with_nothing_erased_an_exhaustive_search_finds_the_concepts_own_token(encoders):
    original, _, tokenizer = encoders
    vocab = original.config.vocab_size
    settings = AttackSettings(k=1, steps=1, restarts=1, top_k=vocab, candidates=vocab)
    result = attack_prompt(original, original, tokenizer, "a {}", "cat", settings, banned_tokens(tokenizer, [], vocab))
    cat = tokenizer("cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1 and result.ids[2] == cat[0] and result.text == "a cat"
    assert result.loss == pytest.approx(0.0, abs=1e-8) and result.cos_to_original == pytest.approx(1.0)


@pytest.mark.slow
def test_gcg_lowers_the_loss_never_uses_a_banned_token_and_is_reproducible(encoders):
    original, erased, tokenizer = encoders
    banned = banned_tokens(tokenizer, ["cat"], original.config.vocab_size)
    settings = AttackSettings(k=2, steps=8, restarts=2, top_k=16, candidates=32)
    result = attack_prompt(erased, original, tokenizer, "a photo of a {}", "cat", settings, banned)
    assert result.loss < result.loss_start
    assert len(result.ids) == 77 and result.ids[0] == tokenizer.bos_token_id
    slots = [t for t in result.ids[1:] if t != tokenizer.eos_token_id][4:6]  # "a photo of a" then the 2 slots
    assert not banned[slots].any()
    assert tokenizer("cat", add_special_tokens=False)["input_ids"][0] not in result.ids
    again = attack_prompt(erased, original, tokenizer, "a photo of a {}", "cat", settings, banned)
    assert again.ids == result.ids and again.loss == result.loss
    assert -1 <= result.cos_erased <= result.cos_to_original + 1  # (recorded, both cosines)
    assert result.success == (result.cos_to_original >= settings.threshold)


@pytest.mark.slow
def test_the_continuous_attack_lowers_the_loss_below_its_start(encoders):
    original, erased, tokenizer = encoders
    banned = banned_tokens(tokenizer, ["cat"], original.config.vocab_size)
    result = attack_prompt(erased, original, tokenizer, "a {}", "cat",
                           AttackSettings(kind="continuous", k=2, steps=30, restarts=2, learning_rate=0.05), banned)
    assert result.loss < 0.8 * result.loss_start


def test_probes_are_scored_against_the_originals_concept_prompt(encoders):
    original, erased, tokenizer = encoders
    [same, other] = score_probes(original, original, tokenizer, "cat", "a {}", ["a cat", "two dogs"])
    assert same.cos_to_original == pytest.approx(1.0) and same.success and other.cos_to_original < 1.0
    assert same.ids[:3] == [tokenizer.bos_token_id, *tokenizer("a cat", add_special_tokens=False)["input_ids"]]


def test_bad_settings_and_inputs_are_one_line_errors(encoders):
    original, erased, tokenizer = encoders
    vocab = original.config.vocab_size
    with pytest.raises(AttackError, match="k must be >= 1 but is 0"):
        attack_prompt(erased, original, tokenizer, "{}", "cat", AttackSettings(k=0), banned_tokens(tokenizer, [], vocab))
    with pytest.raises(AttackError, match="attack must be one of"):
        AttackSettings(kind="genetic").check(vocab)
    with pytest.raises(AttackError, match="every token is banned"):
        attack_prompt(erased, original, tokenizer, "{}", "cat", AttackSettings(), np.ones(vocab, bool))
    with pytest.raises(AttackError, match="same architecture"):
        run_attacks(erased, tiny_encoder(seed=1, config=TINY_CONFIG_PROJ.replace(hidden_size=64)), tokenizer,
                    AttackJob(["cat"]), AttackSettings(), "gcg")
    with pytest.raises(AttackError, match="no concept"):
        run_attacks(erased, original, tokenizer, AttackJob([]), AttackSettings(), "gcg")


@pytest.mark.slow
def test_the_command_attacks_a_workdir_and_writes_ids_others_can_rerun(tmp_path, capsys):
    base = tiny_encoder(seed=0)
    folder = save_encoder_folder(base, tmp_path / "enc")
    tiny_tokenizer(folder)
    workdir, _ = fabricate_workdir(tmp_path / "wd", base, source=folder)
    out = tmp_path / "attacks"
    assert cli.main(["attack", f"--erased={workdir}", "--concept=cat", "--ban=cat=kitten", "--template=a {}",
                     "--steps=3", "--restarts=1", "--top-k=8", "--candidates=8", f"--out={out}"]) == 0
    [row] = [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()]
    assert row["concept"] == "cat" and row["attack"] == "gcg" and len(row["ids"]) == TINY_CONFIG.max_position_embeddings
    summary = json.loads((out / "attack_summary.json").read_text())
    assert summary["summary"]["cat"]["gcg"]["prompts"] == 1 and summary["settings"]["k"] == 4
    capsys.readouterr()
    assert cli.main(["attack", f"--erased={workdir}", "--concept=cat", "--k=0", f"--out={tmp_path / 'x'}"]) == 2
    assert "k must be >= 1 but is 0" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["attack", f"--erased={workdir}", "--concept=cat", f"--out={workdir / 'inside'}"]) == 2


@pytest.mark.slow
def test_many_prompts_searched_together_and_sharded_equal_each_searched_alone(encoders):
    # 3 prompts vmapped in one search, sharded over the 8 fake devices (padded to 8), give what
    # each prompt's own one-device search gives: a prompt's search does not depend on the others.
    import jax
    from hirm_jax.attack.search import Item, search
    original, erased, tokenizer = encoders
    vocab = original.config.vocab_size
    items = [Item(c, t, banned_tokens(tokenizer, [c], vocab)) for c, t in (("cat", "a {}"), ("dog", "a photo of a {}"),
                                                                          ("cat", "{} on a mat"))]
    settings = AttackSettings(k=2, steps=4, restarts=2, top_k=16, candidates=16)
    together = search(erased, original, tokenizer, items, settings)
    alone = [search(erased, original, tokenizer, [item], settings, devices=jax.devices()[:1])[0] for item in items]
    assert [r.concept for r in together] == ["cat", "dog", "cat"] and all(len(r.ids) == 77 for r in together)
    for a, b in zip(together, alone):
        assert a.ids == b.ids and a.loss == pytest.approx(b.loss, rel=1e-5) and a.loss < a.loss_start


@pytest.mark.parametrize("hook", ["penultimate+text_embeds", "pooled"])
def test_sdxl_and_flux_hooks_compare_every_representation_the_pipeline_takes(hook):
    """SDXL's text_encoder_2 gives the UNet its penultimate hidden state AND text_embeds, Flux takes
    CLIP's pooled output: the attack's loss is the sum over those representations (positional mean
    but BOS; one vector each for the pooled ones), its success the lowest cosine."""
    original = tiny_encoder(seed=0, config=TINY_CONFIG_PROJ)
    erased = TextEncoder(original.config, masking.unflatten({**masking.flatten(original.params),
                                                               **perturb_block(original.params, scale=0.5)}))
    tokenizer = tiny_tokenizer()
    banned = banned_tokens(tokenizer, ["cat"], original.config.vocab_size)
    settings = AttackSettings(k=1, steps=2, restarts=1, top_k=8, candidates=8, hook=hook)
    result = attack_prompt(erased, original, tokenizer, "a {}", "cat", settings, banned)

    concept = original.apply(original.params, tokenizer(["a cat"], padding="max_length", max_length=77,
                                                        return_tensors="np")["input_ids"], None)
    found = erased.apply(erased.params, np.array([result.ids]), None)
    pick = {"penultimate": lambda o: np.asarray(o["hidden_states"][-2][0, 1:], np.float64),
            "text_embeds": lambda o: np.asarray(o["text_embeds"], np.float64),
            "pooled": lambda o: np.asarray(o["pooled_output"], np.float64)}
    loss, cosines = 0.0, []
    for name in hook.split("+"):
        a, b = pick[name](found), pick[name](concept)
        loss += np.mean(np.sum((a - b) ** 2, -1))
        cosines.append(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
    assert result.loss == pytest.approx(loss, rel=1e-4)
    assert result.cos_to_original == pytest.approx(min(cosines), abs=1e-5)
    assert result.loss <= result.loss_start


def test_each_pipeline_family_is_attacked_where_its_denoiser_reads(encoders):
    from hirm_jax.attack.search import pipeline_hook
    assert pipeline_hook("sd", None) == "final_ln"
    assert pipeline_hook("sdxl", "text_encoder") == "penultimate"
    assert pipeline_hook("sdxl", "text_encoder_2") == "penultimate+text_embeds"
    assert pipeline_hook("flux", "text_encoder") == "pooled"
    with pytest.raises(AttackError, match="'text_encoder_2'"):
        pipeline_hook("flux", "text_encoder_2")  # Flux's T5
    with pytest.raises(AttackError, match="hook 'penultimate\\+pooler'"):
        AttackSettings(hook="penultimate+pooler").check(encoders[0].config.vocab_size)


@pytest.mark.slow
def test_the_command_attacks_sdxls_second_encoder_where_the_unet_reads_and_refuses_another_vocabulary(
        tmp_path, capsys):
    """An erased folder against an SDXL pipeline's text_encoder_2: the default hook is the
    pipeline's (penultimate + text_embeds); an erased folder with its own, different tokenizer is
    refused before any search."""
    original = tiny_encoder(seed=0, config=TINY_CONFIG_PROJ)
    encoder_1 = save_encoder_folder(tiny_encoder(seed=2), tmp_path / "te1")
    encoder_2 = save_encoder_folder(original, tmp_path / "te2")
    tiny_sdxl_pipeline(encoder_1, encoder_2).save_pretrained(str(tmp_path / "sdxl"))
    erased = save_encoder_folder(original, tmp_path / "erased",
                                 params=masking.unflatten({**masking.flatten(original.params),
                                                           **perturb_block(original.params, scale=0.5)}))
    args = ["attack", f"--erased={erased}", f"--original={tmp_path / 'sdxl'}", "--component=text_encoder_2",
            "--concept=cat", "--k=1", "--steps=2", "--restarts=1", "--top-k=8", "--candidates=8"]
    assert cli.main([*args, f"--out={tmp_path / 'out'}"]) == 0
    summary = json.loads((tmp_path / "out" / "attack_summary.json").read_text())
    assert summary["settings"]["hook"] == "penultimate+text_embeds"
    capsys.readouterr()

    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    other.save_pretrained(str(erased))
    assert cli.main([*args, f"--out={tmp_path / 'out2'}"]) == 2
    assert "an attack needs one vocabulary" in capsys.readouterr().err and not (tmp_path / "out2").exists()
