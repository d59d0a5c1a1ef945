#!/usr/bin/env bash
# README's test command: make/refresh the project's environment (.venv), then run the suite.
# Arguments go to pytest, e.g. `bash scripts/test.sh tests/test_assign_dynamic.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev source scripts/venv.sh
python -m pytest -p no:cacheprovider "$@"
