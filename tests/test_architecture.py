"""The house: one stage per subpackage, imports only point down, no cycles, small functions.

Floors, lowest first (a module may import its own floor and the floors below):
    core        errors log fileio config_lib hub resources provenance (and the package itself)
    encoder     the Flax encoders, their mapping tables, on-disk layouts, tokenizers, capture points
    attack      prompt attacks on an erased encoder, in text space (below erase: robust HiRM calls it)
    erase       prompts, jobs, objectives, masking, sharding, checkpoint, step, setup, loop, workdir
    artifacts   export, delta (numpy only)
    report      text report, loss plot, joint-vs-averaged comparison; and hirm_jax.run (erase, then report)
    pipelines   image generation with diffusers, a delta applied to a torch pipeline
    evaluation  suites, metrics, results
    world       the demo world, the demo, its benchmark
    top         cli, main
Every import counts, also one inside a function. torch and diffusers are imported only in
pipelines, evaluation and world (and encoder/files.py reads an opted-in pickle with torch).
"""

import ast
import importlib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hirm_jax"
CORE = {"hirm_jax", "hirm_jax._compat", "hirm_jax.errors", "hirm_jax.log", "hirm_jax.fileio", "hirm_jax.config_lib",
        "hirm_jax.hub", "hirm_jax.resources", "hirm_jax.provenance"}
STAGES = ["encoder", "attack", "erase", "artifacts", "report", "pipelines", "evaluation", "world"]
TOP = {"hirm_jax.cli", "hirm_jax.main"}
ON_A_STAGE = {"hirm_jax.run": "report"}  # top-level modules that sit on a stage's floor
TORCH_ALLOWED = {"pipelines", "evaluation", "world"}
TORCH_EXCEPTIONS = {"hirm_jax.encoder.files"}  # read_pickle: torch.load(weights_only=True), opt-in only
MAX_FUNCTION_LINES = 59
MAX_PARAMETERS = 8


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("hirm_jax", *path.relative_to(ROOT).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def floor(module: str) -> int:
    if module in CORE:
        return 0
    if module in TOP:
        return len(STAGES) + 1
    if module in ON_A_STAGE:
        return STAGES.index(ON_A_STAGE[module]) + 1
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1]) + 1
    raise AssertionError(f"{module} has no floor: put it in a stage subpackage or name it in this test")


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """hirm_jax modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


GRAPH = {name: imports_of(name, path, modules()) for name, path in modules().items()}


def test_every_module_has_a_floor_and_imports_only_down():
    upward = [f"{m} (floor {floor(m)}) -> {t} (floor {floor(t)})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if floor(t) > floor(m)]
    assert not upward, "imports that point up a floor:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_torch_and_diffusers_only_in_the_image_stages():
    offenders = [name for name, path in sorted(modules().items())
                 if third_party_imports(path) & {"torch", "diffusers", "accelerate"}
                 and name.split(".")[1:2][0] not in TORCH_ALLOWED and name not in TORCH_EXCEPTIONS]
    assert not offenders, f"torch/diffusers imported outside {sorted(TORCH_ALLOWED)}: {offenders}"


def test_functions_are_short_and_take_few_parameters():
    long, wide = [], []
    for name, path in sorted(modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
            count -= bool(args.args and args.args[0].arg in ("self", "cls"))
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {lines} lines")
            if count > MAX_PARAMETERS:
                wide.append(f"{name}.{node.name}: {count} parameters")
    assert not long and not wide, "\n".join(long + wide)


def test_the_rules_catch_what_they_are_for(tmp_path):
    """The checks above fail on a module that breaks them (so a green run means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from hirm_jax.world import demo\nimport torch\n\ndef f(a, b, c, d, e, f, g, h, i):\n"
                   + "    x = 1\n" * 60)
    assert imports_of("hirm_jax.encoder.bad", bad, {**modules(), "hirm_jax.encoder.bad": bad}) == {"hirm_jax.world.demo"}
    assert floor("hirm_jax.world.demo") > floor("hirm_jax.encoder.bad")
    assert "torch" in third_party_imports(bad)
    node = next(n for n in ast.walk(ast.parse(bad.read_text())) if isinstance(n, ast.FunctionDef))
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and len(node.args.args) > MAX_PARAMETERS


@pytest.mark.parametrize("old", sorted(importlib.import_module("hirm_jax._compat").OLD_PATHS))
def test_old_import_paths_still_work_and_warn(old):
    """0.1's flat module paths resolve every name they had, through the modules that own them now."""
    import hirm_jax._compat as compat
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    names = [n for n in dir(module) if not n.startswith("_")]
    assert names, f"{old} resolves no names"
    for owner in compat.OLD_PATHS[old]:
        importlib.import_module(owner)  # every owner exists
    with pytest.raises(AttributeError, match="has no attribute"):
        getattr(module, "no_such_name_anywhere")


def test_old_names_of_the_0_1_api_resolve():
    """The names the 0.1 README and docstrings used, from their 0.1 modules."""
    old_api = {
        "hirm_jax.train": ["train_and_evaluate", "make_optimizer", "make_loss_fn", "make_train_step", "init_state",
                           "batch_indices", "setup_run", "slug", "read_metrics", "NonFiniteLossError"],
        "hirm_jax.export": ["load_run", "Run", "RunError", "export_full", "export_delta", "export_pipeline",
                            "export_batch_deltas", "changed_tensors", "apply_delta", "apply_delta_to_pipeline",
                            "check_delta", "DeltaError", "FingerprintError"],
        "hirm_jax.delta": ["apply_delta", "apply_delta_to_pipeline", "check_delta", "load_delta", "fingerprint"],
        "hirm_jax.model": ["TextEncoder", "TextEncoderConfig"],
        "hirm_jax.layouts": ["load_text_encoder", "save_text_encoder", "save_flax_checkpoint", "read_weight_files"],
        "hirm_jax.textreport": ["text_report", "report_for_run", "write_report"],
        "hirm_jax.generate": ["generate", "read_prompts"],
        "hirm_jax.demo": ["run_demo"],
        "hirm_jax.world_benchmark": ["run_benchmark"],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old, names in old_api.items():
            module = importlib.import_module(old)
            missing = [n for n in names if not hasattr(module, n)]
            assert not missing, f"{old} lost {missing}"
