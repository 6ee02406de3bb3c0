"""The ridge baseline (Brain-Diffuser's first stage): voxels -> every target, in closed form.

One thin SVD of the centred training voxels ``X = U S V^T`` serves every target and every
regularisation strength: the ridge solution for strength ``alpha`` is
``W = V diag(s / (s^2 + alpha)) U^T Y``. The strength is chosen per target on a validation
split of the training rows (highest mean per-sample correlation), then the model is refitted on
all training rows with one more SVD.

Symbols: X (n, v) voxels, Y (n, t) targets flattened, U (n, k), s (k,), V (v, k), k = min(n, v).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from havir.io import atomic_path, write_json
from havir.metrics.scores import row_correlations

DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vt = torch.linalg.svd(x, full_matrices=False)
    return u, s, vt.T


def _solve(u, s, v, y, alpha: float) -> torch.Tensor:
    """Ridge coefficients (v, t) from the SVD of X: V diag(s / (s^2 + alpha)) U^T Y."""
    return v @ ((s / (s**2 + alpha))[:, None] * (u.T @ y))


class RidgeDecoder:
    """Closed-form ridge regression from voxels to several targets at once.

    Parameters
    ----------
    alphas : regularisation strengths tried for each target.
    val_fraction : fraction of the training rows held out to choose each target's strength.
    seed : seed of the validation split.
    device : where the SVD runs (CUDA makes the realistic size take seconds).
    """

    def __init__(self, *, alphas=DEFAULT_ALPHAS, val_fraction: float = 0.1, seed: int = 0, device: str = "cpu"):
        self.alphas = tuple(float(a) for a in alphas)
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device

    def fit(self, voxels, targets: dict[str, np.ndarray]) -> RidgeDecoder:
        """Fit one ridge per target. ``voxels`` (n, v); each target (n, ...) with the same n."""
        x = torch.as_tensor(np.asarray(voxels), dtype=torch.float32, device=self.device)
        if x.ndim != 2:
            raise ValueError(f"voxels must have shape (n_samples, n_voxels), got {tuple(x.shape)}")
        for name, target in targets.items():
            if len(target) != len(x):
                raise ValueError(f"target {name} has {len(target)} rows but voxels have {len(x)}")
        if not self.alphas or min(self.alphas) <= 0:
            raise ValueError(f"alphas must be positive, got {self.alphas}")
        n_val = max(1, int(round(self.val_fraction * len(x))))
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(x))).to(self.device)
        val, fit = order[:n_val], order[n_val:]

        x_mean = x[fit].mean(0)
        u, s, v = _thin_svd(x[fit] - x_mean)
        self.alpha_, self.val_scores_, self.target_shapes_ = {}, {}, {}
        flat = {}
        for name, target in targets.items():
            y = torch.as_tensor(np.asarray(target), dtype=torch.float32, device=self.device).flatten(1)
            flat[name] = y
            self.target_shapes_[name] = tuple(np.asarray(target).shape[1:])
            y_mean = y[fit].mean(0)
            scores = {}
            for alpha in self.alphas:
                predicted = (x[val] - x_mean) @ _solve(u, s, v, y[fit] - y_mean, alpha) + y_mean
                scores[alpha] = float(row_correlations(predicted.cpu().numpy(), y[val].cpu().numpy()).mean())
            self.val_scores_[name] = scores
            self.alpha_[name] = max(scores, key=scores.get)

        self.x_mean_ = x.mean(0)
        u, s, v = _thin_svd(x - self.x_mean_)
        self.coef_, self.intercept_ = {}, {}
        for name, y in flat.items():
            y_mean = y.mean(0)
            self.coef_[name] = _solve(u, s, v, y - y_mean, self.alpha_[name])
            self.intercept_[name] = y_mean
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("this RidgeDecoder is not fitted yet: call fit(voxels, targets) first")

    def predict(self, voxels) -> dict[str, np.ndarray]:
        """Predicted targets for ``voxels`` (n, v), each with its training shape (n, ...)."""
        self._check_fitted()
        x = torch.as_tensor(np.asarray(voxels), dtype=torch.float32, device=self.device)
        if x.ndim != 2 or x.shape[1] != len(self.x_mean_):
            raise ValueError(f"voxels must have shape (n, {len(self.x_mean_)}), got {tuple(x.shape)}")
        centred = x - self.x_mean_
        return {
            name: (centred @ coef + self.intercept_[name]).cpu().numpy().reshape(len(x), *self.target_shapes_[name])
            for name, coef in self.coef_.items()
        }

    def save_pretrained(self, folder: Path) -> None:
        """Write ``config.json`` (settings, chosen strengths, validation scores) and the weights."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"x_mean": self.x_mean_.cpu()}
        for name in self.coef_:
            tensors[f"{name}.coef"] = self.coef_[name].cpu().contiguous()
            tensors[f"{name}.intercept"] = self.intercept_[name].cpu()
        with atomic_path(folder / "model.safetensors") as temporary:
            save_file(tensors, temporary)
        write_json(folder / "config.json", {
            "_class_name": "RidgeDecoder", "alphas": self.alphas, "val_fraction": self.val_fraction, "seed": self.seed,
            "alpha": self.alpha_, "target_shapes": self.target_shapes_,
            "val_scores": {name: {str(a): v for a, v in scores.items()} for name, scores in self.val_scores_.items()},
        })

    @classmethod
    def from_pretrained(cls, folder: Path, device: str = "cpu") -> RidgeDecoder:
        config = json.loads((Path(folder) / "config.json").read_text())
        model = cls(alphas=config["alphas"], val_fraction=config["val_fraction"], seed=config["seed"], device=device)
        tensors = load_file(Path(folder) / "model.safetensors", device=device)
        model.x_mean_ = tensors["x_mean"]
        model.alpha_ = config["alpha"]
        model.target_shapes_ = {name: tuple(shape) for name, shape in config["target_shapes"].items()}
        model.val_scores_ = {name: {float(a): v for a, v in s.items()} for name, s in config["val_scores"].items()}
        model.coef_ = {name: tensors[f"{name}.coef"] for name in model.target_shapes_}
        model.intercept_ = {name: tensors[f"{name}.intercept"] for name in model.target_shapes_}
        return model
