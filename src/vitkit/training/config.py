"""``TrainConfig``: every setting of a training or fine-tuning run, checked before it starts.

A config comes from the defaults, a TOML file (``read_toml``) and flags, in that
order of precedence; the resolved config is saved as ``config.json`` in the run folder and
``--resume`` reads it back from there.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vitkit.data import AugmentConfig
from vitkit.data.base import MAX_UNREADABLE_FRACTION
from vitkit.data.sources import DataOptions
from vitkit.models import list_models
from vitkit.models.mpp import MPP_TARGETS

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "bit")
PRECISIONS = ("fp32", "bf16")
PARALLELS = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
IN_MEMORY = ("auto", "yes", "no")
NONFINITE_POLICIES = ("abort", "skip", "rollback")
# The main job's augmentation: a mild random-resized crop (on 8x8 digits, a small zoom and
# shift) is worth about 3 points of test accuracy there; everything else stays off.
DEFAULT_AUGMENT: dict[str, Any] = dict(random_resized_crop=True, crop_scale=(0.6, 1.0))


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """A training run. Defaults: the main job, a small ViT on the shipped digits."""

    # What to train on what.
    task: str = _option(
        "classification",
        "what the run learns: 'classification' or 'mpp' (masked patch prediction; tasks "
        "register by name)",
    )
    model: str | None = _option(
        None,
        "registered model to train from scratch (see `vitkit models`); default: the one made "
        "for images like the data's (the 8x8 digits: vit_digits; 28 px grey: vit_mnist; 32 px "
        "colour: vit_cifar; photos: vit_ti16 at 96 px), named in the log; when fine-tuning, "
        "only needed for checkpoint formats that do not record their architecture",
    )
    init_from: str | None = _option(
        None, "checkpoint to fine-tune (any format load_pretrained reads); its head is replaced"
    )
    data: str = _option(
        "digits",
        "'digits' (shipped) or a path: image folder, idx / CIFAR folder, .npz, or WebDataset "
        "shards (a folder from `vitkit data pack`, a brace pattern or a comma-separated list)",
    )
    data_in_memory: Literal["auto", "yes", "no"] = _option(
        "auto",
        "'auto': small uniform sources are decoded into memory, other image folders streamed "
        "from disk; 'yes' / 'no' force it for image folders (shards always stream)",
    )
    num_workers: int | None = _option(
        None, "loader worker processes per training process for streamed data (default: "
        "min(4, CPUs); 0 decodes in the training process)",
    )  # fmt: skip
    max_unreadable_fraction: float = _option(
        MAX_UNREADABLE_FRACTION,
        "unreadable (corrupt, empty, truncated) images are skipped and "
        "listed in the run folder's skipped_files.txt; more than this fraction of a split "
        "stops the run with an error",
    )
    img_size: int | None = _option(
        None, "input resolution (default: the model's); fine-tuning higher resizes pos. embeddings"
    )
    val_fraction: float = _option(
        0.0,
        "fraction of the training split held out (stratified) to pick the best epoch; 0 = none: "
        "best = last",
    )
    train_fraction: float = _option(
        1.0,
        "train on this stratified fraction of the training split (the same images for a given "
        "seed, and a smaller fraction's images are among a larger one's); the test split is "
        "unchanged",
    )
    # The optimisation.
    epochs: int = _option(150, "passes over the training data")
    steps: int = _option(
        0, "length of the run in optimizer steps, overriding epochs; 0 = epochs x steps per epoch"
    )
    max_minutes: float = _option(
        0.0,
        "stop training once this many minutes were spent in training steps (evaluation not "
        "counted), then evaluate and test as at the planned end; 0 = no limit",
    )
    batch_size: int = _option(
        64, "global batch size (all processes, all accumulation steps together)"
    )
    accum_steps: int = _option(
        1, "gradient accumulation: micro-batches per optimizer step (same global batch)"
    )
    optimizer: Literal["adam", "sgd"] = _option(
        "adam", "'adam' (decoupled weight decay, the paper's pre-training) or 'sgd' (momentum)"
    )
    lr: float = _option(1e-3, "peak learning rate, reached after the warm-up")
    betas: tuple[float, float] = _option((0.9, 0.999), "Adam's beta1 beta2")
    momentum: float = _option(0.9, "SGD momentum")
    weight_decay: float = _option(
        0.1, "decoupled weight decay (times the learning rate), on weight matrices only"
    )
    schedule: Literal["cosine", "linear", "constant", "bit"] = _option(
        "cosine",
        "learning-rate decay after the warm-up: to zero ('cosine', 'linear'), none ('constant') "
        "or BiT's staircase ('bit': divided by 10 at each of lr_drops)",
    )
    lr_drops: list[int] = field(
        default_factory=list,
        metadata={"help": "schedule 'bit': the optimizer steps from which the learning rate is "
                          "divided by 10 once more (BiT-HyperRule: 3 drops)"},
    )  # fmt: skip
    warmup_epochs: float = _option(
        3.0,
        "linear warm-up from zero, in epochs (may be fractional); a warm-up as long as the run "
        "is cut to a tenth of it, with a note",
    )
    warmup_steps: int | None = _option(
        None, "the warm-up in optimizer steps, overriding warmup_epochs"
    )
    grad_clip: float = _option(1.0, "clip gradients at this global norm; 0 = off")
    on_nonfinite: Literal["abort", "skip", "rollback"] = _option(
        "abort",
        "a step whose loss or gradients are NaN or infinite: 'abort' the run (its last "
        "checkpoint kept), 'skip' the step (no update; up to max_skipped_steps), or 'rollback' "
        "to the last checkpoint with the learning rate halved (up to max_rollbacks); each "
        "event goes to events.jsonl and summary.json",
    )
    max_skipped_steps: int = _option(10, "--on-nonfinite skip: abort after this many skips")
    max_rollbacks: int = _option(3, "--on-nonfinite rollback: abort after this many rollbacks")
    # Regularisation and augmentation (label smoothing and the rest live in ``augment``).
    dropout: float = _option(0.0, "dropout rate after the position embedding and in the MLPs")
    drop_path: float = _option(0.0, "stochastic depth rate of the last block (0 at the first)")
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(**DEFAULT_AUGMENT))
    # Masked patch prediction (task "mpp", ``vitkit pretrain``).
    mpp_target: Literal["mean_colour", "downsized", "pixels"] = _option(
        "mean_colour",
        "what a corrupted patch predicts: its 3-bit mean colour, its 4x4 downsized 3-bit "
        "colours, or its normalised pixels (L2)",
    )
    mpp_rate: float = _option(0.5, "fraction of the patches corrupted (the paper: 0.5; also 0.15)")
    # How to run.
    precision: Literal["fp32", "bf16"] = _option(
        "fp32", "'bf16' runs forward and backward under bfloat16 autocast"
    )
    device: Literal["auto", "cpu", "cuda"] = _option("auto", "'auto' takes a GPU if there is one")
    parallel: Literal["ddp", "fsdp"] = _option(
        "ddp", "under torchrun: 'ddp' (every process holds the whole model) or 'fsdp' (FSDP2: "
        "parameters, gradients and optimizer state sharded over the processes, block by block)",
    )  # fmt: skip
    activation_checkpointing: bool = _option(
        False, "keep only each block's input and recompute the block in the backward pass: "
        "less activation memory for about a third more compute",
    )  # fmt: skip
    compile: bool = _option(
        False, "torch.compile each block of the model (training and evaluation): the first "
        "steps wait for the compiler, later ones run faster; needs a C++ compiler on CPU",
    )  # fmt: skip
    seed: int = _option(0, "seeds the initialisation, data order, augmentation and dropout")
    eval_batch_size: int = _option(512, "batch size per process for evaluation")
    evaluators: list[str] = field(
        default_factory=lambda: ["val"],
        metadata={"help": "evaluators to run during training ('val': the task's metrics on the "
                          "validation split, when there is one; 'fewshot': few-shot linear "
                          "accuracy of the frozen features)"},
    )  # fmt: skip
    fewshot_data: str | None = _option(
        None, "labelled data of the 'fewshot' evaluator (its train split is fitted on, its test "
        "split scored); default: the run's own data, when it has labels",
    )  # fmt: skip
    fewshot_shots: list[int] = field(
        default_factory=lambda: [10, 25],
        metadata={"help": "training images per class of the 'fewshot' evaluator"},
    )
    fewshot_seeds: int = _option(3, "draws of the few-shot images (seeds 0..N-1), averaged")
    eval_every: int = _option(
        0, "optimizer steps between evaluations; 0 = at the end of every epoch"
    )
    checkpoint_every: int = _option(
        0, "optimizer steps between checkpoints inside an epoch (one is always written at the "
        "end of each epoch); 0 = only then",
    )  # fmt: skip
    log_every: int = _option(10, "optimizer steps between lines of metrics.jsonl")
    out: str | None = _option(None, "run folder (default: runs/<data>-<date>-<time>)")

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):  # unset keys take the main job's augmentation
            self.augment = AugmentConfig(**{**DEFAULT_AUGMENT, **self.augment})
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.evaluators = list(self.evaluators)
        self.lr_drops = list(self.lr_drops)
        self.fewshot_shots = list(self.fewshot_shots)
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        if self.init_from is None:
            check(
                self.model is None or self.model in list_models(),
                f"model {self.model!r} is not registered: choose one of `vitkit models`",
            )
        else:
            check(Path(self.init_from).exists(), f"init_from {self.init_from} does not exist")
        check(self.img_size is None or self.img_size > 0, "img_size must be positive")
        check(self.data_in_memory in IN_MEMORY, f"data_in_memory must be one of {IN_MEMORY}")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0")
        fraction = self.max_unreadable_fraction
        check(0.0 <= fraction <= 1.0, "max_unreadable_fraction must be in [0, 1]")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)")
        check(0.0 < self.train_fraction <= 1.0, "train_fraction must be in (0, 1]")
        check(self.epochs >= 1, "epochs must be at least 1")
        check(self.steps >= 0, "steps must be >= 0 (0 = epochs x steps per epoch)")
        check(self.max_minutes >= 0, "max_minutes must be >= 0 (0 = no limit)")
        check(self.batch_size >= 1, "batch_size must be at least 1")
        check(self.accum_steps >= 1, "accum_steps must be at least 1")
        check(
            self.batch_size % self.accum_steps == 0,
            f"batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}",
        )
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}")
        check(self.lr > 0, "lr must be positive")
        check(all(0.0 <= b < 1.0 for b in self.betas), "betas must be in [0, 1)")
        check(0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay must be >= 0")
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}")
        check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0")
        if self.schedule == "bit":
            check(
                bool(self.lr_drops) and self.lr_drops == sorted(set(self.lr_drops))
                and self.lr_drops[0] > 0,
                f"schedule 'bit' needs lr_drops: increasing positive steps, got {self.lr_drops}",
            )  # fmt: skip
            check(not self.steps or self.lr_drops[-1:] < [self.steps],
                  f"lr_drops {self.lr_drops} must lie before the end (steps {self.steps})")  # fmt: skip
        else:
            check(not self.lr_drops, "lr_drops is only used by schedule 'bit': set --schedule bit")
        check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)")
        check(
            self.on_nonfinite in NONFINITE_POLICIES,
            f"on_nonfinite must be one of {NONFINITE_POLICIES}",
        )
        check(self.max_skipped_steps >= 0, "max_skipped_steps must be >= 0")
        check(self.max_rollbacks >= 0, "max_rollbacks must be >= 0")
        check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        check(0.0 <= self.drop_path < 1.0, "drop_path must be in [0, 1)")
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        check(self.device in DEVICES, f"device must be one of {DEVICES}")
        check(self.parallel in PARALLELS, f"parallel must be one of {PARALLELS}")
        check(self.eval_batch_size >= 1, "eval_batch_size must be at least 1")
        check(self.log_every >= 1, "log_every must be at least 1")
        check(self.eval_every >= 0, "eval_every must be >= 0 (0 = every epoch)")
        check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = every epoch)")
        check(self.mpp_target in MPP_TARGETS, f"mpp_target must be one of {MPP_TARGETS}")
        check(0.0 < self.mpp_rate <= 1.0, "mpp_rate must be in (0, 1]")
        check(bool(self.fewshot_shots) and all(n >= 1 for n in self.fewshot_shots),
              "fewshot_shots must be one or more positive counts")  # fmt: skip
        check(self.fewshot_seeds >= 1, "fewshot_seeds must be at least 1")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accum_steps

    @property
    def data_options(self) -> DataOptions:
        options = (self.data_in_memory, self.num_workers, self.augment)
        return DataOptions(*options, self.max_unreadable_fraction)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from plain values (TOML, JSON, flags), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        augment = values.get("augment", {})
        augment_known = {f.name for f in dataclasses.fields(AugmentConfig)}
        unknown += [f"augment.{k}" for k in sorted(set(augment) - augment_known)]
        if unknown:
            raise ValueError(
                f"unknown training config keys {unknown}; known keys are {sorted(known)} and, "
                f"under [augment], {sorted(augment_known)}"
            )
        wrong = _wrong_types(cls, values, "") + _wrong_types(AugmentConfig, augment, "augment.")
        if wrong:
            raise ValueError("invalid training config: " + "; ".join(wrong))
        return cls(**{**values, "augment": dict(augment)})

    def replace(self, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_dict(merge(self.to_dict(), overrides))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain value (from TOML, JSON or a flag) fits a field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value)
    if origin is tuple:
        return (
            isinstance(value, list | tuple)
            and len(value) == len(args)
            and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        )
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _wrong_types(cls: type, values: dict[str, Any], prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [
        f"{prefix}{name} must be {_describe(hints[name])}, not {value!r}"
        for name, value in values.items()
        if name != "augment" and not _fits(value, hints[name])
    ]


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "none")
    return text.removeprefix("<class '").removesuffix("'>")


def read_toml(path: str | Path) -> dict[str, Any]:
    """The values of a TOML config file: top-level keys, augmentations under ``[augment]``."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML ({err})") from None


def merge(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``overrides`` applied; the ``augment`` table merges key by key."""
    merged = {**values, **overrides}
    merged["augment"] = {**values.get("augment", {}), **overrides.get("augment", {})}
    return merged


# The fine-tuning recipe of the paper (section 4.1 and appendix B.1.1): SGD with momentum
# 0.9, no weight decay, gradient clipping at global norm 1, cosine decay after a warm-up.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    model=None,
    optimizer="sgd",
    lr=0.01,
    weight_decay=0.0,
    schedule="cosine",
    grad_clip=1.0,
    epochs=10,
    warmup_epochs=1.0,
)


# Masked patch prediction's pre-training recipe (the paper's Appendix B.1.2: Adam with a base
# learning rate of 2e-4, a linear warm-up then cosine decay); the rest as ``train``'s.
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    task="mpp",
    optimizer="adam",
    lr=2e-4,
    schedule="cosine",
    warmup_epochs=3.0,
)
