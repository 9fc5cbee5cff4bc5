"""big_vision's ViT ``.npz`` checkpoints (google-research/big_vision, ``models/vit.py``).

The same model as the official one under Linen module names, with three differences:
- the weights sit under ``params/`` (other top-level entries, e.g. ``opt/``, are dropped);
- ``pos_embedding`` is a top-level array without a [class] slot: big_vision adds it to the
  patches *before* prepending the [class] token ``cls``. vitkit reads it with a zero [class]
  slot, which computes the same (big_vision's ``fix_old_checkpoints`` goes the other way and
  folds an official checkpoint's [class] slot into ``cls``);
- ``posemb="sincos2d"`` models store no position embedding: they become
  ``pos_embed="sincos_2d"`` (the same formula), and need ``model=`` for their image size.
A model without ``cls`` is read as ``pool_type="gap"`` (big_vision's default); MAP-head models
(``MAPHead_0``) are refused, since vitkit has no attention-pooling head.
"""

from __future__ import annotations

from pathlib import Path

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
)
from vitkit.checkpoints.official import FlaxLayout, npz_names, read_flax, read_npz, strip_prefix

PARAMS_PREFIX = "params/"
BIG_VISION = FlaxLayout(
    name="big_vision",
    attention="MultiHeadDotProductAttention_0",
    norm1="LayerNorm_0",
    norm2="LayerNorm_1",
    mlp="MlpBlock_0",
    pos_embedding="pos_embedding",
    pos_has_class_slot=False,
    may_lack_pos_embedding=True,
)


def detect(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    query = f"Transformer/encoderblock_0/{BIG_VISION.attention}/query/kernel"
    return any(n in (query, PARAMS_PREFIX + query) for n in npz_names(path) or [])


def read(path: Path, spec: ModelSpec) -> Checkpoint:
    arrays = strip_prefix(read_npz(path), PARAMS_PREFIX)
    map_head = sorted(k for k in arrays if k.startswith(("MAPHead_0/", "probe")))
    if map_head:
        raise CheckpointError(
            f"{path} is a big_vision ViT with a MAP (attention-pooling) head ({map_head[:3]}...): "
            "vitkit's classifier is 'token' or 'gap', so it cannot load this model"
        )
    return read_flax(arrays, BIG_VISION, spec, path)


FORMAT = CheckpointFormat("big_vision", detect, read)
