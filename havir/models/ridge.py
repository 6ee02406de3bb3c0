"""The ridge baseline (Brain-Diffuser's first stage): voxels -> every target, in closed form.

One thin SVD of the centred (optionally standardised) training voxels ``X = U S V^T`` serves
every target and every regularisation strength: the ridge solution for strength ``alpha`` is
``W = V diag(s / (s^2 + alpha)) U^T Y``. Each target's strength is either fixed (Brain-Diffuser:
50,000 / 60,000 / 100,000) or chosen on a validation split of the training rows (highest mean
per-sample correlation), then the model is refitted on all training rows with one more SVD.

The validation split is **by group** (image): every row of a validation image is held out, so
repetitions of one image never sit on both sides (which would reward memorising the image).

Brain-Diffuser's two further steps are settings: ``standardise_inputs`` divides each voxel by
its training standard deviation (ddof 1, as its scripts do, so its fixed strengths mean the same
here), and ``rescale`` maps each predicted feature to the training targets' statistics: the
predictions are standardised across the predicted rows (the test set), multiplied by the
training targets' standard deviation and shifted by their mean. Without it ridge predictions stay
shrunk towards the mean.

Symbols: X (n, v) voxels, Y (n, t) targets flattened, U (n, k), s (k,), V (v, k), k = min(n, v).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from havir.errors import InvalidInputError
from havir.io import atomic_path, write_json
from havir.metrics.scores import row_correlations

DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vt = torch.linalg.svd(x, full_matrices=False)
    return u, s, vt.T


def _solve(u, s, v, y, alpha: float) -> torch.Tensor:
    """Ridge coefficients (v, t) from the SVD of X: V diag(s / (s^2 + alpha)) U^T Y."""
    return v @ ((s / (s**2 + alpha))[:, None] * (u.T @ y))


def split_by_group(groups, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, fitting rows): every row of a random ``val_fraction`` of the groups
    (at least one) is held out, so no group sits on both sides. ``groups`` (n,) e.g. image ids."""
    groups = np.asarray(groups)
    names = np.unique(groups)
    if len(names) < 2:
        raise InvalidInputError(f"choosing ridge strengths needs at least 2 images to split by image, got {len(names)}")
    n_val = min(len(names) - 1, max(1, int(round(val_fraction * len(names)))))
    held_out = np.random.default_rng(seed).choice(names, size=n_val, replace=False)
    is_val = np.isin(groups, held_out)
    return np.flatnonzero(is_val), np.flatnonzero(~is_val)


def rescale_to_training(predicted: torch.Tensor, train_mean: torch.Tensor, train_std: torch.Tensor) -> torch.Tensor:
    """Brain-Diffuser's re-scaling: each column of ``predicted`` (n, t) standardised across its
    n rows (ddof 0), times ``train_std`` (t,) plus ``train_mean`` (t,). A constant column becomes
    the training mean."""
    if len(predicted) < 2:
        raise InvalidInputError(
            "re-scaling ridge predictions standardises them across the predicted images: predict at least 2 "
            f"images at once (the test set), got {len(predicted)}"
        )
    spread = predicted.std(0, unbiased=False)
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    return (predicted - predicted.mean(0)) / spread * train_std + train_mean


