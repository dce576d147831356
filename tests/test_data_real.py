"""Download all three datasets from the ../shared mirror (folder and loopback HTTP) and count them."""

from __future__ import annotations

import pytest

from data import download, fruits, mnist, pennfudan
from tests.helpers import run_script

pytestmark = pytest.mark.real_data


def test_download_all_from_mirror_folder_then_present(shared_datasets, tmp_path):
    data_dir = tmp_path / "datasets"
    first = run_script("data/download.py", "all", "--mirror", str(shared_datasets),
                       "--data-dir", str(data_dir), timeout=300)
    assert first.stdout.count("downloaded and verified") == 3
    second = run_script("data/download.py", "all", "--mirror", str(shared_datasets),
                        "--data-dir", str(data_dir), timeout=300)
    assert second.stdout.count("present and verified") == 3

    digits = mnist.load_mnist(data_dir, fetch=False)
    assert len(digits.x_train) == 60_000 and len(digits.x_test) == 10_000
    assert digits.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    train, test = fruits.load_fruits(data_dir, fetch=False)
    assert (len(train), len(test)) == (240, 60)
    assert sum(len(r.boxes) for r in train + test) == 582
    counts = {c: [r.label for r in train].count(c) for c in fruits.CLASSES}
    assert counts == {"apple": 75, "banana": 73, "orange": 72, "mixed": 20}
    zero_size = [r for r in train + test if "<width>0</width>" in r.xml_path.read_text()]
    assert len(zero_size) == 37 and all(r.width > 0 and r.height > 0 for r in zero_size)
    people = pennfudan.load_pennfudan(data_dir, fetch=False)
    assert len(people) == 170
    assert sum(len(r.instance_masks()) for r in people) == 423


def test_download_mnist_over_http_mirror(shared_datasets, tmp_path, http_server):
    http_server.add_tree(shared_datasets / "mnist", prefix="/mirror/mnist")
    opts = download.Transfer(retries=1, backoff=0, timeout=10, progress=False)
    folder = download.ensure("mnist", tmp_path, mirror=http_server.url + "/mirror", opts=opts, quiet=True)
    assert len(list(folder.glob("*.gz"))) == 4
    assert all(p.startswith("/mirror/mnist/") for p, _ in http_server.requests)
