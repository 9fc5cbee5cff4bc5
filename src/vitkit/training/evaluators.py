"""Evaluators: what a run measures while it trains, chosen by name in its config.

``[evaluators] names`` lists names of ``EVALUATORS``; each factory gets the run's context
and returns an ``Evaluator`` (or None when it does not apply, e.g. no validation split). The
loop runs them every ``[evaluators] every`` optimizer steps (0: at the end of each epoch) and
at the end, logs each result to ``metrics.jsonl`` as ``{"split": <name>, ...}`` (so
``curves.png`` draws it) and picks the best checkpoint from the metric of the evaluator named
by ``[evaluators] best`` (default "val"): its own metric, or the one ``[evaluators] monitor``
names, which ``[evaluators] patience`` also watches. A new evaluator is a factory registered with
``register_evaluator``, with its options dataclass (``[evaluators.<name>]``, flags
``--<name>-<field>``) if it has settings. Here: "val" (the task's own metrics on the
validation split) and "fewshot" (few-shot linear accuracy of the frozen features on a
labelled source, for any task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from vitkit.data.sources import DataSource, Splits, open_splits
from vitkit.evaluation import extract_features, fewshot_indices, fewshot_protocol
from vitkit.models.pretrained import PretrainedModel
from vitkit.training.config import EvaluatorsConfig, TrainConfig, register_evaluator_options
from vitkit.training.distributed import Process
from vitkit.training.tasks import Task
from vitkit.utils.config import ConfigMixin
from vitkit.utils.plugins import ensure_loaded


class Evaluator(Protocol):
    """What the loop runs. To pick the best checkpoint (``[evaluators] best``), an evaluator
    may name its metric and direction (``best_metric``, ``best_mode``: "max" or "min");
    otherwise the task's are used."""

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


def register_evaluator(
    name: str, factory: EvaluatorFactory, options: type[ConfigMixin] | None = None
) -> None:
    """Make ``name`` usable in ``[evaluators] names``; ``options`` (a config dataclass) are its
    settings, ``[evaluators.<name>]``, read by the factory as ``cfg.evaluators.options(name)``."""
    if name in EVALUATORS and EVALUATORS[name] is not factory:
        raise ValueError(f"evaluator {name!r} is registered twice")
    if options is not None:
        register_evaluator_options(name, options)
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
    best_mode = "max"

    @property
    def best_metric(self) -> str:
        return f"{self.shots[0]}shot"

    def run(self, model: nn.Module, process: Process) -> dict[str, Any]:
        picked = extract_features(model, self.pool_images, self.batch_size)
        features = torch.zeros(self.pool_size, picked.shape[1])
        features[self.pool_indices] = picked
        test = extract_features(model, self.test_images, self.batch_size)
        results = fewshot_protocol(
            features,
            self.pool_labels,
            test,
            self.test_labels,
            self.shots,
            range(self.seeds),
            num_classes=self.num_classes,
        )
        return {f"{shots}shot": result["mean"] for shots, result in results.items()}


@dataclass
class FewShotOptions(ConfigMixin):
    """``[evaluators.fewshot]`` (flags ``--fewshot-data``, ``--fewshot-shots``,
    ``--fewshot-seeds``)."""

    data: str | None = field(
        default=None,
        metadata={
            "help": "labelled data of the 'fewshot' evaluator (its train split is "
            "fitted on, its test split scored); default: the run's own data, when it has "
            "labels"
        },
    )
    shots: list[int] = field(
        default_factory=lambda: [10, 25],
        metadata={"help": "training images per class of the 'fewshot' evaluator"},
    )
    seeds: int = field(
        default=3, metadata={"help": "draws of the few-shot images (seeds 0..N-1), averaged"}
    )

    config_name = "[evaluators.fewshot] options"
    check_types = True

    def __post_init__(self) -> None:
        self.shots = list(self.shots)
        problems = []
        if not (self.shots and all(n >= 1 for n in self.shots)):
            problems.append("fewshot_shots must be one or more positive counts")
        if self.seeds < 1:
            problems.append("fewshot_seeds must be at least 1")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


def _fewshot(context: EvalContext) -> Evaluator:
    cfg = context.cfg
    options: FewShotOptions = cfg.evaluators.options("fewshot")
    if options.data is not None:
        splits = open_splits(options.data, 0.0, cfg.run.seed)
        data = options.data
    else:
        splits, data = context.splits, cfg.data.source
    classes = splits.train.info.classes
    if classes is None:
        raise ValueError(
            f"the fewshot evaluator needs labelled images and {data} has none: name a labelled "
            "source with --fewshot-data"
        )
    images, labels = _all_images(splits.train)
    drawn = [
        fewshot_indices(labels, max(options.shots), s, len(classes)) for s in range(options.seeds)
    ]
    pool = torch.from_numpy(np.unique(np.concatenate(drawn)))
    test_images, test_labels = _all_images(splits.test)
    return FewShotEvaluator(
        "fewshot",
        len(labels),
        pool,
        images[pool],
        labels,
        test_images,
        test_labels,
        len(classes),
        list(options.shots),
        options.seeds,
        cfg.evaluators.batch_size,
    )


register_evaluator("fewshot", _fewshot, FewShotOptions)


def registered_evaluators() -> dict[str, EvaluatorFactory]:
    """``EVALUATORS`` once the plugins have registered theirs: what a lookup reads."""
    ensure_loaded()
    return EVALUATORS


def monitored_metric(
    evaluator: Evaluator, task: Task, chosen: EvaluatorsConfig
) -> tuple[str, Literal["max", "min"]]:
    """The metric of the best evaluator that picks the best checkpoint (and that --patience
    watches), and whether higher ("max") or lower ("min") is better: ``chosen.monitor``, else
    the evaluator's own ``best_metric``, else the task's."""
    own = getattr(evaluator, "best_metric", task.best_metric)
    own_mode = getattr(evaluator, "best_mode", task.best_mode)
    metric = chosen.monitor or own
    if metric == own:
        return metric, chosen.monitor_mode or own_mode
    if chosen.monitor_mode is None:
        raise ValueError(
            f"--monitor {metric}: say whether a higher or a lower value is better with "
            f"--monitor-mode max or min (the {evaluator.name} evaluator's own metric is {own})"
        )
    return metric, chosen.monitor_mode


def build_evaluators(context: EvalContext) -> list[Evaluator]:
    """The evaluators the run names, after checking every name (``best`` included) and the
    monitored metric."""
    chosen = context.cfg.evaluators
    evaluators = registered_evaluators()
    unknown = sorted(set(chosen.names) - set(evaluators))
    if unknown:
        raise ValueError(f"unknown evaluators {unknown}: choose from {sorted(evaluators)}")
    if chosen.best not in evaluators:
        raise ValueError(
            f"unknown best evaluator {chosen.best!r} (--best-evaluator): choose from "
            f"{sorted(evaluators)}"
        )
    built = (evaluators[name](context) for name in chosen.names)
    kept = [evaluator for evaluator in built if evaluator is not None]
    for evaluator in kept:
        if evaluator.name == chosen.best:
            monitored_metric(evaluator, context.task, chosen)
    return kept
