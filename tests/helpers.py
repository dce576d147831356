"""Run a chapter script the way a user does: in its own Python process.

One framework per process: torchvision imported after tensorflow segfaults, so a test
never imports a chapter's framework itself; it runs the script and reads its outputs.

A chapter's runs start warm: each is a child forked from a Python that has already
imported the chapter's framework (tests/warm_python.py), which spares the 4-6 s import
that most short runs would otherwise spend. A run starts cold, as `python script.py`
in a new interpreter, when its test asks (`fresh=True`: each chapter's main smoke run
and checks of what a script imports), when it changes an environment
variable a framework may read on import, and everywhere with DLSTUDY_TEST_FRESH=1.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# What each chapter's scripts import: the modules its warm Python imports up front. One set
# for all the TensorFlow chapters (KerasHub as well: 03 and 04b need it, and the others'
# runs are the same with it loaded), so that a worker moving between them keeps its Python.
TENSORFLOW, TORCH = ("tensorflow", "keras", "keras_hub"), ("torch", "torchvision")
CHAPTER_FRAMEWORKS = {
    "01_mnist": TENSORFLOW, "02_fruit_cnn": TENSORFLOW, "02b_fruit_cnn_aug": TENSORFLOW,
    "03_tf_od_api": TENSORFLOW, "04b_instance_seg": TENSORFLOW,
    "03b_xml_detection": TORCH, "04_semantic_bg": TORCH,
}
# A script whose framework is not its chapter's: 04b's converter runs torchvision (forked from
# the chapter's warm TensorFlow, it would crash).
SCRIPT_FRAMEWORKS = {"04b_instance_seg/convert_coco.py": TORCH}
# A proxy nothing listens on: every download is refused at once, "offline" even on a
# networked machine.
CLOSED_PROXY = "http://127.0.0.1:9"
OFFLINE = {"HTTPS_PROXY": CLOSED_PROXY, "HTTP_PROXY": CLOSED_PROXY, "https_proxy": CLOSED_PROXY,
           "http_proxy": CLOSED_PROXY, "NO_PROXY": "", "no_proxy": ""}
# Environment variables read only while a script runs, never on a framework's import (urllib
# reads the proxies per request, kagglehub KAGGLEHUB_CACHE and torch.hub TORCH_HOME per call): a
# test may set these and still start warm. Any other change starts the run cold:
# CUDA_VISIBLE_DEVICES, and KERAS_HOME, which Keras reads on import.
RUN_TIME_ENV = {"DLSTUDY_MIRROR", "KAGGLEHUB_CACHE", "TORCH_HOME", *OFFLINE}


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


class WarmPython:
    """One tests/warm_python.py process: it imports `modules` once, then each `run` is a
    child forked from it, as if `python ARGV...` had been started with those imports done.
    If the imports print anything but TensorFlow's log lines (a warning a user would see
    after an error message, say), `usable` is False and the runs start cold instead."""

    def __init__(self, modules: tuple[str, ...]):
        self.modules_key = modules
        self.log = tempfile.NamedTemporaryFile(prefix="warm_python_", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "warm_python.py"), *modules], cwd=REPO,
            env=script_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.pending, self.requests = b"", 0
        ready = self._reply(180)
        printed = self._log_text()
        self.usable = ready == {"ready": True} and all(
            _is_tf_log_line(line) or not line.strip() for line in printed.splitlines())

    def _log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def _reply(self, timeout: float) -> dict | None:
        """The next JSON line from the server, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the warm Python exited:\n{self._log_text()[-3000:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], env: dict[str, str], timeout: float,
            stop_at: re.Pattern | None = None) -> subprocess.CompletedProcess:
        """`python ARGV...` as a forked child. On any failure of the server itself (or a
        timeout) the server is stopped, and the next run starts a new one. With `stop_at`,
        the child gets SIGTERM once its stdout matches it; `.stopped_after` is then the
        stdout up to the end of the matching line (else None)."""
        self.requests += 1
        with tempfile.TemporaryDirectory(prefix="warm_run_") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()  # there before the child opens them (O_TRUNC), for _wait to read
            err.touch()
            request = {"id": self.requests, "argv": argv, "cwd": str(REPO), "env": env,
                       "stdout": str(out), "stderr": str(err)}
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
                started = self._reply(60)
                if started is None or started.get("id") != self.requests:
                    raise RuntimeError(f"the warm Python did not start the run: {started}")
                done, stopped_after = self._wait(started["pid"], out, timeout, stop_at)
                if done is None:
                    raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            except BaseException:
                self.close(kill=True)
                raise
            result = subprocess.CompletedProcess([sys.executable, *argv], done["returncode"],
                                                 out.read_text(), err.read_text())
            result.stopped_after = stopped_after
            return result

    def _wait(self, pid: int, out: Path, timeout: float, stop_at: re.Pattern | None) -> tuple:
        """(the "done" reply or None after `timeout`, the stdout up to the end of the first
        whole line matching `stop_at`, or None); with `stop_at`, the child's stdout is read
        five times a second, and the child gets SIGTERM at the first match."""
        if stop_at is None:
            return self._reply(timeout), None
        deadline, stopped_after = time.monotonic() + timeout, None
        while True:
            left = deadline - time.monotonic()
            done = self._reply(min(left, 0.2)) if left > 0 else None
            if stopped_after is None:  # read once more after the end: the line may be the last
                text = out.read_bytes().decode(errors="replace")
                lines = text[:text.rfind("\n") + 1]  # whole lines only
                if match := stop_at.search(lines):
                    end = lines.find("\n", match.end())
                    stopped_after = lines if end < 0 else lines[:end + 1]
                    if done is None:
                        with contextlib.suppress(ProcessLookupError):  # it has just exited
                            os.kill(pid, signal.SIGTERM)
            if done is not None or left <= 0:
                return done, stopped_after

    def close(self, kill: bool = False) -> None:
        """Stop the server (it kills a run still going) and forget it."""
        if self.process.poll() is None:
            self.process.stdin.close()
            if kill:
                self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        if _warm.get(self.modules_key) is self:
            del _warm[self.modules_key]


