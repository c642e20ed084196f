"""Store 4-bit weights as packed INT4/UINT4 initializers (two values per byte).

The deployable model keeps integer weights behind ``DequantizeLinear``; weights on a grid of at
most 4 bits are stored in int8/uint8 containers by default, because onnxruntime's CPU provider
fuses only 8-bit weights into its integer kernels. This pass rewrites each such weight (and its
zero point) to ``INT4``/``UINT4``: the file holds half the bytes, the values are unchanged.

``DequantizeLinear`` reads 4-bit types from opset 21 on; below it the node moves to the
``com.microsoft`` domain, whose ``DequantizeLinear`` onnxruntime runs on them too. The model's IR
version is raised to 10 (the first with 4-bit types) when lower.

Measured (onnxruntime 1.19 and 1.32 CPU, BENCHMARKS.md): the values are identical, but a
convolution whose weights are dequantized from 4-bit runs in float (no fused integer kernel), so
packing trades speed for size on CPU; accelerators that read 4-bit weights (QNN HTP) take it as is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, name_of
from onnxqat.passes import TypedInPlacePass

__all__ = ["PackInt4Pass", "PackInt4Result"]

_RANGES = {ir.DataType.INT8: (ir.DataType.INT4, -8, 7), ir.DataType.UINT8: (ir.DataType.UINT4, 0, 15)}
_MIN_IR_VERSION = 10
_OPSET_WITH_INT4 = 21


@dataclasses.dataclass
class PackInt4Result(ir.passes.PassResult):
    """Attributes: packed: the weight initializers now stored as 4-bit types."""

    packed: tuple[str, ...] = ()


class PackInt4Pass(TypedInPlacePass[PackInt4Result]):
    """Pack the constant int8/uint8 inputs of ``DequantizeLinear`` listed in ``weights`` whose
    values (and zero points) fit 4 bits.

    Args:
        weights: Names of the quantized weight initializers that may be packed (those whose
            encoding has at most 4 bits); others are left in their containers.
    """

    def __init__(self, weights: frozenset[str]) -> None:
        super().__init__()
        self.weights = weights

    def ensures(self, model: ir.Model) -> None:
        """A model holding 4-bit initializers declares an IR version that has 4-bit types."""
        four = next((n for n, v in model.graph.initializers.items() if v.const_value is not None
                     and v.const_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4)), None)
        if four is not None and (model.ir_version or 0) < _MIN_IR_VERSION:
            raise ir.passes.PostconditionError(
                f"4-bit initializer '{four}' in a model of IR version {model.ir_version} (4-bit types need "
                f"{_MIN_IR_VERSION})")

    def call(self, model: ir.Model) -> PackInt4Result:
        graph = model.graph
        names = NameScope(model)
        opset = model.opset_imports.get("", 1)
        domain = "" if opset >= _OPSET_WITH_INT4 else "com.microsoft"
        packed: list[str] = []
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
                continue
            x, scale, zero_point = node.inputs[:3]
            if x is None or zero_point is None or x.name not in self.weights or x.const_value is None:
                continue
            target = _RANGES.get(x.const_value.dtype)
            zp = const_array(zero_point)
            if target is None or zp is None or zero_point.const_value is None \
                    or zero_point.const_value.dtype != x.const_value.dtype:
                continue
            dtype, lo, hi = target
            values = x.const_value.numpy()
            if values.min() < lo or values.max() > hi or zp.min() < lo or zp.max() > hi:
                continue
            packed_x = _packed(graph, names, x, values, dtype)
            packed_zp = _packed(graph, names, zero_point, zp, dtype)
            attributes = list(node.attributes.values())
            new = ir.Node(domain, "DequantizeLinear", [packed_x, scale, packed_zp], attributes=attributes,
                          name=node.name, num_outputs=1)
            out = node.outputs[0]
            new.outputs[0].type, new.outputs[0].shape = out.type, out.shape
            graph.insert_before(node, new)
            out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            new.outputs[0].name = out.name
            for old in (x, zero_point):
                if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
                    graph.initializers.pop(name_of(old))
            packed.append(x.name or "")
        if packed:
            if domain and domain not in model.opset_imports:
                model.opset_imports[domain] = 1
            model.ir_version = max(model.ir_version or 0, _MIN_IR_VERSION)
        return PackInt4Result(model, modified=bool(packed), packed=tuple(packed))


def _packed(graph: ir.Graph, names: NameScope, value: ir.Value, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """A new initializer holding ``array`` as the 4-bit ``dtype``, named after ``value``."""
    name = names.fresh(f"{value.name}_4bit")
    tensor = ir.Tensor(array.astype(np.int8 if dtype == ir.DataType.INT4 else np.uint8), dtype=dtype, name=name)
    packed = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(dtype))
    graph.register_initializer(packed)
    return packed
