"""What the embeddings learned: position-embedding similarity and the patch filters' PCA
(the centre and left panels of the paper's Figure 7)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch import nn

from vitkit.analysis.requirements import NotApplicable, require


def position_embedding_similarity(model: nn.Module) -> np.ndarray:
    """Cosine similarity of every patch's position embedding to every other's, (gh, gw, gh, gw).

    ``result[i, j]`` is the (gh, gw) tile of the paper's Figure 7 (centre) for the patch in
    row ``i``, column ``j``. Raises ``NotApplicable`` for models whose position information is
    not an embedding added to the patches (``relative``, ``none``) and for models without
    position embeddings (not ViTs).
    """
    model = require(model, "pos_embed", "position embedding")
    patches = model.pos_embed.patch_embeddings()
    if patches is None:
        raise NotApplicable(
            f"the model's position embedding is {model.cfg.pos_embed!r}: nothing is added to "
            "the patches, so there are no per-patch embeddings to compare"
        )
    emb = patches.detach().double().cpu().numpy()
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), np.finfo(emb.dtype).tiny)
    gh, gw = model.cfg.grid
    return (emb @ emb.T).reshape(gh, gw, gh, gw)


class FilterComponents(NamedTuple):
    components: np.ndarray  # (k, in_chans, patch_h, patch_w), unit norm, largest variance first
    explained_variance_ratio: np.ndarray  # (k,) share of the filters' variance each explains


def embedding_filter_components(model: nn.Module, num_components: int = 28) -> FilterComponents:
    """Principal components of the patch projection's filters (paper Figure 7, left).

    Each of the ``width`` output channels of the projection is a filter over one patch; the
    filters are centred and their principal directions, as patches, are what the model's first
    layer is most sensitive to. Raises ``NotApplicable`` for the hybrid, whose projection is
    a 1x1 map of ResNet features rather than a filter over pixels, and for models without a
    patch embedding (not ViTs).
    """
    model = require(model, "patch_embed", "patch embedding")
    if model.patch_embed.backbone is not None:
        raise NotApplicable(
            "the model is a ResNet hybrid: its patch projection acts on ResNet features, "
            "not on pixels, so its filters cannot be shown as image patches"
        )
    if not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise NotApplicable(
            "the model's patch projection is not a filter over the image's pixels alone (a "
            "shifted patch tokenization sees shifted copies too): it cannot be shown as patches"
        )
    if num_components < 1:
        raise ValueError(f"num_components must be at least 1, got {num_components}")
    weight = model.patch_embed.proj.weight.detach().double().cpu().numpy()
    flat = weight.reshape(weight.shape[0], -1)
    _, singular, directions = np.linalg.svd(flat - flat.mean(axis=0), full_matrices=False)
    variance = singular**2
    k = min(num_components, directions.shape[0])
    return FilterComponents(
        directions[:k].reshape(k, *weight.shape[1:]), variance[:k] / variance.sum()
    )


__all__ = [
    "FilterComponents",
    "NotApplicable",
    "embedding_filter_components",
    "position_embedding_similarity",
]
