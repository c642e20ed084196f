"""Frozen, validated descriptions of *how* a tensor is quantized.

A :class:`QuantSpec` says which integer grid a quantizer uses; it carries no numbers that depend
on data. The numbers (scale, zero point) live in :class:`onnxqat.qparams.Encoding`.

Grids follow AIMET's definitions:

* asymmetric: unsigned grid ``[0, 2^b - 1]`` with a zero point;
* symmetric: signed grid ``[-2^(b-1), 2^(b-1) - 1]``, zero point 0;
* strict symmetric: signed grid ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
* unsigned symmetric: a symmetric quantizer whose observed range is non-negative uses the
  unsigned grid ``[0, 2^b - 1]`` with zero point 0 (when ``unsigned_symmetric`` is set).

The scale of a symmetric signed grid follows one of two conventions (``symmetric_scale``):

* ``"onnxqat"``: ``max(|min|, |max|) / (2^(b-1) - 1)``: the larger magnitude reaches
  ``±(2^(b-1) - 1)``, so ``-2^(b-1)`` is never used by the calibration range;
* ``"aimet"``: ``max(-min / 2^(b-1), max / (2^(b-1) - 1))``: the most negative value may reach
  ``-2^(b-1)``, as aimet-onnx 2.42 computes it (measured: tests/fixtures/aimet/measured.json).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, TypeVar

from onnxqat.errors import ConfigError

__all__ = ["MAX_BITWIDTH", "MIN_BITWIDTH", "ROUNDINGS", "SYMMETRIC_SCALES", "Choice", "QuantSpec"]

MIN_BITWIDTH = 4
MAX_BITWIDTH = 16
SYMMETRIC_SCALES = ("onnxqat", "aimet")
ROUNDINGS = ("half_even", "aimet")


_C = TypeVar("_C", bound="Choice")


class Choice(str, enum.Enum):
    """A string option with a fixed set of values (calibration schemes, weight rounding, losses).

    ``parse`` accepts a member or its value and refuses anything else with a ConfigError naming
    the choices; ``what`` (or the subclass's :meth:`describe`) names the option in that message.
    """

    @classmethod
    def describe(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls: type[_C], value: object, what: str | None = None) -> _C:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown {what or cls.describe()} {value!r}; choose one of {choices}") from None


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one quantizer maps floats to integers.

    Attributes:
        bitwidth: Number of bits of the integer grid, 4 to 16.
        symmetric: Zero point fixed at the grid's centre (signed grid) instead of data-driven.
        strict_symmetric: Symmetric grid without its most negative value.
        unsigned_symmetric: Let a symmetric quantizer switch to the unsigned grid when the observed
            data is non-negative (AIMET's default for activations after Relu).
        axis: Per-channel axis of the quantized tensor, or None for one scale per tensor.
        fixed_range: ``(min, max)`` that replaces the observed range (encoding constraints, e.g.
            Softmax probabilities), or None to calibrate.
        pair_limit: For weights of kernels that add pairs of products in a saturating 16-bit lane
            (see :mod:`onnxqat.target`): the largest ``|q_i| + |q_j|`` two same-sign integer
            weights of one output channel may reach; None when the kernel is exact.
        pair_axis: Output-channel axis of the weight that ``pair_limit`` applies along (also for
            per-tensor weights).
        symmetric_scale: Scale convention of a symmetric signed grid, ``"onnxqat"`` or
            ``"aimet"`` (see the module docstring); strict symmetric grids always use
            ``max(|min|, |max|) / (2^(b-1) - 1)``.
        rounding: How a weight or a model input is rounded onto the grid: ``"half_even"``
            (QuantizeLinear: ``round_half_even(x / s) + zp``) or ``"aimet"`` (aimet-onnx 2.42's
            quantizer: ``float32(x / s - offset)`` rounded half away from zero on the unsigned grid,
            ``offset`` = AIMET's). Other tensors are rounded inside the integer kernels that
            produce them: always half to even.

    >>> QuantSpec(bitwidth=8, symmetric=True).with_axis(0).axis
    0
    """

    bitwidth: int = 8
    symmetric: bool = False
    strict_symmetric: bool = False
    unsigned_symmetric: bool = True
    axis: int | None = None
    fixed_range: tuple[float, float] | None = None
    pair_limit: int | None = None
    pair_axis: int | None = None
    symmetric_scale: str = "onnxqat"
    rounding: str = "half_even"

    def __post_init__(self) -> None:
        if isinstance(self.bitwidth, bool) or not isinstance(self.bitwidth, int):
            raise ConfigError(f"bitwidth must be an integer, got {self.bitwidth!r}")
        if not MIN_BITWIDTH <= self.bitwidth <= MAX_BITWIDTH:
            raise ConfigError(
                f"bitwidth must be between {MIN_BITWIDTH} and {MAX_BITWIDTH}, got {self.bitwidth}"
            )
        if self.strict_symmetric and not self.symmetric:
            raise ConfigError("strict_symmetric requires symmetric=True")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise ConfigError(f"axis must be an integer or None, got {self.axis!r}")
        if self.fixed_range is not None:
            lo, hi = self.fixed_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"fixed_range must be finite with min < max, got {self.fixed_range}")

        if self.symmetric_scale not in SYMMETRIC_SCALES:
            raise ConfigError(f"symmetric_scale must be one of {SYMMETRIC_SCALES}, got {self.symmetric_scale!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.pair_limit is not None:
            if isinstance(self.pair_limit, bool) or not isinstance(self.pair_limit, int) or self.pair_limit < 2:
                raise ConfigError(f"pair_limit must be an integer >= 2, got {self.pair_limit!r}")
            if not self.symmetric or self.pair_axis is None:
                raise ConfigError("pair_limit applies to symmetric weights with a pair_axis")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def with_axis(self, axis: int | None) -> QuantSpec:
        return dataclasses.replace(self, axis=axis)

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)
