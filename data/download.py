"""Download, verify and unpack the study's datasets: MNIST, the Kaggle fruit set, PennFudanPed.

    python data/download.py all                                # from the official sources
    python data/download.py mnist fruits --mirror ../shared/datasets
    python data/download.py fruits --from-zip ~/Downloads/archive.zip

Every chapter calls `ensure()` from here, so a missing dataset downloads on first use.
How it stays robust:

- sources are tried in order: a mirror first (`--mirror` or $DLSTUDY_MIRROR: a folder,
  a file:// or an http(s):// URL laid out like ../shared/datasets), then the official ones;
- network errors are retried with exponential backoff, and an interrupted transfer is
  resumed with an HTTP Range request (or restarted when the server ignores it); a refused
  connection or an unknown host (offline) moves on to the next source at once;
- a file is downloaded to `<name>.part` and renamed only after it checks out: MNIST by the
  md5 of its *decompressed* content (so a mirror that re-gzipped the files still passes),
  archives by their members and counts; a failed check deletes the file and moves on;
- archives are unpacked safely (no `..`, absolute paths or links; a cap on the unpacked
  size) into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data.cli import UserError, default_data_dir, run_main

USER_AGENT = "dl-study-downloader/1.0"
MAX_UNPACKED_BYTES = 1 << 30  # 1 GiB: both archives unpack to under 60 MB


class DownloadError(UserError):
    """No source delivered a file that checks out."""


class VerifyError(Exception):
    """A downloaded file failed its check."""


class SourceFailed(Exception):
    """One source could not deliver (HTTP 404, network down, not in the mirror...)."""


# --- The datasets --------------------------------------------------------------------


def _md5_of_gunzipped(expected: str) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        digest = hashlib.md5()
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except (OSError, EOFError) as exc:
            raise VerifyError(f"not a valid gzip file ({exc})") from None
        if digest.hexdigest() != expected:
            raise VerifyError(f"md5 of the decompressed content is {digest.hexdigest()}, expected {expected}")

    return check


def _zip_members(counts: dict[tuple[str, str], int]) -> Callable[[Path], None]:
    """Check an archive by content: `counts[(folder, suffix)]` files directly in folder."""

    def check(path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as exc:
            raise VerifyError(f"not a valid zip archive ({exc})") from None
        for (folder, suffix), expected in counts.items():
            found = sum(
                1 for n in names
                if str(PurePosixPath(n).parent) == folder and n.lower().endswith(suffix)
            )
            if found != expected:
                raise VerifyError(f"expected {expected} '{suffix}' files in {folder}/, found {found}")

    return check


@dataclass(frozen=True)
class RemoteFile:
    name: str                       # path inside a mirror, and under <data_dir>/downloads/
    urls: tuple[str, ...]           # official sources, tried in order after the mirror
    check: Callable[[Path], None]   # raises VerifyError
    kaggle_handle: str | None = None  # last resort: kagglehub.dataset_download(handle)


@dataclass(frozen=True)
class Dataset:
    name: str
    folder: str                     # the ready dataset: <data_dir>/<folder>
    files: tuple[RemoteFile, ...]
    archive_root: str | None = None  # for archives: the member folder that becomes <folder>
    # for archives: (relative folder, glob, count) that a ready folder must contain
    layout: tuple[tuple[str, str, int], ...] = field(default=())
    manual: str = ""                 # how to get it by hand when every source fails


MNIST_BASES = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",        # torchvision's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",   # the CVDF mirror
    "http://yann.lecun.com/exdb/mnist/",                     # the original; 403 for years
)
MNIST_MD5 = {  # md5 of the *uncompressed* IDX files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FRUITS_HANDLE = "mbkinaci/fruit-images-for-object-detection"
FRUITS_ZIP = "fruit-images-for-object-detection.zip"

DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(
        name="mnist",
        folder="mnist",
        files=tuple(
            RemoteFile(f"mnist/{stem}.gz", tuple(base + f"{stem}.gz" for base in MNIST_BASES),
                       _md5_of_gunzipped(md5))
            for stem, md5 in MNIST_MD5.items()
        ),
    ),
    "fruits": Dataset(
        name="fruits",
        folder="fruits",
        files=(
            RemoteFile(
                FRUITS_ZIP,
                (f"https://www.kaggle.com/api/v1/datasets/download/{FRUITS_HANDLE}",),
                _zip_members({("train_zip/train", ".jpg"): 240, ("train_zip/train", ".xml"): 240,
                              ("test_zip/test", ".jpg"): 60, ("test_zip/test", ".xml"): 60}),
                kaggle_handle=FRUITS_HANDLE,
            ),
        ),
        archive_root="",
        layout=(("train_zip/train", "*.jpg", 240), ("train_zip/train", "*.xml", 240),
                ("test_zip/test", "*.jpg", 60), ("test_zip/test", "*.xml", 60)),
        manual=(f"download the zip by hand from https://www.kaggle.com/datasets/{FRUITS_HANDLE} "
                "(the Download button), then run: python data/download.py fruits --from-zip PATH"),
    ),
    "pennfudan": Dataset(
        name="pennfudan",
        folder="PennFudanPed",
        files=(
            RemoteFile(
                "PennFudanPed.zip",
                ("https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip",),
                _zip_members({("PennFudanPed/PNGImages", ".png"): 170,
                              ("PennFudanPed/PedMasks", ".png"): 170,
                              ("PennFudanPed/Annotation", ".txt"): 170}),
            ),
        ),
        archive_root="PennFudanPed",
        layout=(("PNGImages", "*.png", 170), ("PedMasks", "*_mask.png", 170),
                ("Annotation", "*.txt", 170)),
    ),
}


# --- Transfers -----------------------------------------------------------------------


@dataclass
class Transfer:
    retries: int = 3        # attempts per source for network errors
    backoff: float = 1.0    # seconds before the 2nd attempt; doubles after each failure
    timeout: float = 30.0   # seconds of silence before a connection counts as dead
    progress: bool = True


def _copy_with_progress(src, dst, total: int | None, desc: str, progress: bool) -> None:
    with tqdm(total=total, initial=dst.tell(), unit="B", unit_scale=True, unit_divisor=1024,
              desc=desc, disable=not progress, leave=False, file=sys.stderr) as bar:
        while chunk := src.read(1 << 16):
            dst.write(chunk)
            bar.update(len(chunk))


def _http_download(url: str, part: Path, opts: Transfer, desc: str) -> None:
    """Download url into part, resuming a partial part file; raise SourceFailed when done trying."""
    last_error: Exception | None = None
    for attempt in range(opts.retries):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=opts.timeout) as response:
                length = response.headers.get("Content-Length")
                if offset and response.status == 206:
                    mode, expected = "ab", (offset + int(length) if length else None)
                else:  # the server ignored the Range header: start over
                    mode, expected = "wb", (int(length) if length else None)
                with open(part, mode) as f:
                    _copy_with_progress(response, f, expected, desc, opts.progress)
                    size = f.tell()
            if expected is not None and size != expected:
                raise ConnectionError(f"transfer interrupted at {size:,} of {expected:,} bytes")
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our partial file is no prefix of theirs: restart
                part.unlink(missing_ok=True)
                last_error = exc
                continue
            if 400 <= exc.code < 500:
                raise SourceFailed(f"HTTP {exc.code} {exc.reason}") from None
            last_error = exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError, OSError) as exc:
            if _cannot_connect(exc):  # offline: a second try would fail the same way
                raise SourceFailed(_describe(exc)) from None
            last_error = exc
        if attempt + 1 < opts.retries:
            wait = opts.backoff * 2**attempt
            print(f"  {desc}: {_describe(last_error)}; retrying in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    raise SourceFailed(_describe(last_error))


def _cannot_connect(exc: Exception) -> bool:
    """A refused connection or an unknown host name: no network (or a dead proxy), not a
    hiccup that a retry a second later gets past. Timeouts and dropped transfers are retried."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


