"""Issue 10, the bad-input suite: packaging (configs and data in the wheel, a quiet install),
hub ids for `generate --pipeline`, and commands that touch nothing on bad input.

The wheel is built from a copy of the checkout (the build writes build/ and *.egg-info next to
setup.py) and run from an empty folder with only the unpacked wheel and the test environment's
site-packages on the path (`python -S`: the checkout's editable install is not loaded).
Hub ids resolve offline against a Hugging Face cache folder the test builds.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hirm_jax import hub
from hirm_jax.artifacts import export
from hirm_jax.pipelines import generate as gen
from hirm_jax.cli import main
from hirm_jax.errors import InputMissingError
from hirm_jax.evaluation import suites
from hirm_jax.evaluation.metrics import proportion
from tests.fixtures_pipelines import fabricate_workdir, save_encoder_folder, save_sd_pipeline, tiny_encoder

ROOT = Path(__file__).resolve().parent.parent
SITE_PACKAGES = sysconfig.get_paths()["purelib"]  # the test environment's (torch, jax, ...), without its .pth files
NOT_SOURCE = shutil.ignore_patterns(".venv*", ".git", "__pycache__", "*.egg-info", "build", "dist", "workdirs", "tmp",
                                    ".pytest_cache")
ABSENT_PACKAGE_WARNING = re.compile(r"absent from the\s+`?packages`? configuration")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "org/tiny-sd"


# ---------------------------------------------------------------- packaging

@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout, as a fresh clone would have it (no virtualenvs, caches or build output)."""
    pytest.importorskip("setuptools")
    copy = tmp_path_factory.mktemp("source") / "hirm_jax_src"
    shutil.copytree(ROOT, copy, ignore=NOT_SOURCE)
    return copy


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> tuple[Path, str]:
    """(the wheel built from `source`, the build's output)."""
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(source)], cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = dist.glob("hirm_jax-*.whl")
    return path, build.stdout + build.stderr


def _files_under(folder: Path) -> list[str]:
    """Files of a checkout folder, relative to the repository root (no __pycache__)."""
    return sorted(p.relative_to(ROOT).as_posix() for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def _run_isolated(args: list[str], cwd: Path, path: list[str], env_extra=None) -> subprocess.CompletedProcess:
    """`python -S ARGS` in `cwd` with only `path` + the test environment's site-packages importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(PYTHONPATH=os.pathsep.join([*path, SITE_PACKAGES]), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               HIRM_JAX_CACHE_DIR="off", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_holds_configs_and_data_but_no_tests_and_builds_quietly(wheel):
    path, log = wheel
    names = set(zipfile.ZipFile(path).namelist())
    configs = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
    assert "__init__.py" in configs and "sd14_style.py" in configs
    assert {f"hirm_jax/configs/{name}" for name in configs} <= names
    data = _files_under(ROOT / "hirm_jax" / "data") + _files_under(ROOT / "hirm_jax" / "world" / "shipped")
    assert len(data) > 10 and not set(data) - names, sorted(set(data) - names)
    modules = [p for p in _files_under(ROOT / "hirm_jax") if p.endswith(".py")]
    assert not set(modules) - names, sorted(set(modules) - names)
    assert {name.split("/")[0] for name in names} == {"hirm_jax", path.name.split("-py3")[0] + ".dist-info"}
    assert not [line for line in log.splitlines() if ABSENT_PACKAGE_WARNING.search(line)]


def test_installed_wheel_finds_its_shipped_configs_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel[0]).extractall(site)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    probe = ("import importlib.resources as r, json, hirm_jax.configs as c; "
             "from hirm_jax.configs import demo, sd14_nudity; "
             "n = sd14_nudity.get_config(); d = demo.get_config(); "
             "print(json.dumps([c.__file__, sorted(p.name for p in r.files('hirm_jax.configs').iterdir() "
             "if p.name.endswith('.py')), str(n.concepts_file), r.files('hirm_jax.configs').joinpath("
             "'sd14_style.py').is_file()]))")
    result = _run_isolated(["-c", probe], empty, [str(site)])
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, names, concepts_file, has_style = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(module_file).is_relative_to(site) and Path(concepts_file).is_relative_to(site)
    assert names == sorted(p.name for p in (ROOT / "configs").glob("*.py")) and has_style


@pytest.mark.slow
def test_installed_erase_resolves_a_shipped_config_name(wheel, tmp_path):
    """`--config=sd14_style:hirm_s` from a folder without configs/ loads the shipped config: the run
    stops at its encoder (a hub id, unresolvable offline), not at the config name."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel[0]).extractall(site)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    result = _run_isolated(["-m", "hirm_jax.cli", "erase", "--config=sd14_style:hirm_s",
                            f"--workdir={tmp_path / 'run'}"], empty, [str(site)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "CompVis/stable-diffusion-v1-4" in result.stderr, result.stderr[-3000:]
    assert "does not exist" in result.stderr or "could not be resolved" in result.stderr


def test_editable_install_maps_hirm_jax_configs_to_the_checkouts_configs(source, tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    build = subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; "
                            "print(b.build_editable(sys.argv[1]))", str(dist)],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert not ABSENT_PACKAGE_WARNING.search(build.stdout + build.stderr)
    site = tmp_path / "site"
    zipfile.ZipFile(next(dist.glob("*.whl"))).extractall(site)
    probe = ("import site, sys, json; site.addsitedir(sys.argv[1]); "
             "import hirm_jax, hirm_jax.configs.sd14_style as s; print(json.dumps([hirm_jax.__file__, s.__file__]))")
    # `site` first on the path: the test environment has a finder module of the same name (the checkout's).
    result = _run_isolated(["-c", probe, str(site)], tmp_path, [str(site)])
    assert result.returncode == 0, result.stderr[-3000:]
    package, config = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(package) == source / "hirm_jax" / "__init__.py"
    assert Path(config) == source / "configs" / "sd14_style.py"


# ---------------------------------------------------------------- hub ids

def test_parse_hub_id_and_a_local_folder_named_like_a_hub_id_wins(tmp_path, monkeypatch):
    assert hub.parse_hub_id("CompVis/stable-diffusion-v1-4") == ("CompVis/stable-diffusion-v1-4", None)
    assert hub.parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for not_an_id in ("name", "./org/name", "/abs/org/name", "~/org/name", "a/b/c", "org/name@", ""):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.parse_hub_id("org/name") is None
    source = hub.resolve("org/name", component="text_encoder")
    assert source == hub.Source(Path("org/name")) and source.provenance() == {"source": str((tmp_path / "org/name").resolve())}
    with pytest.raises(InputMissingError, match=r"--pipeline \./missing does not exist"):
        hub.resolve("./missing", what="--pipeline")


SD_REPO_FILES = ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "tokenizer/tokenizer_config.json", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                 "tokenizer_2/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "safety_checker/model.safetensors",
                 "scheduler/scheduler_config.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors"]
