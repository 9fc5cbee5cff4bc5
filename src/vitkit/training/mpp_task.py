"""Masked patch prediction as a task of the training loop (``vitkit pretrain --objective mpp``).

The run's model is a registered ViT (the hybrid included) without a classification head or
representation layer, which masked patch prediction would not train. What the optimizer and
DDP see is ``MaskedPatchPrediction(model)``: its [mask] embedding and prediction head exist
only for pre-training, so checkpoints keep them as task state (``state/task/``). A resumed run
therefore continues bit-identically, and a checkpoint's model is a plain ViT that ``vitkit
finetune`` takes like any other (the head is left behind with the training state).

Randomness: the augmentation of a micro-batch is drawn from the loop's seed for it, the
corruption from a seed drawn after that from the same generator, on a CPU generator (the draw
is tiny and then the same on every device). Evaluation corrupts with a generator seeded by the
run's seed at each evaluation, so every evaluation of the same weights gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vitkit.data import BatchTransform, preprocess
from vitkit.data.sources import Batch, DataSource, SourceInfo
from vitkit.evaluation.inference import autocast
from vitkit.models import architecture_of, create_model, model_config
from vitkit.models.mpp import MaskedPatchPrediction, MPPTarget
from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.models.pretrained import PretrainedModel
from vitkit.models.vit import VisionTransformer, ViTConfig
from vitkit.training.config import TrainConfig
from vitkit.training.distributed import Process, all_reduce_sum
from vitkit.training.tasks import StepResult, Task, fitted_overrides, register_task
from vitkit.utils.config import ConfigMixin, choice_problems

LABEL_AUGMENTATIONS = ("mixup", "cutmix", "label_smoothing")


@dataclass
class MPPOptions(ConfigMixin):
    """``[task.mpp]`` (flags ``--mpp-target``, ``--mpp-rate``)."""

    target: MPPTarget = field(
        default="mean_colour",
        metadata={
            "help": "what a corrupted patch predicts: its 3-bit mean colour, its 4x4 "
            "downsized 3-bit colours, or its normalised pixels (L2)"
        },
    )
    rate: float = field(
        default=0.5,
        metadata={"help": "fraction of the patches corrupted (the paper: 0.5; also 0.15)"},
    )

    config_name = "[task.mpp] options"
    check_types = True

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if not 0.0 < self.rate <= 1.0:
            problems.append("rate must be in (0, 1]")
        if problems:
            raise ValueError("invalid [task.mpp] options: " + "; ".join(problems))


@register_task
class MaskedPatchPredictionTask(Task):
    """The paper's self-supervised pre-training (Section 4.6); the validation loss (mean over
    corrupted patches) picks the best checkpoint."""

    name = "mpp"
    Options = MPPOptions
    best_metric = "loss"
    best_mode = "min"
    needs_labels = False
    metric_names: ClassVar[dict[str, str]] = {
        "accuracy": "accuracy of the corrupted patches' colours",
        "loss": "loss per corrupted patch",
    }

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.model.init_from is not None:
            raise ValueError(
                "masked patch prediction pre-trains a new model (--model); init_from is for "
                "fine-tuning: drop it"
            )
        mixing = [name for name in LABEL_AUGMENTATIONS if getattr(cfg.augment, name)]
        if mixing:
            raise ValueError(
                f"masked patch prediction has no labels to mix or smooth and predicts each "
                f"image's own patches: set {', '.join(mixing)} to 0"
            )
        if cfg.model.patch_dropout:
            raise ValueError(
                "masked patch prediction predicts every corrupted patch from its own token, "
                "which patch dropout would remove: set patch_dropout to 0"
            )
        # TrainConfig requires a registered model without init_from
        assert cfg.model.name is not None
        self.model_name = cfg.model.name
        config = model_config(cfg.model.name)
        if not isinstance(config, ViTConfig):
            raise ValueError(
                f"masked patch prediction corrupts patch embeddings: {cfg.model.name} is a "
                f"{architecture_of(config).name}, not a ViT; choose a vit_* model (see "
                "`vitkit models`; hybrids included)"
            )
        self.wrapper: MaskedPatchPrediction | None = None

    def build_model(self, info: SourceInfo) -> PretrainedModel:
        cfg = self.cfg.model
        size = {"img_size": cfg.img_size} if cfg.img_size else {}
        regularisation = fitted_overrides(ViTConfig, dropout=cfg.dropout, drop_path=cfg.drop_path)
        return create_model(
            self.model_name,
            num_classes=0,
            representation_size=None,
            in_chans=info.channels,
            **size,
            **regularisation,
        )

    def trainable(self, model: nn.Module) -> nn.Module:
        assert isinstance(model, VisionTransformer)  # from ``build_model``
        device = next(model.parameters()).device
        self.wrapper = MaskedPatchPrediction(model, self.options.target, self.options.rate)
        return self.wrapper.to(device)

    def task_state(self, trainable: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in trainable.state_dict().items() if not k.startswith("backbone.")}

    def load_task_state(self, trainable: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        own = self.task_state(trainable)
        if tensors.keys() != own.keys():
            raise ValueError(
                f"the checkpoint's task state holds {sorted(tensors)}, masked patch prediction "
                f"({self.options.target}) needs {sorted(own)}"
            )
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(tensors[name])

    def setup(self, model: nn.Module) -> None:
        cfg: Any = model.cfg
        # No labels: the transform's one-hot targets get one placeholder class, unused.
        self.transform = BatchTransform(
            cfg.img_size, 1, self.cfg.augment, self.cfg.run.seed, channels=cfg.in_chans
        )

    def prepare(self, batch: Batch, seed: int) -> tuple[torch.Tensor, Any]:
        generator = self.transform.generator
        generator.manual_seed(seed)
        placeholder = torch.zeros(len(batch.images), dtype=torch.long)
        inputs, _ = self.transform(
            batch.images,
            placeholder,
            train=True,
            cropped=batch.cropped,
            image_ids=batch.image_ids,
            epoch=batch.epoch,
        )
        return inputs, int(torch.randint(2**62, (), generator=generator))

    def step(self, net: nn.Module, inputs: torch.Tensor, targets: Any) -> StepResult:
        loss, sums, count = net(inputs, torch.Generator().manual_seed(targets))
        return StepResult(loss, sums, count)

    def evaluate(self, model: nn.Module, source: DataSource, process: Process) -> dict[str, Any]:
        """Loss (and accuracy, for colour targets) per corrupted patch over every image of
        ``source``, exact under DDP; the corruption is drawn from the run's seed."""
        means, _ = self._scores(model, source, process)
        return means

    def evaluate_test(
        self, model: nn.Module, source: DataSource, process: Process
    ) -> dict[str, Any]:
        means, images = self._scores(model, source, process)
        return means | {"images": images}

    @torch.no_grad()
    def _scores(
        self, model: nn.Module, source: DataSource, process: Process
    ) -> tuple[dict[str, float], int]:
        """``evaluate``'s metrics and the number of images they were measured on."""
        wrapper = self.wrapper
        if wrapper is None or wrapper.backbone is not model:
            raise ValueError("masked patch prediction evaluates the model it is training")
        cfg: Any = model.cfg
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.cfg.run.seed)
        was_training = wrapper.training
        wrapper.eval()
        totals: dict[str, torch.Tensor] = {}
        count = images = 0
        batches = source.eval_batches(
            self.cfg.evaluators.batch_size, rank=process.rank, world_size=process.world_size
        )
        for batch in batches:
            inputs = preprocess(
                batch.images.to(device),
                cfg.img_size,
                cfg.in_chans,
                EvalPreprocessing.of(cfg),
                prepared=batch.cropped,
            )
            with autocast(device, self.cfg.run.precision):
                _, sums, n = wrapper(inputs, generator)
            for name, value in sums.items():
                totals[name] = totals.get(name, 0) + value.double()
            count += n
            images += len(inputs)
        wrapper.train(was_training)
        names = sorted(totals)
        counts = torch.tensor([float(images), float(count)], dtype=torch.float64, device=device)
        summed = all_reduce_sum(
            torch.cat([torch.stack([totals[n] for n in names]), counts]) if names else counts,
            process,
        )
        means = {name: float(summed[i] / summed[-1]) for i, name in enumerate(names)}
        return means, int(summed[-2])
