"""The nested training config: sections, precedence, presets, tasks' and evaluators' own
options, generated flags, and the flat keys of the previous version (recipes, run folders,
Python calls) still loading, training and resuming."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from vitkit.cli import build_parser
from vitkit.cli.train import config_from_args
from vitkit.training import TrainConfig, resolve_config, train
from vitkit.training.config import TASK_OPTIONS, flat_keys, read_toml, settings
from vitkit.training.loop import run_evaluators
from vitkit.training.run import RunFolder
from vitkit.training.tasks import TASKS, Classification, register_task
from vitkit.utils.config import ConfigMixin

REPO = Path(__file__).parents[1]
COMPAT = REPO / "tests" / "fixtures" / "compat"
RECIPES = REPO / "benchmarks" / "recipes"


def parse(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(list(argv))
    return config_from_args(args)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def losses(path: Path) -> list[tuple[str, int, float]]:
    return [
        (r["split"], r["step"], r["loss"])
        for r in map(json.loads, path.read_text().splitlines())
        if "loss" in r
    ]


# ---- sections and defaults


def test_partial_augment_table_changes_only_its_keys(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.toml", '[data]\nsource = "digits"\n[augment]\nhflip = true\n')
    cfg = resolve_config(files=[recipe])
    # Hand-written: the training default (a 0.8-1.0 random-resized crop, label smoothing 0.1)
    # plus the flip.
    assert cfg.augment.to_dict() == {
        "random_resized_crop": True,
        "crop_scale": [0.8, 1.0],
        "crop_ratio": [0.75, 4 / 3],
        "hflip": True,
        "alternate_flips": False,
        "translate": 0,
        "randaugment": None,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.1,
    }


def test_config_json_round_trips_and_shows_the_active_task_options() -> None:
    cfg = resolve_config(["pretrain"], flags={"task": {"mpp": {"rate": 0.15}}})
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["task"] == {"name": "mpp", "mpp": {"target": "mean_colour", "rate": 0.15}}
    assert saved["presets"] == ["pretrain"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert TrainConfig.from_dict(saved) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optim": {"lr": -1.0}}, "lr must be positive"),
        ({"optim": {"name": "lamb"}}, "name must be"),
        ({"optim": {"speed": 1}}, "optim.speed"),
        ({"task": {"mpp": {"rate": "half"}}}, "task.mpp.rate"),
        ({"task": {"mpp": {"colour": 1}}}, "task.mpp.colour"),
        ({"task": {"jigsaw": {}}}, "jigsaw"),
        ({"evaluators": {"fewshot": {"shots": []}}}, "fewshot_shots"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_values_are_one_line_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        TrainConfig.from_dict(values)
    assert "\n" not in str(err.value)


# ---- precedence and presets


def test_precedence_defaults_files_in_order_then_flags(tmp_path: Path) -> None:
    first = write(
        tmp_path / "a.toml",
        '[data]\nsource = "digits"\n[optim]\nlr = 0.5\nbatch_size = 32\n[schedule]\nepochs = 7\n',
    )
    second = write(tmp_path / "b.toml", "[optim]\nlr = 0.25\n")
    cfg = parse("train", "--config", str(first), "--config", str(second), "--epochs", "3")
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.schedule.epochs) == (0.25, 32, 3)
    assert cfg.optim.weight_decay == 0.1  # the default, untouched


def test_flags_unset_what_a_file_set(tmp_path: Path) -> None:
    recipe = write(
        tmp_path / "r.toml",
        '[data]\nsource = "digits"\n[schedule]\nwarmup_steps = 50\n'
        '[augment]\nrandaugment = [2, 9]\n[evaluators]\ntest_tta = "flip_translate"\n',
    )
    read = parse("train", "--config", str(recipe))
    assert (read.augment.randaugment, read.evaluators.test_tta) == ((2, 9), "flip_translate")
    cfg = parse(
        "train",
        *("--config", str(recipe), "--no-randaugment", "--warmup-steps", "none"),
        "--no-test-tta",
    )
    assert (cfg.augment.randaugment, cfg.schedule.warmup_steps) == (None, None)
    # Unset, the test is scored with the validation's TTA; the choice 'none' means no TTA.
    assert cfg.evaluators.test_tta is None
    assert parse("train", "--test-tta", "none").evaluators.test_tta == "none"
    last_wins = parse("train", "--no-randaugment", "--randaugment", "1", "5")
    assert last_wins.augment.randaugment == (1, 5)


def test_finetune_is_the_finetune_preset_under_the_files(tmp_path: Path) -> None:
    ckpt = str(COMPAT / "runs" / "train" / "best.safetensors")
    recipe = write(tmp_path / "r.toml", '[data]\nsource = "digits"\n[schedule]\nepochs = 4\n')
    cfg = parse("finetune", "--from", ckpt, "--config", str(recipe))
    # The paper's fine-tuning recipe, with the file's length on top.
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.01, 0.0)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (4, 1.0)
    assert cfg.presets == ["finetune"]
    assert cfg.model.init_from == ckpt


def test_presets_named_in_a_file_apply_under_it(tmp_path: Path) -> None:
    recipe = write(
        tmp_path / "r.toml",
        'presets = ["pretrain"]\n[data]\nsource = "digits"\n[optim]\nlr = 1e-4\n',
    )
    cfg = parse("train", "--config", str(recipe))
    assert (cfg.task.name, cfg.optim.lr, cfg.presets) == ("mpp", 1e-4, ["pretrain"])


def test_bit_preset_keeps_explicit_settings_and_computes_the_rest() -> None:
    ckpt = str(COMPAT / "runs" / "train" / "best.safetensors")
    cfg = parse(
        "finetune",
        "--recipe",
        "bit",
        "--from",
        ckpt,
        "--batch-size",
        "32",
        "--mixup",
        "0.2",
        "--steps",
        "10",
    )
    assert cfg.presets == ["finetune", "bit"]
    # Fixed by the preset; computed from the digits (1438 images: BiT's smallest rule, steps
    # scaled from 500 to 10: warm-up 100 -> 2, drops 200/300/400 -> 4/6/8); lr 0.003 x 32/512.
    assert (cfg.optim.name, cfg.optim.grad_clip, cfg.optim.batch_size) == ("sgd", 0.0, 32)
    assert (cfg.schedule.name, cfg.schedule.warmup_steps) == ("bit", 2)
    assert cfg.schedule.lr_drops == [4, 6, 8]
    assert cfg.optim.lr == pytest.approx(0.003 * 32 / 512)
    assert cfg.augment.mixup == 0.2  # explicit, kept


def test_a_file_without_data_is_refused(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.toml", "[optim]\nlr = 0.5\n")
    with pytest.raises(ValueError, match="names no data"):
        parse("train", "--config", str(recipe))


# ---- every flag of the previous version


# Each flag of `vitkit train` / `finetune` / `pretrain` before the nested config, with a value
# and where that value must land (written by hand from the previous --help).
OLD_FLAGS: list[tuple[list[str], tuple[str, ...], Any]] = [
    (["--task", "mpp"], ("task", "name"), "mpp"),
    (["--model", "vit_micro"], ("model", "name"), "vit_micro"),
    (["--data", "digits"], ("data", "source"), "digits"),
    (["--data-in-memory", "no"], ("data", "in_memory"), "no"),
    (["--num-workers", "2"], ("data", "num_workers"), 2),
    (["--max-unreadable-fraction", "0.2"], ("data", "max_unreadable_fraction"), 0.2),
    (["--img-size", "16"], ("model", "img_size"), 16),
    (["--val-fraction", "0.1"], ("data", "val_fraction"), 0.1),
    (["--train-fraction", "0.5"], ("data", "train_fraction"), 0.5),
    (["--epochs", "3"], ("schedule", "epochs"), 3),
    (["--steps", "30"], ("schedule", "steps"), 30),
    (["--max-minutes", "1.5"], ("schedule", "max_minutes"), 1.5),
    (["--batch-size", "32"], ("optim", "batch_size"), 32),
    (["--accum-steps", "2"], ("optim", "accum_steps"), 2),
    (["--optimizer", "sgd"], ("optim", "name"), "sgd"),
    (["--lr", "0.5"], ("optim", "lr"), 0.5),
    (["--betas", "0.8", "0.9"], ("optim", "betas"), (0.8, 0.9)),
    (["--momentum", "0.5"], ("optim", "momentum"), 0.5),
    (["--weight-decay", "0.01"], ("optim", "weight_decay"), 0.01),
    (["--schedule", "linear"], ("schedule", "name"), "linear"),
    (["--schedule", "bit", "--lr-drops", "5", "9"], ("schedule", "lr_drops"), [5, 9]),
    (["--warmup-epochs", "0.5"], ("schedule", "warmup_epochs"), 0.5),
    (["--warmup-steps", "4"], ("schedule", "warmup_steps"), 4),
    (["--grad-clip", "0"], ("optim", "grad_clip"), 0.0),
    (["--on-nonfinite", "skip"], ("run", "on_nonfinite"), "skip"),
    (["--max-skipped-steps", "2"], ("run", "max_skipped_steps"), 2),
    (["--max-rollbacks", "1"], ("run", "max_rollbacks"), 1),
    (["--dropout", "0.1"], ("model", "dropout"), 0.1),
    (["--drop-path", "0.1"], ("model", "drop_path"), 0.1),
    (["--mpp-target", "pixels"], ("task", "mpp", "target"), "pixels"),
    (["--mpp-rate", "0.15"], ("task", "mpp", "rate"), 0.15),
    (["--precision", "bf16"], ("run", "precision"), "bf16"),
    (["--device", "cpu"], ("run", "device"), "cpu"),
    (["--parallel", "fsdp"], ("run", "parallel"), "fsdp"),
    (["--activation-checkpointing"], ("run", "activation_checkpointing"), True),
    (["--compile"], ("run", "compile"), True),
    (["--no-compile"], ("run", "compile"), False),
    (["--seed", "3"], ("run", "seed"), 3),
    (["--eval-batch-size", "8"], ("evaluators", "batch_size"), 8),
    (["--evaluators", "val", "fewshot"], ("evaluators", "names"), ["val", "fewshot"]),
    (["--fewshot-data", "digits"], ("evaluators", "fewshot", "data"), "digits"),
    (["--fewshot-shots", "1", "2"], ("evaluators", "fewshot", "shots"), [1, 2]),
    (["--fewshot-seeds", "2"], ("evaluators", "fewshot", "seeds"), 2),
    (["--eval-every", "5"], ("evaluators", "every"), 5),
    (["--checkpoint-every", "5"], ("run", "checkpoint_every"), 5),
    (["--log-every", "2"], ("run", "log_every"), 2),
    (["--out", "somewhere"], ("run", "out"), "somewhere"),
    (["--random-resized-crop"], ("augment", "random_resized_crop"), True),
    (["--no-random-resized-crop"], ("augment", "random_resized_crop"), False),
    (["--crop-scale", "0.3", "0.9"], ("augment", "crop_scale"), (0.3, 0.9)),
    (["--crop-ratio", "0.5", "2"], ("augment", "crop_ratio"), (0.5, 2.0)),
    (["--hflip"], ("augment", "hflip"), True),
    (["--randaugment", "2", "9"], ("augment", "randaugment"), (2, 9)),
    (["--mixup", "0.2"], ("augment", "mixup"), 0.2),
    (["--cutmix", "0.3"], ("augment", "cutmix"), 0.3),
    (["--label-smoothing", "0.1"], ("augment", "label_smoothing"), 0.1),
]


def value_at(cfg: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        cfg = cfg.options(part) if part in getattr(cfg, "tables", {}) else getattr(cfg, part)
    return cfg


@pytest.mark.parametrize(("argv", "path", "value"), OLD_FLAGS, ids=lambda x: str(x))
def test_every_flag_of_the_previous_version_keeps_its_meaning(
    argv: list[str], path: tuple[str, ...], value: Any
) -> None:
    assert value_at(parse("train", *argv), path) == value


def test_the_commands_own_flags_keep_their_meaning() -> None:
    ckpt = str(COMPAT / "runs" / "train" / "best.safetensors")
    assert parse("finetune", "--from", ckpt).model.init_from == ckpt
    cfg = parse("pretrain", "--objective", "mpp", "--model", "vit_micro")
    assert (cfg.task.name, cfg.optim.lr) == ("mpp", 2e-4)
    args = build_parser().parse_args(["train", "--resume", "x", "--parallel", "fsdp"])
    assert args.resume == Path("x")


def test_flat_keys_follow_the_flag_names() -> None:
    mapping = flat_keys()
    # The flag of every setting is its flat key with dashes (except --from: init_from).
    for path, _, flag in settings():
        if path[0] != "augment":
            assert mapping[flag.replace("-", "_") if flag != "from" else "init_from"] == path
    assert mapping["optimizer"] == ("optim", "name")
    assert mapping["eval_every"] == ("evaluators", "every")
    assert mapping["mpp_target"] == ("task", "mpp", "target")


# ---- a task or an evaluator brings its own options


@dataclass
class JigsawOptions(ConfigMixin):
    pieces: int = field(default=9, metadata={"help": "puzzle pieces per image"})
    check_types: ClassVar[bool] = True


def test_a_new_task_brings_its_options_table_and_flags() -> None:
    class Jigsaw(Classification):
        name = "jigsaw"
        Options = JigsawOptions

    register_task(Jigsaw)
    try:
        cfg = TrainConfig.from_dict({"task": {"name": "jigsaw", "jigsaw": {"pieces": 4}}})
        assert cfg.task.options("jigsaw").pieces == 4
        assert cfg.to_dict()["task"]["jigsaw"] == {"pieces": 4}
        assert parse("train", "--jigsaw-pieces", "16").task.options("jigsaw").pieces == 16
        with pytest.raises(ValueError, match=r"task\.jigsaw\.pieces"):
            TrainConfig.from_dict({"task": {"jigsaw": {"pieces": "many"}}})
    finally:
        del TASKS["jigsaw"], TASK_OPTIONS["jigsaw"]


@dataclass
class FakeEvaluator:
    name: str
    values: list[float]
    best_metric: str = "score"
    best_mode: str = "max"

    def run(self, model: Any, process: Any) -> dict[str, Any]:
        return {"score": self.values.pop(0), "accuracy": 0.5}


def test_the_best_checkpoint_follows_the_evaluator_named_best(tmp_path: Path) -> None:
    from vitkit.training.loop import LoopState

    class Quiet:
        is_main = False

    run = RunFolder(tmp_path)
    state = LoopState()
    evaluators: list[Any] = [FakeEvaluator("val", [0.9, 0.1]), FakeEvaluator("probe", [0.2, 0.8])]
    picked = [
        run_evaluators(
            evaluators,
            Classification(TrainConfig()),
            None,
            run,
            Quiet(),
            state,  # type: ignore[arg-type]
            10,
            "probe",
        )
        for _ in range(2)
    ]
    # "probe" rose (0.2 -> 0.8) while "val" fell: the second evaluation is the best.
    assert picked == [True, True]
    assert (state.best_value, state.best_step) == (0.8, 0)


def test_an_unknown_best_evaluator_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(
        {
            "model": {"name": "vit_micro"},
            "schedule": {"steps": 1},
            "evaluators": {"best": "oracle"},
            "run": {"out": str(tmp_path / "run")},
        }
    )
    with pytest.raises(ValueError, match="unknown best evaluator 'oracle'"):
        train(cfg)


# ---- the previous version's flat form


def test_flat_python_use_warns_once_per_call() -> None:
    with pytest.warns(DeprecationWarning) as record:
        cfg = TrainConfig(lr=0.5, epochs=3, mpp_rate=0.15)
    assert len(record) == 1
    assert (cfg.optim.lr, cfg.schedule.epochs, cfg.task.options("mpp").rate) == (0.5, 3, 0.15)
    with pytest.warns(DeprecationWarning):
        assert cfg.replace(lr=0.25).optim.lr == 0.25
    with pytest.warns(DeprecationWarning):
        assert cfg.lr == 0.5
    with pytest.warns(DeprecationWarning):
        assert TrainConfig.from_dict({"optimizer": "sgd", "seed": 4}).run.seed == 4


# Settings a recipe changed since its flat copy was written: the digits recipe follows the new
# defaults of the main job; cifar10_hybrid_bf16 took Muon, CIFAR's pad-and-crop, a schedule
# fitted to 55 minutes, flip TTA and progressive resizing (docs/experiments.md, "Time to
# accuracy"); the others state
# the optimizer (Adam) and mnist the label smoothing they relied on (docs/configuration.md,
# "Defaults that changed").
ADAM = {"optim": {"name": "adam"}}
CHANGED_SINCE: dict[str, dict[str, Any]] = {
    "digits": {
        "optim": {"name": "muon", "batch_size": 128, "lr": 4e-3},
        "schedule": {"epochs": 100},
        "augment": {"crop_scale": (0.8, 1.0), "label_smoothing": 0.1},
    },
    "mnist": {**ADAM, "augment": {"label_smoothing": 0.0}},
    "cifar10": ADAM,
    "cifar10_hybrid": ADAM,
    "cifar10_hybrid_bf16": {
        "model": {"drop_path": 0.1},
        "optim": {"name": "muon"},
        "schedule": {"epochs": 60, "max_minutes": 55, "resize_start": 0.75},
        "augment": {"random_resized_crop": False, "translate": 4, "randaugment": (2, 9)},
        "evaluators": {"tta": "flip"},
    },
    "cifar10_scaling": ADAM,
}


@pytest.mark.parametrize("name", sorted(p.stem for p in (COMPAT / "recipes").glob("*.toml")))
def test_recipes_resolve_like_their_flat_copies(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each rewritten recipe gives the same config as the flat file of the previous version,
    which still loads, with one deprecation line."""
    flags = {"data": {"source": "digits"}}
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        old = resolve_config(
            files=[COMPAT / "recipes" / f"{name}.toml"],
            flags={**flags, **CHANGED_SINCE.get(name, {})},
        )
    assert len([r for r in caplog.records if "deprecated" in r.getMessage()]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = resolve_config(files=[RECIPES / f"{name}.toml"], flags=flags)
    assert new == old
    assert all(isinstance(v, dict) for k, v in read_toml(RECIPES / f"{name}.toml").items())


def test_the_digits_recipe_is_the_bare_train_command() -> None:
    recipe = resolve_config(files=[RECIPES / "digits.toml"])
    bare = parse("train")
    # The recipe names the model that `vitkit train` picks for the digits, and the batch it
    # fixes at the start (the digits' 1,000-odd training images fill the default 128).
    assert recipe.replace(model={"name": None}) == bare.replace(optim={"batch_size": 128})


def test_the_fp32_hybrid_recipe_is_the_bf16_one_in_fp32_from_half_the_size() -> None:
    data = {"data": {"source": "digits"}}
    fp32 = resolve_config(files=[RECIPES / "cifar10_hybrid_fp32.toml"], flags=data)
    bf16 = resolve_config(files=[RECIPES / "cifar10_hybrid_bf16.toml"], flags=data)
    assert fp32 == bf16.replace(
        run={"precision": "fp32"},
        schedule={"resize_start": 0.5, "max_minutes": 54},
        evaluators={"test_tta": "flip_translate"},
    )


def copy_run(name: str, tmp_path: Path, **changes: Any) -> Path:
    """A copy of a fixture run folder whose config.json (flat) points into ``tmp_path``."""
    folder = tmp_path / name
    shutil.copytree(COMPAT / "runs" / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(out=str(folder), **changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_killed_run_of_the_previous_version_resumes_to_the_same_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init = str(COMPAT / "runs" / "train" / "best.safetensors")
    folder = copy_run("finetune-killed", tmp_path, init_from=init)
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        summary = train(resume=folder)
    assert len([r for r in caplog.records if "deprecated" in r.getMessage()]) == 1
    assert summary["steps"] == 4
    # The previous version's uninterrupted run logged the same losses.
    assert losses(folder / "metrics.jsonl") == losses(folder / "expected_metrics.jsonl")
    expected = json.loads((folder / "expected_summary.json").read_text())
    assert summary["test_loss"] == expected["test_loss"]


@pytest.mark.parametrize("name", ["train", "pretrain"])
def test_run_folders_of_the_previous_version_load_and_train_the_same(
    name: str, tmp_path: Path
) -> None:
    """A run folder's flat config.json, resumed from its start, trains as it did."""
    source = copy_run(name, tmp_path)
    folder = tmp_path / "again"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "out": str(folder)}))
    train(resume=folder)
    assert losses(folder / "metrics.jsonl") == losses(source / "metrics.jsonl")


def test_docs_name_every_setting() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    for path, _, flag in settings():
        assert f"`{path[-1]}`" in text, path
        assert f"--{flag}" in text, flag


def test_parser_built_from_the_schema_has_one_flag_per_setting() -> None:
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices["train"]._actions  # type: ignore[union-attr]
    flags = {o for a in actions for o in a.option_strings if isinstance(a, argparse.Action)}
    assert {"--" + flag for _, _, flag in settings() if flag != "from"} <= flags