def _describe(exc: Exception | None) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"network error ({exc.reason})"
    return f"{exc.__class__.__name__}: {exc}" if exc else "unknown error"


def _kaggle_download(handle: str, part: Path) -> None:
    """Last resort for the fruit set: kagglehub, which also uses the user's Kaggle login."""
    try:
        import kagglehub
    except ImportError:
        raise SourceFailed("kagglehub is not installed") from None
    try:
        folder = Path(kagglehub.dataset_download(handle))
    except Exception as exc:  # kagglehub raises many kinds; any of them means "not from here"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise SourceFailed(f"kagglehub: {exc.__class__.__name__}: {first_line[:120]}") from None
    # kagglehub hands back the unpacked folder; re-pack it so one check covers every source.
    with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())


def _sources(remote: RemoteFile, mirror: str | None) -> list[str]:
    sources = []
    if mirror:
        if "://" in mirror:
            sources.append(mirror.rstrip("/") + "/" + remote.name)
        else:
            sources.append(str(Path(mirror).expanduser() / remote.name))
    sources.extend(remote.urls)
    if remote.kaggle_handle:
        sources.append(f"kagglehub:{remote.kaggle_handle}")
    return sources


def fetch_file(remote: RemoteFile, dest: Path, mirror: str | None = None,
               opts: Transfer | None = None) -> Path:
    """Make `dest` a verified copy of `remote`, trying each source in turn."""
    opts = opts or Transfer()
    if dest.exists():
        try:
            remote.check(dest)
            return dest
        except VerifyError as exc:
            print(f"  {dest} failed its check ({exc}); downloading again", file=sys.stderr)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for source in _sources(remote, mirror):
        desc = Path(remote.name).name
        try:
            if source.startswith("kagglehub:"):
                part.unlink(missing_ok=True)
                _kaggle_download(remote.kaggle_handle or "", part)
            elif "://" in source:
                _http_download(source, part, opts, desc)
            else:
                if not Path(source).is_file():
                    raise SourceFailed("not in the mirror")
                with open(source, "rb") as src, open(part, "wb") as dst:
                    _copy_with_progress(src, dst, os.path.getsize(source), desc, opts.progress)
            remote.check(part)
        except SourceFailed as exc:
            failures.append(f"{source}: {exc}")
            continue
        except VerifyError as exc:
            part.unlink(missing_ok=True)
            failures.append(f"{source}: failed its check, {exc}")
            continue
        os.replace(part, dest)
        return dest
    part.unlink(missing_ok=True)
    raise DownloadError(f"could not get {remote.name} from any source ({'; '.join(failures)})")


