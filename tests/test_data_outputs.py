"""data/outputs.py: atomic files, one run per folder, split.json, run facts and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.cli import UserError, run_main
from data.outputs import (
    atomic_path,
    check_resume_config,
    discard_unstarted_runs,
    draw_boxes,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    prepare_output_dir,
    read_split,
    run_facts,
    training_started,
    write_json,
    write_metrics,
    write_split,
)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.keras"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while saving")
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": 1}


def test_plots_are_written(tmp_path):
    import numpy as np

    plot_curves({"loss": [1, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]}, tmp_path / "c.png")
    plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "cm.png")
    plot_image_grid([np.zeros((8, 8), np.uint8)] * 3, ["x", "y", "z"], tmp_path / "g.png", columns=2)
    for name in ("c.png", "cm.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_write_metrics_saves_json_and_prints_one_line(tmp_path, capsys):
    write_metrics(tmp_path, {"map50": 0.61234, "epochs": 80, "weights": "none"})
    assert json.loads((tmp_path / "metrics.json").read_text())["map50"] == 0.61234
    first, second = capsys.readouterr().out.splitlines()
    assert first == "map50 0.612  epochs 80  weights none"
    assert second == f"outputs in {tmp_path}"


def test_draw_boxes_outlines_each_box_in_its_class_colour():
    import numpy as np

    image = np.full((100, 120, 3), 255, np.uint8)
    drawn = draw_boxes(image, np.array([[10, 20, 60, 80]]), np.array([1]), ["apple", "banana"],
                       scores=np.array([0.9]), colors={"banana": (0, 0, 255)})
    assert drawn.shape == image.shape and (image == 255).all()  # the input is left alone
    assert tuple(drawn[50, 10]) == (0, 0, 255) and tuple(drawn[80, 35]) == (0, 0, 255)
    assert tuple(drawn[50, 35]) == (255, 255, 255)  # inside the box, away from the caption
    default = draw_boxes(image, np.array([[10, 20, 60, 80]]), np.array([0]), ["apple", "banana"])
    assert tuple(default[50, 10]) != (255, 255, 255)  # a palette colour when none is given


def _finished_run(folder, cfg):
    prepare_output_dir(folder, cfg)
    (folder / "model.keras").write_bytes(b"old model")
    (folder / "wrong.png").write_bytes(b"old plot")
    write_metrics(folder, {"accuracy": 0.9})


def test_a_finished_run_is_refused_and_left_untouched(tmp_path):
    folder = tmp_path / "run"
    _finished_run(folder, {"seed": 0})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match=r"already holds a finished run; pass --overwrite.*--output-dir"):
        prepare_output_dir(folder, {"seed": 1})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_overwrite_removes_the_earlier_runs_files(tmp_path):
    folder = tmp_path / "run"
    _finished_run(folder, {"seed": 0})
    (folder / "saved_model").mkdir()
    (folder / "saved_model" / "x.pb").write_bytes(b"old")
    prepare_output_dir(folder, {"seed": 1}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert json.loads((folder / "config.json").read_text()) == {"seed": 1}


def test_unfinished_run_and_smoke_runs(tmp_path):
    folder = tmp_path / "run"
    prepare_output_dir(folder, {"seed": 0})  # config.json only: an interrupted run
    with pytest.raises(UserError, match=r"an unfinished run.*--resume"):
        prepare_output_dir(folder, {"seed": 0})
    smoke = tmp_path / "smoke"
    _finished_run(smoke, {"seed": 0, "smoke": True})
    prepare_output_dir(smoke, {"seed": 0}, smoke=True)  # scratch space: replaced
    assert not (smoke / "model.keras").exists()
    prepare_output_dir(tmp_path / "new", {"seed": 0})  # an empty or missing folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_output_dir(tmp_path / "file", {"seed": 0})


def test_resume_checks_the_config(tmp_path):
    folder = tmp_path / "run"
    prepare_output_dir(folder, {"seed": 0, "epochs": 10, "image_size": 320})
    (folder / "checkpoint.pt").write_bytes(b"state")
    prepare_output_dir(folder, {"seed": 0, "epochs": 20, "image_size": 320}, resume=True)
    assert (folder / "checkpoint.pt").read_bytes() == b"state"
    with pytest.raises(UserError, match=r"made with image_size=320, not 256"):
        prepare_output_dir(folder, {"seed": 0, "epochs": 20, "image_size": 256}, resume=True)
    with pytest.raises(UserError, match=r"config\.json is missing"):
        check_resume_config(tmp_path / "nothing", {"seed": 0})


def test_split_is_saved_and_a_resume_with_another_split_is_refused(tmp_path):
    write_split(tmp_path, {"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    assert json.loads((tmp_path / "split.json").read_text()) == {
        "train": ["a", "b"], "val": ["c"], "test": ["d"]}
    write_split(tmp_path, {"train": ["a", "b"], "val": ["c"], "test": ["d"]}, resume=True)
    with pytest.raises(UserError, match=r"the (train|val) split differs"):
        write_split(tmp_path, {"train": ["a", "c"], "val": ["b"], "test": ["d"]}, resume=True)
    (tmp_path / "split.json").write_text('{"train": ["a"')  # a file cut short
    with pytest.raises(UserError, match="not readable JSON"):
        write_split(tmp_path, {"train": ["a", "b"], "val": ["c"], "test": ["d"]}, resume=True)
    (tmp_path / "split.json").write_text('["a", "b"]')  # JSON, but not a split
    with pytest.raises(UserError, match="not readable JSON"):
        read_split(tmp_path / "split.json")


def test_run_facts_name_the_date_versions_and_machine():
    facts = run_facts(frameworks=("pytest", "not-a-package"), device="cpu")
    assert facts["date"][:2] == "20" and facts["python"].count(".") == 2
    assert facts["pytest_version"] and facts["not_a_package_version"] is None
    assert facts["numpy_version"] == np.__version__
    assert facts["device"] == "cpu" and facts["device_name"] and facts["num_cores"] >= 1


def test_print_detections_one_line_per_box(capsys):
    from data.outputs import print_detections

    lines = print_detections("a.jpg", np.array([[1.4, 2.6, 30, 40]]), np.array([1]), np.array([0.91234]),
                             ["apple", "banana"], 0.3)
    assert lines == ["a.jpg  banana  0.912  1 3 30 40"]
    assert print_detections("b.jpg", np.zeros((0, 4)), [], [], ["apple"], 0.3) == []
    assert capsys.readouterr().out.splitlines() == [lines[0], "b.jpg  nothing found (score >= 0.3)"]


# --- A failed start leaves nothing behind ---------------------------------------------------


def _failing_main(output_dir, *, fail_after_start=False, resume=False, error=None):
    """A chapter's main in miniature: claim the folder, write files, then fail."""
    def main(argv):
        prepare_output_dir(output_dir, {"epochs": 1}, resume=resume)
        (output_dir / "smoke-data").mkdir()
        (output_dir / "smoke-data" / "a.txt").write_text("x")
        if fail_after_start:
            training_started(output_dir)
            (output_dir / "checkpoint.npz").write_text("epoch 1")
        raise error or UserError("no data")
    return main


