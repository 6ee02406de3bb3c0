"""The ridge baseline against the normal equations in float64, and its estimator contract."""

import numpy as np
import pytest
import torch

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


def test_validation_holds_out_whole_images():
    """Three repetitions of each image, voxels = the image's own random pattern plus trial noise,
    targets = the image's own random features: nothing generalises to an unseen image. Split by
    image, validation sees that (scores near 0); split by trial, repetitions of one image sat on
    both sides and the smallest strength looked good (correlation above 0.8)."""
    rng = np.random.default_rng(2)
    images = np.repeat(np.arange(60), 3)
    pattern, features = rng.normal(size=(60, 200)), rng.normal(size=(60, 50))
    voxels = pattern[images] + 0.3 * rng.normal(size=(180, 200))
    ridge = RidgeDecoder(alphas=[1e-2, 1e4], val_fraction=0.2).fit(voxels, {"target": features[images]}, groups=images)
    assert max(ridge.val_scores_["target"].values()) < 0.3 and ridge.val_images_ == 12


def test_split_by_group_never_shares_an_image():
    from havir.models.ridge import split_by_group

    images = np.repeat(np.arange(50), 3)[np.random.default_rng(3).permutation(150)]
    val, fit = split_by_group(images, 0.1, seed=0)
    assert len(np.unique(images[val])) == 5 and not set(images[val]) & set(images[fit])
    assert sorted(np.concatenate([val, fit]).tolist()) == list(range(150))


def brain_diffuser_reference(x_train, y_train, x_test, alpha):
    """A literal float64 port of Brain-Diffuser's scripts/*_regression.py: z-score the voxels with
    the training mean and std (ddof 1), sklearn Ridge(alpha), then re-scale the test predictions
    to the training targets' mean and std."""
    from sklearn.linear_model import Ridge

    mean, scale = x_train.mean(0), x_train.std(0, ddof=1)
    x_train, x_test = (x_train - mean) / scale, (x_test - mean) / scale
    predicted = Ridge(alpha=alpha, fit_intercept=True).fit(x_train, y_train).predict(x_test)
    standardised = (predicted - predicted.mean(0)) / predicted.std(0)
    return standardised * y_train.std(0) + y_train.mean(0)


def test_brain_diffuser_settings_equal_its_scripts_in_float64():
    rng = np.random.default_rng(4)
    x = rng.normal(loc=3.0, scale=rng.uniform(0.5, 2.0, size=300), size=(150, 300))
    y = x[:, :20] @ rng.normal(size=(20, 24)) + rng.normal(scale=2.0, size=(150, 24))
    ridge = RidgeDecoder(fixed_alphas={"target": 6e4}, standardise_inputs=True, rescale=True)
    predicted = ridge.fit(x[:120], {"target": y[:120].reshape(120, 4, 6)}).predict(x[120:])["target"]
    expected = brain_diffuser_reference(x[:120], y[:120], x[120:], 6e4)
    np.testing.assert_allclose(predicted.reshape(30, 24), expected, rtol=2e-3, atol=2e-3)
    assert ridge.alpha_ == {"target": 6e4} and ridge.val_scores_ == {}  # fixed: no validation
    plain = RidgeDecoder(fixed_alphas={"target": 6e4}, standardise_inputs=True).fit(x[:120], {"target": y[:120]}).predict(x[120:])
    assert plain["target"].std(0).mean() < 0.2 * expected.std(0).mean()  # unscaled: shrunk towards the mean


def test_rescaling_equals_the_float64_formula():
    from havir.models.ridge import rescale_to_training

    rng = np.random.default_rng(5)
    predicted, train = rng.normal(2.0, 0.01, size=(40, 7)), rng.normal(-1.0, 3.0, size=(500, 7))
    got = rescale_to_training(torch.tensor(predicted, dtype=torch.float32), torch.tensor(train.mean(0), dtype=torch.float32),
                              torch.tensor(train.std(0), dtype=torch.float32))
    expected = (predicted - predicted.mean(0)) / predicted.std(0) * train.std(0) + train.mean(0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="predict at least 2 images at once"):
        rescale_to_training(torch.zeros(1, 7), torch.zeros(7), torch.ones(7))
