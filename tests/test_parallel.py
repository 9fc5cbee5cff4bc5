"""FSDP, activation checkpointing, sharded checkpoints and many machines (issue 17).

Every run is vit_digits (or another tiny model) on 320 of the shipped digits: 2 gloo processes
under torchrun, one thread each. Starting a torchrun job costs seconds, so the runs that several
tests compare against are module fixtures, and the architecture sweep is one job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import interrupted_after_checkpoint, torchrun, train_config, wait_for
from vitkit import load_pretrained
from vitkit.checkpoints.sharded import optimizer_keys
from vitkit.cli import main
from vitkit.models import create_model, registry
from vitkit.training import TrainConfig, TrainingInterrupted, distributed, loop, parallel, train
from vitkit.training.parallel import checkpoint_activations, units
from vitkit.training.run import RunFolder

# 256 training images in batches of 32: 8 steps an epoch, 24 in all; micro-batches of 16 (8 per
# process); clipping at 0.1 clips every step (the first gradients' norm is about 4). SGD, not
# Adam: Adam divides each gradient by its own running size, so the rounding noise of a gradient
# that is zero in exact arithmetic (the attention keys' bias) becomes steps of the learning
# rate's size. No dropout: its masks are drawn per process, so runs on different numbers of
# processes draw different ones (test_activation_checkpointing_gives_the_same_gradients covers
# dropout and stochastic depth).
SETTINGS = dict(
    epochs=3,
    batch_size=32,
    accum_steps=2,
    grad_clip=0.1,
    optimizer="sgd",
    lr=0.05,
    warmup_epochs=1.0,
    val_fraction=0.2,
    log_every=1,
    checkpoint_every=3,
    augment=dict(random_resized_crop=False),
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tiny_digits: Callable[[int, int], Path]) -> Path:
    """320 training and 100 test digits."""
    return tiny_digits(320, 100)


def flags(data: Path, out: Path, **overrides: object) -> list[str]:
    """``vitkit train`` options of SETTINGS (with ``overrides``)."""
    values = {**SETTINGS, **overrides}
    augment = values.pop("augment")
    args = ["train", "--data", str(data), "--out", str(out)]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + (["--no-random-resized-crop"] if not augment["random_resized_crop"] else [])


config = partial(train_config, SETTINGS)


def run(command: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    if ok:  # the first error of a failing process sits above torchrun's summary: keep plenty
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-20000:]
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("state/")}


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if atol == 0:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def train_losses(folder: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


# Runs torchrun's workers through vitkit's CLI, first making the N-th sharded checkpoint the
# last thing the run does (as if killed right after it).
STOP_AFTER_SAVE = r"""
import sys
from vitkit.cli import main
from vitkit.training.run import RunFolder

limit, saves, save = int(sys.argv[1]), [], RunFolder.save_sharded_checkpoint

def save_then_stop(self, *args, **kwargs):
    save(self, *args, **kwargs)
    saves.append(1)
    if len(saves) == limit:
        raise KeyboardInterrupt

RunFolder.save_sharded_checkpoint = save_then_stop
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def fsdp_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 2 processes, FSDP, never interrupted."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run([*torchrun(2), "-m", "vitkit", *flags(data, out, parallel="fsdp")])
    return out


