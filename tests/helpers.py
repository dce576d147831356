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
