"""Evaluators: what a run measures while it trains, chosen by name in its config.

``TrainConfig.evaluators`` lists names of ``EVALUATORS``; each factory gets the run's context
and returns an ``Evaluator`` (or None when it does not apply, e.g. no validation split). The
loop runs them every ``eval_every`` optimizer steps (0: at the end of each epoch) and at the
end, logs each result to ``metrics.jsonl`` as ``{"split": <name>, ...}`` (so ``curves.png``
draws it) and picks the best checkpoint from the ``val`` evaluator's task metric. A new
evaluator (few-shot, say) is a new factory here or registered from its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vitkit.data.sources import Splits
from vitkit.models.pretrained import PretrainedModel
from vitkit.training.config import TrainConfig
from vitkit.training.distributed import Process
from vitkit.training.tasks import Task


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


def build_evaluators(context: EvalContext) -> list[Evaluator]:
    unknown = sorted(set(context.cfg.evaluators) - set(EVALUATORS))
    if unknown:
        raise ValueError(f"unknown evaluators {unknown}: choose from {sorted(EVALUATORS)}")
    built = (EVALUATORS[name](context) for name in context.cfg.evaluators)
    return [evaluator for evaluator in built if evaluator is not None]