# slow: two torchrun jobs; FSDP resuming a DDP checkpoint: test_ddp_checkpoint_resumes_under_fsdp
@pytest.mark.slow
def test_fsdp_matches_ddp(data: Path, fsdp_run: Path, tmp_path: Path) -> None:
    """Same losses at every one of 24 steps and the same weights, with gradient accumulation
    and clipping (the global norm over the shards), evaluation and summary alike."""
    run([*torchrun(2), "-m", "vitkit", *flags(data, tmp_path / "ddp")])
    fsdp, ddp = train_losses(fsdp_run), train_losses(tmp_path / "ddp")
    assert [s for s, _ in fsdp] == [s for s, _ in ddp] == list(range(1, 25))
    np.testing.assert_allclose([v for _, v in fsdp], [v for _, v in ddp], rtol=0, atol=1e-5)
    assert_same_weights(fsdp_run / "last.safetensors", tmp_path / "ddp/last.safetensors", 1e-5)
    assert_same_weights(fsdp_run / "best.safetensors", tmp_path / "ddp/best.safetensors", 1e-5)
    summaries = [json.loads((f / "summary.json").read_text()) for f in (fsdp_run, tmp_path / "ddp")]
    assert (summaries[0]["parallel"], summaries[1]["parallel"]) == ("fsdp", "ddp")
    for key in ("confusion_matrix", "test_accuracy", "best_step", "processes"):
        assert summaries[0][key] == summaries[1][key], key
    assert abs(summaries[0]["test_loss"] - summaries[1]["test_loss"]) < 1e-5
    # The sharded checkpoint holds one file per process; the model files are whole.
    assert sorted(p.name for p in (fsdp_run / "last.dcp").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert load_pretrained(fsdp_run / "last.safetensors").num_parameters() == 136_138


def saved_tensors(net: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """How many tensors the forward pass keeps for backward, and the gradients."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    torch.manual_seed(1)  # the same dropout and stochastic depth draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x).square().mean()
    loss.backward()
    return count, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["vit_digits", "vit_cifar_hybrid", "resnetv2_digits"])
def test_activation_checkpointing_gives_the_same_gradients(name: str) -> None:
    kwargs = dict(dropout=0.1, drop_path=0.2) if name != "resnetv2_digits" else {}
    kwargs |= dict(depth=2) if name == "vit_cifar_hybrid" else {}
    torch.manual_seed(0)
    model = create_model(name, **kwargs).train()
    x = torch.randn(4, model.cfg.in_chans, *model.cfg.img_size)
    kept, grads = saved_tensors(model, x)
    model.zero_grad()
    for unit in units(model):
        checkpoint_activations(unit)
    kept_checkpointed, grads_checkpointed = saved_tensors(model, x)
    for a, b in zip(grads, grads_checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert kept_checkpointed < kept / 3, (kept_checkpointed, kept)  # only the units' inputs


@pytest.mark.parametrize(
    ("settings", "whole"),
    [
        ({}, True),
        ({"schedule": {"resize_start": 0.5}}, False),  # a new size recompiles every graph
        ({"run": {"activation_checkpointing": True}}, False),
    ],
)
def test_compile_takes_the_whole_model_unless_units_are_needed(
    settings: dict[str, dict[str, object]], whole: bool
) -> None:
    """Which modules --compile compiles (nothing is compiled before the first call)."""
    model = create_model("vit_digits", depth=2)
    cfg = TrainConfig().replace(run={"compile": True}).replace(**settings)
    process = distributed.Process(rank=0, world_size=1, device=torch.device("cpu"))
    assert parallel.wrap(model, cfg, process) is model

    def compiled(module: torch.nn.Module) -> bool:
        return module._compiled_call_impl is not None

    assert compiled(model) is whole
    assert [compiled(block) for block in model.blocks] == [not whole] * 2


def test_compiled_units_have_room_for_a_graph_per_size_each() -> None:
    """Blocks share one code object, so one cache of compiled graphs: with stochastic depth
    each block's graphs differ (its rate is a constant), and dynamo's default of 8 graphs a
    code object would send the later image sizes back to eager."""
    model = create_model("vit_digits", depth=3, drop_path=0.1)
    cfg = TrainConfig().replace(run={"compile": True}, schedule={"resize_start": 0.5})
    process = distributed.Process(rank=0, world_size=1, device=torch.device("cpu"))
    with torch._dynamo.config.patch(recompile_limit=8):  # the default, restored afterwards
        parallel.wrap(model, cfg, process)
        assert len(parallel.units(model)) == 3
        assert torch._dynamo.config.recompile_limit == 8 * 3


GLOO_THREADS_LEFT = r"""
import os, sys, torch
from vitkit.training import distributed

sharded = sys.argv[1] == "fsdp"
process = distributed.start("cpu", sharded=sharded)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
if sharded:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=process.mesh)
    fully_shard(model, mesh=process.mesh)
else:
    model = torch.nn.parallel.DistributedDataParallel(model)
model(torch.ones(2, 4)).sum().backward()
distributed.broadcast_object("done", process)
del model
distributed.stop(process)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = sorted(n for n in names if "gloo" in n)
os.write(1, f"gloo threads left: {left}\n".encode())  # one write: ranks share stdout
"""


# slow: two torchrun jobs that check the threads left at exit
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_stopping_a_run_ends_gloo_threads(parallel: str, tmp_path: Path) -> None:
    """Gloo threads that outlive the process group can abort the process at exit, failing a
    finished run (torch 2.13). What held the group: torch._dynamo, imported by DDP after the
    group existed; FSDP's device mesh, which DTensor's caches keep alive."""
    script = tmp_path / "threads_left.py"
    script.write_text(GLOO_THREADS_LEFT)
    done = run([*torchrun(2), str(script), parallel])
    assert done.stdout.count("gloo threads left: []") == 2, done.stdout


def test_fsdp_needs_torchrun(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        train(config(data, tmp_path / "run", parallel="fsdp"))
    assert not (tmp_path / "run").exists()


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What torchrun with one process sets, so FSDP runs in this process (a group of one)."""
    group = dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    for name, value in group.items():
        monkeypatch.setenv(name, value)
    yield
    torch.set_num_threads(1)  # the group split the cores over its one process


@pytest.mark.slow  # 5 torchrun jobs; test_ddp_checkpoint_resumes_under_fsdp resumes shards in 1
def test_slow_sharded_checkpoints_resume_in_any_number_of_processes(
    data: Path,
    fsdp_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_process_group: None,
) -> None:
    """A 2-process FSDP run stopped after its checkpoint at step 6 (mid-epoch) resumes in 2
    processes bit-identically, in 1 (then back in 2, resharding both ways) and in one plain
    DDP process, each to the uninterrupted run's weights."""
    script = tmp_path / "stop_after_save.py"
    script.write_text(STOP_AFTER_SAVE)
    cut = tmp_path / "cut"
    stopped = run([*torchrun(2), str(script), "2", *flags(data, cut, parallel="fsdp")], ok=False)
    assert stopped.returncode != 0
    assert RunFolder(cut).checkpoint_counters()["step"] == 6
    for name in ("same", "fewer", "ddp"):
        shutil.copytree(cut, tmp_path / name)

    run([*torchrun(2), "-m", "vitkit", "train", "--resume", str(tmp_path / "same")])
    assert_same_weights(tmp_path / "same/last.safetensors", fsdp_run / "last.safetensors")
    assert [s for s, _ in train_losses(tmp_path / "same")] == list(range(1, 25))

    # in 1 process: steps 8, 9
    with (
        interrupted_after_checkpoint(2, "save_sharded_checkpoint"),
        pytest.raises(TrainingInterrupted),
    ):
        train(resume=tmp_path / "fewer")
    saved = json.loads((tmp_path / "fewer/last.dcp/vitkit.json").read_text())
    assert (saved["world_size"], saved["loop"]["step"]) == (1, 9)
    run([*torchrun(2), "-m", "vitkit", "train", "--resume", str(tmp_path / "fewer")])
    assert_same_weights(tmp_path / "fewer/last.safetensors", fsdp_run / "last.safetensors", 1e-5)

    for name in ("RANK", "MASTER_ADDR"):  # a plain process: FSDP's checkpoint, read whole
        monkeypatch.delenv(name)
    assert main(["train", "--resume", str(tmp_path / "ddp"), "--parallel", "ddp"]) == 0
    assert_same_weights(tmp_path / "ddp/last.safetensors", fsdp_run / "last.safetensors", 1e-5)
    assert json.loads((tmp_path / "ddp/config.json").read_text())["run"]["parallel"] == "ddp"


# slow: two torchrun jobs; a DDP checkpoint read under FSDP's layout in one process: the sharded-checkpoint tests
@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp(
    data: Path,
    fsdp_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_process_group: None,
) -> None:
    """last.safetensors of a single process (optimizer state keyed by parameter index) goes
    into FSDP's shards; and a run cannot take another model's sharded checkpoint."""
    with monkeypatch.context() as patch:
        for name in ("RANK", "MASTER_ADDR"):
            patch.delenv(name)
        with interrupted_after_checkpoint(2), pytest.raises(TrainingInterrupted):
            train(config(data, tmp_path / "run"))
    assert main(["train", "--resume", str(tmp_path / "run"), "--parallel", "fsdp"]) == 0
    assert_same_weights(tmp_path / "run/last.safetensors", fsdp_run / "last.safetensors", 1e-5)

    other = tmp_path / "other"
    shutil.copytree(fsdp_run, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model": "vit_micro"}))
    with pytest.raises(ValueError, match=r"saved by 2 fsdp process.*does not fit"):
        train(resume=other)


def test_convert_consolidates_a_sharded_checkpoint(fsdp_run: Path, tmp_path: Path) -> None:
    """``vitkit convert`` reads last.dcp without a process group; at the end of the run it
    holds the same model as last.safetensors."""
    out = tmp_path / "whole.safetensors"
    assert main(["convert", str(fsdp_run / "last.dcp"), str(out), "--to", "vitkit"]) == 0
    assert_same_weights(out, fsdp_run / "last.safetensors")


# Muon and AdamW stepping vit_micro whole and sharded over the processes, from the same
# gradients (drawn alike in every process); each process writes what it saw to ARGV[1]/RANK.json.
MUON_OVER_SHARDS = r"""
import copy, json, sys
from pathlib import Path
import torch
from torch.distributed.fsdp import fully_shard
from vitkit.models import create_model
from vitkit.training import TrainConfig, distributed
from vitkit.training.optim import build_optimizer
from vitkit.training.parallel import shard_like

def compare(mesh):
    torch.manual_seed(0)
    whole = create_model("vit_micro", num_classes=10)
    sharded = copy.deepcopy(whole)
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    cfg = TrainConfig().replace(optim=dict(name="muon", lr=0.01, weight_decay=0.1))
    optimizers = [build_optimizer(whole, cfg), build_optimizer(sharded, cfg)]
    pairs = list(zip(whole.named_parameters(), sharded.parameters(), strict=True))
    draw = torch.Generator().manual_seed(1)
    for _ in range(3):
        for (_, p), q in pairs:
            p.grad = torch.randn(p.shape, generator=draw)
            q.grad = shard_like(p.grad, q)
        for optimizer in optimizers:
            optimizer.step()
    muon = [g["muon"] for g in optimizers[1].param_groups for _ in g["params"]]
    return {
        "muon_matrices": sum(muon),
        "rows_here": {n: q.to_local().shape[0] for (n, _), q in pairs if q.ndim == 2},
        "different": [n for (n, p), q in pairs if not torch.equal(p, q.full_tensor())],
    }

# In a function, so that no FSDP module outlives it to hold the process group past stop
# (see test_stopping_a_run_ends_gloo_threads).
process = distributed.start("cpu", sharded=True)
Path(sys.argv[1], f"{process.rank}.json").write_text(json.dumps(compare(process.mesh)))
distributed.stop(process)
"""


def test_muon_steps_fsdp_shards_as_whole_matrices(tmp_path: Path) -> None:
    """Muon orthogonalises whole matrices: over 3 processes (uneven shards: 256 and 64 rows
    do not split in 3 equal parts) its steps equal one process's on the whole model, bit for
    bit (that process's step is torch.optim.Muon's: tests/test_muon.py)."""
    script = tmp_path / "muon_over_shards.py"
    script.write_text(MUON_OVER_SHARDS)
    run([*torchrun(3), str(script), str(tmp_path)])
    reports = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(3)]
    assert {r["muon_matrices"] for r in reports} == {8}  # 2 blocks of 4 kernels
    assert sorted(r["rows_here"]["blocks.0.mlp.fc1.weight"] for r in reports) == [84, 86, 86]
    assert [r["different"] for r in reports] == [[], [], []]


def test_a_muon_fsdp_run_resumes_to_the_same_weights(data: Path, tmp_path: Path) -> None:
    """Muon's momentum is saved in the sharded checkpoint and read back into the shards."""
    muon = dict(optimizer="muon", lr=0.003, parallel="fsdp")
    run([*torchrun(2), "-m", "vitkit", *flags(data, tmp_path / "whole", **muon)])
    script = tmp_path / "stop_after_save.py"
    script.write_text(STOP_AFTER_SAVE)
    cut = tmp_path / "cut"
    assert run([*torchrun(2), str(script), "2", *flags(data, cut, **muon)], ok=False).returncode
    assert RunFolder(cut).checkpoint_counters()["step"] == 6
    run([*torchrun(2), "-m", "vitkit", "train", "--resume", str(cut)])
    assert_same_weights(cut / "last.safetensors", tmp_path / "whole/last.safetensors")


def test_an_earlier_fsdp_muon_run_resumes_with_adamw(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_process_group: None
) -> None:
    """Before Muon stepped sharded matrices, FSDP runs with --optimizer muon stepped every
    parameter by AdamW: their sharded checkpoints hold Adam's moments for the blocks'
    matrices, and such a run resumes and goes on as it started (one process, FSDP)."""
    muon = dict(optimizer="muon", lr=0.003, parallel="fsdp")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "muon_stepped", lambda *args: False)  # the earlier version
        train(config(data, tmp_path / "whole", **muon))
        with (
            interrupted_after_checkpoint(2, "save_sharded_checkpoint"),
            pytest.raises(TrainingInterrupted),
        ):
            train(config(data, tmp_path / "cut", **muon))
    assert "state.blocks.0.attn.qkv.weight.exp_avg" in optimizer_keys(tmp_path / "cut/last.dcp")
    train(resume=tmp_path / "cut")
    assert_same_weights(tmp_path / "cut/last.safetensors", tmp_path / "whole/last.safetensors")


