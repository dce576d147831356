"""Data-parallel training with torch.distributed: what a PyTorch chapter needs under torchrun.

torchrun starts N copies of a train.py and tells each, in its environment, its RANK
(0..N-1), the WORLD_SIZE N, its LOCAL_RANK on its machine and where the copies meet
(MASTER_ADDR, MASTER_PORT). `setup` joins them into one process group: gloo on CPUs,
nccl on CUDA GPUs (one GPU per process, cuda:LOCAL_RANK). `Processes.wrap` puts the model
in DistributedDataParallel, which averages the gradients over the processes during
backward, so every copy takes the same optimizer step from the same weights. Each copy
reads its own slice of every global batch (data.distributed).

A plain `python train.py` has no such environment: `setup` creates no process group and
returns a world of one, where every helper here hands back what it was given, so such a
run computes exactly what it would without this module (and so does `torchrun
--nproc_per_node 1`: its group of one is never used).

    ddp = torch_ddp.setup(device)           # this process's rank, the number of them, its device
    stepped = ddp.wrap(model)               # DDP with 2+ processes, the model itself otherwise
    loss = ddp.mean(loss.detach())          # the same number in every process
    if ddp.any(out_of_time): stop           # decided together: no process is left waiting
    if ddp.is_main: write files             # rank 0 alone writes and prints
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import tqdm

from data.distributed import World, world_from_env


@dataclass(frozen=True)
class Processes:
    """This process among the run's processes, and the collective operations between them."""
    world: World
    device: torch.device  # cuda:LOCAL_RANK under torchrun on GPUs

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @property
    def size(self) -> int:
        return self.world.size

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel (it broadcasts rank 0's weights at once); the model itself
        in a world of one. Keep the plain model for saving and evaluating."""
        if self.size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the processes (gloo has no AVG: a sum, then divided)."""
        if self.size == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each number summed over the processes (as float64: counts stay exact below 2**53)."""
        if self.size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return [type(value)(sum_) for value, sum_ in zip(values, total.tolist(), strict=True)]

    def any(self, flag: bool) -> bool:
        """True in every process if it is true in any: for a stop all must take together."""
        if self.size == 1:
            return bool(flag)
        (count,) = self.sum([float(bool(flag))])
        return count > 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block (writing smoke data, downloading) while the others wait;
        then the others run it, reading what rank 0 wrote."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def setup(device: torch.device) -> Processes:
    """Join torchrun's process group (gloo on a CPU, nccl on CUDA); a world of one without
    torchrun. The other ranks print nothing: their stdout goes to os.devnull and their
    progress bars are off (their errors still reach stderr)."""
    world = world_from_env()
    if "RANK" not in os.environ:
        return Processes(world, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    atexit.register(close)
    sys.excepthook = functools.partial(_one_line_if_a_peer_stopped, world.rank, sys.excepthook)
    if world.rank != 0:
        quiet()
    return Processes(world, device)


def _one_line_if_a_peer_stopped(rank: int, excepthook, kind, value, traceback) -> None:
    """A collective that failed because another process is gone (it has said why) ends this
    one with a line, not a traceback; torchrun then reports which process failed first."""
    if isinstance(value, dist.DistError) or (isinstance(value, RuntimeError) and "by peer" in str(value)):
        print(f"error: process {rank} stops too: another process of the run is gone", file=sys.stderr)
    else:
        excepthook(kind, value, traceback)


def quiet() -> None:
    """Silence this process's stdout and progress bars; its errors still reach stderr."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


def close() -> None:
    """Leave the process group (registered to run at exit by `setup`)."""
    if dist.is_initialized():
        dist.destroy_process_group()
