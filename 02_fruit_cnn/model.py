"""The 02 network and what it takes to run it: device and seeds, build, fit, load, predict.

train.py imports this module only after it has parsed its flags (TensorFlow takes seconds
to import); predict.py imports it after the one-line checks of its arguments.
"""

from __future__ import annotations

import ctypes.util
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from data import fruits, outputs
from data.cli import UserError

CHAPTER = "02_fruit_cnn"  # the saved model's name: predict.py refuses other chapters' models


def set_up_tensorflow(device: str, num_threads: int, seed: int,
                      verbose: bool = True) -> tuple[str, str]:
    """Threads, device and seeds, before TensorFlow runs an op; returns (device, its name).

    Op determinism makes a run repeat bit for bit on the same machine and library versions
    (another CPU, a GPU or another TensorFlow version may still give other numbers).
    """
    tf.config.threading.set_intra_op_parallelism_threads(num_threads)  # 0: all cores
    tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cuda" and not gpus:
        driver = "finds no CUDA GPU" if ctypes.util.find_library("cuda") else "finds no NVIDIA driver"
        raise UserError(f"--device cuda: TensorFlow {driver} here (its GPU build is "
                        "pip install 'tensorflow[and-cuda]'); use --device auto or cpu")
    if device == "cpu" or not gpus:
        tf.config.set_visible_devices([], "GPU")
        used, name = "cpu", ""  # run_facts names the CPU model
    else:
        used = "cuda"
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    keras.utils.set_random_seed(seed)  # Python, numpy and TensorFlow
    tf.config.experimental.enable_op_determinism()
    if verbose:
        print(f"TensorFlow runs on {used}{': ' + name if name else ''}, "
              f"{num_threads or 'all'} threads, deterministic ops")
    return used, name


def build_model(image_size: int, filters: list[int], dense_units: int) -> keras.Model:
    """The study's network: [Conv3x3 + ReLU, MaxPool] x len(filters), Flatten, Dense, softmax."""
    layers = keras.layers
    model = keras.Sequential(name=CHAPTER)
    model.add(keras.Input((image_size, image_size, 3)))
    model.add(layers.Rescaling(1.0 / 255))  # uint8 pixels in, [0, 1] floats to the convs
    for count in filters:
        model.add(layers.Conv2D(count, 3, activation="relu"))
        model.add(layers.MaxPooling2D())
    model.add(layers.Flatten())
    model.add(layers.Dense(dense_units, activation="relu"))
    model.add(layers.Dense(len(fruits.CLASSES), activation="softmax"))
    return model


def fit(model: keras.Model, images: np.ndarray, labels: np.ndarray, cfg: dict) -> tuple[dict, float]:
    """Adam and cross-entropy for a fixed number of epochs; (history, seconds)."""
    model.compile(optimizer=keras.optimizers.Adam(cfg["learning_rate"]),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    targets = keras.utils.to_categorical(labels, len(fruits.CLASSES))
    start = time.monotonic()
    # No validation_data: the study had none. verbose=2 prints one line per epoch.
    history = model.fit(images, targets, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                        shuffle=True, verbose=2)
    return history.history, time.monotonic() - start


def probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """(N, classes) softmax outputs for uint8 images of the model's input size."""
    return np.asarray(model.predict(images, verbose=0), dtype=np.float64)


def save(model: keras.Model, path: Path) -> None:
    with outputs.atomic_path(path) as tmp:
        model.save(tmp)


def load(path: Path) -> tuple[keras.Model, int]:
    """A model saved by train.py and its input side; one line if it does not fit this chapter."""
    model = keras.models.load_model(path, compile=False)
    _, height, width, channels = model.input_shape
    if height != width or channels != 3 or model.output_shape[-1] != len(fruits.CLASSES):
        raise UserError(f"--model-path {path}: takes {model.input_shape[1:]} and gives "
                        f"{model.output_shape[-1]} classes; {CHAPTER} models take square RGB "
                        f"photos and give {len(fruits.CLASSES)}")
    return model, height
