"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` + DDP, under torchrun
(or one SLURM task per GPU through submitit).

``torchrun --nproc_per_node=N scripts/train.py ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` joins them into
one process group (nccl on CUDA, gloo on CPU). ``data.batch_size`` is per process: a step's
global batch is ``WORLD_SIZE × data.batch_size`` samples, the same ones, in the same order, as
one process with that batch size would take (each rank takes its slice of the global batch).

DDP averages gradients over the ranks. Every objective here is defined over the global batch,
so each rank backpropagates ``WORLD_SIZE ×`` its own share of it: scalar mode
``W · Σ_local ℓ_i / n_global``, vector mode ``W · w_i`` with the weights normalized by
:func:`all_reduce_sum` of the raw weights, so the averaged gradient is the single-process one.
"""

from __future__ import annotations

import datetime
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes TensorBoard, checkpoints and metrics.json."""
        return self.rank == 0


#: the world of a single process
SINGLE = World()


def _submitit_tasks() -> int:
    """The number of tasks of the submitit job this process is one of (1 outside one), as
    submitit's own environment says: SLURM's, or its local executor's (which SLURM's count
    alone missed: a local job of 2 tasks ran twice as one process, both writing one folder,
    a probe's)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    from submitit import JobEnvironment

    try:
        return int(JobEnvironment().num_tasks)
    except Exception:  # noqa: BLE001 (an environment submitit does not know: one process)
        return 1


def from_env() -> World:
    """The world torchrun describes in the environment (one process without it). In a job
    of several tasks started by submitit (Hydra's submitit launcher, ``tasks_per_node`` > 1,
    on SLURM or submitit's local executor), submitit's ``TorchDistributedEnvironment`` first
    exports the same variables from its own (rank = the task's, master = the job's first
    host)."""
    if "WORLD_SIZE" not in os.environ and _submitit_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment

        # every task sees all the node's GPUs and takes cuda:LOCAL_RANK (see setup)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    if "RANK" not in os.environ:  # (torch's KeyError: 'RANK', with a traceback and nothing
        # recorded, a probe's)
        raise ValueError(
            f"WORLD_SIZE={size} is set in the environment but RANK is not: a data-parallel run "
            'is started by torchrun (README, "Data parallel"), which sets both; unset '
            "WORLD_SIZE for a single process"
        )
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World, device: torch.device, timeout_s: float = 60.0) -> torch.device:
    """Join the process group (once per process) and return this rank's device: ``cuda`` means
    ``cuda:LOCAL_RANK`` under torchrun. Collectives time out after ``timeout_s``, so a rank that
    died cannot hang the others for long."""
    if not world.distributed:
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return device


def teardown() -> None:
    """Leave the process group after a run that completed, before the process exits: the
    DDP wrapper and what holds it freed first (a reference cycle: ``gc.collect``), then
    ``destroy_process_group``. Left to the interpreter's exit, gloo's threads were destroyed
    unjoined in about 1 exit in 4 here ("terminate called without an active exception",
    SIGABRT: torchrun then exits 1 after a completed run, a probe's); measured with this, 0 in
    12. After a failure it is not called (a rank still in a collective would be waited for,
    as torchtitan found). A no-op outside a process group."""
    import gc

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over the ranks of ``t`` (a new tensor; ``t`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def all_reduce_max(t: Tensor) -> Tensor:
    """The elementwise max over the ranks of ``t`` (``t`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def agree(words: Sequence[str], failed: bool, device: torch.device) -> tuple[bool, list[int]]:
    """Whether every rank holds the same list of strings, in the same order (their count and
    CRC-32 compared), and the ranks that say they ``failed``: one small all-reduce and a host
    read. (True, []) in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True, []
    n, code = len(words), zlib.crc32("\n".join(words).encode())
    mine = [0] * dist.get_world_size()
    mine[dist.get_rank()] = int(failed)
    sent = torch.tensor([n, code, -n, -code, *mine], dtype=torch.int64, device=device)
    high_n, high_code, low_n, low_code, *ranks = all_reduce_max(sent).tolist()  # host sync
    return high_n == -low_n and high_code == -low_code, [r for r, f in enumerate(ranks) if f]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, as DDP sends them
    before each training forward: after a step, each rank's buffers hold its own batch's
    update, and a validation must use the model rank 0 checkpoints. No-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def warn_batch_norms(model: torch.nn.Module) -> list[str]:
    """Name the BatchNorm layers that normalize each rank's own part of the batch (torch's
    DDP): those in training mode, or without running statistics, as fit starts (after every
    ``on_fit_start`` and a resume's modes: one a callback freezes there normalizes with its
    running statistics, the same on every rank, and was named, a probe's). Returns them."""
    from torch import nn

    names = [n or type(model).__name__ for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm)
             and (m.training or not m.track_running_stats)]  # fmt: skip
    if names:
        log.warning(
            "data-parallel: %s normalize%s each rank's own part of the batch in training mode "
            "(torch's DDP), so this run is not one process on the global batch (its gradients "
            "and running statistics differ); trainer.sync_batchnorm=true (CUDA) normalizes "
            "over the global batch (a BatchNorm in eval mode as fit starts is not named: its "
            "running statistics are the same on every rank, until a callback puts it in "
            "training mode)",
            ", ".join(names[:5]) + (" …" if len(names) > 5 else ""),
            "s" if len(names) == 1 else "",
        )  # fmt: skip
    return names


def shard(start: int, stop: int, world: World) -> tuple[int, int]:
    """This rank's contiguous part of the global batch ``[start, stop)``: the first ranks get
    one sample more when it does not divide evenly (a ragged last batch)."""
    n = stop - start
    base, extra = divmod(n, world.size)
    lo = start + world.rank * base + min(world.rank, extra)
    return lo, lo + base + (1 if world.rank < extra else 0)


def all_gather_cat(t: Tensor, sizes: list[int] | None = None) -> tuple[Tensor, int]:
    """Every rank's 1-D ``t`` concatenated in rank order (sizes may differ), and the offset of
    this rank's part in it. One process: ``(t, 0)``. ``sizes`` (each rank's length, when the
    caller knows them) saves exchanging them, and with it a host sync."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, 0
    if sizes is None:
        size = torch.tensor([t.numel()], device=t.device)
        parts_sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(parts_sizes, size)
        sizes = [int(c) for c in torch.cat(parts_sizes).tolist()]  # host sync: the sizes
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    whole = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
    return whole, sum(sizes[: dist.get_rank()])


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (one process: ``[obj]``). Tensors in it
    should be on the CPU. For what a checkpoint keeps of each rank, not for a step's path."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_sizes(n: int, world: World) -> list[int]:
    """Each rank's number of samples of a global batch of ``n`` (see :func:`shard`)."""
    return [hi - lo for lo, hi in (shard(0, n, World(r, world.size, r)) for r in range(world.size))]
