"""01: MNIST digits with Keras: a dense softmax classifier, then a small convnet.

What it teaches: multiclass classification the way the 2020 study did it (a dense network
with a softmax output, trained with SGD on categorical cross-entropy), then what it takes to
go well past the study on 2 CPU cores: Nesterov momentum, a warm-up + cosine learning rate,
random shifts of the training digits, and keeping the epoch with the best validation
accuracy. Every choice is made on a validation split carved from the 60,000 training
images; the 10,000 test images are scored once, at the end. The networks are built in
network.py (read it next); predict.py runs a trained one on photos of handwritten digits.

How to run (from the repository root):
    python 01_mnist/train.py                      # the tuned dense net (config.toml)
    python 01_mnist/train.py --model cnn --output-dir runs/01_mnist-cnn
    python 01_mnist/train.py --smoke              # synthetic digits, end to end in seconds
    python 01_mnist/train.py --strategy mirrored  # data-parallel: every local GPU (or 2 CPU replicas)
    python 01_mnist/train.py --eval-only --model-path runs/01_mnist/model.keras
    python 01_mnist/predict.py --model-path runs/01_mnist/model.keras my_digit.jpg
A run writes into --output-dir (default runs/01_mnist/; a finished run is never overwritten
without --overwrite): config.json, split.json, metrics.json (accuracies with Wilson 95%
intervals), curves.png, confusion.png, wrong.png (the most confidently wrong test digits)
and model.keras. With the same seed, machine and library versions a run repeats bit for bit.

The measured figures, the ablation behind each choice and their commands: 01_mnist/README.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data import cli, download, intervals, mnist, outputs, splits, synthetic
from data.cli import REPO_ROOT, ChapterParser, UserError, require, run_main
from parallel import tf_strategy

HERE = Path(__file__).resolve().parent
CHAPTER = "01_mnist"
MODELS = ("mlp", "cnn")
DEVICES = ("auto", "cpu", "cuda")
NUM_CLASSES = 10
SMOKE_TRAIN, SMOKE_TEST = 1000, 200  # synthetic digits for --smoke: enough to learn a little
NUM_WRONG_SHOWN = 32

# --- Config ------------------------------------------------------------------------


def build_parser() -> ChapterParser:
    parser = ChapterParser(__doc__, HERE / "config.toml", CHAPTER)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-only", action="store_true",
                       help="evaluate a saved model on validation and test; no training "
                            "(outputs default to runs/01_mnist-eval/)")
    group.add_argument("--model-path", type=Path, default=None,
                       help="the .keras file for --eval-only (default: <output-dir>/model.keras "
                            "of a training run, i.e. runs/01_mnist/model.keras)")
    return parser


def check_config(cfg: dict, args) -> None:
    require(cfg["model"] in MODELS, f"--model must be one of {', '.join(MODELS)}, got {cfg['model']!r}")
    require(cfg["device"] in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {cfg['device']!r}")
    cli.require_at_least(cfg, "num_threads", 0)
    cli.require_at_least(cfg, "epochs", 1)
    cli.require_at_least(cfg, "batch_size", 1)
    cli.require_positive(cfg, "learning_rate")
    require(0 <= cfg["warmup_epochs"] < cfg["epochs"],
            f"--warmup-epochs must be in [0, epochs), got {cfg['warmup_epochs']}")
    require(0 <= cfg["momentum"] < 1, f"--momentum must be in [0, 1), got {cfg['momentum']}")
    require(0 <= cfg["dropout"] < 1, f"--dropout must be in [0, 1), got {cfg['dropout']}")
    require(0 <= cfg["shift_pixels"] <= 8, f"--shift-pixels must be in 0..8, got {cfg['shift_pixels']}")
    require(0 < cfg["val_fraction"] < 0.5, f"--val-fraction must be in (0, 0.5), got {cfg['val_fraction']}")
    for key in ("hidden_units", "conv_filters"):
        require(len(cfg[key]) >= 1 and min(cfg[key]) >= 1,
                f"--{key.replace('_', '-')} needs one or more positive sizes, got {cfg[key]}")
    require(args.model_path is None or args.eval_only, "--model-path is only read with --eval-only")
    tf_strategy.check_config(cfg)


def resolve_paths(args) -> Path:
    """--eval-only writes beside, not over, the training run; returns the model file to load."""
    default_dir = REPO_ROOT / "runs" / (CHAPTER + ("-smoke" if args.smoke else ""))
    if args.eval_only and args.output_dir == default_dir:
        args.output_dir = default_dir.with_name(default_dir.name + "-eval")
    model_path = args.model_path or default_dir / "model.keras"
    if args.eval_only:
        require(model_path.is_file(), f"model file not found: {model_path} "
                "(train one first, or pass --model-path)")
    return model_path


# --- Data --------------------------------------------------------------------------


class Split(NamedTuple):
    images: np.ndarray  # (N, 28, 28) uint8, white ink on black
    labels: np.ndarray  # (N,) digits 0..9
    indices: np.ndarray  # positions in the IDX file they came from


class Digits(NamedTuple):
    train: Split
    val: Split
    test: Split | None  # None in a tuning run: the test files are not even opened


def mnist_folder(args, cfg: dict) -> Path:
    """Real MNIST (downloaded on first use), or synthetic digits in the same IDX files."""
    if args.smoke:
        smoke_dir = args.output_dir / "smoke-data"
        synthetic.write_mnist(smoke_dir, num_train=SMOKE_TRAIN, num_test=SMOKE_TEST, seed=cfg["seed"])
        return smoke_dir / "mnist"
    folder = Path(args.data_dir) / "mnist"
    needed = mnist.FILES["train"] + (mnist.FILES["test"] if cfg["evaluate_test"] else ())
    if not all((folder / name).is_file() for name in needed):
        download.ensure("mnist", args.data_dir)
    return folder


def load_digits(args, cfg: dict) -> Digits:
    """Train and validation from the 60,000 training digits (stratified, seeded); the
    10,000 test digits only when the run scores them."""
    folder = mnist_folder(args, cfg)
    images, labels = mnist.read_split(folder, "train")
    train_idx, val_idx = splits.stratified_split(labels, cfg["val_fraction"], cfg["seed"])
    test = None
    if cfg["evaluate_test"]:
        test_images, test_labels = mnist.read_split(folder, "test")
        test = Split(test_images, test_labels, np.arange(len(test_labels)))
    return Digits(Split(images[train_idx], labels[train_idx], train_idx),
                  Split(images[val_idx], labels[val_idx], val_idx), test)


def save_split(output_dir: Path, data: Digits) -> None:
    """split.json: train and val are indices into the 60,000 training digits
    (train-images-idx3-ubyte.gz); test is the whole t10k file."""
    num_test = "all" if data.test is None else f"all {len(data.test.labels):,}"
    outputs.write_split(output_dir, {
        "train": data.train.indices.tolist(), "val": data.val.indices.tolist(),
        "test": [f"{num_test} digits of t10k-images-idx3-ubyte.gz, in file order"]})


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype="float32")[labels]


def as_inputs(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 28, 28, 1) float32 pixels in 0..255; the model scales them."""
    return images.astype("float32")[..., None]


