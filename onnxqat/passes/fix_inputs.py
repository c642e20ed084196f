"""Fix model inputs to constants and fold the control flow that then has a constant condition.

Models that switch on a configuration input keep their weights inside ``If`` branches (silero-vad
picks its 8 kHz or 16 kHz encoder by the ``sr`` input, every weight a Constant in a branch), so
nothing is visible to quantize. ``--fix-input sr=16000`` makes the input a constant; every ``If``
whose condition is then computable is replaced by the nodes of the branch it takes, and the
branch's constants become the graph's. The result is the model specialised to that input, with
the same values for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, ShapeInferencePass

from onnxqat.errors import ConfigError
from onnxqat.graph import NameScope, is_constant
from onnxqat.passes import TypedInPlacePass
from onnxqat.passes.fold_constants import _evaluate, _pure

__all__ = ["FixInputsPass", "FixInputsResult", "parse_fixed_inputs"]

_MAX_CHAIN = 64  # nodes evaluated to find one If condition


@dataclasses.dataclass
class FixInputsResult(ir.passes.PassResult):
    """Attributes: fixed: inputs made constant; inlined: If nodes replaced by a branch -> which."""

    fixed: tuple[str, ...] = ()
    inlined: dict[str, str] = dataclasses.field(default_factory=dict)


def parse_fixed_inputs(items: list[str] | tuple[str, ...]) -> dict[str, list[float]]:
    """``["sr=16000", "mask=1,1,0"]`` -> ``{"sr": [16000.0], "mask": [1.0, 1.0, 0.0]}``."""
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name or not text:
            raise ConfigError(f"--fix-input {item!r}: expected NAME=VALUE[,VALUE...]")
        try:
            out[name] = [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"--fix-input {item!r}: values must be numbers") from None
    return out


class FixInputsPass(TypedInPlacePass[FixInputsResult]):
    """Make the named graph inputs constants (values cast to the input's dtype and shape), then
    inline every ``If`` whose condition is constant, repeatedly (nested control flow)."""

    def __init__(self, values: Mapping[str, np.ndarray | list[float] | float]) -> None:
        super().__init__()
        self.values = dict(values)

    def ensures(self, model: ir.Model) -> None:
        """No fixed input is a graph input any more (each is an initializer)."""
        left = [v.name for v in model.graph.inputs if v.name in self.values]
        if left:
            raise ir.passes.PostconditionError(f"still graph inputs after fixing them: {left}")

    def call(self, model: ir.Model) -> FixInputsResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        fixed = []
        for name, raw in self.values.items():
            value = inputs.get(name)
            if value is None:
                raise ConfigError(f"--fix-input: the model has no input '{name}' (inputs: {sorted(n for n in inputs if n)})")
            dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
            array = np.asarray(raw, dtype=np.float64)
            shape = value.shape
            if shape is not None and all(isinstance(d, int) for d in shape):
                if array.size != int(np.prod(shape.numpy())):
                    raise ConfigError(f"--fix-input {name}: {array.size} value(s) for an input of shape {list(shape)}")
                array = array.reshape(shape.numpy())
            elif array.size == 1:
                array = array.reshape(())
            array = array.astype(dtype)
            graph.inputs.remove(value)
            value.const_value = ir.tensor(array, name=name)
            value.shape = ir.Shape(array.shape)
            graph.register_initializer(value)
            fixed.append(name)
        inlined: dict[str, str] = {}
        names = NameScope(model)
        changed = True
        while changed:
            changed = False
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            ShapeInferencePass(strict_mode=False)(model)
            for node in list(graph):
                if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
                    continue
                cond = _constant(node.inputs[0], model)
                if cond is None:
                    continue
                branch = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
                _inline(graph, node, node.attributes[branch].as_graph(), names)
                inlined[node.name or "If"] = branch
                changed = True
        return FixInputsResult(model, modified=bool(fixed or inlined), fixed=tuple(fixed), inlined=inlined)


def _constant(value: ir.Value | None, model: ir.Model) -> np.ndarray | None:
    """The value of ``value`` if it depends on constants only (evaluated with onnx's reference)."""
    if value is None:
        return None
    if is_constant(value):
        assert value.const_value is not None
        return value.const_value.numpy()
    cache: dict[int, np.ndarray] = {}
    opset = model.opset_imports.get("", 13)

    def evaluate(v: ir.Value, depth: int) -> np.ndarray | None:
        if is_constant(v):
            assert v.const_value is not None
            return v.const_value.numpy()
        if id(v) in cache:
            return cache[id(v)]
        node = v.producer()
        if node is None or depth > _MAX_CHAIN or not _pure(node):
            return None
        static = _static_shape(node)
        if static is not None:
            cache[id(v)] = static
            return static
        args: list[np.ndarray | None] = []
        for inp in node.inputs:
            if inp is None:
                args.append(None)
                continue
            a = evaluate(inp, depth + 1)
            if a is None:
                return None
            args.append(a)
        temp = ir.Node(node.domain, node.op_type,
                       [None if a is None else ir.Value(name=f"c{i}", const_value=ir.tensor(a)) for i, a in enumerate(args)],
                       attributes=list(node.attributes.values()), num_outputs=len(node.outputs))
        results = _evaluate(temp, opset)
        if results is None:
            return None
        for out, r in zip(node.outputs, results):
            cache[id(out)] = np.asarray(r)
        return cache.get(id(v))

    return evaluate(value, 0)


def _static_shape(node: ir.Node) -> np.ndarray | None:
    """``Shape(x)`` when x's shape is static, or ``Gather(Shape(x), i)`` when dim i is."""
    if node.op_type == "Shape" and node.inputs[0] is not None:
        shape = node.inputs[0].shape
        if shape is not None and all(isinstance(d, int) for d in shape) and not node.attributes:
            return np.asarray(shape.numpy(), np.int64)
    if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[0] is not None:
        shape_node = node.inputs[0].producer()
        index = node.inputs[1]
        if shape_node is not None and shape_node.op_type == "Shape" and not shape_node.attributes \
                and is_constant(index) and shape_node.inputs[0] is not None and shape_node.inputs[0].shape is not None:
            dims = shape_node.inputs[0].shape
            assert index is not None and index.const_value is not None
            i = index.const_value.numpy()
            picked = [dims[int(k)] for k in np.asarray(i).reshape(-1)]
            known = [d for d in picked if isinstance(d, int)]
            if len(known) == len(picked):
                return np.asarray(known, np.int64).reshape(np.shape(i))
    return None


def _inline(graph: ir.Graph, node: ir.Node, branch: ir.Graph, names: NameScope) -> None:
    """Replace ``node`` (an If) by the nodes of ``branch``; its outputs by the branch's outputs.

    Branch values whose names collide with the main graph's get fresh names; a branch output
    computed in the branch takes the If output's name (graph outputs keep their names).
    """
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {v.name for n in graph for v in n.outputs}
    for name, init in list(branch.initializers.items()):
        branch.initializers.pop(name)
        init.name = names.fresh(name) if name in taken else name
        graph.register_initializer(init)
    moved = list(branch)
    for inner in moved:
        branch.remove(inner)
        for out in inner.outputs:
            if out.name and out.name in taken:
                out.name = names.fresh(out.name)
        graph.insert_before(node, inner)
    inner_values = {id(v) for n in moved for v in n.outputs}
    for old, new in zip(node.outputs, list(branch.outputs)):
        out_name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if out_name and id(new) in inner_values:
            old.name = None
            new.name = out_name
    branch.outputs.clear()
    graph.remove(node, safe=True)
