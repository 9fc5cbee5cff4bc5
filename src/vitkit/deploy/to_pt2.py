"""``torch.export`` programs saved as ``.pt2`` (for PyTorch runtimes: AOTInductor, ExecuTorch).

The config is stored beside the program as the extra file ``vitkit_config.json``. A ``.pt2``
can hold pickled objects that ``torch.export.load`` unpickles: load only files you trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vitkit.deploy.common import CONFIG_KEY, DeployedConfig, config_json, example_input
from vitkit.models.pretrained import PretrainedModel
from vitkit.utils.files import atomic_write

logger = logging.getLogger(__name__)

CONFIG_FILE = f"{CONFIG_KEY}.json"


def export_pt2(model: PretrainedModel, path: str | Path, dynamic_batch: bool = True) -> Path:
    """Export ``model`` (in eval mode) with ``torch.export`` and save it at ``path``."""
    path = Path(path)
    model = model.eval()
    x = example_input(model, 2 if dynamic_batch else 1)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    extra = {CONFIG_FILE: config_json(model)}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: save() wants a .pt2 name otherwise
            torch.export.save(program, f, extra_files=extra)

    atomic_write(path, write)
    logger.info("wrote %s", path)
    return path


def load_pt2(path: str | Path) -> tuple[nn.Module, DeployedConfig]:
    """The saved program as a callable module, and the config stored with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".pt2 file {path} does not exist")
    extra = {CONFIG_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), DeployedConfig.from_json(extra[CONFIG_FILE], str(path))
