"""Hugging Face's ``vit-hybrid`` folders (transformers 4.x ``ViTHybridForImageClassification``)
read as vitkit's hybrid with BiT's numerics.

The reference for the key names is transformers' ``models/vit_hybrid/
convert_vit_hybrid_timm_to_pytorch.py`` (``create_rename_keys``), which renames timm's
``vit_base_r50_s16_384`` into Hugging Face's layout; the table below is its backbone part,
written out from timm's names (``patch_embed.backbone.stem.conv`` ...) to Hugging Face's.
vitkit's own hybrid names the same modules as timm's hybrid does but for the norms (``gn1``
for timm's ``norm1``, ``conv_proj``/``gn_proj`` for ``downsample.conv``/``downsample.norm``).
The numerics: transformers' ``models/bit/modeling_bit.py`` standardises every convolution by
``sqrt(var + 1e-8)`` and normalises with GroupNorm eps 1e-5 (``resnet_numerics="bit"``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import perturbed
from vitkit.checkpoints import CheckpointError, export, load_pretrained, read_checkpoint
from vitkit.checkpoints.native import load_tensors, save_safetensors
from vitkit.models.vit import VisionTransformer, ViTConfig

HF_BIT = "vit.embeddings.patch_embeddings.backbone.bit"
LAYERS = (2, 1)  # two stages: 4 * 2 = 8 times smaller than the image


# The converter's backbone rows, timm's name -> Hugging Face's (regular expressions over them).
CONVERTER_ROWS = [
    (r"^patch_embed\.backbone\.stem\.conv\.", f"{HF_BIT}.embedder.convolution."),
    (r"^patch_embed\.backbone\.stem\.norm\.", f"{HF_BIT}.embedder.norm."),
    (
        r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
        HF_BIT + r".encoder.stages.\1.layers.\2.",
    ),
]
# vitkit's hybrid backbone names -> timm's (the same modules; timm calls the norms norm1..3 and
# the projection downsample.conv / downsample.norm, and numbers units under ``blocks``).
VITKIT_TO_TIMM = [
    (r"\.gn([123])\.", r".norm\1."),
    (r"\.conv_proj\.", ".downsample.conv."),
    (r"\.gn_proj\.", ".downsample.norm."),
    (r"\.stages\.(\d+)\.(\d+)\.", r".stages.\1.blocks.\2."),
]


def hf_name(vitkit_name: str) -> str:
    name = vitkit_name
    for pattern, replacement in [*VITKIT_TO_TIMM, *CONVERTER_ROWS]:
        name = re.sub(pattern, replacement, name)
    return name


def hf_hybrid_folder(model: VisionTransformer, folder: Path) -> None:
    """``model`` written as Hugging Face's vit-hybrid: the transformer part through vitkit's
    writer for a plain ViT of the same sizes, the backbone renamed by the converter's table."""
    cfg = model.cfg
    channels = model.patch_embed.backbone.out_channels
    grid = cfg.grid
    plain = VisionTransformer(
        cfg.replace(resnet_layers=None, img_size=grid, patch_size=1, in_chans=channels)
    )
    own = {k: v for k, v in model.state_dict().items() if ".backbone." not in k}
    plain.load_state_dict(own)
    export(plain, folder, "hf")
    weights = load_tensors(folder / "model.safetensors")
    weights |= {hf_name(k): v for k, v in model.state_dict().items() if ".backbone." in k}
    save_safetensors(folder / "model.safetensors", weights, {"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="vit-hybrid",
        image_size=cfg.img_size[0],
        num_channels=3,
        patch_size=1,
        backbone_config={
            "model_type": "bit",
            "global_padding": "same",
            "layer_type": "bottleneck",
            "depths": list(LAYERS),
            "out_features": [f"stage{len(LAYERS)}"],
            "embedding_dynamic_padding": True,
            "embedding_size": 32,
            "hidden_sizes": [128, 256],
        },
    )
    (folder / "config.json").write_text(json.dumps(config))


def hybrid(numerics: str) -> VisionTransformer:
    cfg = ViTConfig(
        img_size=32,
        patch_size=1,
        resnet_layers=LAYERS,
        resnet_width_factor=0.5,
        resnet_numerics=numerics,  # type: ignore[arg-type]
        num_classes=3,
        width=32,
        depth=1,
        num_heads=2,
        mlp_dim=64,
        extra={"classes": ["a", "b", "c"]},
    )
    torch.manual_seed(0)
    return perturbed(VisionTransformer(cfg), scale=0.1).eval()


def test_a_vit_hybrid_folder_reads_as_the_hybrid_with_bits_numerics(tmp_path: Path) -> None:
    model = hybrid("bit")
    hf_hybrid_folder(model, tmp_path / "hf")
    checkpoint = read_checkpoint(tmp_path / "hf")
    assert checkpoint.format == "hf"
    cfg = checkpoint.config
    assert (cfg.resnet_layers, cfg.resnet_width_factor, cfg.resnet_numerics) == (LAYERS, 0.5, "bit")
    read = load_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(read(images), model(images), rtol=1e-6, atol=1e-6)
        # BiT's epsilons matter: the official code's give other features from the same weights
        official = hybrid("official")
        official.load_state_dict(model.state_dict())
        features = model.patch_embed.backbone(images)
        change = (official.patch_embed.backbone(images) - features).abs().max()
        assert change > 100 * (read.patch_embed.backbone(images) - features).abs().max()


def test_a_bit_hybrid_is_not_written_in_the_official_layout(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="official code's epsilons"):
        export(hybrid("bit"), tmp_path / "m.npz", "official")
    export(hybrid("official"), tmp_path / "m.npz", "official")  # its own numerics: written
