"""Small helpers over onnx-ir graphs shared by the passes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "FLOAT_TYPES",
    "NameScope",
    "all_graphs",
    "array_tensor",
    "call_with_light_proto",
    "const_array",
    "first_unsorted",
    "require_const",
    "is_constant",
    "is_float",
    "make_initializer",
    "name_of",
    "opset_version",
    "remove_dead_nodes",
    "values_by_name",
]

_R = TypeVar("_R")

# Initializers above this many bytes are left out of the protobuf handed to onnx's C API.
_LIGHT_PROTO_TENSOR_BYTES = 1000

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def name_of(item: ir.Value | ir.Node | None) -> str:
    """The name of a value or node, which must exist and be named (those in a graph are: onnx-ir
    names them when they are added). A missing value or name here is a bug, not a user error."""
    if item is None:
        raise RuntimeError("internal error: expected a value, got a missing (None) input")
    name = item.name
    if name is None:
        raise RuntimeError(f"internal error: {item!r} has no name")
    return name


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def is_constant(value: ir.Value | None) -> bool:
    """True for initializers (also those listed as graph inputs in old IR versions)."""
    return value is not None and value.const_value is not None and value.producer() is None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant tensor, or None."""
    if not is_constant(value):
        return None
    assert value is not None and value.const_value is not None
    return value.const_value.numpy()


def require_const(value: ir.Value | None) -> np.ndarray:
    """:func:`const_array` of a value that must be a constant (a weight); anything else is a bug."""
    array = const_array(value)
    if array is None:
        raise RuntimeError(f"internal error: {value!r} is not a constant")
    return array


def all_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.as_graph()
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.as_graphs()


def first_unsorted(graph: ir.Graph) -> ir.Node | None:
    """The first node of ``graph`` that reads a value produced by a later node, or None when the
    graph is topologically sorted (values from outside the graph, as in subgraphs, count as given)."""
    later = {id(v) for node in graph for v in node.outputs}
    for node in graph:
        if any(v is not None and id(v) in later for v in node.inputs):
            return node
        later.difference_update(id(v) for v in node.outputs)
    return None


def opset_version(model: ir.Model, domain: str = "") -> int:
    return int(model.opset_imports.get(domain, 0))


class NameScope:
    """Fresh names that collide with no value or node name anywhere in the model."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        # Per base, the suffix to try first: names are only ever added to ``_taken``, so the first
        # free ``base_<i>`` never moves back and repeated bases cost O(1) each, not O(calls).
        self._next: dict[str, int] = {}
        for graph in all_graphs(model.graph):
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers)
            for node in graph:
                if node.name:
                    self._taken.add(node.name)
                self._taken.update(v.name for v in node.outputs if v.name)
                self._taken.update(v.name for v in node.inputs if v is not None and v.name)

    def fresh(self, base: str) -> str:
        """``base`` if free, else the first free ``base_<i>`` (i = 1, 2, ...); reserved from now on."""
        i = self._next.get(base, 0)
        name = base if i == 0 else f"{base}_{i}"
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._next[base] = i
        self._taken.add(name)
        return name

    def reserve(self, names: Iterable[str]) -> None:
        self._taken.update(names)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph`` (inputs, initializers, node outputs) by name."""
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def array_tensor(array: np.ndarray, name: str | None = None) -> ir.TensorProtocol:
    """``ir.tensor(array, name=name)``, without its isinstance checks against runtime-checkable
    protocols for numpy arrays and scalars (they cost ~10x the tensor itself, per initializer)."""
    if isinstance(array, np.generic):  # a numpy scalar (np.float32(...)): its 0-d array, same values
        array = np.asarray(array)
    if type(array) is np.ndarray:
        return ir.Tensor(array, name=name)
    return ir.tensor(array, name=name)


def make_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer holding ``array`` (name must be fresh)."""
    value = ir.Value(
        name=name,
        const_value=array_tensor(array, name=name),
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
    )
    graph.register_initializer(value)
    return value


def remove_dead_nodes(graph: ir.Graph) -> None:
    """Drop nodes no graph output depends on, then unused initializers.

    Unlike onnx-ir's RemoveUnusedNodesPass, live nodes keep all their output slots (training
    gradient builders read optional outputs such as SoftmaxCrossEntropyLoss's log-probabilities),
    and values read by subgraphs from the outer scope count as used.
    """
    live: set[int] = set()
    stack = [v.producer() for v in graph.outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None)
        for attr in node.attributes.values():
            subgraphs = (
                [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH
                else attr.as_graphs() if attr.type == ir.AttributeType.GRAPHS else []
            )
            for sub in subgraphs:
                inner = {id(v) for n in sub for v in n.outputs} | {id(v) for v in sub.inputs}
                stack.extend(v.producer() for n in ir.traversal.RecursiveGraphIterator(sub)
                             for v in n.inputs if v is not None and id(v) not in inner)
    dead = [node for node in graph if id(node) not in live]
    if dead:
        graph.remove(dead, safe=True)  # one call: each call scans the graph outputs
    used = {v.name for n in ir.traversal.RecursiveGraphIterator(graph) for v in n.inputs if v is not None}
    used |= {v.name for v in graph.outputs}
    for name in [n for n in graph.initializers if n not in used]:
        graph.initializers.pop(name)


def call_with_light_proto(func: Callable[[onnx.ModelProto], _R], model: ir.Model) -> _R:
    """``func`` of the model's protobuf with initializers turned into typed graph inputs and the
    data of those over 1 kB left out (what onnx's shape inference and version converter need).

    The model is unchanged afterwards except that initializers without a shape or dtype get the
    ones of their tensor, and initializers that were left out move to the end of the initializer
    order (as with onnx-ir's ``call_onnx_api``, which this replaces: it checks membership in the
    graph inputs list once per initializer, quadratic for models with many weights).
    """
    graph = model.graph
    initializers = list(graph.initializers.values())
    tensors = [v.const_value for v in initializers]
    inputs = list(graph.inputs)
    listed = {id(v) for v in inputs}
    for value, tensor in zip(initializers, tensors):
        if tensor is not None:
            if value.shape is None:
                shape = tensor.shape  # a tensor's shape is static: an ir.Shape, or ints
                value.shape = shape if isinstance(shape, ir.Shape) else ir.Shape(shape.numpy())
            if value.dtype is None:
                value.dtype = tensor.dtype
        if id(value) not in listed:
            graph.inputs.append(value)
        if tensor is None or tensor.nbytes > _LIGHT_PROTO_TENSOR_BYTES:
            value.const_value = None
            graph.initializers.pop(name_of(value))
    try:
        return func(ir.serde.serialize_model(model))
    finally:
        for value, tensor in zip(initializers, tensors):
            value.const_value = tensor
            if value.name not in graph.initializers:
                graph.initializers.add(value)
        graph.inputs.clear()
        graph.inputs.extend(inputs)
