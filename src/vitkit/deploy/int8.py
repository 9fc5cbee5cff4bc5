"""int8 weights: dynamic int8 quantisation of every linear layer through torchao.

``Int8DynamicActivationInt8WeightConfig``: each ``nn.Linear`` weight becomes int8 with one scale
per output row; activations are quantised per token at run time, and the matrix products run
in int8. Convolutions (the patch embedding, the hybrid's ResNet), LayerNorms and embeddings stay
fp32. torchao installs against the pinned torch, so PyTorch's older ``torch.ao.quantization``
path (deprecated) is not used.

Saved as one ``.safetensors`` file, with no pickle anywhere: torchao's safetensors helpers split
each quantised weight into plain tensors (``*._weight_qdata`` int8, ``*._weight_scale``) plus a
JSON description checked against an allow-list of torchao tensor types on load; the model's
config is under the metadata key ``INT8_KEY`` (not vitkit's ``vitkit_config``, so
``load_pretrained`` does not mistake the file for an fp32 checkpoint).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vitkit.checkpoints.native import DEFAULT_ARCHITECTURE, load_tensors, read_metadata
from vitkit.deploy.common import config_json, import_optional, quiet
from vitkit.models.pretrained import ARCHITECTURE_KEY, PretrainedModel, save_safetensors
from vitkit.models.registry import architecture_of, get_architecture

logger = logging.getLogger(__name__)

INT8_KEY = "vitkit_int8_config"
METHOD_KEY = "vitkit_quantization"
METHOD = "torchao Int8DynamicActivationInt8WeightConfig (nn.Linear weights)"
# torchao's flattening splits names at their last dot; top-level names (cls_token) have none.
PREFIX = "model."
MISSING = "int8 quantisation needs torchao: pip install 'vitkit[onnx]'"


def _torchao() -> SimpleNamespace:
    """What vitkit uses of torchao, imported quietly: its wheel also ships CUDA-only kernels
    that fail to load (and say so) on a CPU build of torch, which the int8 CPU path does not
    use, and its modules warn about torch internals."""
    with quiet("torchao", "torch.utils._pytree"):
        import_optional("torchao", MISSING)
        from torchao.prototype.safetensors import safetensors_support as st
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    return SimpleNamespace(
        quantize_=quantize_,
        config=Int8DynamicActivationInt8WeightConfig,
        flatten=st.flatten_tensor_state_dict,
        unflatten=st.unflatten_tensor_state_dict,
    )


def quantize_int8(model: PretrainedModel) -> PretrainedModel:
    """A copy of ``model`` (in eval mode) whose linear layers compute in int8."""
    torchao = _torchao()
    quantized = copy.deepcopy(model).eval()
    torchao.quantize_(quantized, torchao.config())
    return quantized


def save_int8(model: PretrainedModel, path: str | Path) -> Path:
    """Write a model from ``quantize_int8`` as one ``.safetensors`` file (atomically)."""
    torchao = _torchao()
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an int8 model is saved as a .safetensors file, not {path.name!r}")
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    tensors, metadata = torchao.flatten(state)
    metadata[INT8_KEY] = config_json(model)
    metadata[ARCHITECTURE_KEY] = architecture_of(model).name
    metadata[METHOD_KEY] = f"{METHOD}, torchao {importlib.metadata.version('torchao')}"
    save_safetensors(path, tensors, metadata)
    logger.info("wrote %s", path)
    return path


def is_int8_file(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file() and INT8_KEY in read_metadata(path)


def load_int8(path: str | Path) -> PretrainedModel:
    """Read back what ``save_int8`` wrote: the same int8 weights, in eval mode."""
    torchao = _torchao()
    path = Path(path)
    metadata = read_metadata(path)
    try:
        architecture = get_architecture(metadata.get(ARCHITECTURE_KEY, DEFAULT_ARCHITECTURE))
        config = architecture.config_class.from_dict(json.loads(metadata[INT8_KEY]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: its int8 config is missing or invalid ({err})") from None
    state, leftover = torchao.unflatten(load_tensors(path), metadata)
    if leftover:
        raise ValueError(
            f"{path}: tensors torchao's metadata does not describe: {sorted(leftover)}"
        )
    model = architecture.build(config)
    weights: dict[str, Any] = {k.removeprefix(PREFIX): v for k, v in state.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)
