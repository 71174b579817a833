"""Data-parallel fine-tuning: ``torchrun --nproc_per_node N -m adaption_fx finetune ...``.

torchrun starts N processes and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`process_group_from_environment` joins the process
group they describe (gloo on CPU; NCCL, one GPU per ``LOCAL_RANK``, where CUDA is
available) and :class:`DataParallel` holds what the fine-tuning loop needs from it:

- every process loads the same base model itself; :meth:`DataParallel.wrap` wraps the model
  in ``DistributedDataParallel`` registering only the trainable adapter tensors, so the
  frozen base weights are neither broadcast nor reduced, and the adapter starts from rank
  0's values on every rank;
- each planned micro-batch is split across the ranks (:meth:`DataParallel.shard`); the
  global batch, the steps and the data order are those of a one-process run;
- :meth:`DataParallel.sum` adds up per-rank numbers (the logged loss, the validation sums,
  a stop request), so every rank takes the same decisions.

Outside torchrun (no process group) :data:`SINGLE_PROCESS` stands for a world of one: no
wrapper, no collectives, and the loop runs exactly as it would without this module.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True when this process is a torchrun worker (its environment names its rank and
    world size, as for ``init_process_group``'s ``env://``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """True outside a process group and on its rank 0: the process that writes files and
    prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (``world_size`` 1: a plain run).

    Attributes:
        rank: this process's rank (0 writes the run's files).
        world_size: how many processes share each batch.
        device: where collective operations put their tensors (the GPU of this rank
            for NCCL, else the CPU).
        distributed: a process group exists (even of one process): the model is wrapped
            and the collectives run.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = CPU
    distributed: bool = False

    @classmethod
    def current(cls) -> DataParallel:
        """The default process group's view, or :data:`SINGLE_PROCESS` when there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return SINGLE_PROCESS
        device = CPU
        if dist.get_backend() == dist.Backend.NCCL:
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), device, distributed=True)

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------- the data
    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's share of a micro-batch: a contiguous slice, the shares' sizes
        differing by at most one (the first ``len % world_size`` ranks take one more).
        A micro-batch with fewer examples than ranks leaves some shares empty."""
        base, extra = divmod(len(indices), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(indices[start : start + base + (self.rank < extra)])

    def strided(self, items: Sequence[Any]) -> list[Any]:
        """Every ``world_size``-th item starting at this rank's (for evaluation batches)."""
        return list(items[self.rank :: self.world_size])

    # ------------------------------------------------------------- the model
    def wrap(
        self, module: torch.nn.Module, trainable: Sequence[torch.nn.Parameter]
    ) -> torch.nn.Module:
        """``module`` in ``DistributedDataParallel`` with only ``trainable`` registered.

        Every other parameter and every buffer of ``module`` (the frozen base weights,
        other adapters) is on DDP's ignore list: DDP neither broadcasts it at construction
        nor reduces it. ``trainable`` is broadcast from rank 0 at construction, so every
        rank starts from the same adapter. Outside a process group ``module`` comes back
        as it is.
        """
        if not self.distributed:
            return module
        keep = {id(p) for p in trainable}
        if not keep:
            raise ValueError("there is nothing to train: no trainable parameter to reduce")
        names = {id(p): n for n, p in module.named_parameters()}
        if any(i not in names for i in keep):
            raise ValueError("a trainable parameter is not a parameter of the module")
        ignored = [n for n, p in module.named_parameters() if id(p) not in keep]
        ignored += [n for n, _ in module.named_buffers()]
        for param in trainable:
            # An earlier wrap (of another adapter) may have marked it ignored.
            if hasattr(param, "_ddp_ignored"):
                del param._ddp_ignored
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
        logger.info(
            "DistributedDataParallel over %d tensors (%d values); %d frozen tensors ignored",
            len(keep),
            sum(p.numel() for p in trainable),
            len(ignored),
        )
        return wrapped

    @staticmethod
    def gradient_sync(forward: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's forward and backward: DDP all-reduces the
        gradients only when ``sync`` (the step's last micro-batch); before, they accumulate
        locally (``no_sync``)."""
        if sync or not isinstance(forward, DistributedDataParallel):
            return contextlib.nullcontext()
        return forward.no_sync()

    # ------------------------------------------------------------- collectives
    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64), the same on every rank."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a stop request that
        only one process received)."""
        return self.sum(float(flag))[0] > 0

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op outside a process group)."""
        if self.distributed:
            dist.barrier()


SINGLE_PROCESS = DataParallel()


def model_device() -> torch.device:
    """Where a torchrun worker puts its model: the GPU of its ``LOCAL_RANK`` when CUDA is
    available (hide GPUs with ``CUDA_VISIBLE_DEVICES=`` to train on CPU), else the CPU.
    Outside torchrun: the CPU, as always."""
    if not launched_by_torchrun() or not torch.cuda.is_available():
        return CPU
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
            "start at most one process per GPU (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[DataParallel]:
    """Join torchrun's process group for the duration of the block and yield this
    process's :class:`DataParallel` (:data:`SINGLE_PROCESS` when not started by torchrun:
    nothing is set up).

    The backend is NCCL when the model goes to a GPU (see :func:`model_device`), else gloo.
    The group is destroyed on the way out, whatever happened.
    """
    if not launched_by_torchrun():
        yield SINGLE_PROCESS
        return
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialized")
    device = model_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        parallel = DataParallel.current()
        logger.info(
            "rank %d of %d (%s, %s)",
            parallel.rank,
            parallel.world_size,
            dist.get_backend(),
            device,
        )
        yield parallel
    finally:
        # A DistributedDataParallel wrapper dropped by now may still be alive in reference
        # cycles, holding the group's gloo work; freed only at interpreter shutdown, that
        # can abort the process (SIGABRT, "terminate called without an active exception"),
        # seen once on torch 2.14.1 under load. Free it while the interpreter is whole.
        gc.collect()
        dist.destroy_process_group()
