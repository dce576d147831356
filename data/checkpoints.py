"""One file for a Keras run's checkpoint: the weights, the optimizer's state and the progress.

The framework stays in the chapter: it passes `model.get_weights()` and the optimizer's
variables as NumPy arrays in, and sets them back from what `load_arrays` returns. One `.npz`,
written to a temporary name and renamed, so a run killed mid-write keeps its previous checkpoint.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.cli import UserError
from data.outputs import atomic_path, jsonable


def save_arrays(path: Path, state: dict, weights: Sequence, optimizer: Sequence) -> Path:
    """`weights` and `optimizer` as lists of arrays (their order is their key), `state` as JSON."""
    arrays = {f"weight_{i}": np.asarray(w) for i, w in enumerate(weights)}
    arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer)})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, state=json.dumps(jsonable(state)), **arrays)
    return Path(path)


def load_arrays(path: Path, num_weights: int, num_optimizer: int) -> tuple[dict, list, list]:
    """(state, weights, optimizer variables) as saved; a one-line error when the file is missing
    or was written for another model."""
    if not Path(path).is_file():
        raise UserError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        with np.load(path) as saved:
            counts = (sum(k.startswith("weight_") for k in saved.files),
                      sum(k.startswith("optimizer_") for k in saved.files))
            if counts != (num_weights, num_optimizer):
                raise UserError(f"--resume: {path} holds {counts[0]} weights and {counts[1]} optimizer "
                                f"variables, this model {num_weights} and {num_optimizer}: it was "
                                "written for another configuration; start without --resume")
            weights = [saved[f"weight_{i}"] for i in range(num_weights)]
            optimizer = [saved[f"optimizer_{i}"] for i in range(num_optimizer)]
            state = json.loads(str(saved["state"]))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):  # cut short, empty, or not one
        raise UserError(f"--resume: {path} is damaged or not a checkpoint; start anew with "
                        "--overwrite") from None
    return state, weights, optimizer
