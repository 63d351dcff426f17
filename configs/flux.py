"""Flux: erase from both text encoders (default), or from one of them.

arg "both" (default): the CLIP ViT-L/14 `text_encoder` and the T5-XXL `text_encoder_2`, one after
the other, into WORKDIR/components/<component>/ (each resumable); `hirm-jax export` then writes
one delta keyed by component, which `hirm-jax apply` / `generate` put into both slots.

    hirm-jax erase --config=flux --workdir=runs/flux_vg \
        --config.encoder.path=/models/FLUX.1-dev --config.concepts="('Van Gogh',)" \
        --config.super_categories="{'Van Gogh': 'painting'}"

arg "text_encoder": the paper's mode, CLIP-L only (T5 is left as is, which is why the paper
reports the transfer to Flux as partial). Flux reads only the pooled EOS output of CLIP, so it is
supervised together with the paper's default hook.

arg "text_encoder_2": T5 only (hirm_jax.encoder.t5). Block 0's q/k/v/o, RMS norms and
DenseReluDense train; the relative attention bias block 0 stores for every block stays frozen
(see hirm_jax.encoder.architectures). Flux's transformer reads T5's final-norm output
(`final_ln`) at every position, padding included, so it is supervised with the paper's
`last_mlp_out`. Prompts are padded to encoder.max_length = 512 tokens, FLUX.1-dev's
max_sequence_length (set 256 for FLUX.1-schnell: --config.components="{...}" for "both");
T5 has no BOS, so "all_but_bos" covers every position.
"""

from hirm_jax.config_lib import base_config, check_config_arg, with_components

ARGS = ("both", "text_encoder", "text_encoder_2")
# What differs per component (config `components`: {component: {"dotted.field": value}}).
COMPONENT_FIELDS = {
    "text_encoder": {"objective.hooks": ("last_mlp_out", "final_ln")},
    "text_encoder_2": {"objective.hooks": ("last_mlp_out", "final_ln"), "encoder.max_length": 512},
}


def get_config(arg=None):
    arg = check_config_arg("flux", arg, ARGS)
    c = base_config()
    c.encoder.path = "black-forest-labs/FLUX.1-dev"
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.objective.name = "hirm_s"
    return with_components(c, arg, "both", COMPONENT_FIELDS)
