"""Named models: the sizes of the paper's Table 1 (plus Tiny and Small) as plain data."""

from __future__ import annotations

from typing import Any, TypedDict

from vitkit.models.registry import Architecture, register, register_architecture
from vitkit.models.resnetv2 import RESNETV2_MODELS, ResNetV2, ResNetV2Config
from vitkit.models.small_data import SmallDataViT, SmallDataViTConfig
from vitkit.models.vit import VisionTransformer, ViTConfig


class Size(TypedDict):
    width: int
    depth: int
    num_heads: int
    mlp_dim: int


# width, depth, heads, MLP width (Table 1; Ti and S from DeiT / the official code).
SIZES: dict[str, Size] = {
    "ti": Size(width=192, depth=12, num_heads=3, mlp_dim=768),
    "s": Size(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "b": Size(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "l": Size(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "h": Size(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}
PATCHES: dict[str, tuple[int, ...]] = {
    "ti": (16,),
    "s": (16, 32),
    "b": (8, 16, 32),
    "l": (16, 32),
    "h": (14,),
}

register_architecture(Architecture("vit", ViTConfig, VisionTransformer))  # with the hybrid

for _size, _patches in PATCHES.items():
    for _patch in _patches:
        register(f"vit_{_size}{_patch}", patch_size=_patch, **SIZES[_size])
        register(f"vit_{_size}{_patch}_gap", patch_size=_patch, classifier="gap", **SIZES[_size])
# The hybrid: ResNet-50 with stage 4's units folded into stage 3, 1x1 patches.
for _classifier, _suffix in (("token", ""), ("gap", "_gap")):
    register(
        f"r50_vit_b16{_suffix}",
        patch_size=1,
        resnet_layers=(3, 4, 9),
        classifier=_classifier,
        **SIZES["b"],
    )
# Small models for laptops, tests and the shipped digits.
register("vit_micro", img_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256)
register(
    "vit_digits",
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    width=64,
    depth=4,
    num_heads=4,
    mlp_dim=128,
)
# The training recipes of benchmarks/recipes/: MNIST (7x7 patches) and CIFAR-10 (4x4 patches).
register(
    "vit_mnist",
    img_size=28,
    patch_size=7,
    in_chans=1,
    num_classes=10,
    width=128,
    depth=6,
    num_heads=4,
    mlp_dim=256,
)
_CIFAR: dict[str, Any] = dict(
    img_size=32,
    patch_size=4,
    num_classes=10,
    width=192,
    depth=6,
    num_heads=3,
    mlp_dim=384,
)
register("vit_cifar", **_CIFAR)
# vit_cifar with shifted patch tokenization and locality self-attention (Lee et al. 2021, for
# ViTs trained from scratch on small datasets): still no convolution.
register_architecture(Architecture("vit_small_data", SmallDataViTConfig, SmallDataViT))
register("vit_cifar_sl", architecture="vit_small_data", **_CIFAR)
# Each change alone, for the source paper's ablation: which of the two gives how much.
register("vit_cifar_spt", architecture="vit_small_data", locality_attention=False, **_CIFAR)
register("vit_cifar_lsa", architecture="vit_small_data", shifted_patches=False, **_CIFAR)
# The same encoder behind a miniature of the paper's hybrid: the ResNet stem and one stage of two
# bottleneck units (width 64) give an 8x8 feature map, cut into 1x1 patches, as many tokens as
# vit_cifar's 4x4 patches. On CIFAR-10 it learns much faster per image for 10-20% more time a step.
_CIFAR_HYBRID: dict[str, Any] = dict(
    img_size=32,
    patch_size=1,
    resnet_layers=(2,),
    num_classes=10,
    width=192,
    num_heads=3,
    mlp_dim=384,
)
register("vit_cifar_hybrid", depth=6, **_CIFAR_HYBRID)
# Two encoder blocks fewer: 1.4x the steps in the same minutes, which on CIFAR-10 within an hour
# is worth more than the depth (after 6 minutes: 58.6% validation accuracy against 54.4%).
register("vit_cifar_hybrid_d4", depth=4, **_CIFAR_HYBRID)

# BiT ResNet-v2 baselines (Kolesnikov et al. 2020), the CNNs the paper compares against.
register_architecture(Architecture("resnetv2", ResNetV2Config, ResNetV2))
for _name, _config in RESNETV2_MODELS.items():
    register(_name, architecture="resnetv2", **_config)
