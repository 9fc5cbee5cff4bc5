"""What an analysis needs from a model, and the error saying that a model lacks it.

The paper's analyses look at a ViT's attention, position embeddings and patch projection.
Other architectures (a ResNet) have none of them; the analyses then raise ``NotApplicable``
and the report shows that note in place of the figure.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from vitkit.models.vit import VisionTransformer


class NotApplicable(ValueError):
    """This analysis has no meaning for this model; the message says why."""


def require(model: nn.Module, attribute: str, what: str) -> VisionTransformer:
    """Raise ``NotApplicable`` ("model X has no <what>") unless ``model`` has ``attribute``;
    return ``model`` as what has it: a ViT, whose layout the analyses read."""
    if getattr(model, attribute, None) is None:
        raise NotApplicable(f"model {type(model).__name__} has no {what}")
    return cast(VisionTransformer, model)


__all__ = ["NotApplicable", "require"]