class RidgeDecoder:
    """Closed-form ridge regression from voxels to several targets at once.

    Parameters
    ----------
    alphas : regularisation strengths tried for each target without a fixed one.
    fixed_alphas : ``{target: strength}`` used as given (no validation for those targets).
    val_fraction : fraction of the training images held out to choose each strength.
    seed : seed of the validation split.
    standardise_inputs : divide each voxel by its training standard deviation (ddof 1).
    rescale : re-scale predictions to the training targets' statistics (see the module docstring).
    device : where the SVD runs (CUDA makes the realistic size take seconds).
    """

    def __init__(self, *, alphas=DEFAULT_ALPHAS, fixed_alphas: dict[str, float] | None = None, val_fraction: float = 0.1,
                 seed: int = 0, standardise_inputs: bool = False, rescale: bool = False, device: str = "cpu"):
        self.alphas = tuple(float(a) for a in alphas)
        self.fixed_alphas = {name: float(a) for name, a in (fixed_alphas or {}).items()}
        self.val_fraction = val_fraction
        self.seed = seed
        self.standardise_inputs = standardise_inputs
        self.rescale = rescale
        self.device = device

    def _inputs(self, voxels) -> torch.Tensor:
        return (torch.as_tensor(np.asarray(voxels), dtype=torch.float32, device=self.device) - self.x_mean_) / self.x_scale_

    def fit(self, voxels, targets: dict[str, np.ndarray], groups=None) -> RidgeDecoder:
        """Fit one ridge per target. ``voxels`` (n, v); each target (n, ...) with the same n;
        ``groups`` (n,) the image of each row (default: every row its own image)."""
        x = torch.as_tensor(np.asarray(voxels), dtype=torch.float32, device=self.device)
        if x.ndim != 2:
            raise ValueError(f"voxels must have shape (n_samples, n_voxels), got {tuple(x.shape)}")
        for name, target in targets.items():
            if len(target) != len(x):
                raise ValueError(f"target {name} has {len(target)} rows but voxels have {len(x)}")
        if min((*self.alphas, *self.fixed_alphas.values()), default=0) <= 0:
            raise ValueError(f"alphas must be positive, got {self.alphas} and fixed {self.fixed_alphas}")
        groups = np.arange(len(x)) if groups is None else np.asarray(groups)
        if len(groups) != len(x):
            raise ValueError(f"groups has {len(groups)} rows but voxels have {len(x)}")
        self.x_mean_ = x.mean(0)
        self.x_scale_ = torch.ones_like(self.x_mean_)
        if self.standardise_inputs:
            scale = x.std(0, unbiased=True)
            self.x_scale_ = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = (x - self.x_mean_) / self.x_scale_

        flat = {name: torch.as_tensor(np.asarray(t), dtype=torch.float32, device=self.device).flatten(1) for name, t in targets.items()}
        self.target_shapes_ = {name: tuple(np.asarray(t).shape[1:]) for name, t in targets.items()}
        self.alpha_ = {name: self.fixed_alphas[name] for name in flat if name in self.fixed_alphas}
        self.val_scores_, self.val_images_ = {}, 0
        searched = [name for name in flat if name not in self.fixed_alphas]
        if searched:
            val_rows, fit_rows = split_by_group(groups, self.val_fraction, self.seed)
            val, fit = torch.from_numpy(val_rows).to(self.device), torch.from_numpy(fit_rows).to(self.device)
            self.val_images_ = int(len(np.unique(groups[val_rows])))
            fit_mean = x[fit].mean(0)
            u, s, v = _thin_svd(x[fit] - fit_mean)
            for name in searched:
                y = flat[name]
                y_mean = y[fit].mean(0)
                scores = {}
                for alpha in self.alphas:
                    predicted = (x[val] - fit_mean) @ _solve(u, s, v, y[fit] - y_mean, alpha) + y_mean
                    scores[alpha] = float(row_correlations(predicted.cpu().numpy(), y[val].cpu().numpy()).mean())
                self.val_scores_[name] = scores
                self.alpha_[name] = max(scores, key=scores.get)

        u, s, v = _thin_svd(x)
        self.coef_, self.intercept_, self.target_std_ = {}, {}, {}
        for name, y in flat.items():
            y_mean = y.mean(0)
            self.coef_[name] = _solve(u, s, v, y - y_mean, self.alpha_[name])
            self.intercept_[name] = y_mean
            self.target_std_[name] = y.std(0, unbiased=False)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("this RidgeDecoder is not fitted yet: call fit(voxels, targets) first")

    def predict(self, voxels) -> dict[str, np.ndarray]:
        """Predicted targets for ``voxels`` (n, v), each with its training shape (n, ...); with
        ``rescale``, standardised across the n rows and mapped to the training statistics."""
        self._check_fitted()
        x = self._inputs(voxels)
        if x.ndim != 2 or x.shape[1] != len(self.x_mean_):
            raise ValueError(f"voxels must have shape (n, {len(self.x_mean_)}), got {tuple(x.shape)}")
        out = {}
        for name, coef in self.coef_.items():
            predicted = x @ coef + self.intercept_[name]
            if self.rescale:
                predicted = rescale_to_training(predicted, self.intercept_[name], self.target_std_[name])
            out[name] = predicted.cpu().numpy().reshape(len(x), *self.target_shapes_[name])
        return out

    def settings(self) -> dict:
        return {"alphas": self.alphas, "fixed_alphas": self.fixed_alphas, "val_fraction": self.val_fraction, "seed": self.seed,
                "standardise_inputs": self.standardise_inputs, "rescale": self.rescale}

    def save_pretrained(self, folder: Path) -> None:
        """Write ``config.json`` (settings, chosen strengths, validation scores) and the weights."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"x_mean": self.x_mean_.cpu(), "x_scale": self.x_scale_.cpu()}
        for name in self.coef_:
            tensors[f"{name}.coef"] = self.coef_[name].cpu().contiguous()
            tensors[f"{name}.intercept"] = self.intercept_[name].cpu()
            tensors[f"{name}.target_std"] = self.target_std_[name].cpu()
        with atomic_path(folder / "model.safetensors") as temporary:
            save_file(tensors, temporary)
        write_json(folder / "config.json", {
            "_class_name": "RidgeDecoder", **self.settings(), "alpha": self.alpha_, "target_shapes": self.target_shapes_,
            "validation": "by image", "val_images": self.val_images_,
            "val_scores": {name: {str(a): v for a, v in scores.items()} for name, scores in self.val_scores_.items()},
        })

    @classmethod
    def from_pretrained(cls, folder: Path, device: str = "cpu") -> RidgeDecoder:
        config = json.loads((Path(folder) / "config.json").read_text())
        model = cls(alphas=config["alphas"], fixed_alphas=config.get("fixed_alphas"), val_fraction=config["val_fraction"],
                    seed=config["seed"], standardise_inputs=config.get("standardise_inputs", False),
                    rescale=config.get("rescale", False), device=device)
        tensors = load_file(Path(folder) / "model.safetensors", device=device)
        model.x_mean_ = tensors["x_mean"]
        model.x_scale_ = tensors.get("x_scale", torch.ones_like(model.x_mean_))
        model.alpha_ = config["alpha"]
        model.target_shapes_ = {name: tuple(shape) for name, shape in config["target_shapes"].items()}
        model.val_scores_ = {name: {float(a): v for a, v in s.items()} for name, s in config["val_scores"].items()}
        model.val_images_ = config.get("val_images", 0)
        model.coef_ = {name: tensors[f"{name}.coef"] for name in model.target_shapes_}
        model.intercept_ = {name: tensors[f"{name}.intercept"] for name in model.target_shapes_}
        model.target_std_ = {name: tensors.get(f"{name}.target_std") for name in model.target_shapes_}  # None: saved before rescaling existed
        return model
