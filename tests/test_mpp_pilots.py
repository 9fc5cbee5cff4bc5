"""The MPP pilots (``vitkit.experiments.mpp_pilots``): the patch-token reading of a ViT's
features, the pilots' settings reaching their runs, their refusals, and the pilots in
miniature: continued with one more pilot, only that one trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitkit.experiments import mpp_pilots, runs
from vitkit.experiments.mpp_pilots import PILOTS, MppPilotStudy, PatchTokenMean, run_mpp_pilots
from vitkit.models import create_model
from vitkit.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_patch_mean_reads_the_patch_tokens_without_the_class_token() -> None:
    torch.manual_seed(0)
    model = create_model("vit_digits", num_classes=0).eval()
    reader = PatchTokenMean(model.cfg).eval()
    reader.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + patches, D)
        features = reader.forward_head(reader.forward_features(x), pre_logits=True)
    assert tokens.shape[1] == 1 + (8 // 2) ** 2
    torch.testing.assert_close(features, tokens[:, 1:].mean(dim=1))
    assert not torch.allclose(features, tokens.mean(dim=1))  # the [class] token left out


def test_every_pilot_has_its_own_folder_name() -> None:
    names = [mpp_pilots.slug(p.name) for p in PILOTS]
    assert len(set(names)) == len(PILOTS)
    assert all(name.replace("-", "").isalnum() for name in names), names


def test_the_pilots_refuse_unknown_names_and_empty_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown pilots \['longer'\]: choose from"):
        MppPilotStudy("digits", tmp_path, pilots=("paper", "longer"))
    with pytest.raises(ValueError, match="--epochs and --finetune-epochs must be at least 1"):
        MppPilotStudy("digits", tmp_path, epochs=0)
    with pytest.raises(ValueError, match=r"--label-fraction must be in \(0, 1\]"):
        MppPilotStudy("digits", tmp_path, label_fraction=0)


def test_the_pilots_in_small_continue_with_one_more_pilot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def study(pilots: tuple[str, ...], epochs: int = 1) -> MppPilotStudy:
        return MppPilotStudy(
            "digits", tmp_path, "vit_digits", epochs=epochs, finetune_epochs=1, pilots=pilots,
            batch_size=50, subset=200,
        )  # fmt: skip

    trained: list[str] = []

    def recorded(cfg: TrainConfig, **kwargs: object) -> dict:
        trained.append(str(Path(cfg.run.out).relative_to(tmp_path)))
        return train(cfg, **kwargs)

    monkeypatch.setattr(runs, "train", recorded)
    results = run_mpp_pilots(study(("paper", "4x longer")))
    assert trained == [
        "random-init-finetune",
        "scratch",
        "paper/mpp",
        "paper/finetune",
        "4x-longer/mpp",
        "4x-longer/finetune",
    ]
    # 200 images in batches of 50: 4 steps an epoch; the long pilot takes 4 epochs.
    assert results["rows"]["paper"]["mpp"]["steps"] == 4
    assert results["rows"]["4x longer"]["mpp"]["steps"] == 16
    # 10% of the labels: 2 of each class, one batch of 20 an epoch.
    assert results["labelled_images"] == 20 and results["rows"]["scratch"]["finetune"]["steps"] == 1
    for row in ("random init", "paper", "4x longer"):
        scores = results["rows"][row]["fewshot"]
        assert set(scores) == {"class token", "patch mean"}
        assert all(0.0 <= s[str(n)]["mean"] <= 1.0 for s in scores.values() for n in (10, 25))
    assert json.loads((tmp_path / "results.json").read_text()) == results

    trained.clear()
    scored: list[int] = []
    fewshot = mpp_pilots.fewshot
    monkeypatch.setattr(mpp_pilots, "fewshot", lambda *a: (scored.append(1), fewshot(*a))[1])
    more = run_mpp_pilots(study(("paper", "15% corrupted")))
    assert trained == ["15pc-corrupted/mpp", "15pc-corrupted/finetune"]
    assert len(scored) == 2  # the new pilot's two readings; the others' are read back
    assert more["rows"]["paper"] == results["rows"]["paper"]
    config = json.loads((tmp_path / "15pc-corrupted/mpp/config.json").read_text())
    assert config["task"]["mpp"] == {"target": "mean_colour", "rate": 0.15}
    with pytest.raises(ValueError, match=r"other settings \(epochs: 1 there, 2 now\)"):
        run_mpp_pilots(study(("paper",), epochs=2))
