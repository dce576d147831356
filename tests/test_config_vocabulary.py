"""Every chapter speaks one config vocabulary, and every key explains itself in --help."""

from __future__ import annotations

import pytest

from data.cli import config_comments, read_toml
from tests.helpers import REPO

CONFIGS = sorted(REPO.glob("[0-9][0-9]*_*/config.toml"))

# Names a learner may know from another chapter, and the one name used everywhere instead.
RETIRED = {
    "num_epochs": "epochs", "lr": "learning_rate", "val_size": "val_fraction",
    "val_split": "val_fraction", "num_val": "val_fraction", "num_test": "test_fraction",
    "val_every": "eval_every", "threads": "num_threads", "eval_test": "evaluate_test",
    "weight": "weights", "img_size": "image_size", "input_size": "image_size",
}


def test_there_are_chapter_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_every_key_has_a_comment_for_help(path):
    keys = [key for key, value in read_toml(path).items() if not isinstance(value, dict)]
    comments = config_comments(path)
    missing = [key for key in keys if not comments.get(key)]
    assert not missing, f"{path}: keys without a comment (shown by --help): {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_shared_concepts_use_the_shared_key_names(path):
    keys = set(read_toml(path)) - {"smoke"}
    retired = {key: RETIRED[key] for key in keys if key in RETIRED}
    assert not retired, f"{path}: rename {retired}"
    assert "seed" in keys
    if (path.parent / "train.py").is_file():
        assert {"device", "num_threads", "evaluate_test"} <= keys, path
