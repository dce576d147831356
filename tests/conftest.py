from __future__ import annotations

import os

import pytest

from tests.helpers import SHARED_DATASETS


@pytest.fixture
def shared_datasets():
    """The dataset mirror beside the checkout; real-data tests skip without it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real-data test: no dataset mirror at {SHARED_DATASETS} (a user's clone has none)")
    return SHARED_DATASETS


def pytest_configure(config):
    """Under `pytest -n N` (pytest-xdist, what `make test` runs), pin each worker to a core
    of its own. The chapter scripts it starts inherit the pin, and `num_threads = 0` means
    "the cores this process may use" (data.cli.usable_cores), so two workers' trainings
    never fight over the same core; without the pin each would start a thread per core
    and the machine would be oversubscribed."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        if workers <= len(cores):
            share = len(cores) // workers  # e.g. 2 workers on 16 cores: 8 cores each
            index = int(worker[2:])
            os.sched_setaffinity(0, cores[index * share:(index + 1) * share])


def pytest_collection_modifyitems(config, items):
    """Skip the real-data tests without the mirror, and run them first.

    `make test` runs `pytest -n N --dist loadfile`: each test file goes to one worker whole,
    so a file's shared smoke run (a module-scoped fixture) is made once. The real-data
    tests live in files of their own (tests/test_*_real.py) and are the longest: sorted
    first, their files are handed out first, which keeps the workers evenly loaded to the
    end. The order changes nothing in a plain (one-process) run."""
    if not SHARED_DATASETS.is_dir():
        skip = pytest.mark.skip(reason=f"no dataset mirror at {SHARED_DATASETS}")
        for item in items:
            if "real_data" in item.keywords:
                item.add_marker(skip)
    items.sort(key=lambda item: "real_data" not in item.keywords)  # stable: file order kept


@pytest.fixture
def http_server():
    """A loopback HTTP server (tests/http_server.py); add bytes to `.files[path]`."""
    from tests.http_server import FileServer

    with FileServer() as server:
        yield server
