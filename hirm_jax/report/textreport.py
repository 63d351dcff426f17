"""Text-space report of an erasure: no images, seconds on a CPU.

For the prompts the run trained on ("targets"), held-out paraphrases of the concepts, and
held-out ordinary prompts, compare the erased encoder's representation h_e at a hook
(default `last_mlp_out`, what HiRM supervises) with the original encoder's h_o:

    cos_to_target     mean over used positions of cos(h_e_t, misdirection_target_t): did it go where it was sent?
    cos_to_original   mean over used positions of cos(h_e_t, h_o_t): how much of the original is left?
    drift             ||h_e - h_o|| / ||h_o|| over the used positions (Frobenius): how far did it move?

A good erasure has high cos_to_target and large drift on targets and paraphrases, and drift
near 0 on ordinary prompts; `selectivity` = mean target drift / mean ordinary drift.

    sets = PromptSets(["Van Gogh"], ordinary, ["a painting by Van Gogh"], targets=targets, paraphrase_targets=p_targets)
    report = text_report(base, erased_params, tokenizer, sets, ReportOptions(hook="last_mlp_out"))
    write_report(report, "report/")
    [report] = report_for_run("workdirs/vangogh")       # everything from the workdir; writes into it

After an erase, `TrainingReporter` writes the same report from what the trainer holds in
memory (`erase.loop.train(..., on_job=reporter)`).

Writes text_report.json (with provenance), text_report.md (a table) and text_report.png
(drift per prompt set, log scale), each atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from hirm_jax import config_lib, log
from hirm_jax.encoder.architectures import architecture_of
from hirm_jax.encoder.clip import TextEncoder
from hirm_jax.erase import objectives, prompts
from hirm_jax.erase.jobs import build_jobs, encode_in_chunks, make_encode_fn, tokenize
from hirm_jax.erase.workdir import ErasedRun, Workdir, erased_run, load_run
from hirm_jax.fileio import atomic_file, write_json
from hirm_jax.resources import data_path

_log = log.get(__name__)

REPORT_JSON, REPORT_MD, REPORT_PNG = "text_report.json", "text_report.md", "text_report.png"
SETS = ("targets", "paraphrases", "ordinary")
DEFAULT_PARAPHRASES = {"style": "paraphrase_templates_style.txt", "object": "paraphrase_templates_object.txt"}


def _stats(values: Sequence[Optional[float]]) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-position cosine, [N, T]; 0 where either vector is 0."""
    dot = np.sum(a * b, axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-30), 0.0)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.sum(values * mask, axis=-1) / np.maximum(mask.sum(-1), 1)


