"""HiRM on a T5 encoder (Flux text_encoder_2 / SD3 text_encoder_3): erase, export, apply.

A tiny random T5 (d_model 64, 3 blocks) with a tiny SentencePiece-style (Unigram) tokenizer
built offline is erased through the CLI with hirm_s and hirm_r; what is checked:
- the concept prompts' last-block feed-forward output moves toward its target, much more
  than ordinary prompts' does;
- only block 0's q/k/v/o, RMS norms and DenseReluDense train: the relative attention bias
  (block 0 holds it for every block) and every other leaf are bit-identical to the base file;
- export --format=delta + apply give a folder T5EncoderModel loads, equal to the Flax erased
  encoder; the same through a pipeline's text_encoder_2 slot;
- a prompt longer than encoder.max_length is an error naming it; T5 needs encoder.max_length.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from hirm_jax.erase import masking
from hirm_jax.erase import objectives
from hirm_jax.encoder.architectures import architecture
from hirm_jax.cli import main
from hirm_jax.artifacts.export import load_run
from hirm_jax.encoder.t5 import T5Encoder, T5EncoderConfig
from hirm_jax.encoder.t5_weights import expand_t5_table, save_t5_folder
from hirm_jax.encoder.tokenizer import load_t5_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"
MAX_LENGTH = 32
CONCEPT, ANCHOR = "van gogh", "painting"
TEMPLATES = ("{}", "a painting by {}", "an image in the style of {}")
ORDINARY = ["a photo of a cat", "a castle on a hill at night", "a red car on a street", "a bowl of fruit on a table",
            "a house by the sea", "a portrait of a woman"]
CORPUS = ["a photo of a cat", "a painting by van gogh", "an image in the style of van gogh", "a painting of a dog",
          "the quick brown fox jumps over the lazy dog", "a castle on a hill at night", "a red car on a street",
          "a bowl of fruit on a table", "a portrait of a woman", "a house by the sea"]
TRAINED = {f"encoder/block/0/layer/{p}" for p in (
    "0/layer_norm/scale", "0/SelfAttention/q/kernel", "0/SelfAttention/k/kernel", "0/SelfAttention/v/kernel",
    "0/SelfAttention/o/kernel", "1/layer_norm/scale", "1/DenseReluDense/wi_0/kernel", "1/DenseReluDense/wi_1/kernel",
    "1/DenseReluDense/wo/kernel")}
BIAS = "encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"


def tiny_t5_tokenizer():
    """A T5 tokenizer built offline: a Unigram model trained on CORPUS; </s> (1) appended, <pad> = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 4, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def t5_folder(out: Path, seed: int = 3) -> Path:
    tokenizer = tiny_t5_tokenizer()
    config = T5EncoderConfig(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                             relative_attention_num_buckets=8, relative_attention_max_distance=16)
    save_t5_folder(T5Encoder.init(config, seed=seed), out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return t5_folder(tmp_path_factory.mktemp("t5") / "t5")


def erase(workdir: Path, encoder: Path, *overrides: str, objective: str = "hirm_s") -> int:
    return main(["erase", f"--config={TINY}:{objective}", f"--workdir={workdir}",
                 f"--config.encoder.path={encoder}", f"--config.encoder.max_length={MAX_LENGTH}",
                 f"--config.concepts=('{CONCEPT}',)", f"--config.super_categories={{'{CONCEPT}': '{ANCHOR}'}}",
                 *overrides])


@pytest.fixture(scope="module")
def erased_s(t5_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("t5_s") / "w"
    assert erase(workdir, t5_dir, "--config.report.enabled=True",
                 f"--config.report.ordinary_prompts_file={write_lines(workdir.parent / 'ordinary.txt', ORDINARY)}",
                 f"--config.report.paraphrases_file={write_lines(workdir.parent / 'para.txt', ['a picture by {}'])}"
                 ) == 0
    return workdir


@pytest.fixture(scope="module")
def erased_r(t5_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("t5_r") / "w"
    # gaussian targets: RMU's uniform ones all lie near the all-ones direction (cos ~0.75 between
    # positions), so in a tiny model a global shift moves ordinary prompts toward them as much
    assert erase(workdir, t5_dir, "--config.train.learning_rate=3e-3", "--config.objective.random_distribution=gaussian",
                 objective="hirm_r") == 0
    return workdir


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def hook_reps(encoder: T5Encoder, params, tokenizer, texts) -> np.ndarray:
    batch = tokenizer(list(texts), padding="max_length", max_length=MAX_LENGTH, return_tensors="np")
    return np.asarray(encoder.apply(params, jnp.asarray(batch["input_ids"], jnp.int32))["mlp_out"][-1])


def cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over prompts and positions of the cosine between a and b ([N, T, D])."""
    num = (a * b).sum(-1)
    return float(np.mean(num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)))


def movement(workdir: Path, tokenizer, targets_for) -> dict:
    """cos to the target before/after erasure and the fraction of the squared distance removed,
    for the concept prompts and for ordinary prompts (measured against the same targets)."""
    run = load_run(workdir)
    out = {}
    for name, texts in (("concept", [t.format(CONCEPT) for t in TEMPLATES]), ("ordinary", ORDINARY[:3])):
        target = targets_for(run, tokenizer)
        before, after = (hook_reps(run.base, p, tokenizer, texts) for p in (run.base.params, run.erased_params))
        d0, d1 = (float(np.mean(np.sum((x - target) ** 2, -1))) for x in (before, after))
        out[name] = dict(cos_before=cos(before, target), cos_after=cos(after, target), gain=1 - d1 / d0)
    return out


@pytest.mark.slow
def test_t5_hirm_s_moves_concept_toward_its_anchor(erased_s, t5_dir):
    tokenizer = load_t5_tokenizer(t5_dir)
    anchors = lambda run, tok: hook_reps(run.base, run.base.params, tok, [t.format(ANCHOR) for t in TEMPLATES])
    m = movement(erased_s, tokenizer, anchors)
    print("hirm_s", json.dumps(m))
    assert m["concept"]["gain"] > 0.5, m
    assert m["concept"]["cos_after"] > m["concept"]["cos_before"] + 0.1, m
    assert m["concept"]["gain"] > m["ordinary"]["gain"] + 0.2, m
    run = json.loads((erased_s / "run.json").read_text())
    assert run["encoder_config"]["d_model"] == 64 and run["base"]["component"] is None
    report = json.loads((erased_s / "text_report.json").read_text())  # the report runs on T5 too
    assert report["sets"]["targets"]["num_prompts"] == len(TEMPLATES)
    assert report["sets"]["targets"]["cos_to_target"]["mean"] > report["sets"]["targets"]["cos_to_target_before"]["mean"]


@pytest.mark.slow
def test_t5_hirm_r_moves_concept_toward_the_random_target(erased_r, t5_dir):
    from hirm_jax.erase.jobs import concept_key
    tokenizer = load_t5_tokenizer(t5_dir)
    config = json.loads((erased_r / "config.json").read_text())
    scale = config["objective"]["scale"]

    def random_target(run, tok):  # c * r_t per position, as problem.build_jobs draws it
        r = objectives.random_targets(concept_key(config["train"]["seed"], f"{CONCEPT}|last_mlp_out"), MAX_LENGTH,
                                      run.base.config.d_model, config["objective"]["random_distribution"])
        return np.asarray(r)[None] * scale
    m = movement(erased_r, tokenizer, random_target)
    print("hirm_r", json.dumps(m))
    assert m["concept"]["cos_after"] > m["concept"]["cos_before"] + 0.15, m
    assert m["concept"]["cos_after"] - m["concept"]["cos_before"] > \
        2 * (m["ordinary"]["cos_after"] - m["ordinary"]["cos_before"]), m


@pytest.mark.slow
def test_t5_only_block0_own_leaves_train_the_rest_is_bit_identical_to_the_base_file(erased_s, t5_dir, tmp_path):
    run = json.loads((erased_s / "run.json").read_text())
    assert set(run["trainable_paths"]) == TRAINED and BIAS not in run["trainable_paths"]
    assert main(["export", f"--workdir={erased_s}", f"--out={tmp_path / 'full'}", "--format=full"]) == 0
    base, full = load_file(str(t5_dir / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors"))
    assert set(full) == set(base)
    config = T5EncoderConfig.from_hf_dict(json.loads((t5_dir / "config.json").read_text()))
    trained_keys = {hf for hf, path, _ in expand_t5_table(config) if "/".join(path) in TRAINED}
    assert len(trained_keys) == len(TRAINED)
    for key in sorted(base):
        if key in trained_keys:
            assert not np.array_equal(full[key], base[key]), f"{key} did not train"
        else:
            assert full[key].dtype == base[key].dtype and full[key].tobytes() == base[key].tobytes(), key
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in base
    assert not trained_keys & {k for k in base if not k.startswith("encoder.block.0.")}


@pytest.mark.slow
def test_t5_delta_applies_to_the_folder_and_matches_the_flax_erased_encoder(erased_s, t5_dir, tmp_path):
    import torch
    from transformers import T5EncoderModel
    assert main(["export", f"--workdir={erased_s}", f"--out={tmp_path / 'delta'}", "--format=delta"]) == 0
    keys = set(load_file(str(tmp_path / "delta" / "hirm_delta.safetensors")))
    assert keys and all(k.startswith("text_encoder.encoder.block.0.layer.") for k in keys), keys
    assert not any("relative_attention_bias" in k for k in keys)
    assert main(["apply", f"--delta={tmp_path / 'delta'}", f"--base={t5_dir}", f"--out={tmp_path / 'out'}"]) == 0
    model = T5EncoderModel.from_pretrained(str(tmp_path / "out")).eval()
    run = load_run(erased_s)
    tokenizer = load_t5_tokenizer(t5_dir)
    ids = tokenizer([t.format(CONCEPT) for t in TEMPLATES] + ORDINARY, padding="max_length", max_length=MAX_LENGTH,
                    return_tensors="np")["input_ids"]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    flax_out = np.asarray(run.base.apply(run.erased_params, jnp.asarray(ids, jnp.int32))["last_hidden_state"])
    np.testing.assert_allclose(torch_out, flax_out, atol=1e-4, rtol=0)
    base_out = np.asarray(run.base.apply(run.base.params, jnp.asarray(ids, jnp.int32))["last_hidden_state"])
    assert np.abs(base_out - flax_out).max() > 1e-2  # the applied delta is not the base


@pytest.mark.slow
def test_t5_erase_from_a_pipeline_text_encoder_2(t5_dir, tmp_path):
    import torch
    from transformers import T5EncoderModel
    pipeline = tmp_path / "flux"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    shutil.copytree(t5_dir, pipeline / "text_encoder_2", ignore=shutil.ignore_patterns("tokenizer*"))
    (pipeline / "tokenizer_2").mkdir()
    for f in t5_dir.glob("tokenizer*"):
        shutil.copy(f, pipeline / "tokenizer_2" / f.name)
    workdir = tmp_path / "w"
    assert erase(workdir, pipeline, "--config.encoder.component=text_encoder_2", "--config.train.epochs=3",
                 "--config.objective.hooks=('last_mlp_out', 'final_ln')") == 0  # as configs/flux.py:text_encoder_2
    assert main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'delta'}"]) == 0
    keys = set(load_file(str(tmp_path / "delta" / "hirm_delta.safetensors")))
    assert keys and all(k.startswith("text_encoder_2.encoder.block.0.") for k in keys), keys
    assert main(["apply", f"--delta={tmp_path / 'delta'}", f"--base={pipeline}", f"--out={tmp_path / 'out'}"]) == 0
    model = T5EncoderModel.from_pretrained(str(tmp_path / "out" / "text_encoder_2")).eval()
    run = load_run(workdir)
    ids = load_t5_tokenizer(pipeline / "tokenizer_2")(ORDINARY, padding="max_length", max_length=MAX_LENGTH,
                                                       return_tensors="np")["input_ids"]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    flax_out = np.asarray(run.base.apply(run.erased_params, jnp.asarray(ids, jnp.int32))["last_hidden_state"])
    np.testing.assert_allclose(torch_out, flax_out, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_t5_hirm_s_vector_with_frozen_leaves_split_over_fsdp(t5_dir, tmp_path):
    pairs = write_lines(tmp_path / "pairs.tsv", ["a painting by van gogh\ta painting", "van gogh\tpainting"])
    workdir = tmp_path / "w"
    assert erase(workdir, t5_dir, "--config.objective.name=hirm_s_vector", f"--config.objective.vector_pairs_file={pairs}",
                 "--config.train.epochs=5", "--config.mesh.fsdp=2") == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["misdirection"] < rows[0]["misdirection"]
    assert set(json.loads((workdir / "run.json").read_text())["trainable_paths"]) == TRAINED


def test_t5_robust_erasure_is_refused_until_t5_has_an_attack(t5_dir, tmp_path, capsys):
    assert erase(tmp_path / "w", t5_dir, "--config.objective.adversarial.enabled=True") == 2
    assert "objective.adversarial needs a CLIP text encoder; the t5 encoder" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_t5_prompt_longer_than_max_length_is_an_error_naming_it(t5_dir, tmp_path, capsys):
    long_template = "an image in the style of {} " + "on a hill at night " * 4
    assert erase(tmp_path / "w", t5_dir, f"--config.templates=('{{}}', '{long_template}')") != 0
    err = capsys.readouterr().err
    assert f"must fit in {MAX_LENGTH} tokens (with </s>)" in err and "an image in the style of van gogh on a" in err
    assert not (tmp_path / "w").exists()
    assert main(["erase", f"--config={TINY}", f"--workdir={tmp_path / 'w'}", f"--config.encoder.path={t5_dir}",
                 f"--config.concepts=('{CONCEPT}',)", f"--config.super_categories={{'{CONCEPT}': '{ANCHOR}'}}"]) != 0
    err = capsys.readouterr().err
    assert "encoder.max_length must be set for a t5 encoder" in err and "512" in err
    assert erase(tmp_path / "w", t5_dir, "--config.objective.hooks=('text_embeds',)") == 2
    assert "t5 encoder" in capsys.readouterr().err
    assert erase(tmp_path / "w", t5_dir, "--config.objective.hooks=('pooled',)") == 2
    assert "hook 'pooled' needs a CLIP encoder" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_t5_selection_and_positions():
    """Unit level: the module names select block 0's own leaves, never the shared bias (a regex
    can); T5 has no BOS, so all_but_bos weighs every position."""
    arch = architecture("t5")
    encoder = T5Encoder.init(T5EncoderConfig(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                             relative_attention_num_buckets=8), seed=0)
    modules = ("self_attn", "mlp", "layer_norm1", "layer_norm2")
    assert set(masking.trainable_paths(encoder.params, (0,), modules, "", arch)) == TRAINED
    assert set(masking.trainable_paths(encoder.params, (-1,), ("mlp",), "", arch)) == {
        f"encoder/block/1/layer/1/DenseReluDense/{w}/kernel" for w in ("wi_0", "wi_1", "wo")}
    assert masking.trainable_paths(encoder.params, (0,), (), ".*relative_attention_bias.*", arch) == [BIAS]
    ids = jnp.array([[5, 6, 1, 0]])
    mask = (ids != 0).astype(jnp.int32)
    np.testing.assert_array_equal(objectives.position_weights(ids, mask, "all_but_bos", "final_ln", has_bos=False),
                                  [[1, 1, 1, 1]])
    np.testing.assert_array_equal(
        objectives.position_weights(ids, mask, "non_padding_but_bos", "final_ln", has_bos=False), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(objectives.position_weights(ids, mask, "all_but_bos", "final_ln"), [[0, 1, 1, 1]])
