"""Bit packing: signed integer codes stored at exactly their bit width.

A ``bits``-wide field holds a two's-complement code in ``[-2**(bits-1), 2**(bits-1) - 1]``
(one bit: ``{-1, +1}``, stored as ``0`` for -1 and ``1`` for +1). Fields are laid end to end
with no padding between values, least significant bit first, and the stream is cut into bytes
little-endian (bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``); the last byte is
padded with zero bits. So ``n`` codes take ``ceil(n * bits / 8)`` bytes, and widths such as
3, 5, 6 and 7 bits cross byte boundaries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MAX_BITS = 16


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest code a ``bits``-wide field holds."""
    _check_bits(bits)
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-count * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer ``codes`` (any shape, read in C order) into a flat ``uint8`` tensor.

    Raises ``ValueError`` when a code does not fit ``bits`` bits, so nothing is silently
    wrapped around.
    """
    lowest, highest = code_range(bits)
    values = codes.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if values.size and (values.min() < lowest or values.max() > highest):
        raise ValueError(
            f"codes span [{values.min()}, {values.max()}], which {bits}-bit fields cannot hold "
            f"([{lowest}, {highest}]); pack them with more bits"
        )
    if bits == 1:
        if np.any(values == 0):
            raise ValueError("1-bit codes must be -1 or +1, got 0; use 2 bits for ternary codes")
        unsigned = (values > 0).astype(np.uint16)
    else:
        unsigned = (values & ((1 << bits) - 1)).astype(np.uint16)  # two's complement
    shifts = np.arange(bits, dtype=np.uint16)
    stream = ((unsigned[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    packed = np.packbits(stream, bitorder="little")
    return torch.from_numpy(packed)


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """The ``int32`` codes of ``shape`` that :func:`pack_codes` stored in ``packed``."""
    count = int(np.prod(shape, dtype=np.int64))
    expected = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed codes for shape {shape} at {bits} bits must be {expected} uint8 bytes, got "
            f"{packed.numel()} {packed.dtype}; the model file is damaged"
        )
    stream = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64)).astype(np.int64)
    unsigned = stream.reshape(count, bits).astype(np.int64) @ weights
    if bits == 1:
        signed = unsigned * 2 - 1
    else:
        signed = np.where(unsigned >= 1 << (bits - 1), unsigned - (1 << bits), unsigned)
    return torch.from_numpy(signed.astype(np.int32)).reshape(shape)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"packed codes need 1 to {MAX_BITS} bits per value, got {bits!r}")
