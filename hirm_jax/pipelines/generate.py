"""Generate images with a diffusers pipeline (SD 1.x/2.x, SDXL, Flux), HiRM deltas applied in memory.

    hirm-jax generate --pipeline=/models/sd14 --delta=deltas/vangogh --prompts=prompts.csv --out=imgs/
    hirm-jax generate --pipeline=/models/sdxl --delta=d/te1 --delta=d/te2 --prompts=p.txt --out=imgs/
    hirm-jax generate --pipeline=/models/sd15-uc --suite=unlearncanvas --out=imgs/   # a suite's prompts and sampler
    hirm-jax generate --pipeline=CompVis/stable-diffusion-v1-4@main --prompts=p.txt --out=imgs/   # a hub id
    accelerate launch --num_processes=8 -m hirm_jax.cli generate --pipeline=... --prompts=... --out=imgs/

Every image has its own seed: the prompt file's seed where it gives one (benchmark CSVs do),
else `derive_seed(seed, prompt id, sample index)`. Noise is drawn from a CPU generator per
image, so an image does not depend on the batch it is in, the number of processes, or the
device. `out/` holds `images/*.png`, `manifest.jsonl` (one record per image: id, prompt,
sample, seed, file, settings, pipeline and delta fingerprints; sorted by id then sample) and
`generation.json` (settings, fingerprints, provenance; for a hub id `org/name[@revision]` the
snapshot's commit sha as `pipeline_source.revision`). Existing images are skipped, so an
interrupted run resumes; a rerun with other settings into the same folder is refused.
Inputs are checked before `out/` is created (a missing path says "does not exist"; deltas and
denoiser weights that do not fit the pipeline are refused), and `out/` may not equal, contain
or lie inside any input (--pipeline, --delta, --denoiser, --prompts).
Under `accelerate launch` each process takes a share of the missing images and process 0
writes the manifest once every process is done (the folder must be on shared storage).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import numpy as np

from hirm_jax import log
from hirm_jax import hub
from hirm_jax.errors import HirmError, InputMissingError
from hirm_jax.fileio import atomic_file, check_output_location, require_inputs, sha256_file, write_json

_log = log.get(__name__)

if TYPE_CHECKING:
    import PIL.Image
    import torch

MANIFEST = "manifest.jsonl"
GENERATION = "generation.json"
IMAGES = "images"

# diffusers' own defaults per family (the benchmark suites override them).
FAMILIES = {
    "StableDiffusionPipeline": dict(family="sd", steps=50, guidance=7.5, size=512, denoiser="unet"),
    "StableDiffusionXLPipeline": dict(family="sdxl", steps=50, guidance=5.0, size=1024, denoiser="unet"),
    "FluxPipeline": dict(family="flux", steps=28, guidance=3.5, size=1024, denoiser="transformer"),
    "StableDiffusion3Pipeline": dict(family="sd3", steps=28, guidance=7.0, size=1024, denoiser="transformer"),
}
SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("torch", "jax")

# Column names the benchmark CSVs use for the same field (I2P, ESD/UnlearnDiffAtk, MMA-Diffusion, ...).
PROMPT_COLUMNS = ("prompt", "adv_prompt", "caption", "text")
ID_COLUMNS = ("id", "case_number", "prompt_id", "image_id")
SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance", "evaluation_guidance", "sd_guidance_scale")


class GenerationError(HirmError, ValueError):
    """Bad generation input (prompt file, pipeline, delta, output folder)."""


# (flag, path) pairs naming a command's inputs; a flag may repeat (--delta, --images); None is skipped.
Inputs = Sequence[tuple[str, Optional["str | os.PathLike"]]]


@dataclasses.dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    seeds: tuple[int, ...] = ()  # explicit seeds for samples 0..len-1 (benchmarks fix them); others are derived
    guidance: Optional[float] = None  # per-prompt guidance (I2P rows carry one)
    meta: dict = dataclasses.field(default_factory=dict, compare=False)  # other columns, copied to the manifest


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    guidance: float
    height: int
    width: int
    dtype: str
    scheduler: Optional[str]
    images_per_prompt: int
    seed: int
    backend: str = "torch"


@dataclasses.dataclass(frozen=True)
class Job:
    row: PromptRow
    sample: int
    seed: int
    file: str  # relative to the output folder

    def guidance(self, settings: Settings) -> float:
        return settings.guidance if self.row.guidance is None else self.row.guidance


def derive_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A 63-bit seed from (seed, prompt id, sample index): independent of batching and process count."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- prompt files

def _pick(columns: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def rows_from_records(records: Sequence[dict], source: str, prompt_column: Optional[str] = None,
                      id_column: Optional[str] = None, seed_column: Optional[str] = None,
                      guidance_column: Optional[str] = None, columns: Optional[Sequence[str]] = None) -> list[PromptRow]:
    """PromptRows from dict records (CSV/JSONL rows). Named columns must exist; unnamed ones are
    looked up under the usual benchmark names. Ids default to the row index."""
    columns = list(columns if columns is not None else (records[0].keys() if records else []))
    for role, name in (("prompt", prompt_column), ("id", id_column), ("seed", seed_column), ("guidance", guidance_column)):
        if name is not None and name not in columns:
            raise GenerationError(f"{source} must have a {role} column {name!r} but its columns are {columns}")
    prompt_column = prompt_column or _pick(columns, PROMPT_COLUMNS)
    if prompt_column is None:
        raise GenerationError(f"{source} must have a prompt column (one of {list(PROMPT_COLUMNS)}) but its columns "
                              f"are {columns}")
    id_column = id_column or _pick(columns, ID_COLUMNS)
    seed_column = seed_column or _pick(columns, SEED_COLUMNS)
    guidance_column = guidance_column or _pick(columns, GUIDANCE_COLUMNS)
    used = {prompt_column, id_column, seed_column, guidance_column}
    rows, seen = [], {}
    for i, record in enumerate(records):
        where = f"{source} row {i + 1}"
        prompt = record.get(prompt_column)
        if prompt is None or not str(prompt).strip():
            raise GenerationError(f"{where}: the prompt ({prompt_column!r}) must not be empty")
        row_id = str(record[id_column]).strip() if id_column and str(record.get(id_column, "")).strip() else f"{i:05d}"
        if row_id in seen:
            raise GenerationError(f"{where}: id {row_id!r} repeats row {seen[row_id] + 1}; ids must be unique")
        seen[row_id] = i
        seeds: tuple[int, ...] = ()
        if seed_column and str(record.get(seed_column, "")).strip():
            try:
                seeds = (int(float(record[seed_column])),)
            except ValueError as e:
                raise GenerationError(f"{where}: seed {record[seed_column]!r} must be an integer") from e
        guidance = None
        if guidance_column and str(record.get(guidance_column, "")).strip():
            try:
                guidance = float(record[guidance_column])
            except ValueError as e:
                raise GenerationError(f"{where}: guidance {record[guidance_column]!r} must be a number") from e
        meta = {k: v for k, v in record.items() if k not in used and k}
        rows.append(PromptRow(row_id, str(prompt).strip(), seeds, guidance, meta))
    return rows


def read_prompts(path: str | os.PathLike, **columns) -> list[PromptRow]:
    """A prompt file: .txt (one prompt per line; blank and # lines skipped; id = line index), .csv or .jsonl (see rows_from_records)."""
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"prompt file {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            records = list(reader)
            header = list(reader.fieldnames or [])
        rows = rows_from_records(records, str(path), columns=header, **columns)
    elif path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = rows_from_records(records, str(path), **columns)
    else:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        rows = [PromptRow(f"{i:05d}", line) for i, line in enumerate(lines) if line and not line.startswith("#")]
    if not rows:
        raise GenerationError(f"prompt file {path} holds no prompts")
    return rows


def plan_jobs(rows: Sequence[PromptRow], settings: Settings) -> list[Job]:
    """One job per (prompt, sample), in prompt-file order; file names are unique and stable
    (`images/<id>_<sample>_<hash of prompt and seed>.png`)."""
    jobs, names = [], {}
    for row in rows:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", row.id).strip("._")[:80] or "prompt"
        if stem in names and names[stem] != row.id:
            stem = f"{stem}-{hashlib.sha256(row.id.encode()).hexdigest()[:8]}"
        names[stem] = row.id
        for sample in range(settings.images_per_prompt):
            seed = row.seeds[sample] if sample < len(row.seeds) else derive_seed(settings.seed, row.id, sample)
            # The name carries a hash of (prompt, seed): a resumed run never reuses an image of another prompt.
            tag = hashlib.sha256(f"{row.prompt}\0{seed}".encode()).hexdigest()[:8]
            jobs.append(Job(row, sample, seed, f"{IMAGES}/{stem}_{sample:02d}_{tag}.png"))
    return jobs


# ---------------------------------------------------------------- fingerprints

def pipeline_fingerprint(pipeline_dir: str | os.PathLike, chunk: int = 1 << 20, samples: int = 16) -> str:
    """sha256 over every file's relative path and size, small files' bytes, and for weight files
    over 64 MiB their safetensors header plus `samples` evenly spaced 1 MiB chunks (fast on a 30 GB
    Flux folder; a HiRM-patched folder also differs in its hirm_applied.json)."""
    root = Path(pipeline_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
                continue
            if path.suffix == ".safetensors":
                header_len = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(header_len, 100 << 20)))
            for i in range(samples):
                f.seek((size - chunk) * i // max(samples - 1, 1))
                h.update(f.read(chunk))
    return h.hexdigest()


def delta_fingerprint(delta_dir: str | os.PathLike) -> dict:
    from hirm_jax.artifacts.delta import load_delta
    delta = load_delta(delta_dir)
    return {"path": str(delta_dir), "delta_file_sha256": delta.config["delta_file_sha256"],
            "components": sorted(delta.components()), "concepts": delta.config.get("concepts"),
            "method": delta.config.get("method"), "objective": (delta.config.get("objective") or {}).get("name")}


# ---------------------------------------------------------------- inputs and the output folder

def pipeline_inputs(pipeline_dir: Optional[str | os.PathLike], deltas: Sequence[str | os.PathLike] = (),
                    denoiser: Optional[str | os.PathLike] = None) -> list[tuple[str, Optional[str | os.PathLike]]]:
    """The (flag, path) inputs of a generation: --pipeline, every --delta, --denoiser."""
    return [("--pipeline", pipeline_dir), *(("--delta", d) for d in deltas), ("--denoiser", denoiser)]


def resolve_pipeline(pipeline: "str | os.PathLike | hub.Source") -> hub.Source:
    """--pipeline as a local folder, or a hub id `org/name[@revision]` (every component fetched into
    the hub cache, or read from it under HF_HUB_OFFLINE)."""
    if isinstance(pipeline, hub.Source):
        return pipeline
    return hub.resolve(pipeline, whole_pipeline=True, what="--pipeline")


# ---------------------------------------------------------------- the pipeline

def pipeline_family(pipeline_dir: str | os.PathLike) -> dict:
    index = Path(pipeline_dir) / "model_index.json"
    if not index.is_file():
        raise GenerationError(f"--pipeline must be a diffusers pipeline folder (with model_index.json) but "
                              f"{pipeline_dir} is not")
    model_index = json.loads(index.read_text())
    name = model_index.get("_class_name")
    if name not in FAMILIES:
        raise GenerationError(f"the pipeline class must be one of {sorted(FAMILIES)} but {index} names {name!r}")
    return {**FAMILIES[name], "class_name": name, "has_safety_checker": "safety_checker" in model_index}


def torch_dtype(name: str, device) -> "torch.dtype":
    import torch
    if name not in DTYPES:
        raise GenerationError(f"dtype must be one of {DTYPES} but is {name!r}")
    if name == "auto":
        name = "float16" if str(device).startswith("cuda") else "float32"
    return getattr(torch, name)


def apply_deltas(pipe, deltas: Sequence[str | os.PathLike]) -> None:
    """Apply HiRM deltas in memory; each component is patched at most once, by a delta of its own
    architecture (a CLIP delta into a CLIP encoder, a T5 delta into Flux's / SD3's T5)."""
    from hirm_jax.artifacts.delta import DeltaError, load_delta
    from hirm_jax.pipelines.patch import apply_delta_to_pipeline
    claimed: dict[str, str] = {}
    for delta_dir in deltas:
        for component, tensors in sorted(load_delta(delta_dir).components().items()):
            if component in claimed:
                raise DeltaError(f"deltas {claimed[component]} and {delta_dir} both patch {component}; "
                                 "give one delta per text encoder")
            claimed[component] = str(delta_dir)
            module = getattr(pipe, component, None)
            made_for = "T5" if any(k.startswith("encoder.block.") for k in tensors) else "CLIPText"
            if module is not None and not type(module).__name__.startswith(made_for):
                raise DeltaError(f"{delta_dir} patches {component}, which in this {type(pipe).__name__} is a "
                                 f"{type(module).__name__}; the delta was made for a {made_for} encoder "
                                 "(Flux: CLIP-L `text_encoder`, T5 `text_encoder_2`; SD3: CLIP `text_encoder` and "
                                 "`text_encoder_2`, T5 `text_encoder_3`)")
        apply_delta_to_pipeline(pipe, delta_dir)


def load_denoiser_weights(pipe, path: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Load a denoiser-side erasure (ESD / UCE ship UNet parameters) into pipe.unet or pipe.transformer.

    Keys may carry a `unet.` / `transformer.` prefix; every key must name a parameter of the
    denoiser with the same shape. Pickles (.pt/.bin/.ckpt) need allow_pickle and are read with
    torch.load(weights_only=True)."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"--denoiser {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    elif allow_pickle:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise GenerationError(f"denoiser weights must be .safetensors, or a pickle with --allow-pickle, but got {path}")
    slot = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    module = getattr(pipe, slot)
    own = module.state_dict()
    stripped = {k.removeprefix(f"{slot}."): v for k, v in state.items()}
    unknown = sorted(k for k in stripped if k not in own)
    if unknown:
        raise GenerationError(f"{path} holds {len(unknown)} key(s) that are not parameters of the pipeline's {slot} "
                              f"(diffusers names expected), e.g. {unknown[:3]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in stripped.items() if v.shape != own[k].shape]
    if bad:
        raise GenerationError(f"{path} does not fit the pipeline's {slot}: shapes differ for {bad[:3]}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in stripped.items()}, strict=False)


def load_pipeline(pipeline_dir: str | os.PathLike, deltas: Sequence[str | os.PathLike] = (), *,
                  denoiser: Optional[str] = None, allow_pickle: bool = False, dtype: str = "auto",
                  scheduler: Optional[str] = None, device=None):
    """A diffusers pipeline from a local folder (no safety checker), with deltas and a denoiser erasure applied."""
    import diffusers
    import torch
    info = pipeline_family(pipeline_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if info["has_safety_checker"] else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipeline_dir), torch_dtype=torch_dtype(dtype, device), **kwargs)
    apply_deltas(pipe, deltas)  # before .to(): fingerprints read the weights as loaded
    if denoiser:
        load_denoiser_weights(pipe, denoiser, allow_pickle)
    if scheduler:
        if scheduler not in SCHEDULERS:
            raise GenerationError(f"scheduler must be one of {sorted(SCHEDULERS)} but is {scheduler!r}")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_jobs(pipe, jobs: Sequence[Job], settings: Settings, batch_size: int = 1,
             latents: Optional[dict] = None) -> Iterable[tuple[Job, "PIL.Image.Image"]]:
    """Yield (job, image). Jobs are batched only with jobs of the same guidance (and the same
    prompt kind: text or token ids); each has its own generator, or its row of `latents`
    ({job file: initial noise})."""
    pending = list(jobs)
    kind = lambda j: (j.guidance(settings), "ids" in j.row.meta)
    while pending:
        first = kind(pending[0])
        batch = [j for j in pending if kind(j) == first][:batch_size]
        taken = {id(j) for j in batch}
        pending = [j for j in pending if id(j) not in taken]
        noise = np.stack([latents[j.file] for j in batch]) if latents else None
        if settings.backend == "jax":
            from PIL import Image
            prompts = [j.row.meta["ids"] if "ids" in j.row.meta else j.row.prompt for j in batch]
            arrays = pipe.images(prompts, [j.seed for j in batch], settings.steps, first[0], settings.height,
                                 settings.width, noise)
            yield from zip(batch, (Image.fromarray(a) for a in arrays))
            continue
        yield from zip(batch, _torch_images(pipe, batch, settings, first[0], noise))


def _torch_images(pipe, batch: Sequence[Job], settings: Settings, guidance: float, noise) -> list:
    import torch
    extra = {} if noise is None else {"latents": torch.from_numpy(noise).to(pipe.device, pipe.dtype)}
    return pipe(**prompt_arguments(pipe, batch), num_inference_steps=settings.steps, guidance_scale=guidance,
                height=settings.height, width=settings.width,
                generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch], output_type="pil",
                **extra).images


def prompt_arguments(pipe, batch: Sequence[Job]) -> dict:
    """`prompt=` texts, or for rows that carry token `ids` (`hirm-jax attack`'s attacks.jsonl: a
    decoded attack prompt can re-tokenize differently) `prompt_embeds=` from those exact ids
    through the pipeline's (erased) text encoder, as the pipeline would compute them."""
    import torch
    if "ids" not in batch[0].row.meta:
        return dict(prompt=[j.row.prompt for j in batch])
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise GenerationError(f"prompts given as token ids (row {batch[0].row.id!r}) need an SD 1.x/2.x pipeline (one "
                              f"CLIP text encoder) but the pipeline is {type(pipe).__name__}")
    length, vocab = pipe.tokenizer.model_max_length, pipe.text_encoder.config.vocab_size
    for job in batch:
        ids = job.row.meta["ids"]
        if not (isinstance(ids, list) and len(ids) == length and all(isinstance(t, int) and 0 <= t < vocab for t in ids)):
            raise GenerationError(f"row {job.row.id!r}: ids must be {length} token ids in [0, {vocab}) but are {ids!r:.80}")
    ids = torch.tensor([j.row.meta["ids"] for j in batch], device=pipe.text_encoder.device)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0].to(pipe.text_encoder.dtype)
    return dict(prompt_embeds=embeds)


def manifest_record(job: Job, settings: Settings, fingerprints: dict) -> dict:
    return {"id": job.row.id, "prompt": job.row.prompt, "sample": job.sample, "seed": job.seed, "file": job.file,
            "guidance": job.guidance(settings), "steps": settings.steps, "height": settings.height,
            "width": settings.width, "scheduler": settings.scheduler, "dtype": settings.dtype, "backend": settings.backend,
            "pipeline_fingerprint": fingerprints["pipeline"],
            "delta_fingerprints": [d["delta_file_sha256"] for d in fingerprints["deltas"]],
            "denoiser_sha256": fingerprints["denoiser"], "meta": job.row.meta}


def default_backend() -> str:
    """jax where torch is not installed, else torch."""
    import importlib.util
    return "torch" if importlib.util.find_spec("torch") else "jax"


class OneProcess:
    """The one process of a JAX run (accelerate's PartialState interface, as generate uses it)."""
    process_index, num_processes, is_main_process, device = 0, 1, True, "jax"

    def wait_for_everyone(self) -> None:
        pass

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items


def read_latents(path: str | os.PathLike, jobs: Sequence[Job]) -> dict:
    """{job file: initial noise} from a .npy of one row per image in manifest order (sorted by
    prompt id, then sample); never unpickled; shape and values checked."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GenerationError(f"--latents {path} is not a readable .npy array: {e}") from e
    if array.ndim not in (3, 4) or array.shape[0] != len(jobs) or array.dtype.kind != "f":
        raise GenerationError(f"--latents {path} must be a float array [images={len(jobs)}, C, h, w] (Flux: packed, "
                              f"[images, tokens, C]; one row per image, manifest order) but is {array.dtype} "
                              f"{array.shape}")
    if not np.isfinite(array).all():
        raise GenerationError(f"--latents {path} holds non-finite values")
    ordered = sorted(jobs, key=lambda j: (j.row.id, j.sample))
    return {job.file: array[i].astype(np.float32) for i, job in enumerate(ordered)}


def _load(pipeline_dir, changes: "Changes", settings: Settings, info: dict, state):
    """The pipeline the backend draws with, deltas (and a denoiser erasure) applied."""
    if settings.backend == "torch":
        return load_pipeline(pipeline_dir, changes.deltas, denoiser=changes.denoiser, allow_pickle=changes.allow_pickle,
                             dtype=settings.dtype, scheduler=settings.scheduler, device=state.device)
    from hirm_jax.pipelines.generate_jax import JaxSDPipeline
    if info["family"] != "sd" or changes.denoiser:
        raise GenerationError(f"--backend jax draws SD 1.x/2.x pipelines without --denoiser so far, not "
                              f"{info['class_name']}{' with --denoiser' if changes.denoiser else ''}: use --backend torch")
    return JaxSDPipeline.load(pipeline_dir, changes.deltas, settings.dtype, settings.scheduler)


def distributed_state():
    """accelerate's PartialState (one process when not launched), on CPU when there is no GPU."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


@dataclasses.dataclass(frozen=True)
class Request:
    """The sampling a user asks for; None: the pipeline family's default (its size, steps, guidance)."""
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    dtype: str = "auto"
    scheduler: Optional[str] = None
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 1
    backend: Optional[str] = None  # torch | jax; None: jax where torch is not installed, else torch
    latents: Optional[str] = None  # .npy: the initial noise, one row per image in manifest order


@dataclasses.dataclass(frozen=True)
class Changes:
    """What is applied to the pipeline before sampling: HiRM deltas, a denoiser erasure."""
    deltas: Sequence[str | os.PathLike] = ()
    denoiser: Optional[str] = None
    allow_pickle: bool = False


def generate(pipeline: "str | os.PathLike | hub.Source", rows: Sequence[PromptRow], out_dir: str | os.PathLike,
             request: Optional[Request] = None, changes: Optional[Changes] = None, extra: Optional[dict] = None,
             inputs: Inputs = (), **fields) -> Path:
    """Generate every missing image of `rows` into out_dir and (process 0) write the manifest. See module doc.

    pipeline: a folder, a hub id or a resolved `hub.Source`; inputs: other inputs (e.g. the prompt
    file) that out_dir may not equal, contain or lie inside; `fields`: Request and Changes fields
    by name (`steps=2, deltas=[...]`, the keyword form of hirm_jax 0.1)."""
    request, changes = _request_and_changes(request, changes, fields)
    source = resolve_pipeline(pipeline)
    pipeline_dir, out_dir = source.path, Path(out_dir)
    inputs_of_pipeline = [*pipeline_inputs(pipeline_dir, changes.deltas, changes.denoiser), ("--latents", request.latents)]
    require_inputs(inputs_of_pipeline)
    check_output_location(out_dir, [*inputs_of_pipeline, *inputs])
    info = pipeline_family(pipeline_dir)
    backend = request.backend or default_backend()
    state = distributed_state() if backend == "torch" else OneProcess()
    settings = _settings(request, info, state, backend)
    jobs = plan_jobs(rows, settings)
    latents = read_latents(request.latents, jobs) if request.latents else None
    fingerprints = {"pipeline": pipeline_fingerprint(pipeline_dir),
                    "deltas": [delta_fingerprint(d) for d in changes.deltas],
                    "denoiser": sha256_file(changes.denoiser) if changes.denoiser else None,
                    **({"latents": sha256_file(request.latents)} if request.latents else {})}
    record = {"pipeline": source.hub_id or str(pipeline_dir), "pipeline_source": source.provenance(),
              "pipeline_class": info["class_name"], "settings": dataclasses.asdict(settings),
              "fingerprints": fingerprints, **(extra or {})}
    _check_resume(out_dir, record, create=False)  # every process, so a refusal stops them all
    pending = [j for j in jobs if not (out_dir / j.file).is_file()]
    state.wait_for_everyone()  # every process lists the same missing images before any is written
    with state.split_between_processes(pending) as mine:
        # Loading applies the deltas and denoiser weights: one that does not fit fails before out_dir exists.
        pipe = _load(pipeline_dir, changes, settings, info, state) if mine else None
        state.wait_for_everyone()
        if state.is_main_process:
            _check_resume(out_dir, record, create=True)
        state.wait_for_everyone()
        if mine:
            _write_images(pipe, mine, settings, request.batch_size, out_dir, state, latents)
    state.wait_for_everyone()
    if state.is_main_process:
        _write_manifest(out_dir, jobs, settings, record)
    state.wait_for_everyone()
    return out_dir


def _request_and_changes(request: Optional[Request], changes: Optional[Changes], fields: dict) -> tuple[Request, Changes]:
    known = {f.name for f in dataclasses.fields(Request)} | {f.name for f in dataclasses.fields(Changes)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
    request = dataclasses.replace(request or Request(), **{k: v for k, v in fields.items()
                                                           if k in {f.name for f in dataclasses.fields(Request)}})
    changes = dataclasses.replace(changes or Changes(), **{k: v for k, v in fields.items()
                                                           if k in {f.name for f in dataclasses.fields(Changes)}})
    return request, changes


def _settings(request: Request, info: dict, state, backend: str = "torch") -> Settings:
    """The request checked and completed with the family's defaults (what generation.json records)."""
    if backend not in BACKENDS:
        raise GenerationError(f"backend must be one of {list(BACKENDS)} but is {backend!r}")
    size_h, size_w = request.height or info["size"], request.width or info["size"]
    for name, value in (("height", size_h), ("width", size_w)):
        if value % 16:
            raise GenerationError(f"{name} must be divisible by 16 but is {value}")
    if request.images_per_prompt < 1 or request.batch_size < 1:
        raise GenerationError(f"images_per_prompt and batch_size must be >= 1 but are {request.images_per_prompt}, "
                              f"{request.batch_size}")
    if backend == "jax":
        dtype = "float32" if request.dtype == "auto" else request.dtype
    else:
        dtype = str(torch_dtype(request.dtype, state.device)).removeprefix("torch.")  # record what "auto" became
    return Settings(steps=request.steps or info["steps"],
                    guidance=info["guidance"] if request.guidance is None else request.guidance,
                    height=size_h, width=size_w, dtype=dtype, scheduler=request.scheduler,
                    images_per_prompt=request.images_per_prompt, seed=request.seed, backend=backend)


def _write_manifest(out_dir: Path, jobs: Sequence[Job], settings: Settings, record: dict) -> None:
    missing = [j.file for j in jobs if not (out_dir / j.file).is_file()]
    if missing:
        raise GenerationError(f"{len(missing)} image(s) were not written, e.g. {missing[:3]}")
    with atomic_file(out_dir / MANIFEST) as f:
        for job in sorted(jobs, key=lambda j: (j.row.id, j.sample)):
            f.write(json.dumps(manifest_record(job, settings, record["fingerprints"]), sort_keys=True) + "\n")
    from hirm_jax.provenance import provenance
    write_json(out_dir / GENERATION, {**record, "images": len(jobs), "provenance": provenance()})


def _write_images(pipe, jobs: Sequence[Job], settings: Settings, batch_size: int, out_dir: Path, state,
                  latents: Optional[dict] = None) -> None:
    """Generate `jobs` into out_dir, each image written atomically, with progress on stderr."""
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    start, every = time.time(), max(1, len(jobs) // 50)
    for done, (job, image) in enumerate(run_jobs(pipe, jobs, settings, batch_size, latents), 1):
        with atomic_file(out_dir / job.file, "wb") as f:
            image.save(f, format="PNG")
        if done % every and done != len(jobs):
            continue
        rate = (time.time() - start) / done
        _log.info(f"[generate {state.process_index}/{state.num_processes}] {done}/{len(jobs)} images, "
              f"{rate:.2f} s/image, ETA {rate * (len(jobs) - done):.0f} s")


def _check_resume(out_dir: Path, record: dict, create: bool) -> None:
    """Refuse an output folder that holds images made with other settings; `create` records ours."""
    previous = out_dir / GENERATION
    if not previous.is_file():
        if create:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(previous, {**record, "images": None, "status": "running"})
        return
    old = json.loads(previous.read_text())
    differs = sorted(k for k in record if old.get(k) != record[k])
    if differs:
        raise GenerationError(f"{out_dir} holds images made with other settings ({', '.join(differs)} differ from "
                              f"{previous}); choose another --out or remove it")


def read_manifest(images_dir: str | os.PathLike, flag: str = "--images") -> list[dict]:
    """The records of a folder `hirm-jax generate` wrote (InputMissingError when it or its manifest is missing)."""
    require_inputs([(flag, images_dir)])
    path = Path(images_dir) / MANIFEST
    if not path.is_file():
        raise InputMissingError(f"{flag} {os.fspath(images_dir)} holds no {MANIFEST}; make it with `hirm-jax generate`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- command line

def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", help="diffusers pipeline folder (SD 1.x/2.x, SDXL, Flux), or a hub id "
                        "org/name[@revision] (fetched into the hub cache; HF_HUB_OFFLINE=1 reads the cache only)")
    parser.add_argument("--delta", action="append", default=[], help="HiRM delta folder (repeat for SDXL's two encoders)")
    parser.add_argument("--denoiser", help="UNet/transformer erasure as a safetensors of denoiser parameters (ESD, UCE)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a pickled --denoiser (read weights_only)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the suite's, else the family's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (a prompt file's per-row guidance wins)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the suite's, else the pipeline's own")
    parser.add_argument("--seed", type=int, default=0, help="base of derived per-image seeds")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--backend", choices=BACKENDS, help="torch (diffusers) or jax (Flax models, no torch; SD "
                        "1.x/2.x with --scheduler ddim so far); default: jax where torch is not installed, else torch")
    parser.add_argument("--latents", help=".npy of initial noise, one row per image in manifest order (diffusers' "
                        "latents=, before init_noise_sigma): both backends then draw the same images")


def main(argv: Sequence[str], suite_prompts: Optional[Callable[[str, list], tuple]] = None) -> int:
    """`hirm-jax generate`. `suite_prompts(name, ["KEY=VALUE", ...]) -> (rows, defaults, record)`
    serves --suite (the CLI passes `evaluation.suites.suite_prompts`: suites sit above pipelines)."""
    parser = argparse.ArgumentParser(prog="hirm-jax generate", description=__doc__.split("\n")[0])
    add_generation_arguments(parser)
    parser.add_argument("--prompts", help="prompt file: .txt, .csv (prompt column, optional id/seed/guidance) or .jsonl")
    parser.add_argument("--suite", help="use an evaluation suite's prompts and sampler settings instead of --prompts")
    parser.add_argument("--suite-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images-per-prompt", type=int)
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not args.pipeline or bool(args.prompts) == bool(args.suite):
        parser.error("generate needs --pipeline=DIR and exactly one of --prompts=FILE or --suite=NAME")
    defaults, extra = {}, {}
    if args.suite:
        if suite_prompts is None:
            parser.error("--suite=NAME needs the hirm-jax command (hirm-jax generate, or -m hirm_jax.cli generate)")
        rows, defaults, suite_record = suite_prompts(args.suite, args.suite_option)
        extra = {"suite": suite_record}
    else:
        rows = read_prompts(args.prompts)
    rows = rows[:args.limit] if args.limit else rows
    generate(args.pipeline, rows, args.out, deltas=args.delta, denoiser=args.denoiser, allow_pickle=args.allow_pickle,
             extra=extra, inputs=[("--prompts", args.prompts)], **generation_kwargs(args, defaults))
    if (args.backend or default_backend()) != "torch" or distributed_state().is_main_process:
        print(args.out)
    return 0


def generation_kwargs(args: argparse.Namespace, defaults: dict) -> dict:
    """Command-line settings over a suite's defaults."""
    pick = lambda name: getattr(args, name) if getattr(args, name, None) is not None else defaults.get(name)  # noqa: E731
    return dict(steps=pick("steps"), guidance=pick("guidance"), height=pick("height"), width=pick("width"),
                dtype=args.dtype, scheduler=pick("scheduler"), images_per_prompt=pick("images_per_prompt") or 1,
                seed=args.seed, batch_size=args.batch_size, backend=getattr(args, "backend", None),
                latents=getattr(args, "latents", None))
