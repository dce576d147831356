"""Config files and flags: the single source of truth, strictly typed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data.cli import ChapterParser, UserError, merge_config, usable_cores
from tests.helpers import REPO

CONFIG = """
seed = 0
epochs = 10
learning_rate = 0.1
model = "mlp"
augment = true
hidden = [512, 256]

[smoke]
epochs = 1
"""


@pytest.fixture
def parser(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return ChapterParser("Test chapter.", path, "99_test")


def test_defaults_flags_and_smoke(parser, tmp_path):
    cfg, args = parser.parse_config([])
    assert cfg == {"seed": 0, "epochs": 10, "learning_rate": 0.1, "model": "mlp", "augment": True,
                   "hidden": [512, 256]}
    assert args.output_dir.name == "99_test"
    cfg, args = parser.parse_config(["--smoke", "--learning-rate", "3", "--no-augment",
                                     "--hidden", "8", "4", "--seed", "5"])
    assert cfg["epochs"] == 1 and cfg["learning_rate"] == 3.0 and cfg["augment"] is False
    assert cfg["hidden"] == [8, 4] and cfg["seed"] == 5 and args.output_dir.name == "99_test-smoke"
    cfg, _ = parser.parse_config(["--smoke", "--epochs", "4"])  # a flag beats [smoke]
    assert cfg["epochs"] == 4


def test_user_config_file(parser, tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text("epochs = 3\nlearning_rate = 1\n")
    cfg, _ = parser.parse_config(["--config", str(user)])
    assert cfg["epochs"] == 3 and cfg["learning_rate"] == 1.0
    user.write_text("epochz = 3\n")
    with pytest.raises(UserError, match="unknown key 'epochz'"):
        parser.parse_config(["--config", str(user)])
    user.write_text('epochs = "many"\n')
    with pytest.raises(UserError, match="'epochs' must be an integer"):
        parser.parse_config(["--config", str(user)])
    user.write_text("epochs = [\n")
    with pytest.raises(UserError, match="not valid TOML"):
        parser.parse_config(["--config", str(user)])
    with pytest.raises(UserError, match="not found"):
        parser.parse_config(["--config", str(tmp_path / "missing.toml")])
    user.write_bytes(b"epochs = 3\n\xff\xfe\n")
    with pytest.raises(UserError, match="not valid TOML"):
        parser.parse_config(["--config", str(user)])
    with pytest.raises(UserError, match="cannot read config file"):
        parser.parse_config(["--config", str(tmp_path)])  # a folder


def test_bad_flag_value_exits_2(parser, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_config(["--epochs", "ten"])
    assert info.value.code == 2
    assert "--epochs must be an integer" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (["--seed", str(2**32)], "--seed must be in"),
    (["--data-dir", "FILE"], "is a file; give a folder"),
])
def test_seed_range_and_data_dir_file_exit_2(parser, capsys, tmp_path, flags, words):
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / "FILE") if flag == "FILE" else flag for flag in flags]
    with pytest.raises(SystemExit) as info:
        parser.parse_config(flags)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_merge_rejects_bool_for_int_and_bad_lists():
    with pytest.raises(UserError):
        merge_config({"epochs": 1}, {"epochs": True}, "x")
    with pytest.raises(UserError):
        merge_config({"hidden": [1, 2]}, {"hidden": ["a"]}, "x")


def test_bad_smoke_table_is_caught_at_start(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("epochs = 1\n[smoke]\nepoch = 2\n")
    with pytest.raises(UserError, match="unknown key 'epoch'"):
        ChapterParser(None, path, "x")


def test_require_helpers_name_the_flag_bound_and_value():
    from data.cli import require_at_least, require_positive

    cfg = {"batch_size": 1, "learning_rate": 0.0, "epochs": 3}
    require_at_least(cfg, "epochs", 1)
    with pytest.raises(UserError, match=r"^--batch-size must be at least 2 \(BatchNorm\), got 1$"):
        require_at_least(cfg, "batch_size", 2, "BatchNorm")
    with pytest.raises(UserError, match=r"^--learning-rate must be positive, got 0.0$"):
        require_positive(cfg, "learning_rate")


def test_help_shows_each_keys_comment(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        "# chapter header, kept apart by a blank line\n\n"
        "# --- training\n"
        "# peak of the schedule;\n# 50% more than the default\n"
        "learning_rate = 0.1\n"
        "epochs = 10          # passes over the data\n"
        "                     # (continued here)\n"
        "seed = 0\n\n[smoke]\nepochs = 1  # not a top-level key\n")
    parser = ChapterParser("T.", path, "99_test")
    from data.cli import config_comments

    assert config_comments(path) == {
        "learning_rate": "peak of the schedule; 50% more than the default",
        "epochs": "passes over the data (continued here)", "seed": ""}
    text = " ".join(parser.format_help().split())
    assert "50% more than the default (default: 0.1)" in text
    assert "passes over the data (continued here) (default: 10)" in text


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU sets on this platform")
def test_usable_cores_counts_the_cores_a_pinned_process_may_use():
    code = ("import os; from data.cli import usable_cores; "
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(usable_cores())")
    pinned = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=60)
    assert pinned.stdout.strip() == "1"
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_each_parallel_test_worker_has_cores_of_its_own():
    """`make test` runs pytest -n N; tests/conftest.py pins worker i to its share of cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers or not hasattr(os, "sched_getaffinity"):
        pytest.skip("not a parallel (pytest -n) run on a platform with CPU sets")
    total = len(os.sched_getaffinity(os.getppid()))  # the controlling pytest's cores
    if workers > total:
        pytest.skip("more workers than cores: the workers are not pinned")
    assert usable_cores() == total // workers
