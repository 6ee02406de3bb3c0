"""The field's image-reconstruction scores, per image, as ``eval-protocol.md`` defines them.

Every function returns one score per image (so that means, confidence intervals and the per-image
CSV come from the same numbers); the reported metric is the mean. Inputs follow one convention:

``ground_truth`` / ``reconstructions`` : arrays of shape (n_images, ...), row i of one is the
    pair of row i of the other.
``images`` : uint8 arrays (n, height, width, 3) or float arrays in [0, 1] of the same shape.

Resizing (which protocol, which library, which size) is not done here: it is a step of the
protocol preset (:mod:`havir.metrics.protocols`), applied before these functions.
"""

from __future__ import annotations

import numpy as np

# Feature columns correlated per step: bounds the float64 copies of the feature matrices
# (AlexNet's features.4 has 140,000 columns; 1000 images of them are 1.1 GB in float64).
_COLUMN_BLOCK = 16384


def as_unit_float(images: np.ndarray) -> np.ndarray:
    """Images as float64 in [0, 1]: uint8 is divided by 255, floats are checked to lie in [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    # A float32 resize of values in [0, 1] may leave them an ulp outside: tolerate rounding only.
    if images.size and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
        raise ValueError(f"float images must lie in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]")
    return images.astype(np.float64)


def _check_pairs(ground_truth: np.ndarray, reconstructions: np.ndarray) -> None:
    if len(ground_truth) != len(reconstructions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(reconstructions)} reconstructions")
    if len(ground_truth) == 0:
        raise ValueError("no images to score")
    if ground_truth.ndim != 4 or ground_truth.shape[3] != 3:
        raise ValueError(f"ground truth must be RGB images (n, h, w, 3), got shape {ground_truth.shape}")
    if reconstructions.shape != ground_truth.shape:
        raise ValueError(
            f"reconstructions of shape {reconstructions.shape} against ground truth of shape {ground_truth.shape}: "
            "bring both to the protocol's pixel size first (havir.metrics.protocols.pixel_images)"
        )


def pixcorr(ground_truth: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """PixCorr per image: Pearson r between the flattened RGB pixels of the ground truth and the
    reconstruction, both (n, s, s, 3) in [0, 1] (or uint8) at the same size. Shape (n,) float64
    (correlations are accumulated in float64 whatever the input's precision, as ``np.corrcoef``)."""
    truth, recon = np.asarray(ground_truth), np.asarray(reconstructions)
    _check_pairs(truth, recon)
    truth, recon = as_unit_float(truth), as_unit_float(recon)
    return row_correlations(truth.reshape(len(truth), -1), recon.reshape(len(recon), -1))


def ssim(ground_truth: np.ndarray, reconstructions: np.ndarray, *, variant: str = "2d") -> np.ndarray:
    """SSIM per image on grayscale (``rgb2gray``), both sets (n, s, s, 3) in [0, 1] at the same
    size: scikit-image's SSIM with Gaussian weights (sigma 1.5), population covariance, data range 1.

    ``variant`` "2d" is the true 2-D SSIM (Wang et al. 2004; ``channel_axis=None``).
    "per-column-1d" is what old scikit-image computed for ``multichannel=True`` on a 2-D
    grayscale image (Brain-Diffuser's script): the last axis taken as channels, so a 1-D SSIM
    down each pixel column, averaged over columns. The computation keeps the input's float
    precision (float32 stays float32, as in scikit-image). Shape (n,) float64.
    """
    from skimage.color import rgb2gray  # here: scikit-image takes 0.4 s to import, and `havir table` never needs it
    from skimage.metrics import structural_similarity

    truth, recon = np.asarray(ground_truth), np.asarray(reconstructions)
    _check_pairs(truth, recon)
    if variant not in ("2d", "per-column-1d"):
        raise ValueError(f"SSIM variant must be '2d' or 'per-column-1d', got {variant!r}")
    if truth.dtype == np.uint8:
        truth, recon = as_unit_float(truth), as_unit_float(recon)
    channel_axis = None if variant == "2d" else -1
    return np.array([
        structural_similarity(
            rgb2gray(r), rgb2gray(t), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, channel_axis=channel_axis,
        )
        for t, r in zip(truth, recon)
    ], dtype=np.float64)


def _standardised_blocks(features: np.ndarray):
    """Yield column blocks of the rows of ``features`` centred and scaled to unit norm (float64)."""
    rows = np.asarray(features).reshape(len(features), -1)
    mean = rows.mean(axis=1, dtype=np.float64)
    norm = np.sqrt(np.maximum(np.einsum("ij,ij->i", rows, rows, dtype=np.float64) - rows.shape[1] * mean**2, 0))
    if np.any(norm == 0):
        raise ValueError("a feature vector is constant (zero variance): its correlation is undefined")
    for start in range(0, rows.shape[1], _COLUMN_BLOCK):
        block = rows[:, start : start + _COLUMN_BLOCK].astype(np.float64)
        yield (block - mean[:, None]) / norm[:, None]


def correlation_matrix(ground_truth: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """C[i, j] = Pearson r between ground-truth features i and reconstruction features j, (n, n)
    float64. Features are flattened per image; computed in column blocks to bound memory."""
    if len(ground_truth) != len(reconstructions):
        raise ValueError(f"{len(ground_truth)} ground-truth feature rows but {len(reconstructions)} reconstruction rows")
    if np.asarray(ground_truth)[0].size != np.asarray(reconstructions)[0].size:
        raise ValueError("ground-truth and reconstruction features have different sizes")
    matrix = np.zeros((len(ground_truth), len(reconstructions)))
    for truth, recon in zip(_standardised_blocks(ground_truth), _standardised_blocks(reconstructions)):
        matrix += truth @ recon.T
    return matrix


def row_correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pearson r between row i of ``first`` and row i of ``second`` (flattened), (n,) float64."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} rows against {len(second)} rows")
    total = np.zeros(len(first))
    for a, b in zip(_standardised_blocks(first), _standardised_blocks(second)):
        total += np.einsum("ij,ij->i", a, b)
    return total


def two_way_identification(ground_truth: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Two-way identification per reconstruction: with C = :func:`correlation_matrix`, the
    fraction of the other n - 1 ground truths i != j with C[i, j] < C[j, j]. Chance is 0.5; the
    metric is the mean over j (MindEye's and Brain-Diffuser's definition). Shape (n,)."""
    if len(ground_truth) < 2:
        raise ValueError("two-way identification needs at least two images")
    return identification_from_correlations(correlation_matrix(ground_truth, reconstructions))


def identification_from_correlations(matrix: np.ndarray) -> np.ndarray:
    """Two-way identification per reconstruction from C = :func:`correlation_matrix`, (n,)."""
    own = np.diag(matrix)
    return (matrix < own[None, :]).sum(axis=0) / (len(matrix) - 1)  # the diagonal is never < itself


def correlation_distance(ground_truth: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """1 - Pearson r between ground-truth and reconstruction features of each image, (n,).
    Lower is better (EffNet-B and SwAV)."""
    return 1.0 - row_correlations(ground_truth, reconstructions)


def bootstrap_interval(
    per_image: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``per_image`` scores.

    Images are resampled with replacement. For identification the per-image fractions are
    resampled while each fraction keeps its comparison set of all n images.
    """
    scores = np.asarray(per_image, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
