"""Communicator (RFC): in-place all-reduce on device buffers: NCCL on GPU, Gloo on CPU.

Initialised from the Coordinator's store (a prefix of it), so it needs no port of its own.
The process group carries the same timeout as the coordinator so a dead peer turns into an
exception instead of a hang (the launcher's hard timeout is the last resort).
"""

from __future__ import annotations

import datetime


class Communicator:
    def __init__(self, coord, backend: str = "auto"):
        import torch
        import torch.distributed as dist

        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        self.coord = coord
        if backend == "nccl":
            torch.cuda.set_device(coord.local_rank)
            self.device = torch.device("cuda", coord.local_rank)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend, store=dist.PrefixStore("pg", coord.store),
                                rank=coord.rank, world_size=coord.world_size,
                                timeout=datetime.timedelta(seconds=coord.timeout_s))
        self.world_size = coord.world_size
        self._groups: dict[tuple, object] = {}

    def subgroup(self, ranks: tuple[int, ...]):
        """Collective over ALL ranks (torch requires it), so call in the same order everywhere."""
        import torch.distributed as dist

        if ranks not in self._groups:
            self._groups[ranks] = dist.new_group(list(ranks))
        return self._groups[ranks]

    def allreduce(self, tensor, group=None) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, group=group)

    def synchronize(self) -> None:
        if self.backend == "nccl":
            import torch

            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
