"""tf.distribute in the Keras chapters (parallel/tf_strategy.py), on 2 CPU cores.

`--strategy mirrored` on 2 logical CPU devices takes the same training steps as one device
(01's fit and 04b's custom loop, from the same weights on the same global batches); 02 and
02b run a short smoke run under it (03's COCO run, in test_03_tf_od_api_coco.py, runs under it
too); `--strategy multi_worker` runs as one worker; a wrong
strategy or TF_CONFIG is one line. Each chapter run is its own process, as in the chapter tests.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.helpers import assert_one_line_error, run_chapter, run_python, run_script, script_env

# Largest weight difference allowed after 3 steps: float32 sums taken in another order (each
# replica sums its half of the batch, then the halves are added). Measured: 1.5e-7 (01 mlp),
# 3.4e-7 (01 cnn), 3.6e-7 (04b), while the steps moved the weights by 0.08-0.8.
TOLERANCE = 1e-5
# Figures a run reports about itself (when, how long, on what), not what it measured.
RUN_FACTS = {"date", "train_seconds", "seconds_per_epoch", "wall_seconds", "_wall_seconds",
             "num_replicas", "world_size"}


def _result(stdout: str) -> dict:
    return json.loads(next(line[4:] for line in stdout.splitlines() if line.startswith("JSON")))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _tf_config(workers: int, index: int = 0) -> str:
    ports = [_free_port() for _ in range(workers)]
    return json.dumps({"cluster": {"worker": [f"localhost:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


# --- 01: fit under MirroredStrategy takes the steps one device takes -------------------------

# The shifts are held at 0: Keras 3's random layers (RandomTranslation, Dropout) draw the same
# numbers on every replica, so the images of replica 1 would get replica 0's shifts, not the
# ones they get on one device. The smoke config has no dropout.
_MNIST_STEPS = """
import json
import numpy as np
import train as chapter
cfg, _ = chapter.build_parser().parse_config(["--smoke", "--shift-pixels", "0", "--strategy", "mirrored"])
import keras
import network
import tensorflow as tf
from parallel import tf_strategy

mirrored = tf_strategy.make_strategy(cfg)
network.make_deterministic(cfg["seed"], True)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (3 * cfg["batch_size"], 28, 28, 1)).astype("float32")
y = np.eye(10, dtype="float32")[rng.integers(0, 10, len(x))]
out = {"replicas": mirrored.num_replicas_in_sync}
for model_name in ("mlp", "cnn"):  # the cnn has BatchNorm: synchronized over the replicas
    c = {**cfg, "model": model_name}
    weights = {}
    for name, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", mirrored)):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = network.build(c)
            network.compile_for_training(model, c, steps_per_epoch=3)
        tf_strategy.sync_batchnorm(model, strategy)
        if name == "default":
            start = model.get_weights()
        else:
            model.set_weights(start)
        model.fit(x, y, batch_size=c["batch_size"], epochs=1, shuffle=False, verbose=0)  # 3 steps
        weights[name] = model.get_weights()
    out[model_name] = {
        "moved": max(float(np.abs(a - s).max()) for a, s in zip(weights["default"], start)),
        "gap": max(float(np.abs(a - b).max()) for a, b in zip(weights["default"], weights["mirrored"]))}
