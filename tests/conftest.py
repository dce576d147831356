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


# The files whose tests take longest on 2 cores, longest first (`make test --durations`,
# 2026-12-08): 03b's smoke run and its resume (~145 s), 03's smoke run and its kill-and-resume
# (~140 s), 04b's runs (~95 s), the real-data runs of 03b (~90 s) and 04 (~65 s), 03's COCO
# run under tf.distribute (~90 s), the COCO Mask R-CNN parity (~80 s), and so on.
LONGEST_FILES = ("test_03b_xml_detection.py", "test_03_tf_od_api.py", "test_04b_instance_seg.py",
                 "test_03b_xml_detection_real.py", "test_03_tf_od_api_coco.py", "test_04b_coco.py",
                 "test_keras_distributed.py", "test_04_semantic_bg_real.py", "test_02b_fruit_cnn_aug.py",
                 "test_04b_instance_seg_units.py", "test_04b_coco_finetune.py", "test_03b_distributed.py",
                 "test_04_semantic_bg.py", "test_01_mnist.py", "test_04_distributed.py",
                 "test_02b_fruit_cnn_aug_real.py", "test_02_fruit_cnn.py", "test_01_mnist_real.py")


def run_order(item) -> int:
    """The files of LONGEST_FILES first, in its order; then the rest in file order."""
    name = item.path.name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(config, items):
    """Skip the real-data tests without the mirror, and hand out the longest files first.

    `make test` runs `pytest -n N --dist loadfile --no-loadscope-reorder`: each test file
    goes to one worker whole, so a file's shared smoke run (a module-scoped fixture) is made
    once, and the files are handed out in this order as workers free up (LONGEST_FILES
    first). Longest first keeps the workers evenly loaded to the end, instead of one long
    file starting last while the other worker sits idle. The order changes nothing in a
    plain (one-process) run."""
    if not SHARED_DATASETS.is_dir():
        skip = pytest.mark.skip(reason=f"no dataset mirror at {SHARED_DATASETS}")
        for item in items:
            if "real_data" in item.keywords:
                item.add_marker(skip)
    items.sort(key=run_order)  # stable: the order within a file is kept


@pytest.fixture
def http_server():
    """A loopback HTTP server (tests/http_server.py); add bytes to `.files[path]`."""
    from tests.http_server import FileServer

    with FileServer() as server:
        yield server
