"""The downloader against a loopback HTTP server and a mirror folder: no internet needed."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import time
import zipfile
from pathlib import Path

import pytest

from data import download
from data.cli import UserError
from tests.helpers import run_script

PAYLOAD = os.urandom(300_000)
FAST = download.Transfer(retries=2, backoff=0.01, timeout=5, progress=False)


def sha_check(expected: bytes):
    digest = hashlib.sha256(expected).hexdigest()

    def check(path: Path) -> None:
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != digest:
            raise download.VerifyError(f"sha256 {got[:12]}… is not {digest[:12]}…")

    return check


def remote(server, *paths: str, name: str = "blob.bin") -> download.RemoteFile:
    return download.RemoteFile(name, tuple(server.url + p for p in paths), sha_check(PAYLOAD))


def test_success_over_http(http_server, tmp_path):
    http_server.files["/a/blob.bin"] = PAYLOAD
    dest = download.fetch_file(remote(http_server, "/a/blob.bin"), tmp_path / "blob.bin", opts=FAST)
    assert dest.read_bytes() == PAYLOAD
    assert list(tmp_path.iterdir()) == [dest]  # no .part left behind


def test_404_falls_back_to_next_source(http_server, tmp_path):
    http_server.files["/good/blob.bin"] = PAYLOAD
    dest = download.fetch_file(remote(http_server, "/missing/blob.bin", "/good/blob.bin"),
                               tmp_path / "blob.bin", opts=FAST)
    assert dest.read_bytes() == PAYLOAD
    # a 404 is final for that source: no retries against it
    assert [p for p, _ in http_server.requests].count("/missing/blob.bin") == 1


def test_checksum_mismatch_leaves_nothing_and_tries_next(http_server, tmp_path):
    http_server.files["/bad/blob.bin"] = b"not the file" * 100
    http_server.files["/good/blob.bin"] = PAYLOAD
    dest = download.fetch_file(remote(http_server, "/bad/blob.bin", "/good/blob.bin"),
                               tmp_path / "blob.bin", opts=FAST)
    assert dest.read_bytes() == PAYLOAD


def test_all_sources_fail_clear_error_and_no_files(http_server, tmp_path):
    http_server.files["/bad/blob.bin"] = b"corrupt"
    with pytest.raises(download.DownloadError) as info:
        download.fetch_file(remote(http_server, "/bad/blob.bin", "/nope/blob.bin"),
                            tmp_path / "blob.bin", opts=FAST)
    message = str(info.value)
    assert "failed its check" in message and "HTTP 404" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes_with_range(http_server, tmp_path):
    http_server.files["/blob.bin"] = PAYLOAD
    http_server.truncate_once.add("/blob.bin")
    dest = download.fetch_file(remote(http_server, "/blob.bin"), tmp_path / "blob.bin", opts=FAST)
    assert dest.read_bytes() == PAYLOAD
    ranges = [r for p, r in http_server.requests if p == "/blob.bin"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(PAYLOAD) // 2}-"


def test_interrupted_transfer_restarts_when_range_ignored(http_server, tmp_path):
    http_server.files["/blob.bin"] = PAYLOAD
    http_server.truncate_once.add("/blob.bin")
    http_server.ignore_range = True
    dest = download.fetch_file(remote(http_server, "/blob.bin"), tmp_path / "blob.bin", opts=FAST)
    assert dest.read_bytes() == PAYLOAD


# Port 9 on loopback: nothing listens there, so the connection is refused at once, as it is
# offline behind a dead proxy. A backoff this long would show as a run of over a minute.
REFUSED = "http://127.0.0.1:9/blob.bin"
PATIENT = download.Transfer(retries=3, backoff=30, timeout=5, progress=False)


def test_a_refused_connection_is_reported_without_retries(tmp_path, capsys):
    source = download.RemoteFile("blob.bin", (REFUSED,), sha_check(PAYLOAD))
    start = time.monotonic()
    with pytest.raises(download.DownloadError, match=r"network error .*refused"):
        download.fetch_file(source, tmp_path / "blob.bin", opts=PATIENT)
    assert time.monotonic() - start < 10 and "retrying" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_source_moves_on_to_the_next_at_once(http_server, tmp_path, capsys):
    http_server.files["/blob.bin"] = PAYLOAD
    source = download.RemoteFile("blob.bin", (REFUSED, http_server.url + "/blob.bin"), sha_check(PAYLOAD))
    start = time.monotonic()
    dest = download.fetch_file(source, tmp_path / "blob.bin", opts=PATIENT)
    assert dest.read_bytes() == PAYLOAD and time.monotonic() - start < 10
    assert "retrying" not in capsys.readouterr().err


def test_a_transfer_cut_off_is_retried_after_the_backoff(http_server, tmp_path, capsys):
    http_server.files["/blob.bin"] = PAYLOAD
    http_server.truncate_once.add("/blob.bin")
    opts = download.Transfer(retries=2, backoff=0.5, timeout=5, progress=False)
    start = time.monotonic()
    dest = download.fetch_file(remote(http_server, "/blob.bin"), tmp_path / "blob.bin", opts=opts)
    assert dest.read_bytes() == PAYLOAD and time.monotonic() - start >= 0.5
    assert "transfer interrupted" in capsys.readouterr().err  # "...; retrying in 0s"


def test_mirror_folder_and_url_are_tried_first(http_server, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "blob.bin").write_bytes(PAYLOAD)
    source = download.RemoteFile("sub/blob.bin", ("http://127.0.0.1:9/never",), sha_check(PAYLOAD))
    dest = download.fetch_file(source, tmp_path / "out" / "blob.bin", mirror=str(mirror), opts=FAST)
    assert dest.read_bytes() == PAYLOAD
    http_server.files["/m/sub/blob.bin"] = PAYLOAD
    dest2 = download.fetch_file(source, tmp_path / "out2" / "blob.bin",
                                mirror=http_server.url + "/m/", opts=FAST)
    assert dest2.read_bytes() == PAYLOAD


def test_present_and_verified_file_is_not_downloaded_again(http_server, tmp_path):
    (tmp_path / "blob.bin").write_bytes(PAYLOAD)
    download.fetch_file(remote(http_server, "/blob.bin"), tmp_path / "blob.bin", opts=FAST)
    assert http_server.requests == []


def test_present_but_corrupt_file_is_replaced(http_server, tmp_path):
    http_server.files["/blob.bin"] = PAYLOAD
    (tmp_path / "blob.bin").write_bytes(b"stale")
    download.fetch_file(remote(http_server, "/blob.bin"), tmp_path / "blob.bin", opts=FAST)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_mnist_check_uses_decompressed_content():
    raw = b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02" + b"\x03\x07"
    md5 = hashlib.md5(raw).hexdigest()
    check = download._md5_of_gunzipped(md5)
    buffers = [gzip.compress(raw, compresslevel=1, mtime=0), gzip.compress(raw, compresslevel=9, mtime=5)]
    assert buffers[0] != buffers[1]  # other gzip bytes, same content: both pass
    for index, data in enumerate(buffers):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dlstudy-md5-{os.getpid()}-{index}.gz"
        path.write_bytes(data)
        try:
            check(path)
        finally:
            path.unlink()


# --- archives -------------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("evil", ["../escape.txt", "root/../../escape.txt", "/abs/escape.txt",
                                  "C:/windows/escape.txt", "root\\..\\..\\escape.txt"])
def test_zip_slip_is_rejected_and_nothing_is_left(tmp_path, evil):
    archive = make_zip(tmp_path / "evil.zip", {"root/ok.txt": b"fine", evil: b"pwned"})
    target = tmp_path / "out" / "dataset"
    with pytest.raises(UserError, match="unsafe member path"):
        download.safe_extract(archive, target)
    assert not target.exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "escape.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging folder left


def test_zip_symlink_is_rejected(tmp_path):
    archive = make_zip(tmp_path / "link.zip", {"root/ok.txt": b"fine"}, symlink="root/link")
    with pytest.raises(UserError, match="symbolic link"):
        download.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_size_cap(tmp_path):
    archive = make_zip(tmp_path / "big.zip", {"a.bin": b"\0" * 50_000, "b.bin": b"\0" * 50_000})
    with pytest.raises(UserError, match="unpacks to more than"):
        download.safe_extract(archive, tmp_path / "out", max_bytes=60_000)
    assert not (tmp_path / "out").exists()


def test_safe_extract_member_root(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"Top/x/1.txt": b"1", "Top/2.txt": b"2", "other.txt": b"no"})
    out = download.safe_extract(archive, tmp_path / "ds", member_root="Top")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == ["2.txt", "x/1.txt"]


def test_corrupt_zip_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError):
        download.safe_extract(bad, tmp_path / "out")


def fake_pennfudan_zip(path: Path, images: int = 170) -> Path:
    members = {"PennFudanPed/readme.txt": b"readme"}
    for i in range(images):
        members[f"PennFudanPed/PNGImages/P{i}.png"] = b"png"
        members[f"PennFudanPed/PedMasks/P{i}_mask.png"] = b"png"
        members[f"PennFudanPed/Annotation/P{i}.txt"] = b"txt"
    return make_zip(path, members)


def test_archive_dataset_from_http_mirror_then_present(http_server, tmp_path, monkeypatch):
    fake_pennfudan_zip(tmp_path / "PennFudanPed.zip")
    http_server.files["/mirror/PennFudanPed.zip"] = (tmp_path / "PennFudanPed.zip").read_bytes()
    monkeypatch.setattr(download, "DATASETS", dict(download.DATASETS))
    dataset = download.DATASETS["pennfudan"]
    no_official = download.RemoteFile(dataset.files[0].name, (), dataset.files[0].check)
    download.DATASETS["pennfudan"] = download.Dataset(
        dataset.name, dataset.folder, (no_official,), dataset.archive_root, dataset.layout)
    folder = download.ensure("pennfudan", tmp_path / "data", mirror=http_server.url + "/mirror",
                             opts=FAST, quiet=True)
    assert len(list((folder / "PNGImages").glob("*.png"))) == 170
    assert download.is_ready("pennfudan", tmp_path / "data")
    count = len(http_server.requests)
    download.ensure("pennfudan", tmp_path / "data", mirror=http_server.url + "/mirror", opts=FAST)
    assert len(http_server.requests) == count  # present: nothing fetched


def test_wrong_archive_is_rejected_with_counts(tmp_path):
    archive = fake_pennfudan_zip(tmp_path / "PennFudanPed.zip", images=3)
    with pytest.raises(download.VerifyError, match="expected 170"):
        download.DATASETS["pennfudan"].files[0].check(archive)


def test_from_zip_rejects_the_wrong_file(tmp_path):
    wrong = make_zip(tmp_path / "archive.zip", {"x.txt": b"x"})
    result = run_script("data/download.py", "fruits", "--from-zip", str(wrong),
                        "--data-dir", str(tmp_path / "d"), check=False, timeout=60)
    assert result.returncode == 2
    assert "not the expected archive" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d" / "fruits").exists()


def test_cli_unknown_dataset_is_one_line(tmp_path):
    result = run_script("data/download.py", "cifar", check=False, timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert "Traceback" not in result.stderr


def test_from_zip_adopts_a_hand_downloaded_archive(tmp_path):
    members = {}
    for folder, count in (("train_zip/train", 240), ("test_zip/test", 60)):
        for i in range(count):
            members[f"{folder}/apple_{i}.jpg"] = b"jpg"
            members[f"{folder}/apple_{i}.xml"] = b"<annotation/>"
    archive = make_zip(tmp_path / "archive (1).zip", members)  # a browser's name for it
    result = run_script("data/download.py", "fruits", "--from-zip", str(archive),
                        "--data-dir", str(tmp_path / "d"), timeout=60)
    assert "downloaded and verified" in result.stdout
    assert len(list((tmp_path / "d/fruits/test_zip/test").glob("*.xml"))) == 60
    again = run_script("data/download.py", "fruits", "--data-dir", str(tmp_path / "d"), timeout=60)
    assert "present and verified" in again.stdout