print("JSON" + json.dumps(out))
"""


def test_01_mirrored_on_two_cpu_devices_takes_the_steps_of_one_device():
    result = _result(run_python(_MNIST_STEPS, chapter="01_mnist", timeout=300).stdout)
    assert result["replicas"] == 2
    for model_name in ("mlp", "cnn"):
        assert result[model_name]["moved"] > 0.01, result  # the steps did train
        assert result[model_name]["gap"] <= TOLERANCE, result


# --- multi_worker and the errors: 01 ------------------------------------------------------------


@pytest.mark.slow
def test_01_multi_worker_as_one_worker_gives_the_figures_of_a_plain_run(tmp_path):
    plain = run_chapter("01_mnist/train.py", tmp_path / "plain", "--smoke", "--epochs", "2")
    env = script_env(TF_CONFIG=_tf_config(1))
    result = run_script("01_mnist/train.py", "--smoke", "--epochs", "2", "--strategy", "multi_worker",
                        "--output-dir", tmp_path / "worker", env=env, timeout=300)
    worker = json.loads((tmp_path / "worker" / "metrics.json").read_text())
    assert "/job:worker/replica:0/task:0" in result.stdout  # TF_CONFIG's cluster, not a local run
    assert (worker["world_size"], worker["num_replicas"]) == (1, 1)
    assert (plain["world_size"], plain["num_replicas"]) == (1, 1)
    figures = sorted(set(plain) - RUN_FACTS)
    assert {key: worker[key] for key in figures} == {key: plain[key] for key in figures}


@pytest.mark.parametrize("flags, tf_config, words", [
    (["--strategy", "ring"], None, ["--strategy must be one of", "default, mirrored, multi_worker"]),
    (["--strategy", "multi_worker"], None, ["TF_CONFIG", "not set", '"task"']),
    (["--strategy", "multi_worker"], "{cluster: 1}", ["TF_CONFIG is not valid JSON", '"cluster"']),
    (["--strategy", "multi_worker"], '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 1}}',
     ['"task"', "index"]),
    (["--strategy", "multi_worker"], "two workers", ["2 workers", "model.fit", "keras-team/keras#20329"]),
    (["--strategy", "mirrored", "--cpu-replicas", "0"], None, ["--cpu-replicas must be at least 1"]),
])
def test_a_wrong_strategy_or_tf_config_is_one_line(tmp_path, flags, tf_config, words):
    env = script_env()
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = _tf_config(2) if tf_config == "two workers" else tf_config
    result = run_script("01_mnist/train.py", "--smoke", *flags, "--output-dir", tmp_path / "run",
                        env=env, check=False, timeout=120)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "run").exists()


# --- 02, 02b: a short smoke run under MirroredStrategy -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", ["02_fruit_cnn/train.py", "02b_fruit_cnn_aug/train.py"],
                         ids=lambda script: script.split("/")[0])
def test_a_smoke_run_under_mirrored(tmp_path, script):
    metrics = run_chapter(script, tmp_path, "--smoke", "--epochs", "1", "--strategy", "mirrored", timeout=420)
    assert (metrics["num_replicas"], metrics["world_size"]) == (2, 1)
    assert (tmp_path / "config.json").is_file()


# --- 04b: the custom loop through strategy.run takes the steps one device takes ----------------

_MASKRCNN_STEPS = """
import itertools
import json
import numpy as np
import train as chapter
cfg, _ = chapter.parse(["--smoke", "--strategy", "mirrored"])
chapter.setup_tensorflow(cfg)
import keras
import tensorflow as tf
from parallel import tf_strategy

mirrored = tf_strategy.make_strategy(cfg)
data = chapter.Data(cfg, None, True, None)
batches = list(itertools.islice(chapter.batches(data.training_examples(1), cfg, data.max_instances, 1), 3))
weights, losses = {}, {}
for name, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", mirrored)):
    keras.utils.set_random_seed(cfg["seed"])
    with strategy.scope():
        model = chapter.build_model(cfg, data.class_names)
        optimizer = chapter.make_optimizer(cfg, steps_per_epoch=len(batches))
        optimizer.build(model.trainable_variables)
    tf_strategy.sync_batchnorm(model, strategy)
    if name == "default":
        start = model.get_weights()
    else:
        model.set_weights(start)
    step = chapter.make_train_step(model, optimizer, cfg)  # under the strategy the model was built in
    losses[name] = [{key: float(value) for key, value in step(batch, np.array([cfg["seed"], i], np.int32)).items()}
                    for i, batch in enumerate(batches)]
    weights[name] = model.get_weights()  # BatchNorm's moving statistics included
print("JSON" + json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "moved": max(float(np.abs(a - s).max()) for a, s in zip(weights["default"], start)),
    "gap": max(float(np.abs(a - b).max()) for a, b in zip(weights["default"], weights["mirrored"])),
    "loss_gap": max(abs(a[key] - b[key]) for a, b in zip(losses["default"], losses["mirrored"]) for key in a)}))
"""


@pytest.mark.slow
def test_04b_custom_loop_on_two_cpu_devices_takes_the_steps_of_one_device():
    # The config's grad_clip (5) acts in these steps: clipping each replica's part of the
    # gradient instead of the batch's (Keras' own clip) put the weights 1e-3 apart.
    result = _result(run_python(_MASKRCNN_STEPS, chapter="04b_instance_seg", timeout=420).stdout)
    assert result["replicas"] == 2
    assert result["moved"] > 0.01, result
    assert result["gap"] <= TOLERANCE and result["loss_gap"] <= TOLERANCE, result
