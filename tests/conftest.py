from __future__ import annotations

import pytest

from tests.helpers import SHARED_DATASETS


@pytest.fixture
def shared_datasets():
    """The dataset mirror beside the checkout; real-data tests skip without it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real-data test: no dataset mirror at {SHARED_DATASETS} (a user's clone has none)")
    return SHARED_DATASETS


def pytest_collection_modifyitems(config, items):
    if SHARED_DATASETS.is_dir():
        return
    skip = pytest.mark.skip(reason=f"no dataset mirror at {SHARED_DATASETS}")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def http_server():
    """A loopback HTTP server (tests/http_server.py); add bytes to `.files[path]`."""
    from tests.http_server import FileServer

    with FileServer() as server:
        yield server
