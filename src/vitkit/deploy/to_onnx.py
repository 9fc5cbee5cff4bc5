"""ONNX export through ``torch.onnx.export(..., dynamo=True)`` and an onnxruntime wrapper.

The file holds the whole model (weights inline, so under ONNX's 2 GB protobuf limit: up to
ViT-L) with a dynamic batch dimension, and the model's config in its ``metadata_props``, so
``OnnxClassifier`` and any other ONNX runtime know the input size and class names.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.deploy.common import (
    CONFIG_KEY,
    DeployedConfig,
    check_input,
    config_json,
    example_input,
    import_optional,
    input_description,
    quiet,
)
from vitkit.models.pretrained import PretrainedModel
from vitkit.utils.files import atomic_write

logger = logging.getLogger(__name__)

MISSING_RUNTIME = "running an ONNX model needs onnxruntime: pip install 'vitkit[onnx]'"
MISSING_EXPORTER = "ONNX export needs onnx and onnxscript: pip install 'vitkit[onnx]'"
# The exporter's own chatter: a line per deduplicated initializer ("Replaced initializer"),
# per constant it does not fold, per rewrite pass; nothing a user of the file can act on.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")
# Warnings raised from inside these packages, and deprecation notes from anywhere, are about
# the libraries' internals (tracing details, APIs they call), not about the model.
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
EXPORTER_MODULES = re.compile(r"[/\\](torch|onnx|onnx_ir|onnxscript)[/\\]")


def report_warnings(caught: list[warnings.WarningMessage]) -> None:
    """The warnings of an export, each once and on one line: deprecations and those raised
    inside the exporter (``EXPORTER_MODULES``) at debug level, any other as a warning."""
    seen: set[str] = set()
    for warning in caught:
        text = " ".join(str(warning.message).split())
        if text in seen:
            continue
        seen.add(text)
        internal = issubclass(warning.category, DEPRECATIONS) or bool(
            EXPORTER_MODULES.search(warning.filename)
        )
        logger.log(logging.DEBUG if internal else logging.WARNING, "ONNX export: %s", text)


def export_onnx(
    model: PretrainedModel,
    path: str | Path,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Path:
    """Write ``model`` (in eval mode) as an ONNX file taking ``x`` of shape (batch, C, H, W).

    ``dynamic_batch=False`` fixes the batch at 1, for runtimes that want static shapes.
    """
    import_optional("onnxscript", MISSING_EXPORTER)
    path = Path(path)
    model = model.eval()
    x = example_input(model, 2 if dynamic_batch else 1)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    with torch.no_grad(), quiet(*EXPORTER_LOGGERS), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.onnx.export(
            model, (x,), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, **kwargs
        )
    report_warnings(caught)
    assert program is not None  # export returns the program when not given a file to write
    program.model.metadata_props[CONFIG_KEY] = config_json(model)
    program.model.metadata_props["vitkit_input"] = input_description(model)
    # Weights inline: external data would be named after the temporary file and lost on rename.
    atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
    logger.info("wrote %s", path)
    return path


class OnnxClassifier(nn.Module):
    """An exported ONNX model run by onnxruntime (CPU), called like a vitkit model.

    ``model(x)`` takes float images (B, C, H, W) in [-1, 1] and returns logits (B, classes) as a
    torch tensor; ``cfg`` has ``img_size``, ``in_chans``, ``num_classes`` and ``extra``, read from
    the file's metadata. It is an ``nn.Module`` so that ``evaluate`` and ``predict`` use it as
    they use a PyTorch model: ``eval()``, and a (zero-size, CPU) parameter telling them which
    device to put the inputs on.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        ort = import_optional("onnxruntime", MISSING_RUNTIME)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist")
        options = ort.SessionOptions()
        # onnxruntime otherwise starts a thread per core, ignoring what torch was told to use.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Its threads also spin for a while after each call, waiting for the next one: on few
        # cores they then hold back the PyTorch work in between (decoding, resizing; measured:
        # a PyTorch ViT-Ti/16 call just after an onnxruntime one ran 2x slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"{path} is not an ONNX model onnxruntime can run ({err})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in metadata:
            raise ValueError(
                f"{path} has no vitkit config in its metadata; export it with `vitkit export`"
            )
        self.cfg = DeployedConfig.from_json(metadata[CONFIG_KEY], str(path))
        self.input_name = self.session.get_inputs()[0].name
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.cfg)
        inputs = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        (logits,) = self.session.run(None, inputs)
        return torch.from_numpy(logits).to(x.device)
