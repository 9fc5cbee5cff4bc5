"""Layering: imports flow one way, cli -> experiments -> (training, deploy, analysis) ->
evaluation -> (checkpoints, data) -> models -> utils, and analysis and training never import each
other; moved modules leave their names behind; the checkpoint formats are tried in one written
order; the shared utilities at the bottom (atomic writes, the run-folder layout)."""

from __future__ import annotations

import ast
import importlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import vitkit
from tests.conftest import perturbed, train_config
from vitkit.analysis.inputs import locate_checkpoint, read_run
from vitkit.checkpoints import FORMATS, export, load_pretrained, native, read_checkpoint
from vitkit.training import train
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout

SRC = Path(vitkit.__file__).parent
# Each package's layer: a module may import its own package and packages of lower layers only.
LAYERS = {
    "utils": 0,
    "models": 1,
    "checkpoints": 2,
    "data": 2,
    "evaluation": 3,
    "training": 4,
    "deploy": 4,
    "analysis": 4,
    "experiments": 5,
    "cli": 6,
}
TOP = ("vitkit", "vitkit.__main__")  # the public facade and ``python -m``: above everything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every vitkit module ``source`` imports, anywhere (functions included): (line, name)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found += [(node.lineno, base)]
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "vitkit"]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    if module in TOP:
        return []
    own = module.split(".")[1] if "." in module else module
    problems = []
    for line, name in imported_modules(source, module, is_package):
        parts = name.split(".")
        if len(parts) == 1 or name in TOP:
            problems.append(f"{module}:{line} imports the vitkit facade ({name})")
            continue
        target = parts[1]
        if target not in LAYERS:  # an imported name, e.g. ``from vitkit import models``
            continue
        if target != own and LAYERS[target] >= LAYERS[own]:
            problems.append(f"{module}:{line} ({own}) imports {name} ({target})")
    return sorted(set(problems))


def test_no_module_imports_against_the_layer_order() -> None:
    problems = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    for path in files:
        module = module_name(path)
        problems += violations(path.read_text(), module, path.name == "__init__.py")
    assert problems == []


def package_imports(package: str) -> set[str]:
    """The vitkit packages that the modules of ``package`` import."""
    found = set()
    for path in sorted((SRC / package).rglob("*.py")):
        module = module_name(path)
        for _, name in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            found.add(name.split(".")[1] if "." in name else name)
    return found


@pytest.mark.parametrize(("package", "other"), [("analysis", "training"), ("training", "analysis")])
def test_analysis_and_training_never_import_each_other(package: str, other: str) -> None:
    """Analysis reads run folders through ``vitkit.utils.runlayout``, not the training code;
    training writes them without the analysis code. What needs both is an experiment."""
    assert other not in package_imports(package)


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS)


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("vitkit.models.vit", "def f():\n    from vitkit.checkpoints.native import x\n", True),
        ("vitkit.data.readers", "from vitkit.checkpoints.native import atomic_write\n", True),
        ("vitkit.training.run", "import vitkit.analysis.report\n", True),
        ("vitkit.models.vit", "from ..checkpoints import native\n", True),
        ("vitkit.utils.files", "def f():\n    if True:\n        import vitkit.models\n", True),
        ("vitkit.models.vit", "import vitkit\n", True),
        ("vitkit.models.vit", "from vitkit.utils.files import atomic_write\n", False),
        ("vitkit.training.run", "from vitkit.checkpoints.native import read\n", False),
        ("vitkit.models.vit", "from .layers import Block\n", False),
        ("vitkit.cli.train", "from vitkit.analysis import analyze\n", False),
        ("vitkit.analysis.scaling", "from vitkit.training import train\n", True),
        ("vitkit.analysis.report", "from vitkit.deploy import load_deployed\n", True),
        ("vitkit.evaluation.inference", "from vitkit.training.distributed import P\n", True),
        ("vitkit.experiments.scaling", "from vitkit.training import train\n", False),
        ("vitkit.experiments.scaling", "from vitkit.analysis.scaling import rows\n", False),
        ("vitkit.training.loop", "from vitkit.experiments import scaling\n", True),
        ("vitkit.experiments.scaling", "from vitkit.cli.train import progress_bar\n", True),
    ],
)
def test_the_checker_sees_imports_anywhere(module: str, source: str, bad: bool) -> None:
    assert bool(violations(source, module)) == bad


# ------------------------------------------------------------------ moved modules


