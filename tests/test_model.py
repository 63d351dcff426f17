"""Parity of the Flax encoder with transformers' PyTorch CLIP text models at real widths.

Random weights at the sizes SD uses: CLIP-L (12 layers, width 768, quick_gelu, vocab 49408)
and a bigG-shaped tower (width 1280, 20 heads, gelu, projection 1280; 2 of its 32 layers).
Both pooling rules are covered: legacy eos_token_id == 2 (argmax of ids, SD's configs) and
first-EOS; the ids are chosen so the two rules pick different tokens.
"""

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hirm_jax.encoder.clip import CLIPTextTransformer, TextEncoder, TextEncoderConfig, pooled_positions
from hirm_jax.encoder.clip_weights import hf_to_flax

TOL = 1e-4
LENGTH = 77

FAMILIES = {
    "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=None),
    "bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=2, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280),
}
# Legacy: SD's configs (pool at argmax(ids)). First-EOS: an eos id that is NOT the largest id,
# so the rule matters (CLIP's <|endoftext|> is the largest, where both rules agree).
FIRST_EOS_ID = 1000
EOS_RULES = {
    "legacy": dict(bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "first_eos": dict(bos_token_id=49406, eos_token_id=FIRST_EOS_ID, pad_token_id=1),
}


def make_batch(config: TextEncoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Two right-padded prompts: SD 1.x padding (EOS repeated) and SDXL tokenizer_2 padding (0)."""
    # Under the legacy rule the end token in the ids is still CLIP's <|endoftext|>.
    eos_id = 49407 if config.eos_token_id == 2 else config.eos_token_id
    rng = np.random.default_rng(0)
    ids = np.zeros((2, LENGTH), np.int32)
    lengths = (9, 30)
    for row, (n, pad) in enumerate(zip(lengths, (eos_id, 0))):
        ids[row, 0] = 49406
        ids[row, 1:n + 1] = rng.integers(FIRST_EOS_ID + 1, 49406, n)  # larger than FIRST_EOS_ID
        ids[row, n + 1] = eos_id
        ids[row, n + 2:] = pad
    mask = (np.arange(LENGTH)[None] <= np.array(lengths)[:, None] + 1).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    """(family, PyTorch model, legacy-rule config, Flax params): built once per family."""
    torch.manual_seed(0)
    kw = {**FAMILIES[request.param], **EOS_RULES["legacy"]}
    projection = kw.pop("projection_dim")
    hf_config = CLIPTextConfig(projection_dim=projection or 768, **kw)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(hf_config).eval()
    config = TextEncoderConfig.from_hf_dict(hf_config.to_dict(), has_projection=bool(projection))
    params = hf_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, config)
    return request.param, model, config, params


def with_rule(model, config: TextEncoderConfig, rule: str):
    """Both sides switched to one pooling rule (the weights do not depend on it)."""
    config = config.replace(**EOS_RULES[rule])
    # transformers reads the rule from the attribute CLIPTextModel copies out of its config.
    text_model = getattr(model, "text_model", model)
    text_model.eos_token_id = model.config.eos_token_id = config.eos_token_id
    return config


def torch_outputs(model, ids, mask) -> dict:
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.tensor(mask), output_hidden_states=True)
    result = dict(last_hidden_state=out.last_hidden_state.numpy(),
                  hidden_states=[h.numpy() for h in out.hidden_states])
    if isinstance(model, CLIPTextModelWithProjection):
        result["text_embeds"] = out.text_embeds.numpy()
        # CLIPTextModelWithProjection does not return the pooled state; recompute it by HF's rule.
        rows = np.arange(len(ids))
        cfg = model.config
        pos = ids.argmax(-1) if cfg.eos_token_id == 2 else (ids == cfg.eos_token_id).argmax(-1)
        result["pooled_output"] = result["last_hidden_state"][rows, pos]
    else:
        result["pooled_output"] = out.pooler_output.numpy()
    return result


@pytest.mark.parametrize("rule", sorted(EOS_RULES))
@pytest.mark.slow
def test_parity_with_transformers(family_model, rule):
    family, model, config, params = family_model
    config = with_rule(model, config, rule)
    encoder = TextEncoder(config, params)
    ids, mask = make_batch(config)
    if rule == "first_eos":  # the ids make the two rules disagree, so this test pins the rule down
        assert not np.array_equal(pooled_positions(ids, 2), pooled_positions(ids, config.eos_token_id))
    apply = jax.jit(encoder.apply)
    for attention_mask in (None, mask):
        want = torch_outputs(model, ids, attention_mask)
        got = apply(params, ids, attention_mask)
        assert len(got["hidden_states"]) == len(want["hidden_states"]) == config.num_hidden_layers + 1
        for i, (g, w) in enumerate(zip(got["hidden_states"], want["hidden_states"])):
            np.testing.assert_allclose(np.asarray(g), w, atol=TOL, rtol=0, err_msg=f"hidden_states[{i}]")
        for name in ("last_hidden_state", "pooled_output") + (("text_embeds",) if config.projection_dim else ()):
            np.testing.assert_allclose(np.asarray(got[name]), want[name], atol=TOL, rtol=0, err_msg=name)
        if not config.projection_dim:
            assert got["text_embeds"] is None


def jit_init(config: TextEncoderConfig, seed: int) -> TextEncoder:
    ids = jax.numpy.zeros((1, LENGTH), jax.numpy.int32)
    return TextEncoder(config, jax.jit(CLIPTextTransformer(config).init)(jax.random.key(seed), ids)["params"])


def test_padding_mask_changes_padded_positions_only():
    """A right-padding mask leaves real tokens alone (causal attention never sees the padding)."""
    config = TextEncoderConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2)
    encoder = jit_init(config, seed=1)
    ids, mask = make_batch(config)
    apply = jax.jit(encoder.apply)
    plain = apply(encoder.params, ids)["last_hidden_state"]
    masked = apply(encoder.params, ids, mask)["last_hidden_state"]
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(plain)[real], np.asarray(masked)[real], atol=1e-6)
    assert np.abs(np.asarray(plain)[~real] - np.asarray(masked)[~real]).max() > 1e-4


def test_bfloat16_compute_stays_close_to_float32():
    config = TextEncoderConfig(vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=2, projection_dim=64, hidden_act="gelu")
    f32 = jit_init(config, seed=0)
    bf16 = TextEncoder(config.replace(dtype="bfloat16"), f32.params)
    ids, mask = make_batch(config)
    want = jax.jit(f32.apply)(f32.params, ids, mask)
    got = jax.jit(bf16.apply)(bf16.params, ids, mask)
    assert got["last_hidden_state"].dtype == jax.numpy.bfloat16
    for name in ("last_hidden_state", "pooled_output", "text_embeds"):
        w, g = np.asarray(want[name]), np.asarray(got[name], np.float32)
        assert np.isfinite(g).all(), name
        # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op, loosely bounded here.
        assert np.abs(g - w).max() <= 0.05 * np.abs(w).max() + 1e-2, name


def test_reference_configs_have_the_published_shapes():
    # openai/clip-vit-large-patch14 (SD 1.x), OpenCLIP ViT-H-14 as SD 2 stores it (23 of 24 layers),
    # OpenCLIP ViT-bigG-14 with its projection (SDXL text_encoder_2): numbers from their config.json files
    published = {"clip_l": (49408, 768, 3072, 12, 12, 77, "quick_gelu", None),
                 "openclip_h": (49408, 1024, 4096, 23, 16, 77, "gelu", None),
                 "openclip_bigg": (49408, 1280, 5120, 32, 20, 77, "gelu", 1280)}
    for name, expected in published.items():
        c = getattr(TextEncoderConfig, name)()
        assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                c.max_position_embeddings, c.hidden_act, c.projection_dim) == expected, name
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.layer_norm_eps) == (49406, 49407, 1, 1e-5)


def test_config_sizes_must_be_positive_and_the_smallest_one_is_valid():
    for bad in (dict(hidden_size=0), dict(num_attention_heads=0), dict(hidden_size=-64, num_attention_heads=1)):
        with pytest.raises(ValueError, match="must be positive"):
            TextEncoderConfig(**bad)
    TextEncoderConfig(hidden_size=1, intermediate_size=4, num_attention_heads=1)
