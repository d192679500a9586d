"""Training on several processes under torchrun, with PyTorch's own engines.

`parallel` says how the processes share the work:
- ddp: every rank holds the whole model, its grads and its optimizer state; DDP all-reduces the
  grads during the backward.
- zero1: DDP, plus torch's ZeroRedundancyOptimizer: each rank keeps the optimizer state of its
  share of the parameters, steps that share and broadcasts it. Weights and grads stay whole on
  every rank: ZeRO stage 1, as bench.plan counts it. (FSDP2 without resharding after the forward
  would shard the grads too, and the weights between steps: ZeRO-2/3's memory, not stage 1's.)
- fsdp: FSDP2's fully_shard on every transformer block and then the root: weights, grads and
  optimizer states sharded over the ranks, a block's weights gathered only while it runs.

One process with RANK unset (plain `python train.py`) has no process group and no wrapper.
"""
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

PARALLEL = ("ddp", "zero1", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    parallel: str | None = None  # None: one process, no process group

    @property
    def master(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process as one rank of several."""
    return "RANK" in os.environ


def init(parallel: str, backend: str, device: str) -> tuple[World, str]:
    """(world, device): joins the process group torchrun describes in RANK, LOCAL_RANK and
    WORLD_SIZE, each process on its own GPU; without RANK, one process and `device` as given."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if not launched():
        return World(), device
    if "LOCAL_RANK" not in os.environ:
        raise ValueError("RANK is set but LOCAL_RANK is not: launch with torchrun, or set LOCAL_RANK to the "
                         "process's index on its node (its GPU), or unset RANK to train in one process")
    try:
        local_rank = int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be the process's index on its node, "
                         f"got {os.environ['LOCAL_RANK']!r}") from None
    if dist.is_initialized():
        raise ValueError("a process group is initialized in this process already (the caller's, or that of an "
                         "earlier run here that failed): torch.distributed.destroy_process_group() before this run")
    cuda = device.startswith("cuda")
    if cuda:
        if local_rank >= (visible := torch.cuda.device_count()):
            raise ValueError(f"LOCAL_RANK is {local_rank} but this process sees {visible} GPU(s): each process "
                             f"takes GPU LOCAL_RANK of its node's, so every process must see them all "
                             f"(torchrun's way; not one GPU a process, as srun --gpus-per-task=1 gives)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # Not torchrun's (a hand-written launch, or variables an image or a shell left set): the
        # join waits for every rank, silently, for torch's 30 minutes.
        print(f"RANK={os.environ['RANK']} and WORLD_SIZE={os.environ.get('WORLD_SIZE')} are set (not by torchrun): "
              f"joining their process group at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, "
              f"waiting for every rank; unset RANK to train in one process", file=sys.stderr, flush=True)
    # device_id: NCCL binds to this GPU now rather than guessing at the first collective.
    dist.init_process_group(backend=backend if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return World(dist.get_rank(), local_rank, dist.get_world_size(), parallel), device


def shard(model: nn.Module, device: str, param_dtype: torch.dtype | None) -> None:
    """FSDP2, in place: each block of `model.h` is one unit (gathered for its own forward and
    backward), the root holds the rest (embeddings, final norm, head). fully_shard moves each
    unit to `device` as it shards it, so a model built on the CPU never sits whole on the GPU.
    `param_dtype` (bf16 for fp32 weights): the dtype weights are gathered and computed in;
    gradients are still reduced in fp32."""
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                  reduce_dtype=torch.float32 if param_dtype is not None else None)
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def optimizer(world: World, groups: list[dict], cls: type, **kwargs) -> torch.optim.Optimizer:
    """`cls(groups, **kwargs)`; under zero1 each rank builds it over its own share only, its
    params laid out in one buffer a rank (views of it), so that each rank's updated share goes
    to the others in one broadcast after the step, not one a param."""
    if world.parallel == "zero1":
        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, parameters_as_bucket_view=True, **kwargs)
    return cls(groups, **kwargs)


def master_first(world: World, make: Callable[[], T]) -> T:
    """make() on rank 0, then on every rank once rank 0 is done: for work that leaves its result
    on disk (a prepared dataset, downloaded weights), which the other ranks then find there. Rank
    0 reaches the barrier even when make() fails, so the others do not wait there forever."""
    if not world.parallel:
        return make()
    try:
        if world.master:
            make()
    finally:
        dist.barrier()
    return make()


def replicate(model: nn.Module, world: World, device: str) -> nn.Module:
    """DDP for ddp and zero1 (fsdp's model is sharded already, one process needs nothing)."""
    if world.parallel not in ("ddp", "zero1"):
        return model
    # Grads as views into DDP's reduction buckets: otherwise the buckets are a second copy of
    # every grad, 4 more bytes per fp32 parameter than bench.plan counts.
    # No buffer broadcast before every forward: the model's (the rope tables) are constants every
    # rank makes alike.
    return DistributedDataParallel(model, device_ids=[world.local_rank] if device.startswith("cuda") else None,
                                   gradient_as_bucket_view=True, **_NO_FORWARD_BUFFER_SYNC)


# torch 2.13 renamed DDP's broadcast_buffers (a FutureWarning since) forward_sync_buffers, which
# still broadcasts the buffers once, as DDP wraps the model: harmless for constant tables.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


def grad_sync(world: World, model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduces grads across ranks (a step's last micro-step) or only
    accumulates them on each rank (the others). `model` as train.py calls it: DDP's wrapper, or
    the FSDP module, maybe under torch.compile's wrapper (which passes attributes through)."""
    if world.parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
    elif world.parallel:
        model.require_backward_grad_sync = sync


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps this rank's parameters: ZeRO-1's inner one, else `optimizer`."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks (t itself in one process)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """The whole optimizer state dict on rank 0 (None on the others): ZeRO-1 first gathers the
    ranks' shares to rank 0, a collective, into host copies it would keep to the next checkpoint
    (the whole state, 1 GB for GPT-2 124M under AdamW): they go with the returned dict."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        state = optimizer.state_dict() if dist.get_rank() == 0 else None
        optimizer._all_state_dicts = []  # its state_dict() now needs another consolidation, as after a step
        return state
    return optimizer.state_dict()
