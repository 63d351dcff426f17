"""Evaluation metrics against formulas written here, independently of hirm_jax's code:
FID on features with known statistics (closed form for diagonal covariances), Wilson intervals
(the textbook formula and published values), CLIP-score cosines, UA / IRA / CRA on a hand-made
label table."""

import numpy as np
import pytest

from hirm_jax.evaluation.metrics import (bootstrap_interval, cosine_similarities, frechet_distance, gaussian_statistics,
                                         mean_metric, proportion, wilson_interval)
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


def test_wilson_interval_stays_within_zero_and_one():
    # the formula gives 1 + 2e-16 for 16 of 16 and -1e-17 for 0 of 21 in floating point
    assert wilson_interval(16, 16)[1] == 1.0 and wilson_interval(0, 21)[0] == 0.0


def test_fid_falls_back_to_offset_covariances_when_the_product_has_no_finite_root(monkeypatch):
    from scipy import linalg
    sqrtm, calls = linalg.sqrtm, []
    def first_fails(m, disp=True):
        calls.append(disp)
        if len(calls) == 1:
            return np.full_like(m, np.nan), 0.0
        return sqrtm(m)
    monkeypatch.setattr(linalg, "sqrtm", first_fails)
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    a = features_with(np.zeros(3), np.diag(np.sqrt(var_a)), 200, seed=0)
    b = features_with(np.ones(3), np.diag(np.sqrt(var_b)), 200, seed=1)
    offset = 1e-6  # pytorch-fid's: added to both diagonals
    expected = 3.0 + np.sum(var_a + var_b - 2 * np.sqrt((var_a + offset) * (var_b + offset)))
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert len(calls) == 2


def test_proportion_and_mean_carry_their_textbook_intervals():
    import statistics
    hit = proportion("UA", 8, 10, True)
    assert (hit.value, hit.n, hit.interval_method) == (0.8, 10, "wilson95")
    assert hit.interval == pytest.approx(wilson_textbook(8, 10), abs=1e-12)
    assert hit.to_json()["interval"] == list(hit.interval)
    assert proportion("UA", 0, 0, True).value is None and proportion("UA", 0, 0, True).to_json()["interval"] is None
    values = [1.0, 2.0, 3.0, 4.0]
    m = mean_metric("score", values, True, unit="cosine")
    half = 1.959963984540054 * statistics.stdev(values) / 2  # 1.96 standard errors, n = 4
    assert (m.value, m.n, m.interval_method, m.unit) == (2.5, 4, "normal95", "cosine")
    assert m.interval == pytest.approx((2.5 - half, 2.5 + half), abs=1e-12)
    two = mean_metric("score", [1.0, 3.0], True)  # the fewest values with a spread
    assert two.interval == pytest.approx((2.0 - 1.959963984540054, 2.0 + 1.959963984540054), abs=1e-12)
    assert two.interval_method == "normal95"
    one = mean_metric("score", [0.3], True)
    assert (one.value, one.interval, one.interval_method) == (0.3, None, None)  # no spread from one value
    assert (mean_metric("score", [], True).value, mean_metric("score", [], True).n) == (None, 0)


def test_bootstrap_interval_of_a_mean_is_close_to_the_normal_one():
    data = np.random.default_rng(0).normal(5.0, 2.0, size=2000)
    mean_of = lambda idx: data[idx].mean()
    low, high = bootstrap_interval(mean_of, len(data), resamples=2000, seed=1)
    se = data.std(ddof=1) / np.sqrt(len(data))
    assert low < data.mean() < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.08)  # a 90% interval would be 16% narrower
    assert (low + high) / 2 == pytest.approx(data.mean(), abs=0.2 * se)
    # the first drawn index is uniform on 0..999: its 2.5% and 97.5% quantiles are 25 and 974
    first = bootstrap_interval(lambda idx: float(idx[0]), 1000, resamples=20000, seed=2)
    assert first == pytest.approx((25, 974), abs=4)
    narrow = bootstrap_interval(mean_of, len(data), resamples=2000, seed=1, alpha=0.5)
    assert low < narrow[0] < narrow[1] < high  # a 50% interval sits inside the 95% one
    assert bootstrap_interval(mean_of, len(data), 50) == bootstrap_interval(mean_of, len(data), 50, seed=0)
    two = np.array([0.0, 1.0])  # two values can be resampled: every index drawn, both extremes in the tails
    assert bootstrap_interval(lambda idx: two[idx].mean(), 2, resamples=200) == (0.0, 1.0)
    assert bootstrap_interval(mean_of, 10, resamples=1)[0] == bootstrap_interval(mean_of, 10, resamples=1)[1]
    assert bootstrap_interval(mean_of, 10, resamples=0) is None
    assert bootstrap_interval(mean_of, 1, resamples=10) is None


def test_gaussian_statistics_need_two_samples_of_vectors():
    mean, cov = gaussian_statistics(np.array([[0.0, 1.0], [2.0, 5.0]]))
    np.testing.assert_allclose(mean, [1.0, 3.0])
    np.testing.assert_allclose(cov, [[2.0, 4.0], [4.0, 8.0]])
    for bad in (np.zeros((1, 3)), np.zeros(4)):
        with pytest.raises(ValueError, match=r"\(n >= 2, dim\)"):
            gaussian_statistics(bad)


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
