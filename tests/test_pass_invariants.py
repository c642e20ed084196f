"""The invariants passes state in their docstrings, checked by their ``requires``/``ensures`` hooks.

A violated precondition raises onnx-ir's ``PreconditionError`` before the pass runs; a pass that
breaks its own promise raises ``PostconditionError``. The failing sides use passes whose ``call``
does nothing (the hooks are the ones of the real pass), so each check is shown to fire.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import make_model, tensor
from onnxqat.graph import first_unsorted
from onnxqat.passes.canonicalize import UpgradeOpsetPass, UpgradeOpsetResult
from onnxqat.passes.expose import ExposeValuesPass, ExposeValuesResult
from onnxqat.passes.fix_inputs import FixInputsPass, FixInputsResult
from onnxqat.passes.float16 import Float16Result, Float16ToFloat32Pass
from onnxqat.passes.pack_int4 import PackInt4Pass
from onnxqat.passes.shapes import ConcreteShapesPass, ConcreteShapesResult
from onnxqat.train.decompose import DecomposeForTrainingPass

f32 = np.float32


def chain(opset: int = 13, dtype: int = TensorProto.FLOAT) -> ir.Model:
    """x -> Relu (a) -> Neg (b) -> Mul(w) (y), w a [3] constant."""
    w = np.array([1.0, 2.0, 3.0], np.float16 if dtype == TensorProto.FLOAT16 else f32)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"), helper.make_node("Neg", ["a"], ["b"], name="neg"),
             helper.make_node("Mul", ["b", "w"], ["y"], name="mul")]
    return ir.from_proto(make_model(nodes, [tensor("x", ["n", 3], dtype)], [tensor("y", ["n", 3], dtype)], {"w": w},
                                    opset=opset))


def unsorted(model: ir.Model) -> ir.Model:
    first = next(iter(model.graph))
    model.graph.remove(first)
    model.graph.append(first)  # Neg now reads Relu's output before Relu runs
    return model


def test_first_unsorted_names_the_node_that_reads_ahead():
    model = chain()
    assert first_unsorted(model.graph) is None
    assert first_unsorted(unsorted(model).graph).name == "neg"
    model.graph.sort()
    assert first_unsorted(model.graph) is None


def test_decompose_requires_a_sorted_graph():
    with pytest.raises(ir.passes.PreconditionError, match="not topologically sorted: node 'neg'"):
        DecomposeForTrainingPass()(unsorted(chain()))
    result = DecomposeForTrainingPass()(chain())  # sorted: runs (nothing to rewrite here)
    assert result.rewritten == {}


class _Untouched:
    """Mixin: the pass's hooks, but ``call`` changes nothing."""

    def call(self, model: ir.Model):
        return self.result(model)


def test_upgrade_opset_ensures_the_target_opset():
    model = UpgradeOpsetPass(13)(chain(opset=11)).model
    assert model.opset_imports[""] == 13

    class NoUpgrade(_Untouched, UpgradeOpsetPass):
        def result(self, model):
            return UpgradeOpsetResult(model, False, 11, 11)

    with pytest.raises(ir.passes.PostconditionError, match="opset is 11 after upgrading to 13"):
        NoUpgrade(13)(chain(opset=11))


def test_float16_pass_ensures_no_float16_is_left():
    model = Float16ToFloat32Pass()(chain(dtype=TensorProto.FLOAT16)).model
    assert all(v.dtype == ir.DataType.FLOAT for v in [*model.graph.inputs, *model.graph.initializers.values()])

    class NoCast(_Untouched, Float16ToFloat32Pass):
        def result(self, model):
            return Float16Result(model, False)

    with pytest.raises(ir.passes.PostconditionError, match="still float16"):
        NoCast()(chain(dtype=TensorProto.FLOAT16))


def test_expose_ensures_the_values_are_outputs():
    model = ExposeValuesPass(["a", "nope"])(chain()).model
    assert [v.name for v in model.graph.outputs] == ["y", "a"]

    class NoExpose(_Untouched, ExposeValuesPass):
        def result(self, model):
            return ExposeValuesResult(model, False)

    with pytest.raises(ir.passes.PostconditionError, match=r"not graph outputs after exposing them: \['a'\]"):
        NoExpose(["a", "nope"])(chain())


def test_fix_inputs_ensures_the_inputs_became_constants():
    model = FixInputsPass({"x": [0.5, -1.0, 2.0] * 2})(_static(chain())).model
    assert [v.name for v in model.graph.inputs] == [] and "x" in model.graph.initializers

    class NoFix(_Untouched, FixInputsPass):
        def result(self, model):
            return FixInputsResult(model, False)

    with pytest.raises(ir.passes.PostconditionError, match=r"still graph inputs after fixing them: \['x'\]"):
        NoFix({"x": [0.5] * 6})(_static(chain()))


def _static(model: ir.Model) -> ir.Model:
    model.graph.inputs[0].shape = ir.Shape([2, 3])
    return model


def test_concrete_shapes_ensures_the_feed_shapes():
    feed = {"x": np.ones((4, 3), f32)}
    model = ConcreteShapesPass(feed)(chain()).model
    assert model.graph.inputs[0].shape == ir.Shape([4, 3])

    class NoShapes(_Untouched, ConcreteShapesPass):
        def result(self, model):
            return ConcreteShapesResult(model, False)

    with pytest.raises(ir.passes.PostconditionError, match=r"input 'x' has shape \[n,3\], the feed \[4, 3\]"):
        NoShapes(feed)(chain())


def test_pack_int4_ensures_an_ir_version_with_4bit_types():
    model = chain()
    w = model.graph.initializers["w"]
    w.const_value = ir.Tensor(np.array([1, -2, 3], np.int8), dtype=ir.DataType.INT4, name="w")
    model.ir_version = 9  # a 4-bit initializer in a model that cannot hold one
    with pytest.raises(ir.passes.PostconditionError, match="4-bit initializer 'w' in a model of IR version 9"):
        PackInt4Pass(frozenset())(model)
    model.ir_version = 10
    PackInt4Pass(frozenset())(model)
