"""``compile_for_inference`` and ``vitkit eval / predict --compile``: ``torch.compile`` with frozen
weights computes what the eager model computes (the reference), at any batch size, and really
freezes the weights (a compiled graph that read them at each call would see them change)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import perturbed
from vitkit.cli import main
from vitkit.data import load_dataset
from vitkit.deploy import CompiledClassifier, compile_for_inference
from vitkit.models import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, gelu="none")


def tiny_model(**config: object) -> VisionTransformer:
    model = VisionTransformer(
        **{**TINY, "img_size": 16, "patch_size": 4, "num_classes": 5, **config}
    )
    return perturbed(model, scale=0.5).eval()  # a random head: logits that are not all 0


def test_compiled_model_computes_what_eager_does_then_keeps_its_weights() -> None:
    model = tiny_model()
    compiled = compile_for_inference(model)
    # Three batch sizes, the first compiled, the others through the same dynamic graph.
    for batch in (4, 1, 7):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # the eager model now shifts every logit by 1
        moved = model(x)
    torch.testing.assert_close(moved, expected + 1.0, rtol=1e-4, atol=1e-5)
    # Frozen: the compiled graph holds the weights it was compiled with.
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


def test_compiled_model_cannot_train_and_keeps_the_models_config() -> None:
    model = tiny_model()
    compiled = CompiledClassifier(model)  # nothing is compiled before the first call
    assert compiled.cfg is model.cfg
    assert not compiled.eval().training
    with pytest.raises(ValueError, match=r"cannot train: train its \.model"):
        compiled.train()
    assert list(compiled.state_dict()) == [f"model.{key}" for key in model.state_dict()]


def test_compile_without_a_compiler_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler .* Leave out --compile"):
        compile_for_inference(tiny_model())


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 8x8 grey-scale model of the 10 digits, in vitkit's format."""
    classes = [str(d) for d in range(10)]
    model = tiny_model(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, extra={"classes": classes}
    )
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "digits.safetensors")


def test_eval_and_predict_print_the_same_with_compile(
    digits_checkpoint: Path,
    tiny_digits: Callable[[int, int], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    data = tiny_digits(0, 70)  # a last batch of 6 after one of 64: two batch sizes
    image = tmp_path / "digit.png"
    Image.fromarray(load_dataset("digits", "test").images[0, 0].numpy()).save(image)
    for command in (
        ["eval", str(digits_checkpoint), "--data", str(data), "--batch-size", "64"],
        ["predict", str(digits_checkpoint), str(image), "--top-k", "3"],
    ):
        assert main(command) == 0
        eager = capsys.readouterr().out
        assert main([*command, "--compile"]) == 0
        assert capsys.readouterr().out == eager


def test_compile_refuses_an_exported_file(capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "model.onnx", "digit.png", "--compile"]) == 2
    assert "is an exported model (`vitkit export`): leave out --compile" in capsys.readouterr().err
