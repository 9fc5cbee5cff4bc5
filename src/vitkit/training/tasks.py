"""Tasks: what a run learns. The loop (``training/loop.py``) knows none of it.

A task builds the model from the data's description, turns a batch into model inputs and
targets, computes the loss of a step with the metrics to log, evaluates a model on a data
source, names the validation metric that picks the best checkpoint and fills the task's part
of ``summary.json``. Classification is the paper's supervised task; others (masked patch
prediction) register themselves with ``register_task`` and train through the same loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.checkpoints import read_checkpoint
from vitkit.checkpoints.core import build_model
from vitkit.data import BatchTransform
from vitkit.data.sources import Batch, DataSource, SourceInfo
from vitkit.evaluation.inference import Evaluation, TestTimeAugmentation, evaluate
from vitkit.models import create_model, model_config
from vitkit.models.preprocessing import RECORD_KEY, EvalPreprocessing
from vitkit.models.pretrained import PretrainedModel
from vitkit.training.config import TrainConfig, register_task_options
from vitkit.training.distributed import Process
from vitkit.training.resizing import regularization_strength
from vitkit.utils.config import ConfigMixin
from vitkit.utils.plugins import ensure_loaded


@dataclass
class StepResult:
    """One micro-batch: the loss to back-propagate and, to log, per-example sums (a metric
    logged as ``sums[name] / count``, e.g. the number right for the accuracy)."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    count: int


@dataclass
class NoOptions(ConfigMixin):
    """The options of a task that has none (an empty ``[task.<name>]`` table)."""

    check_types = True


