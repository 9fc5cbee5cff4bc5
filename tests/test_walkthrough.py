"""docs/walkthrough.md runs as written, block after block in one folder: a Hub model by name
(a small stand-in under the same name in a Hugging Face cache the test writes, offline), a
fine-tune on a folder like a user's photos watched in TensorBoard, an evaluation, an ONNX
export and a `transformers` pipeline on the converted model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import perturbed, publish_to_hub_cache
from tests.test_docs import REPO, read_blocks
from vitkit.checkpoints import export
from vitkit.models.vit import VisionTransformer, ViTConfig

PAGE = REPO / "docs" / "walkthrough.md"
PHOTO_TOOL = REPO.parent / "shared" / "tools" / "make_photo_folder.py"
IMAGENETTE = (
    Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data")) / "imagenette2-224"
)
SKIPPED = "starts a server"  # the one block that cannot run: TensorBoard's server


def stand_in(folder: Path) -> None:
    """A small ViT at the real model's input (224 px, patches of 16), in Hugging Face's
    format, where google/vit-base-patch16-224 would be."""
    cfg = ViTConfig(
        img_size=224, patch_size=16, num_classes=5, width=32, depth=2, num_heads=2, mlp_dim=64
    )
    torch.manual_seed(0)
    export(perturbed(VisionTransformer(cfg)), folder, "hf")


# slow: decodes phone-size photos and fine-tunes for three epochs (about a minute);
# the parts are tested on their own in test_remote_weights, test_hub_export and the kit's tests
@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    if not PHOTO_TOOL.is_file() or not IMAGENETTE.is_dir():
        pytest.skip(f"needs {PHOTO_TOOL} and Imagenette in {IMAGENETTE} (set VITKIT_DATA)")
    work = tmp_path / "work"
    work.mkdir()
    photos = [sys.executable, str(PHOTO_TOOL), str(work / "photos"), "--per-class", "10"]
    subprocess.run([*photos, "--classes", "3", "--src", str(IMAGENETTE / "train")], check=True)
    stand_in(tmp_path / "stand-in")
    cache = tmp_path / "hf" / "hub"
    publish_to_hub_cache(cache, "google/vit-base-patch16-224", tmp_path / "stand-in")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO / "src"),
        "VITKIT_CACHE": str(tmp_path / "vitkit-cache"),
    }
    blocks = read_blocks(PAGE)
    assert sum(SKIPPED in b.reason for b in blocks) == 1  # the rest all runs
    for block in blocks:
        if SKIPPED in block.reason:
            continue
        command = ["bash", "-euc", block.code]
        if block.language == "python":
            command = [sys.executable, "-c", block.code]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{block.name}:\n{done.stdout}\n{done.stderr}"

    run = work / "runs" / "photos"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] is not None
    assert (run / "skipped_files.txt").read_text().count("\n") >= 3  # the broken files, listed
    assert any((run / "tensorboard").iterdir())
    assert json.loads((work / "eval.json").read_text())
    assert (work / "model.onnx").stat().st_size > 0
    assert json.loads((work / "hf-model" / "config.json").read_text())["id2label"]
