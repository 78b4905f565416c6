"""Packed low-bit codes: a little-endian bit stream, code i at bits [i*b, i*b + b).

The same layout is read by the numpy references, the torch ops, the ONNX
function bodies (``unpack_codes``) and the native kernels; docs/ops.md is the spec.
"""

from __future__ import annotations

import numpy as np
import torch

from ._builder import FunctionBuilder


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """Unsigned codes (< 2^bits, any shape, row-major) -> uint8 bit stream."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits")
    bit_matrix = (codes[:, None] >> np.arange(bits)) & 1  # [n, bits], LSB first
    stream = np.zeros(packed_size(codes.size, bits) * 8, dtype=np.uint8)
    stream[: codes.size * bits] = bit_matrix.reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_codes_np(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bit stream -> ``count`` codes (int64). Raises if the buffer is too short."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < packed_size(count, bits):
        raise ValueError(f"packed buffer holds {packed.size} bytes, "
                         f"{count} codes of {bits} bits need {packed_size(count, bits)}")
    stream = np.unpackbits(packed, bitorder="little")[: count * bits]
    return (stream.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def unpack_codes_torch(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Torch twin of :func:`unpack_codes_np` (int64 codes)."""
    if packed.numel() < packed_size(count, bits):
        raise ValueError(f"packed buffer holds {packed.numel()} bytes, "
                         f"{count} codes of {bits} bits need {packed_size(count, bits)}")
    padded = torch.cat([packed.reshape(-1).long(), packed.new_zeros(1).long()])
    bit_pos = torch.arange(count, dtype=torch.int64) * bits
    byte, shift = bit_pos // 8, bit_pos % 8
    word = padded[byte] + padded[byte + 1] * 256  # a code spans at most two bytes
    return (word >> shift) & ((1 << bits) - 1)


def unpack_codes(fb: FunctionBuilder, packed: str, bits: str, count: str) -> str:
    """ONNX subgraph: the int64 codes of ``count`` elements, from a uint8 stream.

    ``bits`` and ``count`` are int64 scalars. A code spans at most two bytes, so
    each is ``(byte[k] + 256 * byte[k + 1]) div 2^shift mod 2^bits``; one zero byte
    is appended so the last code's second byte exists. A buffer shorter than the
    spec allows makes Gather fail (out of bounds), never read garbage.
    """
    zero = fb.const([0], np.uint8)
    padded = fb.node("Cast", fb.node("Concat", packed, zero, axis=0), to=7)  # int64
    index = fb.node("Range", fb.const(0, np.int64), count, fb.const(1, np.int64))
    bit_pos = fb.node("Mul", index, bits)
    eight = fb.const(8, np.int64)
    byte, shift = fb.node("Div", bit_pos, eight), fb.node("Mod", bit_pos, eight)
    low = fb.node("Gather", padded, byte, axis=0)
    high = fb.node("Gather", padded, fb.node("Add", byte, fb.const(1, np.int64)), axis=0)
    word = fb.node("Add", low, fb.node("Mul", high, fb.const(256, np.int64)))
    powers = fb.const([1 << k for k in range(8)], np.int64)
    shifted = fb.node("Div", word, fb.node("Gather", powers, shift, axis=0))
    return fb.node("Mod", shifted, fb.node("Pow", fb.const(2, np.int64), bits))
