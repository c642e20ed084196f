"""Float16 models: simulate in float32, export in the model's own dtypes.

:class:`Float16ToFloat32Pass` turns float16 graph inputs, outputs, initializers and ``Cast`` targets
into float32 and returns what it changed in its result's ``record`` (graph inputs remember their declared dtype in
``value.meta["declared_dtype"]``, so callers keep feeding float16 arrays). The record drives the
way back: :func:`restore_float16` gives the float export its float16 weights and interface again,
and :func:`cast_interface` wraps a float32 model (the deployable QDQ model) in boundary Casts so it
takes and returns float16 like the original.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, array_tensor, name_of
from onnxqat.passes import TypedInPlacePass

__all__ = ["DECLARED_DTYPE", "Float16Record", "Float16Result", "Float16ToFloat32Pass", "cast_interface",
           "restore_float16"]

DECLARED_DTYPE = "declared_dtype"


@dataclasses.dataclass
class Float16Record:
    inputs: set[str] = dataclasses.field(default_factory=set)
    outputs: set[str] = dataclasses.field(default_factory=set)
    initializers: set[str] = dataclasses.field(default_factory=set)
    casts: set[str] = dataclasses.field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs or self.initializers or self.casts)


def _is_half(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.FLOAT16


def _set_dtype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` a new tensor type of ``dtype``. Never ``value.dtype = ...``: that mutates
    the type object, which ``clone()`` shares between a model and its copies."""
    old = value.type
    value.type = ir.TensorType(dtype, denotation=old.denotation if isinstance(old, ir.TensorType) else None)


@dataclasses.dataclass
class Float16Result(ir.passes.PassResult):
    """Attributes: record: What the pass turned from float16 into float32 (empty: nothing)."""

    record: Float16Record = dataclasses.field(default_factory=Float16Record)


class Float16ToFloat32Pass(TypedInPlacePass[Float16Result]):
    """Float16 inputs, outputs, initializers and Cast targets to float32; the result's ``record``
    says which (the pass keeps no state between calls)."""

    def ensures(self, model: ir.Model) -> None:
        """No float16 graph input, output, initializer, node output or Cast target is left."""
        graph = model.graph
        values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(v for n in graph for v in n.outputs)]
        half = next((v for v in values if _is_half(v)), None)
        if half is not None:
            raise ir.passes.PostconditionError(f"value '{half.name}' is still float16")
        cast = next((n for n in graph if n.op_type == "Cast" and (to := n.attributes.get("to")) is not None
                     and to.as_int() == ir.DataType.FLOAT16), None)
        if cast is not None:
            raise ir.passes.PostconditionError(f"Cast node '{cast.name}' still casts to float16")

    def call(self, model: ir.Model) -> Float16Result:
        record = Float16Record()
        graph = model.graph
        for value in graph.inputs:
            if _is_half(value):
                value.meta[DECLARED_DTYPE] = ir.DataType.FLOAT16
                _set_dtype(value, ir.DataType.FLOAT)
                record.inputs.add(name_of(value))
        for value in graph.outputs:
            if _is_half(value):
                _set_dtype(value, ir.DataType.FLOAT)
                record.outputs.add(name_of(value))
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is not None and tensor.dtype == ir.DataType.FLOAT16:
                value.const_value = array_tensor(tensor.numpy().astype(np.float32), name=name)
                _set_dtype(value, ir.DataType.FLOAT)
                record.initializers.add(name)
        for node in graph:
            to = node.attributes.get("to")
            if node.op_type == "Cast" and to is not None and to.as_int() == ir.DataType.FLOAT16:
                node.attributes["to"] = ir.AttrInt64("to", int(ir.DataType.FLOAT))
                record.casts.add(name_of(node))
            for out in node.outputs:
                if _is_half(out):
                    _set_dtype(out, ir.DataType.FLOAT)
        return Float16Result(model, bool(record), record)


def restore_float16(model: ir.Model, record: Float16Record) -> ir.Model:
    """A copy of a float32 working model with the float16 parts of ``record`` restored."""
    model = model.clone()
    graph = model.graph
    for value in [*graph.inputs, *graph.outputs]:
        if value.name in record.inputs | record.outputs:
            _set_dtype(value, ir.DataType.FLOAT16)
    for name in record.initializers & set(graph.initializers):
        value = graph.initializers[name]
        assert value.const_value is not None
        value.const_value = array_tensor(value.const_value.numpy().astype(np.float16), name=name)
        _set_dtype(value, ir.DataType.FLOAT16)
    for node in graph:
        if node.name in record.casts:
            node.attributes["to"] = ir.AttrInt64("to", int(ir.DataType.FLOAT16))
        for out in node.outputs:
            if not out.is_graph_output():
                out.type = None
                out.shape = None
    return model


def cast_interface(model: ir.Model, record: Float16Record) -> ir.Model:
    """A copy of a float32 model whose recorded inputs/outputs are float16 again, via Casts."""
    model = model.clone()
    graph = model.graph
    names = NameScope(model)
    for value in graph.inputs:
        if value.name not in record.inputs:
            continue
        users = list(value.uses())
        cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT))],
                       name=names.fresh(f"{value.name}_to_float32"), num_outputs=1)
        cast.outputs[0].name = names.fresh(f"{value.name}_float32")
        graph.append(cast)
        for use in users:
            use.node.replace_input_with(use.idx, cast.outputs[0])
        _set_dtype(value, ir.DataType.FLOAT16)
    for i, value in enumerate(list(graph.outputs)):
        if value.name not in record.outputs:
            continue
        name = value.name
        value.name = names.fresh(f"{name}_float32")
        cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT16))],
                       name=names.fresh(f"{name}_to_float16"), num_outputs=1)
        out = cast.outputs[0]
        out.name = name
        _set_dtype(out, ir.DataType.FLOAT16)
        out.shape = value.shape
        graph.append(cast)
        graph.outputs[i] = out
    graph.sort()
    return model
