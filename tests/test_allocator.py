"""``vitkit.utils.allocator.keep_freed_memory``: freed buffers stay in the process, so
allocating again does not fault fresh pages in. Counted with the kernel's
page-fault counter (``getrusage``), in fresh processes, since the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitkit import cli

# Allocate, fill and free 40 buffers of 1 MiB and more, each 64 KiB larger than the one
# before: above glibc's default mmap threshold every time (it only rises to the size of the
# last buffer freed), so by default each one is mapped, faulted in and unmapped afresh; kept,
# each reuses the memory of the one before. Prints the minor page faults that cost.
FAULTS = """
import resource, sys, torch
from vitkit.utils.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    torch.ones((2**20 + i * 2**16) // 4)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = sum(2**20 + i * 2**16 for i in range(40)) // 4096  # every buffer's pages, once


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    tuned, tuned_faults = faults("tuned")
    if tuned != "True":
        pytest.skip("this Linux's C library is not glibc: nothing to tune")
    _, default_faults = faults("default")
    assert default_faults > PAGES / 2  # glibc's default: every buffer's pages faulted in
    assert tuned_faults < PAGES / 10  # kept and reused


@pytest.mark.parametrize("command", ["eval", "predict", "fewshot", "probe"])
def test_the_commands_that_run_a_checkpoint_keep_freed_memory_unless_told(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(command))
    argv = {
        "eval": ["eval", "missing.safetensors", "--data", "digits"],
        "predict": ["predict", "missing.safetensors", "x.png"],
        "fewshot": ["fewshot", "missing.safetensors", "--data", "digits"],
        "probe": ["probe", "missing.safetensors", "--data", "digits"],
    }[command]
    assert cli.main(argv) == 2  # the checkpoint is missing: set before the command runs
    assert cli.main([*argv, "--no-keep-freed-memory"]) == 2
    assert cli.main(["inspect", "missing.safetensors"]) == 2  # no model run: glibc left be
    assert calls == [command]
