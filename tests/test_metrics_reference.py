"""Evaluation metrics against formulas written here, independently of hirm_jax's code:
FID on features with known statistics (closed form for diagonal covariances), Wilson intervals
(the textbook formula and published values), CLIP-score cosines, UA / IRA / CRA on a hand-made
label table."""

import numpy as np
import pytest

from hirm_jax.evaluation.metrics import cosine_similarities, frechet_distance, wilson_interval
from hirm_jax.evaluation.unlearncanvas import ua_ira_cra


def features_with(mean: np.ndarray, cov_sqrt: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean is `mean` and sample covariance (ddof=1) is cov_sqrt @ cov_sqrt.T, exactly."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return mean + z @ cov_sqrt.T


def test_fid_equals_the_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0, -1.0]), np.array([3.0, 1.0, 2.0, -1.0])  # ||mu_a - mu_b|| = 3
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([4.0, 1.0, 0.25, 8.0])
    a = features_with(mu_a, np.diag(np.sqrt(var_a)), 400, seed=0)
    b = features_with(mu_b, np.diag(np.sqrt(var_b)), 300, seed=1)
    closed_form = np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert closed_form == pytest.approx(9.0 + 1.0 + 1.0 + 0.0 + 2.0)
    assert frechet_distance(a, b) == pytest.approx(closed_form, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_with_full_covariances_equals_the_formula_on_the_true_moments():
    from scipy import linalg
    rng = np.random.default_rng(2)
    sqrt_a, sqrt_b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    mu_a, mu_b = rng.standard_normal(5), rng.standard_normal(5)
    a, b = features_with(mu_a, sqrt_a, 500, seed=3), features_with(mu_b, sqrt_b, 500, seed=4)
    cov_a, cov_b = sqrt_a @ sqrt_a.T, sqrt_b @ sqrt_b.T
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def wilson_textbook(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k, n, published", [(8, 10, (0.4902, 0.9433)), (0, 10, (0.0, 0.2775)), (50, 100, (0.4038, 0.5962))])
def test_wilson_interval_matches_the_textbook_formula_and_published_values(k, n, published):
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(wilson_textbook(k, n), abs=1e-12)
    assert (low, high) == pytest.approx(published, abs=5e-5)
    assert wilson_interval(0, 0) is None


def test_clip_score_cosines_by_hand():
    images = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    texts = np.array([[1.0, 1.0], [0.0, -5.0], [3.0, 4.0]])
    np.testing.assert_allclose(cosine_similarities(images, texts), [1 / np.sqrt(2), -1.0, 1.0])


def test_ua_ira_cra_on_a_hand_made_label_table():
    row = lambda obj, style, obj_pred, style_pred: dict(target="heart", target_kind="object", object=obj, style=style,
                                                         object_pred=obj_pred, style_pred=style_pred)
    rows = [
        row("heart", "dotted", "circle", "dotted"),   # prompted with the concept, not recognised: erased
        row("heart", "striped", "heart", "striped"),  # still a heart: not erased
        row("heart", "outline", "square", "outline"),
        row("heart", "dotted", "circle", "striped"),  # UA 3 of 4 (style is not counted here)
        row("circle", "dotted", "circle", "dotted"),  # other objects: IRA counts objects, CRA styles
        row("square", "striped", "star", "striped"),
        row("star", "outline", "star", "dotted"),     # IRA 2 of 3, CRA 2 of 3
    ]
    result = ua_ira_cra(rows)
    assert (result["UA"]["successes"], result["UA"]["n"]) == (3, 4)
    assert (result["IRA"]["successes"], result["IRA"]["n"]) == (2, 3)
    assert (result["CRA"]["successes"], result["CRA"]["n"]) == (2, 3)
    assert result["per_target"]["heart"]["UA"]["value"] == pytest.approx(0.75)
