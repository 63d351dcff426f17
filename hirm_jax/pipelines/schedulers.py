"""Schedulers as pure functions with array state, equal to diffusers' step for step, and the
sampling loop as one `lax.scan` (compiled once per pipeline, shape, steps and scheduler).

    scheduler = ddim_from_config(json.load(open("scheduler/scheduler_config.json")), steps=25)
    x = sample(denoise, scheduler, latents)        # denoise(x, t) -> model output, e.g. with CFG

Built (`from_name`): `ddim` (eta = 0; epsilon / v_prediction / sample; leading / trailing /
linspace spacing, steps_offset, set_alpha_to_one, clip_sample) and `euler` (EulerDiscrete
without churn: epsilon / v_prediction; linear sigma interpolation, final sigma zero), both over
linear / scaled_linear / squaredcos_cap_v2 betas. A scheduler is arrays per inference step
with `scale(i, x)` (the model input) and `step(i, output, x)`. Any other scheduler or setting
is a SchedulerError naming it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hirm_jax.errors import HirmError

PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class SchedulerError(HirmError, ValueError):
    """A scheduler or scheduler setting this module does not implement."""


def betas(config: dict) -> np.ndarray:
    """[T] float32 betas as diffusers computes them."""
    count, schedule = config.get("num_train_timesteps", 1000), config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float32)
    if schedule == "linear":
        return np.linspace(start, end, count, dtype=np.float32)
    if schedule == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, count, dtype=np.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), 0.999) for i in range(count)],
                        np.float32)
    raise SchedulerError(f"beta_schedule must be one of {list(BETA_SCHEDULES)} but is {schedule!r}")


def alphas_cumprod_of(config: dict) -> np.ndarray:
    """[T] float32 cumulative alphas as torch computes them on a CPU (a float64 running product)."""
    return np.cumprod((1.0 - betas(config)).astype(np.float32), dtype=np.float64).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DDIM:
    """DDIM with eta = 0, as arrays: per inference step i, its timestep and the cumulative alphas
    at it and at the previous timestep."""
    timesteps: np.ndarray  # [S] int
    alpha: np.ndarray  # [S] alphas_cumprod[t]
    alpha_prev: np.ndarray  # [S] alphas_cumprod[t - T // S], or the final alpha
    prediction_type: str
    clip_sample: float  # 0: no clipping
    init_noise_sigma: float = 1.0

    def scale(self, i, sample):
        return sample

    def step(self, i, model_output, sample):
        """x_{t-1} from x_t and the model's output at inference step i (a traced int is fine)."""
        a, a_prev = jnp.asarray(self.alpha)[i], jnp.asarray(self.alpha_prev)[i]
        b = 1 - a
        if self.prediction_type == "epsilon":
            x0, eps = (sample - b ** 0.5 * model_output) / a ** 0.5, model_output
        elif self.prediction_type == "v_prediction":
            x0, eps = a ** 0.5 * sample - b ** 0.5 * model_output, a ** 0.5 * model_output + b ** 0.5 * sample
        else:
            x0 = model_output
            eps = (sample - a ** 0.5 * x0) / b ** 0.5
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


@dataclasses.dataclass(frozen=True)
class Euler:
    """EulerDiscrete (s_churn = 0) as arrays: per inference step its timestep and sigma, and the next sigma."""
    timesteps: np.ndarray  # [S] float
    sigmas: np.ndarray  # [S + 1], the last 0
    prediction_type: str
    init_noise_sigma: float

    def scale(self, i, sample):
        return sample / (jnp.asarray(self.sigmas)[i] ** 2 + 1) ** 0.5

    def step(self, i, model_output, sample):
        sigma, sigma_next = jnp.asarray(self.sigmas)[i], jnp.asarray(self.sigmas)[i + 1]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        return sample + (sample - x0) / sigma * (sigma_next - sigma)


