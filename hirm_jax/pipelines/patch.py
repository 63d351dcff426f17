"""Apply a HiRM delta in memory to a loaded diffusers pipeline or transformers text encoder (torch).

    pipe = StableDiffusionPipeline.from_pretrained("sd-v1-4")
    apply_delta_to_pipeline(pipe, "vangogh-delta/")        # every fingerprint checked first

Needs torch (and the pipeline's library), not JAX: the delta is read by `hirm_jax.artifacts.delta`.
"""

from __future__ import annotations

import os
from typing import Optional

from hirm_jax.artifacts.delta import DeltaError, FingerprintError, check_fingerprint, load_delta, local_key


def apply_delta_to_pipeline(pipe, delta_dir: str | os.PathLike, component: Optional[str] = None):
    """Apply a delta in place to a loaded diffusers pipeline, or to a bare transformers text encoder.

    Works for SD 1.x/2.x, SDXL and Flux (components `text_encoder` / `text_encoder_2`) in any
    dtype and on any device. All fingerprints are checked before any weight changes.
    Returns `pipe`.
    """
    import torch

    delta = load_delta(delta_dir)
    grouped = delta.components()
    if component is not None and component not in grouped:
        raise DeltaError(f"component must be one of the delta's {sorted(grouped)} but is {component!r}")
    chosen = [component] if component else sorted(grouped)
    if isinstance(pipe, torch.nn.Module):
        if len(chosen) != 1:
            raise DeltaError(f"a bare text encoder was given but the delta patches {chosen}; "
                             "pass the pipeline, or choose one with component=")
        modules = {chosen[0]: pipe}
    else:
        modules = {c: getattr(pipe, c, None) for c in chosen}
        absent = [c for c, m in modules.items() if not isinstance(m, torch.nn.Module)]
        if absent:
            have = sorted(getattr(pipe, "components", {}) or [])
            raise DeltaError(f"the pipeline has no text encoder named {absent} (it has {have})")

    updates, errors = {}, []
    for c, module in modules.items():
        state = module.state_dict()
        updates[c] = {}
        for canonical, value in sorted(grouped[c].items()):
            name = local_key(canonical, state)
            if name is None:
                errors.append(f"{c}.{canonical}: {type(module).__name__} has no parameter {canonical}")
                continue
            param = state[name]
            if param.is_meta:
                raise DeltaError(f"{c}.{canonical} holds no data (a meta tensor): apply the delta before "
                                 "enable_sequential_cpu_offload() or device_map offloading")
            if tuple(param.shape) != value.shape:
                errors.append(f"{c}.{canonical} must have shape {value.shape} but has {tuple(param.shape)}")
                continue
            precision = str(param.dtype).removeprefix("torch.")
            found = param.detach().to("cpu", torch.float32).numpy()
            error = check_fingerprint(f"{c}.{canonical}", f"{c} ({type(module).__name__})", found,
                                       precision, delta.entry(c, canonical))
            if error:
                errors.append(error)
                continue
            updates[c][name] = torch.from_numpy(value.copy()).to(device=param.device, dtype=param.dtype)
    if errors:
        raise FingerprintError(
            f"the delta does not fit this pipeline ({len(errors)} problem(s)); it was made for base "
            f"{delta.config.get('base', {}).get('source')!r}. No weight was changed.\n  " + "\n  ".join(errors))
    for c, module in modules.items():
        result = module.load_state_dict(updates[c], strict=False)
        if result.unexpected_keys:  # impossible unless the module renames keys on load
            raise DeltaError(f"{c} did not take {result.unexpected_keys}")
    return pipe
