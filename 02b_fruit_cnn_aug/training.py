"""How 02b learns: augmentation in a tf.data pipeline, class weights, a warm-up + cosine
schedule and early stopping that keeps the epoch with the best validation score.

train.py imports this module after parsing its flags (TensorFlow takes seconds to import).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import keras
import model as network
import numpy as np
import tensorflow as tf

from data import fruits
from parallel import tf_strategy

NUM_CLASSES = len(fruits.CLASSES)


class Run(NamedTuple):
    model: keras.Model
    history: dict             # per-epoch loss / accuracy, train and val
    seconds: float            # time in model.fit
    best_epoch: int           # 1-based epoch whose weights were kept
    val_probs: np.ndarray     # (num_val, classes) softmax outputs of the kept weights


# --- Augmentation ------------------------------------------------------------------


def build_augmenter(cfg: dict) -> keras.Sequential:
    """Random transforms for training batches; each image gets its own draw."""
    layers, seed = keras.layers, cfg["seed"]
    steps = [] if cfg["flip"] == "none" else [layers.RandomFlip(cfg["flip"], seed=seed)]
    if cfg["rotation"]:
        steps.append(layers.RandomRotation(cfg["rotation"], fill_mode="reflect", seed=seed))
    if cfg["zoom"]:
        steps.append(layers.RandomZoom(cfg["zoom"], fill_mode="reflect", seed=seed))
    if cfg["translation"]:
        steps.append(layers.RandomTranslation(cfg["translation"], cfg["translation"],
                                              fill_mode="reflect", seed=seed))
    if cfg["brightness"]:
        steps.append(layers.RandomBrightness(cfg["brightness"], value_range=(0, 255), seed=seed))
    if cfg["contrast"]:
        steps.append(layers.RandomContrast(cfg["contrast"], value_range=(0, 255), seed=seed))
    if cfg["saturation"]:  # factor 0.5 is "unchanged" for this layer
        half = cfg["saturation"] / 2
        steps.append(layers.RandomSaturation((0.5 - half, 0.5 + half), value_range=(0, 255),
                                             seed=seed))
    return keras.Sequential(steps or [layers.Identity()], name="augment")


def make_dataset(images: np.ndarray, labels: np.ndarray, cfg: dict,
                 augmenter: keras.Sequential | None = None) -> tf.data.Dataset:
    """A tf.data pipeline; with an augmenter: shuffled, augmented, optionally mixed up."""
    onehot = np.eye(NUM_CLASSES, dtype="float32")[labels]
    data = tf.data.Dataset.from_tensor_slices((images, onehot))
    if augmenter is None:
        return data.batch(cfg["batch_size"]).prefetch(tf.data.AUTOTUNE)
    data = data.shuffle(len(images), seed=cfg["seed"], reshuffle_each_iteration=True)
    # A sequential map: parallel calls would draw the random transforms in a different
    # order each run, and the seed would no longer fix the result. prefetch still
    # overlaps the augmentation with training.
    data = data.batch(cfg["batch_size"]).map(
        lambda x, y: (augmenter(tf.cast(x, "float32"), training=True), y))
    if cfg["mixup_alpha"] > 0:
        data = data.map(lambda x, y: mixup(x, y, cfg["mixup_alpha"]))
    return data.prefetch(tf.data.AUTOTUNE)


def mixup(images, labels, alpha: float):
    """Blend each example with another from the batch, weight ~ Beta(alpha, alpha)."""
    count = tf.shape(images)[0]
    a, b = tf.random.gamma([count], alpha), tf.random.gamma([count], alpha)
    weight = a / (a + b)
    partner = tf.random.shuffle(tf.range(count))
    wx, wy = tf.reshape(weight, [-1, 1, 1, 1]), tf.reshape(weight, [-1, 1])
    return (wx * images + (1 - wx) * tf.gather(images, partner),
            wy * labels + (1 - wy) * tf.gather(labels, partner))


# --- Training ----------------------------------------------------------------------


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """n / (k * n_c): each class carries the same total weight in the loss."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {c: float(len(labels) / (NUM_CLASSES * max(n, 1))) for c, n in enumerate(counts)}


class KeepBestOnValidation(keras.callbacks.Callback):
    """Keeps the weights of the best val accuracy and restores them at the end; with a
    `patience` above 0 it also stops a run that many epochs after its best one.

    48 validation images make accuracy move in steps of 2%, so many epochs tie; a tie
    goes to the lower val loss (Keras' EarlyStopping would keep the first, often a
    lucky epoch in the noisy high-learning-rate phase).
    """

    def __init__(self, patience: int):
        super().__init__()
        self.patience = patience
        self.best, self.best_epoch, self.best_weights = (-1.0, 0.0), 0, None

    def on_epoch_end(self, epoch, logs=None):
        score = (logs["val_accuracy"], -logs["val_loss"])
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            self.best_weights = self.model.get_weights()
        elif self.patience and epoch - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
            print(f"restored the weights of epoch {self.best_epoch + 1}: val accuracy "
                  f"{self.best[0]:.3f}, val loss {-self.best[1]:.3f}")


def compile_model(model: keras.Model, cfg: dict, steps_per_epoch: int) -> None:
    """Adam on a warm-up + cosine schedule, label-smoothed cross-entropy."""
    peak = cfg["learning_rate"] if cfg["weights"] == "none" else cfg["finetune_learning_rate"]
    warmup = min(5, cfg["epochs"] // 4) * steps_per_epoch  # a few calm epochs while BN settles
    schedule = keras.optimizers.schedules.CosineDecay(
        peak / 10, decay_steps=max(cfg["epochs"] * steps_per_epoch - warmup, 1),
        warmup_target=peak, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg["label_smoothing"]),
                  metrics=["accuracy"])


def fit_and_score(cfg: dict, images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray, strategy) -> Run:
    """Build and train one model from the seed; its validation outputs with the kept weights.
    The model and its optimizer live in `strategy`'s scope (tf_strategy.make_strategy); the
    augmentation stays in the input pipeline, outside it, before fit splits each batch."""
    keras.utils.set_random_seed(cfg["seed"])  # every run (the audit's two too) starts the same way
    with strategy.scope():
        model = network.build_model(cfg)
        compile_model(model, cfg, steps_per_epoch=-(-len(train_idx) // cfg["batch_size"]))
    tf_strategy.sync_batchnorm(model, strategy)
    train_data = make_dataset(images[train_idx], labels[train_idx], cfg, build_augmenter(cfg))
    val_data = make_dataset(images[val_idx], labels[val_idx], cfg)
    keeper = KeepBestOnValidation(cfg["patience"])
    class_weight = balanced_class_weights(labels[train_idx]) if cfg["class_weights"] else None
    start = time.monotonic()
    history = model.fit(train_data, validation_data=val_data, epochs=cfg["epochs"],
                        class_weight=class_weight, callbacks=[keeper], verbose=2)
    seconds = time.monotonic() - start
    return Run(model, history.history, seconds, keeper.best_epoch + 1,
               network.probabilities(model, images[val_idx]))