def euler_from_config(config: dict, steps: int) -> Euler:
    """An Euler scheduler from a diffusers scheduler_config.json (read as EulerDiscreteScheduler's)."""
    for field, default in (("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
                           ("interpolation_type", "linear"), ("final_sigmas_type", "zero"),
                           ("timestep_type", "discrete"), ("rescale_betas_zero_snr", False)):
        if config.get(field, default) not in (default, None):
            raise SchedulerError(f"scheduler {field}={config[field]!r} is not implemented for euler "
                                 f"(supported: {default!r})")
    config = {"timestep_spacing": "linspace", **config}  # EulerDiscreteScheduler's default spacing
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise SchedulerError(f"euler: prediction_type must be 'epsilon' or 'v_prediction' but is {prediction!r}")
    alphas_cumprod = alphas_cumprod_of(config)
    timesteps = inference_timesteps(config, steps, exact=True).astype(np.float32)
    all_sigmas = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    sigmas = np.concatenate([np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas), [0.0]]).astype(np.float32)
    spacing = config.get("timestep_spacing", "linspace")
    init = float(sigmas.max() if spacing in ("linspace", "trailing") else (sigmas.max() ** 2 + 1) ** 0.5)
    return Euler(timesteps, sigmas, prediction, init)


# PLMS's combination of the current model output and the last three kept ones, by how many are kept.
PLMS_WEIGHTS = {1: (1.0, 0.0, 0.0, 0.0), 2: (1.5, -0.5, 0.0, 0.0), 3: (23 / 12, -16 / 12, 5 / 12, 0.0),
                4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclasses.dataclass(frozen=True)
class PLMS:
    """PNDM with skip_prk_steps (what SD 1.x ships): a linear multistep method. Its history rule
    depends only on the step index, so it is tables per inference step (S + 1 model calls): the
    timesteps the model sees, the (t, t_prev) each update uses, the weights over [the current
    output, the last three kept], and whether the step is PNDM's second evaluation of the first
    interval (step 1: it updates from the first step's sample and its output is not kept)."""
    timesteps: np.ndarray  # [S + 1] int, what the model sees
    alpha: np.ndarray  # [S + 1] alphas_cumprod at the update's t
    alpha_prev: np.ndarray  # [S + 1] at its t_prev (or the final alpha)
    weights: np.ndarray  # [S + 1, 4]
    second: np.ndarray  # [S + 1] bool: the first interval's second evaluation
    prediction_type: str
    init_noise_sigma: float = 1.0

    def scale(self, i, sample):
        return sample

    def init(self, latents):
        zeros = jnp.zeros_like(latents)
        return (latents, zeros, zeros, zeros)  # (first sample, last three kept outputs)

    def step_with(self, i, model_output, sample, state):
        first, e1, e2, e3 = state
        w = jnp.asarray(self.weights)[i]
        combined = w[0] * model_output + w[1] * e1 + w[2] * e2 + w[3] * e3
        second = jnp.asarray(self.second)[i]
        sample = jnp.where(second, first, sample)
        a, a_prev = jnp.asarray(self.alpha)[i], jnp.asarray(self.alpha_prev)[i]
        if self.prediction_type == "v_prediction":
            combined = a ** 0.5 * combined + (1 - a) ** 0.5 * sample
        denominator = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        x = (a_prev / a) ** 0.5 * sample - (a_prev - a) * combined / denominator
        history = (jnp.where(second, e1, model_output), jnp.where(second, e2, e1), jnp.where(second, e3, e2))
        return x, (first, *history)


def plms_from_config(config: dict, steps: int) -> PLMS:
    """PNDM (skip_prk_steps=True) from a diffusers scheduler_config.json."""
    if not config.get("skip_prk_steps", False):
        raise SchedulerError("scheduler skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is not implemented; "
                             "SD 1.x ships skip_prk_steps=True")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise SchedulerError(f"pndm: prediction_type must be 'epsilon' or 'v_prediction' but is {prediction!r}")
    count, spacing = config.get("num_train_timesteps", 1000), config.get("timestep_spacing", "leading")
    if spacing == "trailing":  # PNDM's own rule: ascending, then -1
        ascending = np.round(np.arange(count, 0, -count / steps))[::-1].astype(np.int64) - 1
    else:
        ascending = inference_timesteps(config, steps)[::-1]
    seen = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    ratio = count // steps
    alphas_cumprod = alphas_cumprod_of(config)
    final = np.float32(1.0) if config.get("set_alpha_to_one", False) else alphas_cumprod[0]
    second = np.arange(len(seen)) == 1
    t_update, t_prev = np.where(second, seen + ratio, seen), np.where(second, seen, seen - ratio)
    weights = np.array([PLMS_WEIGHTS[min(max(i, 1), 4)] for i in range(len(seen))], np.float32)  # o1 is never kept
    weights[second] = (0.5, 0.5, 0.0, 0.0)
    return PLMS(seen, alphas_cumprod[t_update],
                np.where(t_prev >= 0, alphas_cumprod[np.maximum(t_prev, 0)], final).astype(np.float32),
                weights, second, prediction)


def from_name(name: str, config: dict, steps: int):
    """The scheduler `name` (`ddim`, `euler`, `pndm`) built from a diffusers scheduler_config.json."""
    builders = {"ddim": ddim_from_config, "euler": euler_from_config, "pndm": plms_from_config}
    if name not in builders:
        raise SchedulerError(f"scheduler must be one of {sorted(builders)} in JAX but is {name!r}")
    return builders[name](config, steps)


def inference_timesteps(config: dict, steps: int, exact: bool = False) -> np.ndarray:
    count, spacing = config.get("num_train_timesteps", 1000), config.get("timestep_spacing", "leading")
    if not 1 <= steps <= count:
        raise SchedulerError(f"steps must be in [1, {count}] (num_train_timesteps) but is {steps}")
    if spacing == "linspace":  # DDIM rounds; Euler keeps them fractional (`exact`)
        values = np.linspace(0, count - 1, steps, dtype=np.float32 if exact else np.float64)[::-1]
        return values.copy() if exact else values.round().astype(np.int64)
    if spacing == "leading":
        return (np.arange(steps) * (count // steps)).round()[::-1].astype(np.int64) + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(count, 0, -count / steps)).astype(np.int64) - 1
    raise SchedulerError(f"timestep_spacing must be one of {list(SPACINGS)} but is {spacing!r}")


def ddim_from_config(config: dict, steps: int) -> DDIM:
    """A DDIM scheduler from a diffusers scheduler_config.json (any SD scheduler's config is
    accepted and read as DDIM's, as diffusers' `DDIMScheduler.from_config` does)."""
    for field, default in (("thresholding", False), ("rescale_betas_zero_snr", False)):
        if config.get(field, default):
            raise SchedulerError(f"scheduler {field}={config[field]!r} is not implemented (supported: {default!r})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise SchedulerError(f"prediction_type must be one of {list(PREDICTIONS)} but is {prediction!r}")
    alphas_cumprod = alphas_cumprod_of(config)
    final = np.float32(1.0) if config.get("set_alpha_to_one", True) else alphas_cumprod[0]
    timesteps = inference_timesteps(config, steps)
    prev = timesteps - config.get("num_train_timesteps", 1000) // steps
    alpha_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final).astype(np.float32)
    clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else 0.0
    return DDIM(timesteps, alphas_cumprod[timesteps], alpha_prev, prediction, float(clip))


def sample(denoise: Callable, scheduler, latents: jax.Array) -> jax.Array:
    """Run the scheduler from `latents` (already scaled by init_noise_sigma): one lax.scan over
    the inference steps; denoise(x, t) -> the model output at timestep t (guidance inside)."""
    timesteps = jnp.asarray(scheduler.timesteps)
    # A multistep scheduler carries its history (init / step_with); a one-step one carries nothing.
    init = getattr(scheduler, "init", lambda x: ())
    step = getattr(scheduler, "step_with", lambda i, output, x, state: (scheduler.step(i, output, x), state))

    def body(carry, i):
        x, state = carry
        return step(i, denoise(scheduler.scale(i, x), timesteps[i]), x, state), None
    return jax.lax.scan(body, (latents, init(latents)), jnp.arange(len(scheduler.timesteps)))[0][0]


def guided_sample(model: Callable, scheduler, cond, uncond, guidance, latents) -> jax.Array:
    """Sample from `latents` (before init_noise_sigma) with classifier-free guidance: uncond [1 or B, T, D]."""
    denoise = guided(model, cond, jnp.broadcast_to(uncond, cond.shape), guidance)
    return sample(denoise, scheduler, latents * scheduler.init_noise_sigma)


def noise(seeds, shape: tuple) -> np.ndarray:
    """[N, *shape] standard normal starting latents, one jax.random stream per seed."""
    keys = jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])
    return np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.wrap_key_data(k), shape))(keys))


def guided(model: Callable, cond, uncond, guidance: float) -> Callable:
    """Classifier-free guidance in one batched pass: model(x2, t, context2) over [uncond; cond]."""
    context = jnp.concatenate([uncond, cond])

    def denoise(x, t):
        pred_uncond, pred_cond = jnp.split(model(jnp.concatenate([x, x]), t, context), 2)
        return pred_uncond + guidance * (pred_cond - pred_uncond)
    return denoise