class Task:
    """The interface the loop drives; subclasses set the class attributes and override the
    methods that raise ``NotImplementedError``. A task's own settings are its ``Options``
    dataclass: ``[task.<name>]`` in a config file, ``--<name>-<field>`` flags, and
    ``self.options`` here."""

    name: ClassVar[str]
    Options: ClassVar[type[ConfigMixin]] = NoOptions
    best_metric: ClassVar[str]  # the validation metric that picks best.safetensors
    best_mode: ClassVar[Literal["max", "min"]]
    needs_labels: ClassVar[bool] = True
    # how the end-of-run line names a test metric whose key alone would mislead a person
    metric_names: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.options: Any = cfg.task.options(self.name)

    def build_model(self, info: SourceInfo) -> PretrainedModel:
        """The model the run saves: a new one (``cfg.model``), or the checkpoint's
        (``cfg.init_from``) fitted to the data."""
        raise NotImplementedError

    def trainable(self, model: nn.Module) -> nn.Module:
        """What the optimizer and DDP see: the model plus any parameters of the task's own
        (a prediction head, a mask token), which checkpoints keep under ``task_state``."""
        return model

    def task_state(self, trainable: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of ``trainable`` that are not the model's, to save for resuming."""
        return {}

    def load_task_state(self, trainable: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of ``task_state``."""

    def setup(self, model: PretrainedModel) -> None:
        """Called once the model exists, before the first ``prepare``."""

    def prepare(self, batch: Batch, seed: int) -> tuple[torch.Tensor, Any]:
        """(model inputs, targets) of a training batch; all randomness drawn from ``seed``."""
        raise NotImplementedError

    def set_train_size(self, size: tuple[int, int]) -> None:
        """Progressive resizing: ``prepare`` the next batches at ``size`` (height, width)
        instead of the model's size, with the augmentations weakened as
        ``schedule.resize_regularization`` says for that size. A task whose targets depend on
        the size refuses."""
        raise ValueError(
            f"the {self.name} task trains at the model's image size only: leave "
            "schedule.resize_start at 1"
        )

    def step(self, net: nn.Module, inputs: torch.Tensor, targets: Any) -> StepResult:
        raise NotImplementedError

    def evaluate(
        self, model: PretrainedModel, source: DataSource, process: Process
    ) -> dict[str, Any]:
        """Metrics of ``model`` on every example of ``source`` (exact under DDP); the float
        ones are logged, the others may go into the summary."""
        raise NotImplementedError

    def evaluate_test(
        self, model: PretrainedModel, source: DataSource, process: Process
    ) -> dict[str, Any]:
        """The final score on the test split, once per run: ``evaluate``'s, unless a task
        spends more on it than on every validation; an int ``images``, where given, is how
        many test images were scored (fewer than the split's files where some are unreadable)."""
        return self.evaluate(model, source, process)

    def summary(self, test: dict[str, Any], best: float | None) -> dict[str, Any]:
        """The task's keys of ``summary.json`` from the test metrics and the best validation
        value."""
        images = {"test_images": test["images"]} if "images" in test else {}
        return (
            {f"test_{k}": v for k, v in test.items() if isinstance(v, float)}
            | {f"best_val_{self.best_metric}": best}
            | images
        )


TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Make ``task`` available as ``[task] name = task.name``, with its ``Options`` as
    ``[task.<name>]`` (usable as a decorator)."""
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"task {task.name!r} is registered twice")
    register_task_options(task.name, task.Options)
    TASKS[task.name] = task
    return task


def fitted_overrides(config_class: type, **values: Any) -> dict[str, Any]:
    """The ``values`` the model's config has fields for. Regularisation that a model cannot
    take (dropout for a network without it) is an error only when it is asked for."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unsupported = sorted(k for k, v in values.items() if k not in fields and v)
    if unsupported:
        raise ValueError(f"{config_class.__name__} has no {', '.join(unsupported)}: leave it unset")
    return {k: v for k, v in values.items() if k in fields}


@register_task
class Classification(Task):
    """The paper's supervised task: cross-entropy on (possibly mixed, smoothed) one-hot
    targets; accuracy picks the best checkpoint; a fine-tuned model gets a new zero head."""

    name = "classification"
    best_metric = "accuracy"
    best_mode = "max"

    def build_model(self, info: SourceInfo) -> PretrainedModel:
        cfg = self.cfg.model
        assert info.classes is not None  # the loop refuses unlabelled data (``needs_labels``)
        # The evaluation preprocessing is recorded with the model, so that the validation and
        # test accuracy of the run is what `vitkit eval` and `predict` later reproduce: a
        # fine-tuned model keeps its checkpoint's, a new one gets the default.
        extra: dict[str, Any] = {"classes": info.classes}
        if cfg.init_from is None:
            extra[RECORD_KEY] = EvalPreprocessing().to_dict()
            assert cfg.name is not None  # TrainConfig checked it names a registered model
            size = {"img_size": cfg.img_size} if cfg.img_size else {}
            config_class = type(model_config(cfg.name))
            regularisation = fitted_overrides(
                config_class,
                dropout=cfg.dropout,
                drop_path=cfg.drop_path,
                patch_dropout=cfg.patch_dropout,
                **self.resizable(config_class),
            )
            return create_model(
                cfg.name,
                num_classes=len(info.classes),
                in_chans=info.channels,
                extra=extra,
                **size,
                **regularisation,
            )
        checkpoint = read_checkpoint(cfg.init_from, cfg.name)
        extra[RECORD_KEY] = EvalPreprocessing.of(checkpoint.config).to_dict()
        regularisation = fitted_overrides(
            type(checkpoint.config),
            dropout=cfg.dropout,
            drop_path=cfg.drop_path,
            patch_dropout=cfg.patch_dropout,
            **self.resizable(type(checkpoint.config)),
        )
        model = build_model(checkpoint, img_size=cfg.img_size, **regularisation)
        model.reset_classifier(
            len(info.classes)
        )  # the paper replaces the head even for equal counts
        model.cfg = model.cfg.replace(extra={**model.cfg.extra, **extra})
        return model

    def resizable(self, config_class: type) -> dict[str, bool]:
        """With progressive resizing, a ViT takes any image size (``dynamic_img_size``: its
        position embeddings are resized on the fly), and keeps doing so once saved; other
        models are refused by the loop (``resizing.size_multiple``)."""
        fields = {f.name for f in dataclasses.fields(config_class)}
        wanted = self.cfg.schedule.resize_start < 1 and "dynamic_img_size" in fields
        return {"dynamic_img_size": True} if wanted else {}

    def setup(self, model: PretrainedModel) -> None:
        cfg = model.cfg
        self.transform = BatchTransform(
            cfg.img_size,
            cfg.num_classes,
            self.cfg.augment,
            self.cfg.run.seed,
            channels=cfg.in_chans,
        )

    def set_train_size(self, size: tuple[int, int]) -> None:
        schedule = self.cfg.schedule
        self.transform.train_size = size
        self.transform.set_regularization(
            regularization_strength(
                size,
                self.transform.img_size,
                schedule.resize_start,
                schedule.resize_regularization,
            )
        )

    def prepare(self, batch: Batch, seed: int) -> tuple[torch.Tensor, Any]:
        assert batch.labels is not None
        self.transform.generator.manual_seed(seed)
        inputs, soft_targets = self.transform(
            batch.images,
            batch.labels,
            train=True,
            cropped=batch.cropped,
            image_ids=batch.image_ids,
            epoch=batch.epoch,
        )
        return inputs, (soft_targets, batch.labels.to(inputs.device))

    def step(self, net: nn.Module, inputs: torch.Tensor, targets: Any) -> StepResult:
        soft_targets, labels = targets
        logits = net(inputs).float()
        loss = F.cross_entropy(logits, soft_targets)
        correct = (logits.argmax(-1) == labels).sum()
        return StepResult(
            loss, {"loss": loss.detach() * len(labels), "accuracy": correct}, len(labels)
        )

    def evaluate(
        self, model: PretrainedModel, source: DataSource, process: Process
    ) -> dict[str, Any]:
        return _scores(self._evaluation(model, source, process, self.cfg.evaluators.tta))

    def evaluate_test(
        self, model: PretrainedModel, source: DataSource, process: Process
    ) -> dict[str, Any]:
        result = self._evaluation(model, source, process, self.test_tta)
        return _scores(result) | {"images": result.count}

    @property
    def test_tta(self) -> TestTimeAugmentation:
        return self.cfg.evaluators.test_tta or self.cfg.evaluators.tta

    def _evaluation(
        self,
        model: PretrainedModel,
        source: DataSource,
        process: Process,
        tta: TestTimeAugmentation,
    ) -> Evaluation:
        cfg = self.cfg
        return evaluate(
            model, source, cfg.evaluators.batch_size, cfg.run.precision, process, tta=tta
        )

    def summary(self, test: dict[str, Any], best: float | None) -> dict[str, Any]:
        return super().summary(test, best) | {
            "confusion_matrix": test["confusion"].tolist(),
            "tta": self.test_tta,  # how the test images were scored
            "val_tta": self.cfg.evaluators.tta,  # and the validation images
        }


def _scores(result: Evaluation) -> dict[str, Any]:
    """A classification evaluation as the loop records it: loss and accuracy are logged, and
    the test's confusion matrix goes to the summary."""
    return {"loss": result.loss, "accuracy": result.accuracy, "confusion": result.confusion}


BUILTIN_TASK_MODULES = ("vitkit.training.mpp_task",)  # the built-in tasks outside this module


def registered_tasks() -> dict[str, type[Task]]:
    """``TASKS`` once the built-in tasks and the plugins' have registered, whatever was
    imported: what a lookup reads."""
    ensure_loaded(*BUILTIN_TASK_MODULES)
    return TASKS


def build_task(cfg: TrainConfig) -> Task:
    tasks = registered_tasks()
    if cfg.task.name not in tasks:
        raise ValueError(f"unknown task {cfg.task.name!r}: choose one of {sorted(tasks)}")
    return tasks[cfg.task.name](cfg)