def compare_representations(original: np.ndarray, erased: np.ndarray, positions: np.ndarray,
                            target: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per-prompt metrics over `positions` ([N, T] bool): drift, cos_to_original and, with a
    target, cos_to_target (erased) and cos_to_target_before (original, the baseline)."""
    original, erased = original.astype(np.float64), erased.astype(np.float64)
    mask = positions.astype(np.float64)
    diff = np.sqrt(np.sum(np.square(erased - original).sum(-1) * mask, axis=-1))
    scale = np.sqrt(np.sum(np.square(original).sum(-1) * mask, axis=-1))
    out = {"drift": diff / np.maximum(scale, 1e-30),
           "cos_to_original": _masked_mean(_cosine(erased, original), mask)}
    if target is not None:
        target = np.broadcast_to(np.asarray(target, np.float64), erased.shape)
        out["cos_to_target"] = _masked_mean(_cosine(erased, target), mask)
        out["cos_to_target_before"] = _masked_mean(_cosine(original, target), mask)
    return out


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class PromptSets:
    """The three prompt sets of a report, with the misdirection target per prompt where known.

    targets / paraphrase_targets: [N, T, D] at the hook, or [T, D] shared by every prompt
    (HiRM-R's c * r_t); a 2-D `targets` is reused for the paraphrases. Without one,
    cos_to_target is omitted for that set."""
    target_prompts: Sequence[str]
    ordinary_prompts: Sequence[str]
    paraphrase_prompts: Sequence[str] = ()
    targets: Optional[np.ndarray] = None
    paraphrase_targets: Optional[np.ndarray] = None

    def named(self) -> list[tuple[str, list, Optional[np.ndarray]]]:
        """[(set name, texts, targets)] of the non-empty sets, rows checked."""
        paraphrase_targets = self.paraphrase_targets
        if paraphrase_targets is None and self.targets is not None and np.ndim(self.targets) == 2:
            paraphrase_targets = self.targets
        named = [(name, list(texts), target) for name, texts, target in (
            ("targets", self.target_prompts, self.targets), ("paraphrases", self.paraphrase_prompts, paraphrase_targets),
            ("ordinary", self.ordinary_prompts, None)) if len(texts)]
        for name, texts, target in named:
            if target is not None and np.ndim(target) == 3 and len(target) != len(texts):
                raise ValueError(f"{name} targets must have one row per prompt ({len(texts)}) but have {len(target)}")
        return named


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Where and how representations are compared.

    token_positions: objectives' rule (all_but_bos, all, non_padding_but_bos); position_mask
    ([T] bool) overrides it for every set. max_length: tokens per prompt (the erase config's
    encoder.max_length; 0: CLIP's 77, required for T5, see hirm_jax.encoder.architectures)."""
    hook: str = "last_mlp_out"
    token_positions: str = "all_but_bos"
    position_mask: Optional[np.ndarray] = None
    use_attention_mask: bool = False
    max_length: int = 0


def text_report(base: TextEncoder, erased_params, tokenizer, sets: PromptSets,
                options: ReportOptions = ReportOptions(), provenance_info: Optional[dict] = None,
                originals: Optional[dict] = None) -> dict:
    """Compare the erased and the original encoder on three prompt sets; returns the report dict
    (`write_report` writes it). base: a CLIP TextEncoder or a T5Encoder.

    originals: a dict ordinary prompt -> the base encoder's representation, read and filled
    here; pass the same dict to every report of one base/hook/mask rule (a batch of concepts
    shares its ordinary prompts, which are then encoded by the base encoder once).
    """
    named = sets.named()
    everything = [p for _, texts, _ in named for p in texts]
    original, erased, positions = _encode(base, erased_params, tokenizer, everything, options,
                                          ({} if originals is None else originals, set(sets.ordinary_prompts)))
    per_set: dict[str, Any] = {}
    start = 0
    for name, texts, target in named:
        rows = slice(start, start + len(texts))
        start += len(texts)
        per = compare_representations(original[rows], erased[rows], positions[rows], target)
        per_set[name] = {
            "num_prompts": len(texts),
            "prompts_sha256": _sha256_lines(texts),
            **{metric: _stats(values.tolist()) for metric, values in per.items()},
            "per_prompt": [{"prompt": p, **{m: float(v[i]) for m, v in per.items()}} for i, p in enumerate(texts)],
        }
    return {
        "hook": options.hook,
        "token_positions": "position_mask" if options.position_mask is not None else options.token_positions,
        "use_attention_mask": options.use_attention_mask,
        "sets": per_set,
        "selectivity": _selectivity(per_set),
        "metrics": METRIC_DEFINITIONS,
        "provenance": _provenance(provenance_info),
    }


METRIC_DEFINITIONS = {
    "drift": "||h_erased - h_original|| / ||h_original|| over the used positions; lower is better on ordinary prompts",
    "cos_to_original": "mean over used positions of cos(h_erased_t, h_original_t)",
    "cos_to_target": "mean over used positions of cos(h_erased_t, misdirection_target_t); higher is better",
    "cos_to_target_before": "the same for h_original: where the representation started",
    "selectivity": "mean target drift / mean ordinary drift; higher is better",
}


def _encode(base: TextEncoder, erased_params, tokenizer, prompts: list, options: ReportOptions,
            memo: tuple[dict, set]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original, erased, used positions) for every prompt in one pass (one compiled shape per
    encoder); the base's representations of the prompts in memo[1] are kept in memo[0]."""
    originals, shared = memo
    arch = architecture_of(base)
    ids, mask = tokenize(tokenizer, prompts, arch.max_length(base.config, options.max_length))
    encode_fn = make_encode_fn(base, (options.hook,), options.use_attention_mask)
    todo = [i for i, p in enumerate(prompts) if p not in originals]
    encoded = dict(zip(todo, encode_in_chunks(encode_fn, base.params, ids[todo], mask[todo])[options.hook])) if todo else {}
    original = np.stack([encoded[i] if i in encoded else originals[p] for i, p in enumerate(prompts)])
    originals.update({prompts[i]: encoded[i] for i in todo if prompts[i] in shared})
    erased = encode_in_chunks(encode_fn, erased_params, ids, mask)[options.hook]
    if options.position_mask is not None:
        positions = np.broadcast_to(np.asarray(options.position_mask, bool), original.shape[:2])
    else:
        positions = np.asarray(objectives.position_weights(ids, mask, options.token_positions, options.hook,
                                                           arch.has_bos)) > 0
    return original, erased, positions


def _selectivity(sets: dict) -> Optional[float]:
    try:
        ordinary = sets["ordinary"]["drift"]["mean"]
        return float(sets["targets"]["drift"]["mean"] / ordinary) if ordinary > 0 else None
    except KeyError:
        return None


def _provenance(extra: Optional[dict]) -> dict:
    from hirm_jax import provenance
    return {**provenance.provenance(), **(extra or {})}


# ----------------------------------------------------------------------------- outputs

def markdown(report: dict) -> str:
    fmt = lambda stats, key="mean": "–" if not stats else f"{stats[key]:.4g}"
    lines = [
        f"# Text-space report ({report['hook']}, positions: {report['token_positions']})", "",
        "| prompts | n | drift mean | drift median | drift max | cos to original | cos to target (before) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SETS:
        s = report["sets"].get(name)
        if s:
            lines.append(f"| {name} | {s['num_prompts']} | {fmt(s['drift'])} | {fmt(s['drift'], 'median')} | "
                         f"{fmt(s['drift'], 'max')} | {fmt(s['cos_to_original'])} | {fmt(s.get('cos_to_target'))}"
                         + (f" ({fmt(s['cos_to_target_before'])})" if s.get("cos_to_target") else "") + " |")
    sel = report.get("selectivity")
    prov = report["provenance"]
    lines += ["", f"Selectivity (target drift / ordinary drift): {'–' if sel is None else f'{sel:.4g}'}", "",
              f"hirm_jax {prov.get('hirm_jax_version')}, git {prov.get('git_hash')}; "
              "drift = ||h_erased - h_original|| / ||h_original||; cosines averaged over the used positions.", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


def plot(report: dict) -> bytes:
    plt = _pyplot()
    names = [n for n in SETS if n in report["sets"]]
    data = [[max(p["drift"], 1e-12) for p in report["sets"][n]["per_prompt"]] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data)])
    ax.set_yscale("log")
    ax.set_ylabel("relative drift ||h_e - h_o|| / ||h_o||")
    ax.set_title(f"Representation drift at {report['hook']}")
    return _png(fig)


def write_report(report: dict, out_dir: str | os.PathLike, with_plot: bool = True) -> Path:
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, report)
    with atomic_file(out_dir / REPORT_MD) as f:
        f.write(markdown(report))
    if with_plot:
        with atomic_file(out_dir / REPORT_PNG, "wb") as f:
            f.write(plot(report))
    return out_dir


def plot_summary(rows: dict[str, dict]) -> bytes:
    """One point per concept: drift of its own prompts against drift of ordinary prompts."""
    plt = _pyplot()
    kept = {n: r for n, r in rows.items() if r["drift_targets"] is not None and r["drift_ordinary"] is not None}
    x = np.array([max(r["drift_ordinary"], 1e-12) for r in kept.values()])
    y = np.array([max(r["drift_targets"], 1e-12) for r in kept.values()])
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    ax.scatter(x, y, s=12, alpha=0.7)
    if len(kept):
        low, high = min(x.min(), y.min()) / 2, max(x.max(), y.max()) * 2
        ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--", label="selectivity 1")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("drift of ordinary prompts (keep low)")
    ax.set_ylabel("drift of the concept's prompts (want high)")
    ax.set_title(f"One delta per concept: {len(kept)} concepts")
    return _png(fig)


# ----------------------------------------------------------------------------- from a workdir

def _as_template(line: str, concepts) -> tuple[Optional[str], str]:
    """(concept name or None for every concept, template with one '{}') for a paraphrase line."""
    if "{}" in line:
        return None, line
    for concept in concepts:
        match = re.search(re.escape(concept.name), line, flags=re.IGNORECASE)
        if match:
            escaped = lambda s: s.replace("{", "{{").replace("}", "}}")
            return concept.name, escaped(line[:match.start()]) + "{}" + escaped(line[match.end():])
    raise ValueError(f"paraphrase {line!r} names none of the concepts {[c.name for c in concepts]}; "
                     "write it as a template with '{}' or include a concept's name")


def _paraphrase_lines(config) -> list[str]:
    if config.report.paraphrases_file:
        return prompts.read_lines(config.report.paraphrases_file, "report.paraphrases_file")
    if config.concept_type in DEFAULT_PARAPHRASES:
        return prompts.read_lines(data_path(DEFAULT_PARAPHRASES[config.concept_type]), "paraphrase templates")
    if config.concept_type == "nsfw":  # the "with" side of the paired sentences
        rows = prompts.read_lines(data_path("nudity_pairs.tsv"), "nudity pairs")
        return [r.split("\t")[0] for r in rows if r != "with_concept\twithout_concept"]
    return []


def _ordinary_lines(config) -> tuple[list[str], bool]:
    """Ordinary prompts, minus those the preservation term trained on (returns (prompts, excluded_any))."""
    shipped = str(data_path("ordinary_prompts.txt"))
    report_file = config.report.ordinary_prompts_file or shipped
    lines = prompts.read_lines(report_file, "report.ordinary_prompts_file")
    retain_file = config.preservation.prompts_file or shipped
    excluded = config.preservation.weight > 0 and Path(retain_file).resolve() == Path(report_file).resolve()
    if excluded:
        lines = lines[config.preservation.batch_size:]
    return lines[: config.report.max_ordinary_prompts], excluded


@dataclasses.dataclass
class RunContext:
    """What every report of one run shares: its config, the base encoder at the compute dtype,
    the tokenizer, and the base's representations of the ordinary prompts (filled as it goes)."""
    resolved: dict
    config: Any  # ml_collections.ConfigDict
    base: TextEncoder
    tokenizer: Any
    originals: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan) -> "RunContext":
        """From a trainer's `erase.setup.ErasePlan`, in memory."""
        return cls(json.loads(plan.config.to_json()), plan.config, plan.encoder, plan.loaded.tokenizer)

    @classmethod
    def from_workdir(cls, wd: Workdir, base: TextEncoder) -> "RunContext":
        """From a finished workdir's config.json and an already-loaded base."""
        config = wd.read_config()
        arch = architecture_of(base)
        tokenizer = prompts.load_tokenizer(config.encoder.path, config.encoder.component or None,
                                           config.encoder.tokenizer or None, arch)
        base = arch.encoder_class(base.config.replace(dtype=config.encoder.dtype), base.params)
        return cls(json.loads(config.to_json()), config, base, tokenizer)

    def options(self) -> ReportOptions:
        return ReportOptions(hook=self.config.objective.hooks[0], token_positions=self.config.objective.token_positions,
                             use_attention_mask=self.config.encoder.use_attention_mask,
                             max_length=self.config.encoder.max_length)

    def targets_for(self, concepts: list, templates) -> tuple[list[str], np.ndarray]:
        """(prompts, [N, T, D] targets) exactly as training builds them (one job, no retain set)."""
        job_config = config_lib.from_resolved({
            **self.resolved, "joint": True, "templates": list(templates),
            "preservation": {**self.resolved["preservation"], "weight": 0.0}})
        jobs = build_jobs(job_config, self.base, self.tokenizer, concepts)
        return [p.prompt for p in jobs.prompt_pairs[0]], np.asarray(jobs.per_job["targets"][self.options().hook][0])

    def trained_targets(self, workdir_concepts: list) -> tuple[list[str], np.ndarray]:
        """The trained prompts and their targets, rebuilt from the config (a workdir read from disk)."""
        return self.targets_for(workdir_concepts, self.config.templates)

    def paraphrase_sets(self, concepts: list) -> tuple[list[str], Optional[np.ndarray]]:
        """Held-out paraphrases of `concepts` and their targets: a line with '{}' is a template for
        every concept; a full prompt is matched to the concept it names."""
        shared, own = [], {}
        for line in _paraphrase_lines(self.config):
            name, template = _as_template(line, concepts)
            if name is None:
                shared.append(template)
            else:
                own.setdefault(name, []).append(template)
        paraphrases, targets = [], []
        for chosen, templates in ([(concepts, shared)] if shared else []) + [
                ([c for c in concepts if c.name == name], t) for name, t in own.items()]:
            p, t = self.targets_for(chosen, templates)
            paraphrases += p
            targets.append(t)
        return paraphrases, (np.concatenate(targets) if targets else None)

    def concepts_of(self, record) -> list:
        return [c for c in prompts.concepts_from_config(self.config) if c.name in record.concepts]


