"""tests/warm_python.py: a run forked from a warm Python looks, from outside, like the same
command started in a new interpreter. The server here preloads `json` (any module does:
the fork and the child's set-up are what is checked), so these tests take seconds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, WarmPython, script_env

PROBE = """
import json, os, sys
json.runs = getattr(json, "runs", 0) + 1  # 1 in each run: nothing is left from an earlier one
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "flag": os.environ.get("WARM_TEST_FLAG"), "runs": json.runs}))
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
    for argv in ([str(script), "x", "3"], ["-c", PROBE, "y", "0"]):
        expected = cold(argv, env)
        for _ in range(2):  # the second run starts from the server's state, not the first run's
            got = warm.run(argv, env, timeout=60)
            assert (got.returncode, got.stdout, got.stderr) == (
                expected.returncode, expected.stdout, expected.stderr)
    assert '"runs": 1' in got.stdout and '"flag": "on"' in got.stdout


def test_an_uncaught_error_gives_the_same_traceback(warm):
    code = "def f():\n    raise ValueError('boom')\nf()\n"
    expected = cold(["-c", code], script_env())
    got = warm.run(["-c", code], script_env(), timeout=60)
    assert got.returncode == expected.returncode == 1
    assert got.stderr == expected.stderr and "warm_python" not in got.stderr


def test_a_run_past_its_timeout_is_killed_and_the_next_run_still_works(warm):
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run(["-c", "import time; time.sleep(60)"], script_env(), timeout=1)
    assert warm.process.poll() is not None  # that server was stopped, its run with it
    again = WarmPython(("json",))
    try:
        assert again.run(["-c", "print('ok')"], script_env(), timeout=60).stdout == "ok\n"
    finally:
        again.close()
