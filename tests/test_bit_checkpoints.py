"""BiT ResNet-v2 checkpoints: timm's state dicts and BiT's ``.npz``, read back to equal outputs.

timm is not installed here, so the reference forward is written below with
``torch.nn.functional`` from the BiT paper's definition (pre-activation units, weight
standardisation, GroupNorm) and reads timm's parameter names: the state dict and the ``.npz``
are both built by the test from the same arrays, independently of the readers' rule tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.conftest import perturbed
from vitkit.checkpoints import bigvision, bit, official, timm
from vitkit.checkpoints.core import Checkpoint, CheckpointError
from vitkit.models.resnetv2 import ResNetV2, ResNetV2Config
from vitkit.models.vit import VisionTransformer, ViTConfig

BUNDLED_VIT_NPZ = Path(__file__).parent / "fixtures" / "official_vit" / "vit_micro_token.npz"
LAYERS = (1, 2)
CFG = ResNetV2Config(img_size=32, num_classes=10, layers=LAYERS, width_factor=0.5)


def tiny_model(**overrides: object) -> ResNetV2:
    # noise everywhere: no zero head, no unit GroupNorm scales
    return perturbed(ResNetV2(CFG.replace(**overrides)), scale=0.05).eval()


def timm_state_dict(model: ResNetV2) -> dict[str, torch.Tensor]:
    """timm's names: ``downsample.conv``, and ``head.fc``, a 1x1 convolution."""
    sd = {}
    for key, value in model.state_dict().items():
        key = key.replace(".downsample.", ".downsample.conv.").replace("head.", "head.fc.")
        sd[key] = value[:, :, None, None] if key == "head.fc.weight" else value
    return {k: v.clone() for k, v in sd.items()}


def bit_arrays(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """big_transfer's names for timm's tensors; kernels HWIO, as its ``tf2th`` undoes."""

    def hwio(t: torch.Tensor) -> np.ndarray:
        return t.permute(2, 3, 1, 0).numpy()

    a = {"resnet/root_block/standardized_conv2d/kernel": hwio(sd["stem.conv.weight"])}
    for s, units in enumerate(LAYERS):
        for u in range(units):
            src, dst = f"stages.{s}.blocks.{u}.", f"resnet/block{s + 1}/unit{u + 1:02d}/"
            for i, part in enumerate("abc", start=1):
                a[f"{dst}{part}/group_norm/gamma"] = sd[f"{src}norm{i}.weight"].numpy()
                a[f"{dst}{part}/group_norm/beta"] = sd[f"{src}norm{i}.bias"].numpy()
                a[f"{dst}{part}/standardized_conv2d/kernel"] = hwio(sd[f"{src}conv{i}.weight"])
            if f"{src}downsample.conv.weight" in sd:
                a[f"{dst}a/proj/standardized_conv2d/kernel"] = hwio(
                    sd[f"{src}downsample.conv.weight"]
                )
    a["resnet/group_norm/gamma"] = sd["norm.weight"].numpy()
    a["resnet/group_norm/beta"] = sd["norm.bias"].numpy()
    a["resnet/head/conv2d/kernel"] = hwio(sd["head.fc.weight"])
    a["resnet/head/conv2d/bias"] = sd["head.fc.bias"].numpy()
    return a


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, ws_eps: float) -> torch.Tensor:
    """BiT's ResNet-v2 on timm's names, from the paper's definitions."""

    def conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1) -> torch.Tensor:
        centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
        var = centred.square().mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(
            x, centred / torch.sqrt(var + ws_eps), stride=stride, padding=w.shape[-1] // 2
        )

    def gn_relu(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.relu(F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5))

    x = conv(x, sd["stem.conv.weight"], stride=2)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=0.0), 3, stride=2)  # BiT pads with zeros
    for s, units in enumerate(LAYERS):
        for u in range(units):
            p, stride = f"stages.{s}.blocks.{u}.", 2 if s > 0 and u == 0 else 1
            pre = gn_relu(x, p + "norm1")
            proj = sd.get(p + "downsample.conv.weight")
            shortcut = x if proj is None else conv(pre, proj, stride)  # from the pre-activation
            y = conv(pre, sd[p + "conv1.weight"])
            y = conv(gn_relu(y, p + "norm2"), sd[p + "conv2.weight"], stride)
            y = conv(gn_relu(y, p + "norm3"), sd[p + "conv3.weight"])
            x = y + shortcut
    pooled = gn_relu(x, "norm").mean(dim=(2, 3))
    return pooled @ sd["head.fc.weight"].flatten(1).T + sd["head.fc.bias"]


