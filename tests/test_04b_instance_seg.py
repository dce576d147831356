"""04b_instance_seg: Mask R-CNN in Keras 3 (train.py, predict.py), each run in a subprocess.

The test process never imports TensorFlow (tests.helpers); the known-answer checks of the
model's parts, and the short training that must learn, are in test_04b_instance_seg_units.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers import (
    OFFLINE,
    assert_failed_start_left_nothing,
    assert_one_line_error,
    interrupt_after,
    run_chapter,
    run_python,
    run_script,
    script_env,
)

TRAIN = "04b_instance_seg/train.py"
PREDICT = "04b_instance_seg/predict.py"
CHAPTER = "04b_instance_seg"
SHAPES = ("square", "circle", "triangle")


@pytest.fixture(scope="module")
def shapes_smoke(tmp_path_factory):
    """The smoke run, into a folder where a run asked for a GPU that is not there (CUDA hidden,
    so on any machine) and failed: the retry needs no --overwrite."""
    output_dir = tmp_path_factory.mktemp("shapes") / "run"
    no_gpu = run_script(TRAIN, "--smoke", "--device", "cuda", "--output-dir", output_dir, check=False,
                        env=script_env(CUDA_VISIBLE_DEVICES=""))
    left = sorted(os.listdir(output_dir)) if output_dir.exists() else None
    if left is not None:  # the test below fails on it; the other tests still get their run
        output_dir = output_dir.with_name("elsewhere")
    metrics = run_chapter(TRAIN, output_dir, "--smoke", fresh=True)
    with np.load(output_dir / "checkpoint.npz") as saved:  # before other tests resume this run
        checkpoint = {key: saved[key] for key in saved.files}
    return output_dir, metrics, {"no_gpu": no_gpu, "left": left, "checkpoint": checkpoint}


def test_device_cuda_without_a_gpu_is_one_line_and_leaves_nothing(shapes_smoke):
    _, _, failed = shapes_smoke
    assert_one_line_error(failed["no_gpu"], "--device cuda", "no GPU")  # never a silent CPU run
    assert failed["left"] is None, f"the failed start left {failed['left']}"


def test_shapes_smoke_writes_metrics_plots_and_model(shapes_smoke):
    output_dir, metrics, _ = shapes_smoke
    for kind in ("mask", "box"):
        for key in ("map50", "map"):
            assert 0.0 <= metrics[f"{kind}_{key}"] <= 1.0
            low, high = metrics[f"{kind}_{key}_ci95"]
            assert 0.0 <= low <= high <= 1.0
        for name in SHAPES:
            assert f"{kind}_ap50_{name}" in metrics
    for key in ("val_mask_map50", "best_epoch", "train_seconds", "wall_seconds", "tensorflow_version"):
        assert key in metrics, key
    assert metrics["epochs"] == 2 and metrics["num_val"] == 8 and metrics["num_test"] == 8
    assert metrics["_wall_seconds"] < 150  # about 55 s alone on 2 cores (TF import and tracing included)
    for name in ("config.json", "split.json", "checkpoint.npz", "model.weights.h5", "model.json",
                 "loss_curves.png", "val_map.png", "test_predictions.png"):
        assert (output_dir / name).is_file(), name
    split = json.loads((output_dir / "split.json").read_text())
    assert len(split["val"]) == 8 and len(split["test"]) == 8
    assert json.loads((output_dir / "model.json").read_text())["class_names"] == list(SHAPES)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["config_files"] == ["04b_instance_seg/config.toml"]  # shapes: no pennfudan.toml


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights_as_an_unbroken_one(shapes_smoke, tmp_path):
    # The same command as the smoke run, killed (SIGTERM) once epoch 1's checkpoint is written,
    # then resumed: on the CPU the end of epoch 2 must match the unbroken run bit for bit,
    # weights, optimizer slots, step count and loss history. The resumed run is a tuning run
    # (--no-evaluate-test): it must never score the test set.
    _, first, unbroken = shapes_smoke
    run = tmp_path / "run"
    seen = interrupt_after(TRAIN, run, "--smoke", pattern=r"^epoch +1 ")
    assert "epoch   2" not in seen
    result = run_script(TRAIN, "--smoke", "--output-dir", run, "--resume", "--no-evaluate-test")
    assert "resumed from" in result.stdout and "after epoch 1" in result.stdout
    assert "epoch   2" in result.stdout and "epoch   1 " not in result.stdout
    with np.load(run / "checkpoint.npz") as saved:
        resumed = {key: saved[key] for key in saved.files}
    assert resumed.keys() == unbroken["checkpoint"].keys()
    for key in sorted(resumed.keys() - {"state"}):
        np.testing.assert_array_equal(resumed[key], unbroken["checkpoint"][key], err_msg=key)
    state, first_state = (json.loads(str(c["state"])) for c in (resumed, unbroken["checkpoint"]))
    for key in ("epoch", "steps", "history", "val_curve", "best"):
        assert state[key] == first_state[key], key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["val_mask_map50"] == first["val_mask_map50"]
    assert not any(key.startswith(("mask_map", "box_map", "mask_ap", "box_ap")) for key in metrics)
    assert not (run / "test_predictions.png").exists(), "a tuning run left a test grid"


def test_a_run_that_fails_once_training_started_keeps_its_folder(tmp_path):
    # A learning rate that makes the loss NaN within the first epoch: the checks had passed
    # and training had begun, so the folder stays for the user to inspect (or resume from a
    # later checkpoint); only a failed *start* leaves nothing.
    result = run_script(TRAIN, "--smoke", "--learning-rate", "1e30", "--output-dir", tmp_path / "run",
                        check=False)
    assert_one_line_error(result, "the loss became", "at epoch 1", "--learning-rate")
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "split.json"]


def test_resume_refuses_a_changed_config(shapes_smoke):
    output_dir, _, _ = shapes_smoke
    result = run_script(TRAIN, "--smoke", "--output-dir", output_dir, "--resume", "--fpn-channels", "48",
                        check=False)
    assert_one_line_error(result, "--resume", "fpn_channels")


def test_pennfudan_smoke_splits_and_scores_one_class(tmp_path):
    # First without the data, the mirror empty and the network closed: one error, and the
    # folder is left as it was, so the smoke run then goes into it without --overwrite.
    (tmp_path / "empty_mirror").mkdir()
    no_data = run_script(TRAIN, "--dataset", "pennfudan", "--data-dir", tmp_path / "no_data",
                         "--output-dir", tmp_path / "run", check=False,
                         env=script_env(DLSTUDY_MIRROR=str(tmp_path / "empty_mirror"), **OFFLINE))
    assert no_data.returncode == 2 and "Traceback" not in no_data.stderr, no_data.stderr[-2000:]
    last = no_data.stderr.strip().splitlines()[-1]  # after the download's retry notes
    assert last.startswith("error: pennfudan: could not get PennFudanPed.zip"), no_data.stderr
    assert_failed_start_left_nothing(tmp_path / "run")
    # A user's own --config applies on top of pennfudan.toml, not instead of it.
    (tmp_path / "mine.toml").write_text("time_limit_minutes = 30.0\n")  # pennfudan.toml: 58
    metrics = run_chapter(TRAIN, tmp_path / "run", "--smoke", "--dataset", "pennfudan",
                          "--config", str(tmp_path / "mine.toml"))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    names = split["train"] + split["val"] + split["test"]
    assert len(names) == len(set(names)) == 24 and all(split.values())
    assert metrics["num_test"] == len(split["test"]) and metrics["dataset"] == "pennfudan"
    assert 0.0 <= metrics["mask_map50"] <= 1.0 and "mask_map50_ci95" in metrics
    assert not any(key.startswith("mask_ap50_") for key in metrics)  # one class: no per-class copy
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["rpn_max_level"] == 6 and config["aspect_ratios"] == [1.0, 2.0, 3.0]  # pennfudan.toml
    assert config["time_limit_minutes"] == 30.0 and config["image_size"] == 64  # mine.toml, [smoke]
    # config.json says which files made the config, lowest first: no file is swapped in unseen.
    assert config["config_files"] == ["04b_instance_seg/config.toml", "04b_instance_seg/pennfudan.toml",
                                      str(tmp_path / "mine.toml")]


def test_help_shows_what_dataset_pennfudan_changes():
    # --dataset pennfudan lays pennfudan.toml over config.toml: --help shows both values of each
    # key it changes, and none for a key it leaves alone.
    shown = " ".join(run_script(TRAIN, "--help", timeout=60).stdout.split())
    for flag, default, pennfudan in (("--image-size", 128, 320), ("--epochs", 20, 40),
                                     ("--aspect-ratios", [0.5, 1.0, 2.0], [1.0, 2.0, 3.0])):
        assert f"(default: {default}; --dataset pennfudan: {pennfudan})" in shown, flag
    assert "(default: 0.001)" in shown  # --learning-rate: pennfudan.toml leaves it alone
    assert "pennfudan.toml's values then replace these defaults" in shown  # --dataset's own help


def test_predict_prints_one_line_per_instance(shapes_smoke, tmp_path):
    from PIL import Image, ImageDraw

    output_dir, *_ = shapes_smoke
    image_path = tmp_path / "shapes.jpg"  # PNG bytes behind a .jpg name, RGBA: the reader copes
    image = Image.new("RGBA", (150, 100), (40, 90, 160, 255))
    ImageDraw.Draw(image).ellipse([20, 20, 70, 70], fill=(250, 220, 30, 255))
    image.save(image_path, format="PNG")
    result = run_script(PREDICT, "--model-path", output_dir / "model.weights.h5", "--output-dir",
                        tmp_path / "out", "--score-threshold", "0.0", image_path)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stdout
    for line in lines:
        path, name, score, *box, pixels = line.split()
        assert path == str(image_path) and name in SHAPES and 0.0 <= float(score) <= 1.0
        x0, y0, x1, y1 = map(int, box)  # in the 150 x 100 photo, not the square input
        assert 0 <= x0 <= x1 <= 150 and 0 <= y0 <= y1 <= 100 and int(pixels) >= 0, line
    assert Image.open(tmp_path / "out" / "shapes_instances.png").size == (150, 100)


def test_predict_names_an_unreadable_image(shapes_smoke, tmp_path):
    output_dir, *_ = shapes_smoke
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = run_script(PREDICT, "--model-path", output_dir / "model.weights.h5", bad, check=False)
    assert_one_line_error(result, "broken.jpg")


# Run in a TensorFlow process, with kagglehub's cache (KAGGLEHUB_CACHE, read at each call)
# and the closed proxy set before anything downloads.
_OFFLINE_PROCESS = """
    import json, os, sys
    import numpy as np
    os.environ.update({offline!r}, KAGGLEHUB_CACHE=sys.argv[1])
    import keras, keras_hub
    import model as maskrcnn
    """

# A stand-in for KerasHub's `resnet_18_imagenet` preset, written where kagglehub keeps what it
# downloads: the preset's network (KerasHub's timm converter's config for "resnet18", which
# must give the preset's published parameter count), random weights, BatchNorm scales, shifts
# and statistics drawn at random (a fresh layer's 1s and 0s would match anything), written
# with KerasHub's save_to_preset, then marked complete file by file as kagglehub does.
WRITE_STAND_IN = _OFFLINE_PROCESS + """
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle
    from keras_hub.src.utils.timm.convert_resnet import convert_backbone_config

    preset = keras_hub.models.ResNetBackbone.presets[maskrcnn.IMAGENET_PRESET]
    config = convert_backbone_config({{"architecture": "resnet18"}})
    assert config == maskrcnn.RESNET_18, config
    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.ResNetBackbone(**config)
    assert backbone.count_params() == preset["metadata"]["params"]
    rng = np.random.default_rng(7)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable, low, high in ((layer.gamma, 0.5, 1.5), (layer.beta, -0.5, 0.5),
                                        (layer.moving_mean, -0.5, 0.5), (layer.moving_variance, 0.5, 2.0)):
                variable.assign(rng.uniform(low, high, variable.shape))
    handle = parse_model_handle(preset["kaggle_handle"].removeprefix("kaggle://"))
    cache = Cache()
    backbone.save_to_preset(cache.get_path(handle))
    for name in os.listdir(cache.get_path(handle)):
        cache.mark_as_complete(handle, name)
    print("FOLDER", cache.get_path(handle))
    """

# What --weights imagenet built (train.build_model, as the run did), and what the run trained.
CHECK_IMAGENET_RUN = _OFFLINE_PROCESS + """
    import train

    def backbone_of(net):
        return next(layer for layer in net.network.layers if isinstance(layer, keras.Model))

    def tensors(backbone, kind=keras.layers.Layer):
        return {{f"{{layer.name}}/{{v.name}}": v.numpy() for layer in backbone.layers
                 if isinstance(layer, kind) for v in layer.weights}}

    def spread(net, name, index=0):
        for part in (net.network, net.box_head, net.mask_head):
            if name in [layer.name for layer in part.layers]:
                return float(np.std(part.get_layer(name).weights[index].numpy()))

    cfg, _ = train.parse(["--smoke", "--weights", "imagenet"])
    train.setup_tensorflow(cfg)
    data = train.Data(cfg, None, True, None)
    net = train.build_model(cfg, data.class_names)
    stand_in = tensors(keras_hub.models.ResNetBackbone.from_preset(sys.argv[2]))
    bn = tensors(backbone_of(net), keras.layers.BatchNormalization).keys()
    out = {{"same": stand_in.keys() == tensors(backbone_of(net)).keys() and all(
        np.array_equal(v, tensors(backbone_of(net))[k]) for k, v in stand_in.items()),
        "bn_layers": len(bn) // 4,
        "bn_trainable": sum(layer.trainable for layer in backbone_of(net).layers
                            if isinstance(layer, keras.layers.BatchNormalization)),
        "spread": {{name: spread(net, name) for name in ("rpn_objectness", "rpn_deltas", "box_class",
                                                       "box_deltas")}},
        "largest_head_bias": max(float(np.abs(v.numpy()).max()) for v in net.trainable_variables
                                 if v.path.endswith("bias"))}}
    optimizer = train.make_optimizer(cfg, steps_per_epoch=4)
    optimizer.build(net.trainable_variables)
    batch = next(train.batches(data.training_examples(1), cfg, data.max_instances, 1))
    before = tensors(backbone_of(net))
    train.make_train_step(net, optimizer, cfg)(batch, np.array([0, 0], np.int32))
    after = tensors(backbone_of(net))
    out["bn_moved_by_a_step"] = sorted(k for k in bn if not np.array_equal(before[k], after[k]))
    out["convs_moved_by_a_step"] = sum(not np.array_equal(before[k], after[k]) for k in before if k not in bn)
    trained = tensors(backbone_of(maskrcnn.load_model(sys.argv[3])))
    out["bn_moved_by_the_run"] = sorted(k for k in bn if not np.array_equal(stand_in[k], trained[k]))
    out["conv_correlation_after_the_run"] = min(
        float(np.corrcoef(stand_in[k].ravel(), trained[k].ravel())[0, 1]) for k in stand_in if k not in bn)

    # Each way the load fails is one line that names it: a corrupt file, another network, offline.
    errors = {{}}
    folder = sys.argv[2]
    with open(os.path.join(folder, "model.weights.h5"), "r+b") as f:
        f.truncate(4096)
    other = keras_hub.models.ResNetBackbone(**{{**maskrcnn.RESNET_18, "stackwise_num_blocks": [1, 1, 1, 1]}})
    for case, prepare in (("corrupt", lambda: None), ("other network", lambda: other.save_to_preset(folder)),
                          ("offline", lambda: os.environ.update(KAGGLEHUB_CACHE=sys.argv[1] + "-empty"))):
        prepare()
        try:
            maskrcnn.load_imagenet_backbone()
            errors[case] = "loaded"
        except Exception as exc:
            errors[case] = f"{{type(exc).__name__}}: {{exc}}"
    out["errors"] = errors
    print("JSON" + json.dumps(out))
    """


@pytest.mark.pretrained
def test_imagenet_weights_through_kagglehubs_cache_offline(tmp_path):
    cache, run = tmp_path / "kaggle", tmp_path / "run"
    env = script_env(KAGGLEHUB_CACHE=str(cache), **OFFLINE)  # KerasHub's presets: kagglehub's cache
    # An empty cache and no network: one line that says so, and nothing left behind.
    offline = run_script(TRAIN, "--smoke", "--weights", "imagenet", "--output-dir", run, env=env,
                         check=False, timeout=120)
    assert_one_line_error(offline, "--weights imagenet", "offline", "--weights none")
    assert_failed_start_left_nothing(run)
    # The weights in kagglehub's cache, as a download leaves them: the same command, offline,
    # into the same folder (no --overwrite) loads them and runs to its metrics.json.
    written = run_python(WRITE_STAND_IN.format(offline=OFFLINE), CHAPTER, args=(cache,))
    folder = next(line[7:] for line in written.stdout.splitlines() if line.startswith("FOLDER "))
    metrics = run_chapter(TRAIN, run, "--smoke", "--weights", "imagenet", "--epochs", "1", env=env)
    assert metrics["weights"] == "imagenet" and 0.0 <= metrics["mask_map50"] <= 1.0
    checked = run_python(CHECK_IMAGENET_RUN.format(offline=OFFLINE), CHAPTER,
                         args=(cache, folder, run / "model.weights.h5"))
    out = json.loads(next(line[4:] for line in checked.stdout.splitlines() if line.startswith("JSON")))
    assert out["same"], "the backbone is not the cached preset's"
    # BatchNorm frozen: none of ResNet-18's 20 BatchNorms trains, and neither a train step nor
    # the whole run moves their scales, shifts or statistics; the convolutions do train.
    assert out["bn_layers"] == 20 and out["bn_trainable"] == 0
    assert out["bn_moved_by_a_step"] == [] and out["bn_moved_by_the_run"] == []
    assert out["convs_moved_by_a_step"] == 20 and 0.9 < out["conv_correlation_after_the_run"] < 1.0
    # The new layers start as model.py says: N(0, 0.01) for the RPN and the class scores,
    # N(0, 0.001) for the box deltas, zero biases (measured spreads within 25%).
    expected = {"rpn_objectness": 0.01, "rpn_deltas": 0.01, "box_class": 0.01, "box_deltas": 0.001}
    for name, value in expected.items():
        assert out["spread"][name] == pytest.approx(value, rel=0.25), (name, out["spread"])
    assert out["largest_head_bias"] == 0.0
    errors = out["errors"]
    assert errors["corrupt"].startswith("UserError") and folder in errors["corrupt"], errors
    assert "does not load" in errors["corrupt"] and "delete that folder" in errors["corrupt"]
    assert "another network" in errors["other network"] and "blocks [1, 1, 1, 1]" in errors["other network"]
    assert "offline" in errors["offline"] and "copy" in errors["offline"], errors
    assert all("\n" not in message for message in errors.values())


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "100"], "--image-size must be a multiple of 32"),
    (["--dataset", "coco"], "--dataset must be one of shapes, pennfudan"),
    (["--backbone-filters", "32", "64", "128", "256"], "--backbone-filters"),
    (["--batch-size", "64"], "more than the 16 training images"),  # found after reading the data
])
def test_bad_values_are_one_line_before_training(tmp_path, flags, words):
    result = run_script(TRAIN, "--smoke", "--output-dir", tmp_path / "run", *flags, check=False)
    assert_one_line_error(result, words)


def test_training_never_loads_torch():
    # One framework per process: the training's modules bring no torch with them (the COCO
    # converter, convert_coco.py, runs torchvision in a process of its own).
    result = run_python("""
        import train, model, instances, roi_align, targets, shapes
        print("TORCH", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision"}))
        """, CHAPTER)
    assert "TORCH []" in result.stdout, result.stdout
