"""Export for deployment: ONNX (onnxruntime and others), ``torch.export`` ``.pt2``, int8 weights;
and a model compiled for inference in this process (``compile_for_inference``).

``export_model(model, path, to)`` writes one of ``DEPLOY_FORMATS``; ``load_deployed`` reads an
ONNX or int8 file back as something ``vitkit eval`` and ``vitkit predict`` can run (a ``.pt2``
is for PyTorch runtimes, read with ``load_pt2``); ``load_for_inference`` reads either kind, or
any checkpoint or run folder, as those commands do, compiled with frozen weights if asked
(``--compile``). onnx, onnxscript, onnxruntime and torchao are
optional (``pip install 'vitkit[onnx]'``) and imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vitkit.checkpoints import load_pretrained
from vitkit.deploy.common import DeployedConfig, MissingDependency
from vitkit.deploy.compiled import CompiledClassifier, compile_for_inference
from vitkit.deploy.int8 import is_int8_file, load_int8, quantize_int8, save_int8
from vitkit.deploy.to_onnx import OnnxClassifier, export_onnx
from vitkit.deploy.to_pt2 import export_pt2, load_pt2
from vitkit.models.pretrained import PretrainedModel
from vitkit.utils.devices import choose_device
from vitkit.utils.runlayout import locate_checkpoint


def export_int8(model: PretrainedModel, path: str | Path) -> Path:
    return save_int8(quantize_int8(model), path)


WRITERS: dict[str, Callable[[PretrainedModel, Path], Path]] = {
    "onnx": export_onnx,
    "pt2": export_pt2,
    "int8": export_int8,
}
DEPLOY_FORMATS = tuple(WRITERS)
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "int8": ".safetensors"}


def export_model(model: PretrainedModel, path: str | Path, to: str) -> Path:
    """Write ``model`` at ``path`` as ``to`` (one of ``DEPLOY_FORMATS``), atomically."""
    path = Path(path)
    if to not in WRITERS:
        raise ValueError(f"unknown deployment format {to!r}; choose one of {DEPLOY_FORMATS}")
    if path.suffix != SUFFIXES[to]:
        raise ValueError(f"--to {to} writes a {SUFFIXES[to]} file; name it so, not {path.name!r}")
    return WRITERS[to](model, path)


def is_deployed(path: str | Path) -> bool:
    """Whether ``path`` is an exported ONNX file or an int8 model (not a checkpoint)."""
    return Path(path).suffix == ".onnx" or is_int8_file(path)


def load_deployed(path: str | Path) -> OnnxClassifier | PretrainedModel:
    """An exported ``.onnx`` (run by onnxruntime on the CPU) or int8 file, ready to call."""
    return OnnxClassifier(path) if Path(path).suffix == ".onnx" else load_int8(path)


def load_for_inference(
    checkpoint: str | Path,
    model: str | None = None,
    device: str = "auto",
    need_head: bool = True,
    compiled: bool = False,
) -> tuple[OnnxClassifier | PretrainedModel | CompiledClassifier, Path | None]:
    """The model of any checkpoint, run folder (its best checkpoint, else its last) or
    exported file, on ``device`` (``choose_device``), with a classification head if
    ``need_head``; and its run folder, if any. ``model`` names the registered model for
    checkpoint formats without an architecture. Without ``need_head`` the caller wants
    features, which an exported file does not give. With ``compiled``, a checkpoint's model
    comes compiled with frozen weights (``compile_for_inference``)."""
    loaded: OnnxClassifier | PretrainedModel
    if is_deployed(checkpoint):  # `vitkit export`'s .onnx (run on the CPU) or int8
        if compiled:
            raise ValueError(
                f"--compile compiles a checkpoint's model; {checkpoint} is an exported model "
                "(`vitkit export`): leave out --compile, or give the checkpoint it was "
                "exported from"
            )
        if not need_head:
            raise ValueError(
                f"{checkpoint} is an exported model (`vitkit export`), which gives class "
                "scores only, not the features this command needs: give the checkpoint it was "
                "exported from"
            )
        loaded, run_folder = load_deployed(checkpoint), None
    else:
        path, run_folder = locate_checkpoint(checkpoint)
        loaded = load_pretrained(path, model)
    if need_head and not loaded.cfg.num_classes:
        raise ValueError(
            f"{checkpoint} has no classification head (num_classes 0): it gives features, "
            "not classes; fine-tune it with `vitkit finetune --from` to classify"
        )
    loaded = loaded.to(choose_device(device))
    if compiled:
        assert isinstance(loaded, PretrainedModel)  # exported files were refused above
        return compile_for_inference(loaded), run_folder
    return loaded, run_folder


@torch.no_grad()
def max_difference(
    reference: PretrainedModel, exported: nn.Module, batches: tuple[int, ...]
) -> float:
    """Largest |logit difference| between two models on random inputs of each batch size."""
    worst = 0.0
    for batch in batches:
        x = torch.rand(batch, reference.cfg.in_chans, *reference.cfg.img_size) * 2 - 1
        diff = (exported(x) - reference.eval()(x)).abs().max()
        worst = max(worst, float(diff))
    return worst


__all__ = [
    "DEPLOY_FORMATS",
    "CompiledClassifier",
    "DeployedConfig",
    "MissingDependency",
    "OnnxClassifier",
    "compile_for_inference",
    "export_model",
    "export_onnx",
    "export_pt2",
    "is_deployed",
    "load_deployed",
    "load_for_inference",
    "load_int8",
    "load_pt2",
    "max_difference",
    "quantize_int8",
    "save_int8",
]