@pytest.mark.parametrize("error", [UserError("no data"), KeyboardInterrupt(), RuntimeError("bug")])
def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, error):
    output_dir = tmp_path / "runs" / "chapter"
    with pytest.raises(SystemExit if not isinstance(error, RuntimeError) else RuntimeError):
        run_main(_failing_main(output_dir, error=error))
    assert not output_dir.exists()
    # the corrected command takes the same folder without --overwrite
    prepare_output_dir(output_dir, {"epochs": 1})
    assert (output_dir / "config.json").is_file()


def test_a_failed_start_in_an_existing_folder_removes_only_its_own_files(tmp_path):
    output_dir = tmp_path / "mine"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("the user's own file")
    with pytest.raises(SystemExit):
        run_main(_failing_main(output_dir))
    assert sorted(p.name for p in output_dir.iterdir()) == ["notes.txt"]


def test_a_failure_after_training_started_keeps_the_checkpoint(tmp_path):
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_main(_failing_main(output_dir, fail_after_start=True))
    assert (output_dir / "checkpoint.npz").is_file() and (output_dir / "config.json").is_file()


def test_a_failed_resume_keeps_the_run_it_was_resuming(tmp_path):
    output_dir = tmp_path / "run"
    prepare_output_dir(output_dir, {"epochs": 1})
    (output_dir / "checkpoint.npz").write_text("epoch 1")
    training_started(output_dir)  # the first run trained
    with pytest.raises(SystemExit):
        run_main(_failing_main(output_dir, resume=True))
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint.npz", "config.json"]


def test_a_successful_run_is_not_touched_by_the_cleanup(tmp_path):
    output_dir = tmp_path / "eval"

    def main(argv):  # an evaluation-only run never calls training_started and succeeds
        prepare_output_dir(output_dir, {"epochs": 1})
        write_json(output_dir / "metrics.json", {"accuracy": 1.0})

    run_main(main)
    with pytest.raises(SystemExit):  # a later failing run in the same process
        run_main(_failing_main(tmp_path / "other"))
    assert sorted(p.name for p in output_dir.iterdir()) == ["config.json", "metrics.json"]
    assert discard_unstarted_runs() == []


def test_a_run_killed_with_sigterm_before_training_leaves_nothing(tmp_path):
    """`kill PID` during the set-up (a slow download, say): the same clean-up as Ctrl-C."""
    import subprocess
    import sys

    output_dir = tmp_path / "run"
    code = f"""
import os, signal
from pathlib import Path
from data.cli import run_main
from data.outputs import prepare_output_dir

def main(argv):
    prepare_output_dir(Path({str(output_dir)!r}), {{"epochs": 1}})
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the run")

run_main(main)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip() == "terminated (SIGTERM)"
    assert not output_dir.exists()
