"""HiRM's capture points: a named representation read from an encoder's outputs (CLIP or T5).

    rep = read_hook(encoder.apply(params, ids), "last_mlp_out")    # [B, T, D]

Names (`config_lib.parse_hook`): last_mlp_out (the last block's MLP output before the residual
add, the paper's), last_block_out, final_ln (last_hidden_state), penultimate, text_embeds,
pooled (pooled_output: what Flux takes from CLIP), mlp_out:N, block_out:N.
"""

from __future__ import annotations

import jax

from hirm_jax.config_lib import parse_hook


def read_hook(outputs: dict, hook: str) -> jax.Array:
    """The representation at a named capture point, always [B, T, D] (T = 1 for text_embeds and pooled)."""
    kind, index = parse_hook(hook)
    if kind == "last_mlp_out":
        return outputs["mlp_out"][-1]
    if kind == "last_block_out":
        return outputs["hidden_states"][-1]
    if kind == "final_ln":
        return outputs["last_hidden_state"]
    if kind == "penultimate":  # what SDXL conditions on
        return outputs["hidden_states"][-2]
    if kind == "text_embeds":
        if outputs["text_embeds"] is None:
            raise ValueError("hook 'text_embeds' needs an encoder with a projection (projection_dim)")
        return outputs["text_embeds"][:, None, :]
    if kind == "pooled":  # Flux conditions on CLIP's pooled output only
        if outputs["pooled_output"] is None:
            raise ValueError("hook 'pooled' needs an encoder with a pooled output (CLIP; T5 has none)")
        return outputs["pooled_output"][:, None, :]
    if kind == "mlp_out":
        return outputs["mlp_out"][index]
    return outputs["hidden_states"][index + 1]  # block_out:N, the output of block N
