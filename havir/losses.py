"""Losses of the two pathways, and the held-out scores training reports.

Structural: MSE + ``edge_weight`` x MSE of Sobel edge maps (each latent channel), so the
generator keeps the layout's edges rather than blurring them. Semantic: per modality MSE +
``cosine_weight`` x (1 - cosine similarity per token), and optionally a contrastive term on the
pooled token (MindEye's soft-CLIP, here plain InfoNCE) that pushes each prediction towards its
own image's embedding and away from the batch's others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_edges(maps: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses of each channel: (b, c, h, w) -> (b, 2c, h, w)."""
    channels = maps.shape[1]
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T]).to(maps)  # (2, 3, 3)
    weight = kernels.repeat(channels, 1, 1).unsqueeze(1)  # (2c, 1, 3, 3), grouped per channel
    return F.conv2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), weight, groups=channels)


def structural_loss(predicted: torch.Tensor, target: torch.Tensor, edge_weight: float) -> dict[str, torch.Tensor]:
    mse = F.mse_loss(predicted, target)
    edges = F.mse_loss(sobel_edges(predicted), sobel_edges(target))
    return {"mse": mse, "edges": edges, "total": mse + edge_weight * edges}


def _pooled(tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(tokens.mean(dim=1), dim=-1)


def info_nce(predicted: torch.Tensor, target: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE between pooled predicted and target tokens of a batch."""
    logits = _pooled(predicted) @ _pooled(target).T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def semantic_loss(
    predicted: torch.Tensor, target: torch.Tensor, cosine_weight: float, contrastive_weight: float
) -> dict[str, torch.Tensor]:
    mse = F.mse_loss(predicted, target)
    cosine = (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()
    total = mse + cosine_weight * cosine
    terms = {"mse": mse, "cosine": cosine}
    if contrastive_weight > 0:
        terms["contrastive"] = info_nce(predicted, target)
        total = total + contrastive_weight * terms["contrastive"]
    return terms | {"total": total}
