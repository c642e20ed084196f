"""Pure numerics of integer quantization: ranges to encodings, quantize, dequantize.

Definitions match AIMET's (``scale = (max - min) / (2^b - 1)``, ``offset = round(min / scale)``,
``offset = -zero_point`` on the unsigned grid, symmetric grids of :mod:`onnxqat.spec`) and the
ONNX ``QuantizeLinear`` / ``DequantizeLinear`` operators (``x / scale`` in float32, round half to
even, saturate to the grid). These functions are the reference every graph lowering is tested
against.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxqat.errors import EncodingsError
from onnxqat.spec import MAX_BITWIDTH, MIN_BITWIDTH, QuantSpec

__all__ = [
    "MIN_SCALE",
    "Encoding",
    "broadcast_shape",
    "compute_encoding",
    "dequantize",
    "fake_quantize",
    "IntegerFormConstants",
    "grid_bounds",
    "integer_form_constants",
    "pair_safe_scale",
    "PReluPart",
    "prelu_form_constants",
    "quantize",
]

# Smallest scale we emit: float32 epsilon (AIMET's floor for 4- to 16-bit grids). A constant-zero
# tensor gets this scale instead of a division by zero.
MIN_SCALE = float(np.finfo(np.float32).eps)


def grid_bounds(bitwidth: int, signed: bool, strict_symmetric: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a grid.

    >>> grid_bounds(8, signed=False), grid_bounds(8, signed=True), grid_bounds(8, True, True)
    ((0, 255), (-128, 127), (-127, 127))
    """
    if signed:
        half = 1 << (bitwidth - 1)
        return -half + int(strict_symmetric), half - 1
    return 0, (1 << bitwidth) - 1


