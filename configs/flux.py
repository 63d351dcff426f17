"""Flux: erase from one of its two text encoders.

arg "text_encoder" (default): the CLIP ViT-L/14 `text_encoder` slot (T5 is left as is, which
is why transfer to Flux is partial). Flux reads only the pooled EOS output of CLIP, so it is
supervised together with the paper's default hook.

    hirm-jax erase --config=flux --workdir=runs/flux_vg \
        --config.encoder.path=/models/FLUX.1-dev --config.concepts="('Van Gogh',)" \
        --config.super_categories="{'Van Gogh': 'painting'}"

arg "text_encoder_2": the T5-XXL `text_encoder_2` slot (hirm_jax.encoder.t5). Block 0's q/k/v/o, RMS
norms and DenseReluDense train; the relative attention bias block 0 stores for every block
stays frozen (see hirm_jax.encoder.architectures). Flux's transformer reads T5's final-norm output
(`final_ln`) at every position, padding included, so it is supervised with the paper's
`last_mlp_out`. Prompts are padded to encoder.max_length = 512 tokens, FLUX.1-dev's
max_sequence_length (set 256 for FLUX.1-schnell); T5 has no BOS, so "all_but_bos" covers
every position.

    hirm-jax erase --config=flux:text_encoder_2 --workdir=runs/flux_t5_vg \
        --config.encoder.path=/models/FLUX.1-dev

SD3's T5 is the same with --config.encoder.component=text_encoder_3 --config.encoder.max_length=256.
"""

from hirm_jax.config_lib import base_config, check_config_arg

ARGS = ("text_encoder", "text_encoder_2")


def get_config(arg=None):
    arg = check_config_arg("flux", arg, ARGS)
    c = base_config()
    c.encoder.path = "black-forest-labs/FLUX.1-dev"
    c.encoder.component = arg
    c.concept_type = "style"
    c.concepts = ("Van Gogh",)
    c.super_categories = {"Van Gogh": "painting"}
    c.objective.name = "hirm_s"
    c.objective.hooks = ("last_mlp_out", "final_ln")
    if arg == "text_encoder_2":
        c.encoder.max_length = 512
    return c
