"""Float16 handling never changes a model it was given or the sim's own float model.

onnx-ir's ``clone()`` shares type objects between a model and its copy, so setting
``value.dtype`` on a copy used to retype the original: exporting a float16 sim turned its float
model's interface to float16 (the next ``sim.run`` failed), and simulating an ``ir.Model`` retyped
the caller's model to float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import tiny_cnn
from onnx import TensorProto, numpy_helper

from onnxqat import QuantizationSimModel


def _half_model():
    model = tiny_cnn()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def _dtypes(model: ir.Model) -> list[ir.DataType | None]:
    graph = model.graph
    return [v.dtype for v in [*graph.inputs, *graph.outputs, *graph.initializers.values()]]


def test_export_leaves_the_float16_sim_runnable(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float16)
    sim = QuantizationSimModel(_half_model(), per_channel=True)
    sim.compute_encodings([{"x": x}], progress=False)
    (before,) = sim.run({"x": x})
    sim.export(tmp_path / "a")
    sim.export(tmp_path / "b")
    (after,) = sim.run({"x": x})
    np.testing.assert_array_equal(before, after)
    assert (tmp_path / "a" / "model_qdq.onnx").read_bytes() == (tmp_path / "b" / "model_qdq.onnx").read_bytes()
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_a_float16_ir_model_given_to_the_sim_keeps_its_types():
    model = ir.from_proto(_half_model())
    before = _dtypes(model)
    QuantizationSimModel(model)
    assert _dtypes(model) == before
