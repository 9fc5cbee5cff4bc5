"""The documentation's code runs: every fenced ```python block of README.md, CONTRIBUTING.md
and docs/*.md is executed, every ```bash / ```sh block made of `vitkit ...` lines runs those
commands, each block in a fresh folder. A block that cannot run in a test (a download, hours
of training, data that is not shipped) says so in the line above it, with a reason:

    <!-- not-run: needs CIFAR-10 (60 min) -->

and a block that runs but takes long is marked `<!-- slow: reason -->` (the `slow` marker).
Also: every page of the mkdocs.yml nav exists, and every page in docs/ is in the nav.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vitkit.checkpoints.formats import FORMATS
from vitkit.data.sources import SOURCES
from vitkit.models import registry
from vitkit.training.config import EVALUATOR_OPTIONS, PRESET_RESOLVERS, TASK_OPTIONS
from vitkit.training.evaluators import EVALUATORS
from vitkit.training.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python", "bash", "sh"}
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARK = re.compile(r"^\s*<!--\s*(not-run|slow)\s*:(.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mark: str | None  # "not-run", "slow" or None
    reason: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(path: Path, root: Path = REPO) -> list[Block]:
    """The fenced code blocks of a markdown file, each with the mark in the line above it.
    A mark that is not directly above a code block is an error: it would mark nothing."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = str(path.relative_to(root))
    blocks: list[Block] = []
    pending: tuple[str, str, int] | None = None
    i = 0
    while i < len(lines):
        mark = MARK.match(lines[i])
        fence = FENCE.match(lines[i])
        if mark:
            pending = (mark.group(1), mark.group(2).strip(), i + 1)
        elif fence:
            indent, language = fence.groups()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            code = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end])
            kind, reason = (pending[0], pending[1]) if pending else (None, "")
            blocks.append(Block(page, i + 1, language, code, kind, reason))
            pending = None
            i = end
        elif lines[i].strip() and pending:
            where = f"{page}:{pending[2]}"
            raise AssertionError(f"{where}: a mark must be the line directly above a code block")
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in read_blocks(page)]


def command_lines(code: str) -> list[str]:
    """The commands of a shell block: backslash continuations joined, comments and blank lines
    dropped."""
    joined = code.replace("\\\n", " ")
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def is_runnable(block: Block) -> bool:
    if block.language == "python":
        return True
    return all(line.split()[0] == "vitkit" for line in command_lines(block.code))


RUNNABLE = [b for b in all_blocks() if b.language in RUN_LANGUAGES and b.mark != "not-run"]


def _param(block: Block) -> object:
    marks = [pytest.mark.slow] if block.mark == "slow" else []
    return pytest.param(block, id=block.name, marks=marks)


def test_marks_give_reasons_and_blocks_that_cannot_run_are_marked() -> None:
    blocks = all_blocks()
    assert any(b.mark == "not-run" for b in blocks) and RUNNABLE, "the scan found no blocks"
    for block in blocks:
        if block.mark is not None:
            assert block.reason, f"{block.name}: say why, e.g. <!-- not-run: needs CIFAR-10 -->"
        if block.language in RUN_LANGUAGES and block.mark != "not-run":
            assert is_runnable(block), (
                f"{block.name}: a shell block runs only `vitkit ...` lines; "
                "mark it <!-- not-run: reason --> or make it one"
            )


def test_read_blocks_honours_marks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- not-run: needs the network -->\n```bash\npip install x\n```\n\n"
        "- a list item:\n\n  ```python\n  x = 1\n  ```\n",
        encoding="utf-8",
    )
    blocks = read_blocks(page, root=tmp_path)
    assert [(b.language, b.mark, b.reason, b.code) for b in blocks] == [
        ("bash", "not-run", "needs the network", "pip install x"),
        ("python", None, "", "x = 1"),
    ]
    page.write_text("<!-- slow: long -->\nprose, not a block\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="directly above a code block"):
        read_blocks(page, root=tmp_path)


# The plugin registries a page's example may add to: each block's additions are undone after
# it, so a task or model a page registers does not reach the tests that run later.
REGISTRIES = [
    TASKS,
    TASK_OPTIONS,
    EVALUATORS,
    EVALUATOR_OPTIONS,
    PRESET_RESOLVERS,
    registry._ARCHITECTURES,
    registry._MODELS,
    FORMATS,
    SOURCES,
]


@pytest.fixture
def registries_restored() -> Iterator[None]:
    saved = [copy.copy(r) for r in REGISTRIES]
    yield
    for registered, before in zip(REGISTRIES, saved, strict=True):
        registered.clear()
        if isinstance(registered, dict):
            registered.update(before)
        else:
            registered.extend(before)


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
@pytest.mark.usefixtures("registries_restored")
def test_code_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if block.language == "python":
        exec(compile(block.code, block.name, "exec"), {"__name__": "__main__"})
        return
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    for line in command_lines(block.code):
        if (
            "$VITKIT_DATA" in line
            and not Path(os.environ.get("VITKIT_DATA", "/nonexistent")).is_dir()
        ):
            pytest.skip(f"{block.name} needs $VITKIT_DATA")
        args = shlex.split(os.path.expandvars(line), comments=True)[1:]
        command = [sys.executable, "-m", "vitkit", *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{block.name}: `{line}` failed:\n{done.stderr[-3000:]}"


def test_nav_pages_exist_and_every_page_is_in_the_nav() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(entry: object) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [page for item in entry for page in pages(item)]
        if isinstance(entry, dict):
            return [page for value in entry.values() for page in pages(value)]
        return []

    nav = pages(config["nav"])
    docs = REPO / config.get("docs_dir", "docs")
    missing = [p for p in nav if not (docs / p).is_file()]
    assert not missing, f"in the nav of mkdocs.yml but not in docs/: {missing}"
    written = {str(p.relative_to(docs)) for p in docs.rglob("*.md")}
    assert not written - set(nav), (
        f"pages in docs/ missing from the nav: {sorted(written - set(nav))}"
    )