# --- Model -------------------------------------------------------------------------
# The dense net and the convnet are built in network.py (network.build), which predict.py
# shares to load a saved model back: read it next.

# --- Train -------------------------------------------------------------------------


class Training(NamedTuple):
    history: dict  # per-epoch loss, accuracy, val_loss, val_accuracy
    best_epoch: int
    seconds: float


def train(model, cfg: dict, data: Digits, keep_best) -> Training:
    """Fit on train, score validation after every epoch, keep the best epoch's weights."""
    start = time.perf_counter()
    history = model.fit(
        as_inputs(data.train.images), one_hot(data.train.labels),
        validation_data=(as_inputs(data.val.images), one_hot(data.val.labels)),
        batch_size=cfg["batch_size"], epochs=cfg["epochs"], shuffle=True, verbose=2,
        callbacks=[keep_best])
    seconds = time.perf_counter() - start
    losses = history.history["loss"]
    if not np.all(np.isfinite(losses)) or len(losses) < cfg["epochs"]:
        raise UserError(f"the training loss became non-finite in epoch {len(losses)}; "
                        f"try a lower --learning-rate (now {cfg['learning_rate']})")
    return Training(history.history, keep_best.best_epoch, seconds)


# --- Evaluate ----------------------------------------------------------------------


class Scores(NamedTuple):
    probs: np.ndarray  # (N, 10)
    pred: np.ndarray  # (N,)
    correct: int
    accuracy: float
    loss: float  # categorical cross-entropy, as Keras reports it (probabilities clipped at 1e-7)


def score(probs: np.ndarray, labels: np.ndarray) -> Scores:
    pred = probs.argmax(axis=1)
    correct = int((pred == labels).sum())
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)).mean()
    return Scores(probs, pred, correct, correct / len(labels), float(loss))


def val_metrics(scores: Scores, model, data: Digits) -> dict:
    return {"val_accuracy": scores.accuracy,
            "val_accuracy_ci95": intervals.wilson_ci95(scores.correct, len(data.val.labels)),
            "val_loss": scores.loss, "num_params": int(model.count_params()),
            "num_train": len(data.train.labels), "num_val": len(data.val.labels)}


