"""Properties of the overlap metrics over masks hypothesis draws: ranges, symmetry, the empty
rule, and pooling that equals scoring the concatenation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_unetquant.metrics import (
    SegmentationScores,
    dice_score,
    iou_score,
    segmentation_scores,
)


@st.composite
def mask_pairs(draw: st.DrawFn, ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Two masks of one shape; values are any small integers (non-zero = foreground)."""
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    values = st.integers(-2, 3)
    return draw(arrays(np.int16, shape, elements=values)), draw(
        arrays(np.int16, shape, elements=values)
    )


@given(mask_pairs())
def test_dice_and_iou_lie_in_0_1_are_symmetric_and_agree(pair: tuple[np.ndarray, ...]) -> None:
    prediction, target = pair
    dice, iou = dice_score(prediction, target), iou_score(prediction, target)
    assert 0.0 <= iou <= dice <= 1.0  # Dice >= IoU always
    assert dice == dice_score(target, prediction) and iou == iou_score(target, prediction)
    assert dice == pytest.approx(2 * iou / (1 + iou))  # the two are one function of each other


@given(st.one_of(mask_pairs(1), mask_pairs(2), mask_pairs(3)))
def test_identical_masks_score_1_empty_against_empty_included(
    pair: tuple[np.ndarray, ...],
) -> None:
    mask = pair[0]
    assert dice_score(mask, mask) == 1.0 and iou_score(mask, mask) == 1.0
    empty = np.zeros_like(mask)
    assert dice_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    if mask.any():
        assert dice_score(mask, empty) == 0.0 and iou_score(empty, mask) == 0.0


@given(mask_pairs(3))
def test_scores_are_the_per_slice_scores_and_pooled_dice(pair: tuple[np.ndarray, ...]) -> None:
    prediction, target = pair
    if prediction.shape[0] == 0:
        return
    scores = segmentation_scores(prediction, target)
    assert scores.n_slices == prediction.shape[0]
    per_slice = tuple(dice_score(p, t) for p, t in zip(prediction, target, strict=True))
    assert scores.dice_per_slice == per_slice
    assert scores.dice_volume == dice_score(prediction, target)
    assert all(0.0 <= d <= 1.0 for d in scores.dice_per_slice)
    assert 0.0 <= scores.dice_mean <= 1.0 and 0.0 <= scores.iou_mean <= 1.0


@given(mask_pairs(3), st.data())
def test_chunked_scores_pooled_equal_the_scores_of_the_whole(
    pair: tuple[np.ndarray, ...], data: st.DataObject
) -> None:
    prediction, target = pair
    if prediction.shape[0] == 0:
        return
    inner = (
        st.sets(st.integers(1, prediction.shape[0] - 1)) if len(prediction) > 1 else st.just(set())
    )
    cuts = sorted(data.draw(inner))
    bounds = [0, *cuts, prediction.shape[0]]
    parts = [
        segmentation_scores(prediction[a:b], target[a:b]) for a, b in itertools.pairwise(bounds)
    ]
    assert SegmentationScores.pooled(parts) == segmentation_scores(prediction, target)


@st.composite
def volume_lists(draw: st.DrawFn) -> list[tuple[np.ndarray, np.ndarray]]:
    """One to four pairs of volumes of one in-plane size; their slice counts differ."""
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    pairs = st.integers(1, 4).flatmap(
        lambda depth: st.tuples(
            *[arrays(np.uint8, (depth, height, width), elements=st.integers(0, 1))] * 2
        )
    )
    return draw(st.lists(pairs, min_size=1, max_size=4))


@given(volume_lists())
def test_pooled_volumes_score_as_their_concatenation(
    volumes: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    pooled = SegmentationScores.pooled([segmentation_scores(p, t) for p, t in volumes])
    whole = segmentation_scores(
        np.concatenate([p for p, _ in volumes]), np.concatenate([t for _, t in volumes])
    )
    assert pooled == whole
    assert pooled.dice_mean == pytest.approx(whole.dice_mean)


@given(mask_pairs(2), mask_pairs(2))
def test_masks_of_different_shapes_are_refused(
    first: tuple[np.ndarray, ...], second: tuple[np.ndarray, ...]
) -> None:
    if first[0].shape == second[0].shape:
        return
    with pytest.raises(ValueError, match="does not match"):
        dice_score(first[0], second[1])
