"""The bad-input suite for `hirm-jax erase` (issue 10): every bad input is one `error:` line
that names the value and the rule (exit 2; 3 when the machine refuses a write), and nothing
is written. Erase runs here are a few steps of the tiny config on the tiny encoder."""

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from configs import tiny
from hirm_jax import config_lib
from hirm_jax.erase import masking
from hirm_jax.cli import main
from hirm_jax.artifacts.delta import fingerprint
from hirm_jax.fileio import folder_lock, sha256_file
from hirm_jax.run import train_and_evaluate

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def erase(workdir, encoder, *overrides, config="tiny"):
    return main(["erase", f"--config={config}", f"--config.encoder.path={encoder}", f"--workdir={workdir}",
                 "--config.train.epochs=2", *overrides])


def one_error_line(capsys, *needles) -> str:
    """The single `error:` line of stderr, which must contain every needle."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def copy_tokenizer(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)


# ----------------------------------------------------------------------------- 1, 2: the base

@pytest.mark.slow
def test_run_json_fingerprints_the_base(encoder_dir, tmp_path, capsys):
    from hirm_jax.encoder.layouts import load_text_encoder
    assert erase(tmp_path / "w", encoder_dir) == 0
    base = json.loads((tmp_path / "w" / "run.json").read_text())["base"]
    flat = masking.flatten(load_text_encoder(encoder_dir).params)
    trained = load_file(str(tmp_path / "w" / "erased_trainable.safetensors"))
    assert set(base["trainable_sha256"]) == set(trained)
    for path, digest in base["trainable_sha256"].items():
        assert digest == fingerprint(np.asarray(flat[path], np.float32)), path
    assert base["files_sha256"] == {"model.safetensors": sha256_file(encoder_dir / "model.safetensors")}
    assert base["source"] == str(Path(encoder_dir).resolve()) and base["component"] is None


def hub_cache(root: Path, encoder_dir: Path, repo: str = "org/name") -> tuple[Path, str]:
    """A Hugging Face hub cache holding one snapshot of a pipeline repo (text encoder + tokenizer)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (snapshot / "text_encoder").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(encoder_dir / name, snapshot / "text_encoder" / name)
    copy_tokenizer(encoder_dir, snapshot / "tokenizer")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return snapshot, commit


