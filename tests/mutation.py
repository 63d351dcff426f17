"""Mutation testing of the core modules: `make mutation` (not in CI; hours on 2 cores).

Why our own runner: mutmut skips every decorated function (all of Flax's `@nn.compact` model
code and every `@jax.jit` function), and cosmic-ray rewrites the working tree in place. Here each
mutant is one AST edit of one module, written into a private copy of the repository, and the
module's own tests run on it in a process forked from one that already imported jax, flax,
torch and transformers (but started no XLA backend), so a mutant costs its tests, not the imports.

Operators (one mutant per site and replacement):
  arithmetic  + <-> -, * <-> /, // -> /, % -> *, ** -> *   (also in augmented assignments)
  comparison  == <-> !=, < -> <=, <= -> <, > -> >=, >= -> >, in <-> not in, is <-> is not
  boolean     and <-> or, `not x` -> x, `-x` -> x
  constants   int n -> n + 1, float x -> x * 2 (0.0 -> 1.0), True <-> False
  statements  a call statement -> pass; `return value` -> `return None`
Not mutated: strings (messages, keys), docstrings, imports, raise statements, logging calls.

A mutant is KILLED when its tests fail (or run past --timeout-factor times the unmutated run),
SURVIVED when they pass. Mutants known to be equivalent (no test can tell them apart, with the
reason) are listed in tests/mutation_equivalent.json by id and left out of the score:
score = killed / (mutants - equivalent). An interrupted run resumes from results.jsonl.

    python tests/mutation.py --out workdirs/mutation [--modules masking,objectives] [--workers 2]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = REPO / "tests" / "mutation_equivalent.json"

# Core module -> the tests that guard it: pytest arguments (in-process tests; a few seconds each).
_T, _M = "tests/test_train.py::", "tests/test_hirm_meaning.py::"
_S = "tests/test_scale.py::"
MODULES = {
    "masking": ("hirm_jax/erase/masking.py", [
        _T + "test_block_indices_are_checked_at_both_ends",
        _T + "test_optimizer_state_only_for_trainable_leaves", _T + "test_step_traces_once_and_frozen_is_untouched",
        _T + "test_only_early_block_moves_and_targets_are_reached",
        _M + "test_after_erase_and_export_every_tensor_outside_block0_has_the_base_files_bytes"]),
    "objectives": ("hirm_jax/erase/objectives.py", [
        _M + "test_misdirection_loss_is_the_weighted_mean_squared_distance_and_padded_rows_do_not_count",
        _M + "test_position_weights_cover_the_positions_the_rule_names",
        _M + "test_hirm_r_targets_are_per_concept_per_hook_of_norm_c_and_reproducible",
        _T + "test_hirm_r_targets_are_scaled_unit_vectors_per_concept", _T + "test_nonfinite_loss_stops_with_clear_error",
        "tests/test_t5_erase.py::test_t5_selection_and_positions",
        _M + "test_one_step_of_each_objective_and_hook_equals_a_pytorch_computation"]),
    "metrics": ("hirm_jax/evaluation/metrics.py", [
        "-m", "not slow", "tests/test_metrics_reference.py", "tests/test_evaluation.py"]),
    "delta": ("hirm_jax/artifacts/delta.py", [
        "-m", "not slow", "tests/test_export.py", "tests/test_bad_input_artifacts.py"]),
    "jobs": ("hirm_jax/erase/jobs.py", [
        _S + "test_concept_list_errors_name_the_line", _T + "test_only_early_block_moves_and_targets_are_reached",
        _S + "test_batch_erasure_equals_solo_and_output_shardings", _T + "test_preservation_term_reduces_drift",
        _M + "test_hirm_r_targets_are_per_concept_per_hook_of_norm_c_and_reproducible",
        "tests/test_robust.py::test_at_the_base_the_attack_rests_on_the_concept_and_its_term_equals_the_misdirection",
        "tests/test_shipped_configs_train.py::test_every_shipped_config_runs_an_erase_step[sd14_nudity-hirm_s]",
        "tests/test_bad_input_erase.py::test_token_ids_beyond_the_vocabulary_name_the_prompt",
        "tests/test_bad_input_erase.py::test_vector_pairs_rows_must_hold_two_prompts",
        "tests/test_bad_input_erase.py::test_the_first_id_past_the_vocabulary_is_refused_the_last_one_in_it_is_not",
        "tests/test_t5_erase.py::test_t5_robust_erasure_is_refused_until_t5_has_an_attack",
        _S + "test_prompts_encode_in_chunks_of_at_most_two_compiled_shapes",
        _M + "test_a_concepts_random_key_is_the_seed_folded_with_the_crc32_of_its_name",
        _M + "test_hirm_s_vector_targets_are_the_prompt_minus_the_mean_pair_difference"]),
    "sharding": ("hirm_jax/erase/sharding.py", [
        _S + "test_mesh_rules", _S + "test_data_and_fsdp_parallel_equal_single_device",
        _S + "test_batch_erasure_equals_solo_and_output_shardings", _S + "test_auto_chunk_is_the_largest_that_fits_the_budget"]),
    "weights": ("hirm_jax/encoder/clip_weights.py", [
        "tests/test_weights.py", "tests/test_layouts.py::test_round_trip_is_bit_exact"]),
    "model": ("hirm_jax/encoder/clip.py", [
        _M + "test_every_blocks_mlp_out_is_the_fc2_output_before_the_residual", "tests/test_model.py",
        _T + "test_optimizer_state_only_for_trainable_leaves", _S + "test_prompts_encode_in_chunks_of_at_most_two_compiled_shapes"]),
}

_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.Mult, ast.Pow: ast.Mult}
_CMPOP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
          ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**", ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
           ast.GtE: ">=", ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
           ast.And: "and", ast.Or: "or"}
_LOG_NAMES = {"_log", "log", "logging", "logger", "print"}


def _is_logging(node: ast.AST) -> bool:
    """A call on a logger (`_log.info(...)`, `log.warning(...)`, `print(...)`)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    while isinstance(f, ast.Attribute):
        f = f.value
    return isinstance(f, ast.Name) and f.id in _LOG_NAMES


