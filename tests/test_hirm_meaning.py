"""HiRM's meaning against references that do not share its code.

- the capture point: every block's `mlp_out` equals a transformers forward hook on `mlp.fc2`
  (the MLP output BEFORE the residual add), for CLIP and T5;
- HiRM-R targets: distinct per concept and per hook, of norm c at every position, a function of
  (seed, concept, hook) only;
- one training step of each objective at each hook: the loss and its gradient on block 0 equal a
  PyTorch computation of the same loss (written here from the paper's definition) on the same
  tiny encoder, and so does the Adam update;
- after a full erase -> export, every tensor outside block 0 has the BASE FILE's bytes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hirm_jax.config_lib import base_config, resolve_defaults  # noqa: E402
from hirm_jax.encoder.architectures import architecture_of  # noqa: E402
from hirm_jax.encoder.hf_names import canonical_name  # noqa: E402
from hirm_jax.erase import masking, prompts  # noqa: E402
from hirm_jax.erase.jobs import build_jobs  # noqa: E402
from hirm_jax.erase.step import init_state, make_loss_fn, make_optimizer, make_train_step  # noqa: E402
from tests.fixtures_pipelines import (TINY_CONFIG_PROJ, save_encoder_folder, tiny_encoder, tiny_t5,  # noqa: E402
                                      tiny_t5_tokenizer, tiny_tokenizer)

CONCEPTS = ("Van Gogh", "Monet")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(Flax encoder, the same encoder in transformers) with a projection, so every hook exists."""
    encoder = tiny_encoder(seed=3, config=TINY_CONFIG_PROJ, fp16_exact=False)
    folder = save_encoder_folder(encoder, tmp_path_factory.mktemp("clip") / "enc")
    model = transformers.CLIPTextModelWithProjection.from_pretrained(str(folder)).eval()
    return encoder, model


def erase_config(objective: str, hook: str, joint: bool = True):
    c = base_config()
    c.encoder.path = "unused"
    c.concepts = CONCEPTS
    c.super_categories = {"Van Gogh": "painting", "Monet": "picture"}
    c.templates = ("{}", "a painting by {}")
    c.objective.name = objective
    c.objective.hooks = (hook,)
    c.joint = joint
    c.train.learning_rate = 1e-3
    return resolve_defaults(c)


def torch_rep(model, ids: np.ndarray, hook: str) -> "torch.Tensor":
    """The representation at `hook`, read from transformers' own outputs and a forward hook."""
    captured = {}
    layers = model.text_model.encoder.layers
    handle = layers[-1].mlp.fc2.register_forward_hook(lambda m, i, o: captured.__setitem__("mlp", o))
    try:
        out = model(torch.from_numpy(np.asarray(ids)).long(), output_hidden_states=True)
    finally:
        handle.remove()
    kind, _, index = hook.partition(":")
    return {"last_mlp_out": lambda: captured["mlp"], "final_ln": lambda: out.last_hidden_state,
            "penultimate": lambda: out.hidden_states[-2], "text_embeds": lambda: out.text_embeds[:, None, :],
            "pooled": lambda: out.last_hidden_state[torch.arange(len(ids)), torch.from_numpy(  # HF's pooling rule
                np.argmax(np.asarray(ids) == model.config.eos_token_id, -1))][:, None, :],
            "block_out": lambda: out.hidden_states[int(index or 0) + 1]}[kind]()


def test_every_blocks_mlp_out_is_the_fc2_output_before_the_residual(clip):
    encoder, model = clip
    ids = np.array([[TINY_CONFIG_PROJ.vocab_size - 2, 5, 9, 17, TINY_CONFIG_PROJ.vocab_size - 1] + [0] * 72])
    captured = []
    handles = [layer.mlp.fc2.register_forward_hook(lambda m, i, o: captured.append(o.detach().numpy()))
               for layer in model.text_model.encoder.layers]
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    for h in handles:
        h.remove()
    flax_out = encoder.apply(encoder.params, ids)
    assert len(flax_out["mlp_out"]) == len(captured) == TINY_CONFIG_PROJ.num_hidden_layers
    for i, reference in enumerate(captured):
        np.testing.assert_allclose(np.asarray(flax_out["mlp_out"][i]), reference, atol=2e-5, err_msg=f"block {i}")
        after_residual = out.hidden_states[i + 1].numpy()
        assert not np.allclose(np.asarray(flax_out["mlp_out"][i]), after_residual, atol=1e-3)


