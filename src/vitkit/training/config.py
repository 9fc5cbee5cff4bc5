"""``TrainConfig``: every setting of a training or fine-tuning run, checked before it starts.

The config is nested, one section per part of the run it configures::

    [task]             name; [task.<name>] the options of a registered task (``[task.mpp]``)
    [model]            name, init_from, img_size, dropout, drop_path, patch_dropout
    [data]             source, in_memory, num_workers, max_unreadable_fraction, columns,
                       fractions
    [optim]            name, lr, betas, momentum, weight_decay, grad_clip, batch_size, ...
    [schedule]         name, epochs, steps, max_minutes, warm-up, lr_drops, progressive
                       resizing
    [augment]          ``AugmentConfig``
    [evaluators]       names, best, every, batch_size; [evaluators.<name>] an evaluator's options
    [run]              seed, precision, device, parallel, checkpointing, logging, out, ...

Each section is a dataclass: its fields hold the one default, their ``Literal`` annotations
the choices and their metadata the help text and, where it is not the field's name, the flag
(``--optimizer`` for ``optim.name``). A task or an evaluator brings its own options dataclass
(``register_task_options``, ``register_evaluator_options``), so adding one touches nothing here.

A run's config is resolved by ``resolve_config``: the defaults, then named presets
(``presets/<name>.toml``) and config files in order, then flags; the resolved config is saved
as ``config.json`` in the run folder and ``--resume`` reads it back from there.

The flat keys of the previous version (``lr = 1e-3`` at the top of a TOML file, ``TrainConfig(
lr=...)``, ``cfg.lr``) still work: each maps to its section through the flag names
(``flat_keys``), with one deprecation line per file or call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
import typing
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from vitkit.data import AugmentConfig
from vitkit.data.base import MAX_UNREADABLE_FRACTION
from vitkit.data.sources import DataOptions
from vitkit.evaluation.inference import TestTimeAugmentation
from vitkit.models import list_models
from vitkit.training.trackers import TRACKERS
from vitkit.utils.config import ConfigMixin, checked_values, choice_problems, merge_tables, plain
from vitkit.utils.remote import is_remote

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 128
"""The batch of a run that sets none, unless the training images are fewer."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    flat: str | None = None,
) -> Any:
    """A config field with its help text and, where it differs from the field's name, its flag
    (without ``--``) and its flat key of the previous version (default: the flag's)."""
    metadata: dict[str, Any] = {"help": help}
    if flag is not None:
        metadata["flag"] = flag
    if flat is not None:
        metadata["flat"] = flat
    return field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    """The flag of a config field, without ``--``: its ``flag`` metadata, else its name (with
    ``prefix``, for a task's or an evaluator's options: ``mpp-target``)."""
    return f.metadata.get("flag") or prefix + f.name.replace("_", "-")


class Section(ConfigMixin):
    """A section of ``TrainConfig``: values checked from TOML and flags, choices always."""

    config_name = "training config"
    check_types = True

    def __post_init__(self) -> None:
        problems = choice_problems(self) + self.problems()
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values, one message each."""
        return []


class PluggableSection(Section):
    """A section that also holds one table per registered plugin (``[task.mpp]``), each
    checked against the options dataclass the plugin registered under its name."""

    tables: dict[str, Any]

    @classmethod
    def registry(cls) -> Mapping[str, type[ConfigMixin]]:
        raise NotImplementedError

    @classmethod
    def own_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "tables"]  # type: ignore[arg-type]

    @classmethod
    def from_table(cls, values: dict[str, Any], prefix: str) -> Self:
        own = {k: v for k, v in values.items() if k in cls.own_fields()}
        registry = cls.registry()
        unknown = sorted(k for k in values if k not in own and k not in registry)
        if unknown:
            raise ValueError(
                f"unknown keys {[prefix + k for k in unknown]}; known keys are "
                f"{cls.own_fields()} and a table for each of {sorted(registry)}"
            )
        tables = {
            k: registry[k].from_table(v, f"{prefix}{k}.") for k, v in values.items() if k not in own
        }
        return cls(**checked_values(cls, own, prefix), tables=tables)  # type: ignore[call-arg]

    @classmethod
    def merge_table(cls, values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        merged = dict(values)
        for name, value in overrides.items():
            if name in cls.registry() and isinstance(merged.get(name), dict):
                merged[name] = cls.registry()[name].merge_table(merged[name], value)
            else:
                merged[name] = plain(value)
        return merged

    def to_dict(self) -> dict[str, Any]:
        own = {name: plain(getattr(self, name)) for name in self.own_fields()}
        return own | {name: options.to_dict() for name, options in self.tables.items()}

    def options(self, name: str) -> Any:
        """The options of the plugin ``name``: its table, else its options' defaults."""
        if name in self.tables:
            return self.tables[name]
        registry = self.registry()
        if name not in registry:
            raise ValueError(f"{name!r} has no registered options: choose from {sorted(registry)}")
        return registry[name]()

    def with_active_tables(self, names: Collection[str]) -> None:
        """Keep the tables of the active plugins ``names`` (their defaults filled in, so that
        ``config.json`` shows them) and of the others only where they differ from their
        defaults."""
        registry = self.registry()
        self.tables = {
            name: options
            for name, options in self.tables.items()
            if name in names or options != registry[name]()
        }
        for name in names:
            if name in registry and name not in self.tables:
                self.tables[name] = registry[name]()


