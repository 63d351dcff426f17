"""The README and docs/ stay true: links resolve, every command and flag they show exists, and
the README's erase -> export -> apply -> generate example runs as written (on a tiny pipeline,
with cheap settings added)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hirm_jax import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def code_blocks(path: Path) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S)


def commands(path: Path) -> list[list[str]]:
    """Every `hirm-jax ...` command line in the file's code blocks (after any VAR=value
    prefixes), continuation lines joined."""
    found = []
    for block in code_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^(\w+=\S+ +)*", "", line.split(" #")[0].strip())
            if line.startswith("hirm-jax "):
                found.append(shlex.split(line.replace("...", ""), posix=True)[1:])
    return found


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return capsys.readouterr().out


def test_readme_links_every_doc_and_every_link_resolves():
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert all((ROOT / link).is_file() for link in links), [l for l in links if not (ROOT / l).is_file()]
    assert sorted(f"docs/{p.name}" for p in DOCS) == sorted({l for l in links if l.startswith("docs/")})
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / link).exists(), f"{doc.name} links {link}, which does not exist"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_command_and_flag_shown_exists(path, capsys):
    for argv in commands(path):
        argv = [a for a in argv if a != "--debug"]
        if not argv or argv[0] in ("-h", "--help"):
            continue
        command = argv[0]
        assert command in cli.COMMANDS, f"{path.name} shows `hirm-jax {command}`, which is not a command"
        flags = {a.split("=")[0] for a in argv[1:] if a.startswith("--")}
        if command == "erase":  # absl flags: --config, --workdir and --config.<field>
            assert all(f in ("--config", "--workdir") or f.startswith("--config.") for f in flags), (path.name, argv)
            continue
        sub = argv[:2] if command == "world" else [command]
        if command == "eval" and any(a.startswith("--suite=demo-world") for a in argv):
            sub = ["eval", "--suite=demo-world"]
        known = help_text(sub, capsys)
        unknown = sorted(f for f in flags if f not in known)
        assert not unknown, f"{path.name}: `hirm-jax {' '.join(argv)}` uses {unknown}, which the command lacks"


def readme_example() -> str:
    """The README's first code block that erases, as shell lines."""
    return next(b for b in code_blocks(README) if "hirm-jax erase" in b and "hirm-jax generate" in b)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    from tests.fixtures_pipelines import save_encoder_folder, save_sd_pipeline, tiny_encoder
    pipe = save_sd_pipeline(tmp_path / "sd14", save_encoder_folder(tiny_encoder(seed=0), tmp_path / "enc"))
    (tmp_path / "prompts.txt").write_text("a cat by Van Gogh\na dog on the sea\n")
    cheap = {"erase": " --config.train.epochs=3", "generate": " --steps=2 --height=32 --width=32"}
    lines = []
    for line in readme_example().replace("\\\n", " ").splitlines():
        if line.startswith("PIPE="):
            continue
        command = line.split()[1]
        lines.append(line.replace("hirm-jax ", f"{shlex.quote(sys.executable)} -m hirm_jax.cli ", 1)
                     + cheap.get(command, ""))
    env = {**os.environ, "PIPE": str(pipe), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "HIRM_JAX_CACHE_DIR": "off"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", "-ec", "\n".join(lines)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs/vangogh/text_report.json").is_file()
    assert (tmp_path / "deltas/vangogh/hirm_delta.safetensors").is_file()
    assert (tmp_path / "sd14-no-vangogh/model_index.json").is_file()
    assert len((tmp_path / "images/vangogh/manifest.jsonl").read_text().splitlines()) == 2
