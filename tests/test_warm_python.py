"""tests/warm_python.py: a run forked from a warm Python looks, from outside, like the same
command started in a new interpreter. The server here preloads `json` (any module does:
the fork and the child's set-up are what is checked), so these tests take seconds."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TENSORFLOW, TORCH, WarmPython, _warm_for, frameworks_of, script_env

PROBE = """
import json, os, sys
json.runs = getattr(json, "runs", 0) + 1  # 1 in each run: nothing is left from an earlier one
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "flag": os.environ.get("WARM_TEST_FLAG"), "dropped": os.environ.get("MPLBACKEND"),
                  "stdin": sys.stdin.read(), "runs": json.runs}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture
def warm():
    server = WarmPython(("json",))
    assert server.usable
    yield server
    server.close()


def cold(argv, env):
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_warm_run_prints_and_exits_as_a_new_interpreter_does(warm, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = script_env(WARM_TEST_FLAG="on")
    del env["MPLBACKEND"]  # set in the server's own environment: gone in the run's
    for argv in ([str(script), "x", "3"], ["-c", PROBE, "y", "0"]):
        expected = cold(argv, env)
        for _ in range(2):  # the second run starts from the server's state, not the first run's
            got = warm.run(argv, env, timeout=60)
            assert (got.returncode, got.stdout, got.stderr) == (
                expected.returncode, expected.stdout, expected.stderr)
    assert '"runs": 1' in got.stdout and '"flag": "on"' in got.stdout and '"dropped": null' in got.stdout


def test_an_uncaught_error_gives_the_same_traceback(warm, tmp_path):
    code = "def f():\n    raise ValueError('boom')\nf()\n"
    script = tmp_path / "boom.py"
    script.write_text(code)
    for argv in (["-c", code], [str(script)]):
        expected = cold(argv, script_env())
        got = warm.run(argv, script_env(), timeout=60)
        assert got.returncode == expected.returncode == 1
        assert got.stderr == expected.stderr and "warm_python" not in got.stderr and "runpy" not in got.stderr


def test_a_run_past_its_timeout_is_killed_and_the_next_run_still_works(warm, tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run(["-c", sleeper], script_env(), timeout=3)
    assert warm.process.poll() is not None  # that server was stopped
    pid = int(pid_file.read_text())
    for _ in range(50):  # and its run with it (gone, or a zombie until init reaps it)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the timed-out run {pid} is still running")
    again = WarmPython(("json",))
    try:
        assert again.run(["-c", "print('ok')"], script_env(), timeout=60).stdout == "ok\n"
    finally:
        again.close()


def test_a_run_gets_sigterm_once_its_stdout_matches(warm):
    # How interrupt_after kills a warm run: SIGTERM at the first whole line that matches, and
    # the stdout up to that line. A line printed just before the run ends is still found.
    epochs = re.compile(r"^epoch +2 ", re.M)
    code = "import time\nfor e in (1, 2, 3):\n    print(f'epoch {e:3d} loss', flush=True)\n    time.sleep(0.3 if e == 1 else 30)"
    start = time.monotonic()
    result = warm.run(["-c", code], script_env(), timeout=60, stop_at=epochs)
    assert result.returncode == -15 and time.monotonic() - start < 10  # killed in epoch 2's sleep
    assert result.stopped_after == "epoch   1 loss\nepoch   2 loss\n" and "epoch   3" not in result.stdout
    ends_at_once = warm.run(["-c", "print('epoch   1 a'); print('epoch   2 b')"], script_env(), timeout=60,
                            stop_at=epochs)
    assert ends_at_once.returncode == 0 and ends_at_once.stopped_after == "epoch   1 a\nepoch   2 b\n"
    never = warm.run(["-c", "print('epoch   1 a')"], script_env(), timeout=60, stop_at=epochs)
    assert never.returncode == 0 and never.stopped_after is None


def test_runs_start_cold_where_a_warm_start_could_differ(monkeypatch, tmp_path):
    mnist = frameworks_of("01_mnist/train.py")
    assert frameworks_of("data/download.py") is None  # no framework to preload
    assert _warm_for(mnist, None, fresh=True) is None
    assert _warm_for(mnist, script_env(KERAS_HOME=str(tmp_path)), fresh=False) is None  # read on import
    assert _warm_for(mnist, script_env(CUDA_VISIBLE_DEVICES=""), fresh=False) is None
    monkeypatch.setenv("DLSTUDY_TEST_FRESH", "1")
    assert _warm_for(mnist, None, fresh=False) is None


def test_a_torch_script_in_a_keras_chapter_gets_the_torch_python():
    # forked from the chapter's warm TensorFlow, torchvision would crash
    assert frameworks_of("04b_instance_seg/convert_coco.py") == TORCH
    assert frameworks_of(REPO / "04b_instance_seg" / "convert_coco.py") == TORCH
    assert frameworks_of("04b_instance_seg/predict.py") == TENSORFLOW


def test_a_framework_whose_import_prints_is_not_used_warm(monkeypatch, tmp_path):
    (tmp_path / "noisy_probe.py").write_text("import sys\nprint('a warning on import', file=sys.stderr)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    server = WarmPython(("noisy_probe",))
    try:
        assert not server.usable
    finally:
        server.close()
    quiet = WarmPython(("json",))
    try:
        assert quiet.usable
    finally:
        quiet.close()
