"""The model card (``README.md``) of a folder written for the Hugging Face Hub.

The Hub reads the YAML block at the top of a repo's ``README.md``: the library that loads the
model (``library_name``, which picks the "Use this model" snippet), the task
(``pipeline_tag``), tags, the Hub datasets it was trained on, the model it was fine-tuned from
(``base_model``) and evaluation results (``model-index``). The text below it is for people.

What is known is written, nothing more: a model converted from a run folder (or from a
checkpoint inside one) carries the run's test accuracy from ``summary.json``, named as the test
split of the run's data, and its resolved ``config.json`` in a collapsible block; a lone
checkpoint carries its architecture only. The licence is the user's to choose: the card holds
a commented-out ``license:`` line to fill in.

The YAML is written by hand, each value as JSON (every JSON value is a YAML value), so no
quoting rule of YAML can misread a class name or a path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.models.registry import architecture_of
from vitkit.utils.runlayout import RunLayout, run_setting

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
HUB_PREFIX = "hf-hub:"  # how vitkit names a Hub checkpoint (``--from hf-hub:ORG/NAME``)
DATASET_PREFIX = "hf:"  # how vitkit names a Hub dataset (``--data hf:NAME``)
PAPER = "https://arxiv.org/abs/2010.11929"
# How each folder format is loaded, for the card's usage snippet.
USAGE = {
    "transformers": (
        "```python\nfrom transformers import pipeline\n\n"
        'classify = pipeline("image-classification", model="{repo}")\n'
        'print(classify("image.jpg"))\n```'
    ),
    "timm": (
        '```python\nimport timm\n\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True)\n```'
    ),
    "vitkit": ('```python\nimport vitkit\n\nmodel = vitkit.load_pretrained("hf-hub:{repo}")\n```'),
}


def read_run_json(path: Path) -> dict[str, Any]:
    """A run's JSON file, or {} (with a warning) when it is missing or unreadable: the card is
    then written without what it holds."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning("%s is unreadable (%s): the model card leaves it out", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(name: Any, prefix: str) -> str | None:
    """``ORG/NAME`` of a Hub reference written ``{prefix}ORG/NAME[@REVISION][:CONFIG]``."""
    if not isinstance(name, str) or not name.startswith(prefix):
        return None
    return name.removeprefix(prefix).split("@")[0].split(":")[0] or None


def yaml_block(metadata: dict[str, Any], indent: str = "") -> list[str]:
    """YAML lines for nested dicts and lists of JSON scalars."""
    lines = []
    for key, value in metadata.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *yaml_block(value, indent + "  ")]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{key}:")
            for item in value:
                first, *rest = yaml_block(item, indent + "  ")
                lines += [f"{indent}- {first.lstrip()}", *rest]
        elif isinstance(value, list):
            lines += [f"{indent}{key}:", *(f"{indent}- {json.dumps(v)}" for v in value)]
        else:
            lines.append(f"{indent}{key}: {json.dumps(value)}")
    return lines


def model_name(cfg: Any, config: dict[str, Any]) -> str:
    """The run's registered model name (``vit_digits``), else the architecture's (``vit``)."""
    name = run_setting(config, "model", "name", "model")
    return str(name) if isinstance(name, str) else architecture_of(cfg).name


def card_metadata(
    cfg: Any, library: str, config: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    """The Hub's metadata of a model of config ``cfg`` from a run with ``config`` and
    ``summary`` (either may be {})."""
    classifies = getattr(cfg, "num_classes", 0) > 0
    metadata: dict[str, Any] = {
        "library_name": library,
        "pipeline_tag": "image-classification" if classifies else "image-feature-extraction",
        "tags": [
            "vision-transformer",
            "image-classification" if classifies else "vision",
            "vitkit",
        ],
    }
    source = run_setting(config, "data", "source", "data")
    dataset = hub_id(source, DATASET_PREFIX)
    if dataset:
        metadata["datasets"] = [dataset]
    base = hub_id(run_setting(config, "model", "init_from"), HUB_PREFIX)
    if base:
        metadata["base_model"] = base
    accuracy = summary.get("test_accuracy")
    tta = summary.get("tta", "none")
    accuracy_name = "test accuracy" + (f" ({tta} test-time augmentation)" if tta != "none" else "")
    if isinstance(accuracy, int | float) and source is not None:
        metadata["model-index"] = [
            {
                "name": model_name(cfg, config),
                "results": [
                    {
                        "task": {"type": "image-classification"},
                        "dataset": {
                            "name": str(source),
                            "type": dataset or str(source),
                            "split": "test",
                        },
                        "metrics": [{"type": "accuracy", "value": accuracy, "name": accuracy_name}],
                    }
                ],
            }
        ]
    return metadata


def model_card(cfg: Any, library: str, run: Path | None = None, repo: str | None = None) -> str:
    """The ``README.md`` of a model of config ``cfg`` in a folder loaded by ``library``
    (``transformers``, ``timm`` or ``vitkit``), converted from the run folder ``run`` (None:
    a lone checkpoint); ``repo`` (``ORG/NAME``) completes the usage snippet."""
    layout = RunLayout(run) if run is not None else None
    config = read_run_json(layout.config) if layout else {}
    summary = read_run_json(layout.summary) if layout else {}
    metadata = card_metadata(cfg, library, config, summary)
    source = run_setting(config, "data", "source", "data")
    shape = ", ".join(
        f"{key} {getattr(cfg, key)}"
        for key in ("img_size", "patch_size", "width", "depth", "num_heads", "num_classes")
        if hasattr(cfg, key)
    )
    lines = [
        "---",
        "# license: apache-2.0  # choose the licence of these weights and uncomment this line",
        *yaml_block(metadata),
        "---",
        "",
        f"# {repo or model_name(cfg, config)}",
        "",
        f"A Vision Transformer ([Dosovitskiy et al., ICLR 2021]({PAPER})) written by "
        f"vitkit for {library}.",
        "",
        f"- Architecture: {architecture_of(cfg).name} ({shape})",
        f"- Preprocessing: {EvalPreprocessing.of(cfg).describe()}",
    ]
    classes = (getattr(cfg, "extra", None) or {}).get("classes")
    if isinstance(classes, list) and classes:
        shown = ", ".join(map(str, classes[:20])) + (", ..." if len(classes) > 20 else "")
        lines.append(f"- Classes ({len(classes)}): {shown}")
    if source is not None:
        lines.append(f"- Trained on: {source}")
    init_from = run_setting(config, "model", "init_from")
    if init_from:
        lines.append(f"- Fine-tuned from: {init_from}")
    if "model-index" in metadata:
        lines.append(
            f"- Test accuracy: {summary['test_accuracy']:.4f} on the test split of {source}"
            + (
                f", {summary['tta']} test-time augmentation"
                if summary.get("tta", "none") != "none"
                else ""
            )
        )
    lines += ["", "## Usage", "", USAGE[library].format(repo=repo or "ORG/NAME")]
    if config:
        lines += [
            "",
            "## Training",
            "",
            "<details>",
            "<summary>The resolved training config (<code>config.json</code> of the run)</summary>",
            "",
            "```json",
            json.dumps(config, indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
        ]
    return "\n".join(lines) + "\n"


__all__ = ["CARD_FILE", "model_card"]
