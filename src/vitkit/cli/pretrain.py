"""``vitkit pretrain``: self-supervised pre-training through the training loop.

``--objective mpp`` is the paper's masked patch prediction (Section 4.6) with its recipe
(Adam 2e-4, a warm-up, cosine decay: the preset ``pretrain``). Every other option is ``vitkit
train``'s, generated from the same config, and the run folder is a training run's: resume it
with ``vitkit train --resume DIR`` and fine-tune its checkpoint with ``vitkit finetune --from
DIR/best.safetensors`` (the prediction head stays behind in the training state).
"""

from __future__ import annotations

import argparse

from vitkit.cli.train import add_config_flags, run_train
from vitkit.training.tasks import registered_tasks


def objectives() -> list[str]:
    """The registered tasks that learn without labels (a plugin's included)."""
    return sorted(name for name, task in registered_tasks().items() if not task.needs_labels)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pre-train a ViT without labels (masked patch prediction)",
        description="Self-supervised pre-training of a registered ViT (hybrids included) by "
        "masked patch prediction, as the paper's Section 4.6: 50% of the patch embeddings "
        "corrupted (80% a learnable [mask] embedding, 10% another patch, 10% unchanged), "
        "each corrupted patch predicting its 3-bit mean colour (or its 4x4 downsized colours, "
        "or its pixels). The data may be a folder of images without class folders. Adam 2e-4, "
        "warm-up, cosine decay; resume with `vitkit train --resume DIR`.",
    )
    parser.add_argument(
        "--objective",
        dest="task.name",
        choices=objectives(),
        default=argparse.SUPPRESS,
        help="the self-supervised task: 'mpp', masked patch prediction, or a plugin's task "
        "that needs no labels (default: mpp)",
    )
    add_config_flags(parser, ("pretrain",), hidden=frozenset({"task"}))
    parser.set_defaults(func=run_train, presets=("pretrain",))
