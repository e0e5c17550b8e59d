#!/usr/bin/env bash
# Command 2 of 2: set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --test
exec .venv/bin/python -m pytest -q "${@:-tests}"
