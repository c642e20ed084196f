"""Shapes and element types of every value: onnx's shape inference, then onnxruntime for the rest.

:class:`InferShapesPass` runs onnx's shape inference and merges what it found into the model
(onnx-ir's ``ShapeInferencePass``, in time linear in the model size).

onnx infers nothing past an op it has no schema for (contrib ops such as ``com.microsoft::Gelu``,
custom domains onnxruntime knows), and a value without a dtype is never quantized. onnxruntime
knows its own contrib ops: :class:`InferTypesWithOnnxruntimePass` builds a session with those
values as extra outputs and reads their types. Nothing is run; only the session's output metadata
is read.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx
import onnx_ir as ir

from onnxqat.runtime import ort
from onnxqat.graph import call_with_light_proto
from onnxqat.passes import TypedInPlacePass
from onnxqat.passes.expose import ExposeValuesPass
from onnxqat.runtime import fits_in_proto

__all__ = ["InferShapesPass", "InferShapesResult", "InferTypesResult", "InferTypesWithOnnxruntimePass"]

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": ir.DataType.FLOAT, "tensor(float16)": ir.DataType.FLOAT16,
    "tensor(double)": ir.DataType.DOUBLE, "tensor(bfloat16)": ir.DataType.BFLOAT16,
    "tensor(int64)": ir.DataType.INT64, "tensor(int32)": ir.DataType.INT32,
    "tensor(int8)": ir.DataType.INT8, "tensor(uint8)": ir.DataType.UINT8,
    "tensor(bool)": ir.DataType.BOOL, "tensor(int16)": ir.DataType.INT16,
    "tensor(uint16)": ir.DataType.UINT16, "tensor(string)": ir.DataType.STRING,
}


@dataclasses.dataclass
class InferShapesResult(ir.passes.PassResult):
    """Attributes: error: Why onnx's shape inference failed (the model is then unchanged), or None."""

    error: str | None = None


class InferShapesPass(TypedInPlacePass[InferShapesResult]):
    """Set the shapes and dtypes onnx's shape inference finds (leaves the model as it is if
    inference fails).

    Args:
        check_type, strict_mode, data_prop: As for ``onnx.shape_inference.infer_shapes``.
    """

    def __init__(self, *, check_type: bool = True, strict_mode: bool = False, data_prop: bool = True) -> None:
        super().__init__()
        self.check_type = check_type
        self.strict_mode = strict_mode
        self.data_prop = data_prop

    def call(self, model: ir.Model) -> InferShapesResult:
        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(
                proto, check_type=self.check_type, strict_mode=self.strict_mode, data_prop=self.data_prop
            )

        try:
            inferred = call_with_light_proto(infer, model)
        except Exception as e:  # onnx raises several error types; the model stays as it is
            logger.warning("Shape inference failed: %s. Model is left unchanged", e)
            return InferShapesResult(model, False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        if _has_subgraphs(inferred.graph):
            return InferShapesResult(model, _merge_inferred(model, ir.serde.deserialize_model(inferred)))
        return InferShapesResult(model, _merge_inferred_flat(model.graph, inferred.graph))


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(attr.type in graph_types for node in graph.node for attr in node.attribute)


def _merge_inferred_flat(graph: ir.Graph, inferred: onnx.GraphProto) -> bool:
    """:func:`_merge_inferred` for a graph without subgraphs, reading the inferred types straight
    from the protobuf instead of deserializing the whole inferred model (which costs more than
    the inference itself).

    The value infos apply as deserialization applies them: a graph input's from the inputs, a
    node output's from ``value_info``, then a graph output's from the outputs, last one winning.
    """
    produced = {name for node in inferred.node for name in node.output if name}
    infos: dict[str, onnx.ValueInfoProto] = {info.name: info for info in inferred.input}
    infos.update((info.name, info) for info in inferred.value_info if info.name in produced)
    infos.update((info.name, info) for info in inferred.output)
    known = produced | infos.keys() | {t.name for t in inferred.initializer}
    known.update(name for node in inferred.node for name in node.input if name)
    modified = False
    # Most values share a few types: deserialize each distinct TypeProto once. The shapes are
    # frozen (immutable), so values may share one.
    types: dict[bytes, tuple[ir.Shape | None, ir.DataType | None]] = {}
    for name, value in ir.convenience.create_value_mapping(graph).items():
        info = infos.get(name)
        if info is None:
            if name not in known:
                logger.warning("Value %s not found in inferred graph %s", name, inferred.name)
            continue
        key = info.type.SerializeToString()
        found = types.get(key)
        if found is None:
            type_ = ir.serde.deserialize_type_proto_for_type(info.type)
            found = types[key] = (ir.serde.deserialize_type_proto_for_shape(info.type),
                                  type_.dtype if type_ is not None else None)
        shape, dtype = found
        if shape is not None and value.shape != shape:
            value.shape = shape
            modified = True
        if dtype is not None and value.dtype != dtype:
            value.dtype = dtype
            modified = True
    return modified


def _merge_inferred(model: ir.Model, inferred: ir.Model) -> bool:
    """Copy every known shape and dtype of ``inferred`` onto the same-named values of ``model``,
    graph by graph (subgraphs included)."""
    modified = False
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
        found = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            source = found.get(name)
            if source is None:
                logger.warning("Value %s not found in inferred graph %s", name, inferred_graph.name)
                continue
            if source.shape is not None and value.shape != source.shape:
                value.shape = source.shape
                modified = True
            if source.dtype is not None and value.dtype != source.dtype:
                value.dtype = source.dtype
                modified = True
    return modified


@dataclasses.dataclass
class InferTypesResult(ir.passes.PassResult):
    """Attributes: typed: each value whose dtype onnxruntime supplied -> that dtype."""

    typed: dict[str, ir.DataType] = dataclasses.field(default_factory=dict)


class InferTypesWithOnnxruntimePass(TypedInPlacePass[InferTypesResult]):
    """Dtypes onnx's inference left unknown, read from an onnxruntime session's output metadata."""

    def call(self, model: ir.Model) -> InferTypesResult:
        missing = [v for node in model.graph for v in node.outputs if v.name and v.dtype is None]
        if not missing or not fits_in_proto(model):
            return InferTypesResult(model, False)
        probe = ExposeValuesPass([v.name for v in missing if v.name])(model.clone()).model
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(ir.to_proto(probe).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime cannot load it either: leave the types unknown
            return InferTypesResult(model, False)
        found = {o.name: _ORT_TYPES.get(o.type) for o in session.get_outputs()}
        typed: dict[str, ir.DataType] = {}
        for v in missing:
            dtype = found.get(v.name)
            if dtype is not None and v.name:
                v.dtype = dtype
                typed[v.name] = dtype
        return InferTypesResult(model, bool(typed), typed)
