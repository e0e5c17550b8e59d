#!/usr/bin/env bash
# Command 2 of 2: set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --test
# two processes (a file's tests stay in one: its module fixtures are made once); the 15
# slowest tests are listed at the end. The long forms of the slow checks: -m soak
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 "${@:-tests}"
