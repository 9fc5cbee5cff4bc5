"""Checkpoints by name, without network: ``hf-hub:`` names read from a Hugging Face cache the
test writes by hand (``HF_HUB_OFFLINE=1``), and URLs served by a local ``http.server``."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from tests.conftest import perturbed, publish_to_hub_cache
from vitkit.checkpoints import CheckpointError, export, load_pretrained, read_checkpoint
from vitkit.checkpoints.mapping import from_vitkit
from vitkit.checkpoints.native import save_safetensors
from vitkit.checkpoints.timm import timm_rules
from vitkit.cli import main
from vitkit.models.preprocessing import RECORD_KEY, EvalPreprocessing
from vitkit.models.vit import VisionTransformer, ViTConfig
from vitkit.training.config import ModelConfig
from vitkit.utils import remote
from vitkit.utils.remote import DownloadError, PretrainedWeights

CLASSES = ["cat", "dog", "fox"]
SQUASH = EvalPreprocessing(mean=0.45, std=0.25)  # a preprocessing other than the default


def tiny_vit(**changes: object) -> VisionTransformer:
    """A random ViT of timm's numerics (exact GELU, eps 1e-6) and timm's ViT-Ti width and
    heads, so the same model can be written in every repository format."""
    cfg = ViTConfig(
        img_size=32,
        patch_size=16,
        num_classes=len(CLASSES),
        width=192,
        depth=1,
        num_heads=3,
        mlp_dim=64,
        gelu="none",
        extra={"classes": CLASSES},
    ).replace(**changes)
    return perturbed(VisionTransformer(cfg)).eval()


def write_timm_hub(model: VisionTransformer, folder: Path, weights: str) -> None:
    """timm's Hub layout as ``push_to_hf_hub`` writes it: plain state dict (no vitkit
    metadata) and a config.json naming the architecture, classes and preprocessing."""
    folder.mkdir(parents=True)
    sd = from_vitkit(timm_rules(model.cfg), model.state_dict(), model.cfg)
    if weights.endswith(".safetensors"):
        save_safetensors(folder / weights, sd, {"format": "pt"})
    else:
        torch.save(sd, folder / weights)
    config = {
        "architecture": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "num_classes": len(CLASSES),
        "num_features": model.cfg.width,
        "label_names": CLASSES,
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "crop_pct": 0.9,
            "num_classes": len(CLASSES),
        },
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Path, str], None]:
    """An offline Hugging Face cache under tmp_path; ``publish(repo_id, folder, ref)`` puts
    ``folder`` in it as that repository's snapshot, ``ref`` (a branch or tag) naming it."""
    cache = tmp_path / "hf" / "hub"
    for variable, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", cache)):
        monkeypatch.setenv(variable, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, on import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, folder: Path, ref: str = "main") -> None:
        publish_to_hub_cache(cache, repo_id, folder, ref)

    return publish


