"""The erase configuration: every field, its default, and the rules it must obey.

Config files in `configs/` start from `base_config()` and override fields; the config is
locked, so a mistyped field (`--config.trian.epochs=3`) is an error, not a silent no-op.
`validate(config)` checks the values against the rules below before anything is loaded.
"""

from __future__ import annotations

import ml_collections

OBJECTIVES = ("hirm_r", "hirm_s", "hirm_s_vector")
CONCEPT_TYPES = ("style", "object", "nsfw")
RANDOM_DISTRIBUTIONS = ("uniform", "gaussian")
FIXED_HOOKS = ("last_mlp_out", "last_block_out", "final_ln", "penultimate", "text_embeds")
INDEXED_HOOKS = ("mlp_out", "block_out")  # "mlp_out:N", "block_out:N" for block N
TOKEN_POSITIONS = ("all_but_bos", "all", "non_padding_but_bos")
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


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Base encoder: a diffusers pipeline folder (+ component), a transformers folder,
    # or a single-file SD checkpoint (.safetensors).
    c.encoder = ml_collections.ConfigDict()
    c.encoder.path = ""
    c.encoder.component = "text_encoder"  # pipeline slot this encoder plays; "" for a bare folder
    c.encoder.tokenizer = ""  # default: the pipeline's tokenizer(_2) folder, or the encoder folder
    c.encoder.use_attention_mask = False  # SD 1.x/2.x/SDXL call the encoder without one
    c.encoder.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU

    # What to erase.
    c.concepts = ()  # e.g. ("Van Gogh",); or concepts_file
    c.concepts_file = ""  # TSV: concept [\t super-category [\t type]]
    c.concept_type = "style"
    c.super_categories = ml_collections.ConfigDict()  # {concept: super-category}, HiRM-S anchors
    c.templates = ("{}",)  # "{}" = the bare keyword, as the reference implementation
    c.joint = True  # all concepts into one encoder (False: one delta per concept; see scale-out)

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "hirm_s"
    c.objective.scale = -1.0  # c in the paper; -1: the objective's default (500 for R, 1 for S)
    c.objective.random_distribution = "uniform"  # RMU: uniform [0, 1) then normalised
    c.objective.hooks = ("last_mlp_out",)
    c.objective.token_positions = "all_but_bos"
    c.objective.vector_pairs_file = ""  # hirm_s_vector: TSV with_concept \t without_concept

    c.preservation = ml_collections.ConfigDict()
    c.preservation.weight = 0.0  # alpha; 0 = off (the paper has no retain term)
    c.preservation.prompts_file = ""  # default: the shipped ordinary prompts
    c.preservation.batch_size = 32  # the first N retain prompts, every step; 0 = all of them

    c.train = ml_collections.ConfigDict()
    c.train.trainable_blocks = (0,)
    c.train.trainable_modules = TRAINABLE_MODULES
    c.train.trainable_regex = ""  # overrides blocks/modules when set (".*": whole encoder)
    c.train.learning_rate = -1.0  # -1: METHOD_DEFAULTS for (concept_type, objective)
    c.train.epochs = -1  # one epoch = one pass over the concept prompt list
    c.train.batch_size = 0  # 0: the whole prompt list per step
    c.train.grad_clip_norm = 0.0  # 0 = no clipping
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.seed = 0
    # joint=False: train at most this many concepts at once (0 = all of them in one step;
    # -1 = as many as fit in train.memory_budget_gib per device, measured by XLA); the rest
    # follow in chunks of the same size that reuse the compiled step.
    c.train.concepts_per_chunk = 0
    c.train.memory_budget_gib = 0.0  # for concepts_per_chunk=-1; 0 = 90% of the device's memory
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.checkpoints_to_keep = 2

    # Device mesh (see hirm_jax/sharding.py). concept = 0: as many devices as there are
    # independent jobs (a divisor of the device count); data takes the rest.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.concept = 0
    c.mesh.data = -1
    c.mesh.fsdp = 1

    c.report = ml_collections.ConfigDict()
    c.report.enabled = True
    c.report.paraphrases_file = ""
    c.report.ordinary_prompts_file = ""  # default: the shipped ordinary prompts
    c.report.max_ordinary_prompts = 220

    c.lock()
    return c


