"""A Python that imports a deep-learning framework once, then runs each script in a child
forked from itself: the child starts with the framework already imported.

Importing TensorFlow or torch takes 4-6 s of one core, and tearing its modules down at
exit about a second more; the smoke tests run about a hundred chapter scripts, so much of
their time went to importing and unloading the same framework again. Each run is still
its own process (its own modules, globals, exit code and output), and only one framework
is ever imported in it. tests/helpers.py starts one of these per pytest
worker and framework, and talks to it over stdin/stdout, one JSON line each way:

    request:  {"id": N, "argv": ["03_tf_od_api/train.py", "--smoke"], "cwd": ..., "env": {...},
               "stdout": FILE, "stderr": FILE}       argv may also be ["-c", CODE, ...]
    replies:  {"ready": true} once, when the imports are done; then for each request
              {"id": N, "pid": PID}, and {"id": N, "returncode": CODE} when the child has exited

Usage: python tests/warm_python.py MODULE [MODULE ...]   (e.g. keras keras_hub)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import signal
import sys
import threading

HERE = os.path.abspath(__file__)


def run_child(request: dict) -> None:
    """In the forked child: become the process `python ARGV...` would have been, then run
    ARGV's script (or -c code) as __main__. Never returns: it ends the way Python ends a
    script, so an uncaught exception prints its traceback and exits 1, and sys.exit(2)
    exits 2, after the usual clean-up (atexit handlers, flushed output)."""
    os.setsid()  # the child and anything it starts form one group, killed together on a timeout
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (for the child's whole life)
    try:
        run_main(request["argv"])
        code = 0
    except SystemExit as done:
        code = exit_code(done)
    except BaseException as error:  # reported as Python reports it, without this file's frames
        tb = error.__traceback__
        while tb is not None and (tb.tb_frame.f_code.co_filename == HERE
                                  or tb.tb_frame.f_globals.get("__name__") == "runpy"):
            tb = tb.tb_next
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        code = 1
    # Python's own exit, less its last step: threads joined, atexit handlers run, stdout
    # and stderr flushed, then out, without tearing down every module one by one (about a
    # second with a framework loaded). That step would also flush a file a script left
    # open; the chapters close what they write, and the tests read it all back.
    threading._shutdown()  # CPython's own calls for the first two steps
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(done: SystemExit) -> int:
    """The status `python` exits with for this SystemExit (a message goes to stderr, status 1)."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code & 0xFF
    print(done.code, file=sys.stderr)
    return 1


def run_main(argv: list[str]) -> None:
    """`python -c CODE ARGS...` or `python SCRIPT ARGS...`, from sys.argv on."""
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def serve(replies) -> None:
    current = {"pid": None}

    def stop(signum, _frame):
        """Ctrl-C, or the pytest worker gone: the running child goes too (it is in a
        process group of its own, so the terminal's signal does not reach it)."""
        if current["pid"] is not None:
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                os.killpg(current["pid"], signal.SIGKILL)
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a new interpreter
            replies.close()
            run_child(request)
        current["pid"] = pid
        replies.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        current["pid"] = None
        replies.write(json.dumps({"id": request["id"], "returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    # The replies get their own copy of stdout; fd 1 then goes where stderr goes, so that
    # nothing the server or a framework prints can be read as a reply.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in sys.argv[1:]:
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    channel.write(json.dumps({"ready": True}) + "\n")  # what the imports printed is in stderr now
    channel.flush()
    serve(channel)
