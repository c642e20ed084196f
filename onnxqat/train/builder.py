"""A small node builder over an onnx-ir graph, and the fake-quant primitives QAT lowers to.

The primitives are the facts about onnxruntime-training 1.19 that the lowering relies on (each is
pinned by a test):

* ``Round`` has no gradient. ``com.microsoft::FakeQuant`` with scale 1, zero point 0 and a wide
  integer range is round-half-to-even with a straight-through gradient; for values below 2^22,
  ``(x + 1.5 * 2^23) - 1.5 * 2^23`` is the same rounding in float32 and onnxruntime does not
  simplify it away: :meth:`Builder.ste_round`.
* A ``Cast`` to an integer type stops the gradient. A positive float32 tensor survives an exact
  trip through integers when split into exponent and 24-bit mantissa: :meth:`Builder.stop_gradient`
  returns the same bits with no gradient (there is no StopGradient op in ONNX).
* ``ReduceMax``/``ReduceMin`` have no gradient builder; they may appear only on paths that end in a
  stop-gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx_ir as ir

from onnxqat.graph import NameScope, make_initializer, opset_version

__all__ = ["CONTRIB", "Builder"]

CONTRIB = "com.microsoft"
_STE_RANGE = (-(2**31), 2**31 - 1)


class Builder:
    """Appends nodes to ``model``'s graph with collision-free names."""

    def __init__(self, model: ir.Model, names: NameScope | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.names = names or NameScope(model)
        self.opset = opset_version(model)
        model.opset_imports.setdefault(CONTRIB, 1)
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], ir.Value] = {}

    def const(self, value: float | np.ndarray, dtype: npt.DTypeLike = np.float32, name: str = "c") -> ir.Value:
        """A (deduplicated) constant initializer."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            self._consts[key] = make_initializer(self.graph, self.names.fresh(f"onnxqat_{name}"), array)
        return self._consts[key]

    def param(self, name: str, value: np.ndarray) -> ir.Value:
        """A new initializer meant to be trained (never deduplicated)."""
        return make_initializer(self.graph, self.names.fresh(name), np.asarray(value, dtype=np.float32))

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        base: str,
        *,
        domain: str = "",
        outputs: int = 1,
        **attrs: int | float | str | Sequence[int],
    ) -> ir.Value:
        attributes = []
        for key, v in attrs.items():
            if isinstance(v, str):
                attributes.append(ir.AttrString(key, v))
            elif isinstance(v, float):
                attributes.append(ir.AttrFloat32(key, v))
            elif isinstance(v, int):
                attributes.append(ir.AttrInt64(key, v))
            else:
                attributes.append(ir.AttrInt64s(key, list(v)))
        node = ir.Node(
            domain, op_type, list(inputs), attributes=attributes,
            name=self.names.fresh(f"{base}/{op_type}"), num_outputs=outputs,
        )
        for i, out in enumerate(node.outputs):
            out.name = self.names.fresh(f"{base}/{op_type.lower()}{'' if i == 0 else i}")
        self.graph.append(node)
        return node.outputs[0]

    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int], base: str) -> ir.Value:
        """ReduceMax/ReduceMin over ``axes`` keeping dims (axes as input from opset 18)."""
        if self.opset >= 18:
            return self.op(op_type, [x, self.const(np.asarray(axes), np.int64, "axes")], base, keepdims=1)
        return self.op(op_type, [x], base, axes=list(axes), keepdims=1)

    def reduce_sum(self, x: ir.Value, axis: int, base: str) -> ir.Value:
        """ReduceSum over one axis, dropping it (axes as input from opset 13)."""
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.const(np.asarray([axis]), np.int64, "axes")], base, keepdims=0)
        return self.op("ReduceSum", [x], base, axes=[axis], keepdims=0)

    def ste_round(self, x: ir.Value, base: str, *, bounded: bool = False) -> ir.Value:
        """Round half to even forward, identity gradient backward.

        ``bounded``: ``|x| < 2^22`` is guaranteed (e.g. after a clip to an integer grid); then
        ``(x + 1.5 * 2^23) - 1.5 * 2^23`` rounds in two vectorised float ops, which autodiff sees as
        the identity. Otherwise FakeQuant with a wide range does it.
        """
        if bounded:
            magic = self.const(1.5 * 2.0**23, name="round_magic")
            return self.op("Sub", [self.op("Add", [x, magic], base), magic], base)
        return self.op(
            "FakeQuant", [x, self.const(1.0, name="one"), self.const(0.0, name="zero")], base,
            domain=CONTRIB, outputs=2, quant_min=_STE_RANGE[0], quant_max=_STE_RANGE[1],
        )

    def stop_gradient(self, x: ir.Value, base: str) -> ir.Value:
        """The same positive float32 values, bit for bit, with no gradient path to ``x``.

        ``x = m * 2^e`` with ``e = floor(log2 x) - 3`` (margin for Log's rounding) puts
        ``m * 2^22`` on an integer below 2^27 whose low bits are zero, so both the int64 cast
        and the float32 cast back are exact. Requires normal positive values with room below
        (``2^-100 <= x``): every scale, and the floors the lowering puts under them.
        """
        log2 = self.op("Mul", [self.op("Log", [x], base), self.const(1.0 / np.log(2.0), name="inv_ln2")], base)
        exponent = self.op("Sub", [self.op("Floor", [log2], base), self.const(3.0, name="three")], base)
        exponent = self.op("Cast", [self.op("Cast", [exponent], base, to=ir.DataType.INT64)], base, to=ir.DataType.FLOAT)
        two = self.const(2.0, name="two")
        mantissa = self.op("Mul", [self.op("Div", [x, self.op("Pow", [two, exponent], base)], base),
                                   self.const(2.0**22, name="two22")], base)
        mantissa = self.op("Cast", [self.op("Cast", [mantissa], base, to=ir.DataType.INT64)], base, to=ir.DataType.FLOAT)
        scale = self.op("Pow", [two, self.op("Sub", [exponent, self.const(22.0, name="c22")], base)], base)
        return self.op("Mul", [mantissa, scale], base)