class ConfigError(ValueError):
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


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for any value outside its rule (before anything is loaded)."""
    _require(bool(c.encoder.path), "encoder.path must name a pipeline folder, encoder folder or .safetensors file, but is empty")
    _require(c.objective.name in OBJECTIVES, f"objective.name must be one of {list(OBJECTIVES)} but is {c.objective.name!r}")
    _require(c.concept_type in CONCEPT_TYPES, f"concept_type must be one of {list(CONCEPT_TYPES)} but is {c.concept_type!r}")
    _require(c.objective.random_distribution in RANDOM_DISTRIBUTIONS,
             f"objective.random_distribution must be one of {list(RANDOM_DISTRIBUTIONS)} but is {c.objective.random_distribution!r}")
    _require(c.objective.token_positions in TOKEN_POSITIONS,
             f"objective.token_positions must be one of {list(TOKEN_POSITIONS)} but is {c.objective.token_positions!r}")
    _require(len(c.objective.hooks) > 0, "objective.hooks must name at least one hook point")
    for hook in c.objective.hooks:
        parse_hook(hook)
    _require(bool(c.concepts) or bool(c.concepts_file), "concepts is empty and no concepts_file is given: nothing to erase")
    _require(all(isinstance(t, str) and t.count("{}") == 1 for t in c.templates) and len(c.templates) > 0,
             f"templates must be strings with exactly one '{{}}' placeholder, but are {tuple(c.templates)}")
    for name in c.train.trainable_modules:
        _require(name in TRAINABLE_MODULES,
                 f"train.trainable_modules entries must be in {list(TRAINABLE_MODULES)} but got {name!r}")
    _require(c.train.batch_size >= 0, f"train.batch_size must be >= 0 (0 = whole list) but is {c.train.batch_size}")
    _require(c.train.concepts_per_chunk >= -1,
             f"train.concepts_per_chunk must be >= 1, 0 (all concepts at once) or -1 (as many as fit in memory) "
             f"but is {c.train.concepts_per_chunk}")
    _require(c.train.memory_budget_gib >= 0, f"train.memory_budget_gib must be >= 0 but is {c.train.memory_budget_gib}")
    _require(c.train.concepts_per_chunk == 0 or not c.joint,
             f"train.concepts_per_chunk={c.train.concepts_per_chunk} applies to joint=False runs only "
             "(a joint run trains one encoder on all concepts)")
    _require(c.train.checkpoint_every > 0, f"train.checkpoint_every must be > 0 but is {c.train.checkpoint_every}")
    _require(c.train.log_every > 0, f"train.log_every must be > 0 but is {c.train.log_every}")
    _require(c.preservation.weight >= 0, f"preservation.weight must be >= 0 but is {c.preservation.weight}")
    if c.objective.name == "hirm_s_vector":
        _require(bool(c.objective.vector_pairs_file),
                 "objective.vector_pairs_file must name a TSV of paired prompts for hirm_s_vector")


def resolve_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill the -1 fields from METHOD_DEFAULTS / DEFAULT_SCALE; returns a resolved copy."""
    c = c.copy_and_resolve_references()
    defaults = METHOD_DEFAULTS.get((c.concept_type, c.objective.name),
                                   METHOD_DEFAULTS[(c.concept_type, "hirm_s" if c.concept_type != "nsfw" else "hirm_s_vector")])
    with c.unlocked():
        if c.train.learning_rate < 0:
            c.train.learning_rate = defaults["learning_rate"]
        if c.train.epochs < 0:
            c.train.epochs = defaults["epochs"]
        if c.objective.scale < 0:
            c.objective.scale = DEFAULT_SCALE[c.objective.name]
    return c
