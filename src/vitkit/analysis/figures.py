"""Matplotlib figures of the analyses, one function per figure, each returning a ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg renderer, no pyplot), so
they work without a display and leave no global state behind; ``save_figure`` writes a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vitkit.utils.files import atomic_write

PANEL_INCHES = 1.2


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file, then rename)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return path


def display_image(image: np.ndarray) -> np.ndarray:
    """A model input (C, H, W) in [-1, 1] as something ``imshow`` draws: (H, W[, 3]) in [0, 1]."""
    image = np.clip((np.asarray(image, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _show(ax: Axes, image: np.ndarray, **kwargs: Any) -> None:
    """imshow without ticks; grey images get a grey colour map."""
    cmap = "gray" if image.ndim == 2 else None
    ax.imshow(image, cmap=kwargs.pop("cmap", cmap), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax: Axes, image: np.ndarray, heat: np.ndarray, interpolation: str) -> None:
    """The image with ``heat`` (any grid) stretched over it, scaled to its own maximum."""
    h, w = image.shape[:2]
    _show(ax, image, vmin=0.0, vmax=1.0)
    peak = float(heat.max())
    ax.imshow(
        heat / peak if peak > 0 else heat,
        cmap="inferno",
        alpha=0.6,
        vmin=0.0,
        vmax=1.0,
        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
        interpolation=interpolation,
    )


def attention_maps_figure(image: np.ndarray, maps: np.ndarray) -> Figure:
    """One image's attention maps, a row per layer and a column per head.

    ``image`` is a model input (C, H, W); ``maps`` is (layers, heads, gh, gw), one image's
    slice of ``attention_maps``.
    """
    layers, heads = maps.shape[:2]
    shown = display_image(image)
    fig = Figure(figsize=(PANEL_INCHES * (heads + 1), PANEL_INCHES * layers))
    axes = fig.subplots(layers, heads + 1, squeeze=False)
    for layer in range(layers):
        _show(axes[layer, 0], shown, vmin=0.0, vmax=1.0)
        axes[layer, 0].set_ylabel(f"layer {layer + 1}")
        for head in range(heads):
            _overlay(axes[layer, head + 1], shown, maps[layer, head], "nearest")
            if layer == 0:
                axes[layer, head + 1].set_title(f"head {head + 1}", fontsize=9)
    return fig


def rollout_figure(
    images: np.ndarray, rollout: np.ndarray, titles: Sequence[str] | None = None
) -> Figure:
    """Each image above its attention rollout overlaid on it (the paper's Figure 6).

    ``images`` are model inputs (B, C, H, W), ``rollout`` is (B, gh, gw).
    """
    count = len(images)
    fig = Figure(figsize=(1.8 * count, 3.8))
    axes = fig.subplots(2, count, squeeze=False)
    for i in range(count):
        shown = display_image(images[i])
        _show(axes[0, i], shown, vmin=0.0, vmax=1.0)
        _overlay(axes[1, i], shown, rollout[i], "bilinear")
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=9)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("rollout")
    return fig


def attention_distance_figure(distances: np.ndarray, image_pixels: int | None = None) -> Figure:
    """Mean attention distance of every head against depth (the paper's Figure 7, right).

    ``distances`` is (layers, heads) in pixels; ``image_pixels``, the image's side, is drawn
    as a reference line when given.
    """
    layers, heads = distances.shape
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.subplots()
    depth = np.arange(1, layers + 1)
    for head in range(heads):
        ax.scatter(depth, distances[:, head], s=18, label=f"head {head + 1}")
    if image_pixels is not None:
        ax.axhline(image_pixels, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(depth)
    ax.set_ylim(bottom=0)
    if heads <= 16:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def _mosaic(tiles: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """(rows, cols, h, w[, 3]) tiles as one image, one pixel of ``fill`` between tiles."""
    rows, cols, h, w = tiles.shape[:4]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *tiles.shape[4:]), fill)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tiles[r, c]
    return out


def position_similarity_figure(similarity: np.ndarray) -> Figure:
    """The grid of grids of the paper's Figure 7 (centre), from (gh, gw, gh, gw) similarities."""
    gh, gw = similarity.shape[:2]
    fig = Figure(figsize=(min(1.0 + 0.45 * gw, 9.0), min(0.6 + 0.45 * gh, 8.5)))
    ax = fig.subplots()
    shown = ax.imshow(_mosaic(similarity), cmap="viridis", vmin=-1.0, vmax=1.0)
    ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in range(gw)], map(str, range(1, gw + 1)))
    ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in range(gh)], map(str, range(1, gh + 1)))
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    fig.colorbar(shown, ax=ax, label="cosine similarity", shrink=0.8)
    return fig


def filters_figure(components: np.ndarray, columns: int = 7) -> Figure:
    """Principal components of the patch filters as patches (the paper's Figure 7, left).

    ``components`` is (k, C, P, P); each is stretched to [0, 1] on its own. Three channels
    are drawn as RGB, any other number as the grey mean over the channels.
    """
    k = len(components)
    lo = components.min(axis=(1, 2, 3), keepdims=True)
    hi = components.max(axis=(1, 2, 3), keepdims=True)
    scaled = (components - lo) / np.where(hi > lo, hi - lo, 1.0)
    scaled = scaled.transpose(0, 2, 3, 1) if scaled.shape[1] == 3 else scaled.mean(axis=1)
    columns = min(columns, k)
    rows = -(-k // columns)
    fig = Figure(figsize=(0.9 * columns, 0.9 * rows + 0.1))
    for i, ax in enumerate(fig.subplots(rows, columns, squeeze=False).ravel()):
        if i < k:
            _show(ax, scaled[i], vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(str(i + 1), fontsize=7, pad=2)
        else:
            ax.set_axis_off()
    return fig


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    """Counts of (true class, predicted class); each row is also shaded by its share."""
    matrix = np.asarray(matrix)
    n = len(classes)
    side = min(2.0 + 0.45 * n, 10.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    shown = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 20:
        for (t, p), count in np.ndenumerate(matrix):
            colour = "white" if shares[t, p] > 0.5 else "black"
            ax.text(p, t, str(count), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(shown, ax=ax, label="share of the true class", shrink=0.8)
    fig.tight_layout()
    return fig


__all__ = [
    "attention_distance_figure",
    "attention_maps_figure",
    "confusion_matrix_figure",
    "display_image",
    "filters_figure",
    "position_similarity_figure",
    "rollout_figure",
    "save_figure",
]
