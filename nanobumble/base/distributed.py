"""Processes and sharding: torchrun's environment, FSDP2, and small collectives.

    python train_pretrain.py                          # one process, no process group
    torchrun --nproc_per_node=2 train_pretrain.py     # two processes, model sharded by FSDP2

Under torchrun every rank runs the same script. Ranks talk over NCCL on GPUs
and gloo on CPUs. With more than one rank the model is sharded with
`fully_shard`: each transformer block is its own unit (its parameters are
gathered just before it runs and freed after), then the root takes the rest
(embedding, final norm, tied LM head).

One process on a GPU runs the same way, on a one-rank mesh (single_process_fsdp
auto), so that one GPU and N compute alike: bf16 parameters gathered per block,
fp32 master weights, gradients and optimizer state. The CPU demo stays a plain
process with no process group; single_process_fsdp true gives it the GPU's path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from nanobumble.base.cpu import apply_num_threads


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh when the model is sharded (several ranks, or one under single_process_fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The model runs under FSDP2: always with several ranks, and on a one-rank mesh
        when one process asks for it (single_process_fsdp)."""
        return self.mesh is not None or self.world_size > 1


# Ranks wait this long for each other while rank 0 prepares data once (training a
# tokenizer, writing token shards): hours on GBs of text, so not the collective
# timeout, which is meant to catch a rank that hangs while training.
PREPARATION_TIMEOUT = datetime.timedelta(hours=24)
_preparation_group = None


def one_process_shards(single_process_fsdp: str, device: torch.device) -> bool:
    """Whether a lone process runs FSDP2 on a one-rank mesh. auto: on CUDA, so one GPU
    computes as N do (bf16 parameters gathered per block, fp32 master weights and
    gradients) instead of autocasting over fp32 weights; the CPU demo needs no process
    group. true: also on CPU, where tests reach the same path over gloo."""
    return single_process_fsdp == "true" or (single_process_fsdp == "auto" and device.type == "cuda")


def setup_distributed(timeout_minutes: float = 10.0, single_process_fsdp: str = "false") -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE, or run as a single process.
    A collective that waits longer than timeout_minutes for a rank (a hung or
    stopped process) fails and ends the run. A single process gets a one-rank
    process group when one_process_shards says so."""
    global _preparation_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks on one machine share its cores; without this each would start one
        # thread per core and they would fight over them.
        apply_num_threads()  # this rank's share of the free cores (base/cpu.py; a stage's num_threads may override)
    alone = world_size == 1
    if alone and not one_process_shards(single_process_fsdp, device):
        return DistInfo(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    device_id = device if device.type == "cuda" else None
    if alone:  # no torchrun: an in-process store, no port to open
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    _preparation_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    mesh = init_device_mesh(device.type, (world_size,))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, mesh=mesh)


def cleanup_distributed() -> None:
    global _preparation_group
    _preparation_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_run(timeout_minutes: float = 10.0, single_process_fsdp: str = "false"):
    """setup_distributed() for the length of a script; on success every rank waits
    for the others before tearing down (a gloo peer that leaves first can make
    the other abort at exit). On an error nobody waits: torchrun stops the rest."""
    info = setup_distributed(timeout_minutes, single_process_fsdp)
    try:
        yield info
        barrier()
    finally:
        cleanup_distributed()


def print0(*args, **kwargs) -> None:
    """Print from rank 0 only, so N processes do not print N copies."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        return all_reduce_sum(value) / dist.get_world_size()
    return value


def shard_model(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None) -> None:
    """fully_shard every transformer block, then the root. With param_dtype bf16
    (on CUDA and CPU alike) FSDP2's mixed precision casts the gathered parameters
    for compute while gradients are reduced in fp32 and the optimizer keeps fp32
    shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = param_dtype is not None and param_dtype != torch.float32

    def policy(cast_inputs: bool) -> dict:
        if not mixed:
            return {}
        return {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                  cast_forward_inputs=cast_inputs)}

    # A block's inputs are left alone: the hidden states are bf16 already (the
    # embedding's weights are), and the rotary cos/sin must stay fp32.
    for block in model.layers:
        fully_shard(block, mesh=info.mesh, **policy(cast_inputs=False))
    fully_shard(model, mesh=info.mesh, **policy(cast_inputs=True))


def local_bytes(tensors) -> int:
    """Bytes this rank holds for the given tensors (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(v for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)


def main_process_first(fn):
    """Run fn on rank 0 first (e.g. training a tokenizer, writing shards), then on
    the other ranks, which then find its results in the cache. The others wait
    under PREPARATION_TIMEOUT, not the collective timeout."""
    def wait() -> None:
        if dist.is_initialized():
            dist.barrier(group=_preparation_group)

    if int(os.environ.get("RANK", "0")) == 0:
        result = fn()
        wait()
    else:
        wait()
        result = fn()
    return result
