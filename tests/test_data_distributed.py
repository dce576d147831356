"""data/distributed.py: torchrun's environment, each process's share of the global batch,
and randomness keyed by (seed, epoch, sample), checked without a framework."""

from __future__ import annotations

import numpy as np
import pytest

from data.cli import UserError
from data.distributed import (
    EpochBatches,
    World,
    epoch_batches,
    epoch_order,
    global_batches,
    per_process_batch,
    sample_rng,
    sample_seed,
    world_from_env,
)


def test_world_from_torchruns_environment_or_a_world_of_one():
    assert world_from_env({}) == World(0, 1, 1)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == World(3, 4, 2)


def test_the_global_batch_splits_evenly_or_is_refused_naming_sizes_that_work():
    assert per_process_batch(8, 1) == 8 and per_process_batch(8, 2) == 4 and per_process_batch(8, 4, 2) == 2
    with pytest.raises(UserError, match=r"--batch-size 6 .* 4 processes .*use --batch-size 4, 8, 12"):
        per_process_batch(6, 4)
    with pytest.raises(UserError, match=r"multiple of 2 \(pairs\); use --batch-size 4, 8, 12"):
        per_process_batch(6, 2, multiple_of=2, why="pairs")


def test_the_processes_slices_make_up_the_global_batches_whatever_their_number():
    # 1, 2 or 4 processes: the same global batches, in the same order, only split
    one = epoch_batches(seed=7, epoch=3, num_samples=23, batch_size=8, world=World(0, 1, 1))
    assert [len(b) for b in one] == [8, 8]  # the short last batch (7) is dropped
    for size in (2, 4):
        slices = [epoch_batches(7, 3, 23, 8, World(rank, size, size)) for rank in range(size)]
        joined = [np.concatenate([s[step] for s in slices]) for step in range(len(one))]
        assert all(np.array_equal(a, b) for a, b in zip(joined, one, strict=True))
        assert {len(b) for s in slices for b in s} == {8 // size}
    # a new epoch or seed is a new order; the same pair is the same order
    assert np.array_equal(epoch_order(7, 3, 23), epoch_order(7, 3, 23))
    assert not np.array_equal(epoch_order(7, 3, 23), epoch_order(7, 4, 23))
    assert not np.array_equal(epoch_order(7, 3, 23), epoch_order(8, 3, 23))


def test_a_short_last_batch_is_cut_to_a_multiple_or_dropped():
    order = np.arange(17)
    assert [len(b) for b in global_batches(order, 6, short_multiple=2)] == [6, 6, 4]
    assert [len(b) for b in global_batches(order, 6, short_multiple=4)] == [6, 6, 4]
    assert [len(b) for b in global_batches(np.arange(15), 6, short_multiple=4)] == [6, 6]
    assert [len(b) for b in global_batches(order, 6)] == [6, 6]


def test_epoch_batches_sampler_gives_epoch_and_index_keys():
    sampler = EpochBatches(num_samples=10, batch_size=4, seed=0, world=World(1, 2, 2))
    sampler.set_epoch(5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    expected = epoch_batches(0, 5, 10, 4, World(1, 2, 2))
    assert batches == [[(5, int(i)) for i in b] for b in expected]


def test_each_sample_draws_from_its_own_key():
    first = sample_rng(0, 1, 5).random(3)
    assert np.array_equal(first, sample_rng(0, 1, 5).random(3))
    others = [sample_rng(0, 1, 6), sample_rng(0, 2, 5), sample_rng(1, 1, 5)]
    assert all(not np.array_equal(first, rng.random(3)) for rng in others)
    # the first sample's generator is not the epoch order's (numpy reads a key [s, e] as [s, e, 0])
    assert not np.array_equal(epoch_order(0, 1, 20), sample_rng(0, 1, 0).permutation(20))
    seeds = {sample_seed(0, epoch, index) for epoch in range(3) for index in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
