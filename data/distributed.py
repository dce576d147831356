"""Who does what in a data-parallel run, framework-free: which process this is (from
torchrun's environment), the share of the global batch each process takes, and
randomness keyed by (seed, epoch, sample), so that a run's result does not depend on how
many processes share the work.

The keyed schedule: each epoch's order is a permutation of all the training samples drawn
from (seed, epoch); it is cut into global batches of --batch-size, and process r of N takes
the r-th of N equal slices of each. Each sample's augmentation draws from a generator of
its own, seeded by (seed, epoch, index). One process and N processes therefore see the
same global batches of the same augmented pictures, only split differently.

    world = world_from_env()                      # World(rank=0, size=1, local_size=1) in a plain run
    per_process_batch(8, world.size)              # 4 with 2 processes; UserError if it does not divide
    for batch in epoch_batches(seed, epoch, 120, 8, world): ...    # this process's sample indices
    rng = sample_rng(seed, epoch, index)          # numpy; sample_seed(...) seeds a torch generator
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from data.cli import UserError, usable_cores

# SeedSequence pads short keys with zeros ([s, e] draws as [s, e, 0]): each stream gets its
# own tag in the second place, and every key of a stream has the same length.
_ORDER, _SAMPLE = 0, 1


class World(NamedTuple):
    """This process among the processes of one run (torchrun's RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""
    rank: int = 0        # 0..size-1; rank 0 writes the run's files
    size: int = 1        # processes in the run, over all machines
    local_size: int = 1  # processes on this machine (they share its cores)


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The World torchrun describes in the environment; a world of one without torchrun."""
    if "RANK" not in environ:
        return World()
    size = int(environ["WORLD_SIZE"])
    return World(int(environ["RANK"]), size, int(environ.get("LOCAL_WORLD_SIZE", size)))


def cores_per_process(world: World | None = None) -> int:
    """The cores each process on this machine may use: `num_threads = 0` means these."""
    world = world or world_from_env()
    return max(1, usable_cores() // world.local_size)


def per_process_batch(batch_size: int, world_size: int, multiple_of: int = 1, why: str = "") -> int:
    """Each process's share of the global --batch-size. A share must be whole (and a
    multiple of `multiple_of`): otherwise a UserError names the batch sizes that work."""
    unit = world_size * multiple_of
    if batch_size % unit == 0:
        return batch_size // world_size
    share = f"a multiple of {multiple_of}" if multiple_of > 1 else "a whole number"
    reason = f" ({why})" if why else ""
    sizes = ", ".join(str(unit * k) for k in range(1, 4))
    raise UserError(f"--batch-size {batch_size} is the global batch: over {world_size} processes each "
                    f"share must be {share}{reason}; use --batch-size {sizes}, ...")


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """A permutation of all sample indices, drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, _ORDER, epoch]).permutation(num_samples)


def global_batches(order: np.ndarray, batch_size: int, short_multiple: int | None = None) -> list[np.ndarray]:
    """`order` cut into batches of `batch_size`. The short last batch is dropped, or with
    `short_multiple` cut down to a multiple of it (dropped if that leaves nothing)."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < batch_size:
        keep = len(batches[-1]) // short_multiple * short_multiple if short_multiple else 0
        batches[-1] = batches[-1][:keep]
        if not keep:
            batches.pop()
    return batches


def split_batches(order: np.ndarray, batch_size: int, world: World,
                  short_multiple: int | None = None) -> list[np.ndarray]:
    """This process's slice of each global batch cut from `order` (see `global_batches`;
    a short batch's multiple must be one of world.size, so that it splits evenly)."""
    return [np.split(batch, world.size)[world.rank]
            for batch in global_batches(order, batch_size, short_multiple)]


def epoch_batches(seed: int, epoch: int, num_samples: int, batch_size: int, world: World,
                  short_multiple: int | None = None) -> list[np.ndarray]:
    """This process's slice of each global batch of `epoch`, in the order of (seed, epoch)."""
    return split_batches(epoch_order(seed, epoch, num_samples), batch_size, world, short_multiple)


class EpochBatches:
    """A DataLoader `batch_sampler`: this process's slice of each global batch (short last
    batch dropped), as (epoch, index) keys, from which the dataset seeds each sample's
    augmentation. Call `set_epoch(epoch)` before each epoch, as with DistributedSampler."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, world: World):
        self.num_samples, self.batch_size, self.seed, self.world = num_samples, batch_size, seed, world
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in epoch_batches(self.seed, self.epoch, self.num_samples, self.batch_size, self.world):
            yield [(self.epoch, int(index)) for index in batch]

    def __len__(self) -> int:
        return self.num_samples // self.batch_size


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample `index`'s augmentation in `epoch`."""
    return np.random.default_rng([seed, _SAMPLE, epoch, index])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for a torch generator, from the same key as `sample_rng`."""
    key = np.random.SeedSequence([seed, _SAMPLE, epoch, index])
    return int(key.generate_state(1, np.uint64)[0] >> np.uint64(1))