@pytest.mark.slow
def test_t5_mlp_out_is_the_dense_relu_dense_output():
    from hirm_jax.encoder.t5_weights import load_t5_folder
    tokenizer = tiny_t5_tokenizer()
    model = tiny_t5(tokenizer, d_model=32, seed=4)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        encoder = load_t5_folder(tmp)
    captured = []
    for block in model.encoder.block:
        block.layer[-1].DenseReluDense.register_forward_hook(lambda m, i, o: captured.append(o.detach().numpy()))
    ids = np.array([[5, 9, 17, 1, 0, 0]])
    with torch.no_grad():
        model(torch.from_numpy(ids).long())
    flax_out = encoder.apply(encoder.params, ids)
    for i, reference in enumerate(captured):
        np.testing.assert_allclose(np.asarray(flax_out["mlp_out"][i]), reference, atol=2e-5)


def test_misdirection_loss_is_the_weighted_mean_squared_distance_and_padded_rows_do_not_count():
    from hirm_jax.erase.objectives import misdirection_loss
    rng = np.random.default_rng(0)
    rep, target = rng.normal(size=(3, 5, 4)).astype(np.float32), rng.normal(size=(3, 5, 4)).astype(np.float32)
    weights = np.array([[0, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    per_row = [sum(weights[i, t] * np.sum((rep[i, t] - target[i, t]) ** 2) for t in range(5)) / weights[i].sum()
               for i in range(3)]
    np.testing.assert_allclose(misdirection_loss(rep, target, weights), np.mean(per_row), rtol=1e-6)
    # a batch padded to a static shape: the padding row (example weight 0) changes nothing
    np.testing.assert_allclose(misdirection_loss(rep, target, weights, np.array([1, 1, 0], np.float32)),
                               np.mean(per_row[:2]), rtol=1e-6)
    np.testing.assert_allclose(misdirection_loss(rep, target, weights, np.array([0, 1, 0], np.float32)),
                               per_row[1], rtol=1e-6)


def test_position_weights_cover_the_positions_the_rule_names():
    from hirm_jax.erase.objectives import position_weights
    ids = jnp.array([[49406, 320, 49407, 49407], [49406, 320, 1125, 49407]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = {"all": [[1, 1, 1, 1]] * 2, "all_but_bos": [[0, 1, 1, 1]] * 2,
                "non_padding_but_bos": [[0, 1, 1, 0], [0, 1, 1, 1]]}
    for rule, want in expected.items():
        np.testing.assert_array_equal(position_weights(ids, mask, rule, "last_mlp_out"), want)
    for hook in ("pooled", "text_embeds"):  # one vector per prompt: one weight
        np.testing.assert_array_equal(position_weights(ids, mask, "all_but_bos", hook), [[1], [1]])


def test_a_concepts_random_key_is_the_seed_folded_with_the_crc32_of_its_name():
    # documented in docs/erase.md: the same (seed, name) draws the same HiRM-R targets in every run and release
    import zlib
    from hirm_jax.erase.jobs import concept_key
    for name in ("Van Gogh", "nudity", "\u00e9t\u00e9"):
        crc = zlib.crc32(name.encode("utf-8"))
        expected = jax.random.fold_in(jax.random.key(7), crc & 0x7FFFFFFF)
        np.testing.assert_array_equal(jax.random.key_data(concept_key(7, name)), jax.random.key_data(expected))


def test_hirm_r_targets_are_per_concept_per_hook_of_norm_c_and_reproducible(clip):
    encoder, _ = clip
    tokenizer = tiny_tokenizer()

    def targets(seed=0, concepts=CONCEPTS):
        c = erase_config("hirm_r", "last_mlp_out", joint=False)
        c.objective.hooks = ("last_mlp_out", "final_ln")
        c.train.seed = seed
        c.concepts = concepts
        jobs = build_jobs(c, encoder, tokenizer, prompts.concepts_from_config(c))
        return {h: np.asarray(t) for h, t in jobs.per_job["targets"].items()}, c.objective.scale

    first, scale = targets()
    assert scale == 500.0
    for hook, t in first.items():  # [job = concept, prompt, position, dim]
        np.testing.assert_allclose(np.linalg.norm(t, axis=-1), scale, rtol=1e-5)
        assert not np.allclose(t[0, 0], t[1, 0]), f"{hook}: two concepts share their random target"
        np.testing.assert_array_equal(t[0, 0], t[0, 1])  # one target per concept, whatever the template
    assert not np.allclose(first["last_mlp_out"][0], first["final_ln"][0]), "two hooks share their target"
    again, _ = targets()
    alone, _ = targets(concepts=("Monet",))
    other_seed, _ = targets(seed=1)
    for hook in first:
        np.testing.assert_array_equal(first[hook], again[hook])
        np.testing.assert_array_equal(first[hook][1], alone[hook][0])  # Monet's target does not depend on company
        assert not np.allclose(first[hook], other_seed[hook])


def reference_loss(model, job: dict, hook: str, objective: str, anchor_ids) -> "torch.Tensor":
    """The paper's loss, written directly: mean over prompts of (1/|P|) sum_{t in P} ||h_t - target_t||^2,
    P = every position but BOS (the one position of text_embeds), the target the frozen encoder's
    representation of the anchor prompt (HiRM-S) or the given random vectors (HiRM-R)."""
    rep = torch_rep(model, job["input_ids"], hook)
    if objective == "hirm_s":
        with torch.no_grad():
            target = torch_rep(model, anchor_ids, hook)
    else:
        target = torch.from_numpy(np.asarray(job["targets"][hook]))
    weights = torch.ones(rep.shape[:2])
    if hook not in ("text_embeds", "pooled"):
        weights[:, 0] = 0.0
    per_prompt = ((rep - target) ** 2).sum(-1).mul(weights).sum(-1) / weights.sum(-1)
    return per_prompt.mean()


@pytest.mark.parametrize("objective", ["hirm_s", "hirm_r"])
@pytest.mark.parametrize("hook", ["last_mlp_out", "final_ln", "penultimate", "text_embeds", "pooled", "block_out:0"])
@pytest.mark.slow
def test_one_step_of_each_objective_and_hook_equals_a_pytorch_computation(clip, objective, hook):
    encoder, model = clip
    config = erase_config(objective, hook)
    config.concepts = ("Van Gogh",)
    tokenizer = tiny_tokenizer()
    jobs = build_jobs(config, encoder, tokenizer, prompts.concepts_from_config(config))
    job = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], jobs.per_job)
    anchor_ids = np.asarray(tokenizer([p.anchor_prompt for p in jobs.prompt_pairs[0]], padding="max_length",
                                      max_length=77, return_tensors="np")["input_ids"])
    arch = architecture_of(encoder)
    paths = masking.trainable_paths(encoder.params, (0,), config.train.trainable_modules, "", arch)
    trainable, frozen = masking.split(encoder.params, paths)
    k = job["input_ids"].shape[0]
    loss_fn = make_loss_fn(encoder, (hook,), False, 0.0)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, job, {}, jnp.arange(k), jnp.ones(k, jnp.float32))

    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    reference = reference_loss(model, job, hook, objective, anchor_ids)
    reference.backward()
    np.testing.assert_allclose(float(loss), float(reference), rtol=1e-4)
    table = {"/".join(path): (hf_key, t) for hf_key, path, t in arch.expand_table(encoder.config)}
    torch_grads = {p: (np.zeros(params[table[p][0]].shape, np.float32) if params[table[p][0]].grad is None
                       else params[table[p][0]].grad.numpy()) for p in grads}
    scale = max(float(np.abs(g).max()) for g in torch_grads.values())
    assert scale > 0
    for path, grad in grads.items():  # (k_proj.bias has no gradient in exact arithmetic: both are ~0 there)
        np.testing.assert_allclose(table[path][1].to_hf(np.asarray(grad)), torch_grads[path], rtol=1e-3,
                                   atol=1e-5 * scale, err_msg=path)

    # the Adam step: hirm_jax's jitted step against torch.optim.Adam on block 0
    optimizer = make_optimizer(config.train)
    step = make_train_step(loss_fn, optimizer)
    state, _ = step(init_state(trainable, optimizer, 1), frozen, jax.tree_util.tree_map(lambda x: x[None], job), {},
                    jnp.arange(k), jnp.ones(k, jnp.float32))
    block0 = [params[table[p][0]] for p in sorted(grads)]
    torch.optim.Adam(block0, lr=config.train.learning_rate, betas=(0.9, 0.999), eps=1e-8).step()
    for p, torch_param in zip(sorted(grads), block0):
        if np.abs(torch_grads[p]).max() < 1e-4 * scale:
            continue  # a gradient that is 0 in exact arithmetic (k_proj.bias): Adam's first step is sign(noise)
        np.testing.assert_allclose(table[p][1].to_hf(np.asarray(state["trainable"][p][0])),
                                   torch_param.detach().numpy(), atol=2e-6, err_msg=p)
    with torch.no_grad():  # undo the step: the module-scoped model serves the next case
        for p, torch_param in zip(sorted(grads), block0):
            torch_param.copy_(torch.from_numpy(table[p][1].to_hf(np.asarray(trainable[p]))))


@pytest.mark.parametrize("hook", ["last_mlp_out", "text_embeds"])
def test_hirm_s_vector_targets_are_the_prompt_minus_the_mean_pair_difference(clip, tmp_path, hook):
    encoder, model = clip
    pairs = [("a painting by Van Gogh", "a painting"), ("Van Gogh", "art"), ("Van Gogh at night", "night")]
    pairs_file = tmp_path / "pairs.tsv"  # with the header row a spreadsheet writes
    pairs_file.write_text("with_concept\twithout_concept\n" + "".join(f"{a}\t{b}\n" for a, b in pairs))
    config = erase_config("hirm_s_vector", hook)
    config.concepts = ("Van Gogh",)
    config.objective.vector_pairs_file = str(pairs_file)
    tokenizer = tiny_tokenizer()
    jobs = build_jobs(config, encoder, tokenizer, prompts.concepts_from_config(config))
    rep = lambda texts: torch_rep(model, tokenizer(list(texts), padding="max_length", max_length=77,
                                                   return_tensors="np")["input_ids"], hook).detach().numpy()
    v = np.mean(rep(a for a, _ in pairs) - rep(b for _, b in pairs), axis=0)  # Ring-A-Bell's concept vector
    expected = config.objective.scale * (rep(p.prompt for p in jobs.prompt_pairs[0]) - v)
    np.testing.assert_allclose(np.asarray(jobs.per_job["targets"][hook])[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_after_erase_and_export_every_tensor_outside_block0_has_the_base_files_bytes(encoder_dir, tmp_path):
    from configs import tiny
    from hirm_jax.artifacts.export import export_full
    from hirm_jax.run import train_and_evaluate
    c = tiny.get_config("hirm_s")
    c.encoder.path = str(encoder_dir)
    c.train.epochs = 5
    train_and_evaluate(c, tmp_path / "run")
    exported = export_full(tmp_path / "run", tmp_path / "full")
    base = {canonical_name(k): v for k, v in load_file(str(encoder_dir / "model.safetensors")).items()}
    erased = {canonical_name(k): v for k, v in load_file(str(exported / "model.safetensors")).items()}
    assert sorted(base) == sorted(erased)
    changed = {k for k in base if base[k].tobytes() != erased[k].tobytes()}
    assert changed and all(k.startswith("text_model.encoder.layers.0.") for k in changed), sorted(changed)
    untouched = sorted(set(base) - changed)
    assert any(k.startswith("text_model.encoder.layers.1.") for k in untouched)
    for k in untouched:
        assert base[k].dtype == erased[k].dtype and base[k].tobytes() == erased[k].tobytes(), k