def loaded(ckpt: Checkpoint) -> ResNetV2:
    model = ResNetV2(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_gives_timm_outputs(tmp_path: Path, suffix: str) -> None:
    model = tiny_model()
    sd = timm_state_dict(model)
    path = tmp_path / f"resnetv2_bit{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    assert bit.detect_timm(path) and not timm.detect(path)
    ckpt = bit.read_timm(path, CFG)
    assert ckpt.format == "timm_resnetv2" and ckpt.config == CFG  # eps 1e-8: timm's
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = loaded(ckpt)(x)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        torch.testing.assert_close(out, reference_forward(sd, x, ws_eps=1e-8), rtol=0, atol=1e-6)


def test_bit_npz_gives_bit_outputs(tmp_path: Path) -> None:
    model = tiny_model()
    sd = timm_state_dict(model)
    path = tmp_path / "BiT-M-R-tiny.npz"
    np.savez(path, **bit_arrays(sd), **{"global_step": np.array(7)})
    assert bit.detect_bit(path) and not official.detect(path) and not bigvision.detect(path)
    ckpt = bit.read_bit(path, None)
    assert ckpt.format == "bit" and ckpt.dropped == ["global_step"]
    assert ckpt.config == CFG.replace(img_size=224, ws_eps=1e-10)  # BiT's own eps
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference_forward(sd, x, ws_eps=1e-10)
        torch.testing.assert_close(loaded(ckpt)(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.npz"])
def test_writers_round_trip_exactly(tmp_path: Path, name: str) -> None:
    model = tiny_model(stem="conv3x3", num_classes=0, extra={"classes": None})
    path = tmp_path / name
    (bit.write_bit if name.endswith(".npz") else bit.write_timm)(model, path)
    read = bit.read_bit if name.endswith(".npz") else bit.read_timm
    ckpt = read(path, None)
    # A state dict records no stem type or image size: the safetensors and .npz files that
    # vitkit writes carry its config, a .pt file gets them inferred (kernel 3: conv3x3).
    assert ckpt.config.stem == "conv3x3" and ckpt.config.num_classes == 0
    if not name.endswith(".pt"):
        assert ckpt.config == model.cfg
    assert ckpt.state_dict.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key


def test_detectors_keep_to_their_own_files(tmp_path: Path) -> None:
    assert not bit.detect_bit(BUNDLED_VIT_NPZ) and official.detect(BUNDLED_VIT_NPZ)
    vit_path = tmp_path / "vit.safetensors"
    timm.write(
        VisionTransformer(
            ViTConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
        ),
        vit_path,
    )
    assert timm.detect(vit_path) and not bit.detect_timm(vit_path)


def test_batchnorm_resnetv2_and_vit_spec_are_refused(tmp_path: Path) -> None:
    sd = timm_state_dict(tiny_model())
    path = tmp_path / "resnetv2_50.pth"
    torch.save({**sd, "norm.running_mean": torch.zeros(256)}, path)
    with pytest.raises(CheckpointError, match="BatchNorm"):
        bit.read_timm(path, None)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="holds a BiT ResNet-v2"):
        bit.read_timm(path, ViTConfig())


def test_unexpected_and_missing_arrays_are_errors(tmp_path: Path) -> None:
    arrays = bit_arrays(timm_state_dict(tiny_model()))
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays, **{"resnet/block1/unit01/a/extra": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected arrays"):
        bit.read_bit(path, None)
    del arrays["resnet/block2/unit02/b/group_norm/beta"]
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="missing keys"):
        bit.read_bit(path, None)