ENCODER_REPO_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                      "vision_model/model.safetensors"]


def _fetched(monkeypatch, value, files, **kwargs) -> tuple[list[str], dict]:
    """The files of `files` that hub.resolve(value, **kwargs) asks snapshot_download for, and its arguments."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    calls = []

    def fake_snapshot_download(repo_id, **options):
        calls.append(dict(repo_id=repo_id, **options))
        return f"/cache/models--x/snapshots/{COMMIT}"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = hub.resolve(value, **kwargs)
    (call,) = calls
    assert source == hub.Source(Path(f"/cache/models--x/snapshots/{COMMIT}"), call["repo_id"], COMMIT)
    kept = filter_repo_objects(files, allow_patterns=call["allow_patterns"], ignore_patterns=call["ignore_patterns"])
    return sorted(kept), call


def test_encoder_download_asks_only_for_the_component_its_tokenizer_and_model_index(monkeypatch):
    files, call = _fetched(monkeypatch, "org/sd@v2", SD_REPO_FILES, component="text_encoder")
    assert (call["repo_id"], call["revision"]) == ("org/sd", "v2")
    assert files == ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                     "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
    files, _ = _fetched(monkeypatch, "org/sdxl", SD_REPO_FILES, component="text_encoder_2")
    assert files == ["model_index.json", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                     "tokenizer_2/vocab.json"]
    # A bare encoder repo (no component): its top-level weights and tokenizer, no other folder.
    files, call = _fetched(monkeypatch, "openai/clip", ENCODER_REPO_FILES)
    assert call["revision"] is None
    assert files == ["config.json", "merges.txt", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json"]
    # A whole pipeline (generate --pipeline): every component, but no pickled duplicates.
    files, call = _fetched(monkeypatch, "org/sd", SD_REPO_FILES, whole_pipeline=True)
    assert call["allow_patterns"] is None
    assert not [f for f in files if f.endswith((".bin", ".ckpt"))] and "unet/diffusion_pytorch_model.safetensors" in files
    for pattern in hub.encoder_patterns("text_encoder") + hub.encoder_patterns(None):
        assert not pattern.startswith("*"), f"{pattern} would match files in every folder (unet/, vae/)"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face hub cache holding one tiny SD pipeline, HUB_ID at COMMIT (refs/main)."""
    root = tmp_path_factory.mktemp("hub_cache")
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    encoder = save_encoder_folder(tiny_encoder(seed=0), tmp_path_factory.mktemp("encoder") / "enc")
    save_sd_pipeline(repo / "snapshots" / COMMIT, encoder)
    return root


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """The test's hub cache as huggingface_hub's cache, offline; returns the snapshot folder."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return (hub_cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT).resolve()


def test_resolve_reads_the_hub_cache_offline(offline_hub):
    for value in (HUB_ID, f"{HUB_ID}@main", f"{HUB_ID}@{COMMIT}"):
        source = hub.resolve(value, whole_pipeline=True, what="--pipeline")
        assert (source.path.resolve(), source.hub_id, source.revision) == (offline_hub, HUB_ID, COMMIT), value
    assert source.provenance() == {"source": HUB_ID, "revision": COMMIT, "snapshot": str(source.path)}
    with pytest.raises(InputMissingError, match=r"--pipeline org/absent does not exist as a local path, and as a hub id it "
                                                r"could not be resolved: HF_HUB_OFFLINE is set"):
        hub.resolve("org/absent", whole_pipeline=True, what="--pipeline")


def _prompts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.txt"
    path.write_text("a photo of a cat\n")
    return path


TINY = ["--steps=1", "--height=32", "--width=32", "--dtype=float32"]


def test_generate_from_a_hub_id_records_its_revision(offline_hub, tmp_path):
    prompts = _prompts(tmp_path)
    for value, out in ((HUB_ID, tmp_path / "latest"), (f"{HUB_ID}@{COMMIT}", tmp_path / "pinned")):
        assert main(["generate", f"--pipeline={value}", f"--prompts={prompts}", f"--out={out}", *TINY]) == 0
        record = json.loads((out / gen.GENERATION).read_text())
        assert record["pipeline"] == HUB_ID
        assert record["pipeline_source"]["revision"] == COMMIT and record["pipeline_source"]["source"] == HUB_ID
        assert Path(record["pipeline_source"]["snapshot"]).resolve() == offline_hub
        assert len(gen.read_manifest(out)) == 1
    # eval carries it into results.json.
    suites.register_suite("bad-input-count", lambda ctx: suites.SuiteResult([proportion("n", 1, 1, True)]),
                          replace=True)
    assert main(["eval", "--suite=bad-input-count", f"--images={tmp_path / 'pinned'}"]) == 0
    results = json.loads((tmp_path / "pinned-eval-bad-input-count" / "results.json").read_text())
    assert results["images"][0]["generation"]["pipeline_source"]["revision"] == COMMIT


# ---------------------------------------------------------------- generate: nothing touched on bad input

def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_generate_refuses_an_output_over_its_inputs_and_touches_nothing(offline_hub, tmp_path, capsys):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(offline_hub, pipeline)
    prompts = _prompts(tmp_path / "inputs")
    before = _listing(tmp_path)
    for out, relation in ((pipeline, "is"), (pipeline / "images", "lies inside"), (tmp_path / "inputs", "contains"),
                          (tmp_path, "contains")):
        assert main(["generate", f"--pipeline={pipeline}", f"--prompts={prompts}", f"--out={out}", *TINY]) == 2
        assert f"{relation} the input --" in capsys.readouterr().err
        assert _listing(tmp_path) == before, out


def test_generate_creates_no_output_on_a_missing_or_misfit_input(offline_hub, tmp_path, capsys):
    prompts = _prompts(tmp_path)
    out = tmp_path / "out"
    common = [f"--pipeline={offline_hub}", f"--prompts={prompts}", f"--out={out}", *TINY]
    assert main(["generate", *common, f"--delta={tmp_path / 'no_delta'}"]) == 2
    assert f"error: --delta {tmp_path / 'no_delta'} does not exist" in capsys.readouterr().err
    assert main(["generate", *common, f"--denoiser={tmp_path / 'no.safetensors'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", f"--pipeline={tmp_path / 'no_pipeline'}", f"--prompts={prompts}", f"--out={out}"]) == 2
    assert f"--pipeline {tmp_path / 'no_pipeline'} does not exist" in capsys.readouterr().err
    assert main(["generate", f"--pipeline={offline_hub}", f"--prompts={tmp_path / 'no.txt'}", f"--out={out}"]) == 2
    assert f"error: prompt file {tmp_path / 'no.txt'} does not exist\n" in capsys.readouterr().err
    # A delta made for another base is refused when the pipeline loads: before out/ exists.
    other = tiny_encoder(seed=42)
    workdir, _ = fabricate_workdir(tmp_path / "other", other, source=save_encoder_folder(other, tmp_path / "enc"))
    foreign = export.export_delta(workdir, tmp_path / "foreign_delta")
    assert main(["generate", *common, f"--delta={foreign}"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask022", "umask027"])
def test_generate_output_follows_the_umask(offline_hub, tmp_path, mask, folder_mode, file_mode):
    prompts = _prompts(tmp_path)
    previous = os.umask(mask)
    try:
        out = gen.generate(offline_hub, gen.read_prompts(prompts), tmp_path / "a" / "out", steps=1, height=32,
                           width=32, dtype="float32")
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").rglob("*")}
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {folder_mode}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {file_mode}, modes
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == folder_mode and (out / gen.MANIFEST).is_file()


# ---------------------------------------------------------------- eval: nothing created on bad input

def _images_folder(folder: Path) -> Path:
    """An images folder as `hirm-jax generate` writes it, one 8x8 image."""
    (folder / gen.IMAGES).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / gen.IMAGES / "a_00.png")
    record = {"id": "a", "prompt": "x", "sample": 0, "seed": 1, "file": f"{gen.IMAGES}/a_00.png", "meta": {}}
    (folder / gen.MANIFEST).write_text(json.dumps(record) + "\n")
    return folder


def test_eval_creates_no_output_when_its_images_are_missing_or_empty(tmp_path, capsys):
    out = tmp_path / "results" / "eval"
    missing = tmp_path / "missing"
    assert main(["eval", "--suite=nudity", f"--images={missing}", f"--out={out}"]) == 2
    assert f"error: --images {missing} does not exist\n" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--suite=nudity", f"--images={tmp_path / 'empty'}", f"--out={out}"]) == 2
    assert "holds no manifest.jsonl" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / gen.MANIFEST).write_text("")
    assert main(["eval", "--suite=nudity", f"--images={tmp_path / 'blank'}", f"--out={out}"]) == 2
    assert "no images to evaluate" in capsys.readouterr().err
    images = _images_folder(tmp_path / "images")
    assert main(["eval", "--suite=nudity", f"--images={images}", f"--original={missing}", f"--out={out}"]) == 2
    assert f"--original {missing} does not exist" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "results").exists()


def test_eval_leaves_no_output_when_its_suite_fails(tmp_path, capsys):
    def runner(ctx):
        (ctx.out / "partial.txt").write_text("half")
        raise suites.SuiteError("the classifier option points at nothing")
    suites.register_suite("bad-input-failing", runner, replace=True)
    images = _images_folder(tmp_path / "images")
    assert main(["eval", "--suite=bad-input-failing", f"--images={images}", f"--out={tmp_path / 'out'}"]) == 2
    assert "the classifier option points at nothing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_eval_refuses_an_output_over_its_inputs_and_touches_nothing(tmp_path, capsys):
    images = _images_folder(tmp_path / "data" / "images")
    original = _images_folder(tmp_path / "data" / "original")
    suites.register_suite("bad-input-count", lambda ctx: suites.SuiteResult([proportion("n", 1, 1, True)]),
                          replace=True)
    before = _listing(tmp_path)
    for out, relation, flag in ((images, "is", "--images"), (images / "eval", "lies inside", "--images"),
                                (tmp_path / "data", "contains", "--images"), (original / "x", "lies inside", "--original")):
        assert main(["eval", "--suite=bad-input-count", f"--images={images}", f"--original={original}",
                     f"--out={out}"]) == 2
        assert f"--out={out} {relation} the input {flag}=" in capsys.readouterr().err
        assert _listing(tmp_path) == before, out
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    assert main(["eval", "--suite=nudity", f"--pipeline={pipeline}", f"--out={pipeline / 'eval'}"]) == 2
    assert "lies inside the input --pipeline=" in capsys.readouterr().err
    assert list(pipeline.iterdir()) == []
    # The default output is beside the images, not inside them.
    assert main(["eval", "--suite=bad-input-count", f"--images={images}"]) == 0
    assert (tmp_path / "data" / "images-eval-bad-input-count" / "results.json").is_file()
    assert not (images / "eval-bad-input-count").exists()


# ---------------------------------------------------------------- eval --suite=demo-world

def test_demo_world_benchmark_checks_its_arguments_and_output_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HIRM_JAX_CACHE_DIR", "off")
    out = tmp_path / "bench"
    assert main(["eval", "--suite=demo-world", "--concepts", "hexagon", "heart", f"--out={out}"]) == 2
    assert "--concepts ['hexagon'] are not concepts of the demo world" in capsys.readouterr().err
    world = tmp_path / "world"
    world.mkdir()
    assert main(["eval", "--suite=demo-world", f"--world={world}", f"--out={world / 'bench'}"]) == 2
    assert "lies inside the input --world=" in capsys.readouterr().err
    assert not out.exists() and list(world.iterdir()) == []
