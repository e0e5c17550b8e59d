"""Test set-up: the flat top-level modules import from the repo root; the `soak` marker."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: the long forms of the slow checks (kill "
                                       "chains, both signals, a Dask worker killed, "
                                       "torch.compile), by hand: pytest -m soak tests")


def pytest_collection_modifyitems(config, items):
    """Soak tests run only when a -m expression names them."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run by hand with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
