"""Figures and their uncertainty: proportions (Wilson), means (normal), FID (Frechet distance), CLIP score.

    Metric("UA", value=0.95, n=200, interval=wilson_interval(190, 200), interval_method="wilson95",
           higher_is_better=True)
    frechet_distance(features_a, features_b)      # FID when the features are Inception pool3 (2048-d)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclasses.dataclass
class Metric:
    name: str
    value: Optional[float]
    n: int
    higher_is_better: bool
    interval: Optional[tuple[float, float]] = None
    interval_method: Optional[str] = None
    unit: str = "fraction"
    description: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["interval"] = list(self.interval) if self.interval is not None else None
        return d


def wilson_interval(successes: int, n: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """The Wilson score interval of a proportion (95% by default); None when n == 0."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(name: str, successes: int, n: int, higher_is_better: bool, description: str = "") -> Metric:
    return Metric(name, successes / n if n else None, n, higher_is_better, wilson_interval(successes, n),
                  "wilson95", "fraction", description)


def mean_metric(name: str, values: Sequence[float], higher_is_better: bool, unit: str = "", description: str = "") -> Metric:
    """Mean with a normal-approximation 95% interval (mean +- 1.96 standard errors)."""
    values = np.asarray(values, np.float64)
    n = int(values.size)
    if n == 0:
        return Metric(name, None, 0, higher_is_better, unit=unit, description=description)
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    interval = (mean - Z95 * se, mean + Z95 * se) if n > 1 else None
    return Metric(name, mean, n, higher_is_better, interval, "normal95" if n > 1 else None, unit, description)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int = 0,
                       alpha: float = 0.05) -> Optional[tuple[float, float]]:
    """Percentile bootstrap: `statistic(indices)` over `resamples` draws of n indices with replacement."""
    if resamples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    return (float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2)))


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, dim) but have shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as pytorch-fid and clean-fid compute it."""
    from scipy import linalg
    mu_a, sigma_a = gaussian_statistics(features_a)
    mu_b, sigma_b = gaussian_statistics(features_b)
    covmean, _ = linalg.sqrtm(sigma_a @ sigma_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals, as pytorch-fid does
        offset = np.eye(sigma_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def cosine_similarities(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired embeddings (the CLIP score the HiRM paper reports, 0.30-ish)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)