def _skipped_nodes(tree: ast.Module) -> set:
    """Ids of nodes never mutated: docstrings, imports, raise statements, logging calls."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0]))
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Raise, ast.Assert)) or _is_logging(node) \
                or (isinstance(node, ast.Expr) and _is_logging(node.value)):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def _replacements(node: ast.AST) -> list[tuple[str, callable]]:
    """(label, edit) for every mutant of this one node; edit(node) changes it in place."""
    out = []
    def set_attr(attr, value):
        return lambda n: setattr(n, attr, value)
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOP:
        new = _BINOP[type(node.op)]
        out.append((f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", set_attr("op", new())))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = _CMPOP[type(op)]
            def edit(n, i=i, new=new):
                n.ops[i] = new()
            out.append((f"{_SYMBOL[type(op)]} -> {_SYMBOL[new]}", edit))
    elif isinstance(node, ast.BoolOp):
        new = _BOOLOP[type(node.op)]
        out.append((f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", set_attr("op", new())))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append((f"{node.value} -> {not node.value}", set_attr("value", not node.value)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, int):
        out.append((f"{node.value} -> {node.value + 1}", set_attr("value", node.value + 1)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, float):
        new = node.value * 2 if node.value else 1.0
        out.append((f"{node.value} -> {new}", set_attr("value", new)))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        out.append(("call -> pass", None))  # the statement itself is replaced (see _apply)
    elif isinstance(node, ast.Return) and node.value is not None and \
            not (isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return -> return None", set_attr("value", ast.Constant(None))))
    return out


def _unary_replacement(node: ast.AST):
    """`not x` -> x and `-x` -> x: the node is replaced by its operand."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return ("not x -> x" if isinstance(node.op, ast.Not) else "-x -> x")
    return None


