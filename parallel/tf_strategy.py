"""Data-parallel training with tf.distribute: what a Keras chapter needs for `--strategy`.

A strategy holds a copy of the model on each of its devices (a replica). Each training step
splits the global batch over the replicas; each computes the gradient of its share, the
gradients are summed over the replicas (an all-reduce), and every copy takes the same
optimizer step, so the copies stay equal. The config's `strategy` key picks one:

    "default"       tf.distribute's default strategy: a plain run on one device, unchanged.
    "mirrored"      MirroredStrategy on one machine: a replica per GPU, or, with no GPU,
                    `cpu_replicas` logical CPU devices, so that a laptop runs the same code
                    path (not faster: the logical devices share the same cores).
    "multi_worker"  MultiWorkerMirroredStrategy across machines (workers), each with its
                    GPUs (or its CPU as one replica). Every worker runs the same command with
                    TF_CONFIG saying who is in the run and which one it is:
                    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                               "task": {"type": "worker", "index": 0}}'   (index 1 on host2)
                    Worker 0 (the chief) writes the run's files; the others write into a
                    temporary folder, removed when they exit. Keras' model.fit runs on one
                    worker only (check_config says why); 04b's custom loop runs on several.

    tf_strategy.check_config(cfg)                    # with the flags, before TensorFlow loads
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)
    strategy = tf_strategy.make_strategy(cfg)        # before TensorFlow runs an op
    with strategy.scope():                           # variables made here are mirrored
        model = build(cfg); model.compile(...)
    tf_strategy.sync_batchnorm(model, strategy)
    model.fit(x, y, batch_size=cfg["batch_size"])    # the global batch: fit splits it
    metrics.update(tf_strategy.run_facts(strategy, model))  # world_size, num_replicas

What Keras 3.15 does differently under a strategy with several replicas:
- its random layers (Dropout, RandomTranslation, ...) draw the same numbers on every replica:
  the k-th image of every replica's share gets the same shift or dropout mask (measured here;
  the nearest upstream thread is keras-team/keras#20611, PR #20612, on SeedGenerator under
  MirroredStrategy). Augmentation drawn in the input pipeline (02b, 03, 04b) is not
  affected; 01's shifts and 02b's dropout are;
- gradient clipping acts on each replica's share of the gradient (see clip_norm_per_replica);
- BatchNormalization uses each replica's share unless `synchronized` (see sync_batchnorm).

TensorFlow is imported inside the functions that use it: `check_config` and
`worker_output_dir` run before a chapter loads its framework, so a bad flag answers at once.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from data.cli import UserError, require

STRATEGIES = ("default", "mirrored", "multi_worker")
TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')


# --- Config (no TensorFlow) ------------------------------------------------------------------


def check_config(cfg: dict, keras_fit: bool = True) -> None:
    """The `strategy` and `cpu_replicas` keys, and TF_CONFIG under multi_worker. `keras_fit`:
    the chapter trains with model.fit, which Keras 3 cannot run across workers (below)."""
    require(cfg["strategy"] in STRATEGIES,
            f"--strategy must be one of {', '.join(STRATEGIES)}, got {cfg['strategy']!r}")
    require(cfg["cpu_replicas"] >= 1, f"--cpu-replicas must be at least 1, got {cfg['cpu_replicas']}")
    if cfg["strategy"] == "multi_worker":
        cluster, _, _ = read_tf_config()
        workers = sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
        # Keras 3 (3.15, and its main branch, 3.16.0.dev) fails in model.fit before the first
        # step when a strategy spans several workers: TensorFlowTrainer._maybe_symbolic_build
        # reduces the first batch, a tuple of per-replica values, through the workers'
        # collective ops, which take one tensor ("Attempt to convert a value (PerReplica:...)
        # ... to a Tensor"); the same error is reported in ray-project/ray#47464 and
        # keras-team/keras#20329. One worker runs; a custom loop (04b) runs across workers.
        require(not keras_fit or workers == 1,
                f"--strategy multi_worker: TF_CONFIG lists {workers} workers, and Keras 3's model.fit "
                "fails across workers (keras-team/keras#20329); train on one machine with "
                "--strategy mirrored, or across machines with 04b_instance_seg's custom loop")
        # A non-chief worker writes into a temporary folder, so it would find no checkpoint.
        require(not cfg.get("resume"), "--resume does not run under --strategy multi_worker "
                "(only the chief keeps a checkpoint); resume with --strategy default or mirrored")


def read_tf_config() -> tuple[dict, str, int]:
    """(cluster, this task's type, its index) from TF_CONFIG, or one line naming the fix."""
    text = os.environ.get("TF_CONFIG", "")
    fix = (f"set it on every worker, e.g. {TF_CONFIG_EXAMPLE} "
           "(index 0 on the first machine of the list, 1 on the second, ...)")
    require(bool(text.strip()),
            f"--strategy multi_worker reads the workers from TF_CONFIG, which is not set; {fix}")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON ({exc}); {fix}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    require(isinstance(workers, list) and len(workers) >= 1 and all(isinstance(w, str) for w in workers),
            f"TF_CONFIG needs \"cluster\": {{\"worker\": [\"host:port\", ...]}}; {fix}")
    require(isinstance(task, dict) and task.get("type") in ("worker", "chief")
            and isinstance(task.get("index"), int) and 0 <= task["index"] < len(cluster.get(task["type"], [])),
            f"TF_CONFIG needs \"task\": {{\"type\": \"worker\", \"index\": i}} with i a place in "
            f"its cluster's list; {fix}")
    return cluster, task["type"], task["index"]


def worker_output_dir(output_dir: Path, cfg: dict) -> Path:
    """Where this process writes: `output_dir`, except on a multi_worker run's workers other
    than the chief, which still run every step (saving too) into a temporary folder."""
    if cfg["strategy"] != "multi_worker":
        return output_dir
    cluster, task_type, index = read_tf_config()
    if task_type == "chief" or ("chief" not in cluster and index == 0):
        return output_dir
    scratch = tempfile.mkdtemp(prefix=f"{Path(output_dir).name}-worker{index}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return Path(scratch) / "run"


# --- The strategy ----------------------------------------------------------------------------


def make_strategy(cfg: dict):
    """The strategy `cfg["strategy"]` names. Call it once the GPUs to use are chosen (hidden
    ones are not replicas) and before TensorFlow runs an op: logical CPU devices and a
    multi-worker strategy can only be set up before TensorFlow starts its runtime."""
    import tensorflow as tf

    name = cfg["strategy"]
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":  # it reads TF_CONFIG itself (check_config made sure it is usable)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif tf.config.get_visible_devices("GPU"):
        strategy = tf.distribute.MirroredStrategy()  # every visible GPU
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg["cpu_replicas"])
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    facts = run_facts(strategy)
    print(f"--strategy {name}: {facts['num_replicas']} replicas on {facts['world_size']} worker(s): "
          f"{', '.join(strategy.extended.worker_devices)}", flush=True)
    return strategy


def run_facts(strategy, model=None) -> dict:
    """For metrics.json: world_size, the number of workers (machines; 1 for a plain run), and
    num_replicas, the copies of `model` that trained: those of the strategy it was built
    under (a Keras model built outside the strategy's scope trains as one copy)."""
    resolver = strategy.cluster_resolver  # None but for multi_worker
    jobs = resolver.cluster_spec().as_dict() if resolver is not None else {}
    workers = sum(len(jobs.get(job, [])) for job in ("chief", "worker"))
    trained_under = model.distribute_strategy if model is not None else strategy
    return {"world_size": max(workers, 1), "num_replicas": trained_under.num_replicas_in_sync}


def sync_batchnorm(model, strategy) -> None:
    """With several replicas, every BatchNormalization layer of `model` computes its batch
    statistics over the global batch, not over each replica's share: the number of replicas
    then does not change what the model computes, and a share of 1-2 images (a detector's
    batch of 8 over 8 GPUs) is never normalised alone. Two small all-reduces per layer and
    step are its cost. A run with one replica is left as it is."""
    import keras

    if strategy.num_replicas_in_sync == 1:
        return
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True  # read when the train step is traced
        stack.extend(getattr(layer, "layers", []))


# --- Gradient clipping -------------------------------------------------------------------------
# Keras 3 clips (clipnorm, global_clipnorm) the gradients each replica hands to the optimizer,
# before the optimizer sums them over the replicas (keras-team/keras#19467 put that sum in
# the TensorFlow optimizer's update step, after the clip): under a strategy it clips each
# replica's share, not the gradient of the batch. tf.keras refused clipping under a strategy
# for this reason (tensorflow/tensorflow#33929).


def clip_norm_per_replica(clip_norm: float, strategy) -> float:
    """For model.fit, where the gradients stay inside Keras: the clip norm for each replica's
    share. With every share at most clip_norm / R, their sum is at most clip_norm (the
    triangle inequality), so the step stays bounded as on one device, though a share is
    clipped on its own. clip_norm itself with one replica."""
    return clip_norm / strategy.num_replicas_in_sync


def sum_and_clip(gradients: list, clip_norm: float) -> list:
    """For a custom loop, inside `strategy.run`: the gradients summed over the replicas,
    clipped to `clip_norm` as one global norm, and divided by the number of replicas, so
    that the optimizer's own sum gives back the clipped sum (its own clip then sees shares
    below clip_norm and leaves them). Costs a second all-reduce of the gradients."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    clipped, _ = tf.clip_by_global_norm(summed, clip_norm)
    return [gradient / context.num_replicas_in_sync for gradient in clipped]


# --- Custom training loops ----------------------------------------------------------------------


def split_batch(strategy, batch: dict):
    """A global batch (a dict of arrays, the same on every worker) as each replica's rows:
    replica r of R takes rows r*B/R .. (r+1)*B/R, so every image goes to exactly one replica
    whatever the number of replicas and workers. The batch itself with one replica."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return batch
    rows = len(next(iter(batch.values()))) // replicas

    def rows_of(context):
        start = context.replica_id_in_sync_group * rows
        return {key: value[start:start + rows] for key, value in batch.items()}

    return strategy.experimental_distribute_values_from_function(rows_of)


def check_batch(batch_size: int, strategy) -> None:
    """A custom loop splits each batch evenly over the replicas: refuse one that does not split."""
    replicas = strategy.num_replicas_in_sync
    require(batch_size % replicas == 0, f"--batch-size {batch_size} does not split evenly over "
            f"{replicas} replicas; use a multiple of {replicas}")


def global_sum(value):
    """tf.reduce_sum(value) over the whole global batch, inside `strategy.run`: a loss that
    divides its replica's sum by this count is that replica's part of the batch's loss, so
    the parts (and their gradients) add up over the replicas to what one device computes.
    The plain sum with one replica."""
    import tensorflow as tf

    total = tf.reduce_sum(value)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return total
    return context.all_reduce(tf.distribute.ReduceOp.SUM, total)


def uniform_rows(shape, seed):
    """tf.random.stateless_uniform(shape, seed) for this replica's rows (split_batch) of the
    global batch: it draws the keys of the whole batch and keeps its own rows, so an image
    gets the keys it would get on one device (drawn for the share alone, every replica would
    draw replica 0's keys). The plain draw with one replica."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.random.stateless_uniform(shape, seed=seed)
    rows = shape[0]
    every_row = tf.random.stateless_uniform(
        tf.concat([[rows * context.num_replicas_in_sync], shape[1:]], 0), seed=seed)
    start = context.replica_id_in_sync_group * rows
    return every_row[start:start + rows]
