"""01's two networks in Keras: build them, train-time helpers, load one back, run it.

train.py builds and trains a network here; predict.py loads the saved .keras file and
runs it on prepared photos. Keras is imported at the top of this module; the scripts
import this module only after their flags are checked, so `--help` answers at once.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from data import outputs
from data.cli import UserError, usable_cores

NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)
MNIST_MEAN, MNIST_STD = 33.3, 78.6  # pixel mean and std of the training images (0..255)

# --- Device and determinism ------------------------------------------------------------


def use_device(device: str, num_threads: int) -> tuple[str, str]:
    """Pick where TensorFlow runs, before it runs anything; returns (device, its name).

    "auto": the GPU when TensorFlow sees one, else the CPU; "cpu": GPUs hidden; "cuda":
    the GPU, or one line saying there is none. num_threads 0 leaves TensorFlow's default
    (all cores).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cuda" and not gpus:
        raise UserError("--device cuda: TensorFlow sees no GPU here (it needs the CUDA build "
                        "of TensorFlow and an NVIDIA driver); use --device cpu or auto")
    if num_threads:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    if device == "cpu" or not gpus:
        tf.config.set_visible_devices([], "GPU")
        name = outputs.run_facts()["cpu"]
        print(f"TensorFlow runs on the CPU ({name}, {num_threads or usable_cores()} threads)")
        return "cpu", name
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    print(f"TensorFlow runs on the GPU ({name})")
    return "cuda", name


def make_deterministic(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and TensorFlow; with `deterministic`, TensorFlow also picks ops
    that give the same result bit for bit on every run (on the same machine and versions)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


# --- Build ------------------------------------------------------------------------------


def build(cfg: dict) -> keras.Model:
    """The model takes raw 0..255 pixels, so a saved .keras file needs no preprocessing code."""
    layers = keras.layers
    stack = [keras.Input(INPUT_SHAPE)]
    if cfg["shift_pixels"]:  # active in fit() only; predict() and evaluate() see the digit as is
        shift = cfg["shift_pixels"] / 28
        stack.append(layers.RandomTranslation(shift, shift, fill_mode="constant", fill_value=0.0))
    # Standardise: SGD converges faster when inputs are centred with unit spread.
    stack.append(layers.Rescaling(1 / MNIST_STD, offset=-MNIST_MEAN / MNIST_STD))
    stack += dense_layers(cfg) if cfg["model"] == "mlp" else conv_layers(cfg)
    stack.append(layers.Dense(NUM_CLASSES, activation="softmax"))
    return keras.Sequential(stack, name=cfg["model"])


def dense_layers(cfg: dict) -> list:
    stack = [keras.layers.Flatten()]
    for units in cfg["hidden_units"]:
        # he_normal: the init that keeps ReLU activations from shrinking layer by layer.
        stack.append(keras.layers.Dense(units, activation="relu", kernel_initializer="he_normal"))
        if cfg["dropout"]:
            stack.append(keras.layers.Dropout(cfg["dropout"]))
    return stack


def conv_layers(cfg: dict) -> list:
    layers, stack = keras.layers, []
    for index, filters in enumerate(cfg["conv_filters"]):
        # BatchNorm keeps each layer's inputs well scaled, so a high SGD rate is safe;
        # the conv needs no bias, BN's shift plays that role.
        stack += [layers.Conv2D(filters, 3, padding="same", use_bias=False),
                  layers.BatchNormalization(), layers.ReLU()]
        if index < len(cfg["conv_filters"]) - 1:
            stack.append(layers.MaxPooling2D())  # 28 -> 14 -> 7: a quarter of the work per block
    # Flatten keeps *where* each feature fired (7x7 positions); global average pooling
    # would keep one number per map.
    stack.append(layers.Flatten())
    if cfg["dropout"]:
        stack.append(layers.Dropout(cfg["dropout"]))
    return stack


def compile_for_training(model: keras.Model, cfg: dict, steps_per_epoch: int) -> None:
    """SGD with Nesterov momentum; a linear warm-up to the peak rate, then cosine decay to 0."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = cfg["warmup_epochs"] * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=cfg["learning_rate"], warmup_steps=warmup,
        decay_steps=max(total - warmup, 1))
    optimizer = keras.optimizers.SGD(schedule, momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])


class KeepBestEpoch(keras.callbacks.Callback):
    """Remember the weights of the epoch with the best validation accuracy and restore them
    at the end; stop at once if the loss stops being a number."""

    def __init__(self):
        super().__init__()
        self.best_accuracy, self.best_epoch, self.best_weights = -1.0, 0, None

    def on_batch_end(self, batch, logs=None):
        if not np.isfinite((logs or {}).get("loss", 0.0)):
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        accuracy = (logs or {}).get("val_accuracy", -1.0)
        if accuracy >= self.best_accuracy:  # ties go to the later, further-decayed epoch
            self.best_accuracy, self.best_epoch = accuracy, epoch + 1
            self.best_weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


# --- Use --------------------------------------------------------------------------------


def probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 digits, white on black -> (N, 10) class probabilities."""
    return model.predict(images.astype("float32")[..., None], batch_size=1000, verbose=0)


def save(model: keras.Model, path: Path) -> None:
    with outputs.atomic_path(path) as tmp:  # Keras insists on the .keras suffix; tmp keeps it
        model.save(tmp)


def load(path: Path) -> keras.Model:
    """Load a model saved by 01's train.py; anything else is refused with one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path} (train one first: python 01_mnist/train.py)")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):  # a .keras file is a zip archive
        raise UserError(f"{path} is not a .keras model archive (01_mnist/train.py saves model.keras)")
    try:
        model = keras.models.load_model(path)
    except Exception as exc:  # a zip Keras cannot read: say which file, on one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {path}: {first_line}") from None
    if tuple(model.input_shape) != (None, *INPUT_SHAPE) or tuple(model.output_shape) != (None, NUM_CLASSES):
        raise UserError(f"{path} is not an MNIST model of 01_mnist: it maps {model.input_shape} to "
                        f"{model.output_shape}, not (None, 28, 28, 1) to (None, {NUM_CLASSES})")
    return model
