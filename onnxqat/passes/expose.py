"""Expose tensors as graph outputs, so one onnxruntime run returns them.

Calibration (the statistics model of a model too big for one protobuf), type inference with
onnxruntime and the trainer's distillation teacher all need intermediate tensors back from a
session; :class:`ExposeValuesPass` is the one way they get them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import onnx_ir as ir

from onnxqat.graph import values_by_name
from onnxqat.passes import TypedInPlacePass

__all__ = ["ExposeValuesPass", "ExposeValuesResult"]


@dataclasses.dataclass
class ExposeValuesResult(ir.passes.PassResult):
    """Attributes:
        exposed: The names made graph outputs, in the order they were appended.
        missing: Names asked for that no graph input, initializer or node output of the model has.
    """

    exposed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


class ExposeValuesPass(TypedInPlacePass[ExposeValuesResult]):
    """Append the values named ``names`` to the graph outputs, in order, each once.

    A name that is already a graph output is left where it is; a name the graph does not have is
    reported in :attr:`ExposeValuesResult.missing`. ``types`` gives a value its dtype and, when the
    shape is not None, its shape, as it becomes an output (for values the graph holds no type for,
    like the outputs of nodes added without inference). Apply it to a clone when the model must
    stay as it is: ``ExposeValuesPass(names)(model.clone()).model``.
    """

    def __init__(self, names: Iterable[str],
                 types: Mapping[str, tuple[ir.DataType | None, ir.Shape | None]] | None = None) -> None:
        super().__init__()
        self.names = tuple(dict.fromkeys(names))
        self.types = dict(types or {})

    def ensures(self, model: ir.Model) -> None:
        """Every asked-for name the graph has is a graph output."""
        graph = model.graph
        values = values_by_name(graph)
        outputs = {v.name for v in graph.outputs}
        absent = [name for name in self.names if name in values and name not in outputs]
        if absent:
            raise ir.passes.PostconditionError(f"not graph outputs after exposing them: {absent[:5]}")

    def call(self, model: ir.Model) -> ExposeValuesResult:
        graph = model.graph
        values = values_by_name(graph)
        existing = {v.name for v in graph.outputs}
        exposed: list[str] = []
        missing: list[str] = []
        typed = False
        for name in self.names:
            value = values.get(name)
            if value is None:
                missing.append(name)
                continue
            if name in self.types:
                dtype, shape = self.types[name]
                if dtype is not None:  # a new type object: clone() shares them between copies
                    value.type = ir.TensorType(dtype)
                if shape is not None:
                    value.shape = shape
                typed = True
            if name not in existing:
                graph.outputs.append(value)
                existing.add(name)
                exposed.append(name)
        return ExposeValuesResult(model, bool(exposed) or typed, tuple(exposed), tuple(missing))