TASK_OPTIONS: dict[str, type[ConfigMixin]] = {}
EVALUATOR_OPTIONS: dict[str, type[ConfigMixin]] = {}


def _register(
    registry: dict[str, type[ConfigMixin]], kind: str, name: str, options: type[ConfigMixin]
) -> None:
    if registry.get(name, options) is not options:
        raise ValueError(f"{kind} {name!r} registers two different options classes")
    registry[name] = options


def register_task_options(name: str, options: type[ConfigMixin]) -> None:
    """Make ``[task.<name>]`` (and the flags ``--<name>-<field>``) the options of task ``name``
    (``register_task`` calls this with the task's ``Options``)."""
    _register(TASK_OPTIONS, "task", name, options)


def register_evaluator_options(name: str, options: type[ConfigMixin]) -> None:
    """Make ``[evaluators.<name>]`` (and ``--<name>-<field>``) the options of evaluator ``name``."""
    _register(EVALUATOR_OPTIONS, "evaluator", name, options)


@dataclass
class TaskConfig(PluggableSection):
    """``[task]``: what the run learns."""

    name: str = option(
        "classification",
        "what the run learns: 'classification' or 'mpp' (masked patch prediction; tasks "
        "register by name)",
        flag="task",
    )
    tables: dict[str, Any] = field(default_factory=dict, metadata={"flag": None})

    @classmethod
    def registry(cls) -> Mapping[str, type[ConfigMixin]]:
        return TASK_OPTIONS

    @property
    def options_of_task(self) -> Any:
        """The options of the run's own task."""
        return self.options(self.name)


