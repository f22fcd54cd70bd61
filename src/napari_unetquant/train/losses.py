"""Segmentation losses on logits.

``logits`` is ``(N, C, *spatial)`` float32: ``(N, C, H, W)`` for slices, ``(N, C, D, H, W)``
for volumes. With ``C == 1`` the task is binary (sigmoid) and ``target`` is ``(N, 1, *spatial)``
or ``(N, *spatial)`` with values in {0, 1}; with ``C > 1`` the classes are exclusive (softmax)
and ``target`` is ``(N, *spatial)`` integer class indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.global_batch import batch_sum

_SMOOTH = 1.0


def _probabilities_and_onehot(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() < 3:
        raise ValueError(
            f"logits must be (N, C, *spatial), e.g. (N, C, H, W), got shape {tuple(logits.shape)}"
        )
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            f"give one label per pixel, (N, *spatial)"
        )
    if logits.shape[1] == 1:
        if bool(((target != 0) & (target != 1)).any()):
            raise ValueError("binary targets must hold only 0 and 1; convert the mask first")
        return torch.sigmoid(logits), target[:, None].to(logits.dtype)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    return torch.softmax(logits, dim=1), onehot


def soft_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``1 - soft Dice``, pooled over the batch and pixels (voxels) per class, averaged over
    classes.

    Smoothing of 1 keeps it defined (and zero) when a class is absent from both.
    """
    probs, onehot = _probabilities_and_onehot(logits, target)
    dims = (0, *range(2, probs.dim()))
    overlap = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    # A batch shared over data-parallel processes is pooled over all of it (no-op otherwise).
    pooled = batch_sum(torch.stack([overlap, total]))
    overlap, total = pooled[0], pooled[1]
    return 1.0 - ((2.0 * overlap + _SMOOTH) / (total + _SMOOTH)).mean()


def bce_dice_loss(logits: Tensor, target: Tensor, bce_weight: float = 0.5) -> Tensor:
    """The paper's EM loss: ``bce_weight * BCE + (1 - bce_weight) * soft Dice loss`` (binary);
    cross-entropy takes BCE's place for several classes. One sigmoid only (on the logits): the
    reference code applied it twice."""
    _, onehot = _probabilities_and_onehot(logits, target)
    if logits.shape[1] == 1:
        pixel_loss = F.binary_cross_entropy_with_logits(logits, onehot)
    else:
        pixel_loss = F.cross_entropy(logits, onehot.argmax(dim=1))
    return bce_weight * pixel_loss + (1.0 - bce_weight) * soft_dice_loss(logits, target)
