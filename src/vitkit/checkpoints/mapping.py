"""Key mappings between vitkit's state dict and another layout, described once, used both ways.

A layout is a list of ``Rule``: one vitkit parameter, the name(s) it has in the other layout
and a ``Transform`` between the two shapes. ``to_vitkit`` (reading) and ``from_vitkit``
(writing) apply the same rules in opposite directions, so a reader and its writer cannot
drift apart. Every transform is a reshape, transpose, split or concatenation: exact, so a
round trip is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vitkit.checkpoints.core import (
    IMG_SIZE_HINT,
    Checkpoint,
    CheckpointError,
    ModelSpec,
    resolve_spec,
)
from vitkit.models.registry import architecture_of
from vitkit.models.vit import VisionTransformer, ViTConfig, to_pair

Tensor = torch.Tensor


@dataclass(frozen=True)
class Transform:
    """``to_ours`` joins the other layout's tensors into vitkit's; ``to_theirs`` undoes it."""

    to_ours: Callable[[list[Tensor]], Tensor]
    to_theirs: Callable[[Tensor, ViTConfig], list[Tensor]]


IDENTITY = Transform(lambda parts: parts[0], lambda t, cfg: [t])
# Flax Dense kernels are (in, out), PyTorch Linear weights (out, in).
DENSE = Transform(lambda parts: parts[0].T, lambda t, cfg: [t.T])
# Flax convolutions are (H, W, C_in, C_out), PyTorch's (C_out, C_in, H, W).
CONV = Transform(lambda parts: parts[0].permute(3, 2, 0, 1), lambda t, cfg: [t.permute(2, 3, 1, 0)])
# Separate query, key and value projections (PyTorch layout) ↔ vitkit's fused (3D, ...) one.
FUSED_QKV = Transform(lambda parts: torch.cat(parts), lambda t, cfg: list(t.chunk(3)))


def prepend_class_slot(parts: list[Tensor]) -> Tensor:
    """A (1, N, D) position embedding that skips the [class] token, as vitkit's (1, 1+N, D).

    A layout that adds the position embedding *before* prepending the [class] token (big_vision)
    gives that token no position; a zero slot computes the same.
    """
    posemb = parts[0]
    return torch.cat([posemb.new_zeros(1, 1, posemb.shape[-1]), posemb], dim=1)


# The inverse drops the slot: exact on everything read this way (where the slot is zero).
WITHOUT_CLASS_SLOT = Transform(prepend_class_slot, lambda posemb, cfg: [posemb[:, 1:]])


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    transform: Transform = IDENTITY


def state_dict_keys(cfg: ViTConfig) -> list[str]:
    """The state-dict keys of a model with this config (built on the meta device: free)."""
    with torch.device("meta"):
        return list(VisionTransformer(cfg).state_dict())


def to_vitkit(rules: list[Rule], theirs: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Apply ``rules`` to the other layout's tensors; a missing or unfitting key is one error."""
    missing = sorted({k for r in rules for k in r.theirs if k not in theirs})
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing}")
    ours = {}
    for rule in rules:
        parts = [theirs[k] for k in rule.theirs]
        try:
            ours[rule.ours] = rule.transform.to_ours(parts)
        except (RuntimeError, ValueError, IndexError) as err:
            shapes = ", ".join(
                f"{k} {tuple(p.shape)}" for k, p in zip(rule.theirs, parts, strict=True)
            )
            raise CheckpointError(
                f"{source}: {shapes} cannot form vitkit's {rule.ours} ({err})"
            ) from None
    return ours


def from_vitkit(rules: list[Rule], ours: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Apply ``rules`` backwards: vitkit's state dict in the other layout. ``cfg`` is the
    model's config, of whichever architecture the rules map (a ViT's or a ResNet-v2's)."""
    theirs: dict[str, Tensor] = {}
    for rule in rules:
        parts = rule.transform.to_theirs(ours[rule.ours].detach(), cfg)
        theirs.update(zip(rule.theirs, parts, strict=True))
    return theirs


def read_all_keys(
    rules: list[Rule],
    theirs: Mapping[str, Tensor],
    cfg: ViTConfig,
    source: str,
    fmt: str,
    label: str,
) -> Checkpoint:
    """Map a whole state dict: a key that no rule covers is an error, never silently dropped."""
    unexpected = unused_keys(rules, theirs)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {unexpected} in a {label} ViT")
    return Checkpoint(cfg, to_vitkit(rules, theirs, f"{source} ({label} layout)"), fmt)


def unused_keys(rules: list[Rule], theirs: Mapping[str, object]) -> list[str]:
    used = {k for r in rules for k in r.theirs}
    return sorted(k for k in theirs if k not in used)


def count_indexed(keys: Mapping[str, object], fmt: str, start: int) -> int:
    """How many consecutive ``fmt.format(i)`` key prefixes exist, counting from ``start``."""
    n = 0
    while any(k.startswith(fmt.format(start + n)) for k in keys):
        n += 1
    return n


def resolve_vit_spec(spec: ModelSpec) -> ViTConfig | None:
    """``model=`` for a format that holds only ViTs: a registered ViT's name or a ``ViTConfig``."""
    config = resolve_spec(spec)
    if config is not None and not isinstance(config, ViTConfig):
        raise CheckpointError(
            f"this format holds ViTs, but model= gives a {architecture_of(config).name!r} "
            f"model ({type(config).__name__}): name a ViT"
        )
    return config


def img_size_from_patches(
    n_patches: int, patch: tuple[int, int], reduction: int, spec: ViTConfig | None
) -> tuple[int, int]:
    """The image size implied by a position embedding of ``n_patches`` positions.

    ``spec``'s image size when its grid has that many patches, else a square grid, else the
    ``img_size`` asked of ``load_pretrained`` when its grid has that many patches (not before
    the square: a square checkpoint resized to a non-square size of equal count stays square).
    """
    if spec is not None and spec.grid[0] * spec.grid[1] == n_patches:
        return spec.img_size
    step = (patch[0] * reduction, patch[1] * reduction)
    side = round(n_patches**0.5)
    if side * side == n_patches:
        return (side * step[0], side * step[1])
    hint = IMG_SIZE_HINT.get()
    if hint is not None:
        height, width = to_pair(hint)
        divisible = height % step[0] == width % step[1] == 0
        if divisible and (height // step[0]) * (width // step[1]) == n_patches:
            return (height, width)
    raise CheckpointError(
        f"the position embedding has {n_patches} patches, not a square grid, and the format "
        "records no image size: pass img_size=(height, width) (the size it was trained at, "
        f"{n_patches} patches of {step[0]}x{step[1]} pixels) or model=<config with that img_size>"
    )


def heads_from_spec(spec: ViTConfig | None, width: int, layout: str, example: str) -> int:
    """The number of heads, which a fused-qkv state dict does not record, from ``model=``."""
    if spec is None:
        raise CheckpointError(
            f"a {layout} state dict does not record the number of attention heads: pass "
            f"model=<registered name, e.g. {example!r}> or model=ViTConfig(...) "
            "(vitkit convert/inspect: --model)"
        )
    if spec.width != width:
        raise CheckpointError(
            f"model= gives width {spec.width} but the checkpoint's width is {width}: "
            "name a model of the checkpoint's size"
        )
    return spec.num_heads