def outputs(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(images)


REPO_FORMATS = ["hf", "vitkit", "timm-hub", "timm-hub-bin"]


def publish_model(
    repo_format: str, publish: Callable[[str, Path, str], None], tmp_path: Path
) -> tuple[VisionTransformer, str]:
    model = tiny_vit(extra={"classes": CLASSES, RECORD_KEY: SQUASH.to_dict()})
    folder = tmp_path / "written" / repo_format
    if repo_format in ("hf", "vitkit"):
        export(model, folder, repo_format)
    else:
        weights = "pytorch_model.bin" if repo_format.endswith("bin") else "model.safetensors"
        write_timm_hub(model, folder, weights)
    repo_id = f"someone/tiny-{repo_format}"
    publish(repo_id, folder, "main")
    return model, repo_id


@pytest.mark.parametrize("repo_format", REPO_FORMATS)
def test_each_repository_format_loads_by_its_hub_name(
    repo_format: str, hub: Callable[[str, Path, str], None], tmp_path: Path
) -> None:
    original, repo_id = publish_model(repo_format, hub, tmp_path)
    loaded = load_pretrained(f"hf-hub:{repo_id}")
    torch.testing.assert_close(outputs(loaded), outputs(original))
    assert loaded.cfg.extra["classes"] == CLASSES
    # the preprocessing of the repository: preprocessor_config.json, timm's pretrained_cfg
    timm = repo_format.startswith("timm-hub")
    expected = EvalPreprocessing("crop", 0.9) if timm else SQUASH
    assert EvalPreprocessing.of(loaded.cfg) == expected
    if repo_format == "vitkit":
        torch.testing.assert_close(
            outputs(vitkit.from_pretrained(f"hf-hub:{repo_id}")), outputs(original)
        )


def test_a_timm_hub_folder_of_a_size_its_name_does_not_give_needs_model(tmp_path: Path) -> None:
    model = tiny_vit()
    folder = tmp_path / "custom"
    write_timm_hub(model, folder, "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "vit_custom"}))
    with pytest.raises(CheckpointError, match="number of attention heads"):
        load_pretrained(folder)
    named = ViTConfig(width=192, num_heads=3, depth=1, mlp_dim=64, gelu="none", eps=1e-6)
    torch.testing.assert_close(outputs(load_pretrained(folder, named)), outputs(model))


def test_a_revision_names_its_ref(hub: Callable[[str, Path, str], None], tmp_path: Path) -> None:
    model = tiny_vit()
    export(model, tmp_path / "v1", "vitkit")
    hub("someone/tagged", tmp_path / "v1", "v1")  # only the tag, no main
    torch.testing.assert_close(outputs(load_pretrained("hf-hub:someone/tagged@v1")), outputs(model))
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        load_pretrained("hf-hub:someone/tagged")


def test_inspect_and_predict_take_a_hub_name(
    hub: Callable[[str, Path, str], None], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, repo_id = publish_model("hf", hub, tmp_path)
    assert main(["inspect", f"hf-hub:{repo_id}"]) == 0
    inspected = capsys.readouterr().out.splitlines()
    assert inspected[0].split() == ["format:", "hf"] and "3 classes" in inspected[1]
    image = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    local = tmp_path / "written" / "hf"

    def predicted(checkpoint: str) -> str:
        assert main(["predict", checkpoint, str(image), "--top-k", "3"]) == 0
        return capsys.readouterr().out.replace(checkpoint, "M")

    by_name = predicted(f"hf-hub:{repo_id}")
    assert by_name == predicted(str(local))
    assert any(name in by_name for name in CLASSES)


def test_a_hub_name_not_in_the_offline_cache_is_one_line_naming_cache_and_variables(
    hub: Callable[[str, Path, str], None], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(DownloadError) as err:
        read_checkpoint("hf-hub:someone/absent")
    message = str(err.value)
    assert "hf-hub:someone/absent" in message and str(tmp_path / "hf" / "hub") in message
    assert "HF_HUB_OFFLINE" in message and "HF_HOME" in message
    assert main(["inspect", "hf-hub:someone/absent"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0]


def test_finetune_starts_from_a_hub_name(
    hub: Callable[[str, Path, str], None], tmp_path: Path
) -> None:
    from vitkit.data.base import SourceInfo
    from vitkit.training import TrainConfig
    from vitkit.training.tasks import build_task

    original, repo_id = publish_model("timm-hub", hub, tmp_path)
    cfg = TrainConfig.from_nested(
        {"model": {"init_from": f"hf-hub:{repo_id}"}, "data": {"source": "x"}}
    )
    fine_tuned = build_task(cfg).build_model(SourceInfo(["a", "b"], 3, 10))
    assert fine_tuned.cfg.extra["classes"] == ["a", "b"]  # a new head for the data's classes
    assert EvalPreprocessing.of(fine_tuned.cfg) == EvalPreprocessing("crop", 0.9)
    for name, weight in original.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(fine_tuned.state_dict()[name], weight)


def test_finetune_from_takes_a_name_that_is_not_a_file() -> None:
    assert ModelConfig(init_from="hf-hub:someone/tiny").problems() == []
    assert ModelConfig(init_from="imagenet21k/ViT-B_16").problems() == []
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig(init_from="no/such/file.npz")


# -------------------------------------------------------------------------------------- URLs


class Files(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes); a path in ``cut`` promises more bytes than it sends."""

    files: ClassVar[dict[str, bytes]] = {}
    cut: ClassVar[set[str]] = set()
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if self.path in self.cut else 0)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet
        pass


class LocalServer:
    """An ``http.server`` on 127.0.0.1 in a thread, serving what ``serve`` gives it."""

    def __init__(self) -> None:
        self.handler = type("Handler", (Files,), {"files": {}, "cut": set(), "requests": []})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.running = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, name: str, body: bytes, cut: bool = False) -> str:
        self.handler.files[f"/{name}"] = body
        if cut:
            self.handler.cut.add(f"/{name}")
        return f"{self.base}/{name}"

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.running = False


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """A local server, and VITKIT_CACHE in tmp_path."""
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    local = LocalServer()
    yield local
    local.stop()


def official_npz(tmp_path: Path) -> tuple[VisionTransformer, bytes]:
    model = tiny_vit(gelu="none", extra={})
    path = export(model, tmp_path / "official.npz", "official")
    return model, path.read_bytes()


def cached_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "weights"
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_url_is_downloaded_once_then_read_from_the_cache_with_the_server_stopped(
    server: LocalServer, tmp_path: Path
) -> None:
    model, body = official_npz(tmp_path)
    url = server.serve("ViT-Tiny.npz", body)
    torch.testing.assert_close(outputs(load_pretrained(url)), outputs(model))
    assert cached_files(tmp_path) == ["ViT-Tiny.npz", "ViT-Tiny.npz.sha256"]
    recorded = next((tmp_path / "cache" / "weights").rglob("*.sha256")).read_text().split()[0]
    assert recorded == hashlib.sha256(body).hexdigest()
    server.stop()  # stop the server: the cached copy needs no network
    torch.testing.assert_close(outputs(load_pretrained(url)), outputs(model))
    assert server.handler.requests == ["/ViT-Tiny.npz"]


def test_the_command_line_draws_the_download_and_the_library_logs_it(
    server: LocalServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, body = official_npz(tmp_path)
    url = server.serve("drawn.npz", body)
    assert main(["inspect", url]) == 0
    assert "drawn.npz: 100%" in capsys.readouterr().err
    url = server.serve("logged.npz", body)
    with caplog.at_level(logging.INFO, logger="vitkit.utils.remote"):
        load_pretrained(url)
    assert capsys.readouterr().err == ""  # no bar outside the command line
    assert f"downloading {url}" in caplog.text


def test_models_pretrained_lists_the_papers_names_with_their_official_urls(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["models", "--pretrained"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    # the URLs of google-research/vision_transformer's README
    bucket = "https://storage.googleapis.com/vit_models"
    assert rows["imagenet21k/ViT-B_16"][1] == "ViT-B_16"  # the bare name is its alias
    assert rows["imagenet21k/ViT-B_16"][-1] == f"{bucket}/imagenet21k/ViT-B_16.npz"
    assert rows["imagenet21k+imagenet2012/ViT-L_16-224"][-1] == (
        f"{bucket}/imagenet21k%2Bimagenet2012/ViT-L_16-224.npz"
    )
    assert {"imagenet21k/ViT-H_14", "imagenet21k/R50+ViT-B_16"} <= set(rows)


def test_a_table_name_downloads_its_url_and_checks_its_checksum(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, body = official_npz(tmp_path)
    url = server.serve("named.npz", body)
    table = {
        "Good": PretrainedWeights(url, "right checksum", hashlib.sha256(body).hexdigest()),
        "Bad": PretrainedWeights(url, "wrong checksum", "0" * 64),
    }
    monkeypatch.setattr(remote, "PRETRAINED", table)
    with pytest.raises(DownloadError, match="SHA-256"):
        load_pretrained("Bad")
    assert cached_files(tmp_path) == []
    torch.testing.assert_close(outputs(load_pretrained("Good")), outputs(model))


def test_a_truncated_download_is_an_error_and_leaves_nothing(
    server: LocalServer, tmp_path: Path
) -> None:
    _, body = official_npz(tmp_path)
    url = server.serve("cut.npz", body, cut=True)
    with pytest.raises(DownloadError, match="cut short"):
        load_pretrained(url)
    assert cached_files(tmp_path) == []
    assert not any((tmp_path / "cache" / "weights").rglob("*tmp*"))


def test_an_unreachable_url_names_what_was_tried_the_cache_and_its_variable(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"{server.base}/gone.npz"
    server.stop()
    with pytest.raises(DownloadError) as err:
        load_pretrained(url)
    message = str(err.value)
    assert url in message and "VITKIT_CACHE" in message and str(tmp_path / "cache") in message
    assert main(["inspect", url]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
