"""Which process of a multi-process (DDP) run this is, before and after the process group exists.

Under ``trainer=ddp`` Lightning starts the other ranks by running the same command again
(``python -m harness ...``) with ``LOCAL_RANK`` (and ``NODE_RANK`` / ``RANK`` on clusters) set, so
every rank runs the whole pipeline. Only rank 0 takes the stage cache's lock (the others follow
it: they train the same stage in the same collective), commits stages, writes checkpoints, the
summary and the results record, and logs; the other ranks only train.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: environment variables that carry a process's global rank, as Lightning reads them
RANK_ENV = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank: 0 in a single-process run and in DDP's first process."""
    for name in RANK_ENV:
        if os.environ.get(name):
            return int(os.environ[name])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return local if node == 0 else node * 1000 + local  # only "is it 0" matters here


def is_rank_zero() -> bool:
    return global_rank() == 0


def broadcast_from_rank_zero(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (the identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(value: Any) -> Any:
    """``value`` (a tensor) summed over every rank: a new tensor; the identity without a group."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total



def share_per_rank(count: torch.Tensor) -> torch.Tensor:
    """``count`` summed over every rank, divided by the world size: dividing a rank's loss sum by
    it makes DDP's average of the ranks' gradients the gradient of the *global* mean (e.g. over
    the global minibatch's tokens). Without a process group: ``count`` itself."""
    return all_reduce_sum(count) / world_size()
