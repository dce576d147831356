"""data/runclock.py, data/checkpoints.py and the shared run plots of data/outputs.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from data.checkpoints import load_arrays, save_arrays
from data.cli import UserError
from data.outputs import plot_truth_vs_prediction, plot_val_curve, spread
from data.runclock import RunClock


def test_the_clock_stops_after_the_limit_and_carries_over_a_resume(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = RunClock(minutes=1.0)
    now[0] += 50
    assert clock.lap() == 50 and not clock.out_of_time()
    assert clock.out_of_time(ahead=11)  # a chunk as long as 11 s more would pass the minute
    now[0] += 11
    assert clock.out_of_time() and "after epoch 3 of 9" in clock.stop_message(3, 9)
    resumed = RunClock(1.0, **clock.state())  # the 50 s already spent count
    now[0] += 11
    assert resumed.out_of_time() and resumed.elapsed() == pytest.approx(61)
    assert not RunClock(0.0, wall_seconds=1e9).out_of_time()  # 0: no limit


def test_a_checkpoint_round_trips_and_refuses_another_model(tmp_path):
    weights, slots = [np.arange(6.0).reshape(2, 3), np.ones(2)], [np.int64(7), np.zeros(3)]
    path = save_arrays(tmp_path / "checkpoint.npz", {"epoch": 4, "best": np.float32(0.5)}, weights, slots)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary left
    state, got_weights, got_slots = load_arrays(path, 2, 2)
    assert state == {"epoch": 4, "best": 0.5}
    for a, b in zip(weights + slots, got_weights + got_slots, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="another configuration"):
        load_arrays(path, 3, 2)
    with pytest.raises(UserError, match="no checkpoint"):
        load_arrays(tmp_path / "missing.npz", 2, 2)
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:100])  # a write cut short
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        load_arrays(tmp_path / "cut.npz", 2, 2)
    (tmp_path / "empty.npz").write_bytes(b"")  # a file created, never written
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        load_arrays(tmp_path / "empty.npz", 2, 2)


def test_the_val_curve_and_the_truth_vs_prediction_grid_are_drawn(tmp_path):
    assert spread(10, 4).tolist() == [0, 3, 6, 9] and spread(2, 8).tolist() == [0, 1]
    curve = {"epoch": [5, 10], "map50": [0.2, 0.6], "map": [0.1, 0.3]}
    plot_val_curve(curve, [("map50", "mAP@0.5"), ("map", "mAP")], tmp_path / "val_map.png")
    image = np.zeros((8, 8, 3), np.uint8)
    plot_truth_vs_prediction([("a", image, image), ("b", image, image)], tmp_path / "grid.png", 0.3)
    for name in ("val_map.png", "grid.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
