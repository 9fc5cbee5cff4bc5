"""Position embeddings of the paper's ablation (Appendix D.4) and their resizing.

Every kind answers the same three questions, so the rest of the model does not care which
one it holds: what to add to the tokens, what bias to add to the attention logits, and what
the embedding of each patch position is (for the analysis tools).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

PosEmbedKind = Literal["learned", "learned_2d", "sincos_2d", "relative", "none"]
POS_EMBED_KINDS: tuple[str, ...] = ("learned", "learned_2d", "sincos_2d", "relative", "none")
Grid = tuple[int, int]


def _as_grid(grid: Sequence[int]) -> Grid:
    """``grid`` as a tuple: a list (e.g. read from JSON) compares unequal to the tuples held."""
    return cast(Grid, tuple(grid))


def resize_grid(grid_values: torch.Tensor, new_grid: Grid) -> torch.Tensor:
    """Resize a (gh, gw, C) grid the way the official fine-tuning code does.

    ``scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1)`` is bilinear interpolation
    with the corners aligned.
    """
    if tuple(grid_values.shape[:2]) == tuple(new_grid):
        return grid_values
    x = grid_values.permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, size=new_grid, mode="bilinear", align_corners=True)
    return x[0].permute(1, 2, 0).to(grid_values.dtype)


def resize_pos_embed(
    posemb: torch.Tensor, old_grid: Grid, new_grid: Grid, num_prefix: int
) -> torch.Tensor:
    """Resize a (1, prefix + gh*gw, D) 1-D embedding; the [class] slot is kept as it is."""
    prefix, patches = posemb[:, :num_prefix], posemb[0, num_prefix:]
    if patches.shape[0] != old_grid[0] * old_grid[1]:
        raise ValueError(
            f"position embedding has {patches.shape[0]} patch positions, "
            f"which is not a {old_grid[0]}x{old_grid[1]} grid"
        )
    patches = resize_grid(patches.reshape(*old_grid, -1), new_grid)
    return torch.cat([prefix, patches.reshape(1, -1, posemb.shape[-1])], dim=1)


def sincos_2d(grid: Grid, dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding (big_vision ``posemb_sincos_2d``), shape (gh*gw, dim)."""
    if dim % 4:
        raise ValueError(f"sincos_2d position embedding needs a width divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter) / max(quarter - 1, 1))
    y = y.reshape(-1, 1) * omega
    x = x.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def relative_index(grid: Grid, num_prefix: int) -> torch.Tensor:
    """Index into the relative bias table for every (query, key) token pair.

    Patch pairs index their 2-D offset (dy, dx); with a [class] token three extra entries
    hold the class→patch, patch→class and class→class biases.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + gh - 1
    dx = xs[:, None] - xs[None, :] + gw - 1
    index = dy * (2 * gw - 1) + dx
    if num_prefix:
        n_offsets = (2 * gh - 1) * (2 * gw - 1)
        n = gh * gw + 1
        full = torch.empty(n, n, dtype=torch.long)
        full[1:, 1:] = index
        full[0, 1:] = n_offsets
        full[1:, 0] = n_offsets + 1
        full[0, 0] = n_offsets + 2
        index = full
    return index


class PositionEmbedding(nn.Module):
    """All position-embedding kinds behind one interface.

    - ``learned``: one learned vector per token, [class] slot included (the paper's default);
    - ``learned_2d``: learned row and column embeddings of D/2 each, concatenated;
    - ``sincos_2d``: fixed sine-cosine embedding;
    - ``relative``: a learned bias per layer and head for every 2-D offset between patches,
      added to the attention logits instead of anything added to the tokens;
    - ``none``.
    """

    fixed: torch.Tensor  # buffers of the sincos_2d and relative kinds
    index: torch.Tensor

    def __init__(
        self,
        kind: PosEmbedKind,
        dim: int,
        grid: Grid,
        num_prefix: int,
        num_heads: int,
        depth: int,
    ) -> None:
        super().__init__()
        if kind not in POS_EMBED_KINDS:
            raise ValueError(f"unknown pos_embed {kind!r}; choose one of {POS_EMBED_KINDS}")
        self.kind, self.dim, self.grid, self.num_prefix = kind, dim, _as_grid(grid), num_prefix
        gh, gw = self.grid
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(1, num_prefix + gh * gw, dim))
        elif kind == "learned_2d":
            self.row = nn.Parameter(torch.zeros(1, gh, dim // 2))
            self.col = nn.Parameter(torch.zeros(1, gw, dim - dim // 2))
            self.prefix = nn.Parameter(torch.zeros(1, num_prefix, dim))
        elif kind == "sincos_2d":
            self.register_buffer("fixed", sincos_2d(self.grid, dim)[None], persistent=False)
        elif kind == "relative":
            n_entries = (2 * gh - 1) * (2 * gw - 1) + (3 if num_prefix else 0)
            self.table = nn.Parameter(torch.zeros(depth, num_heads, n_entries))
            index = relative_index(self.grid, num_prefix)
            self.register_buffer("index", index, persistent=False)

    def init_weights(self) -> None:
        for p in self.parameters():
            if p is not getattr(self, "table", None):
                nn.init.normal_(p, std=0.02)

    def patch_embeddings(self, grid: Grid | None = None) -> torch.Tensor | None:
        """The (gh*gw, D) embedding added to each patch, or None for relative / none."""
        grid = _as_grid(grid or self.grid)
        if self.kind == "learned":
            return resize_pos_embed(self.weight, self.grid, grid, self.num_prefix)[
                0, self.num_prefix :
            ]
        if self.kind == "learned_2d":
            row = _resize_1d(self.row[0], grid[0])
            col = _resize_1d(self.col[0], grid[1])
            gh, gw = grid
            return torch.cat(
                [row[:, None].expand(gh, gw, -1), col[None, :].expand(gh, gw, -1)], dim=-1
            ).reshape(gh * gw, self.dim)
        if self.kind == "sincos_2d":
            if grid == self.grid:
                return self.fixed[0]
            return sincos_2d(grid, self.dim).to(self.fixed)
        return None

    def forward(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Add the embedding to ``tokens`` (B, prefix + gh*gw, D) laid out on ``grid``."""
        if self.kind == "learned" and tuple(grid) == self.grid:
            return tokens + self.weight
        patches = self.patch_embeddings(grid)
        if patches is None:
            return tokens
        return tokens + torch.cat([self._prefix_embedding(), patches[None]], dim=1)

    def _prefix_embedding(self) -> torch.Tensor:
        """(1, prefix, D): the [class] slot's embedding (zeros for the fixed kind)."""
        if self.kind == "learned":
            return self.weight[:, : self.num_prefix]
        if self.kind == "learned_2d":
            return self.prefix
        return self.fixed.new_zeros(1, self.num_prefix, self.dim)

    def attention_bias(self, grid: Grid) -> torch.Tensor | None:
        """(depth, heads, N, N) logit biases for the relative kind, else None."""
        if self.kind != "relative":
            return None
        table: torch.Tensor = self.table
        index = self.index
        if tuple(grid) != self.grid:
            table = self._resized_table(grid)
            index = relative_index(grid, self.num_prefix).to(table.device)
        return table[:, :, index]

    def _resized_table(self, grid: Grid) -> torch.Tensor:
        gh, gw = self.grid
        n_offsets = (2 * gh - 1) * (2 * gw - 1)
        depth, heads = self.table.shape[:2]
        offsets = self.table[:, :, :n_offsets].reshape(depth * heads, 2 * gh - 1, 2 * gw - 1)
        new = (2 * grid[0] - 1, 2 * grid[1] - 1)
        offsets = resize_grid(offsets.permute(1, 2, 0), new).permute(2, 0, 1)
        offsets = offsets.reshape(depth, heads, -1)
        return torch.cat([offsets, self.table[:, :, n_offsets:]], dim=-1)

    @torch.no_grad()
    def resize_(self, grid: Grid) -> None:
        """Resize in place to a new patch grid (fine-tuning at a new resolution)."""
        grid = _as_grid(grid)
        if grid == self.grid:
            return
        if self.kind == "learned":
            new = resize_pos_embed(self.weight.data, self.grid, grid, self.num_prefix)
            self.weight = nn.Parameter(new)
        elif self.kind == "learned_2d":
            self.row = nn.Parameter(_resize_1d(self.row.data[0], grid[0])[None])
            self.col = nn.Parameter(_resize_1d(self.col.data[0], grid[1])[None])
        elif self.kind == "sincos_2d":
            self.fixed = sincos_2d(grid, self.dim).to(self.fixed)[None]
        elif self.kind == "relative":
            self.table = nn.Parameter(self._resized_table(grid))
            self.index = relative_index(grid, self.num_prefix).to(self.table.device)
        self.grid = grid


def _resize_1d(values: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation, corners aligned, of (n, C) to (length, C)."""
    if values.shape[0] == length:
        return values
    return resize_grid(values[:, None], (length, 1))[:, 0]
