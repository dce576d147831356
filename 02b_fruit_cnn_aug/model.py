"""The 02b network and what it takes to run it: device and seeds, build, save, load, predict.

train.py imports this module only after it has parsed its flags (TensorFlow takes seconds
to import); predict.py imports it after the one-line checks of its arguments.
"""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from data import fruits, outputs
from data.cli import UserError

CHAPTER = "02b_fruit_cnn_aug"  # the saved model's name: predict.py refuses other chapters' models
BACKBONES = {"mobilenet_v3_small": "MobileNetV3Small", "efficientnet_b0": "EfficientNetB0"}
NUM_CLASSES = len(fruits.CLASSES)


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


def build_model(cfg: dict) -> keras.Model:
    """From scratch when --weights none, else a keras.applications backbone + new head.

    Both take pixels in [0, 255]: the scratch model rescales itself, and MobileNetV3 and
    EfficientNet carry their own preprocessing layers.
    """
    layers = keras.layers
    inputs = keras.Input((cfg["image_size"], cfg["image_size"], 3))
    if cfg["weights"] == "none":
        x = layers.Rescaling(1.0 / 255)(inputs)
        # A stride-2 stem conv halves the image before the costly layers, which run on a
        # quarter of the pixels (a one-off timing, not a flag, showed epochs over 2x faster).
        x = conv_bn_relu(x, cfg["filters"][0], strides=2)
        for count in cfg["filters"][1:]:  # two 3x3 convs see a 5x5 patch per block
            x = conv_bn_relu(x, count)
            x = conv_bn_relu(x, count)
            x = layers.MaxPooling2D()(x)
        x = layers.GlobalAveragePooling2D()(x)  # no Flatten->Dense: far fewer weights to overfit
    else:
        x = load_backbone(cfg)(inputs, training=False)  # keep ImageNet's batch-norm statistics
    x = layers.Dropout(cfg["dropout"])(x)
    outputs_ = layers.Dense(NUM_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs_, name=CHAPTER)


def conv_bn_relu(x, filters: int, strides: int = 1):
    x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    # momentum 0.9, not 0.99: with ~6 steps per epoch the running statistics used at
    # evaluation must follow the weights within an epoch or two.
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    return keras.layers.ReLU()(x)


def load_backbone(cfg: dict) -> keras.Model:
    constructor = getattr(keras.applications, BACKBONES[cfg["backbone"]])
    size = cfg["image_size"]
    try:
        return constructor(input_shape=(size, size, 3), include_top=False,
                           weights=cfg["weights"], pooling="avg")
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
        if cfg["weights"] == "imagenet":
            reason = " ".join(str(exc).split())[:300]  # keep it to one line
            raise UserError(f"could not download the ImageNet weights for {cfg['backbone']} "
                            f"({reason}); offline, train from scratch with --weights none"
                            ) from None
        raise UserError(f"--weights {cfg['weights']}: not {cfg['backbone']} weights "
                        f"(include_top=False): {exc}") from None


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
    if height != width or channels != 3 or model.output_shape[-1] != NUM_CLASSES:
        raise UserError(f"--model-path {path}: takes {model.input_shape[1:]} and gives "
                        f"{model.output_shape[-1]} classes; {CHAPTER} models take square RGB "
                        f"photos and give {NUM_CLASSES}")
    return model, height