@dataclass
class ModelConfig(Section):
    """``[model]``: the network and where it starts from."""

    name: str | None = option(
        None,
        "registered model to train from scratch (see `vitkit models`); default: the one made "
        "for images like the data's (the 8x8 digits: vit_digits; 28 px grey: vit_mnist; 32 px "
        "colour: vit_cifar; photos: vit_ti16 at 96 px), named in the log; when fine-tuning, "
        "only needed for checkpoint formats that do not record their architecture",
        flag="model",
    )
    init_from: str | None = option(
        None,
        "checkpoint to fine-tune (any format load_pretrained reads, or a name: hf-hub:ORG/NAME, "
        "a URL, one of `vitkit models --pretrained`); its head is replaced",
        flag="from",
        flat="init_from",
    )
    img_size: int | None = option(
        None, "input resolution (default: the model's); fine-tuning higher resizes pos. embeddings"
    )
    dropout: float = option(0.0, "dropout rate after the position embedding and in the MLPs")
    drop_path: float = option(0.0, "stochastic depth rate of the last block (0 at the first)")
    patch_dropout: float = option(
        0.0,
        "while training, the fraction of each image's patch tokens dropped at random before "
        "the encoder (PatchDropout; the [class] token stays): cheaper steps; evaluation sees all",
    )

    def problems(self) -> list[str]:
        problems = []
        if self.init_from is None:
            if self.name is not None and self.name not in list_models():
                problems.append(
                    f"model {self.name!r} is not registered: choose one of `vitkit models`"
                )
        elif not is_remote(self.init_from) and not Path(self.init_from).exists():
            problems.append(f"init_from {self.init_from} does not exist")
        if self.img_size is not None and self.img_size <= 0:
            problems.append("img_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append("drop_path must be in [0, 1)")
        if not 0.0 <= self.patch_dropout < 1.0:
            problems.append("patch_dropout must be in [0, 1)")
        return problems


@dataclass
class DataConfig(Section):
    """``[data]``: where the images come from and which of them train."""

    source: str = option(
        "digits",
        "'digits' (shipped) or a path: image folder, idx / CIFAR folder, .npz, WebDataset "
        "shards (a folder from `vitkit data pack`, a brace pattern or a comma-separated list), "
        "a Hugging Face dataset (save_to_disk folder, parquet files) or hf:NAME[:CONFIG]",
        flag="data",
    )
    in_memory: Literal["auto", "yes", "no"] = option(
        "auto",
        "'auto': small uniform sources are decoded into memory, other image folders streamed "
        "from disk; 'yes' / 'no' force it for image folders (shards always stream)",
        flag="data-in-memory",
    )
    num_workers: int | None = option(
        None,
        "loader worker processes per training process for streamed data (default: "
        "min(4, CPUs); 0 decodes in the training process)",
    )
    max_unreadable_fraction: float = option(
        MAX_UNREADABLE_FRACTION,
        "unreadable (corrupt, empty, truncated) images are skipped and "
        "listed in the run folder's skipped_files.txt; more than this fraction of a split "
        "stops the run with an error",
    )
    image_column: str | None = option(
        None,
        "Hugging Face datasets: the column of the images (default: the one Image feature)",
    )
    label_column: str | None = option(
        None,
        "Hugging Face datasets: the column of the labels (default: the one ClassLabel, else "
        "the one integer column)",
    )
    val_fraction: float = option(
        0.0,
        "fraction of the training split held out (stratified) to pick the best epoch; 0 = none: "
        "best = last",
    )
    train_fraction: float = option(
        1.0,
        "train on this stratified fraction of the training split (the same images for a given "
        "seed, and a smaller fraction's images are among a larger one's); the test split is "
        "unchanged",
    )

    def problems(self) -> list[str]:
        return [
            message
            for ok, message in (
                (self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0"),
                (
                    0.0 <= self.max_unreadable_fraction <= 1.0,
                    "max_unreadable_fraction must be in [0, 1]",
                ),
                (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
                (0.0 < self.train_fraction <= 1.0, "train_fraction must be in (0, 1]"),
            )
            if not ok
        ]


@dataclass
class OptimConfig(Section):
    """``[optim]``: the optimizer, its batch and its gradient handling."""

    name: Literal["adam", "sgd", "muon"] = option(
        "muon",
        "'adam' (decoupled weight decay, the paper's pre-training), 'sgd' (momentum) or "
        "'muon' (Muon for the blocks' weight matrices at Adam's RMS, AdamW for the rest)",
        flag="optimizer",
    )
    lr: float = option(4e-3, "peak learning rate, reached after the warm-up")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam's beta1 beta2")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(
        0.1, "decoupled weight decay (times the learning rate), on weight matrices only"
    )
    grad_clip: float = option(1.0, "clip gradients at this global norm; 0 = off")
    ema: float = option(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.9998, "
        "warmed up as timm's), evaluated beside them (split '<evaluator>_ema'); "
        "best.safetensors holds whichever scores better; 0 = off",
    )
    batch_size: int | None = option(
        None,
        f"global batch size (all processes, all accumulation steps together); unset = "
        f"{DEFAULT_BATCH_SIZE}, or the training images when fewer (the run's config.json "
        "keeps the size used)",
    )
    accum_steps: int = option(
        1, "gradient accumulation: micro-batches per optimizer step (same global batch)"
    )
    layer_decay: float | None = option(
        None,
        "layer-wise learning-rate decay (BEiT, MAE): block i of a depth-d ViT learns at "
        "RATE**(d-i) times the learning rate, the embeddings at RATE**(d+1), the final norm "
        "and head at 1; None or 1 = off",
    )
    freeze: str | None = option(
        None,
        "train only part of the model: 'backbone' (all but the head and pre-logits) or a "
        "number N (the embeddings and the first N blocks of a ViT); frozen weights get no "
        "gradients and no optimizer state",
    )

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        super().__post_init__()

    @property
    def global_batch_size(self) -> int:
        """The batch size of the run, fixed at its start (``resolve_batch_size``)."""
        if self.batch_size is None:
            raise RuntimeError("batch_size is unset: resolve_batch_size() fixes it from the data")
        return self.batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.accum_steps

    def resolve_batch_size(self, train_images: int, processes: int) -> tuple[int, bool]:
        """The batch size of a run on ``train_images`` over ``processes``: the one given, else
        the default cut to the largest multiple of ``accum_steps x processes`` that the
        training images fill; and whether it was cut. Raises when no batch fits."""
        if self.batch_size is not None:
            return self.batch_size, False
        unit = self.accum_steps * processes
        batch = min(DEFAULT_BATCH_SIZE, train_images) // unit * unit
        if batch < 1:
            raise ValueError(
                f"{train_images} training images cannot fill one batch of {unit} "
                f"({self.accum_steps} accumulation steps x {processes} processes): add images "
                "or lower --accum-steps or the number of processes"
            )
        return batch, batch < DEFAULT_BATCH_SIZE

    def problems(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append("lr must be positive")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append("betas must be in [0, 1)")
        if not 0.0 <= self.momentum < 1.0:
            problems.append("momentum must be in [0, 1)")
        if self.weight_decay < 0:
            problems.append("weight_decay must be >= 0")
        if self.grad_clip < 0:
            problems.append("grad_clip must be >= 0 (0 = off)")
        if not 0.0 <= self.ema < 1.0:
            problems.append("ema must be in [0, 1) (0 = off; e.g. 0.9998)")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append("batch_size must be at least 1")
        if self.accum_steps < 1:
            problems.append("accum_steps must be at least 1")
        elif self.batch_size is not None and self.batch_size % self.accum_steps:
            problems.append(
                f"batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}"
            )
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            problems.append("layer_decay must be in (0, 1] (1 = off)")
        if self.freeze is not None and not (
            self.freeze == "backbone" or (self.freeze.isdigit() and int(self.freeze) > 0)
        ):
            problems.append(
                f"freeze must be 'backbone' or a number of blocks >= 1, not {self.freeze!r}"
            )
        return problems


@dataclass
class ScheduleConfig(Section):
    """``[schedule]``: the run's length and the learning rate over it."""

    name: Literal["cosine", "linear", "constant", "bit"] = option(
        "cosine",
        "learning-rate decay after the warm-up: to zero ('cosine', 'linear'), none ('constant') "
        "or BiT's staircase ('bit': divided by 10 at each of lr_drops)",
        flag="schedule",
    )
    epochs: int = option(100, "passes over the training data")
    steps: int = option(
        0, "length of the run in optimizer steps, overriding epochs; 0 = epochs x steps per epoch"
    )
    max_minutes: float = option(
        0.0,
        "stop training once this many minutes were spent in training steps (evaluation not "
        "counted), then evaluate and test as at the planned end; 0 = no limit",
    )
    warmup_epochs: float = option(
        3.0,
        "linear warm-up from zero, in epochs (may be fractional); a warm-up as long as the run "
        "is cut to a tenth of it, with a note",
    )
    warmup_steps: int | None = option(
        None, "the warm-up in optimizer steps, overriding warmup_epochs"
    )
    lr_drops: list[int] = field(
        default_factory=list,
        metadata={
            "help": "schedule 'bit': the optimizer steps from which the learning rate "
            "is divided by 10 once more (BiT-HyperRule: 3 drops)"
        },
    )
    resize_start: float = option(
        1.0,
        "progressive resizing: train first at this fraction of the model's image size (e.g. "
        "0.75), growing to the full size over resize_ramp; evaluation is always at the full "
        "size; 1 = off",
    )
    resize_ramp: tuple[float, float] = option(
        (0.4, 0.8),
        "FROM UNTIL fractions of the run's steps between which the training image size "
        "grows linearly from resize_start to the full size",
    )
    resize_regularization: float = option(
        1.0,
        "progressive resizing's adaptive regularization (EfficientNetV2): at resize_start's "
        "size RandAugment transforms this share of the images and mixup's and cutmix's alphas "
        "are this fraction of theirs, growing with the image side to the full values at the "
        "full size; 1 = the same throughout",
    )

    def __post_init__(self) -> None:
        self.lr_drops = list(self.lr_drops)
        self.resize_ramp = (float(self.resize_ramp[0]), float(self.resize_ramp[1]))
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = []
        if self.epochs < 1:
            problems.append("epochs must be at least 1")
        if self.steps < 0:
            problems.append("steps must be >= 0 (0 = epochs x steps per epoch)")
        if self.max_minutes < 0:
            problems.append("max_minutes must be >= 0 (0 = no limit)")
        if self.warmup_epochs < 0:
            problems.append("warmup_epochs must be >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append("warmup_steps must be >= 0")
        if not 0.0 < self.resize_start <= 1.0:
            problems.append(
                f"resize_start must be in (0, 1] (1 = no progressive resizing), got "
                f"{self.resize_start}"
            )
        if not 0.0 <= self.resize_ramp[0] <= self.resize_ramp[1] <= 1.0:
            problems.append(
                f"resize_ramp must satisfy 0 <= FROM <= UNTIL <= 1, got {list(self.resize_ramp)}"
            )
        if not 0.0 <= self.resize_regularization <= 1.0:
            problems.append(
                f"resize_regularization must be in [0, 1] (1 = the same throughout), got "
                f"{self.resize_regularization}"
            )
        elif self.resize_regularization < 1.0 and self.resize_start >= 1.0:
            problems.append(
                "resize_regularization scales the augmentations with progressive resizing's "
                "image size: set resize_start below 1 too"
            )
        drops = self.lr_drops
        if self.name != "bit":
            if drops:
                problems.append("lr_drops is only used by schedule 'bit': set --schedule bit")
        elif not (drops and drops == sorted(set(drops)) and drops[0] > 0):
            problems.append(
                f"schedule 'bit' needs lr_drops: increasing positive steps, got {drops}"
            )
        elif self.steps and drops[-1] >= self.steps:
            problems.append(f"lr_drops {drops} must lie before the end (steps {self.steps})")
        return problems


@dataclass
class EvaluatorsConfig(PluggableSection):
    """``[evaluators]``: what the run measures while it trains, and which of it picks the
    best checkpoint."""

    names: list[str] = field(
        default_factory=lambda: ["val"],
        metadata={
            "help": "evaluators to run during training ('val': the task's metrics on the "
            "validation split, when there is one; 'fewshot': few-shot linear accuracy of "
            "the frozen features)",
            "flag": "evaluators",
        },
    )
    best: str = option(
        "val",
        "the evaluator whose metric picks best.safetensors ('val': the task's metric on the "
        "validation split); when it does not run, best = last",
        flag="best-evaluator",
    )
    every: int = option(
        0, "optimizer steps between evaluations; 0 = at the end of every epoch", flag="eval-every"
    )
    batch_size: int = option(512, "batch size per process for evaluation", flag="eval-batch-size")
    tta: TestTimeAugmentation = option(
        "none",
        "test-time augmentation of the classification task's validation and test scores: "
        "'flip' averages the logits of each image and its mirror image; 'flip_translate' "
        "adds the same for the image moved one pixel each way diagonally (6 passes)",
    )
    test_tta: TestTimeAugmentation | None = option(
        None,
        "test-time augmentation of the final test score alone (default: tta's), so that a "
        "costly one (flip_translate) is paid once and not at every validation",
    )
    monitor: str | None = option(
        None,
        "the metric of the best evaluator that picks best.safetensors and that patience "
        "watches; default: the evaluator's own (the task's: accuracy, or mpp's loss)",
    )
    monitor_mode: Literal["max", "min"] | None = option(
        None,
        "whether a higher or a lower monitored value is better; needed with a --monitor "
        "other than the evaluator's own metric",
    )
    patience: int = option(
        0,
        "stop early after this many evaluations without a better monitored value (the best "
        "checkpoint kept, the test split scored with it); 0 = off",
    )
    tables: dict[str, Any] = field(default_factory=dict, metadata={"flag": None})

    @classmethod
    def registry(cls) -> Mapping[str, type[ConfigMixin]]:
        return EVALUATOR_OPTIONS

    def __post_init__(self) -> None:
        self.names = list(self.names)
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append("eval_batch_size must be at least 1")
        if self.every < 0:
            problems.append("eval_every must be >= 0 (0 = every epoch)")
        if self.patience < 0:
            problems.append("patience must be >= 0 (0 = off)")
        return problems


@dataclass
class RunConfig(Section):
    """``[run]``: how the run executes, what it does on trouble, and where it writes."""

    seed: int = option(0, "seeds the initialisation, data order, augmentation and dropout")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32",
        "'bf16' runs forward and backward under bfloat16 autocast; 'fp16' under float16 "
        "autocast with a gradient scaler (CUDA only)",
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "'auto' takes a GPU if there is one")
    parallel: Literal["ddp", "fsdp"] = option(
        "ddp",
        "under torchrun: 'ddp' (every process holds the whole model) or 'fsdp' (FSDP2: "
        "parameters, gradients and optimizer state sharded over the processes, block by block)",
    )
    activation_checkpointing: bool = option(
        False,
        "keep only each block's input and recompute the block in the backward pass: "
        "less activation memory for about a third more compute",
    )
    compile: bool = option(
        False,
        "torch.compile the model (training and evaluation; each block instead with FSDP, "
        "activation checkpointing or progressive resizing): the first steps (and the first "
        "at each new size) wait for the compiler; on CPU later ones run faster in bf16, not "
        "in fp32; needs a C++ compiler on CPU",
    )
    keep_freed_memory: bool = option(
        True,
        "on Linux: keep freed memory in the process for reuse rather than hand it back to "
        "the kernel and fault it in again every step (glibc's mallopt); faster CPU steps, "
        "and the process's memory stays at its peak",
    )
    checkpoint_every: int = option(
        0,
        "optimizer steps between checkpoints inside an epoch (one is always written at the "
        "end of each epoch); 0 = only then",
    )
    log_every: int = option(10, "optimizer steps between lines of metrics.jsonl")
    out: str | None = option(None, "run folder (default: runs/<data>-<date>-<time>)")
    on_nonfinite: Literal["abort", "skip", "rollback"] = option(
        "abort",
        "a step whose loss or gradients are NaN or infinite: 'abort' the run (its last "
        "checkpoint kept), 'skip' the step (no update; up to max_skipped_steps), or 'rollback' "
        "to the last checkpoint with the learning rate halved (up to max_rollbacks); each "
        "event goes to events.jsonl and summary.json",
    )
    max_skipped_steps: int = option(10, "--on-nonfinite skip: abort after this many skips")
    max_rollbacks: int = option(3, "--on-nonfinite rollback: abort after this many rollbacks")
    log_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "experiment trackers that get a copy of metrics.jsonl and the config: "
            "'tensorboard' (event files in RUN/tensorboard/), 'mlflow' (RUN/mlruns/ unless "
            "MLFLOW_TRACKING_URI is set); needs `pip install 'vitkit[tracking]'`"
        },
    )

    def __post_init__(self) -> None:
        self.log_to = list(self.log_to)
        super().__post_init__()

    def problems(self) -> list[str]:
        unknown = sorted(set(self.log_to) - set(TRACKERS))
        return [
            message
            for ok, message in (
                (self.log_every >= 1, "log_every must be at least 1"),
                (self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = every epoch)"),
                (self.max_skipped_steps >= 0, "max_skipped_steps must be >= 0"),
                (self.max_rollbacks >= 0, "max_rollbacks must be >= 0"),
                (not unknown, f"log_to {unknown}: choose from {list(TRACKERS)}"),
            )
            if not ok
        ]


def _train_augment() -> AugmentConfig:
    # The main job's augmentation: a mild random-resized crop (on 8x8 digits, a small zoom and
    # shift) and label smoothing 0.1 (timm's default), chosen by the digits pilots of
    # docs/experiments.md; everything else stays off. A partial [augment] table changes only
    # the keys it names.
    return AugmentConfig(random_resized_crop=True, crop_scale=(0.8, 1.0), label_smoothing=0.1)


@dataclass
class TrainConfig(ConfigMixin):
    """A training run. Defaults: the main job, a small ViT on the shipped digits."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=_train_augment)
    evaluators: EvaluatorsConfig = field(default_factory=EvaluatorsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    presets: list[str] = field(
        default_factory=list,
        metadata={"help": "named presets applied before the config files (`resolve_config`)"},
    )

    config_name: ClassVar[str] = "training config"
    check_types: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.presets = list(self.presets)
        self.task.with_active_tables([self.task.name])
        self.evaluators.with_active_tables(self.evaluators.names)

    @property
    def data_options(self) -> DataOptions:
        data = self.data
        return DataOptions(
            data.in_memory,
            data.num_workers,
            self.augment,
            data.max_unreadable_fraction,
            data.image_column,
            data.label_column,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from plain values (TOML, JSON, flags); a partial section changes only the keys
        it names of the default. Flat keys of the previous version are mapped, deprecated."""
        nested, flat = nest_flat_keys(values)
        if flat:
            warnings.warn(deprecation_note(flat, "TrainConfig"), DeprecationWarning, stacklevel=2)
        return cls.from_nested(nested)

    @classmethod
    def from_nested(cls, values: dict[str, Any]) -> Self:
        """``from_dict`` for values in the nested form only."""
        unknown = unknown_keys(values)
        if unknown:
            raise ValueError(
                f"unknown training config keys {unknown}; the sections are {list(SECTIONS)} "
                "(their keys: docs/configuration.md, `vitkit train --help` or any run's "
                "config.json)"
            )
        merged = merge_tables(cls, cls().to_dict(), values)
        return cls(**checked_values(cls, merged, ""))

    def replace(self, **overrides: Any) -> Self:
        """A copy with ``overrides``; a section's table merges key by key."""
        nested, flat = nest_flat_keys(overrides)
        if flat:
            warnings.warn(deprecation_note(flat, "replace()"), DeprecationWarning, stacklevel=2)
        return type(self).from_nested(merge_tables(type(self), self.to_dict(), nested))

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            """``cfg.lr`` and the other flat names of the previous version, deprecated."""
            path = flat_keys().get(name) if not name.startswith("_") else None
            if path is None:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            warnings.warn(deprecation_note([name], "attribute"), DeprecationWarning, stacklevel=2)
            value: Any = self
            for part in path:
                value = (
                    value.options(part)
                    if isinstance(value, PluggableSection) and part in (value.registry())
                    else getattr(value, part)
                )
            return value


SECTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name != "presets"
)
_dataclass_init = TrainConfig.__init__


