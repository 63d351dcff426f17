"""The erase configuration: every field, its default, and the rules it must obey.

Config files in `configs/` start from `base_config()` and override fields; the config is
locked, so a mistyped field (`--config.trian.epochs=3`) is an error, not a silent no-op.
`validate(config)` checks the values against the rules below before anything is loaded.

`--config=VALUE` names a config file (`configs/sd14_style.py:hirm_s`) or a shipped config by
name (`sd14_style:hirm_s`, from any folder); see `resolve_config_argument`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from hirm_jax.errors import HirmError

OBJECTIVES = ("hirm_r", "hirm_s", "hirm_s_vector")
CONCEPT_TYPES = ("style", "object", "nsfw")
RANDOM_DISTRIBUTIONS = ("uniform", "gaussian")
FIXED_HOOKS = ("last_mlp_out", "last_block_out", "final_ln", "penultimate", "text_embeds", "pooled")
SINGLE_POSITION_HOOKS = ("text_embeds", "pooled")  # one vector per prompt: [B, 1, D]
INDEXED_HOOKS = ("mlp_out", "block_out")  # "mlp_out:N", "block_out:N" for block N
TOKEN_POSITIONS = ("all_but_bos", "all", "non_padding_but_bos")
# The modules of a block, named as CLIP's; for T5 (hirm_jax.encoder.architectures): self_attn = q/k/v/o
# (never the relative attention bias every block shares), mlp = DenseReluDense, layer_norm1/2 =
# the RMS norms before the attention / the feed-forward.
TRAINABLE_MODULES = ("self_attn", "mlp", "layer_norm1", "layer_norm2")

# HIRM.md's defaults, by (concept type, objective): learning rate and epochs.
METHOD_DEFAULTS = {
    ("style", "hirm_r"): dict(learning_rate=5e-5, epochs=40),
    ("style", "hirm_s"): dict(learning_rate=5e-5, epochs=30),
    ("object", "hirm_r"): dict(learning_rate=5e-5, epochs=25),
    ("object", "hirm_s"): dict(learning_rate=5e-5, epochs=15),
    ("nsfw", "hirm_r"): dict(learning_rate=1e-4, epochs=50),
    ("nsfw", "hirm_s_vector"): dict(learning_rate=1e-4, epochs=25),
    ("nsfw", "hirm_s"): dict(learning_rate=1e-4, epochs=25),
}
DEFAULT_SCALE = {"hirm_r": 500.0, "hirm_s": 1.0, "hirm_s_vector": 1.0}


DEFAULT = -1  # the value of a field that means "the default" (DEFAULTED_FIELDS)
# Fields where -1 means the default (METHOD_DEFAULTS / DEFAULT_SCALE) and any other value must be > 0.
DEFAULTED_FIELDS = ("train.learning_rate", "train.epochs", "objective.scale")


def base_config() -> ml_collections.ConfigDict:
    """Every field of an erase config with its default; configs/*.py start from this."""
    # convert_dict=False keeps super_categories a plain dict, whose keys may hold dots
    # ("Dr. Seuss"); ConfigDict keys may not, and copies would convert it to one.
    c = ml_collections.ConfigDict(convert_dict=False)
    c.encoder = _encoder_fields()
    # What to erase.
    c.concepts = ()  # e.g. ("Van Gogh",); or concepts_file (not both)
    c.concepts_file = ""  # TSV: concept [\t super-category [\t type]]
    c.concept_type = "style"
    # {concept: super-category}, the HiRM-S anchors of inline concepts; names may hold dots and
    # are matched case-insensitively. A plain dict in a reference of type object, so that
    # --config.super_categories="{'Dr. Seuss': 'author'}" is read as a Python literal (a
    # ConfigDict refuses dotted keys); validate() checks its type.
    c.super_categories = ml_collections.FieldReference({}, field_type=object)
    c.templates = ("{}",)  # "{}" = the bare keyword, as the reference implementation
    c.joint = True  # all concepts into one encoder (False: one delta per concept; see scale-out)
    # Several encoders of one pipeline (Flux: CLIP-L + T5; SD3: two CLIPs + T5): {component:
    # {"dotted.field": value}}. Each listed component is erased in turn, with its own overrides
    # (hooks, max_length, ...), into WORKDIR/components/<component>/; export gives one delta keyed
    # by component. {} (default): the one encoder of encoder.path / encoder.component.
    c.components = ml_collections.FieldReference({}, field_type=object)
    c.objective = _objective_fields()
    c.preservation = _preservation_fields()
    c.train = _train_fields()
    c.mesh = _mesh_fields()
    c.report = _report_fields()
    c.lock()
    return c


def _encoder_fields() -> ml_collections.ConfigDict:
    """The base encoder: a pipeline folder (+ component), a transformers folder, or a single file."""
    s = ml_collections.ConfigDict()
    s.path = ""
    s.component = "text_encoder"  # pipeline slot this encoder plays; "" for a bare folder
    s.tokenizer = ""  # default: the pipeline's tokenizer(_2) folder, or the encoder folder
    s.use_attention_mask = False  # SD 1.x/2.x/SDXL call the encoder without one
    s.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU
    s.allow_pickle = False  # read .ckpt/.pt/.bin weights (unpickling can run code)
    # Tokens per prompt (prompts are padded to it; a longer prompt is an error, never cut).
    # 0: CLIP's max_position_embeddings (77). T5 (Flux text_encoder_2, SD3 text_encoder_3) has
    # no position limit and needs it set to the pipeline's max_sequence_length: 512 for
    # FLUX.1-dev, 256 for FLUX.1-schnell and SD3 (see hirm_jax.encoder.architectures).
    s.max_length = 0
    return s


def _objective_fields() -> ml_collections.ConfigDict:
    """The misdirection objective and where it is measured."""
    s = ml_collections.ConfigDict()
    s.name = "hirm_s"
    s.scale = -1.0  # c in the paper, > 0; -1: the objective's default (500 for R, 1 for S)
    s.random_distribution = "uniform"  # RMU: uniform [0, 1) then normalised
    s.hooks = ("last_mlp_out",)
    s.token_positions = "all_but_bos"
    s.vector_pairs_file = ""  # hirm_s_vector: TSV with_concept \t without_concept
    s.adversarial = _adversarial_fields()
    return s


def _adversarial_fields() -> ml_collections.ConfigDict:
    """Robust HiRM (hirm_jax.erase.adversarial): an inner prompt attack against the training
    block(s) finds inputs that bring the concept back; they join the concept prompts."""
    s = ml_collections.ConfigDict()
    s.enabled = False
    s.attack = "continuous"  # or "gcg" (tokens)
    s.every = 1  # the inner attack runs every N outer steps (its state is kept in between)
    s.steps = 5  # inner attack steps per run (continuous: Adam steps; gcg: coordinate steps)
    s.learning_rate = 0.05  # continuous
    s.top_k = 32  # gcg: candidate tokens per slot
    s.candidates = 32  # gcg: swaps scored per step and prompt
    s.weight = 1.0  # of the misdirection term on the adversarial prompts
    s.hook = "final_ln"  # what the attack matches: the representation the pipeline consumes
    return s


def _preservation_fields() -> ml_collections.ConfigDict:
    """The optional retain term (not in the paper)."""
    s = ml_collections.ConfigDict()
    s.weight = 0.0  # alpha; 0 = off (the paper has no retain term)
    s.prompts_file = ""  # default: the shipped ordinary prompts
    s.batch_size = 32  # the first N retain prompts, every step; 0 = all of them
    return s


def _train_fields() -> ml_collections.ConfigDict:
    """What trains, and how."""
    s = ml_collections.ConfigDict()
    # Block 0 of a T5 encoder trains q/k/v/o, its RMS norms and DenseReluDense, never the
    # relative attention bias it stores for every block (hirm_jax.encoder.architectures).
    s.trainable_blocks = (0,)
    s.trainable_modules = TRAINABLE_MODULES
    s.trainable_regex = ""  # overrides blocks/modules when set (".*": whole encoder)
    s.learning_rate = -1.0  # > 0; -1: METHOD_DEFAULTS for (concept_type, objective)
    s.epochs = -1  # > 0; one epoch = one pass over the concept prompt list; -1: METHOD_DEFAULTS
    s.batch_size = 0  # 0: the whole prompt list per step
    s.grad_clip_norm = 0.0  # 0 = no clipping
    s.adam_b1 = 0.9
    s.adam_b2 = 0.999
    s.adam_eps = 1e-8
    s.seed = 0
    # joint=False: train at most this many concepts at once (0 = all of them in one step;
    # -1 = as many as fit in train.memory_budget_gib per device, measured by XLA); the rest
    # follow in chunks of the same size that reuse the compiled step.
    s.concepts_per_chunk = 0
    s.memory_budget_gib = 0.0  # for concepts_per_chunk=-1; 0 = 90% of the device's memory
    s.log_every = 10
    s.checkpoint_every = 100
    s.checkpoints_to_keep = 2
    return s


def _mesh_fields() -> ml_collections.ConfigDict:
    """Device mesh (see hirm_jax/erase/sharding.py)."""
    s = ml_collections.ConfigDict()
    # concept = 0: as many devices as there are independent jobs (a divisor of the device
    # count); data takes the rest.
    s.concept = 0
    s.data = -1
    s.fsdp = 1
    return s


def _report_fields() -> ml_collections.ConfigDict:
    """The text report erase writes into the workdir."""
    s = ml_collections.ConfigDict()
    s.enabled = True
    s.paraphrases_file = ""
    s.ordinary_prompts_file = ""  # default: the shipped ordinary prompts
    s.max_ordinary_prompts = 220
    return s


class ConfigError(HirmError, ValueError):
    """A config value breaks a rule; the message names the field, the value and the rule."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_hook(name: str) -> tuple[str, int | None]:
    if name in FIXED_HOOKS:
        return name, None
    kind, _, index = name.partition(":")
    if kind in INDEXED_HOOKS and index.lstrip("-").isdigit():
        return kind, int(index)
    raise ConfigError(
        f"objective.hooks entries must be one of {list(FIXED_HOOKS)} or 'mlp_out:N' / 'block_out:N', "
        f"but got {name!r}")


def field_value(c: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value of a dotted field name, e.g. field_value(c, "train.epochs")."""
    for part in dotted.split("."):
        c = c[part]
    return c


def _check_defaulted(c: ml_collections.ConfigDict, field: str) -> None:
    """Only -1 means "the default"; any other value must be positive (0 epochs, a learning rate
    of 0 or a scale of -3 are mistakes, not requests for the default)."""
    value = field_value(c, field)
    _require(value == DEFAULT or value > 0,
             f"{field} must be > 0, or -1 for the default of (concept_type, objective.name), but is {value}")


def name_key(name: str) -> str:
    """Concept names are compared with surrounding blanks stripped and case ignored."""
    return str(name).strip().lower()


def _check_concept_fields(c: ml_collections.ConfigDict) -> None:
    """Concepts come from `concepts` or from `concepts_file`, exactly one of them; super_categories
    is a {str: str} dict naming no concept twice (names compared as `name_key` does)."""
    _require(bool(c.concepts) or bool(c.concepts_file), "concepts is empty and no concepts_file is given: nothing to erase")
    _require(not (c.concepts and c.concepts_file),
             f"concepts={tuple(c.concepts)!r} and concepts_file={c.concepts_file!r} are both set, but the concepts "
             "come from one of them: clear the other (--config.concepts=\"()\" or --config.concepts_file=\"\")")
    anchors = c.super_categories
    _require(hasattr(anchors, "items") and all(isinstance(k, str) and isinstance(v, str) for k, v in anchors.items()),
             f"super_categories must be a dict {{concept: super-category}} of strings but is {anchors!r}")
    seen: dict[str, str] = {}
    for name in anchors.keys():
        key = name_key(name)
        _require(key not in seen, f"super_categories names {seen.get(key)!r} and {name!r}, the same concept "
                                  "(names are compared case-insensitively): keep one")
        seen[key] = name


def with_components(c: ml_collections.ConfigDict, arg: str, every: str,
                    component_fields: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
    """A pipeline config with several text encoders (configs/flux.py, sd3.py): `arg == every`
    erases every component of `component_fields` ({component: {"dotted.field": value}}), any
    other `arg` names the one component to erase, with its fields set."""
    if arg == every:
        c.components = {name: dict(fields) for name, fields in component_fields.items()}
    else:
        c.encoder.component = arg
        c.update_from_flattened_dict(dict(component_fields[arg]))
    return c


def component_config(c: ml_collections.ConfigDict, component: str) -> ml_collections.ConfigDict:
    """The config of one component of a several-encoder erase: encoder.component set, the
    component's overrides applied, `components` cleared. An unknown field is a ConfigError."""
    overrides = c.components[component]
    sub = c.copy_and_resolve_references()
    with sub.unlocked():
        sub.components = {}
        sub.encoder.component = component
    for dotted, value in overrides.items():
        parent, _, leaf = dotted.rpartition(".")
        try:
            holder = field_value(sub, parent) if parent else sub
            _require(leaf in holder and dotted not in ("components", "encoder.component"), "")
            holder[leaf] = tuple(value) if isinstance(value, list) else value
        except (KeyError, AttributeError, TypeError, ConfigError) as e:
            raise ConfigError(f"components[{component!r}] overrides {dotted!r}, which is not a field a component "
                              f"can set (a config field other than components and encoder.component)") from e
    return sub


def _check_components(c: ml_collections.ConfigDict) -> None:
    components = c.components
    _require(hasattr(components, "items") and all(isinstance(k, str) and k and hasattr(v, "items")
                                                  for k, v in components.items()),
             f"components must be a dict {{component: {{'field.name': value}}}} but is {components!r}")
    for name in components:
        validate(component_config(c, name))


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for any value outside its rule (before anything is loaded)."""
    if c.components:
        return _check_components(c)
    _require(bool(c.encoder.path), "encoder.path must name a pipeline folder, encoder folder, .safetensors file or "
                                   "hub id (org/name[@revision]), but is empty")
    _require(c.objective.name in OBJECTIVES, f"objective.name must be one of {list(OBJECTIVES)} but is {c.objective.name!r}")
    _require(c.concept_type in CONCEPT_TYPES, f"concept_type must be one of {list(CONCEPT_TYPES)} but is {c.concept_type!r}")
    _require(c.objective.random_distribution in RANDOM_DISTRIBUTIONS,
             f"objective.random_distribution must be one of {list(RANDOM_DISTRIBUTIONS)} but is {c.objective.random_distribution!r}")
    _require(c.objective.token_positions in TOKEN_POSITIONS,
             f"objective.token_positions must be one of {list(TOKEN_POSITIONS)} but is {c.objective.token_positions!r}")
    _require(isinstance(c.encoder.max_length, int) and c.encoder.max_length >= 0,
             f"encoder.max_length must be >= 0 (0 = the encoder's default) but is {c.encoder.max_length}")
    _require(len(c.objective.hooks) > 0, "objective.hooks must name at least one hook point")
    for hook in c.objective.hooks:
        parse_hook(hook)
    _check_concept_fields(c)
    _require(all(isinstance(t, str) and t.count("{}") == 1 for t in c.templates) and len(c.templates) > 0,
             f"templates must be strings with exactly one '{{}}' placeholder, but are {tuple(c.templates)}")
    for name in c.train.trainable_modules:
        _require(name in TRAINABLE_MODULES,
                 f"train.trainable_modules entries must be in {list(TRAINABLE_MODULES)} but got {name!r}")
    for field in DEFAULTED_FIELDS:
        _check_defaulted(c, field)
    _require(c.train.batch_size >= 0, f"train.batch_size must be >= 0 (0 = whole list) but is {c.train.batch_size}")
    _require(c.train.grad_clip_norm >= 0, f"train.grad_clip_norm must be >= 0 (0 = no clipping) but is {c.train.grad_clip_norm}")
    _require(c.train.concepts_per_chunk >= -1,
             f"train.concepts_per_chunk must be >= 1, 0 (all concepts at once) or -1 (as many as fit in memory) "
             f"but is {c.train.concepts_per_chunk}")
    _require(c.train.memory_budget_gib >= 0, f"train.memory_budget_gib must be >= 0 but is {c.train.memory_budget_gib}")
    _require(c.train.concepts_per_chunk == 0 or not c.joint,
             f"train.concepts_per_chunk={c.train.concepts_per_chunk} applies to joint=False runs only "
             "(a joint run trains one encoder on all concepts)")
    _require(c.train.checkpoint_every > 0, f"train.checkpoint_every must be > 0 but is {c.train.checkpoint_every}")
    _require(c.train.checkpoints_to_keep > 0, f"train.checkpoints_to_keep must be > 0 but is {c.train.checkpoints_to_keep}")
    _require(c.train.log_every > 0, f"train.log_every must be > 0 but is {c.train.log_every}")
    _require(c.preservation.weight >= 0, f"preservation.weight must be >= 0 but is {c.preservation.weight}")
    _require(c.preservation.batch_size >= 0,
             f"preservation.batch_size must be >= 0 (0 = all retain prompts) but is {c.preservation.batch_size}")
    if c.objective.name == "hirm_s_vector":
        _require(bool(c.objective.vector_pairs_file),
                 "objective.vector_pairs_file must name a TSV of paired prompts for hirm_s_vector")
    _check_adversarial(c.objective.adversarial)


ADVERSARIAL_ATTACKS = ("continuous", "gcg")


def _check_adversarial(a: ml_collections.ConfigDict) -> None:
    _require(a.attack in ADVERSARIAL_ATTACKS,
             f"objective.adversarial.attack must be one of {list(ADVERSARIAL_ATTACKS)} but is {a.attack!r}")
    for field in ("every", "steps", "top_k", "candidates"):
        _require(getattr(a, field) >= 1, f"objective.adversarial.{field} must be >= 1 but is {getattr(a, field)}")
    for field in ("learning_rate", "weight"):
        _require(getattr(a, field) > 0, f"objective.adversarial.{field} must be > 0 but is {getattr(a, field)}")
    parse_hook(a.hook)


def resolve_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill the -1 fields (DEFAULTED_FIELDS) from METHOD_DEFAULTS / DEFAULT_SCALE; returns a resolved copy."""
    c = c.copy_and_resolve_references()
    defaults = METHOD_DEFAULTS.get((c.concept_type, c.objective.name),
                                   METHOD_DEFAULTS[(c.concept_type, "hirm_s" if c.concept_type != "nsfw" else "hirm_s_vector")])
    with c.unlocked():
        if c.train.learning_rate == DEFAULT:
            c.train.learning_rate = defaults["learning_rate"]
        if c.train.epochs == DEFAULT:
            c.train.epochs = defaults["epochs"]
        if c.objective.scale == DEFAULT:
            c.objective.scale = DEFAULT_SCALE[c.objective.name]
    return c


def from_resolved(resolved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config rebuilt from its JSON form (a workdir's config.json), as `base_config()` with
    the recorded values: super_categories stays a dict (keys with dots survive), unknown
    fields are an error, as on the command line."""
    c = base_config()
    with c.unlocked():
        _update(c, resolved)
    return c


def _update(c: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(c[key], ml_collections.ConfigDict):
            _update(c[key], value)
        else:
            c[key] = tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- --config=VALUE

CONFIGS_PACKAGE = "hirm_jax.configs"  # the wheel installs the repository's configs/ as this package


def shipped_config_folders() -> list[Path]:
    """Where the shipped configs live: the installed package `hirm_jax.configs`, and (in a
    source checkout) the `configs/` folder beside the `hirm_jax` package."""
    folders = []
    if _importable(CONFIGS_PACKAGE):
        folders.append(Path(str(importlib.resources.files(CONFIGS_PACKAGE))))
    folders.append(Path(__file__).resolve().parent.parent / "configs")
    return [f for f in dict.fromkeys(f.resolve() for f in folders) if f.is_dir()]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def shipped_configs() -> dict[str, Path]:
    """{name: file} of the shipped configs (the first folder of `shipped_config_folders` wins)."""
    found: dict[str, Path] = {}
    for folder in shipped_config_folders():
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                found.setdefault(path.stem, path)
    return found


def resolve_config_argument(value: str) -> str:
    """The `--config` value with its file part made a path that exists.

    `--config=FILE[:ARG]` (ARG is what follows the first ':'). The rule: a FILE that exists is
    that file; else a bare name (no '/', with or without '.py') is one of the shipped configs
    (`sd14_style:hirm_s`, from any folder); else a ConfigError lists the shipped names."""
    file_part, colon, arg = value.partition(":")
    if os.path.isfile(file_part):
        return value
    if os.path.isdir(file_part):
        raise ConfigError(f"--config={value}: {file_part} is a folder, not a config file (a .py file with get_config)")
    shipped = shipped_configs()
    name = file_part[:-len(".py")] if file_part.endswith(".py") else file_part
    if "/" not in file_part and os.sep not in file_part and name in shipped:
        return f"{shipped[name]}{colon}{arg}"
    listing = ", ".join(f"{n}" + (f"[:{'|'.join(a)}]" if (a := config_args(shipped[n])) else "") for n in shipped)
    raise ConfigError(f"--config={value}: {file_part} does not exist (relative to {os.getcwd()}) and is not the name of "
                      f"a shipped config; a config is a file path or one of the shipped names: {listing} "
                      "(e.g. --config=sd14_style:hirm_s)")


def config_args(path: Path) -> tuple[str, ...]:
    """The ARGs a shipped config file declares (its ARGS tuple), read without importing it."""
    import ast  # noqa: PLC0415
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ARGS" for t in node.targets):
            try:
                return tuple(ast.literal_eval(node.value))
            except ValueError:
                return ()
    return ()


def check_config_arg(config_name: str, arg, allowed: tuple[str, ...]) -> str:
    """A shipped config's ARG (the part after ':'), or its first allowed value when none is given."""
    if arg is None or arg == "":
        return allowed[0]
    if arg not in allowed:
        raise ConfigError(f"--config={config_name}:{arg}: the argument after ':' must be one of {list(allowed)} "
                          f"but is {arg!r}")
    return arg
