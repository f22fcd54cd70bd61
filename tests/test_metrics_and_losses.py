"""Dice and IoU by hand, and the losses' defining values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unetquant.metrics import dice_score, iou_score
from napari_unetquant.train import bce_dice_loss, soft_dice_loss


def test_dice_and_iou_hand_computed() -> None:
    prediction = np.array([[1, 1, 0], [0, 1, 0]])
    truth = np.array([[1, 0, 0], [0, 1, 1]])
    assert dice_score(prediction, truth) == pytest.approx(2 * 2 / (3 + 3))
    assert iou_score(prediction, truth) == pytest.approx(2 / 4)


def test_empty_masks_score_one_and_one_sided_empty_scores_zero() -> None:
    empty = np.zeros((4, 4))
    assert dice_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    assert dice_score(empty, np.eye(4)) == 0.0


def test_metric_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"prediction shape \(2, 2\) does not match"):
        dice_score(np.zeros((2, 2)), np.zeros((3, 3)))


def test_soft_dice_loss_is_zero_for_a_perfect_confident_prediction() -> None:
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = (target * 2 - 1) * 50
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(-logits, target).item() > 0.6


def test_multiclass_losses_accept_index_targets() -> None:
    target = torch.tensor([[[0, 1], [2, 1]]])
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert bce_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-5)


def test_bce_dice_is_the_weighted_sum() -> None:
    logits = torch.randn(2, 1, 5, 5)
    target = (torch.rand(2, 1, 5, 5) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    expected = 0.5 * bce + 0.5 * soft_dice_loss(logits, target)
    assert bce_dice_loss(logits, target).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("classes", [1, 3])
def test_volume_losses_pool_every_voxel(classes: int) -> None:
    """On ``(N, C, D, H, W)`` the losses are those of the same voxels laid out as slices."""
    logits = torch.randn(2, classes, 3, 5, 4)
    if classes == 1:
        target = (torch.rand(2, 1, 3, 5, 4) > 0.5).float()
        flat_target = target.reshape(2, 1, 15, 4)
    else:
        target = torch.randint(0, classes, (2, 3, 5, 4))
        flat_target = target.reshape(2, 15, 4)
    flat_logits = logits.reshape(2, classes, 15, 4)
    for loss in (soft_dice_loss, bce_dice_loss):
        torch.testing.assert_close(loss(logits, target), loss(flat_logits, flat_target))
    if classes == 1:  # confident and right everywhere: no loss
        assert soft_dice_loss(target * 100 - 50, target).item() == pytest.approx(0.0, abs=1e-6)


def test_logits_without_a_spatial_axis_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"logits must be \(N, C, \*spatial\)"):
        soft_dice_loss(torch.zeros(4, 1), torch.zeros(4))


def test_loss_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not match logits"):
        soft_dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 3))


def test_dice_agrees_with_scipy_on_random_masks() -> None:
    from scipy.spatial.distance import dice as dice_distance

    rng = np.random.default_rng(0)
    for _ in range(20):
        prediction = rng.random((7, 9)) > rng.random()
        truth = rng.random((7, 9)) > rng.random()
        if prediction.any() or truth.any():
            expected = 1 - dice_distance(prediction.ravel(), truth.ravel())
            assert dice_score(prediction, truth) == pytest.approx(expected)


def test_segmentation_scores_per_slice_volume_and_pooled() -> None:
    from napari_unetquant.metrics import SegmentationScores, segmentation_scores

    truth = np.zeros((3, 4, 4), bool)
    truth[0, :2] = True  # 8 pixels
    prediction = np.zeros_like(truth)
    prediction[0, :1] = True  # 4 pixels, all right; slice 1 and 2 empty in both
    prediction[2, 0, 0] = True  # a false positive on an empty slice
    scores = segmentation_scores(prediction, truth)
    assert scores.dice_per_slice == pytest.approx((8 / 12, 1.0, 0.0))
    assert scores.dice_mean == pytest.approx((8 / 12 + 1.0) / 3)
    assert scores.dice_volume == pytest.approx(2 * 4 / (5 + 8))
    assert scores.iou_mean == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    both = SegmentationScores.pooled([scores, segmentation_scores(truth, truth)])
    assert both.n_slices == 6
    assert both.dice_volume == pytest.approx(2 * (4 + 8) / (13 + 16))
