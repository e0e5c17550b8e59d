#!/usr/bin/env bash
# Set-up shared by run.sh and test.sh: Debian's Psi4, a .venv with everything pip installs.
# Idempotent: each part is skipped when done, so a second run takes about a second.
#   ./setup.sh          runtime dependencies
#   ./setup.sh --test   runtime and test dependencies
set -euo pipefail
cd "$(dirname "$0")"
want_test=0; [ "${1:-}" = "--test" ] && want_test=1
PSI4_DIR=/usr/lib/x86_64-linux-gnu   # where Debian's psi4 package puts the psi4 module

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. Psi4 1.3.2 from Debian (not on PyPI)
if [ ! -f "$PSI4_DIR/psi4/__init__.py" ]; then
    echo "setup: installing Debian's psi4 (apt-get)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq psi4 >/dev/null
fi

# 2. the virtual environment
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv || { as_root apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv; }
fi
# psi4 imports through a .pth file naming only the directory that holds the psi4 module
# (naming Debian's whole dist-packages would mix Debian's packages into the venv)
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PSI4_DIR" > "$site/psi4_debian.pth"

# 3. pip packages, re-installed only when the requirement files change
stamp() { cat requirements.txt constraints.txt "$@" | sha256sum | cut -d' ' -f1; }
pip() { .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "$@"; }
if [ "$(cat .venv/.runtime-stamp 2>/dev/null)" != "$(stamp)" ]; then
    echo "setup: pip install -r requirements.txt"
    pip -r requirements.txt
    stamp > .venv/.runtime-stamp
fi
if [ $want_test = 1 ] && [ "$(cat .venv/.test-stamp 2>/dev/null)" != "$(stamp requirements-test.txt)" ]; then
    echo "setup: pip install -r requirements-test.txt, schnetpack==2.1.1 --no-deps"
    pip -r requirements-test.txt
    pip --no-deps schnetpack==2.1.1
    stamp requirements-test.txt > .venv/.test-stamp
fi

# 4. tests only: Debian's chromium, the real browser tests/test_report.py renders
#    conformations.html in (headless)
if [ $want_test = 1 ] && ! command -v chromium >/dev/null; then
    echo "setup: installing Debian's chromium (apt-get)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
fi
