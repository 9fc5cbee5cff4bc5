"""The fine-tuning kit's optimizer options: layer-wise learning-rate decay (``--layer-decay``),
frozen parameters (``--freeze``) and fp16 with a gradient scaler (``--precision fp16``).

The expected learning-rate factors are written out by hand from the BEiT/MAE formula (the
embeddings at RATE**(depth+1), block i at RATE**(depth-i), the final norm and head at 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    assert_cut_run_resumes_to,
    interrupted_after_checkpoint,
    perturbed,
    train_config,
)
from vitkit.models import create_model
from vitkit.training import TrainConfig, TrainingInterrupted, train
from vitkit.training.optim import apply_schedule, build_optimizer, build_schedule
from vitkit.training.run import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    steps=6,
    batch_size=32,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
    checkpoint_every=2,
    augment=dict(random_resized_crop=False),
)
config = partial(train_config, TINY)


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    return tiny_digits(128, 32)


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block digits ViT with noise on every weight (a 'pre-trained' start to fine-tune)."""
    torch.manual_seed(0)
    model = perturbed(create_model("vit_digits", depth=2), scale=0.05)
    return model.save_pretrained(tmp_path_factory.mktemp("start") / "start.safetensors")


def lr_ratio_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module, lr: float) -> dict:
    """Each parameter's learning rate in ``optimizer``, over ``lr``, by name."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)]["lr"] / lr for name, p in model.named_parameters()}


def expected_vit_micro_ratios(name: str) -> float:
    """vit_micro (depth 2) at rate 0.5: embeddings 0.5**3, block 0 0.5**2, block 1 0.5."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0.125
    if name.startswith("blocks.0."):
        return 0.25
    if name.startswith("blocks.1."):
        return 0.5
    return 1.0  # norm, head


def test_layer_decay_scales_each_layer_and_keeps_the_weight_decay_split() -> None:
    model = create_model("vit_micro", num_classes=10)
    cfg = TrainConfig().replace(optim=dict(lr=0.01, layer_decay=0.5, weight_decay=0.1))
    optimizer = build_optimizer(model, cfg)
    ratios = lr_ratio_of(optimizer, model, 0.01)
    for name, ratio in ratios.items():
        assert ratio == pytest.approx(expected_vit_micro_ratios(name)), name
    # The schedule's factor applies to every group alike: the ratios hold at any step.
    scheduler = build_schedule(optimizer, 4, 10, "cosine")
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    apply_schedule(scheduler)
    lrs = lr_ratio_of(optimizer, model, 1.0)  # the learning rates themselves
    head = lrs["head.weight"]
    assert 0 < head < 0.01
    assert lrs["blocks.0.mlp.fc1.weight"] / head == pytest.approx(0.25)
    assert lrs["cls_token"] / head == pytest.approx(0.125)
    # No weight decay on biases, norms and tokens, as without layer decay.
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay[id(params["blocks.1.attn.qkv.weight"])] == 0.1
    assert decay[id(params["patch_embed.proj.weight"])] == 0.1
    for name in ("blocks.1.attn.qkv.bias", "norm.weight", "cls_token", "pos_embed.weight"):
        assert decay[id(params[name])] == 0.0, name
    # The first group learns at the scheduled rate (the one metrics.jsonl logs).
    assert optimizer.param_groups[0]["lr"] == pytest.approx(head)


def test_layer_decay_gives_the_hybrids_resnet_the_embeddings_rate() -> None:
    model = create_model("vit_cifar_hybrid_d4")  # 4 blocks
    cfg = TrainConfig().replace(optim=dict(lr=1.0, layer_decay=0.8))
    ratios = lr_ratio_of(build_optimizer(model, cfg), model, 1.0)
    backbone = [n for n in ratios if n.startswith("patch_embed.backbone.")]
    assert backbone
    for name in backbone:
        assert ratios[name] == pytest.approx(0.8**5), name
    assert ratios["blocks.0.attn.qkv.weight"] == pytest.approx(0.8**4)
    assert ratios["blocks.3.mlp.fc2.bias"] == pytest.approx(0.8)
    assert ratios["head.weight"] == ratios["norm.bias"] == 1.0


def test_without_layer_decay_the_two_groups_of_before() -> None:
    model = create_model("vit_micro", num_classes=10)
    for rate in (None, 1.0):
        optimizer = build_optimizer(
            model, TrainConfig().replace(optim=dict(name="adam", layer_decay=rate))
        )
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_layer_decay_and_freeze_n_need_a_vit() -> None:
    model = create_model("resnetv2_digits")
    with pytest.raises(ValueError, match="number the blocks of a ViT"):
        build_optimizer(model, TrainConfig().replace(optim=dict(layer_decay=0.7)))


@pytest.mark.parametrize("value", ["0", "-1", "head", "1.5"])
def test_freeze_refuses_what_it_cannot_mean(value: str) -> None:
    with pytest.raises(ValueError, match="freeze must be 'backbone' or a number"):
        TrainConfig().replace(optim=dict(freeze=value))


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_layer_decay_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="layer_decay must be in"):
        TrainConfig().replace(optim=dict(layer_decay=rate))


