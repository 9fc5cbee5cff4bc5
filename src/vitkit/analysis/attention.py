"""What the attention looks at: per-head maps, attention rollout and mean attention distance.

Every function takes attention probabilities shaped (layers, batch, heads, tokens, tokens), as
``collect_attentions`` returns them; the first ``num_prefix`` tokens are the [class] token
(one for ``classifier="token"`` models, none for ``gap``), the rest the patches in row-major
order on the patch grid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vitkit.analysis.requirements import require
from vitkit.models.posembed import Grid


@torch.no_grad()
def collect_attentions(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Attention probabilities of every layer, (layers, batch, heads, tokens, tokens).

    ``images`` are model inputs (float, [-1, 1], NCHW). The model is run in eval mode, so
    attention dropout does not change what is measured. Raises ``NotApplicable`` for a model
    without attention (not a ViT).
    """
    model = require(model, "forward_intermediates", "attention")
    was_training = model.training
    model.eval()
    try:
        out = model.forward_intermediates(images, return_blocks=False, return_attention=True)
    finally:
        model.train(was_training)
    return torch.stack(out.attentions).float().cpu().numpy()


def _check(attentions: np.ndarray, grid: Grid, num_prefix: int) -> None:
    n = num_prefix + grid[0] * grid[1]
    if attentions.ndim != 5 or attentions.shape[-2:] != (n, n):
        raise ValueError(
            f"expected attentions of shape (layers, batch, heads, {n}, {n}) for a "
            f"{grid[0]}x{grid[1]} grid with {num_prefix} prefix token(s), "
            f"got {attentions.shape}"
        )


def attention_maps(attentions: np.ndarray, grid: Grid, num_prefix: int) -> np.ndarray:
    """How much each patch is attended to, per layer and head: (layers, batch, heads, gh, gw).

    For [class]-token models this is the [class] token's attention row over the patches; for
    ``gap`` models, which have no such token, the mean over all query patches.
    """
    _check(attentions, grid, num_prefix)
    to_patches = attentions[..., num_prefix:]
    rows = to_patches[..., 0, :] if num_prefix else to_patches.mean(axis=-2)
    return rows.reshape(*rows.shape[:-1], *grid)


def rollout_matrix(attentions: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020), (batch, tokens, tokens).

    Per layer the heads are averaged, the identity is added for the residual connection and
    the rows are renormalised to sum to one; the layers are then multiplied through, the
    last on the left: ``R = A_L ... A_2 A_1``. Row ``i`` of ``R`` says how much of every input
    token flows into token ``i`` at the output.
    """
    if attentions.ndim != 5 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(
            f"expected attentions of shape (layers, batch, heads, tokens, tokens), "
            f"got {attentions.shape}"
        )
    mixed = attentions.astype(np.float64).mean(axis=2) + np.eye(attentions.shape[-1])
    mixed /= mixed.sum(axis=-1, keepdims=True)
    joint = mixed[0]
    for layer in mixed[1:]:
        joint = layer @ joint
    return joint


def attention_rollout(attentions: np.ndarray, grid: Grid, num_prefix: int) -> np.ndarray:
    """The rollout over the image, (batch, gh, gw), as in the paper's Figure 6.

    The [class] token's row of ``rollout_matrix`` over the patches; for ``gap`` models, the
    mean row over the patches (what the pooled representation is made of).
    """
    _check(attentions, grid, num_prefix)
    to_patches = rollout_matrix(attentions)[:, :, num_prefix:]
    rows = to_patches[:, 0] if num_prefix else to_patches.mean(axis=1)
    return rows.reshape(-1, *grid)


def patch_distances(grid: Grid, patch_pixels: tuple[int, int]) -> np.ndarray:
    """Euclidean distance in pixels between the centres of every two patches, (N, N)."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([rows.ravel() * patch_pixels[0], cols.ravel() * patch_pixels[1]], axis=1)
    return np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)


def mean_attention_distance(
    attentions: np.ndarray, grid: Grid, patch_pixels: tuple[int, int], num_prefix: int
) -> np.ndarray:
    """Mean attention distance in pixels per layer and head, (layers, heads) (paper Figure 7).

    For every query patch, the distance to every key patch weighted by the attention between
    them, summed; then averaged over query patches and images. ``patch_pixels`` is the size in
    input pixels of one patch (the patch size, times the ResNet's reduction for hybrids).

    The [class] token has no place in the image, so it is left out both as a query and as a
    key; each query's remaining weights are renormalised to sum to one, so the result is the
    expected distance of the patches a patch attends to.
    """
    _check(attentions, grid, num_prefix)
    weights = attentions[..., num_prefix:, num_prefix:].astype(np.float64)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    per_query = (weights * patch_distances(grid, patch_pixels)).sum(axis=-1)
    return per_query.mean(axis=(1, 3))


__all__ = [
    "attention_maps",
    "attention_rollout",
    "collect_attentions",
    "mean_attention_distance",
    "patch_distances",
    "rollout_matrix",
]
