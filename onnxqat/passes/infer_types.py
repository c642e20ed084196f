"""Fill in element types onnx's shape inference could not find, by asking onnxruntime.

onnx infers nothing past an op it has no schema for (contrib ops such as ``com.microsoft::Gelu``,
custom domains onnxruntime knows), and a value without a dtype is never quantized. onnxruntime
knows its own contrib ops: a session with those values as extra outputs reports their types.
Nothing is run; only the session's output metadata is read.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxruntime as ort

from onnxqat.graph import values_by_name
from onnxqat.runtime import PROTO_LIMIT, model_bytes_size

__all__ = ["InferTypesWithOnnxruntimePass"]

_ORT_TYPES = {
    "tensor(float)": ir.DataType.FLOAT, "tensor(float16)": ir.DataType.FLOAT16,
    "tensor(double)": ir.DataType.DOUBLE, "tensor(bfloat16)": ir.DataType.BFLOAT16,
    "tensor(int64)": ir.DataType.INT64, "tensor(int32)": ir.DataType.INT32,
    "tensor(int8)": ir.DataType.INT8, "tensor(uint8)": ir.DataType.UINT8,
    "tensor(bool)": ir.DataType.BOOL, "tensor(int16)": ir.DataType.INT16,
    "tensor(uint16)": ir.DataType.UINT16, "tensor(string)": ir.DataType.STRING,
}


class InferTypesWithOnnxruntimePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        missing = [v for node in model.graph for v in node.outputs if v.name and v.dtype is None]
        if not missing or model_bytes_size(model) >= PROTO_LIMIT:
            return ir.passes.PassResult(model, False)
        probe = model.clone()
        values = values_by_name(probe.graph)
        outputs = {v.name for v in probe.graph.outputs}
        for v in missing:
            if v.name not in outputs:
                probe.graph.outputs.append(values[v.name])  # type: ignore[index]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(ir.to_proto(probe).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime cannot load it either: leave the types unknown
            return ir.passes.PassResult(model, False)
        found = {o.name: _ORT_TYPES.get(o.type) for o in session.get_outputs()}
        modified = False
        for v in missing:
            dtype = found.get(v.name)  # type: ignore[arg-type]
            if dtype is not None:
                v.dtype = dtype
                modified = True
        return ir.passes.PassResult(model, modified)
