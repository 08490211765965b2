"""Multi-process runs launched by ``torchrun`` (PyTorch distributed: gloo on CPU, nccl on CUDA).

``lefusion train`` uses DDP over the ranks; ``lefusion enlarge`` shards its source cases over them and rank 0
assembles the one output dataset. Run plainly (no ``WORLD_SIZE`` > 1 in the environment) everything here is a
no-op with a single rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a `torchrun` job (world_size 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; ``None`` on the other ranks."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        """Wait for every rank, then leave the process group (call once, at the end of the run)."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def init_distributed(device: str, timeout_minutes: float = 30.0) -> tuple[DistributedContext, str]:
    """Join the process group when launched by `torchrun`; returns the context and this rank's device.

    ``device`` is a resolved device string (``"cpu"`` or ``"cuda"``); on CUDA each rank takes GPU
    ``LOCAL_RANK``. ``timeout_minutes`` bounds how long a collective waits for a slow rank (an enlargement with
    unevenly sized shards needs more than the default 30 minutes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(), device
    ctx = DistributedContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return ctx, device


__all__ = ["DistributedContext", "init_distributed"]
