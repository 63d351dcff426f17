"""Evaluation suites: versioned data (hirm_jax/data/suites/<name>.json) plus a runner, in one registry.

    register_suite("demo-world", runner)                 # runner(ctx: EvalContext) -> SuiteResult
    suite = get_suite("nudity")                          # unknown name: SuiteError naming the nearest
    rows = suite.prompt_rows({"csv": "i2p.csv"})         # PromptRows for `hirm-jax generate --suite=...`

A spec file records the suite's version, its data files with their sha256 (checked on load),
seeds, images per prompt, sampler settings (`generation`), thresholds, and each metric's
definition with `higher_is_better`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from hirm_jax.errors import HirmError
from hirm_jax.evaluation.metrics import Metric
from hirm_jax.resources import DATA_DIR

SUITES_DIR = DATA_DIR / "suites"
_BUILTIN_MODULES = ("hirm_jax.evaluation.unlearncanvas", "hirm_jax.evaluation.nudity", "hirm_jax.evaluation.coco")


class SuiteError(HirmError, ValueError):
    """An unknown suite, a bad suite option, or suite data that does not match its recorded sha256."""


@dataclasses.dataclass
class SuiteResult:
    metrics: list[Metric]
    tables: dict = dataclasses.field(default_factory=dict)  # name -> list of row dicts
    settings: dict = dataclasses.field(default_factory=dict)  # thresholds, classes, model fingerprints
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EvalContext:
    suite: "Suite"
    records: list[dict]  # manifest records of the evaluated images; each has "path" and "images_dir"
    original: Optional[list[dict]]  # the original pipeline's records for the same ids/samples, if given
    options: dict[str, str]
    out: Path
    partial: bool


@dataclasses.dataclass
class Suite:
    name: str
    runner: Callable[[EvalContext], SuiteResult]
    spec: dict = dataclasses.field(default_factory=dict)
    prompts: Optional[Callable[[dict], list]] = None  # options -> list[PromptRow]

    @property
    def version(self) -> Optional[str]:
        return self.spec.get("version")

    def prompt_rows(self, options: dict) -> list:
        if self.prompts is None:
            raise SuiteError(f"suite {self.name!r} has no prompt list of its own; generate with --prompts=FILE")
        check_options(self, options)
        return self.prompts(options)

    def generation_defaults(self) -> dict:
        return dict(self.spec.get("generation", {}))

    def metric_definitions(self) -> dict:
        return self.spec.get("metrics", {})


REGISTRY: dict[str, Suite] = {}


def register_suite(name: str, runner: Callable[[EvalContext], SuiteResult], *, prompts=None,
                   spec: Optional[dict] = None, replace: bool = False) -> Suite:
    """Add a suite. `spec` defaults to hirm_jax/data/suites/<name>.json when it exists."""
    if name in REGISTRY and not replace:
        raise SuiteError(f"a suite named {name!r} is already registered (pass replace=True to replace it)")
    if spec is None and (SUITES_DIR / f"{name}.json").is_file():
        spec = load_spec(name)
    suite = Suite(name, runner, spec or {"name": name}, prompts)
    REGISTRY[name] = suite
    return suite


def _load_builtins() -> None:
    import importlib
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)  # each registers itself


def get_suite(name: str) -> Suite:
    _load_builtins()
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise SuiteError(f"there is no evaluation suite {name!r}{hint} Suites: {sorted(REGISTRY)}")
    return REGISTRY[name]


def list_suites() -> dict[str, Optional[str]]:
    _load_builtins()
    return {name: suite.version for name, suite in sorted(REGISTRY.items())}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_spec(name: str) -> dict:
    """A suite's spec, with every data file's sha256 checked against the one it records."""
    path = SUITES_DIR / f"{name}.json"
    spec = json.loads(path.read_text())
    for key, entry in spec.get("files", {}).items():
        data = (SUITES_DIR / entry["path"]).resolve()
        if not data.is_file():
            raise SuiteError(f"{path}: data file {key!r} ({data}) is missing")
        digest = sha256_of(data)
        if digest != entry["sha256"]:
            raise SuiteError(f"{data} has sha256 {digest} but {path} records {entry['sha256']}: the suite data "
                             "changed; bump the suite's version and record the new hash")
    return spec


def suite_file(suite: Suite, key: str) -> Path:
    return (SUITES_DIR / suite.spec["files"][key]["path"]).resolve()


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SuiteError(f"a suite option must be KEY=VALUE but is {pair!r}")
        options[key.strip()] = value.strip()
    return options


def check_options(suite: Suite, options: dict) -> None:
    allowed = suite.spec.get("options")
    if allowed is None:
        return
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SuiteError(f"suite {suite.name!r} has no option(s) {unknown}; its options are "
                         + "; ".join(f"{k}: {v}" for k, v in sorted(allowed.items())))


def flag(options: dict, key: str) -> bool:
    value = options.get(key, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise SuiteError(f"option {key} must be true or false but is {value!r}")
    return value in ("true", "1", "yes")


def suite_prompts(name: str, option_pairs: Sequence[str]) -> tuple[list, dict, dict]:
    """(prompt rows, generation defaults, what generation.json records) of a suite, for
    `hirm-jax generate --suite=NAME [--suite-option KEY=VALUE ...]`."""
    suite = get_suite(name)
    options = parse_options(option_pairs)
    rows = suite.prompt_rows(options)
    return rows, suite.generation_defaults(), {"name": suite.name, "version": suite.version, "options": options}