@pytest.mark.slow  # two agents; test_fsdp_matches_ddp runs the same 2 processes under one
def test_two_agents_match_one(data: Path, fsdp_run: Path, tmp_path: Path) -> None:
    """Two torchrun agents (as on two machines), one process each, joined by c10d."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "-m",
            "vitkit",
            *flags(data, tmp_path / "run", parallel="fsdp"),
        ]
        agents.append(
            subprocess.Popen(
                command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    for agent in agents:
        output, _ = agent.communicate(timeout=300)
        assert agent.returncode == 0, output[-20000:]
    # Not bit-identical: a process alone on its machine takes both cores, and more threads
    # add up a matrix product's terms in another order.
    assert_same_weights(tmp_path / "run/last.safetensors", fsdp_run / "last.safetensors", 1e-5)
    assert json.loads((tmp_path / "run/summary.json").read_text())["processes"] == 2


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow  # a torchrun restart; resuming sharded checkpoints is tested in the fast suite
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_slow_killed_rank_restarts_from_the_last_checkpoint(
    data: Path, fsdp_run: Path, tmp_path: Path
) -> None:
    """SIGKILL one worker after the first checkpoint: torchrun (--max-restarts 1) starts both
    again, they resume the run in --out by themselves and end where the uninterrupted run did.
    (Without a fresh rendezvous store per restart, the new workers may look up the killed
    one's address: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README says.)"""
    out = tmp_path / "run"
    agent = subprocess.Popen(
        [
            *torchrun(2, "--max-restarts", "1", "--monitor-interval", "0.1"),
            "-m",
            "vitkit",
            *flags(data, out, parallel="fsdp"),
        ],
        env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(out / "last.dcp", agent)
    workers = children(agent.pid)
    assert len(workers) == 2 and not (out / "summary.json").exists()
    os.kill(max(workers), signal.SIGKILL)
    output, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, output[-20000:]
    assert "resuming the run in" in output
    assert_same_weights(out / "last.safetensors", fsdp_run / "last.safetensors")
    steps = [s for s, _ in train_losses(out)]
    assert steps == list(range(1, 25))  # no step lost, none logged twice


# Tiny models of every registered architecture: a ViT with a [class] token (vit_digits), one
# with global average pooling, a hybrid (its ResNet backbone is one FSDP unit) and a BiT
# ResNet-v2 (one unit per stage). The larger registered models differ only in their sizes.
SWEEP = {
    "vit_digits": None,
    "sweep_vit_gap": (
        "vit",
        dict(
            img_size=8,
            patch_size=2,
            in_chans=1,
            classifier="gap",
            width=32,
            depth=2,
            num_heads=2,
            mlp_dim=64,
        ),
    ),
    "sweep_hybrid": (
        "vit",
        dict(
            img_size=16,
            patch_size=1,
            resnet_layers=(1,),
            in_chans=1,
            width=32,
            depth=2,
            num_heads=2,
            mlp_dim=64,
        ),
    ),
    "resnetv2_digits": None,
}
SWEEP_SETTINGS = dict(
    epochs=1, batch_size=64, accum_steps=1, val_fraction=0.0, checkpoint_every=2, warmup_epochs=0.5
)

# One process group for all the runs: a group created again in the same processes would find
# the first one's addresses in torchrun's store.
SWEEP_SCRIPT = r"""
import json, sys
import torch._dynamo  # before the group: see vitkit.training.distributed.start
import torch.distributed as dist
from vitkit.models import register
from vitkit.training import TrainConfig, train

models, settings, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name, spec in models.items():
    if spec is not None:
        register(name, architecture=spec[0], **spec[1])
dist.init_process_group("gloo")
for name in models:
    train(TrainConfig.from_dict({**settings, "model": name, "out": f"{out}/{name}"}))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def sweep(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every SWEEP model trained by 2 processes with FSDP and activation checkpointing."""
    out = tmp_path_factory.mktemp("sweep")
    (out / "sweep.py").write_text(SWEEP_SCRIPT)
    settings = {
        **SETTINGS,
        **SWEEP_SETTINGS,
        "data": str(data),
        "parallel": "fsdp",
        "activation_checkpointing": True,
    }
    run([*torchrun(2), str(out / "sweep.py"), json.dumps(SWEEP), json.dumps(settings), str(out)])
    return out


# slow: test_activation_checkpointing_gives_the_same_gradients checks every architecture and
# test_fsdp_matches_ddp FSDP, each more cheaply
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWEEP))
def test_fsdp_with_activation_checkpointing_trains_every_architecture(
    name: str, data: Path, sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same weights as one plain process without either."""
    if SWEEP[name] is not None:
        architecture, values = SWEEP[name]
        monkeypatch.setitem(registry._MODELS, name, (architecture, values))
    train(config(data, tmp_path / "plain", **SWEEP_SETTINGS, model=name))
    assert_same_weights(
        sweep / name / "last.safetensors", tmp_path / "plain/last.safetensors", 1e-5
    )
    summary = json.loads((sweep / name / "summary.json").read_text())
    assert (summary["parallel"], summary["processes"]) == ("fsdp", 2)
