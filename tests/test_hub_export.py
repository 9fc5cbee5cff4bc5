"""Out to the ecosystem: ``convert --to hf`` runs in ``transformers.pipeline`` with a model card,
``convert --to timm`` writes timm's hub folder, ``vitkit push`` uploads to a Hub (a local one)."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import perturbed, train_config
from vitkit import create_model, load_pretrained
from vitkit.checkpoints import export, save_pretrained
from vitkit.checkpoints.model_card import card_metadata
from vitkit.checkpoints.timm import hub_config, timm_architecture
from vitkit.cli import main
from vitkit.models.preprocessing import RECORD_KEY, EvalPreprocessing
from vitkit.models.registry import model_config

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = [f"class {c}" for c in "abcdefghij"]
TINY_RUN = dict(steps=4, batch_size=32, lr=3e-3, warmup_steps=1, log_every=1)


def micro_classifier(preprocessing: EvalPreprocessing) -> torch.nn.Module:
    """A vit_micro with random weights and named classes whose top-1 class varies with the
    image (perturbed: a fresh head is zero)."""
    torch.manual_seed(0)
    extra = {"classes": CLASSES, RECORD_KEY: preprocessing.to_dict()}
    return perturbed(create_model("vit_micro", num_classes=10, extra=extra), scale=0.05).eval()


def smooth_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """PNGs of the given (height, width), smooth (3x3 colours upscaled) so that a class does
    not hang on one pixel of resampling."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i, (height, width) in enumerate(sizes):
        colours = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
        path = folder / f"{i}.png"
        colours.resize((width, height), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def vitkit_top1(checkpoint: Path, images: list[Path], capsys: pytest.CaptureFixture) -> list[str]:
    """The top-1 class of each image by `vitkit predict`."""
    capsys.readouterr()
    assert main(["predict", str(checkpoint), *map(str, images), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.split(": ", 1)[1].rsplit(" ", 1)[0] for line in lines]


def any_sizes(count: int = 30) -> list[tuple[int, int]]:
    rng = np.random.default_rng(1)
    return [(int(h), int(w)) for h, w in rng.integers(24, 80, (count, 2))]


def whole_crop_sizes(count: int = 30) -> list[tuple[int, int]]:
    """Sizes whose centre crop falls on whole pixels both ways: ConvNextImageProcessor rounds
    the resized size and the crop offsets to integers, vitkit's crop box does not (a fraction
    of a pixel, docs/deployment.md). With crop_pct 0.8, 32 / 0.8 = 40 = half of a shorter
    side of 80, and a longer side of a multiple of 4 halves to an even length."""
    rng = np.random.default_rng(1)
    sizes = [(80, 4 * int(n)) for n in rng.integers(20, 40, count)]
    return [size if i % 2 else size[::-1] for i, size in enumerate(sizes)]


@pytest.mark.parametrize(
    ("preprocessing", "sizes"),
    [(EvalPreprocessing(), any_sizes()), (EvalPreprocessing("crop", 0.8), whole_crop_sizes())],
    ids=["squash", "crop"],
)
def test_pipeline_agrees_with_vitkit_predict(
    preprocessing: EvalPreprocessing,
    sizes: list[tuple[int, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    transformers = pytest.importorskip("transformers")
    model = micro_classifier(preprocessing)
    save_pretrained(model, tmp_path / "vitkit")
    assert main(["convert", str(tmp_path / "vitkit"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    images = smooth_images(tmp_path / "images", sizes)

    classify = transformers.pipeline("image-classification", model=str(tmp_path / "hf"))
    theirs = [result[0]["label"] for result in classify([str(p) for p in images])]
    ours = vitkit_top1(tmp_path / "vitkit", images, capsys)

    assert len(set(ours)) >= 3, "the images should not all get one class"
    assert theirs == ours
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert config["label2id"] == {name: i for i, name in enumerate(CLASSES)}


@pytest.fixture(scope="module")
def digits_run(tiny_digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished (few-step) training run on the digits."""
    from vitkit.training import train

    out = tmp_path_factory.mktemp("runs") / "run"
    train(partial(train_config, TINY_RUN)(tiny_digits(200, 60), out))
    return out


@pytest.mark.parametrize("to", ["hf", "timm"])
def test_model_card_of_a_run(to: str, digits_run: Path, tmp_path: Path) -> None:
    """Read by huggingface_hub's own model-card parser, as the Hub reads it."""
    hub = pytest.importorskip("huggingface_hub")
    src = digits_run / "best.safetensors"  # a checkpoint inside the run stands for the run
    if not src.exists():
        src = digits_run / "last.safetensors"
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", to]) == 0

    card = hub.ModelCard.load(tmp_path / "out" / "README.md")
    summary = json.loads((digits_run / "summary.json").read_text())
    assert card.data.library_name == {"hf": "transformers", "timm": "timm"}[to]
    assert card.data.pipeline_tag == "image-classification"
    assert {"vision-transformer", "image-classification", "vitkit"} <= set(card.data.tags)
    assert "license" not in card.data.to_dict()  # the user's choice
    assert "\n# license:" in (tmp_path / "out" / "README.md").read_text()
    (result,) = card.data.eval_results
    assert result.metric_type == "accuracy"
    assert result.metric_value == summary["test_accuracy"]
    assert result.metric_name == "test accuracy"
    run_config = json.loads((digits_run / "config.json").read_text())
    block = card.text.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == run_config
    assert "<details>" in card.text


def test_model_card_names_hub_base_model_and_dataset() -> None:
    config = {
        "model": {"init_from": "hf-hub:google/vit-base-patch16-224@main"},
        "data": {"source": "hf:beans"},
    }
    metadata = card_metadata(model_config("vit_micro"), "transformers", config, {})
    assert metadata["base_model"] == "google/vit-base-patch16-224"
    assert metadata["datasets"] == ["beans"]
    local = card_metadata(model_config("vit_micro"), "transformers", {"data": {"source": "x"}}, {})
    assert "base_model" not in local and "datasets" not in local and "model-index" not in local


def test_a_lone_checkpoint_gets_a_card_without_run_results(tmp_path: Path) -> None:
    hub = pytest.importorskip("huggingface_hub")
    export(micro_classifier(EvalPreprocessing()), tmp_path / "hf", "hf")
    card = hub.ModelCard.load(tmp_path / "hf" / "README.md")
    assert card.data.library_name == "transformers"
    assert not card.data.eval_results
    assert "## Training" not in card.text


# The keyword arguments of timm's VisionTransformer.__init__ that model_args may set (read in
# timm/models/vision_transformer.py).
TIMM_VIT_ARGS = {
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "global_pool",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "class_token",
    "fc_norm",
    "act_layer",
}


@pytest.mark.parametrize("name", ["vit_micro", "vit_digits"])
def test_timm_hub_folder(name: str, tmp_path: Path) -> None:
    """What ``timm.create_model("local-dir:DIR", pretrained=True)`` reads (timm's
    ``_hub.load_model_config_from_path`` / ``_parse_model_cfg`` and ``_builder``):
    ``config.json``'s ``architecture`` (the model name to build), ``model_args`` (keyword
    arguments on top of that model's, all of them VisionTransformer's), ``num_classes`` and
    ``pretrained_cfg`` (a dict replacing the model's: ``input_size`` (C, H, W) gives
    ``in_chans`` and, with ``fixed_input_size``, ``img_size``; ``num_classes``; ``first_conv``
    and ``classifier`` name the layers adapted on loading; ``mean``, ``std``,
    ``interpolation``, ``crop_pct``, ``crop_mode`` the eval transform; ``label_names``), and
    the weights from ``model.safetensors`` in timm's key layout. timm itself cannot be
    imported here (it needs torchvision), so the weights are read back by vitkit's timm
    reader, which reads timm's key layout."""
    extra = {"classes": CLASSES} if name == "vit_micro" else {}
    torch.manual_seed(0)
    model = perturbed(create_model(name, num_classes=10, extra=extra)).eval()
    export(model, tmp_path / "timm", "timm")

    assert {p.name for p in (tmp_path / "timm").iterdir()} == {
        "config.json",
        "model.safetensors",
        "README.md",
    }
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    cfg = model.cfg
    assert config["architecture"] == "vit_base_patch16_224"  # no timm ViT of these sizes
    assert set(config["model_args"]) <= TIMM_VIT_ARGS
    assert config["model_args"]["embed_dim"] == cfg.width
    assert config["model_args"]["depth"] == cfg.depth
    assert config["model_args"]["num_heads"] == cfg.num_heads
    assert config["model_args"]["mlp_ratio"] * cfg.width == cfg.mlp_dim
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [cfg.in_chans, *cfg.img_size]
    assert pretrained["fixed_input_size"] is True
    assert pretrained["num_classes"] == config["num_classes"] == 10
    assert pretrained["mean"] == pretrained["std"] == [0.5] * cfg.in_chans
    assert (pretrained["crop_mode"], pretrained["crop_pct"]) == ("squash", 1.0)
    assert pretrained["interpolation"] == "bilinear"
    assert (pretrained["first_conv"], pretrained["classifier"]) == ("patch_embed.proj", "head")
    assert pretrained.get("label_names") == (CLASSES if extra else None)

    back = load_pretrained(tmp_path / "timm" / "model.safetensors")
    x = torch.randn(2, cfg.in_chans, *cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert back.cfg == cfg


def test_timm_names_its_own_vits_and_records_the_crop() -> None:
    b16 = model_config("vit_b16").replace(gelu="none", mlp_dim=3072)
    assert timm_architecture(b16) == ("vit_base_patch16_224", {})
    s16 = model_config("vit_s16").replace(gelu="none", img_size=384)
    assert timm_architecture(s16) == ("vit_small_patch16_384", {})
    name, args = timm_architecture(model_config("vit_b16_gap").replace(gelu="tanh"))
    assert name == "vit_base_patch16_224"
    assert args == dict(class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")
    crop = EvalPreprocessing("crop", crop_pct=0.9, mean=0.5, std=0.25).to_dict()
    pretrained = hub_config(b16.replace(extra={RECORD_KEY: crop}))["pretrained_cfg"]
    assert isinstance(pretrained, dict)
    assert (pretrained["crop_mode"], pretrained["crop_pct"]) == ("center", 0.9)
    assert pretrained["std"] == [0.25] * 3


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API calls of ``create_repo`` and ``upload_folder``, recorded in ``calls``; every
    file is declared a "regular" upload (inline in the commit, no LFS)."""

    calls: ClassVar[list[tuple[str, str, bytes]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path, b""))
        self.reply(404, {"error": "not served"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.calls.append(("POST", self.path, body))
        here = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.reply(200, {"url": f"{here}/{request['organization']}/{request['name']}"})
        elif self.path == "/api/validate-yaml":
            self.reply(200, {"errors": [], "warnings": []})
        elif "/branch/" in self.path:
            self.reply(200, {})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            self.reply(200, {"files": modes})
        elif "/commit/" in self.path:
            oid = "a" * 40
            commit = {"commitUrl": f"{here}/org/name/commit/{oid}", "commitOid": oid}
            self.reply(200, {**commit, "pullRequestUrl": None})
        else:
            self.reply(404, {"error": "not served"})


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, bytes]]]:
    pytest.importorskip("huggingface_hub")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.calls = []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hub_constants  # read HF_ENDPOINT at import

    monkeypatch.setattr(hub_constants, "ENDPOINT", os.environ["HF_ENDPOINT"])
    yield FakeHub.calls
    server.shutdown()
    server.server_close()


def committed_files(calls: list[tuple[str, str, bytes]], path: str) -> dict[str, bytes]:
    """The files of the one commit to ``path``: huggingface_hub's NDJSON commit payload."""
    (body,) = [body for method, url, body in calls if url == path]
    lines = [json.loads(line) for line in body.decode().splitlines()]
    return {
        line["value"]["path"]: base64.b64decode(line["value"]["content"])
        for line in lines
        if line["key"] == "file"
    }


def test_push_creates_a_private_repo_and_commits_the_folder(
    fake_hub: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_pretrained(micro_classifier(EvalPreprocessing()), tmp_path / "model")
    capsys.readouterr()
    assert main(["push", str(tmp_path / "model"), "org/name"]) == 0
    assert capsys.readouterr().out.strip().endswith("/org/name/commit/" + "a" * 40)

    (create,) = [body for _, url, body in fake_hub if url == "/api/repos/create"]
    request = json.loads(create)
    assert (request["organization"], request["name"]) == ("org", "name")
    assert request.get("visibility") == "private" or request.get("private") is True
    files = committed_files(fake_hub, "/api/models/org/name/commit/main")
    assert set(files) == {
        "config.json",
        "model.safetensors",
        "README.md",
        "preprocessor_config.json",
    }
    assert json.loads(files["config.json"])["id2label"]["0"] == CLASSES[0]
    assert b'model="org/name"' in files["README.md"]


def test_push_public_timm(fake_hub: list, tmp_path: Path) -> None:
    save_pretrained(micro_classifier(EvalPreprocessing()), tmp_path / "model")
    assert main(["push", str(tmp_path / "model"), "org/name", "--public", "--format", "timm"]) == 0
    request = json.loads(next(body for _, url, body in fake_hub if url == "/api/repos/create"))
    assert request.get("visibility") == "public" or request.get("private") is False
    files = committed_files(fake_hub, "/api/models/org/name/commit/main")
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert json.loads(files["config.json"])["architecture"] == "vit_base_patch16_224"


def test_push_vitkit_format_to_a_branch(fake_hub: list, tmp_path: Path) -> None:
    save_pretrained(micro_classifier(EvalPreprocessing()), tmp_path / "model")
    argv = ["push", str(tmp_path / "model"), "org/name", "--format", "vitkit", "--revision", "dev"]
    assert main(argv) == 0
    assert any(url == "/api/models/org/name/branch/dev" for _, url, _ in fake_hub)
    files = committed_files(fake_hub, "/api/models/org/name/commit/dev")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert b'library_name: "vitkit"' in files["README.md"]


def test_a_vitkit_folder_with_a_card_still_loads(tmp_path: Path) -> None:
    model = micro_classifier(EvalPreprocessing())
    export(model, tmp_path / "folder", "vitkit", card=True)
    assert (tmp_path / "folder" / "README.md").is_file()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "folder")(x), model(x))


def test_push_refuses_a_repo_without_owner(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_pretrained(micro_classifier(EvalPreprocessing()), tmp_path / "model")
    assert main(["push", str(tmp_path / "model"), "name-only"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
