#!/usr/bin/env bash
# README's test command: install, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python3 -m pytest -p no:cacheprovider "$@"
