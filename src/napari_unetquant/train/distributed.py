"""Data-parallel training over the processes that torchrun starts.

``torchrun --nproc_per_node N -m napari_unetquant train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`process_group` joins them (gloo
on the CPU, NCCL on GPUs, process ``LOCAL_RANK`` of a node on ``cuda:LOCAL_RANK``). A
:class:`~.trainer.Trainer` built while a process group of several processes is active trains
data-parallel (:class:`DataParallel`): every process draws the same global batch, keeps its
share and runs it through ``DistributedDataParallel``; BatchNorm, the quantizers' batch
statistics and the loss pool the whole batch (:mod:`napari_unetquant.quant.global_batch`), so N
processes compute the update one process computes, up to the order of float summation.
"""

from __future__ import annotations

import gc
import inspect
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..devices import resolve_device
from ..errors import SettingError

Value = TypeVar("Value")
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Torchrun:
    """Where torchrun placed this process: ``rank`` of ``world_size`` over all nodes,
    ``local_rank`` of ``local_world_size`` on this node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Torchrun | None:
        """This process's place, or ``None`` when torchrun did not start several processes."""
        environ = os.environ if environ is None else environ
        if int(environ.get("WORLD_SIZE", "1") or "1") <= 1:
            return None
        missing = [name for name in _TORCHRUN_VARIABLES[:3] if name not in environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start "
                f"data-parallel training with torchrun (or set RANK and LOCAL_RANK too)"
            )
        world_size = int(environ["WORLD_SIZE"])
        return cls(
            rank=int(environ["RANK"]),
            world_size=world_size,
            local_rank=int(environ["LOCAL_RANK"]),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)),
        )

    @property
    def writes_files(self) -> bool:
        """Only the first process writes model files, checkpoints and progress."""
        return self.rank == 0


def check_batch_size(batch_size: int, world_size: int) -> None:
    """Raise ``ValueError`` (saying the fix) unless ``batch_size`` splits over the processes."""
    if batch_size % world_size:
        nearest = max(world_size, round(batch_size / world_size) * world_size)
        raise SettingError(
            f"batch size {batch_size} does not split evenly over {world_size} data-parallel "
            f"processes: it is the global batch, each process takes an equal share; use a "
            f"multiple of {world_size} (e.g. batch size {nearest}) or {batch_size} processes",
            "batch_size",
        )


def training_device(requested: str, launch: Torchrun) -> torch.device:
    """Where this process trains: ``cuda:LOCAL_RANK`` for ``auto`` (with CUDA) and ``cuda``,
    else the CPU."""
    if requested == "mps":
        raise SettingError(
            "data-parallel training runs on CUDA GPUs or the CPU; use the CPU", "device"
        )
    if requested.startswith("cuda:") and launch.local_world_size > 1:
        raise SettingError(
            f"device {requested} would put all {launch.local_world_size} processes of this "
            f"node on one GPU; choose device cuda (or auto): each process takes cuda:LOCAL_RANK",
            "device",
        )
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = resolve_device(requested if requested.startswith("cuda:") else "cuda")
    index = device.index if device.index is not None else launch.local_rank
    if index >= torch.cuda.device_count():
        raise SettingError(
            f"process {launch.local_rank} of this node needs cuda:{index}, but the node has "
            f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node "
            f"(processes per node)",
            "processes",
        )
    return torch.device("cuda", index)


@contextmanager
def process_group(device: str = "auto") -> Iterator[Torchrun | None]:
    """Join the processes torchrun started (``None`` outside torchrun: nothing to join), and
    leave the group on the way out, also after an error."""
    launch = Torchrun.from_environment()
    if launch is None:
        yield None
        return
    import torch.distributed as dist

    target = training_device(device, launch)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    try:
        yield launch
        gc.collect()  # DistributedDataParallel reducers left in cycles go before the group
        dist.barrier()  # every process is done with the group before any leaves it
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class DataParallel:
    """A trainer's process group: this is process ``rank`` of ``world_size``."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel | None:
        """The default process group when one of several processes is active, else ``None``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def device(self) -> torch.device:
        """NCCL groups train on this process's current GPU, gloo groups on the CPU."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in ``DistributedDataParallel``. Buffers are not broadcast at each step:
        every statistic they hold is already of the whole batch (and equal everywhere)."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        keyword = "forward_sync_buffers"  # torch >= 2.13; "broadcast_buffers" before
        if keyword not in inspect.signature(DistributedDataParallel).parameters:
            keyword = "broadcast_buffers"
        options: dict[str, Any] = {keyword: False}
        return DistributedDataParallel(model, device_ids=device_ids, **options)

    def share(self, batch: Tensor) -> Tensor:
        """This process's consecutive share of ``batch`` (first axis)."""
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the processes (NaN anywhere is NaN everywhere)."""
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def mean_of_parts(self, scores: Sequence[float], count: int) -> float:
        """``sum(scores of every process) / count`` in float64, the same on every process."""
        import torch.distributed as dist

        total = torch.tensor(float(sum(scores)), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / count

    def from_first(self, value: Value) -> Value:
        """The first process's ``value``, on every process (pickled between this job's own
        processes: nothing read from a file is unpickled)."""
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        result: Value = box[0]
        return result


@contextmanager
def first_process_file(path: Path, parallel: DataParallel | None) -> Iterator[Path | None]:
    """``path`` as the first process sees it, on every process: the others read a temporary
    copy of its bytes, so only the first process's disk needs it. ``None`` when it is missing
    there."""
    if parallel is None:
        yield path if path.exists() else None
        return
    first = parallel.rank == 0
    data = parallel.from_first(path.read_bytes() if first and path.exists() else None)
    if data is None or first:
        yield None if data is None else path
        return
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(data)
        yield copy
