"""Config files, command-line flags and user-facing errors, shared by every chapter.

Each chapter keeps a `config.toml` beside its script. That file is the single source
of truth: every top-level key becomes a flag (`epochs` -> `--epochs`, `val_split` ->
`--val-split`), its type is the type of the default, and a `[smoke]` table holds the
overrides that `--smoke` applies (fewer epochs, a smaller model). A user's own
`--config FILE` may set any subset of the keys; unknown keys and wrong types are errors.

Precedence, lowest first: config.toml beside the script < --config FILE < [smoke] (with
--smoke) < flags given on the command line.

Errors a user can fix (bad flag, missing data, corrupt file) raise `UserError`;
`run_main` prints them as one line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A problem the user can fix; shown as one line, never as a traceback."""


class Terminated(BaseException):
    """SIGTERM (a killed job, `kill PID`, a scheduler's time-out), raised like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a chapter's main(); turn UserError, Ctrl-C and SIGTERM into a clean exit.

    A run that fails (or is interrupted or killed) before its training started leaves nothing
    behind: what it wrote in its output folder is removed (`outputs.discard_unstarted_runs`),
    so the corrected command can use the same folder without --overwrite. Once training has
    started, its files stay (the last epoch's checkpoint, to resume from)."""
    from data import outputs  # here, not at the top: data.outputs imports this module

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            outputs.forget_unstarted_runs()
        else:
            outputs.discard_unstarted_runs()
        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if isinstance(exc, Terminated):
            print("terminated (SIGTERM)", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        raise
    outputs.forget_unstarted_runs()  # a run that ends well keeps all it wrote


# --- Config files -----------------------------------------------------------------

_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:  # a folder, no permission, ...
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Check `value` against the type of `default`; an int is accepted for a float key."""
    kind = type(default)
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise UserError(
            f"{source}: '{key}' must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}"
        )
    if kind is list and default and any(type(v) is not type(default[0]) for v in value):
        raise UserError(f"{source}: '{key}' must be a list of {type(default[0]).__name__}")
    return value


def merge_config(base: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """Return base updated with overrides, rejecting unknown keys and wrong types."""
    merged = dict(base)
    for key, value in overrides.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise UserError(f"{source}: unknown key '{key}' (known keys: {known})")
        merged[key] = _coerce(key, value, base[key], source)
    return merged


def config_comments(path: Path) -> dict[str, str]:
    """The comment of each top-level key of a config.toml, for `--help`.

    A key's comment is the run of comment lines right above it (no blank line between;
    section rulers such as `# --- training` are skipped) followed by the comment on its own
    line and on the indented comment-only lines under it. Keys in tables ([smoke]) are skipped.
    """
    comments: dict[str, str] = {}
    above: list[str] = []
    last_key = None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            break
        if not line:
            above, last_key = [], None
        elif line.startswith("#"):
            text = line.lstrip("#").strip()
            if last_key is not None and raw[:1].isspace():  # continues the key's own comment
                comments[last_key] = f"{comments[last_key]} {text}".strip()
            elif not text.startswith("---"):
                above.append(text)
                last_key = None
        elif "=" in line:
            key = line.split("=", 1)[0].strip()
            inline = line.split(" #", 1)[1].strip(" #") if " #" in line else ""
            comments[key] = " ".join([*above, inline]).strip()
            above, last_key = [], key
    return comments


# --- Flags -------------------------------------------------------------------------


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _parse_value(kind: type, key: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{_flag(key)} must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {text!r}"
            ) from None

    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every script's other errors."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


class ChapterParser(OneLineParser):
    """argparse with one flag per config key, plus the flags every chapter shares."""

    def __init__(self, doc: str | None, config_path: Path, chapter: str) -> None:
        summary = (doc or "").strip().splitlines()[0] if doc else None
        super().__init__(
            description=summary,
        )
        self.config_path = Path(config_path)
        self.chapter = chapter
        raw = read_toml(self.config_path)
        self.smoke_overrides = raw.pop("smoke", {})
        if not isinstance(self.smoke_overrides, dict):
            raise UserError(f"{self.config_path}: [smoke] must be a table")
        self.defaults = raw
        for key, value in self.defaults.items():
            if isinstance(value, dict):
                raise UserError(f"{self.config_path}: nested table '{key}' is not supported")
        # Validate the [smoke] table against the keys it overrides.
        merge_config(self.defaults, self.smoke_overrides, f"{self.config_path} [smoke]")

        common = self.add_argument_group("common")
        common.add_argument("--config", type=Path, default=None,
                            help=f"TOML file overriding {self.config_path.name}")
        common.add_argument("--output-dir", type=Path, default=None,
                            help=f"where outputs go (default: runs/{chapter}/, or runs/{chapter}-smoke/)")
        common.add_argument("--data-dir", type=Path, default=None,
                            help="dataset folder (default: $DLSTUDY_DATA_DIR or data/datasets/)")
        common.add_argument("--smoke", action="store_true",
                            help="tiny synthetic data, end to end in seconds")
        group = self.add_argument_group(f"config keys (defaults from {self.config_path.name})")
        common.add_argument("--overwrite", action="store_true",
                            help="replace the run already in --output-dir (its files are removed "
                                 "first); without it such a folder is refused")
        comments = config_comments(self.config_path)
        for key, value in self.defaults.items():
            help_text = comments.get(key, "").replace("%", "%%")  # argparse formats help with %
            if isinstance(value, bool):
                group.add_argument(_flag(key), dest=key, action=argparse.BooleanOptionalAction,
                                   default=None, help=f"{help_text} (default: {value})".strip())
            elif isinstance(value, list):
                kind = type(value[0]) if value else str
                group.add_argument(_flag(key), dest=key, nargs="*", type=_parse_value(kind, key),
                                   default=None, help=f"{help_text} (default: {value})".strip())
            else:
                group.add_argument(_flag(key), dest=key, type=_parse_value(type(value), key),
                                   default=None, help=f"{help_text} (default: {value})".strip())

    def parse_config(self, argv: Sequence[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
        """Parse flags and return (resolved config, namespace with the common flags)."""
        args = self.parse_args(argv)
        cfg = dict(self.defaults)
        if args.config is not None:
            cfg = merge_config(cfg, read_toml(args.config), str(args.config))
        if args.smoke:
            cfg = merge_config(cfg, self.smoke_overrides, f"{self.config_path} [smoke]")
        for key in self.defaults:
            value = getattr(args, key)
            if value is not None:
                cfg[key] = value
        if args.output_dir is None:
            suffix = "-smoke" if args.smoke else ""
            args.output_dir = REPO_ROOT / "runs" / f"{self.chapter}{suffix}"
        if args.data_dir is None:
            args.data_dir = default_data_dir()
        if args.data_dir.exists() and not args.data_dir.is_dir():
            self.error(f"--data-dir {args.data_dir} is a file; give a folder (it is created if missing)")
        if "seed" in cfg and not 0 <= cfg["seed"] < 2**32:  # numpy's range, checked before any work
            self.error(f"--seed must be in 0..{2**32 - 1}, got {cfg['seed']}")
        return cfg, args


def usable_cores() -> int:
    """The CPU cores this process may run on: `num_threads = 0` means these.

    Fewer than the machine has when the process is pinned (taskset, a container's CPU
    set, or the test suite giving each parallel worker its own core); os.cpu_count()
    would count them all and oversubscribe the pinned ones."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no CPU sets here
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_data_dir() -> Path:
    env = os.environ.get("DLSTUDY_DATA_DIR")
    return Path(env) if env else REPO_ROOT / "data" / "datasets"


def require(condition: bool, message: str) -> None:
    """Check a user-supplied value; raise UserError with `message` if it is wrong."""
    if not condition:
        raise UserError(message)


def require_at_least(cfg: dict[str, Any], key: str, minimum: float, why: str = "") -> None:
    """--key must be >= minimum; the message names the flag, the bound and the value given."""
    reason = f" ({why})" if why else ""
    require(cfg[key] >= minimum, f"{_flag(key)} must be at least {minimum}{reason}, got {cfg[key]}")


def require_positive(cfg: dict[str, Any], key: str) -> None:
    require(cfg[key] > 0, f"{_flag(key)} must be positive, got {cfg[key]}")


def seed_everything(seed: int) -> None:
    """Seed Python and numpy; each chapter seeds its own framework on top.

    Python's string hashing (the order of a set of strings) is not seeded here: only
    PYTHONHASHSEED in the environment *before* the interpreter starts fixes it, and setting
    it at run time has no effect. No figure depends on it: every set that reaches an output
    or a message is sorted first (the same-seed tests run each script in a fresh process,
    with a fresh hash seed, and compare the figures)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
