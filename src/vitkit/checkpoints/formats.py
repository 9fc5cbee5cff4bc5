"""The checkpoint formats vitkit reads, in the one order they are tried: ``FORMATS``.

vitkit's own comes first: its folder also has a config.json like a Hugging Face folder, and
its one-file shape is a ``.safetensors`` file like timm's; it is recognised by its metadata.
Its sharded training checkpoints (``last.dcp/`` folders of FSDP runs) are recognised by
``vitkit.json`` beside torch.distributed.checkpoint's ``.metadata``.
The others do not overlap: Hugging Face folders (config.json), official, big_vision and BiT
``.npz`` files (told apart by their module names), timm ResNet-v2 state dicts (told by their
stem) and timm ViT state dicts (any other ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``
file). A plugin adds a format of its own with ``register_format``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitkit.checkpoints import bigvision, bit, hf, native, official, sharded, timm
from vitkit.checkpoints.core import (
    IMG_SIZE_HINT,
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
    build_model,
    check_named_model,
)
from vitkit.models.pretrained import PretrainedModel
from vitkit.utils.plugins import ensure_loaded
from vitkit.utils.remote import resolve_checkpoint
from vitkit.utils.runlayout import RunLayout

FORMATS: list[CheckpointFormat] = [
    native.FORMAT,
    sharded.FORMAT,  # a torch.distributed.checkpoint folder with vitkit.json
    timm.HUB_FORMAT,  # before Hugging Face's folders: its config.json names a timm architecture
    hf.FORMAT,
    official.FORMAT,
    bigvision.FORMAT,
    bit.BIT_FORMAT,
    bit.TIMM_FORMAT,  # before timm's ViT reader, which would take any state dict
    timm.FORMAT,
]


def register_format(fmt: CheckpointFormat, *, before: str | None = timm.FORMAT.name) -> None:
    """Add a checkpoint format, tried before the format named ``before`` (by default before
    timm's ViT state dicts, which take any state dict; None: last)."""
    if any(known.name == fmt.name for known in FORMATS):
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    names = [known.name for known in FORMATS]
    FORMATS.insert(names.index(before) if before in names else len(FORMATS), fmt)


def read_checkpoint(path: str | Path, model: ModelSpec = None) -> Checkpoint:
    """Recognise the format of ``path`` and read it, without building a model.

    A run folder (``vitkit train`` / ``finetune`` / ``pretrain --out``) stands for its best
    checkpoint, else its last: pre-training and then fine-tuning takes the run folder as it is.
    ``path`` may also name weights to fetch (``hf-hub:ORG/NAME``, a URL, a name of
    ``vitkit.utils.remote.PRETRAINED``): they are read from the cache they are fetched into.

    ``model`` (a registered name or a config) fills in what the format does not record (the
    number of heads of a timm state dict, the image size of a fixed position embedding)."""
    path = resolve_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    run = RunLayout(path)
    if path.is_dir() and run.holds_run():
        checkpoint = run.checkpoint()
        if checkpoint is not None:
            path = checkpoint
        elif run.metrics.is_file():
            raise CheckpointError(
                f"{path} is a run folder without a checkpoint yet: neither {run.best.name} "
                f"nor {run.last.name} was written"
            )
    ensure_loaded()  # the plugins' formats
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt.read(path, model)
    names = ", ".join(f.name for f in FORMATS)
    raise CheckpointError(f"{path} is not a checkpoint format vitkit knows ({names})")


def load_pretrained(path: str | Path, model: ModelSpec = None, **overrides: Any) -> PretrainedModel:
    """Load any checkpoint vitkit reads into a model of its registered architecture.

    ``model`` names a registered model or passes a config, for formats that do not record
    the whole architecture; a *name* that describes another model than the checkpoint holds
    is refused (``check_named_model``), rather than silently ignored. See ``build_model`` for
    the overrides.
    """
    token = IMG_SIZE_HINT.set(overrides.get("img_size"))
    try:
        checkpoint = read_checkpoint(path, model)
    finally:
        IMG_SIZE_HINT.reset(token)
    if isinstance(model, str):
        check_named_model(Path(path), model, checkpoint.config)
    return build_model(checkpoint, **overrides)


__all__ = ["FORMATS", "load_pretrained", "read_checkpoint", "register_format"]