# At most two warm Pythons per pytest worker, one per framework (each process imports only
# its own): a worker moving between TensorFlow and PyTorch chapters keeps both (together
# about 1.5 GB of memory) instead of importing one again at each move.
_warm: dict[tuple[str, ...], WarmPython] = {}


@atexit.register
def _close_warm_pythons() -> None:
    for warm in list(_warm.values()):
        warm.close()


# Set by pytest for each test; not a change a test made to the environment.
_IGNORED_ENV = {"PYTEST_CURRENT_TEST"}


def _warm_for(modules: tuple[str, ...] | None, env: dict[str, str] | None, fresh: bool) -> WarmPython | None:
    """The warm Python (importing `modules`) a run may use, or None when it must start cold."""
    if fresh or not modules or os.environ.get("DLSTUDY_TEST_FRESH") == "1" or modules in _noisy:
        return None
    if env is not None:
        base = script_env()
        changed = {key for key in env.keys() | base.keys() if env.get(key) != base.get(key)}
        if changed - RUN_TIME_ENV - _IGNORED_ENV:
            return None
    if modules not in _warm:
        warm = WarmPython(modules)
        if not warm.usable:
            _noisy.add(modules)
            warm.close(kill=True)
            return None
        _warm[modules] = warm
    return _warm[modules]


_noisy: set[tuple[str, ...]] = set()  # module sets whose import prints something: always cold


def _run(argv: list[str], modules: tuple[str, ...] | None, env: dict[str, str] | None, timeout: float,
         fresh: bool) -> subprocess.CompletedProcess:
    """`python ARGV...` from the repo root, warm when it may be (see the module docstring)."""
    warm = _warm_for(modules, env, fresh)
    if warm is not None:
        return warm.run(argv, env or script_env(), timeout)
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)


