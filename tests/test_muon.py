"""``--optimizer muon``: Muon for the weight matrices of the encoder blocks, AdamW for the rest.

The reference is torch's own pair, built apart by hand on a copy of the model:
``torch.optim.Muon`` (momentum 0.95, ``adjust_lr_fn="match_rms_adamw"``) over the blocks'
attention and MLP kernels, ``torch.optim.AdamW`` over every other parameter, weight decay on
the kernels only.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_cut_run_resumes_to, perturbed, train_config
from vitkit.models import create_model
from vitkit.training import TrainConfig, train
from vitkit.training.loop import muon_stepped
from vitkit.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

# vit_micro has 2 blocks; each has four kernels.
BLOCK_KERNELS = {
    f"blocks.{i}.{layer}.weight"
    for i in range(2)
    for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
}
# The other kernels (weight decay, AdamW): the patch embedding's convolution and the head.
OTHER_KERNELS = {"patch_embed.proj.weight", "head.weight"}

TINY = dict(
    steps=6,
    batch_size=32,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
    checkpoint_every=2,
    optimizer="muon",
    augment=dict(random_resized_crop=False),
)
config = partial(train_config, TINY)


def muon_config(**optim: object) -> TrainConfig:
    return TrainConfig().replace(optim=dict(name="muon", **optim))


def test_muon_steps_the_blocks_kernels_and_adamw_the_rest() -> None:
    model = create_model("vit_micro", num_classes=10)
    optimizer = build_optimizer(model, muon_config())
    muon_params = {id(p) for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in muon_params} == BLOCK_KERNELS
    # Muon's groups come first: the first group's rate is the scheduled one.
    assert [g["muon"] for g in optimizer.param_groups] == [True, False, False]


def test_a_step_is_torchs_muon_and_adamw_side_by_side() -> None:
    torch.manual_seed(0)
    model = perturbed(create_model("vit_micro", num_classes=10))
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = build_optimizer(model, muon_config(lr=0.01, weight_decay=0.1))
    params = dict(reference.named_parameters())
    by_hand = [
        torch.optim.Muon(
            [params[n] for n in sorted(BLOCK_KERNELS)],
            lr=0.01,
            weight_decay=0.1,
            momentum=0.95,
            adjust_lr_fn="match_rms_adamw",
        ),
        torch.optim.AdamW(
            [
                {"params": [params[n] for n in sorted(OTHER_KERNELS)], "weight_decay": 0.1},
                {
                    "params": [
                        p for n, p in params.items() if n not in BLOCK_KERNELS | OTHER_KERNELS
                    ],
                    "weight_decay": 0.0,
                },
            ],
            lr=0.01,
        ),
    ]
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        for net, optimizers in ((model, [optimizer]), (reference, by_hand)):
            F.cross_entropy(net(images), labels).backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    for ours, before in zip(model.parameters(), initial.parameters(), strict=True):
        assert not torch.equal(ours, before)  # every parameter moved


def test_the_state_dict_carries_both_optimizers() -> None:
    torch.manual_seed(0)
    model = perturbed(create_model("vit_micro", num_classes=10))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        F.cross_entropy(net(images), labels).backward()
        opt.step()
        opt.zero_grad()

    optimizer = build_optimizer(model, muon_config())
    step(model, optimizer)
    copied = copy.deepcopy(model)
    reloaded = build_optimizer(copied, muon_config())
    reloaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file
    # Each of the 14 matrices and vectors stepped keeps its buffers: Muon's momentum, Adam's
    # two moments and step.
    assert {len(s) for s in reloaded.state.values()} == {1, 3}
    for group in reloaded.param_groups:  # the schedule's rate reaches the inner optimizers
        group["lr"] *= 0.5
    for group in optimizer.param_groups:
        group["lr"] *= 0.5
    step(model, optimizer)
    step(copied, reloaded)
    for ours, theirs in zip(model.parameters(), copied.parameters(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    return tiny_digits(128, 32)


def test_a_muon_run_resumes_to_the_same_weights(tiny_data: Path, tmp_path: Path) -> None:
    train(config(tiny_data, tmp_path / "whole"))
    assert_cut_run_resumes_to(tmp_path / "whole", config(tiny_data, tmp_path / "cut"))


def test_a_model_without_blocks_is_stepped_by_adamw_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = create_model("resnetv2_digits")
    with caplog.at_level(logging.WARNING):
        optimizer = build_optimizer(model, muon_config())
    assert not any(g["muon"] for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert caplog.text.count("ResNetV2 has none: AdamW steps all its parameters") == 1


def test_resuming_a_model_without_blocks_reads_no_index_and_says_nothing(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The check for an FSDP run from before Muon stepped sharded matrices has nothing to
    check in a ResNet; the optimizer alone says that AdamW steps it (once, not twice)."""
    model = create_model("resnetv2_digits")
    with caplog.at_level(logging.WARNING):
        assert muon_stepped(muon_config(), model, tmp_path / "no-such.dcp", None)
    assert caplog.text == ""