@pytest.mark.slow
def test_hub_id_resolves_through_the_cache_and_run_json_records_the_revision(encoder_dir, tmp_path, monkeypatch,
                                                                                capsys):
    import huggingface_hub.constants
    from hirm_jax import hub
    snapshot, commit = hub_cache(tmp_path / "hub", encoder_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve("org/name", component="text_encoder").path == snapshot  # really the test cache

    assert erase(tmp_path / "w", "org/name", "--config.encoder.component=text_encoder") == 0
    base = json.loads((tmp_path / "w" / "run.json").read_text())["base"]
    assert base["source"] == "org/name" and base["revision"] == commit and base["component"] == "text_encoder"
    assert base["files_sha256"] == {"text_encoder/model.safetensors": sha256_file(encoder_dir / "model.safetensors")}


# ----------------------------------------------------------------------------- 3: -1 means default

@pytest.mark.parametrize("field, value", [("train.epochs", "-7"), ("train.epochs", "0"),
                                          ("train.learning_rate", "-3"), ("train.learning_rate", "0"),
                                          ("objective.scale", "-2"), ("objective.scale", "0")])
def test_only_minus_one_means_default(encoder_dir, tmp_path, capsys, field, value):
    assert erase(tmp_path / "w", encoder_dir, f"--config.{field}={value}") == 2
    line = one_error_line(capsys, field, "-1 for the default")
    assert f"but is {float(value):g}" in line.replace(".0", "")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- 4, 10: resume

RESUME_FLAGS = ("--config.train.epochs=3", "--config.train.batch_size=2", "--config.train.checkpoint_every=2")


def interrupted(encoder_dir, workdir: Path, steps: int) -> None:
    """The run of RESUME_FLAGS, stopped after `steps` steps, as a kill would."""
    c = tiny.get_config()
    c.encoder.path = str(encoder_dir)
    c.train.epochs, c.train.batch_size, c.train.checkpoint_every = 3, 2, 2
    assert train_and_evaluate(c, workdir, stop_after=steps)["status"] == "interrupted"


@pytest.mark.slow
def test_resumed_erase_writes_the_same_bytes(encoder_dir, tmp_path, capsys):
    assert erase(tmp_path / "full", encoder_dir, *RESUME_FLAGS) == 0
    interrupted(encoder_dir, tmp_path / "resumed", steps=3)
    assert erase(tmp_path / "resumed", encoder_dir, *RESUME_FLAGS) == 0
    full = (tmp_path / "full" / "erased_trainable.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "erased_trainable.safetensors").read_bytes() == full


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_on_resume(encoder_dir, tmp_path, capsys):
    interrupted(encoder_dir, tmp_path / "w", steps=2)
    metrics = tmp_path / "w" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.5, "misdir')  # killed between the two writes of a flush
    assert erase(tmp_path / "w", encoder_dir, *RESUME_FLAGS) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses
    assert rows[-1]["step"] == 6 and (tmp_path / "w" / "loss.png").stat().st_size > 0


# ----------------------------------------------------------------------------- 5: NaN base, foreign tokenizer

def test_nonfinite_base_weight_is_named_before_training(encoder_dir, tmp_path, capsys):
    folder = tmp_path / "nan_encoder"
    shutil.copytree(encoder_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["text_model.encoder.layers.1.mlp.fc1.weight"][0, 0] = np.nan
    save_file(state, str(folder / "model.safetensors"))
    assert erase(tmp_path / "w", folder) == 2
    line = one_error_line(capsys, "encoder/layers/1/mlp/fc1/kernel", "1 NaN", "non-finite")
    assert "learning_rate" not in line
    assert not (tmp_path / "w").exists()


def test_token_ids_beyond_the_vocabulary_name_the_prompt(encoder_dir, tmp_path, capsys):
    from tests.fixtures_pipelines import TINY_CONFIG, save_encoder_folder, tiny_encoder
    folder = save_encoder_folder(tiny_encoder(seed=0), tmp_path / "small_vocab")  # vocab_size 525
    copy_tokenizer(encoder_dir, folder)  # the real CLIP tokenizer: ids up to 49407
    assert erase(tmp_path / "w", folder) == 2
    one_error_line(capsys, "'Van Gogh'", f"vocab_size is {TINY_CONFIG.vocab_size}", "encoder.tokenizer")
    assert not (tmp_path / "w").exists()


def test_the_first_id_past_the_vocabulary_is_refused_the_last_one_in_it_is_not():
    from types import SimpleNamespace
    from hirm_jax.config_lib import ConfigError
    from hirm_jax.erase.jobs import check_token_ids
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda i: f"tok{i}")
    check_token_ids(np.array([[0, 524]]), ["ok"], 525, tokenizer)
    with pytest.raises(ConfigError, match=r"prompt 'x' has token 'tok525' with id 525, but the encoder's vocab_size is 525"):
        check_token_ids(np.array([[0, 1], [3, 525]]), ["ok", "x"], 525, tokenizer)


@pytest.mark.parametrize("rows, bad", [(["with_concept\twithout_concept"], "rows []"),
                                       (["a painting by van gogh\ta painting", "van gogh"], "rows [2]")])
def test_vector_pairs_rows_must_hold_two_prompts(encoder_dir, tmp_path, capsys, rows, bad):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("\n".join(rows) + "\n")
    assert erase(tmp_path / "w", encoder_dir, "--config.objective.name=hirm_s_vector",
                 f"--config.objective.vector_pairs_file={pairs}") == 2
    one_error_line(capsys, str(pairs), "2 tab-separated prompts", bad)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_nan_loss_before_any_checkpoint_never_says_step_none(encoder_dir, tmp_path, capsys):
    assert erase(tmp_path / "w", encoder_dir, "--config.objective.scale=inf", "--config.train.epochs=1") == 2
    line = one_error_line(capsys, "NaN/inf at step 1", "No checkpoint had been saved yet")
    assert "None" not in line


# ----------------------------------------------------------------------------- 6: pickles

@pytest.mark.slow
def test_pickle_refusal_offers_erases_own_switch_and_the_switch_works(encoder_dir, tmp_path, capsys):
    import torch
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(encoder_dir / "config.json", folder / "config.json")
    copy_tokenizer(encoder_dir, folder)
    state = {k: torch.from_numpy(np.array(v)) for k, v in load_file(str(encoder_dir / "model.safetensors")).items()}
    torch.save(state, folder / "pytorch_model.bin")

    assert erase(tmp_path / "refused", folder) == 2
    line = one_error_line(capsys, "pytorch_model.bin", "--config.encoder.allow_pickle=True")
    assert "(--allow-pickle)" not in line and not (tmp_path / "refused").exists()

    assert erase(tmp_path / "w", folder, "--config.encoder.allow_pickle=True", "--config.train.epochs=1") == 0
    base = json.loads((tmp_path / "w" / "run.json").read_text())["base"]
    assert base["files_sha256"] == {"pytorch_model.bin": sha256_file(folder / "pytorch_model.bin")}


# ----------------------------------------------------------------------------- 7, 8: config fields

def test_nested_field_typo_prints_the_message_not_its_repr(encoder_dir, tmp_path, capsys):
    assert erase(tmp_path / "w", encoder_dir, "--config.train.epoch=3") == 2
    line = one_error_line(capsys, "--config.train.epoch", "'epoch'", 'did you mean "epochs"')
    assert "\\n" not in line and "\\'" not in line
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_dotted_concept_names_inline_with_a_case_insensitive_super_category(encoder_dir, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)  # and the shipped config by name, from a folder without configs/
    assert erase(tmp_path / "w", encoder_dir, "--config.concepts=('Dr. Seuss',)",
                 "--config.super_categories={'dr. seuss': 'author'}", "--config.train.epochs=1",
                 config="tiny:hirm_s") == 0
    run = json.loads((tmp_path / "w" / "run.json").read_text())
    assert run["concepts"] == ["Dr. Seuss"] and run["anchors"] == {"Dr. Seuss": "author"}
    assert json.loads((tmp_path / "w" / "config.json").read_text())["super_categories"] == {"dr. seuss": "author"}


def test_concepts_and_concepts_file_together_is_an_error(encoder_dir, tmp_path, capsys):
    listing = tmp_path / "concepts.tsv"
    listing.write_text("Monet\tpainting\n")
    assert erase(tmp_path / "w", encoder_dir, f"--config.concepts_file={listing}") == 2
    one_error_line(capsys, "concepts=('Van Gogh',)", f"concepts_file='{listing}'", "both set")
    assert not (tmp_path / "w").exists()


def test_super_categories_that_differ_only_in_case_are_an_error(encoder_dir, tmp_path, capsys):
    assert erase(tmp_path / "w", encoder_dir, "--config.super_categories={'Van Gogh': 'a', 'van gogh': 'b'}") == 2
    one_error_line(capsys, "'Van Gogh'", "'van gogh'", "case-insensitively")


# ----------------------------------------------------------------------------- 9, 11: the workdir

@pytest.mark.slow
def test_a_second_erase_on_a_locked_workdir_names_the_holder(encoder_dir, tmp_path, capsys):
    workdir = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hirm_jax.fileio import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(300)\n", str(workdir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert erase(workdir, encoder_dir) == 2
        one_error_line(capsys, f"workdir {workdir}", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing written


def test_a_lock_held_on_another_handle_of_this_process_also_refuses(encoder_dir, tmp_path, capsys):
    with folder_lock(tmp_path / "w"):  # flock locks belong to the open file description
        assert erase(tmp_path / "w", encoder_dir) == 2
    one_error_line(capsys, "is in use by another process", f"pid {os.getpid()}")


def test_workdir_that_is_an_encoder_folder_is_refused_untouched(encoder_dir, tmp_path, capsys):
    before = sorted(p.name for p in Path(encoder_dir).iterdir())
    assert erase(encoder_dir, encoder_dir) == 2
    one_error_line(capsys, f"--workdir={encoder_dir}", "not an erase workdir", "transformers model folder")
    assert sorted(p.name for p in Path(encoder_dir).iterdir()) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    assert erase(other, encoder_dir) == 2
    one_error_line(capsys, "holds 1 entry (notes.txt)")


# ----------------------------------------------------------------------------- 12: refused checkpoint writes

@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']"),
], ids=["oserror", "tensorstore"])
@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(encoder_dir, tmp_path, monkeypatch,
                                                                                  capsys, failure):
    original, calls = ocp.CheckpointManager.save, []

    def save_then_fail(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) > 1:
            raise failure
        return original(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save_then_fail)
    assert erase(tmp_path / "w", encoder_dir, "--config.train.epochs=4", "--config.train.checkpoint_every=2") == 3
    one_error_line(capsys, f"checkpoint {tmp_path / 'w' / 'checkpoints'}", "the disk is full",
                   "last good checkpoint (step 2) is kept")
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ["2"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_is_one_line(encoder_dir, tmp_path, capsys):
    interrupted(encoder_dir, tmp_path / "w", steps=2)
    (tmp_path / "w" / "checkpoints").chmod(0o555)
    try:
        assert erase(tmp_path / "w", encoder_dir, *RESUME_FLAGS) == 3
    finally:
        (tmp_path / "w" / "checkpoints").chmod(0o755)
    one_error_line(capsys, str(tmp_path / "w" / "checkpoints"), "permission denied", "last good checkpoint (step 2)")


# ----------------------------------------------------------------------------- 13: --config

def test_config_file_missing_from_this_folder_lists_the_shipped_configs(encoder_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert erase(tmp_path / "w", encoder_dir, config="configs/tiny.py") == 2
    one_error_line(capsys, "configs/tiny.py does not exist", "sd14_style[:hirm_s|hirm_r]", "tiny")
    assert erase(tmp_path / "w", encoder_dir, config="tiny:hirm_x") == 2
    one_error_line(capsys, "tiny:hirm_x", "['hirm_s', 'hirm_r']")
    assert not (tmp_path / "w").exists()


def test_shipped_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_lib.resolve_config_argument("sd14_style:hirm_r") == f"{REPO / 'configs' / 'sd14_style.py'}:hirm_r"
    assert config_lib.resolve_config_argument("sdxl.py") == str(REPO / "configs" / "sdxl.py")
    (tmp_path / "mine.py").write_text("")
    assert config_lib.resolve_config_argument("mine.py:x") == "mine.py:x"  # an existing file wins
    with pytest.raises(config_lib.ConfigError, match="not the name of a shipped config"):
        config_lib.resolve_config_argument("elsewhere/sd14_style.py")


def shipped_config_cases():
    return [(name, arg) for name, path in sorted(config_lib.shipped_configs().items())
            for arg in (config_lib.config_args(path) or (None,))]


@pytest.mark.parametrize("name, arg", shipped_config_cases())
def test_every_shipped_config_builds_and_locks(name, arg):
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # what --config runs
    path = config_lib.shipped_configs()[name]
    config = ConfigFileFlagParser("config").parse(f"{path}:{arg}" if arg else str(path))
    assert config.is_locked
    json.loads(config.to_json())
    resolved = config_lib.resolve_defaults(config)
    if config.encoder.path:
        config_lib.validate(resolved)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(f"shipped_{name}", path))
    module.__spec__.loader.exec_module(module)
    if getattr(module, "ARGS", None):
        with pytest.raises(config_lib.ConfigError, match="must be one of"):
            module.get_config("no_such_arg")