def _init(self: TrainConfig, **values: Any) -> None:
    """Sections as configs (the form the code uses), or plain tables and flat keyword
    arguments of the previous version (``TrainConfig(lr=0.01)``, deprecated)."""
    if all(isinstance(v, ConfigMixin) or k == "presets" for k, v in values.items()):
        _dataclass_init(self, **values)
        return
    nested, flat = nest_flat_keys(values)
    if flat:
        warnings.warn(deprecation_note(flat, "TrainConfig()"), DeprecationWarning, stacklevel=2)
    built = type(self).from_nested(nested)
    _dataclass_init(self, **{f.name: getattr(built, f.name) for f in dataclasses.fields(built)})


setattr(TrainConfig, "__init__", _init)  # noqa: B010  (mypy keeps the dataclass signature)


def unknown_keys(values: Mapping[str, Any]) -> list[str]:
    """The keys of nested ``values`` that name no setting, by dotted path (all of them, where
    building the config would stop at the first table)."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = []
    for key, value in values.items():
        if key not in SECTIONS:
            unknown += [] if key == "presets" else [key]
            continue
        section = hints[key]
        known = {f.name for f in dataclasses.fields(section) if f.name != "tables"}
        if issubclass(section, PluggableSection):
            known |= set(section.registry())
        if isinstance(value, Mapping):
            unknown += [f"{key}.{name}" for name in value if name not in known]
    return unknown


def _section_fields() -> Iterator[tuple[tuple[str, ...], dataclasses.Field, str]]:
    """(path, field, flag) of every setting: the sections' fields, then the registered tasks'
    and evaluators' options (flag ``<name>-<field>``). Read at each call: plugins register
    options after this module is imported."""
    hints = typing.get_type_hints(TrainConfig)
    for section in SECTIONS:
        cls = hints[section]
        for f in dataclasses.fields(cls):
            if f.name != "tables":
                yield (section, f.name), f, flag_name(f)
    for section, registry in (("task", TASK_OPTIONS), ("evaluators", EVALUATOR_OPTIONS)):
        for name, options in sorted(registry.items()):
            for f in dataclasses.fields(options):  # type: ignore[arg-type]
                yield (section, name, f.name), f, flag_name(f, f"{name}-")


def settings() -> list[tuple[tuple[str, ...], dataclasses.Field, str]]:
    """Every setting as (path in the nested config, field, flag without ``--``)."""
    return list(_section_fields())


def flat_keys() -> dict[str, tuple[str, ...]]:
    """The previous version's flat keys and their paths: each is its flag's name with
    underscores (``optimizer`` -> ``optim.name``, ``mpp_target`` -> ``task.mpp.target``), or the
    field's ``flat`` metadata; augmentations stayed under ``[augment]``."""
    return {
        f.metadata.get("flat") or flag.replace("-", "_"): path
        for path, f, flag in _section_fields()
        if path[0] != "augment"
    }


