"""03: VOC XML -> TFRecord + label map, the first step of the TensorFlow Object Detection API tutorial.

What it does
    The API's tutorial had its users label photos in LabelImg (one Pascal VOC .xml per
    photo), convert them with `generate_tfrecord.py` into `train.record` / `test.record`
    of `tf.train.Example`s, and write a `label_map.pbtxt`. This script does the same with
    the API's own feature keys (see records.py), so the files read like the API's.
    - The fruit set (default): train.record (192 photos), val.record (48) and test.record
      (60). Validation is the seeded, stratified 48 photos that 03b_xml_detection holds
      out (`data.splits.stratified_split` with seed 0 and val fraction 0.2 over the
      file-name classes), and test is the set's 60 photos, so chapters 03 and 03b are
      scored on the same photos.
    - `--voc-dir DIR`: any LabelImg folder (images plus .xml); class names come from the
      files (sorted) or from `--classes`. A bad XML file, a DOCTYPE, a box outside its
      image or an unknown class stops it with one line naming the file.
    Photos are stored upright and RGB (PNG-behind-.jpg, RGBA, CMYK and EXIF rotation are
    handled by the shared reader) and re-encoded as JPEG, shrunk to `--max-side` pixels;
    the boxes are normalised to 0..1, so shrinking does not change them.

What one record holds (the first of test.record, read back with tf.train.Example)
    image/height [229]   image/width [300]   image/format [b'jpeg']   image/encoded <42836 JPEG bytes>
    image/filename [b'apple_77.jpg']   image/source_id [b'apple_77.jpg']
    image/object/bbox/xmin [0.237, 0.04, 0.447, 0.357, 0.69]   (and xmax, ymin, ymax; 0..1)
    image/object/class/text [b'apple', b'apple', b'apple', b'apple', b'apple']
    image/object/class/label [1, 1, 1, 1, 1]
    label_map.pbtxt:  item { id: 1 name: 'apple' }  item { id: 2 name: 'banana' }  item { id: 3 ... }
    python 03_tf_od_api/make_tfrecords.py --data-dir /tmp/dd  -> 192 / 48 / 60 photos with
    353 / 112 / 117 boxes in 19 s on a busy 2-core machine (TensorFlow's import included)

How to run
    python 03_tf_od_api/make_tfrecords.py --data-dir /tmp/dd              # the fruit set
    python 03_tf_od_api/make_tfrecords.py --voc-dir my_labels/ --classes cat dog
    python 03_tf_od_api/make_tfrecords.py --smoke                         # synthetic, seconds
    (train.py makes the fruit records itself; give it --records-dir for your own.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import photos  # framework-free: 03_tf_od_api/photos.py

from data.cli import REPO_ROOT, OneLineParser, UserError, default_data_dir, run_main
from data.fruits import BOX_CLASSES


def parse_args(argv):
    parser = OneLineParser(description=__doc__.strip().splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="dataset folder holding fruits/ (default: $DLSTUDY_DATA_DIR or data/datasets/)")
    parser.add_argument("--voc-dir", type=Path, default=None,
                        help="a LabelImg folder (images + VOC .xml) instead of the fruit set")
    parser.add_argument("--test-voc-dir", type=Path, default=None,
                        help="with --voc-dir: a second LabelImg folder written as test.record")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="class names in label-map order (default: the fruit set's, or those in --voc-dir)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "03_tf_od_api-records",
                        help="where the .record files and label_map.pbtxt go")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the training photos held out as val.record (stratified)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--max-side", type=int, default=640,
                        help="shrink photos so the longer side is at most this (0: keep the size)")
    parser.add_argument("--smoke", action="store_true", help="a tiny synthetic fruit set, in seconds")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.max_side < 0 or 0 < args.max_side < 32:
        parser.error(f"--max-side must be 0 or at least 32, got {args.max_side}")
    if args.test_voc_dir is not None and args.voc_dir is None:
        parser.error("--test-voc-dir needs --voc-dir")
    return args


def collect(args) -> tuple[dict, list[str]]:
    """(photos per split, class names) for the fruit set or a LabelImg folder, checked."""
    if args.voc_dir is None:
        smoke_dir = args.output_dir / "smoke-data" if args.smoke else None
        splits = photos.fruit_splits(args.data_dir or default_data_dir(), args.val_fraction,
                                      args.seed, smoke_dir)
        class_names = list(args.classes or BOX_CLASSES)
    else:
        splits = photos.voc_folder_splits(args.voc_dir, args.val_fraction, args.seed, args.test_voc_dir)
        found = sorted({name for split in splits.values() for photo in split for name in photo.names})
        if not found and not args.classes:
            raise UserError(f"{args.voc_dir}: the .xml files hold no boxes; nothing to learn")
        class_names = list(args.classes or found)
    if len(set(class_names)) != len(class_names):
        raise UserError(f"--classes lists a name twice: {class_names}")
    photos.check_photos(splits, class_names)
    return splits, class_names


def main(argv=None) -> dict[str, int]:
    args = parse_args(argv)
    start = time.monotonic()
    splits, class_names = collect(args)  # every file checked before TensorFlow loads
    import records  # TensorFlow writes the records

    counts = records.write_dataset(args.output_dir, splits, class_names, args.max_side)
    boxes = {split: sum(len(photo.names) for photo in items) for split, items in splits.items()}
    for split, count in counts.items():
        print(f"{args.output_dir / (split + '.record')}: {count} photos, {boxes[split]} boxes")
    print(f"{args.output_dir / 'label_map.pbtxt'}: {', '.join(f'{i} {n}' for i, n in enumerate(class_names, 1))}")
    print(f"done in {time.monotonic() - start:.1f} s")
    return counts


if __name__ == "__main__":
    run_main(main)
