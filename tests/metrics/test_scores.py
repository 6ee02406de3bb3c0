"""The protocol's scores against independent references (explicit loops, numpy, scikit-image)."""

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torch import nn

from havir.metrics import scores
from havir.metrics.networks import FeatureNetwork
from havir.metrics.protocols import FeatureMetric, Resize
from havir.metrics.evaluate import score_images


def _slow_identification(truth, recon):
    """The definition, literally: for each j, count i != j with corr(G_i, R_j) < corr(G_j, R_j)."""
    n = len(truth)
    out = []
    for j in range(n):
        own = np.corrcoef(truth[j].ravel(), recon[j].ravel())[0, 1]
        wins = sum(np.corrcoef(truth[i].ravel(), recon[j].ravel())[0, 1] < own for i in range(n) if i != j)
        out.append(wins / (n - 1))
    return np.array(out)


@pytest.fixture
def noisy_pairs():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(15, 4, 5)).astype(np.float32)
    recon = (truth + rng.normal(scale=2.0, size=truth.shape)).astype(np.float32)  # some identifications fail
    return truth, recon


def test_identification_equals_the_double_loop(noisy_pairs, monkeypatch):
    truth, recon = noisy_pairs
    expected = _slow_identification(truth, recon)
    assert 0.55 < expected.mean() < 0.98  # neither trivial nor hopeless, so errors would show
    np.testing.assert_allclose(scores.two_way_identification(truth, recon), expected)
    monkeypatch.setattr(scores, "_COLUMN_BLOCK", 3)  # the blocked accumulation gives the same
    np.testing.assert_allclose(scores.two_way_identification(truth, recon), expected)


def test_identification_perfect_and_shuffled():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(300, 64))
    assert scores.two_way_identification(truth, truth).mean() == 1.0
    shuffled = scores.two_way_identification(truth, truth[rng.permutation(300)])
    assert abs(shuffled.mean() - 0.5) < 0.05
    with pytest.raises(ValueError, match="at least two"):
        scores.two_way_identification(truth[:1], truth[:1])


def test_correlation_distance_against_numpy(noisy_pairs):
    truth, recon = noisy_pairs
    expected = [1 - np.corrcoef(t.ravel(), r.ravel())[0, 1] for t, r in zip(truth, recon)]
    np.testing.assert_allclose(scores.correlation_distance(truth, recon), expected, atol=1e-12)
    np.testing.assert_allclose(scores.correlation_distance(truth, truth), 0, atol=1e-12)
    with pytest.raises(ValueError, match="constant"):
        scores.correlation_distance(np.ones((2, 5)), truth[:2].reshape(2, -1)[:, :5])


@pytest.fixture
def image_pairs():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    recon = np.clip(truth + rng.normal(scale=60, size=truth.shape), 0, 255).astype(np.uint8)
    return truth, recon


def test_pixcorr_against_numpy(image_pairs):
    truth, recon = image_pairs
    expected = [np.corrcoef(t.ravel() / 255.0, r.ravel() / 255.0)[0, 1] for t, r in zip(truth, recon)]
    np.testing.assert_allclose(scores.pixcorr(truth, recon), expected, atol=1e-12)
    assert np.all(scores.pixcorr(truth, truth) > 1 - 1e-12)


def test_pixel_scores_refuse_images_of_different_sizes(image_pairs):
    truth, _ = image_pairs
    larger = np.stack([np.kron(t, np.ones((2, 2, 1))) for t in truth]).astype(np.uint8)
    with pytest.raises(ValueError, match="pixel size first"):
        scores.pixcorr(truth, larger)  # resizing is the protocol preset's step, never implicit
    with pytest.raises(ValueError, match="reconstructions"):
        scores.pixcorr(truth, truth[:3])


def test_ssim_is_scikit_image_2d_ssim_on_grayscale(image_pairs):
    truth, recon = image_pairs
    expected = [
        structural_similarity(rgb2gray(t / 255.0), rgb2gray(r / 255.0), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for t, r in zip(truth, recon)
    ]
    np.testing.assert_allclose(scores.ssim(truth, recon), expected, atol=1e-12)
    np.testing.assert_allclose(scores.ssim(truth, truth), 1.0, atol=1e-12)
    # True 2-D SSIM: transposing both images leaves it unchanged (a per-column 1-D SSIM would not).
    transposed = scores.ssim(truth.transpose(0, 2, 1, 3).copy(), recon.transpose(0, 2, 1, 3).copy())
    np.testing.assert_allclose(transposed, expected, atol=1e-12)


def test_float_images_outside_unit_range_are_refused(image_pairs):
    truth, _ = image_pairs
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scores.pixcorr(truth, truth.astype(np.float32))  # 0..255 floats: the 1/255 trap


def test_bootstrap_interval():
    rng = np.random.default_rng(3)
    values = rng.normal(0.7, 0.1, size=400)
    low, high = scores.bootstrap_interval(values, seed=0)
    assert low < values.mean() < high
    assert scores.bootstrap_interval(values, seed=0) == (low, high)
    # about +-1.96 standard errors
    assert abs((high - low) / 2 - 1.96 * values.std() / np.sqrt(400)) < 0.003


class _TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, images):
        hidden = torch.relu(self.conv(images))
        return {"map": hidden, "pooled": hidden.mean((2, 3))}


def test_scores_do_not_depend_on_batch_size_or_order(image_pairs):
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 256, (9, 40, 40, 3), dtype=np.uint8)
    recon = np.clip(truth + rng.normal(scale=80, size=truth.shape), 0, 255).astype(np.uint8)
    network = FeatureNetwork("tinyconv", "test network, random weights", _TinyConv(), Resize(32, "tensor", "bilinear", True))
    metrics = (FeatureMetric("ident", "tinyconv", "map", "identification"), FeatureMetric("dist", "tinyconv", "pooled", "distance"))

    def run(t, r, batch_size):
        return score_images(t, r, networks={"tinyconv": network}, metrics=metrics, batch_size=batch_size, resamples=10)

    one, five = run(truth, recon, 1), run(truth, recon, 5)
    order = rng.permutation(9)
    permuted = run(truth[order], recon[order], 4)
    assert set(one) == {"pixcorr", "ssim", "ident", "dist"}
    for name in one:
        np.testing.assert_allclose(one[name].per_image, five[name].per_image, atol=1e-6)
        np.testing.assert_allclose(one[name].per_image[order], permuted[name].per_image, atol=1e-6)
    assert one["ident"].mean > 0.6
    assert not one["ident"].protocol and one["ident"].network == "test network, random weights"


def test_score_images_times_each_part_without_changing_the_scores():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    recon = np.clip(truth + rng.normal(scale=80, size=truth.shape), 0, 255).astype(np.uint8)
    network = FeatureNetwork("tinyconv", "test network, random weights", _TinyConv(), Resize(32, "tensor", "bilinear", True))
    run = dict(networks={"tinyconv": network}, metrics=(FeatureMetric("dist", "tinyconv", "pooled", "distance"),),
               batch_size=4, resamples=10)
    timings = {}
    timed = score_images(truth, recon, timings=timings, **run)
    assert set(timings) == {"pixel_images", "pixcorr", "ssim", "tinyconv"}  # bench/bench_eval.py's parts
    assert all(seconds > 0 for seconds in timings.values())
    untimed = score_images(truth, recon, **run)
    for name, score in untimed.items():
        np.testing.assert_array_equal(timed[name].per_image, score.per_image)
