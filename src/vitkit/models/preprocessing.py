"""The evaluation preprocessing contract: how an image becomes a model's input outside training.

It belongs to the model, not to the tool that runs it: a model trained on squashed images
should be evaluated on squashed images, one fine-tuned by timm's recipe on centre crops. So it
is recorded in the model's config, ``cfg.extra["preprocessing"]`` (saved in ``config.json``
and in every checkpoint vitkit writes), and ``vitkit predict``, ``vitkit eval``, ``analyze``,
the feature extractors and the Hugging Face export all read it from there. A checkpoint
without a record (older vitkit files, the official ``.npz``, big_vision, Hugging Face, timm
state dicts) gets the default, ``EvalPreprocessing()``: the whole image resized to the model's
size, as the paper's official code and Hugging Face's ``ViTImageProcessor`` do.

It lives with the models because the checkpoint formats (which sit beside the data layer, not
above it) write it too; ``vitkit.data`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vitkit.utils.config import ConfigMixin

RECORD_KEY = "preprocessing"  # its key in a model config's ``extra``
GEOMETRIES = ("squash", "crop")


@dataclass(frozen=True)
class EvalPreprocessing(ConfigMixin):
    """How an evaluation image becomes a model input of size (H, W).

    - ``resize``: ``"squash"`` resizes the whole image to (H, W), whatever its aspect ratio
      (the official ViT code, Hugging Face); ``"crop"`` takes the centre box of (H, W)'s
      shape covering ``crop_pct`` of the image's shorter extent and resizes it to (H, W)
      (for a square size: shorter side to ``size / crop_pct``, centre crop, as timm);
    - ``interpolation``: bilinear, antialiased when shrinking (the one vitkit implements);
    - the value range: ``(pixel / 255 - mean) / std`` for every channel; the default
      ``mean = std = 0.5`` is ``(pixel - 127.5) / 127.5``, [-1, 1], as the official code.

    A record missing keys takes their defaults (``from_dict``); unknown keys are refused (a
    record this version would silently misread).
    """

    config_name = "preprocessing record"

    resize: Literal["squash", "crop"] = "squash"
    crop_pct: float = 0.875  # timm's default; used by "crop" only
    interpolation: Literal["bilinear"] = "bilinear"
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.resize not in GEOMETRIES:
            raise ValueError(
                f"preprocessing resize must be one of {GEOMETRIES}, got {self.resize!r}"
            )
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise ValueError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation != "bilinear":
            raise ValueError(
                f"preprocessing interpolation {self.interpolation!r} is not implemented: "
                "vitkit resizes bilinearly"
            )
        if not float(self.std) > 0.0:
            raise ValueError(f"preprocessing std must be positive, got {self.std}")

    @classmethod
    def of(cls, cfg: Any) -> EvalPreprocessing:
        """The contract recorded with a model (``cfg.extra["preprocessing"]``), else the
        default. ``cfg`` is any model config, a deployed model's included."""
        record = (getattr(cfg, "extra", None) or {}).get(RECORD_KEY)
        return cls() if record is None else cls.from_dict(record)

    def box(
        self, width: int, height: int, size: tuple[int, int]
    ) -> tuple[float, float, float, float]:
        """(left, top, width, height) of the part of a ``width`` x ``height`` image that
        becomes the model input of ``size`` (height, width)."""
        if self.resize == "squash":
            return 0.0, 0.0, float(width), float(height)
        scale = min(width / size[1], height / size[0]) * self.crop_pct
        w, h = size[1] * scale, size[0] * scale
        return (width - w) / 2, (height - h) / 2, w, h

    def describe(self) -> str:
        """One line for people: what the model input is made of."""
        geometry = (
            "whole image resized to the model's size"
            if self.resize == "squash"
            else f"centre crop of {self.crop_pct:g} of the shorter side"
        )
        return f"{geometry}, {self.interpolation}, (pixel / 255 - {self.mean:g}) / {self.std:g}"


__all__ = ["RECORD_KEY", "EvalPreprocessing"]