def _qualnames(tree: ast.Module) -> dict:
    """id(node) -> the qualified name of the function or class it sits in ('<module>' at top)."""
    names = {}
    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix != "<module>" else child.name
            names[id(child)] = name
            visit(child, name)
    visit(tree, "<module>")
    return names


def mutants(source: str) -> list[dict]:
    """Every mutant of a module: id (stable while the code it touches is unchanged), line,
    node index in ast.walk order, label."""
    tree = ast.parse(source)
    skip, where = _skipped_nodes(tree), _qualnames(tree)
    found, seen = [], {}
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        labels = [label for label, _ in _replacements(node)]
        unary = _unary_replacement(node)
        labels += [unary] if unary else []
        for k, label in enumerate(labels):
            segment = " ".join((ast.get_source_segment(source, node) or "").split())[:80]
            base = f"{where.get(id(node), '<module>')} | {segment} | {label}"
            seen[base] = seen.get(base, 0) + 1
            mutant_id = base if seen[base] == 1 else f"{base} | #{seen[base]}"
            found.append(dict(id=mutant_id, line=node.lineno, index=index, choice=k, label=label))
    return found


class _Unwrap(ast.NodeTransformer):
    """Replaces one node (by identity) with another node."""

    def __init__(self, target, replacement):
        self.target, self.replacement = target, replacement

    def generic_visit(self, node):
        super().generic_visit(node)
        return self.replacement if node is self.target else node


def apply(source: str, mutant: dict) -> str:
    """The module's source with one mutant applied."""
    tree = ast.parse(source)
    node = list(ast.walk(tree))[mutant["index"]]
    edits = _replacements(node)
    if mutant["choice"] < len(edits):
        label, edit = edits[mutant["choice"]]
        if edit is None:  # call statement -> pass
            tree = _Unwrap(node, ast.copy_location(ast.Pass(), node)).visit(tree)
        else:
            edit(node)
    else:  # the unary operator removed
        tree = _Unwrap(node, node.operand).visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


