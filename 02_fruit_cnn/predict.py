"""02: name the fruit in your own photos with a model that train.py saved.

What it does
    Reads each photo with the shared reader (any format Pillow opens: PNG behind a .jpg
    name, CMYK, RGBA, palette, EXIF-rotated phone photos), squashes it to the model's
    square input exactly as training did, and prints one line per photo: the class, its
    probability and the runner-up, e.g.
        photo.jpg: banana 97.3% (runner-up: mixed 1.9%)
    A model saved by another chapter is refused with one line.

How to run
    python 02_fruit_cnn/predict.py --model-path runs/02_fruit_cnn/model.keras photo.jpg
    python 02_fruit_cnn/predict.py a.jpg b.png      # the default run's model

What to expect (measured on 2 shared CPU cores)
    One photo in 5.7-5.9 s of wall time, most of it the TensorFlow import (test photo
    mixed_21.jpg, 800x535, with the model of runs/02_fruit_cnn; another training job was
    running on the second core).
"""

from __future__ import annotations

import numpy as np

from data import classify, fruits
from data.cli import run_main

CHAPTER = "02_fruit_cnn"


def main(argv=None) -> list[str]:
    args = classify.predict_parser(__doc__, CHAPTER).parse_args(argv)
    classify.check_keras_model_chapter(args.model_path, CHAPTER)
    classify.check_photos(args.photos)
    # TensorFlow takes seconds to import: only now, so argument errors answer at once.
    import model

    model.set_up_tensorflow(args.device, args.num_threads, seed=0, verbose=False)
    net, image_size = model.load(args.model_path)
    images = np.stack([classify.read_classifier_input(path, image_size) for path in args.photos])
    lines = [classify.top2_line(path.name, probs, fruits.CLASSES)
             for path, probs in zip(args.photos, model.probabilities(net, images), strict=True)]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run_main(main)
