#!/usr/bin/env bash
# Install numba_bn with its test extras into the active Python and run lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,mpi,demo]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