def frameworks_of(script: str) -> tuple[str, ...] | None:
    """The modules a script imports: its own entry in SCRIPT_FRAMEWORKS, else its chapter's."""
    path = Path(script)
    if path.is_absolute() and path.is_relative_to(REPO):
        path = path.relative_to(REPO)
    return SCRIPT_FRAMEWORKS.get(path.as_posix()) or CHAPTER_FRAMEWORKS.get(path.parts[0])


def run_script(script: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
               check: bool = True, fresh: bool = False, chapter: str | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo root; fail the test with its output if it
    fails. `chapter` names the framework of a script outside the chapter folders."""
    command = [str(REPO / script), *map(str, args)]
    start = time.monotonic()
    modules = CHAPTER_FRAMEWORKS.get(chapter) if chapter else frameworks_of(script)
    result = _run(command, modules, env, timeout, fresh)
    result.seconds = time.monotonic() - start
    if check and result.returncode != 0:
        raise AssertionError(
            f"python {' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def run_chapter(script: str, output_dir: Path, *args: str, timeout: float = 300,
                env: dict[str, str] | None = None, fresh: bool = False) -> dict:
    """Run a chapter script with --output-dir and return its metrics.json."""
    result = run_script(script, "--output-dir", str(output_dir), *args, timeout=timeout, env=env,
                        fresh=fresh)
    metrics_path = Path(output_dir) / "metrics.json"
    assert metrics_path.is_file(), f"{script} wrote no metrics.json\n{result.stderr[-3000:]}"
    metrics = json.loads(metrics_path.read_text())
    metrics["_wall_seconds"] = result.seconds
    return metrics


def run_python(code: str, chapter: str | None = None, timeout: float = 240, args: tuple = (),
               fresh: bool = False) -> subprocess.CompletedProcess:
    """Run a snippet (`python -c CODE ARGS...`) in its own Python from the repo root, with
    the `chapter` folder importable; fail the test with its output if it fails."""
    prefix = f"import sys; sys.path.insert(0, {str(REPO / chapter)!r})\n" if chapter else ""
    result = _run(["-c", prefix + textwrap.dedent(code), *map(str, args)], CHAPTER_FRAMEWORKS.get(chapter or ""),
                  None, timeout, fresh)
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    return result


# Runs a script with every read of a file under a test_zip/ folder refused: a
# --no-evaluate-test run must never open a test photo or its XML (writing the smoke data
# is allowed). The audit hook sees every open() made by Python, Pillow and ElementTree.
_NO_TEST_READS = """
import os, runpy, sys
def guard(event, args):
    if event == "open" and "test_zip" in str(args[0]):
        mode, flags = args[1], args[2]
        writing = any(c in (mode or "") for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
        if not writing:
            raise RuntimeError(f"a test file was read: {args[0]}")
sys.addaudithook(guard)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


def run_without_test_reads(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python <script> <args>` that fails ("a test file was read") if it reads a test file."""
    return _run(["-c", _NO_TEST_READS, script, *map(str, args)], frameworks_of(script), None, timeout,
                fresh=False)


# The chapter's compile function is given a stand-in that keeps the optimizer; the rate is
# then read from that optimizer at each step, as training would see it.
_LEARNING_RATES = """
import json
import {module} as chapter

class Compiled:
    def compile(self, optimizer, **_):
        self.optimizer = optimizer

net = Compiled()
chapter.{function}(net, {cfg!r}, steps_per_epoch={steps_per_epoch})
rates = []
for step in {steps!r}:
    net.optimizer.iterations.assign(step)
    rates.append(float(net.optimizer.learning_rate))
print("JSON" + json.dumps(rates))
"""


def keras_learning_rates(chapter: str, module: str, function: str, cfg: dict,
                         steps_per_epoch: int, steps: list[int]) -> list[float]:
    """The learning rate at each of `steps` of the schedule a Keras chapter's
    `module.function(model, cfg, steps_per_epoch)` compiles into its optimizer."""
    code = _LEARNING_RATES.format(module=module, function=function, cfg=cfg,
                                  steps_per_epoch=steps_per_epoch, steps=steps)
    result = run_python(code, chapter, timeout=180)
    line = next(line for line in result.stdout.splitlines() if line.startswith("JSON"))
    return json.loads(line[4:])


# TensorFlow's C++ runtime writes these to stderr on import, whatever TF_CPP_MIN_LOG_LEVEL
# says: the absl notice, and glog-style lines such as "I0000 00:00:... cpu_feature_guard.cc".
_TF_LOG_LINE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} \d\d:)")


def _is_tf_log_line(line: str) -> bool:
    return bool(_TF_LOG_LINE.match(line))


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> None:
    """A user mistake: exit `code`, no traceback, one stderr line that names the problem."""
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not _is_tf_log_line(line)]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr


def mnist_photo(digit, size: int = 90, canvas=(200, 150), at=(70, 40)):
    """An MNIST-style digit (28x28 uint8) as a photo: dark ink on white paper, enlarged,
    off-centre, as a PIL image."""
    from PIL import Image

    ink = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BICUBIC)
    paper = Image.new("L", canvas, 255)
    paper.paste(ink, at)
    return paper.convert("RGB")


def interrupt_after(script: str, output_dir: Path, *args: str, pattern: str, timeout: float = 300,
                    env: dict[str, str] | None = None) -> str:
    """Start `python <script> --output-dir DIR <args>` (warm where run_script's would be), and
    send it SIGTERM (a killed job; Ctrl-C is SIGINT) as soon as a line of its stdout matches
    `pattern` (say, the line printed once epoch k's checkpoint is written). Returns the stdout
    up to that line; fails the test if the run ends, or `timeout` passes, before it is seen."""
    matcher = re.compile(pattern, re.M)
    warm = _warm_for(frameworks_of(script), env, fresh=False)
    if warm is not None:
        argv = [str(REPO / script), "--output-dir", str(output_dir), *map(str, args)]
        result = warm.run(argv, env or script_env(), timeout, stop_at=matcher)
        if result.stopped_after is None:
            raise AssertionError(f"{script} never printed a line matching {pattern!r} (exit "
                                 f"{result.returncode})\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stopped_after
    command = [sys.executable, str(REPO / script), "--output-dir", str(output_dir), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=env or script_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if not ready:
                continue
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if matcher.search(line):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
                return "".join(seen)
        raise AssertionError(f"{script} never printed a line matching {pattern!r} "
                             f"(exit {process.poll()})\n{''.join(seen)[-4000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def assert_failed_start_left_nothing(output_dir: Path, existed_before: bool = False) -> None:
    """A run that failed before training left no file behind: the folder is gone (or, if it
    existed before the run, it is empty), so the corrected command needs no --overwrite."""
    output_dir = Path(output_dir)
    if existed_before:
        assert output_dir.is_dir() and not any(output_dir.iterdir()), sorted(output_dir.iterdir())
    else:
        assert not output_dir.exists(), sorted(p.name for p in output_dir.iterdir())


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No dataset mirror, and every download refused at once (OFFLINE), on any machine: a run
    that needs to fetch data or weights fails, and fails fast."""
    return script_env(DLSTUDY_MIRROR=str(Path(tmp_path) / "no_mirror"), **OFFLINE, **extra)


def chance_99th_percentile(n: int, p: float) -> int:
    """The 99th percentile of Binomial(n, p), from exact sums: the number of right answers
    out of n that guessing (right with probability p) exceeds only 1% of the time."""
    import math

    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= 0.99:
            return k
    return n
