"""``--ema DECAY``: an exponential moving average of the model's weights, updated after every
optimizer step, evaluated beside the weights themselves and saved in every checkpoint.

The decay is warmed up as timm's ``ModelEmaV3.get_decay`` does with ``use_warmup`` and its
defaults (``warmup_gamma`` 1, ``warmup_power`` 2/3, no ``update_after_step``): early on, when
the weights move fast, the average forgets quickly, so it is not dragged back to the random
initialisation. Parameters are averaged; buffers (nothing learnt) are copied, as timm's
``exclude_buffers``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitkit.models.pretrained import PretrainedModel

# timm's warm-up: the decay of update ``step`` is 1 - step ** -WARMUP_POWER, up to DECAY.
WARMUP_POWER = 2 / 3


def ema_decay(step: int, decay: float) -> float:
    """The decay of the update after optimizer step ``step`` (1 = the first): timm's
    ``ModelEmaV3.get_decay(step)`` with its warm-up, ``min(decay, 1 - step ** (-2/3))`` and 0
    at the first step (the average starts as a copy of the weights). The warm-up reaches 0.9
    after 32 steps, 0.99 after 1,000, 0.999 after 31,623."""
    if step <= 1:
        return 0.0
    return min(decay, 1.0 - step**-WARMUP_POWER)


class WeightAverage:
    """The averaged copy of a model (``model``, in eval mode, no gradients), updated by
    calling it as a step hook: ``average(step, model, optimizer)``."""

    def __init__(self, model: PretrainedModel, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weight = 1.0 - ema_decay(step, self.decay)
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach(), weight)
        for buffer, copied in zip(self.model.buffers(), model.buffers(), strict=True):
            buffer.copy_(copied)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves (the averaged model's state dict)."""
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError(
                "the checkpoint holds no average of the weights although the run has --ema: "
                "it was not written by this run"
            )
        self.model.load_state_dict(tensors)