def test_the_log_shows_the_factor_of_each_layer(
    tiny_data: Path, start: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vitkit"):
        train(config(tiny_data, tmp_path / "run", steps=1, init_from=str(start), layer_decay=0.5))
    assert "layer decay 0.5: embeddings x0.125, block 0 x0.25, block 1 x0.5, head x1" in (
        caplog.text
    )


def frozen_and_moved(start: Path, run: Path, frozen: Callable[[str], bool]) -> list[str]:
    """The names of the frozen weights that changed from ``start`` (none, if frozen works);
    asserts that some weight that trains did move."""
    before, after = load_file(str(start)), load_file(str(run / "last.safetensors"))
    model_names = [n for n in after if not n.startswith("state/")]
    trained = [n for n in model_names if not frozen(n)]
    assert any(not torch.equal(before[n], after[n]) for n in trained if n in before)
    return [n for n in model_names if frozen(n) and not torch.equal(before[n], after[n])]


def optimizer_state_count(run: Path) -> int:
    """How many parameters have optimizer state (moments) in the run's last checkpoint."""
    return len(RunFolder(run).load_checkpoint().optimizer["state"])


def test_freeze_backbone_keeps_every_weight_but_the_heads(
    tiny_data: Path, start: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    # The head of a fine-tuning run starts at zero; SGD with momentum moves it.
    train(config(tiny_data, run, init_from=str(start), freeze="backbone"))
    assert frozen_and_moved(start, run, lambda n: not n.startswith("head.")) == []
    assert optimizer_state_count(run) == 2  # head.weight, head.bias


def test_freeze_n_with_layer_decay_and_resume(tiny_data: Path, start: Path, tmp_path: Path) -> None:
    settings = dict(init_from=str(start), freeze="1", layer_decay=0.6)

    def frozen(name: str) -> bool:
        return name.startswith(("cls_token", "pos_embed", "patch_embed", "blocks.0."))

    train(config(tiny_data, tmp_path / "whole", **settings))
    assert frozen_and_moved(start, tmp_path / "whole", frozen) == []
    trained = [
        n for n, _ in create_model("vit_digits", depth=2).named_parameters() if not frozen(n)
    ]
    assert optimizer_state_count(tmp_path / "whole") == len(trained)

    # Killed after its second checkpoint and resumed: the same weights as the unbroken run.
    assert_cut_run_resumes_to(tmp_path / "whole", config(tiny_data, tmp_path / "cut", **settings))


def test_freeze_more_blocks_than_the_model_has(
    tiny_data: Path, start: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="--freeze 3: the model has 2 blocks"):
        train(config(tiny_data, tmp_path / "run", init_from=str(start), freeze="3"))


def test_fp16_on_cpu_is_one_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    cfg = config(tiny_data, tmp_path / "run", precision="fp16", device="cpu")
    with pytest.raises(ValueError, match=r"^fp16 needs a CUDA GPU: use --precision bf16 on CPU$"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_grad_scaler_state_rides_in_the_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    """The save and restore path of fp16's scaler, on the CPU: a scaler whose scale and
    growth count moved is saved with a checkpoint and restored into a fresh one."""
    from vitkit.training import loop

    captured: dict[str, torch.amp.GradScaler] = {}

    def scaled_session(*args: object, **kwargs: object) -> loop.Session:
        session = build(*args, **kwargs)
        session.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        if "first" in captured:  # the resumed session: its scaler starts fresh
            captured["resumed"] = session.scaler
            session.restore(*loop.read_latest_checkpoint(session.run, session.process))
        else:
            captured["first"] = session.scaler
        return session

    build = loop.Session.build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.Session, "build", scaled_session)
        with interrupted_after_checkpoint(2), pytest.raises(TrainingInterrupted):
            train(config(tiny_data, tmp_path / "run"))
        saved = RunFolder(tmp_path / "run").checkpoint_counters()["grad_scaler"]
        train(resume=tmp_path / "run")
    # 4 clean steps with growth every 3: the scale doubled once, one step towards the next.
    assert saved["scale"] == 2048.0 and saved["_growth_tracker"] == 1
    assert captured["resumed"].get_scale() == 2048.0 * 2  # and 2 more steps after the resume


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_trains_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    settings = dict(precision="fp16", device="cuda", steps=3, checkpoint_every=1)
    train(config(tiny_data, tmp_path / "whole", **settings))
    with interrupted_after_checkpoint(2), pytest.raises(TrainingInterrupted):
        train(config(tiny_data, tmp_path / "cut", **settings))
    scaler = RunFolder(tmp_path / "cut").checkpoint_counters()["grad_scaler"]
    assert scaler["scale"] > 0
    summary = train(resume=tmp_path / "cut")
    assert summary["steps"] == 3 and summary["precision"] == "fp16"
    whole = load_file(str(tmp_path / "whole/last.safetensors"))
    resumed = load_file(str(tmp_path / "cut/last.safetensors"))
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
