"""Concrete shapes for every value of a graph, from the shapes of one batch.

onnxruntime-training builds some gradient kernels from the *static* shapes recorded in the graph:
``AveragePoolGrad``, for one, sizes its output from the forward input's declared shape, so a
symbolic batch dimension becomes 0, the gradient is empty, and the next ``ConvGrad`` divides by
zero (SIGFPE: the tf2onnx open-nsfw model died so). Training graphs are therefore built with every
shape concrete, taken from the first training batch.

onnx shape inference resolves most values once the inputs are fixed; shapes computed at run time
(``Shape -> Range -> Expand`` chains of transformer and detector exports) stay open. For those, one
float run of the model on the batch with onnxruntime's profiler on records the output shape of
every node without keeping any tensor alive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxqat.runtime import ort
from onnxqat.graph import NameScope, name_of
from onnxqat.passes import TypedInPlacePass

__all__ = ["ConcreteShapesPass", "ConcreteShapesResult", "is_static"]


def is_static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


@dataclasses.dataclass
class ConcreteShapesResult(ir.passes.PassResult):
    """Result of :class:`ConcreteShapesPass`.

    Attributes:
        from_inference: Values whose shape onnx shape inference found.
        from_run: Values whose shape came from the profiled run.
        unresolved: Float or integer values still without a static shape (e.g. produced inside a
            control-flow body); empty when every value is static.
    """

    from_inference: int = 0
    from_run: int = 0
    unresolved: tuple[str, ...] = ()


class ConcreteShapesPass(TypedInPlacePass[ConcreteShapesResult]):
    """Fix the graph inputs to ``feed``'s shapes and give every node output a static shape.

    Args:
        feed: One batch, ``{input name: array}``; its shapes become the graph's, and it is run
            once (float, profiler on) when inference leaves shapes open.
    """

    def __init__(self, feed: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.feed = dict(feed)

    def ensures(self, model: ir.Model) -> None:
        """The graph inputs in ``feed`` have its shapes."""
        for value in model.graph.inputs:
            if value.name in self.feed and value.shape != ir.Shape(np.shape(self.feed[value.name])):
                raise ir.passes.PostconditionError(f"input '{value.name}' has shape {value.shape}, the feed "
                                                   f"{list(np.shape(self.feed[value.name]))}")

    def call(self, model: ir.Model) -> ConcreteShapesResult:
        graph = model.graph
        for value in graph.inputs:
            if value.name in self.feed:
                value.shape = ir.Shape(np.shape(self.feed[value.name]))
        outputs = [out for node in graph for out in node.outputs]
        for out in outputs:
            out.shape = None
        ShapeInferencePass(strict_mode=False)(model)
        open_values = [out for out in outputs if not is_static(out.shape)]
        inferred = len(outputs) - len(open_values)
        from_run = 0
        if open_values:
            shapes = _profiled_shapes(model, self.feed)
            for out in open_values:
                shape = shapes.get(name_of(out))
                if shape is not None:
                    out.shape = ir.Shape(shape)
                    from_run += 1
        unresolved = tuple(out.name for out in outputs if not is_static(out.shape) and out.name)
        return ConcreteShapesResult(model, modified=True, from_inference=inferred, from_run=from_run,
                                    unresolved=unresolved)


def _profiled_shapes(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Output shapes of every node on one float run, from onnxruntime's profile."""
    clone = model.clone()
    names = NameScope(clone)
    by_node: dict[str, list[str]] = {}
    for node in clone.graph:
        if not node.name or node.name in by_node:
            node.name = names.fresh(f"{node.op_type}_node")
        by_node[node.name] = [out.name or "" for out in node.outputs]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="onnxqat-shapes-") as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(ir.to_proto(clone).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feed.items() if k in inputs})
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    shapes: dict[str, tuple[int, ...]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node_name = event["name"][: -len("_kernel_time")]
        outs = by_node.get(node_name)
        if outs is None:
            continue
        for name, typed in zip(outs, event.get("args", {}).get("output_type_shape", [])):
            dims = next(iter(typed.values()), None) if isinstance(typed, dict) else None
            if name and isinstance(dims, list):
                shapes[name] = tuple(int(d) for d in dims)
    return shapes