def report_erased(ctx: RunContext, run: ErasedRun, trained: tuple[list[str], np.ndarray], erased_params=None) -> dict:
    """The report of one erasure: its trained prompts and targets (`trained`), its paraphrases
    and the ordinary prompts. `erased_params` replaces the run's own (e.g. averaged deltas)."""
    concepts = ctx.concepts_of(run.record)
    paraphrases, paraphrase_targets = ctx.paraphrase_sets(concepts)
    ordinary, excluded = _ordinary_lines(ctx.config)
    sets = PromptSets(trained[0], ordinary, paraphrases, targets=trained[1], paraphrase_targets=paraphrase_targets)
    info = {"workdir": None if run.folder is None else str(Path(run.folder).resolve()),
            "base": run.record.base.to_json(), "concepts": run.record.concepts, "objective": run.record.objective,
            "trained_git_hash": run.record.git_hash, "ordinary_excludes_preservation_prompts": excluded}
    return text_report(ctx.base, run.erased_params if erased_params is None else erased_params, ctx.tokenizer, sets,
                       ctx.options(), info, ctx.originals)


def report_for_run(workdir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                   erased_params=None) -> list[dict]:
    """The text report of a finished erase workdir read from disk (`hirm-jax report`), written
    into `out_dir` (default: the workdir).

    A joint run gets one report; a run with `joint=False` one per concept folder (listed in
    index.json), written into each, and text_report_summary.{json,md,png} at the top compares
    the concepts in one table. Targets are rebuilt as training built them (`erase.jobs`).
    Paraphrases default to the shipped held-out templates for the concept type; ordinary
    prompts to the shipped list, minus any the preservation term trained on.
    `erased_params` replaces the run's own erased encoder (e.g. averaged deltas, for comparison).
    """
    wd = Workdir(workdir)
    if not wd.run_path.is_file() and wd.index_path.is_file():
        concepts = wd.concept_workdirs()
        progress = _Progress(len(concepts))
        reports, ctx = {}, None
        for name, concept_wd in concepts.items():
            loaded = load_run(concept_wd.path, base=None if ctx is None else ctx.base)
            ctx = ctx or RunContext.from_workdir(concept_wd, loaded.base)
            reports[name] = report_erased(ctx, loaded, ctx.trained_targets(ctx.concepts_of(loaded.record)))
            write_report(reports[name], concept_wd.path, with_plot=False)
            progress.tick()
        write_summary(reports, out_dir or wd.path)
        return list(reports.values())
    loaded = load_run(wd.path)
    ctx = RunContext.from_workdir(wd, loaded.base)
    report = report_erased(ctx, loaded, ctx.trained_targets(ctx.concepts_of(loaded.record)), erased_params)
    write_report(report, out_dir or wd.path)
    return [report]


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.every = max(1, total // 20)

    def tick(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            _log.info(f"text report {self.done}/{self.total}  {(time.perf_counter() - self.t0) / self.done:.1f} s/concept")


class TrainingReporter:
    """The text report of an erase as it trains: `erase.loop.train(..., on_job=reporter)` hands
    each finished job over in memory (trained leaves, prompts, targets); `finish` adds the
    summary of a joint=False run, and reports from disk any job a resumed run did not retrain."""

    def __init__(self):
        self.ctx: Optional[RunContext] = None
        self.reports: dict[str, dict] = {}

    def __call__(self, plan, job) -> None:
        self.ctx = self.ctx or RunContext.from_plan(plan)
        hook = self.ctx.options().hook
        trained = ([p.prompt for p in job.prompt_pairs], np.asarray(plan.jobs.per_job["targets"][hook][job.index]))
        run = erased_run(plan.encoder, job.trained, job.record, job.folder)
        self.reports[job.concepts[0].name] = report = report_erased(self.ctx, run, trained)
        write_report(report, job.folder, with_plot=plan.config.joint)

    def finish(self, workdir: str | os.PathLike, joint: bool) -> list[dict]:
        wd = Workdir(workdir)
        if joint:
            return list(self.reports.values()) or report_for_run(wd.path)
        for name, concept_wd in wd.concept_workdirs().items():
            if name not in self.reports:
                loaded = load_run(concept_wd.path, base=None if self.ctx is None else self.ctx.base)
                self.ctx = self.ctx or RunContext.from_workdir(concept_wd, loaded.base)
                self.reports[name] = report_erased(self.ctx, loaded, self.ctx.trained_targets(
                    self.ctx.concepts_of(loaded.record)))
                write_report(self.reports[name], concept_wd.path, with_plot=False)
        ordered = {name: self.reports[name] for name in wd.read_index().concepts}
        write_summary(ordered, wd.path)
        return list(ordered.values())


def summary_row(report: dict) -> dict:
    """The headline numbers of one report (means over prompts)."""
    sets = report["sets"]
    mean = lambda name, metric: (sets.get(name, {}).get(metric) or {}).get("mean")
    return {"cos_to_target": mean("targets", "cos_to_target"), "cos_to_target_before": mean("targets", "cos_to_target_before"),
            "drift_targets": mean("targets", "drift"), "drift_paraphrases": mean("paraphrases", "drift"),
            "drift_ordinary": mean("ordinary", "drift"), "selectivity": report.get("selectivity")}


def summary_markdown(rows: dict[str, dict], title: str, first_column: str) -> str:
    columns = ["cos_to_target", "cos_to_target_before", "drift_targets", "drift_paraphrases", "drift_ordinary", "selectivity"]
    fmt = lambda v: "–" if v is None else f"{v:.4g}"
    lines = [f"# {title}", "", f"| {first_column} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(row[c]) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines + [""])


def write_summary(reports: dict[str, dict], out_dir: str | os.PathLike) -> dict:
    """One table for a batch erasure: a row per concept (its own independent delta)."""
    rows = {name: summary_row(r) for name, r in reports.items()}
    out_dir = Path(out_dir)
    write_json(out_dir / "text_report_summary.json", {"concepts": rows, "provenance": _provenance(None)})
    with atomic_file(out_dir / "text_report_summary.md") as f:
        f.write(summary_markdown(rows, "Text-space report, one delta per concept", "concept"))
    with atomic_file(out_dir / "text_report_summary.png", "wb") as f:
        f.write(plot_summary(rows))
    return rows
