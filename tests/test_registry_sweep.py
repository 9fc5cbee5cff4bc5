"""Guards for the whole registry, as timm's model sweep does.

Every registered model, parametrised from ``list_models()`` so a newly registered one is swept
without touching this file: at a reduced size it gives finite outputs of the right shape, every
parameter receives a gradient, and a save -> load round trip gives bit-equal outputs. Every paper
model must appear in the parameter-count table below, whose numbers come from outside vitkit: the
counts published by the official code and timm, else a closed form written here by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import vitkit
from tests.conftest import perturbed
from vitkit import ViTConfig
from vitkit.models.resnetv2 import ResNetV2Config
from vitkit.models.small_data import SmallDataViTConfig

# ------------------------------------------------------------------------------ the sweep


pytestmark = pytest.mark.usefixtures("one_thread")


def reduced(name: str) -> dict[str, Any]:
    """Overrides that shrink the registered model ``name`` to test size.

    Kept (see ``KEPT``): classifier ([class] token or GAP), position-embedding kind, patch
    size, input channels, the hybrid's ResNet stages, numerics; the representation layer is
    kept but shrunk. Shrunk: two blocks; 8 channels per head (so the head count still divides
    the width and the 2-D embeddings' width/2 and width/4 splits stay whole); a 2x2 token grid
    (each side twice the patch size times the backbone's reduction, the smallest multiple that
    still gives every patch neighbours to attend to); half the ResNet width (GroupNorm's 32
    groups still fit); 3 classes (or none, for a features-only model).
    """
    cfg = vitkit.model_config(name)
    if isinstance(cfg, ResNetV2Config):
        # One unit per stage (the stage count kept), the narrowest width GroupNorm's 32 groups
        # allow, and an image that leaves a 2x2 map after every downsampling.
        stem_reduction = 4 if cfg.stem == "bit" else 1
        side = 2 * stem_reduction * 2 ** (len(cfg.layers) - 1)
        return dict(
            layers=(1,) * len(cfg.layers),
            width_factor=0.5,
            img_size=side,
            num_classes=3 if cfg.num_classes else 0,
        )
    if not isinstance(cfg, ViTConfig):
        pytest.fail(f"{name}: no reduced size for {type(cfg).__name__}; add one to reduced()")
    width = 8 * cfg.num_heads
    overrides: dict[str, Any] = dict(
        depth=min(cfg.depth, 2),
        width=width,
        mlp_dim=2 * width,
        num_classes=3 if cfg.num_classes else 0,
        img_size=tuple(2 * p * cfg.backbone_reduction for p in cfg.patch_size),
    )
    if cfg.representation_size:
        overrides["representation_size"] = width
    if cfg.resnet_layers is not None:
        overrides["resnet_width_factor"] = min(cfg.resnet_width_factor, 0.5)
    return overrides


KEPT = {
    ViTConfig: (
        "classifier",
        "pos_embed",
        "patch_size",
        "in_chans",
        "resnet_layers",
        "gelu",
        "eps",
    ),
    ResNetV2Config: ("stem", "in_chans", "ws_eps", "norm_eps"),
}
KEPT[SmallDataViTConfig] = (*KEPT[ViTConfig], "shifted_patches", "locality_attention")


def output_width(cfg: Any) -> int:
    """What the model returns per image: logits, else its pre-logits features."""
    if cfg.num_classes:
        return cfg.num_classes
    if isinstance(cfg, ResNetV2Config):
        return int(64 * cfg.width_factor * 2 ** (len(cfg.layers) + 1))
    return cfg.representation_size or cfg.width


@pytest.mark.parametrize("name", vitkit.list_models())
def test_full_size_shapes_on_the_meta_device(name: str) -> None:
    """The registered model at its own size, without allocating its weights."""
    cfg = vitkit.model_config(name)
    with torch.device("meta"):
        out = vitkit.create_model(name)(torch.empty(2, cfg.in_chans, *cfg.img_size))
    assert out.shape == (2, output_width(cfg))


@pytest.mark.parametrize("name", vitkit.list_models())
def test_every_registered_model_at_a_reduced_size(name: str, tmp_path: Path) -> None:
    model = vitkit.create_model(name, **reduced(name))
    cfg, registered = model.cfg, vitkit.model_config(name)
    if isinstance(cfg, ViTConfig):
        assert cfg.grid == (2, 2)
    kept = KEPT[type(cfg)]
    assert {k: getattr(cfg, k) for k in kept} == {k: getattr(registered, k) for k in kept}
    # Noise on every parameter first. At initialisation the head is zero, so the logits do not
    # depend on the encoder and every encoder gradient is exactly zero; the hybrid's last
    # GroupNorm scale in each residual unit is zero too, blocking its convolutions. Noise
    # removes both without naming modules, and makes the round trip below compare non-trivial
    # logits (a zero head gives zero logits from any weights).
    model = perturbed(model).train()
    x = torch.randn(2, cfg.in_chans, *cfg.img_size)
    out = model(x)
    assert out.shape == (2, output_width(cfg))
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, f"{param_name} is not used by the forward pass"
        assert torch.isfinite(p.grad).all(), f"{param_name} has a non-finite gradient"
        assert p.grad.abs().max() > 0, f"{param_name} receives no gradient"

    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(model.forward_head(model.forward_features(x)), expected)
    model.save_pretrained(tmp_path / "folder")
    vitkit.save_pretrained(model, tmp_path / "file.safetensors")
    for loaded in (
        vitkit.from_pretrained(tmp_path / "folder"),
        vitkit.load_pretrained(tmp_path / "file.safetensors"),
    ):
        assert loaded.cfg.to_dict() == model.cfg.to_dict()
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), expected)


# ------------------------------------------------------------------ official parameter counts

# google-research/vision_transformer, vit_jax/models_test.py, MODEL_SIZES (commit c6de1e5):
# the official code's own test asserts these for 224 px inputs and 1,000 classes.
OFFICIAL_COUNTS = {
    "vit_ti16": 5_717_416,  # ViT-Ti_16
    "vit_s16": 22_050_664,  # ViT-S_16
    "vit_s16_gap": 22_049_896,  # ViT-S_16-gap-norep
    "vit_s32": 22_878_952,  # ViT-S_32
    "vit_s32_gap": 22_878_184,  # ViT-S_32-gap-norep
    "vit_b8": 86_576_872,  # ViT-B_8
    "vit_b16": 86_567_656,  # ViT-B_16
    "vit_b16_gap": 86_566_120,  # ViT-B_16-gap-norep
    "vit_b32": 88_224_232,  # ViT-B_32
    "vit_b32_gap": 88_222_696,  # ViT-B_32-gap-norep
    "vit_l16": 304_326_632,  # ViT-L_16
    "vit_l32": 306_535_400,  # ViT-L_32
    "vit_h14": 632_045_800,  # ViT-H_14
    "r50_vit_b16": 98_659_112,  # R50+ViT-B_16
}

# timm (huggingface/pytorch-image-models), results/benchmark-infer-amp-nchw-pt240-cu124-
# rtx3090.csv, column param_count, in millions to 2 decimals (commit aa4b585), with the class
# count of timm's default weights: its L/32, H/14 and R50+B/16 at 224 px are the ImageNet-21k
# checkpoints, published without a head (0 classes).
TIMM_MILLIONS = {
    "vit_ti16": (5.72, 1000),  # vit_tiny_patch16_224
    "vit_s16": (22.05, 1000),  # vit_small_patch16_224
    "vit_s32": (22.88, 1000),  # vit_small_patch32_224
    "vit_b8": (86.58, 1000),  # vit_base_patch8_224
    "vit_b16": (86.57, 1000),  # vit_base_patch16_224
    "vit_b32": (88.22, 1000),  # vit_base_patch32_224
    "vit_l16": (304.33, 1000),  # vit_large_patch16_224
    "vit_l32": (305.51, 0),  # vit_large_patch32_224
    "vit_h14": (630.76, 0),  # vit_huge_patch14_224
    "r50_vit_b16": (97.89, 0),  # vit_base_r50_s16_224
}

# The paper's Table 1 (Ti and S from DeiT and the official configs): width, depth, MLP width.
TABLE_1 = {
    "ti": (192, 12, 768),
    "s": (384, 12, 1536),
    "b": (768, 12, 3072),
    "l": (1024, 24, 4096),
    "h": (1280, 32, 5120),
}
R50_STAGES = (3, 4, 9)  # the hybrid's ResNet-50 with stage 4 folded into stage 3


def resnet_count(stages: tuple[int, ...], width: int = 64, in_chans: int = 3) -> int:
    """Parameters of the hybrid's ResNet (no biases in its convolutions, GroupNorm scale+bias).

    Stem: 7x7 conv from the image to ``width`` channels and a GroupNorm. Stage s (width
    w = width * 2^s) is bottleneck units 1x1 (c_in -> w), 3x3 (w -> w), 1x1 (w -> 4w), each
    followed by a GroupNorm; the first unit of a stage adds a 1x1 projection c_in -> 4w with
    its GroupNorm.
    """
    total = 7 * 7 * in_chans * width + 2 * width
    c_in = width
    for s, units in enumerate(stages):
        w = width * 2**s
        for u in range(units):
            total += c_in * w + 9 * w * w + w * 4 * w + 2 * (w + w + 4 * w)
            if u == 0:
                total += c_in * 4 * w + 2 * 4 * w
            c_in = 4 * w
    return total


def vit_count(
    width: int,
    depth: int,
    mlp: int,
    patch: int,
    token: bool = True,
    resnet: tuple[int, ...] | None = None,
    img: int = 224,
    classes: int = 1000,
    in_chans: int = 3,
) -> int:
    """Parameters of a ViT, from its architecture alone.

    - patch embedding: a PxP convolution from the image channels (or, for the hybrid, the
      ResNet's 4 * 64 * 2^(stages-1) output channels with P = 1) to D, plus D biases;
      the hybrid adds ``resnet_count``;
    - [class] token: D (only with the token classifier);
    - position embedding: D per token, N = (img / (P * reduction))^2 patches plus the [class]
      slot, where the ResNet's reduction is 4 * 2^(stages-1) (1 without a ResNet);
    - per block: two LayerNorms (4D), query/key/value (3D^2 + 3D), output projection
      (D^2 + D), MLP (D*M + M + M*D + D);
    - final LayerNorm (2D) and the head (D*K + K).
    """
    d = width
    c_in, reduction, backbone = in_chans, 1, 0
    if resnet is not None:
        c_in, reduction = 4 * 64 * 2 ** (len(resnet) - 1), 4 * 2 ** (len(resnet) - 1)
        backbone = resnet_count(resnet, in_chans=in_chans)
    patches = (img // (patch * reduction)) ** 2
    embed = backbone + patch * patch * c_in * d + d + token * d + (patches + token) * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp + mlp * d + d)
    head = d * classes + classes if classes else 0
    return embed + depth * block + 2 * d + head


def paper_count(name: str, classes: int = 1000) -> int:
    """``vit_count`` of a paper model, its architecture read from the name and Table 1."""
    match = re.fullmatch(r"(?:(r50)_)?vit_(ti|s|b|l|h)(\d+)(_gap)?", name)
    assert match, name
    r50, size, patch, gap = match.groups()
    width, depth, mlp = TABLE_1[size]
    return vit_count(
        width,
        depth,
        mlp,
        1 if r50 else int(patch),
        token=not gap,
        resnet=R50_STAGES if r50 else None,
        classes=classes,
    )


# Paper models without a published count: the closed form above. Listed by name, so a new
# paper model has to be added here (or to OFFICIAL_COUNTS) on purpose.
HAND_COUNTED = (
    "vit_ti16_gap",
    "vit_b8_gap",
    "vit_l16_gap",
    "vit_l32_gap",
    "vit_h14_gap",
    "r50_vit_b16_gap",
)
PARAMETER_COUNTS = {**OFFICIAL_COUNTS, **{name: paper_count(name) for name in HAND_COUNTED}}
PAPER_FAMILY = re.compile(r"vit_(ti|s|b|l|h)(8|14|16|32)(_gap)?|r50_vit_.*")


def count_on_meta(name: str, num_classes: int = 1000) -> int:
    """Parameters of ``name`` at 224 px, counted without allocating its weights."""
    with torch.device("meta"):
        model = vitkit.create_model(name, img_size=224, num_classes=num_classes)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    return total


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_the_table(name: str) -> None:
    assert count_on_meta(name) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", sorted(TIMM_MILLIONS))
def test_parameter_count_matches_timm(name: str) -> None:
    millions, classes = TIMM_MILLIONS[name]
    assert round(count_on_meta(name, classes) / 1e6, 2) == millions


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_closed_form_reproduces_every_published_count(name: str) -> None:
    """The hand count is trusted for the unpublished models only because it gets these right."""
    assert paper_count(name) == OFFICIAL_COUNTS[name]
    if name in TIMM_MILLIONS:
        millions, classes = TIMM_MILLIONS[name]
        assert round(paper_count(name, classes) / 1e6, 2) == millions


def test_every_paper_model_has_an_official_count() -> None:
    paper = {name for name in vitkit.list_models() if PAPER_FAMILY.fullmatch(name)}
    missing = sorted(paper - set(PARAMETER_COUNTS))
    assert not missing, (
        f"paper models without a parameter count: {missing}; add the official count to "
        "OFFICIAL_COUNTS, or the name to HAND_COUNTED when none is published"
    )
    assert set(PARAMETER_COUNTS) <= paper, "a counted model is no longer registered"
