"""Parameters sharded across processes by FSDP2 (`torch.distributed.fsdp.fully_shard`): what the engine needs of them.

Outside a forward each process holds a `DTensor` per parameter whose local tensor is its rows ``torch.chunk(p, world,
dim=0)[rank]``; during a module's forward FSDP2 registers the whole (all-gathered) parameter in its place. So the
probes perturb the whole parameter that FSDP2 registered, drawing z whole as an unsharded run does
(`perturbation._ShardedCopies`), and the update adds to each process's rows the entries of z at their offset in the
flat parameter (`DirectionSampler.add_slice`): a sharded run's directions, probe losses and weights are bit for bit
those of an unsharded run on the same batch, with no communication beyond FSDP2's own all-gathers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_SUPPORTED = ("FSDP2's fully_shard on a 1-D mesh (each parameter a DTensor with placements (Shard(0),)); for other "
              "layouts give every process the whole model and split the work with data- or query-parallel ZO "
              "(ZOConfig.zo_parallel, or ZOEstimator.probe(queries=...))")


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    return getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)


def is_sharded(t: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def check(named: list[tuple[str, torch.Tensor]], distribution: str) -> bool:
    """Whether any of ``named`` is sharded; raises ValueError naming the first one the engine cannot train."""
    sharded = [(name, p) for name, p in named if is_sharded(p)]
    for name, p in sharded:
        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
            raise ValueError(f"{name} is a DTensor with placements {placements} on a {p.device_mesh.ndim}-D mesh: the ZO "
                             f"engine trains {_SUPPORTED}")
        if not p.to_local().is_contiguous():
            raise ValueError(f"{name}'s local shard is not contiguous: the update walks its flat storage")
    if sharded and distribution == "lowrank":
        raise ValueError(f"{sharded[0][0]} is sharded by FSDP2: each process adds its rows of the direction, which "
                         "needs element-wise directions (zo_distribution 'gaussian' or 'rademacher'), not SubZero's "
                         "low-rank ones, built whole")
    return bool(sharded)


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's shard of ``p``, flat (the storage FSDP2 all-gathers from), and the index of its first entry in
    the flat parameter."""
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-p.shape[0] // world)
    first_row = min(rank * chunk, p.shape[0])
    local = p.to_local()
    if local.shape[0] != max(0, min(chunk, p.shape[0] - first_row)) or local.shape[1:] != p.shape[1:]:
        raise ValueError(f"a shard of shape {tuple(local.shape)} of a {tuple(p.shape)} parameter on process {rank} of "
                         f"{world} is not torch.chunk's rows: the engine trains {_SUPPORTED}")
    return local.view(-1), first_row * math.prod(p.shape[1:])


def reshard(model: nn.Module) -> None:
    """Every FSDP2 module of ``model`` back to its shards: FSDP2 leaves the root's parameters whole after a forward,
    where an update of the shards would not reach them and the parameters listed would be the whole copies."""
    fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None) \
        if torch.distributed.is_available() else None
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


@torch.no_grad()
def load_whole(p: torch.Tensor, whole: torch.Tensor) -> None:
    """``p = whole`` for a sharded ``p`` and the whole tensor (a checkpoint's): this process keeps its rows."""
    local, first = local_rows(p)
    local.copy_(whole.reshape(-1)[first : first + local.numel()])


def gather_weights(model: nn.Module) -> dict:
    """``model.state_dict()`` with sharded tensors gathered whole (tied entries stay one tensor): what an unsharded
    model would save. Collective: every process calls it."""
    whole: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in whole:
            whole[id(t)] = t.detach().full_tensor() if is_sharded(t) else t.detach()
        out[name] = whole[id(t)]
    return out


def gather_state(state_dict: dict) -> dict:
    """An optimizer's ``state_dict()`` with the buffers of sharded parameters gathered whole: what an unsharded run's
    optimizer holds, so it loads on any number of processes (`shard_state`). Collective: every process calls it."""
    state = {index: {key: value.full_tensor() if is_sharded(value) else value for key, value in buffers.items()}
             for index, buffers in sorted(state_dict["state"].items())}
    return {**state_dict, "state": state}


@torch.no_grad()
def shard_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a whole state (`gather_state`): each sharded parameter's buffers, which
    torch loads whole, become this process's rows, sharded as the parameter."""
    from torch.distributed.tensor import DTensor

    for p, buffers in optimizer.state.items():
        if not is_sharded(p):
            continue
        local, first = local_rows(p)
        for key, value in buffers.items():
            if torch.is_tensor(value) and not is_sharded(value) and value.shape == p.shape:
                rows = value.reshape(-1)[first : first + local.numel()].view_as(p.to_local()).clone()
                buffers[key] = DTensor.from_local(rows, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
