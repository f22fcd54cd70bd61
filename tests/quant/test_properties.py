"""Properties of the quantizers, weight codes and bit packing, over inputs hypothesis draws.

Each property is an exact invariant (``torch.equal``, integer identities), not a tolerance:
outputs lie on the grid and in range, quantizing twice is quantizing once, order is kept, a
``b``-bit quantizer has at most ``2**b`` levels, and gradients are the documented
straight-through ones. The ``ci`` profile (tests/conftest.py) keeps the example counts small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_unetquant.config import QuantizerConfig
from napari_unetquant.quant import (
    BinaryQuantizer,
    FixedPointQuantizer,
    LSQQuantizer,
    TernaryQuantizer,
    build_quantizer,
)
from napari_unetquant.quant import functional as qf
from napari_unetquant.quant.codes import dequantize, weight_codes
from napari_unetquant.quant.packing import code_range, pack_codes, packed_size, unpack_codes

FINITE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def vectors(min_size: int = 1, max_size: int = 64) -> st.SearchStrategy[torch.Tensor]:
    """1D float32 tensors of moderate, finite values (zeros and exact ties included)."""
    return arrays(np.float32, st.integers(min_size, max_size), elements=FINITE).map(
        torch.from_numpy
    )


def weights() -> st.SearchStrategy[torch.Tensor]:
    """``(C_out, C_in, k, k)`` float32 weights, channels of different ranges."""
    shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 3]))
    return shapes.flatmap(
        lambda s: arrays(
            np.float32, (s[0], s[1], s[2], s[2]), elements=st.floats(-8, 8, width=32)
        ).map(torch.from_numpy)
    )


def _sorted(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x).values


# --- fixed point ------------------------------------------------------------------------------


@given(vectors(), st.integers(1, 15), st.integers(-4, 16), st.booleans())
def test_fixed_point_on_grid_in_range_idempotent_monotonic(
    x: torch.Tensor, magnitude_bits: int, frac_bits: int, signed: bool
) -> None:
    q = qf.fixed_point_quantize(x, magnitude_bits, frac_bits, signed=signed)
    codes = q * 2.0**frac_bits  # exact: a power-of-two scaling
    assert torch.equal(codes, codes.round())
    top = 2**magnitude_bits - 1
    assert int(codes.max()) <= top and int(codes.min()) >= (-top if signed else 0)
    assert torch.equal(qf.fixed_point_quantize(q, magnitude_bits, frac_bits, signed=signed), q)
    q_sorted = qf.fixed_point_quantize(_sorted(x), magnitude_bits, frac_bits, signed=signed)
    assert bool((q_sorted.diff() >= 0).all())
    bits = magnitude_bits + int(signed)
    assert q.unique().numel() <= 2**bits


@given(vectors(), st.integers(1, 8), st.integers(0, 8))
def test_fixed_point_rounds_to_the_nearest_level_inside_the_range(
    x: torch.Tensor, magnitude_bits: int, frac_bits: int
) -> None:
    limit = float(qf.fixed_point_limit(magnitude_bits, frac_bits))
    inside = x.abs() <= limit
    q = qf.fixed_point_quantize(x, magnitude_bits, frac_bits)
    step = 2.0**-frac_bits
    assert bool(((q - x).abs()[inside] <= step / 2).all())
    assert bool((q[~inside].abs() == limit).all())  # saturates, never wraps around


@given(vectors(), st.integers(1, 8), st.integers(-2, 8), st.booleans())
def test_fixed_point_gradient_is_straight_through(
    x: torch.Tensor, magnitude_bits: int, frac_bits: int, clip_gradient: bool
) -> None:
    x = x.clone().requires_grad_(True)
    qf.fixed_point_quantize(
        x, magnitude_bits, frac_bits, clip_gradient=clip_gradient
    ).sum().backward()
    assert x.grad is not None
    expected = torch.ones_like(x)
    if clip_gradient:
        expected = (x.detach().abs() <= qf.fixed_point_limit(magnitude_bits, frac_bits)).float()
    assert torch.equal(x.grad, expected)


@given(vectors(), st.integers(0, 7), st.integers(0, 8))
def test_q_format_quantizer_has_the_format_grid_and_range(
    x: torch.Tensor, int_bits: int, frac_bits: int
) -> None:
    if not 1 <= int_bits + frac_bits <= 15:
        return
    config = QuantizerConfig.from_format(f"Q{int_bits}.{frac_bits}")
    q = build_quantizer(config, "act")(x)
    codes = q * 2.0**frac_bits
    assert torch.equal(codes, codes.round())
    assert float(q.abs().max()) <= 2.0**int_bits - 2.0**-frac_bits
    assert q.unique().numel() <= 2**config.bits


@given(weights(), st.integers(2, 8), st.sampled_from(["max", "mse"]))
def test_dynamic_fixed_point_weights_are_idempotent_on_one_shared_grid(
    weight: torch.Tensor, bits: int, rule: str
) -> None:
    quantizer = FixedPointQuantizer(
        QuantizerConfig(method="fixed", bits=bits, dynamic_rule=rule), "weight"
    )
    q = quantizer(weight)
    frac = int(quantizer.frac_bits)
    assert torch.equal(quantizer(q), q)  # the re-chosen format still holds every value
    codes = q * 2.0**frac
    assert torch.equal(codes, codes.round())  # one shift for the whole tensor (per tensor)
    assert q.unique().numel() <= 2**bits


@pytest.mark.parametrize("rule", ["max", "mse"])
def test_dynamic_fixed_point_of_subnormal_weights_is_finite_and_exact(rule: str) -> None:
    # found by the long profile: 2**149 overflowed float32, and 0 * inf made NaN weights
    weight = torch.tensor([0.0, 1.4013e-45, -3.0e-40, 1e-39]).reshape(4, 1, 1, 1)
    config = QuantizerConfig(method="fixed", bits=4, dynamic_rule=rule)
    quantizer = FixedPointQuantizer(config, "weight")
    q = quantizer(weight)
    assert bool(q.isfinite().all()) and int(quantizer.frac_bits) == qf.MAX_FRAC_BITS
    assert torch.equal(dequantize(weight_codes(quantizer, weight)), q)


# --- learned step size ------------------------------------------------------------------------


@given(vectors(), st.integers(2, 8), st.booleans(), st.floats(1e-3, 10.0))
def test_lsq_on_grid_in_range_idempotent_monotonic(
    x: torch.Tensor, bits: int, signed: bool, step_value: float
) -> None:
    q_negative = 2 ** (bits - 1) if signed else 0
    q_positive = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    step = torch.tensor(step_value, dtype=torch.float32)
    q = qf.lsq_quantize(x, step, q_negative, q_positive, 1.0)
    codes = q / step
    assert bool(((codes - codes.round()).abs() <= 1e-3).all())
    assert float(codes.min()) >= -q_negative - 1e-3 and float(codes.max()) <= q_positive + 1e-3
    assert torch.equal(qf.lsq_quantize(q, step, q_negative, q_positive, 1.0), q)
    q_sorted = qf.lsq_quantize(_sorted(x), step, q_negative, q_positive, 1.0)
    assert bool((q_sorted.diff() >= 0).all())
    assert q.unique().numel() <= 2**bits


@given(vectors(), st.integers(2, 6), st.floats(0.05, 4.0), st.floats(0.1, 2.0))
def test_lsq_gradients_are_the_documented_ones(
    x: torch.Tensor, bits: int, step_value: float, grad_scale: float
) -> None:
    q_negative, q_positive = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    x = x.clone().requires_grad_(True)
    step = torch.tensor(step_value, dtype=torch.float32, requires_grad=True)
    qf.lsq_quantize(x, step, q_negative, q_positive, grad_scale).sum().backward()
    v = x.detach() / step.detach()
    inside = (v >= -q_negative) & (v <= q_positive)
    assert x.grad is not None and step.grad is not None
    assert torch.equal(x.grad, inside.float())
    per_value = torch.where(inside, v.round() - v, v.clamp(-q_negative, q_positive))
    assert torch.allclose(step.grad, per_value.sum() * grad_scale, rtol=1e-4, atol=1e-4)


@given(weights(), st.integers(2, 8))
def test_lsq_weights_are_quantized_per_output_channel(weight: torch.Tensor, bits: int) -> None:
    quantizer = LSQQuantizer(QuantizerConfig(method="lsq", bits=bits), "weight", weight.shape[0])
    q = quantizer(weight)
    step = quantizer.effective_step()
    for channel in range(weight.shape[0]):
        alone = qf.lsq_quantize(
            weight[channel], step[channel], quantizer.q_negative, quantizer.q_positive, 1.0
        )
        assert torch.equal(q[channel], alone)
        assert q[channel].unique().numel() <= 2**bits


# --- ternary and binary -----------------------------------------------------------------------


@given(weights(), st.booleans())
def test_ternary_weights_three_levels_per_channel_idempotent_monotonic(
    weight: torch.Tensor, clip_gradient: bool
) -> None:
    config = QuantizerConfig(method="ternary", bits=2, clip_gradient=clip_gradient)
    q = TernaryQuantizer(config, "weight", weight.shape[0])(weight)
    threshold, scale = qf.twn_threshold_and_scale(weight, (1, 2, 3))
    for channel in range(weight.shape[0]):
        levels = set(q[channel].unique().tolist())
        assert levels <= {-float(scale[channel]), 0.0, float(scale[channel])}
        # per channel: a channel alone is quantized the same
        alone = TernaryQuantizer(config, "weight", 1)(weight[channel : channel + 1])
        assert torch.equal(alone[0], q[channel])
    assert torch.equal(torch.sign(q), torch.sign(weight) * (weight.abs() > threshold))
    assert torch.equal(qf.ternarize(q, threshold, scale), q)
    flat, order = weight.reshape(weight.shape[0], -1), None
    order = torch.argsort(flat, dim=1)
    assert bool((torch.gather(q.reshape(flat.shape), 1, order).diff(dim=1) >= 0).all())


@given(vectors(), st.booleans())
def test_ternary_activations_share_one_per_tensor_scale(
    x: torch.Tensor, clip_gradient: bool
) -> None:
    config = QuantizerConfig(method="ternary", bits=2, clip_gradient=clip_gradient)
    x = x.clone().requires_grad_(True)
    q = TernaryQuantizer(config, "act")(x)
    assert q.unique().numel() <= 3
    q.sum().backward()
    assert x.grad is not None
    expected = (x.detach().abs() <= 1).float() if clip_gradient else torch.ones_like(x)
    assert torch.equal(x.grad, expected)


@given(vectors(), st.floats(1e-3, 100.0))
def test_binary_two_levels_sign_of_zero_idempotent_clipped_gradient(
    x: torch.Tensor, scale: float
) -> None:
    x = x.clone().requires_grad_(True)
    q = qf.binarize(x, scale)
    assert set(q.detach().unique().tolist()) <= {-np.float32(scale), np.float32(scale)}
    assert bool((q.detach()[x.detach() == 0] > 0).all())  # sign(0) = +1
    assert torch.equal(qf.binarize(q.detach(), scale), q.detach())
    assert bool((qf.binarize(_sorted(x.detach()), scale).diff() >= 0).all())
    q.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, (x.detach().abs() <= 1).float())


@given(weights())
def test_binary_weights_scale_per_output_channel(weight: torch.Tensor) -> None:
    q = BinaryQuantizer(QuantizerConfig(method="binary", bits=1), "weight", weight.shape[0])(weight)
    for channel in range(weight.shape[0]):
        scale = weight[channel].abs().mean().clamp_min(1e-8)
        assert torch.equal(q[channel], qf.binarize(weight[channel], scale))


# --- weight codes and packing -----------------------------------------------------------------

CODE_CONFIGS = [
    QuantizerConfig.from_format("Q0.4"),
    QuantizerConfig.from_format("Q3.8"),
    *(QuantizerConfig.from_bits("fixed", b) for b in (2, 4, 8)),
    *(QuantizerConfig.from_bits("lsq", b) for b in (2, 5, 8)),
    QuantizerConfig(method="lsq", bits=4, power_of_two=True),
    QuantizerConfig(method="lsq", bits=3, signed=False),
    QuantizerConfig(method="ternary", bits=2),
    QuantizerConfig(method="binary", bits=1),
]


@pytest.mark.parametrize("config", CODE_CONFIGS, ids=lambda c: c.label)
@given(weight=weights())
def test_weight_codes_dequantize_to_the_quantized_weights_exactly(
    config: QuantizerConfig, weight: torch.Tensor
) -> None:
    quantizer = build_quantizer(config, "weight", weight.shape[0])
    expected = quantizer(weight).detach()  # learned steps initialise here
    codes = weight_codes(quantizer, weight)
    assert torch.equal(dequantize(codes), expected)
    stored = codes.codes - codes.offset
    unpacked = unpack_codes(pack_codes(stored, codes.bits), codes.bits, codes.shape)
    assert torch.equal(unpacked + codes.offset, codes.codes)


@st.composite
def code_arrays(draw: st.DrawFn) -> tuple[int, torch.Tensor]:
    bits = draw(st.integers(1, 16))
    lowest, highest = code_range(bits)
    values = st.sampled_from([-1, 1]) if bits == 1 else st.integers(lowest, highest)
    codes = draw(st.lists(values, max_size=300))
    return bits, torch.tensor(codes, dtype=torch.int64)


@given(code_arrays())
def test_pack_unpack_round_trip_at_every_width_and_length(case: tuple[int, torch.Tensor]) -> None:
    bits, codes = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(codes.numel(), bits)
    unpacked = unpack_codes(packed, bits, (codes.numel(),))
    assert unpacked.dtype == torch.int32 and torch.equal(unpacked.long(), codes)
    # the documented layout: field i is bits [i*bits, (i+1)*bits) of one little-endian stream
    mask = (1 << bits) - 1
    fields = [(c > 0) if bits == 1 else (c & mask) for c in codes.tolist()]
    stream = sum(int(f) << (i * bits) for i, f in enumerate(fields))
    assert int.from_bytes(packed.numpy().tobytes(), "little") == stream  # padding bits are 0


@given(st.integers(2, 16), st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=100))
def test_unsigned_codes_round_trip_through_their_offset(bits: int, raw: list[int]) -> None:
    codes = torch.tensor([v % 2**bits for v in raw])
    offset = 2 ** (bits - 1)  # as weight_codes stores unsigned codes
    unpacked = unpack_codes(pack_codes(codes - offset, bits), bits, (len(raw),)) + offset
    assert torch.equal(unpacked.long(), codes)


@given(st.integers(1, 16), st.integers(1, 40), st.data())
def test_codes_that_do_not_fit_are_refused_not_wrapped(
    bits: int, length: int, data: st.DataObject
) -> None:
    lowest, highest = code_range(bits)
    bad = data.draw(st.one_of(st.integers(highest + 1, 2**20), st.integers(-(2**20), lowest - 1)))
    codes = torch.zeros(length, dtype=torch.int64) + (1 if bits == 1 else 0)
    codes[data.draw(st.integers(0, length - 1))] = bad
    with pytest.raises(ValueError, match="cannot hold"):
        pack_codes(codes, bits)


@given(st.integers(1, 16), st.integers(0, 100), st.integers(-3, 3))
def test_unpack_refuses_a_wrong_byte_count(bits: int, count: int, delta: int) -> None:
    size = packed_size(count, bits) + delta
    if delta == 0 or size < 0:
        return
    with pytest.raises(ValueError, match="damaged"):
        unpack_codes(torch.zeros(size, dtype=torch.uint8), bits, (count,))
