"""This process's place in a ``torchrun`` job: the rank, sums over ranks, and batch shards.

A global batch is split into contiguous per-rank shards; every loss is normalised by global token
counts (:meth:`Dist.sum`), so the per-rank losses add up to the single-process loss and the summed
gradients equal its gradient. Backend gloo on CPU, nccl on CUDA. Without ``torchrun`` the process
is rank 0 of 1 and every method is the identity.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class Dist:
    """Rank, world size and device of this process (one process: rank 0 of 1)."""
    def __init__(self, device: str):
        self.world, self.rank = _env_int("WORLD_SIZE", 1, 1), _env_int("RANK", 0, 0)
        if self.rank >= self.world:
            raise ValueError(f"RANK={self.rank} but WORLD_SIZE={self.world}; launch with torchrun, which sets both")
        self.device = device
        if self.world > 1:
            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                backend = "nccl" if self.device.startswith("cuda") else "gloo"
                dist.init_process_group(backend, store=_rendezvous(self.rank, self.world), rank=self.rank,
                                        world_size=self.world)

    @property
    def is_first(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (differentiable only through this rank's term, as gradients are)."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        dist.all_reduce(y)
        return x + (y - x.detach())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (so that all ranks stop together)."""
        return bool(self.sum(torch.tensor(float(flag))) > 0)

    def shard(self, n: int, what: str) -> slice:
        """This rank's contiguous share of ``n`` rows (``n`` must divide evenly)."""
        if n % self.world:
            raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _rendezvous(rank: int, world: int) -> dist.Store:
    """The key-value store the processes meet at (``MASTER_ADDR:MASTER_PORT``). A process that is
    missing is an error after ``TSDS_RENDEZVOUS_S`` seconds (default 60), not after torch's 30 minutes;
    under torchrun its agent hosts the store and watches the processes itself."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT", 29500, 1)
    wait = _env_int("TSDS_RENDEZVOUS_S", 60, 1)
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        return dist.TCPStore(host, port, world, hosts, timeout=timedelta(seconds=wait), wait_for_workers=hosts)
    except (RuntimeError, OSError) as e:  # torch's DistStoreError is a RuntimeError
        raise ValueError(f"the {world} processes did not all meet at {host}:{port} within {wait} s "
                         f"({type(e).__name__}); start every rank (e.g. torchrun --nproc_per_node {world}) or unset "
                         "WORLD_SIZE and RANK to run one process") from None


def _env_int(name: str, default: int, lo: int) -> int:
    """An integer environment variable set by ``torchrun`` (``default`` when unset)."""
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"the environment variable {name}={text!r} is not an integer; unset it or launch "
                         "with torchrun") from None
    if value < lo:
        raise ValueError(f"the environment variable {name}={value} must be at least {lo}")
    return value


def close() -> None:
    """End the process group if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()