def test_inference_moved_to_evaluation_and_its_old_module_still_gives_its_names() -> None:
    from vitkit.evaluation import inference

    with pytest.warns(DeprecationWarning, match="moved to vitkit.evaluation.inference.evaluate"):
        from vitkit.training.evaluate import evaluate
    assert evaluate is inference.evaluate
    # The package's own name is the function, although the module was imported.
    assert vitkit.training.evaluate is inference.evaluate
    with pytest.raises(AttributeError, match="no_such_name"):
        importlib.import_module("vitkit.training.evaluate").no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("vitkit.training.loop:claim_run_folder", "vitkit.training.run:claim_run_folder"),
        ("vitkit.training.loop:default_out", "vitkit.training.run:default_out"),
        ("vitkit.data.readers:list_image_folder", "vitkit.data.folders:list_image_folder"),
        ("vitkit.data.readers:read_unlabelled", "vitkit.data.folders:read_unlabelled"),
        ("vitkit.data.readers:FolderListing", "vitkit.data.folders:FolderListing"),
        ("vitkit.evaluation.features:eval_transform", "vitkit.evaluation.inference:eval_transform"),
        ("vitkit.analysis.inputs:locate_checkpoint", "vitkit.utils.runlayout:locate_checkpoint"),
        ("vitkit.training.distributed:choose_device", "vitkit.utils.devices:choose_device"),
    ],
)
def test_a_moved_name_imports_from_its_old_module(old: str, new: str) -> None:
    def find(where: str) -> object:
        module, name = where.split(":")
        return getattr(importlib.import_module(module), name)

    assert find(old) is find(new)


# ------------------------------------------------------------------ checkpoint format order


# A model written by each exporter, and the format whose reader must read it back. Where a
# later format claims the file too, only the order of FORMATS sends it to the right reader:
# vitkit's one file is a .safetensors state dict like timm's, and its folder has a config.json
# like Hugging Face's.
WRITTEN = [
    ("vit_micro", "vitkit", "m.safetensors", "vitkit", "timm"),
    ("vit_micro", "vitkit", "m", "vitkit", "hf"),
    ("vit_micro", "hf", "m", "hf", None),
    ("vit_micro", "official", "m.npz", "official", None),
    ("vit_micro", "timm", "m.safetensors", "timm", None),
    ("resnetv2_digits", "bit", "m.npz", "bit", None),
    ("resnetv2_digits", "timm", "m.safetensors", "timm_resnetv2", None),
]


@pytest.mark.parametrize(
    "model, to, name, reader, also_claimed_by",
    WRITTEN,
    ids=[f"{model}-{to}-{name}" for model, to, name, *_ in WRITTEN],
)
def test_each_format_is_read_by_its_own_reader_where_another_claims_it_too(
    model: str, to: str, name: str, reader: str, also_claimed_by: str | None, tmp_path: Path
) -> None:
    original = perturbed(vitkit.create_model(model)).eval()
    path = export(original, tmp_path / name, to)
    claims = [f.name for f in FORMATS if f.detect(path)]
    assert claims[0] == reader
    assert also_claimed_by is None or also_claimed_by in claims
    assert read_checkpoint(path, model).format == reader
    loaded = load_pretrained(path, model).eval()
    images = torch.randn(2, original.cfg.in_chans, *original.cfg.img_size)
    torch.testing.assert_close(loaded(images), original(images))


# -------------------------------------------------------------------------- shared utilities


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.txt"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]  # no temporary left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600


def test_a_run_writes_the_files_its_layout_names_and_the_readers_find_them(
    tiny_digits: Callable[[int, int], Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert not RunLayout(out).holds_run()
    settings = dict(epochs=1, batch_size=32, val_fraction=0.25, log_every=1)
    summary = train(train_config(settings, tiny_digits(64, 32), out))

    layout = RunLayout(out)
    written = [layout.config, layout.metrics, layout.last, layout.best, layout.curves]
    assert all(path.is_file() for path in [*written, layout.summary])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in [*written, layout.summary]
    )
    assert layout.holds_run() and layout.checkpoint() == layout.best
    # what reads a run folder finds the run's files through the layout
    run = read_run(out)
    assert run.notes == [] and run.summary == summary and run.config
    assert locate_checkpoint(out) == (layout.best, out)
    found, best = read_checkpoint(out).state_dict, read_checkpoint(layout.best).state_dict
    assert found.keys() == best.keys() and all(torch.equal(found[k], best[k]) for k in best)


def test_save_pretrained_records_the_architecture(tmp_path: Path) -> None:
    model = vitkit.create_model("vit_micro")
    folder = model.save_pretrained(tmp_path / "m")
    assert '"architecture": "vit"' in (folder / "config.json").read_text()
    file = model.save_pretrained(tmp_path / "m.safetensors")
    assert native.read_metadata(file)["vitkit_architecture"] == "vit"
    assert torch.equal(vitkit.from_pretrained(file).cls_token, model.cls_token)
