#!/usr/bin/env bash
# Set up a virtual environment from nothing, run the linters, build the documentation and run
# the whole test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned first, so nothing after it can pull another (CUDA) torch build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,onnx,docs,hub,hf,tracking]"

# Headless Chromium for the report's browser test (skipped with a reason if it cannot install).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
        >/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"
fi

export VITKIT_DATA="${VITKIT_DATA:-$(cd .. && pwd)/shared/data}"
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy  # [tool.mypy] in pyproject.toml: src/vitkit
# The documentation site, warnings as errors (into site/, which git ignores); its code blocks
# run in tests/test_docs.py. Not --quiet: it hides the warnings, and --strict then passes them.
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site
python -m pytest -q "$@"
