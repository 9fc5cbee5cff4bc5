"""Plugins (entry point group ``vitkit.plugins``), installed as real distributions: a
``<name>.dist-info`` folder with ``entry_points.txt`` beside the package on a ``sys.path``
folder, which is what pip writes. Every command runs in a fresh process that finds them only
through ``importlib.metadata``: nothing imports the plugins by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from vitkit.data import load_dataset
from vitkit.models.pretrained import ARCHITECTURE_KEY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "deit_plugin" / "vitkit_deit"


def install(site: Path, distribution: str, entry_points: dict[str, str]) -> None:
    """Write the metadata pip would write for ``distribution`` into ``site``."""
    info = site / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text("[vitkit.plugins]\n" + lines)


def run(site: Path, *args: str, cwd: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]),
        "OMP_NUM_THREADS": "1",
        **environment,
    }
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def vitkit(
    site: Path, *args: str, cwd: Path, **environment: str
) -> subprocess.CompletedProcess[str]:
    return run(site, sys.executable, "-m", "vitkit", *args, cwd=cwd, **environment)


@pytest.fixture
def deit_site(tmp_path: Path) -> Path:
    """The example plugin, installed; and a broken plugin beside it."""
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE, site / EXAMPLE.name)
    install(site, "vitkit-deit", {"deit": "vitkit_deit"})
    (site / "broken_plugin.py").write_text("raise RuntimeError('needs a GPU it cannot find')\n")
    install(site, "broken-plugin", {"broken": "broken_plugin"})
    return site


# slow: the plugin's model through the Python API: test_the_plugins_model_is_a_distilled_vit_through_the_python_api; a plugin's registrations: test_a_plugin_registers_tasks_evaluators_and_sources
@pytest.mark.slow
def test_the_example_plugin_works_in_every_command(deit_site: Path, tmp_path: Path) -> None:
    listed = vitkit(deit_site, "models", "--filter", "deit", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "deit_tiny_digits" in listed.stdout
    assert "deit_tiny_distilled_patch16_224" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if "deit_tiny_digits" in line)
    assert row.split()[1] == "deit" and row.split()[-3:] == ["64", "2", "2x2"]
    # The broken plugin costs one warning line that names it and its error.
    warnings = [line for line in listed.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, listed.stderr
    assert "broken" in warnings[0] and "needs a GPU it cannot find" in warnings[0]

    command = ["train", "--model", "deit_tiny_digits", "--data", "digits", "--steps", "2"]
    trained = vitkit(deit_site, *command, "--out", "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    with safe_open(str(tmp_path / "run" / "best.safetensors"), "pt") as best:
        assert best.metadata()[ARCHITECTURE_KEY] == "deit"

    inspected = vitkit(deit_site, "inspect", "run", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert "distillation token" in inspected.stdout and "weights fit:  yes" in inspected.stdout

    converted = vitkit(deit_site, "convert", "run", "converted", "--to", "vitkit", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert '"architecture": "deit"' in (tmp_path / "converted" / "config.json").read_text()

    digit = load_dataset("digits", "test")
    Image.fromarray(digit.images[0, 0].numpy()).save(tmp_path / "digit.png")
    predicted = vitkit(deit_site, "predict", "run", "digit.png", "--top-k", "2", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.startswith("digit.png: ")


def test_a_broken_plugin_costs_one_warning_line_once_under_torchrun(
    deit_site: Path, tmp_path: Path
) -> None:
    for rank, expected in (("0", 1), ("1", 0)):  # torchrun's other ranks stay quiet
        listed = vitkit(deit_site, "models", "--filter", "deit", cwd=tmp_path, RANK=rank)
        assert listed.returncode == 0 and "deit_tiny_digits" in listed.stdout, listed.stderr
        warnings = [line for line in listed.stderr.splitlines() if line.strip()]
        assert len(warnings) == expected, listed.stderr
        assert all("broken" in w and "needs a GPU it cannot find" in w for w in warnings)


def test_the_plugins_model_is_a_distilled_vit_through_the_python_api(deit_site: Path) -> None:
    """Loaded by the registry's first lookup, without being imported by name."""
    script = """
import torch
from vitkit.models import architecture_of, create_model, list_models
model = create_model("deit_tiny_digits").eval()
assert type(model).__name__ == "DeiT" and architecture_of(model).name == "deit"
torch.nn.init.normal_(model.head.weight)
torch.nn.init.normal_(model.head_dist.weight)
images = torch.randn(2, 1, 8, 8)
features = model.forward_features(images)
assert features.shape == (2, 2 + 16, 64), features.shape  # [class], distillation, patches
both = (model.head(features[:, 0]) + model.head_dist(features[:, 1])) / 2
assert torch.allclose(model(images), both)
model.reset_classifier(3)
assert model(images).shape == (2, 3) and model.cfg.distilled and model.head_dist is not None
print("ok")
"""
    done = run(deit_site, sys.executable, "-c", script, cwd=deit_site)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_plugin_registers_tasks_evaluators_and_sources(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "more_kinds.py").write_text(
        """
from vitkit.data.sources import in_memory, load_dataset, register_source
from vitkit.training.evaluators import register_evaluator
from vitkit.training.tasks import Classification, register_task


@register_task
class Quiet(Classification):
    name = "quiet"


@register_task
class Unlabelled(Classification):
    name = "unlabelled"
    needs_labels = False


register_evaluator("nothing", lambda context: None)
register_source(in_memory("alias", lambda data: data == "alias:digits",
                          lambda data, split, **kw: load_dataset("digits", split, **kw)))
"""
    )
    install(site, "more-kinds", {"more": "more_kinds"})
    script = """
from vitkit.data.sources import detect_source, open_splits
from vitkit.training.evaluators import registered_evaluators
from vitkit.training.tasks import registered_tasks
assert "quiet" in registered_tasks() and "mpp" in registered_tasks()
assert "nothing" in registered_evaluators() and "val" in registered_evaluators()
assert detect_source("alias:digits").name == "alias"
print(len(open_splits("alias:digits", 0.0, 0).train))
"""
    done = run(site, sys.executable, "-c", script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(load_dataset("digits", "train"))
    # A task that learns without labels is a `vitkit pretrain --objective`; one with labels not.
    helped = run(site, sys.executable, "-m", "vitkit", "pretrain", "--help", cwd=tmp_path)
    assert "--objective {mpp,unlabelled}" in " ".join(helped.stdout.split()), helped.stdout


def test_built_in_tasks_register_on_lookup_whatever_was_imported() -> None:
    script = """
import sys
from vitkit.training import config, tasks
tasks.TASKS.pop("mpp")
config.TASK_OPTIONS.pop("mpp")
del sys.modules["vitkit.training.mpp_task"]
assert "mpp" in tasks.registered_tasks()
print("ok")
"""
    done = run(ROOT / "src", sys.executable, "-c", script, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
