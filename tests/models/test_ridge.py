"""The ridge baseline against the normal equations in float64, and its estimator contract."""

import numpy as np
import pytest

from havir.models.ridge import RidgeDecoder


def normal_equations(x, y, alpha):
    """Independent reference: centred ridge via (X^T X + alpha I)^-1 X^T Y in float64."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return lambda new: (new - x_mean) @ w + y_mean


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 40))
    weights = rng.normal(size=(40, 2, 3))
    y = np.einsum("nv,vab->nab", x, weights) + rng.normal(scale=3.0, size=(120, 2, 3))
    return x, y


def test_predictions_equal_the_normal_equations(problem):
    x, y = problem
    ridge = RidgeDecoder(alphas=[30.0]).fit(x, {"target": y})
    expected = normal_equations(x, y.reshape(120, -1), 30.0)(x[:10]).reshape(10, 2, 3)
    np.testing.assert_allclose(ridge.predict(x[:10])["target"], expected, rtol=1e-3, atol=1e-3)


def test_strength_is_chosen_on_validation(problem):
    x, y = problem
    rng = np.random.default_rng(1)
    pure_noise = rng.normal(size=(120, 5))
    ridge = RidgeDecoder(alphas=[1e-3, 1e6]).fit(x, {"signal": y, "noise": pure_noise})
    assert ridge.alpha_["signal"] == 1e-3
    assert set(ridge.val_scores_["noise"]) == {1e-3, 1e6}


def test_unfitted_model_says_what_to_call():
    with pytest.raises(ValueError, match=r"call fit\(voxels, targets\) first"):
        RidgeDecoder().predict(np.zeros((2, 3)))


def test_mismatched_rows_are_refused(problem):
    x, y = problem
    with pytest.raises(ValueError, match="has 119 rows but voxels have 120"):
        RidgeDecoder().fit(x, {"target": y[:119]})


def test_save_and_load(problem, tmp_path):
    x, y = problem
    ridge = RidgeDecoder(alphas=[1.0, 100.0]).fit(x, {"target": y})
    ridge.save_pretrained(tmp_path / "ridge")
    loaded = RidgeDecoder.from_pretrained(tmp_path / "ridge")
    np.testing.assert_array_equal(loaded.predict(x)["target"], ridge.predict(x)["target"])
    assert loaded.alpha_ == ridge.alpha_
