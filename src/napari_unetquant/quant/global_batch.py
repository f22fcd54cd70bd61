"""Statistics of one batch that data-parallel training splits over processes.

Inside ``with sharded_batch():`` each process of the default process group holds an equal,
consecutive share of one batch (process ``r`` of ``n`` its ``r``-th ``1/n``). The reductions
here then combine the shares, so BatchNorm, the quantizers' batch statistics and the loss
compute what one process computes on the whole batch, up to the order of float summation.
Outside it (always, in a single process) they return the local values and communicate nothing.
Only the trainer enters it, around its training forward pass, so evaluation never waits on
other processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class Shard:
    """This process's share of the batch: share ``index`` (0-based) of ``count`` equal ones."""

    index: int
    count: int


_SHARD: ContextVar[Shard | None] = ContextVar("napari_unetquant_shard", default=None)


@contextmanager
def sharded_batch() -> Iterator[Shard]:
    """Within: the batch is shared over the processes of the default process group."""
    import torch.distributed as dist

    token = _SHARD.set(Shard(dist.get_rank(), dist.get_world_size()))
    try:
        yield _SHARD.get() or Shard(0, 1)
    finally:
        _SHARD.reset(token)


def current_shard() -> Shard | None:
    """The share this process holds, or ``None`` outside :func:`sharded_batch`."""
    return _SHARD.get()


def batch_sum(partial: Tensor) -> Tensor:
    """Sums over this share -> sums over the whole batch. Differentiable: the backward pass
    sums the gradients of every process, as one process holding the whole batch would."""
    if _SHARD.get() is None:
        return partial
    total: Tensor = _AllReduceSum.apply(partial)  # type: ignore[no-untyped-call]
    return total


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce`` (sum) whose backward pass all-reduces the gradients too: the gradient
    of every process's loss with respect to this process's share."""

    @staticmethod
    def forward(ctx: Any, partial: Tensor) -> Tensor:
        import torch.distributed as dist

        total = partial.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def batch_max(partial: Tensor) -> Tensor:
    """The maximum over the whole batch (no gradient). NaN counts as +inf, so a non-finite
    value on one share is non-finite on every process (and each raises the same error)."""
    if _SHARD.get() is None:
        return partial
    import torch.distributed as dist

    result = torch.nan_to_num(partial.detach().clone(), nan=math.inf)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result


def sharded_batch_norm(bn: _BatchNorm, x: Tensor) -> Tensor:
    """Training-mode BatchNorm of ``x`` ``(N, C, *spatial)`` with the mean and variance of the
    whole batch (two passes: the mean, then the squared deviations), updating ``bn``'s running
    statistics as ``nn.BatchNorm`` does (unbiased variance, ``momentum`` or cumulative)."""
    shard = _SHARD.get()
    if shard is None:
        raise RuntimeError("sharded_batch_norm runs inside sharded_batch() only")
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = x.numel() // x.shape[1] * shard.count
    mean = batch_sum(x.sum(dims)) / count
    centred = x - mean.reshape(shape)
    variance = batch_sum(centred.square().sum(dims)) / count
    out = centred * torch.rsqrt(variance + bn.eps).reshape(shape)
    if bn.weight is not None and bn.bias is not None:
        out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    if bn.training and bn.track_running_stats:
        _update_running_statistics(bn, mean.detach(), variance.detach(), count)
    return out


@torch.no_grad()
def _update_running_statistics(bn: _BatchNorm, mean: Tensor, variance: Tensor, count: int) -> None:
    if bn.running_mean is None or bn.running_var is None or bn.num_batches_tracked is None:
        return
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = variance * (count / max(count - 1, 1))
    bn.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
