"""A model compiled for inference: ``torch.compile`` with Inductor's weight freezing.

Freezing treats the weights as constants of the compiled graph, so Inductor can fold them,
lay them out ahead of time for the CPU's matrix-multiply library (oneDNN) and fuse bias,
GELU and casts into its matrix multiplies: on 2 CPU cores that made a ViT forward 1.1-1.8x
faster than eager (docs/experiments.md, Inference). The price is a compilation at the first
call (tens of seconds on CPU) and weights that may not change afterwards.

Freezing is an Inductor setting, read whenever a graph is compiled, which may be at any call
(a new autocast state, say); ``torch.compile``'s per-call ``options`` do not reach the
stage that uses it, so each call sets it with ``torch._inductor.config.patch``, which PyTorch's
own CPU inference recipes set globally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from vitkit.models.pretrained import PretrainedModel
from vitkit.models.registry import ModelConfig
from vitkit.utils.devices import check_compiler


class CompiledClassifier(nn.Module):
    """``model`` called through ``torch.compile`` with frozen weights, for evaluation and
    prediction only: ``evaluate`` and ``predict`` take it as they take the model (its ``cfg``,
    its parameters' device); it gives logits, not features. One graph serves every batch size
    (the batch dimension is compiled as dynamic), so a smaller last batch does not compile
    again.

    The weights are read when a graph is compiled: change them (training, loading a state
    dict) or move them to another device, and the compiled graphs still compute with the old
    ones, so ``train()`` is refused; put the model where it is to run first, and compile a
    changed model anew.
    """

    def __init__(self, model: PretrainedModel) -> None:
        super().__init__()
        self.model = model
        self.eval()  # this module and the model, for good
        # A compiled bound method, not a compiled module: no second copy of the parameter
        # names in ``state_dict``.
        self._compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(
            model.forward, dynamic=True
        )

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def train(self, mode: bool = True) -> Self:
        if mode:
            raise ValueError(
                "a CompiledClassifier computes with the weights it was compiled with and "
                "cannot train: train its .model, then compile that again"
            )
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            # Contiguous: a strided view (a crop, a channels-last batch) would otherwise
            # compile a graph of its own, tens of seconds, for a copy's worth of work.
            return self._compiled(x.contiguous())


def compile_for_inference(model: PretrainedModel) -> CompiledClassifier:
    """``model`` compiled with frozen weights (``CompiledClassifier``), after checking that
    ``torch.compile`` works on this machine (a clear error if there is no C++ compiler)."""
    check_compiler(next(model.parameters()).device)
    return CompiledClassifier(model)
