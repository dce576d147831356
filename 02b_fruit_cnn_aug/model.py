"""The 02b network and what it takes to run it: device and seeds, build, save, load, predict.

train.py imports this module only after it has parsed its flags (TensorFlow takes seconds
to import); predict.py imports it after the one-line checks of its arguments.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import warnings
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
        backbone = load_backbone(cfg)
        # Keep ImageNet's batch-norm statistics: those of a batch of 32 fruit photos are
        # noisy. A non-trainable BatchNormalization layer always normalises with its moving
        # statistics; `backbone(inputs, training=False)` alone does not do it in Keras 3,
        # whose models pass fit's training=True on to the models nested in them.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        x = backbone(inputs, training=False)
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
        # Keras warns that its ImageNet weights were trained at 224 px: the convolutions work
        # at image_size too, and the warning would only crowd a one-line error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return constructor(input_shape=(size, size, 3), include_top=False,
                               weights=cfg["weights"], pooling="avg")
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
        reason = " ".join(str(exc).split())  # keep it to one line
        if cfg["weights"] == "imagenet":
            raise UserError(imagenet_failure(cfg["backbone"], reason)) from None
        raise UserError(f"--weights {cfg['weights']}: not {cfg['backbone']} weights "
                        f"(include_top=False): {reason[:300]}") from None


def imagenet_failure(backbone: str, reason: str) -> str:
    """What failed in --weights imagenet, and the fixes for a machine without internet: the
    file from the Keras cache of one with internet, or a weights file, or no weights."""
    url = re.search(r"https?://\S+?\.h5", reason)  # keras names the file it tried to fetch
    name = url.group(0).rsplit("/", 1)[1] if url else f"the {backbone} weights file"
    cache = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"
    failed = (f"could not download {name} ({reason.split(' -- ')[-1][:120]})"
              if "URL fetch failure" in reason else f"could not load {name} ({reason[:200]})")
    return (f"--weights imagenet: {failed}; without internet, copy {name} from "
            f"~/.keras/models (or $KERAS_HOME/models) of a machine with internet into {cache}/, "
            f"or pass --weights PATH (a .weights.h5 file of {backbone}, include_top=False), "
            "or --weights none")


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