def test_metrics(scores: Scores, labels: np.ndarray) -> dict:
    """Test accuracy and each digit's accuracy, each with its Wilson 95% interval."""
    metrics = {"test_accuracy": scores.accuracy,
               "test_accuracy_ci95": intervals.wilson_ci95(scores.correct, len(labels)),
               "test_loss": scores.loss, "test_errors": len(labels) - scores.correct,
               "num_test": len(labels)}
    for digit in range(NUM_CLASSES):
        mine = labels == digit
        right = int((scores.pred[mine] == digit).sum())
        total = int(mine.sum())
        metrics[f"test_accuracy_{digit}"] = right / total if total else None
        metrics[f"test_accuracy_{digit}_ci95"] = intervals.wilson_ci95(right, total) if total else None
    return metrics


def plot_test(scores: Scores, test: Split, output_dir: Path, model_name: str) -> None:
    """The confusion matrix, and the test digits the model got wrong with the most confidence."""
    cm = outputs.confusion_matrix(test.labels, scores.pred, NUM_CLASSES)
    outputs.plot_confusion(cm, [str(d) for d in range(NUM_CLASSES)], output_dir / "confusion.png",
                           title=f"MNIST test, {model_name}")
    wrong = np.flatnonzero(scores.pred != test.labels)
    confidence = scores.probs[wrong, scores.pred[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")][:NUM_WRONG_SHOWN]
    titles = [f"true {test.labels[i]} pred {scores.pred[i]}\n{scores.probs[i].max():.0%} sure"
              for i in worst]
    outputs.plot_image_grid([test.images[i] for i in worst], titles, output_dir / "wrong.png", cmap="gray",
                            title=f"most confident mistakes ({len(wrong)} of {len(test.labels)} wrong)")


# --- Save --------------------------------------------------------------------------


def write_results(output_dir: Path, metrics: dict) -> None:
    outputs.write_metrics(output_dir, metrics)
    if "test_accuracy" in metrics:
        low, high = metrics["test_accuracy_ci95"]
        print(f"test accuracy {metrics['test_accuracy']:.2%} (95% interval {low:.2%} to {high:.2%}), "
              f"val accuracy {metrics['val_accuracy']:.2%}")


def training_metrics(run: Training) -> dict:
    epochs = len(run.history["loss"])
    return {"epochs": epochs, "best_epoch": run.best_epoch, "train_seconds": round(run.seconds, 1),
            "seconds_per_epoch": round(run.seconds / epochs, 2)}


def main(argv=None) -> dict:
    cfg, args = build_parser().parse_config(argv)
    check_config(cfg, args)
    model_path = resolve_paths(args)
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)  # the chief's, or scratch
    # Keras loads here, after the flags are checked, so --help and flag errors answer at once.
    import network

    device, device_name = network.use_device(cfg["device"], cfg["num_threads"])
    strategy = tf_strategy.make_strategy(cfg)  # "default": one device, as a plain run
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite,
                                            smoke=args.smoke, eval_only=args.eval_only)
    network.make_deterministic(cfg["seed"], cfg["deterministic"])
    data = load_digits(args, cfg)
    save_split(output_dir, data)
    metrics = {"model": cfg["model"], "smoke": args.smoke, "eval_only": args.eval_only}

    if args.eval_only:
        model = network.load(model_path)
        metrics.update(model=model.name, model_path=str(model_path))
    else:
        with strategy.scope():  # the weights and the optimizer's state, one copy per replica
            model = network.build(cfg)
            network.compile_for_training(model, cfg, -(-len(data.train.labels) // cfg["batch_size"]))
        tf_strategy.sync_batchnorm(model, strategy)
        # Device, data and model are ready: from here a failure keeps the run's files.
        # Before this line it leaves nothing, so the retry needs no --overwrite.
        outputs.training_started(output_dir)
        run = train(model, cfg, data, network.KeepBestEpoch())
        outputs.plot_curves({k: run.history[k] for k in ("loss", "val_loss", "accuracy", "val_accuracy")},
                            output_dir / "curves.png", title=f"MNIST {cfg['model']}")
        metrics.update(training_metrics(run))
        network.save(model, output_dir / "model.keras")

    val = score(network.probabilities(model, data.val.images), data.val.labels)
    metrics.update(val_metrics(val, model, data))
    if data.test is not None:  # the one look at the test set
        test = score(network.probabilities(model, data.test.images), data.test.labels)
        metrics.update(test_metrics(test, data.test.labels))
        plot_test(test, data.test, output_dir, model.name)
    metrics.update(outputs.run_facts(("tensorflow", "keras"), device=device, device_name=device_name),
                   **tf_strategy.run_facts(strategy, model))
    write_results(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