@dataclasses.dataclass(frozen=True, eq=False)
class Encoding:
    """Scale and zero point of one quantizer, per tensor (0-d arrays) or per channel (1-d arrays).

    ``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x = (x_q - zero_point) * scale``.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    bitwidth: int
    signed: bool
    symmetric: bool
    strict_symmetric: bool = False
    axis: int | None = None

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point)
        if not np.issubdtype(zp.dtype, np.integer):
            if not np.all(np.isfinite(zp)) or np.any(zp != np.round(zp)):
                raise EncodingsError(f"zero point must be integral, got {zp.tolist()}")
        zp = zp.astype(np.int64)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)
        if not MIN_BITWIDTH <= self.bitwidth <= MAX_BITWIDTH:
            raise EncodingsError(
                f"bitwidth must be between {MIN_BITWIDTH} and {MAX_BITWIDTH}, got {self.bitwidth}"
            )
        if scale.ndim > 1 or scale.shape != zp.shape:
            raise EncodingsError(
                f"scale {scale.shape} and zero point {zp.shape} must be equal 0-d or 1-d shapes"
            )
        if (scale.ndim == 1) != (self.axis is not None):
            raise EncodingsError("a per-channel encoding needs an axis, a per-tensor one none")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise EncodingsError(f"scale must be finite and > 0, got {scale.ravel()[:8].tolist()}")
        if self.strict_symmetric and not (self.symmetric and self.signed):
            raise EncodingsError("a strict symmetric encoding must be symmetric and signed")
        if self.symmetric and np.any(zp != 0):
            raise EncodingsError("a symmetric encoding has zero point 0")
        qmin, qmax = self.qmin, self.qmax
        if np.any(zp < qmin) or np.any(zp > qmax):
            raise EncodingsError(f"zero point outside the grid [{qmin}, {qmax}]: {zp.tolist()}")

    # -- grid ---------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return grid_bounds(self.bitwidth, self.signed, self.strict_symmetric)[0]

    @property
    def qmax(self) -> int:
        return grid_bounds(self.bitwidth, self.signed, self.strict_symmetric)[1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def container_bits(self) -> int:
        """Bits of the ONNX integer type holding the values (8 or 16)."""
        return 8 if self.bitwidth <= 8 else 16

    @property
    def container_dtype(self) -> np.dtype:
        return np.dtype(f"{'int' if self.signed else 'uint'}{self.container_bits}")

    @property
    def narrow(self) -> bool:
        """True when the grid is smaller than its container type (needs an explicit clip)."""
        info = np.iinfo(self.container_dtype)
        return (self.qmin, self.qmax) != (int(info.min), int(info.max))

    @property
    def min(self) -> np.ndarray:
        return ((self.qmin - self.zero_point) * self.scale.astype(np.float64)).astype(np.float32)

    @property
    def max(self) -> np.ndarray:
        return ((self.qmax - self.zero_point) * self.scale.astype(np.float64)).astype(np.float32)

    # -- AIMET conventions ----------------------------------------------------------------------
    @property
    def aimet_offset(self) -> np.ndarray:
        """AIMET's offset: ``x = (q' + offset) * scale`` with ``q'`` on ``[0, 2^b - 1]``."""
        return (self.qmin - self.zero_point).astype(np.int64)

    @classmethod
    def from_aimet(
        cls,
        *,
        bitwidth: int,
        is_symmetric: bool,
        scale: np.ndarray | list[float] | float,
        offset: np.ndarray | list[int] | int,
        axis: int | None = None,
    ) -> Encoding:
        """Build from AIMET's (scale, offset) pair; raises :class:`EncodingsError` if impossible."""
        scale_arr = np.asarray(scale, dtype=np.float64)
        offset_arr = np.asarray(offset, dtype=np.float64)
        if scale_arr.shape != offset_arr.shape:
            raise EncodingsError(f"{scale_arr.size} scales but {offset_arr.size} offsets")
        if not np.all(np.isfinite(offset_arr)) or np.any(offset_arr != np.round(offset_arr)):
            raise EncodingsError(f"offset must be integral, got {offset_arr.ravel()[:8].tolist()}")
        if not MIN_BITWIDTH <= bitwidth <= MAX_BITWIDTH:
            raise EncodingsError(
                f"bitwidth must be between {MIN_BITWIDTH} and {MAX_BITWIDTH}, got {bitwidth}"
            )
        off = offset_arr.astype(np.int64)
        half = 1 << (bitwidth - 1)
        if is_symmetric:
            first = int(off.ravel()[0]) if off.size else 0
            if np.any(off != first):
                raise EncodingsError("symmetric per-channel encodings must share one offset")
            if first == -half:
                return cls(scale_arr, np.zeros_like(off), bitwidth, True, True, False, axis)
            if first == -half + 1:
                return cls(scale_arr, np.zeros_like(off), bitwidth, True, True, True, axis)
            if first == 0:
                return cls(scale_arr, np.zeros_like(off), bitwidth, False, True, False, axis)
            raise EncodingsError(
                f"symmetric {bitwidth}-bit offset must be {-half}, {-half + 1} or 0, got {first}"
            )
        zp = -off
        if np.any(zp < 0) or np.any(zp > 2 * half - 1):
            raise EncodingsError(
                f"offset outside the {bitwidth}-bit grid: {off.ravel()[:8].tolist()}"
            )
        return cls(scale_arr, zp, bitwidth, False, False, False, axis)

    def with_axis(self, axis: int | None) -> Encoding:
        return dataclasses.replace(self, axis=axis)

    def equals(self, other: Encoding) -> bool:
        return (
            self.bitwidth == other.bitwidth
            and self.signed == other.signed
            and self.symmetric == other.symmetric
            and self.strict_symmetric == other.strict_symmetric
            and self.axis == other.axis
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __repr__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (
            f"Encoding({kind} {'int' if self.signed else 'uint'}{self.bitwidth}, "
            f"scale={self.scale.ravel()[:4].tolist()}, zp={self.zero_point.ravel()[:4].tolist()}, "
            f"axis={self.axis})"
        )


def compute_encoding(
    min_val: np.ndarray | float, max_val: np.ndarray | float, spec: QuantSpec
) -> Encoding:
    """Encoding for an observed range, following AIMET's grid definitions.

    The range is first widened to include zero. Asymmetric: ``scale = (max - min) / (2^b - 1)``,
    ``zero_point = -round(min / scale)``. Symmetric: ``scale = max(|min|, |max|) / (2^(b-1) - 1)``
    on the signed grid, or ``max / (2^b - 1)`` on the unsigned grid when the range is non-negative
    and ``spec.unsigned_symmetric`` is set. With ``spec.symmetric_scale == "aimet"`` the signed
    symmetric scale is ``max(-min / 2^(b-1), max / (2^(b-1) - 1))`` instead (aimet-onnx's: the most
    negative value may reach ``-2^(b-1)``), and the asymmetric offset is aimet-onnx's
    ``round(min / delta)`` with ``delta`` in double precision, half away from zero. Per-channel when
    ``min_val`` is 1-d.

    >>> e = compute_encoding(-1.0, 3.0, QuantSpec(bitwidth=8))
    >>> float(e.scale), int(e.zero_point), e.aimet_offset.item()
    (0.01568627543747425, 64, -64)
    >>> w = QuantSpec(bitwidth=8, symmetric=True)
    >>> float(compute_encoding(-1.28, 1.0, w).scale), float(compute_encoding(-1.28, 1.0, w.replace(symmetric_scale="aimet")).scale)
    (0.010078740306198597, 0.009999999776482582)
    """
    lo = np.minimum(np.asarray(min_val, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(max_val, dtype=np.float64), 0.0)
    if lo.shape != hi.shape or lo.ndim > 1:
        raise ValueError(f"min {lo.shape} and max {hi.shape} must be equal 0-d or 1-d shapes")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("cannot compute an encoding from a non-finite range")
    axis = spec.axis if lo.ndim == 1 else None
    b = spec.bitwidth
    if spec.symmetric:
        unsigned = spec.unsigned_symmetric and bool(np.all(lo >= 0))
        if unsigned:
            scale = _floor_scale(hi / ((1 << b) - 1))
            return Encoding(scale, np.zeros(lo.shape, np.int64), b, False, True, False, axis)
        half = 1 << (b - 1)
        if spec.symmetric_scale == "aimet" and not spec.strict_symmetric:
            scale = _floor_scale(np.maximum(-lo / half, hi / (half - 1)))
        else:
            scale = _floor_scale(np.maximum(-lo, hi) / (half - 1))
        return Encoding(
            scale, np.zeros(lo.shape, np.int64), b, True, True, spec.strict_symmetric, axis
        )
    scale = _floor_scale((hi - lo) / ((1 << b) - 1))
    if spec.symmetric_scale == "aimet":
        # aimet-onnx's offset: round(min / delta), delta in double precision, half away from zero
        # (the float32 scale puts min = -1, max = 1 at -127.49999 instead of -127.5)
        ratio = lo / np.where(hi > lo, (hi - lo) / ((1 << b) - 1), 1.0)
        zp = -(np.sign(ratio) * np.floor(np.abs(ratio) + 0.5)).astype(np.int64)
    else:
        zp = -np.rint(lo / scale.astype(np.float64)).astype(np.int64)
    zp = np.clip(zp, 0, (1 << b) - 1)
    return Encoding(scale, zp, b, False, False, False, axis)


def pair_safe_scale(rows: np.ndarray, limit: int) -> np.ndarray:
    """Smallest float32 scale per row keeping any two same-sign quantized values of the row within
    ``limit`` in magnitude sum: ``(a1 + a2) / (limit - 0.5)``, with ``a1 >= a2`` the two largest
    magnitudes of one sign (the larger of the two signs' sums).

    Dividing by ``limit - 0.5`` leaves room for float32 rounding: ``a1/s + a2/s <= limit - 0.5``
    up to a few ulps, and two roundings to nearest add less than 1, so the integer sum is at most
    ``limit``. Rows with fewer than two same-sign values only need ``a1 / (limit - 0.5)``.

    >>> pair_safe_scale(np.array([[1.0, 1.0, -0.5], [2.0, 0.0, 0.0]], np.float32), 128).tolist()
    [0.01568627543747425, 0.01568627543747425]
    """
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-d, got shape {rows.shape}")
    sums = []
    for signed in (rows, -rows):
        mag = np.maximum(signed, np.float32(0))
        if mag.shape[1] >= 2:
            top = np.partition(mag, mag.shape[1] - 2, axis=1)[:, -2:]
            sums.append((top[:, 1] + top[:, 0]).astype(np.float32))
        else:
            sums.append(mag[:, 0])
    return (np.maximum(sums[0], sums[1]) / np.float32(limit - 0.5)).astype(np.float32)


def _floor_scale(scale: np.ndarray) -> np.ndarray:
    floored: np.ndarray = np.maximum(scale, MIN_SCALE).astype(np.float32)
    return floored


def broadcast_shape(enc: Encoding, ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel parameter along ``enc.axis`` of an ``ndim`` tensor."""
    if enc.axis is None:
        return ()
    axis = enc.axis % ndim
    return tuple(enc.scale.shape[0] if i == axis else 1 for i in range(ndim))


def quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """ONNX ``QuantizeLinear`` on ``enc``'s grid: float32 division, round half to even, saturate."""
    x = np.asarray(x, dtype=np.float32)
    shape = broadcast_shape(enc, x.ndim)
    scale = enc.scale.reshape(shape)
    zp = enc.zero_point.reshape(shape)
    q = np.rint(x / scale).astype(np.float64) + zp
    out: np.ndarray = np.clip(q, enc.qmin, enc.qmax).astype(enc.container_dtype)
    return out


def dequantize(q: np.ndarray, enc: Encoding) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32."""
    q = np.asarray(q)
    shape = broadcast_shape(enc, q.ndim)
    diff = (q.astype(np.int64) - enc.zero_point.reshape(shape)).astype(np.float32)
    out: np.ndarray = diff * enc.scale.reshape(shape)
    return out


def fake_quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """Quantize then dequantize (what the simulation computes for a quantized tensor)."""
    return dequantize(quantize(x, enc), enc)


@dataclasses.dataclass(frozen=True)
class IntegerFormConstants:
    """The numbers of ``clip(alpha x + beta, 0, 1)`` deployed as integer kernels (uint8 grids).

    ``offset = beta / alpha`` is stored exactly as one uint8 value (``offset_q`` with scale
    ``|offset| / 255``); ``x + offset`` is quantized with ``grid_scale = (1 / alpha) / 255`` onto
    ``[0, 255]``, whose saturation is the clip; the same integers read with ``read_scale = 1/255``
    are the result on ``[0, 1]``.
    """

    offset_q: int
    offset_scale: np.float32
    offset_zero_point: int
    grid_scale: np.float32
    read_scale: np.float32

    @property
    def offset(self) -> np.float32:
        """The offset as the deployed graph computes it (dequantized)."""
        return np.float32(np.float32(self.offset_q - self.offset_zero_point) * self.offset_scale)


def integer_form_constants(alpha: float, beta: float) -> IntegerFormConstants:
    """See :class:`IntegerFormConstants`.

    >>> c = integer_form_constants(1 / 6, 0.5)      # HardSwish's gate: (x + 3) / 6
    >>> float(c.offset), float(c.grid_scale * 255), float(c.read_scale * 255)
    (3.0, 6.0, 1.0)
    """
    if not (alpha > 0 and math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"alpha must be > 0 and both finite, got alpha={alpha}, beta={beta}")
    offset = beta / alpha
    if offset > 0:
        q, scale, zp = 255, np.float32(offset / 255), 0
    elif offset < 0:
        q, scale, zp = 0, np.float32(-offset / 255), 255
    else:
        q, scale, zp = 0, np.float32(1.0), 0
    return IntegerFormConstants(q, scale, zp, np.float32((1.0 / alpha) / 255), np.float32(1.0 / 255))


@dataclasses.dataclass(frozen=True)
class PReluPart:
    """One depthwise 1x1 convolution of a PRelu's integer form: ``t = clip(d x)`` per channel,
    int8 weights ``weight_q * weight_scale = d`` (one weight per channel, at +-127 or 0), onto a
    uint8 grid whose saturation is the clip: ``[0, M]`` (zero point 0) for the channels whose
    ``d < 0``, ``[-M, 0]`` (zero point 255) for those whose ``d > 0``; ``t = d min(x, 0)``."""

    weight_q: np.ndarray
    weight_scale: np.ndarray
    grid_scale: np.float32
    grid_zero_point: int


def prelu_form_constants(slope: np.ndarray, input_enc: Encoding) -> tuple[PReluPart, ...]:
    """``PRelu(x) = x + sum_parts clip(d_part x)``, ``d = slope - 1`` split by sign (see
    :class:`PReluPart`); ``M`` is the largest ``|d| |x_min|`` of the input's uint8 grid. Empty
    when the grid has no negative values (PRelu is then the identity on it).

    >>> enc = Encoding(np.float32(0.1), np.int64(100), 8, False, False)
    >>> [(p.grid_zero_point, float(p.grid_scale * 255)) for p in prelu_form_constants(np.array([0.25, 1.5]), enc)]
    [(0, 7.5), (255, 5.0)]
    """
    d = np.asarray(slope, np.float64).reshape(-1) - 1.0
    x_min = -float(input_enc.zero_point) * float(input_enc.scale)
    parts = []
    for sign, zero_point in ((-1.0, 0), (1.0, 255)):
        part = np.where(d * sign > 0, d, 0.0)
        reach = float(np.max(np.abs(part))) * -x_min
        if not reach > 0:
            continue
        weight_scale = np.where(part != 0, np.abs(part) / 127.0, 1.0).astype(np.float32)
        weight_q = np.clip(np.rint(part / weight_scale), -127, 127).astype(np.int8)
        parts.append(PReluPart(weight_q, weight_scale, np.float32(reach / 255), zero_point))
    return tuple(parts)
