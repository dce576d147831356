"""Run a chapter script the way a user does: in its own Python process.

One framework per process: torchvision imported after tensorflow segfaults, so a test
never imports a chapter's framework itself; it runs the script and reads its outputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


def run_script(script: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo root; fail the test with its output if it fails."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env or script_env(), capture_output=True,
                            text=True, timeout=timeout)
    result.seconds = time.monotonic() - start
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def run_chapter(script: str, output_dir: Path, *args: str, timeout: float = 300,
                env: dict[str, str] | None = None) -> dict:
    """Run a chapter script with --output-dir and return its metrics.json."""
    result = run_script(script, "--output-dir", str(output_dir), *args, timeout=timeout, env=env)
    metrics_path = Path(output_dir) / "metrics.json"
    assert metrics_path.is_file(), f"{script} wrote no metrics.json\n{result.stderr[-3000:]}"
    metrics = json.loads(metrics_path.read_text())
    metrics["_wall_seconds"] = result.seconds
    return metrics


def run_python(code: str, chapter: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh Python from the repo root, with the `chapter` folder
    importable; fail the test with its output if it fails."""
    prefix = f"import sys; sys.path.insert(0, {str(REPO / chapter)!r})\n" if chapter else ""
    result = subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code)], cwd=REPO,
                            env=script_env(), capture_output=True, text=True, timeout=timeout)
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
    return subprocess.run([sys.executable, "-c", _NO_TEST_READS, script, *map(str, args)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=timeout)


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