def nest_flat_keys(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` in the nested form, and the flat keys it had (a section's name with a plain
    value, such as ``task = "mpp"``, is the flat key of that section's ``name``)."""
    mapping = flat_keys()
    nested: dict[str, Any] = {}
    flat: list[str] = []
    for key, value in values.items():
        is_table = isinstance(value, dict | ConfigMixin)
        if (key in SECTIONS and is_table) or key == "presets" or key not in mapping:
            _merge_into(nested, (key,), value)  # unknown keys are refused by name later
        else:
            flat.append(key)
            _merge_into(nested, mapping[key], value)
    return nested, flat


def _merge_into(values: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        values = values.setdefault(part, {})
    last = path[-1]
    if isinstance(value, dict) and isinstance(values.get(last), dict):
        for key, item in value.items():
            _merge_into(values[last], (key,), item)
    else:
        values[last] = value


def deprecation_note(flat: Collection[str], where: str) -> str:
    """One line: ``where`` used flat keys, and where the first few of them moved."""
    mapping = flat_keys()
    shown = [f"{key} -> {'.'.join(mapping[key])}" for key in list(flat)[:4]]
    more = f" and {len(flat) - len(shown)} more" if len(flat) > len(shown) else ""
    return (
        f"{where}: flat training config keys are deprecated, write them in their sections "
        f"({', '.join(shown)}{more}; see docs/configuration.md)"
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """The values of a TOML config file, as written."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML ({err})") from None


def read_config_file(path: str | Path, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config file's (or ``config.json``'s ``values``) settings in the nested form; flat
    keys of the previous version are mapped, with one warning line for the file."""
    nested, flat = nest_flat_keys(read_toml(path) if values is None else values)
    if flat:
        logger.warning(deprecation_note(flat, str(path)))
    return nested


def read_run_config(path: str | Path) -> TrainConfig:
    """The ``TrainConfig`` a run folder's ``config.json`` at ``path`` holds, nested or (written
    by an earlier version) flat."""
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    return TrainConfig.from_nested(read_config_file(path, values))


def preset_names() -> list[str]:
    """The presets shipped in ``vitkit/training/presets``."""
    files = resources.files("vitkit.training") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def read_preset(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` (``presets/<name>.toml``)."""
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}: choose from {preset_names()}")
    text = (resources.files("vitkit.training") / "presets" / f"{name}.toml").read_text()
    return tomllib.loads(text)


# A preset whose settings depend on the data (BiT-HyperRule's schedule) also registers a
# function that completes the resolved config at run start, keeping the settings named
# explicitly (by their flag names with underscores: ``steps``, ``mixup``).
PresetResolver = Callable[["TrainConfig", Collection[str]], "TrainConfig"]
PRESET_RESOLVERS: dict[str, PresetResolver] = {}


def explicit_names(values: Mapping[str, Any]) -> set[str]:
    """The settings nested ``values`` sets, by flag name with underscores (``keep`` of a
    preset resolver)."""
    paths = {path: flag.replace("-", "_") for path, _, flag in _section_fields()}
    names = set()

    def walk(table: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in table.items():
            path = (*prefix, key)
            if path in paths:
                names.add(paths[path])
            elif isinstance(value, Mapping):
                walk(value, path)

    walk(values, ())
    return names


def resolve_config(
    presets: Collection[str] = (),
    files: Collection[str | Path] = (),
    flags: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """A run's config: the defaults, then the ``presets`` and each preset a file names under
    ``presets = [...]``, then the config ``files`` in order, then the nested ``flags``; later
    wins. A preset with a resolver (``bit``) then fills in what depends on the data, except
    what a file or flag set."""
    file_values = [read_config_file(path) for path in files]
    flag_values = dict(flags or {})
    names = [*presets]
    for values in [*file_values, flag_values]:
        names += [p for p in values.pop("presets", []) if p not in names]
    layered: dict[str, Any] = {"presets": names}
    for name in names:
        layered = merge_tables(TrainConfig, layered, read_preset(name))
    explicit: dict[str, Any] = {}
    for given in [*file_values, flag_values]:
        explicit = merge_tables(TrainConfig, explicit, given)
    cfg = TrainConfig.from_nested(merge_tables(TrainConfig, layered, explicit))
    if files and "source" not in explicit.get("data", {}):
        # The default data (the shipped digits) is for the bare `vitkit train`: a recipe is
        # written for a dataset, and training it on another one would go unnoticed.
        raise ValueError(f"the recipe {', '.join(map(str, files))} names no data: pass --data")
    for name in names:
        if name in PRESET_RESOLVERS:
            cfg = PRESET_RESOLVERS[name](cfg, explicit_names(explicit))
    return cfg


def _flat_preset(name: str) -> dict[str, Any]:
    """A preset as the flat dict of the previous version (``FINETUNE_DEFAULTS``)."""
    mapping = {path: flat for flat, path in flat_keys().items()}
    values = read_preset(name)
    flat: dict[str, Any] = {}
    for section, table in values.items():
        if section == "augment":  # the flat config kept its [augment] table
            flat["augment"] = dict(table)
            continue
        for key, value in table.items():
            flat[mapping.get((section, key), key)] = value
    return flat


DEPRECATED_PRESETS = {"FINETUNE_DEFAULTS": "finetune", "PRETRAIN_DEFAULTS": "pretrain"}


def deprecated_preset(name: str) -> dict[str, Any]:
    """``FINETUNE_DEFAULTS`` or ``PRETRAIN_DEFAULTS`` of the previous version: the preset as a
    flat dict, with a ``DeprecationWarning`` on the caller's caller (the module attribute)."""
    preset = DEPRECATED_PRESETS[name]
    warnings.warn(
        f"{name} is deprecated: use the preset {preset!r} (resolve_config([{preset!r}]))",
        DeprecationWarning,
        stacklevel=3,
    )
    return _flat_preset(preset)


def __getattr__(name: str) -> Any:
    if name not in DEPRECATED_PRESETS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return deprecated_preset(name)


# The choices of the options other commands share with training (``vitkit eval``'s).
PRECISIONS: tuple[str, ...] = typing.get_args(typing.get_type_hints(RunConfig)["precision"])
DEVICES: tuple[str, ...] = typing.get_args(typing.get_type_hints(RunConfig)["device"])
