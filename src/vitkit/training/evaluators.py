"""Evaluators: what a run measures while it trains, chosen by name in its config.

``TrainConfig.evaluators`` lists names of ``EVALUATORS``; each factory gets the run's context
and returns an ``Evaluator`` (or None when it does not apply, e.g. no validation split). The
loop runs them every ``eval_every`` optimizer steps (0: at the end of each epoch) and at the
end, logs each result to ``metrics.jsonl`` as ``{"split": <name>, ...}`` (so ``curves.png``
draws it) and picks the best checkpoint from the ``val`` evaluator's task metric. A new
evaluator is a new factory here or registered from its own module. Here: "val" (the task's
own metrics on the validation split) and "fewshot" (few-shot linear accuracy of the frozen
features on a labelled source, for any task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from vitkit.data.sources import DataSource, Splits, open_splits
from vitkit.evaluation import extract_features, fewshot_indices, fewshot_protocol
from vitkit.models.pretrained import PretrainedModel
from vitkit.training.config import TrainConfig
from vitkit.training.distributed import Process
from vitkit.training.tasks import Task
from vitkit.utils.plugins import ensure_loaded


class Evaluator(Protocol):
    name: str

    def run(self, model: PretrainedModel, process: Process) -> dict[str, Any]:
        """Metrics of ``model`` (the saved model, not the task's trainable wrapper)."""
        ...


@dataclass
class EvalContext:
    cfg: TrainConfig
    task: Task
    splits: Splits


EvaluatorFactory = Callable[[EvalContext], Evaluator | None]
EVALUATORS: dict[str, EvaluatorFactory] = {}


def register_evaluator(name: str, factory: EvaluatorFactory) -> None:
    if name in EVALUATORS and EVALUATORS[name] is not factory:
        raise ValueError(f"evaluator {name!r} is registered twice")
    EVALUATORS[name] = factory


@dataclass
class TaskEvaluator:
    """The task's own evaluation on a held-out split (validation during training)."""

    name: str
    context: EvalContext

    def run(self, model: PretrainedModel, process: Process) -> dict[str, Any]:
        source = self.context.splits.val
        assert source is not None
        return self.context.task.evaluate(model, source, process)


def _validation(context: EvalContext) -> Evaluator | None:
    return TaskEvaluator("val", context) if context.splits.val is not None else None


register_evaluator("val", _validation)


def _all_images(source: DataSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a labelled ``source`` and its label, in memory."""
    images, labels = [], []
    for batch in source.eval_batches(512):
        assert batch.labels is not None  # the caller checked ``info.classes``
        images.append(batch.images)
        labels.append(batch.labels)
    return torch.cat(images), torch.cat(labels)


@dataclass
class FewShotEvaluator:
    """The paper's few-shot linear evaluation (``fewshot_protocol``) of the model's frozen
    pre-logits features: ``{"10shot": mean accuracy over the seeds, ...}``.

    The images are read once per run, not at each evaluation, and only those the draws can
    pick are kept: for a seed the n-shot images are part of its largest-shot draw, so a few
    hundred images stand for the whole training split. Their features go into the rows of a
    training-split-sized matrix, whose other rows the protocol never reads, so the draws are
    big_vision's. Every process computes the same result (the features of a few thousand
    images), so nothing is gathered under DDP.
    """

    name: str
    pool_size: int  # images of the training split
    pool_indices: torch.Tensor  # the ones any draw can pick
    pool_images: torch.Tensor  # uint8, in the order of ``pool_indices``
    pool_labels: torch.Tensor  # of the whole training split
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    shots: list[int]
    seeds: int
    batch_size: int

    def run(self, model: nn.Module, process: Process) -> dict[str, Any]:
        picked = extract_features(model, self.pool_images, self.batch_size)
        features = torch.zeros(self.pool_size, picked.shape[1])
        features[self.pool_indices] = picked
        test = extract_features(model, self.test_images, self.batch_size)
        results = fewshot_protocol(features, self.pool_labels, test, self.test_labels,
                                   self.shots, range(self.seeds), num_classes=self.num_classes)  # fmt: skip
        return {f"{shots}shot": result["mean"] for shots, result in results.items()}


def _fewshot(context: EvalContext) -> Evaluator:
    cfg = context.cfg
    if cfg.fewshot_data is not None:
        splits = open_splits(cfg.fewshot_data, 0.0, cfg.seed)
        data = cfg.fewshot_data
    else:
        splits, data = context.splits, cfg.data
    classes = splits.train.info.classes
    if classes is None:
        raise ValueError(
            f"the fewshot evaluator needs labelled images and {data} has none: name a labelled "
            "source with --fewshot-data"
        )
    images, labels = _all_images(splits.train)
    drawn = [fewshot_indices(labels, max(cfg.fewshot_shots), s, len(classes))
             for s in range(cfg.fewshot_seeds)]  # fmt: skip
    pool = torch.from_numpy(np.unique(np.concatenate(drawn)))
    test_images, test_labels = _all_images(splits.test)
    return FewShotEvaluator(
        "fewshot", len(labels), pool, images[pool], labels, test_images, test_labels,
        len(classes), list(cfg.fewshot_shots), cfg.fewshot_seeds, cfg.eval_batch_size,
    )  # fmt: skip


register_evaluator("fewshot", _fewshot)


def registered_evaluators() -> dict[str, EvaluatorFactory]:
    """``EVALUATORS`` once the plugins have registered theirs: what a lookup reads."""
    ensure_loaded()
    return EVALUATORS


def build_evaluators(context: EvalContext) -> list[Evaluator]:
    unknown = sorted(set(context.cfg.evaluators) - set(registered_evaluators()))
    if unknown:
        raise ValueError(f"unknown evaluators {unknown}: choose from {sorted(EVALUATORS)}")
    built = (EVALUATORS[name](context) for name in context.cfg.evaluators)
    return [evaluator for evaluator in built if evaluator is not None]