def _copy_repo(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns(".git", ".venv*", "workdirs", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(REPO, dest, ignore=ignore)


def _preload() -> None:
    """Import the heavy libraries once, before forking; no XLA backend is started."""
    import importlib
    for name in ("numpy", "jax", "flax.linen", "optax", "pytest", "torch", "transformers", "diffusers"):
        try:
            importlib.import_module(name)
        except ImportError:  # torch and its kin are optional
            pass


def _fork_tests(workdir: Path, tests: list[str]) -> int:
    """Run the tests in a forked child inside `workdir`; its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.chdir(workdir)  # pytest puts the copy's root first on the path (tests/ is a package)
        sys.dont_write_bytecode = True
        log = os.open(workdir / "last_run.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        import pytest
        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", f"--basetemp={workdir / 'pytest_tmp'}", *tests])
    except BaseException:
        code = 99
    os._exit(int(code))


class _Slot:
    """One private copy of the repository and the child running in it."""

    def __init__(self, path: Path):
        self.path, self.pid, self.job, self.started = path, None, None, 0.0

    def start(self, module_path: str, source: str, tests: list[str], job: dict) -> None:
        (self.path / module_path).write_text(source)
        self.job, self.started = job, time.time()
        self.pid = _fork_tests(self.path, tests)

    def poll(self, timeout: float):
        """None while running; else (exit code, seconds)."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        elapsed = time.time() - self.started
        if pid == 0:
            if elapsed <= timeout:
                return None
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            return "timeout", elapsed
        return os.waitstatus_to_exitcode(status), elapsed


def _verdict(code) -> str:
    if code == "timeout":
        return "killed (timeout)"
    return "survived" if code == 0 else "killed"


def _results(results_file: Path, name: str, source: str) -> dict:
    """id -> the last result of each current mutant of the module (a mutant whose code changed
    has another id and runs again)."""
    current, done = {m["id"] for m in mutants(source)}, {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            row = json.loads(line)
            if row["module"] == name and row["id"] in current:
                done[row["id"]] = row
    return done


def run_module(name: str, slots: list, results_file: Path, timeout_factor: float, retry_survived: bool) -> list[dict]:
    """Every mutant of one module through its tests; results appended to results_file. Mutants
    with a result are not run again, except survivors with `retry_survived` (after new tests)."""
    module_path, tests = MODULES[name]
    source = (REPO / module_path).read_text()
    done = _results(results_file, name, source)
    if retry_survived:
        done = {k: row for k, row in done.items() if row["verdict"] != "survived"}
    # The unmutated module must pass its tests; its time sets the timeout.
    slots[0].start(module_path, source, tests, None)
    while (result := slots[0].poll(3600)) is None:
        time.sleep(0.2)
    code, baseline = result
    if code != 0:
        raise SystemExit(f"{name}: the tests {tests} fail on the unmutated code (exit {code})")
    timeout = timeout_factor * baseline + 30
    todo = [m for m in mutants(source) if m["id"] not in done]
    print(f"[mutation] {name}: {len(mutants(source))} mutants, {len(todo)} to run, "
          f"tests pass unmutated in {baseline:.1f}s", flush=True)
    rows = list(done.values())
    busy = []
    while todo or busy:
        for slot in [s for s in slots if s not in busy]:
            if todo:
                mutant = todo.pop(0)
                slot.start(module_path, apply(source, mutant), tests, mutant)
                busy.append(slot)
        for slot in list(busy):
            result = slot.poll(timeout)
            if result is None:
                continue
            busy.remove(slot)
            (slot.path / module_path).write_text(source)
            row = dict(module=name, **{k: slot.job[k] for k in ("id", "line", "label")},
                       verdict=_verdict(result[0]), seconds=round(result[1], 1))
            rows.append(row)
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if row["verdict"] == "survived":
                print(f"[mutation] {name}:{row['line']} survived: {row['id']}", flush=True)
        time.sleep(0.1)
    return rows


def score(rows: list[dict], equivalent: dict) -> dict:
    """killed / (mutants - equivalent), and the survivors not listed as equivalent."""
    counted = [r for r in rows if r["id"] not in equivalent]
    killed = sum(r["verdict"].startswith("killed") for r in counted)
    return dict(mutants=len(rows), equivalent=len(rows) - len(counted), killed=killed,
                survived=[f"{r['line']}: {r['id']}" for r in counted if r["verdict"] == "survived"],
                score=round(100 * killed / len(counted), 1) if counted else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="workdirs/mutation")
    parser.add_argument("--modules", default=",".join(MODULES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--retry-survived", action="store_true", help="run the survivors of earlier runs again")
    args = parser.parse_args(argv)
    names = args.modules.split(",")
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise SystemExit(f"--modules: {unknown} are not core modules; choose from {list(MODULES)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    slots = [_Slot(out / f"worker{i}") for i in range(args.workers)]
    for slot in slots:
        _copy_repo(slot.path)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    _preload()
    equivalent = json.loads(EQUIVALENT_FILE.read_text()) if EQUIVALENT_FILE.exists() else {}
    summary = {}
    for name in names:
        rows = run_module(name, slots, out / "results.jsonl", args.timeout_factor, args.retry_survived)
        summary[name] = score(rows, equivalent.get(name, {}))
        print(f"[mutation] {name}: score {summary[name]['score']}% ({summary[name]['killed']} killed of "
              f"{summary[name]['mutants'] - summary[name]['equivalent']}; {summary[name]['equivalent']} equivalent)",
              flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v["score"] for k, v in summary.items()}))


if __name__ == "__main__":
    main()