# --- Archives ------------------------------------------------------------------------


def safe_extract(archive_path: Path, target: Path, member_root: str = "",
                 max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack `member_root/` of a zip into `target`, all or nothing.

    Members that would land outside the target (absolute paths, `..`, drive letters),
    symbolic links and archives that unpack to more than `max_bytes` are refused with a
    UserError. The archive goes to a temporary sibling folder that is renamed to `target`
    only when everything is out, so a failure leaves no half-unpacked dataset behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.unpacking-"))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            written = 0
            for info in archive.infolist():
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise UserError(f"{archive_path}: unsafe member path '{info.filename}', refusing to unpack")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UserError(f"{archive_path}: member '{info.filename}' is a symbolic link, refusing to unpack")
                if member_root:
                    if parts[:1] != (member_root,):
                        continue
                    parts = parts[1:]
                if not parts:
                    continue
                out = staging.joinpath(*parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 16):
                        written += len(chunk)  # counted as written: headers can lie
                        if written > max_bytes:
                            raise UserError(f"{archive_path}: unpacks to more than {max_bytes:,} bytes, refusing")
                        dst.write(chunk)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return target
    except zipfile.BadZipFile as exc:
        raise UserError(f"{archive_path}: corrupt zip archive ({exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _layout_ok(dataset: Dataset, folder: Path) -> bool:
    return folder.is_dir() and all(
        len(list((folder / sub).glob(pattern))) == count for sub, pattern, count in dataset.layout
    )


# --- Entry points --------------------------------------------------------------------


def is_ready(name: str, data_dir: Path) -> bool:
    dataset = DATASETS[name]
    folder = Path(data_dir) / dataset.folder
    if dataset.archive_root is None:
        return all((Path(data_dir) / f.name).is_file() for f in dataset.files)
    return _layout_ok(dataset, folder)


def ensure(name: str, data_dir: str | os.PathLike | None = None, mirror: str | None = None,
           from_zip: str | os.PathLike | None = None, opts: Transfer | None = None,
           quiet: bool = False) -> Path:
    """Return the folder of a ready dataset, downloading and unpacking it if needed."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)}, all)")
    dataset = DATASETS[name]
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    mirror = mirror if mirror is not None else os.environ.get("DLSTUDY_MIRROR") or None
    folder = data_dir / dataset.folder
    if from_zip is None and is_ready(name, data_dir):
        return folder
    if not quiet:
        print(f"{name}: fetching into {folder}", file=sys.stderr)
    try:
        if dataset.archive_root is None:  # plain files (MNIST): keep them where they land
            for remote in dataset.files:
                fetch_file(remote, data_dir / remote.name, mirror, opts)
            return folder
        (remote,) = dataset.files
        archive = data_dir / "downloads" / remote.name
        if from_zip is not None:
            from_zip = Path(from_zip).expanduser()
            if not from_zip.is_file():
                raise UserError(f"--from-zip: no such file {from_zip}")
            _adopt_zip(remote, from_zip, archive)
        else:
            fetch_file(remote, archive, mirror, opts)
    except DownloadError as exc:
        hint = dataset.manual or "check your connection, or pass --mirror DIR"
        raise DownloadError(f"{name}: {exc}. To fix: {hint}") from None
    safe_extract(archive, folder, dataset.archive_root or "")
    if not _layout_ok(dataset, folder):
        raise UserError(f"{name}: {folder} is incomplete after unpacking {archive}; delete both and retry")
    return folder


def _adopt_zip(remote: RemoteFile, source: Path, archive: Path) -> None:
    try:
        remote.check(source)
    except VerifyError as exc:
        raise UserError(f"--from-zip {source}: not the expected archive: {exc}") from None
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    shutil.copyfile(source, part)
    os.replace(part, archive)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Download and verify the study's datasets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("datasets", nargs="+", choices=[*DATASETS, "all"], metavar="DATASET",
                        help=f"one or more of: {', '.join(DATASETS)}, all")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where datasets live (default: $DLSTUDY_DATA_DIR or data/datasets/)")
    parser.add_argument("--mirror", default=None,
                        help="folder or URL laid out like ../shared/datasets, tried first (or $DLSTUDY_MIRROR)")
    parser.add_argument("--from-zip", type=Path, default=None,
                        help="use a zip you downloaded by hand (one archive dataset only)")
    parser.add_argument("--retries", type=int, default=3, help="attempts per source on network errors")
    args = parser.parse_args(argv)
    names = list(DATASETS) if "all" in args.datasets else list(dict.fromkeys(args.datasets))
    if args.from_zip is not None and (len(names) != 1 or DATASETS[names[0]].archive_root is None):
        raise UserError("--from-zip takes exactly one archive dataset: fruits or pennfudan")
    data_dir = args.data_dir or default_data_dir()
    opts = Transfer(retries=max(1, args.retries))
    for name in names:
        if args.from_zip is None and is_ready(name, data_dir):
            if DATASETS[name].archive_root is None:  # re-check the files: cheap for MNIST
                for remote in DATASETS[name].files:
                    fetch_file(remote, data_dir / remote.name, args.mirror, opts)
            print(f"{name}: present and verified in {data_dir / DATASETS[name].folder}")
            continue
        folder = ensure(name, data_dir, args.mirror, args.from_zip, opts)
        print(f"{name}: downloaded and verified into {folder}")


if __name__ == "__main__":
    run_main(main)
