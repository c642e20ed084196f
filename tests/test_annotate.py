"""Placement rules on small graphs built in code."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from conftest import make_model, tensor, tiny_cnn
from onnxqat.config import QuantSimConfig, load_config
from onnxqat.graph import is_float
from onnxqat.ops import Reason
from onnxqat.passes.annotate import PLACEMENT_RULES, annotate
from onnxqat.sim import prepare_model

f32 = np.float32


def plan_for(proto, config="onnxruntime", **kw):
    model = prepare_model(ir.from_proto(proto))
    return model, annotate(model, load_config(config), **kw)


def rule_ids(plan):
    return {t: r.rule_id for t, r in plan.skipped.items()}


def groups(plan):
    return {q.name: set(q.tensors) for q in plan.activations}


def test_tiny_cnn_placement():
    cfg = load_config("onnxruntime").with_overrides(per_channel_quantization=True)
    model, plan = plan_for(tiny_cnn(), cfg, target="arm64")  # x86 keeps the 4-channel depthwise conv float
    assert groups(plan) == {"x": {"x"}, "r1": {"r1"}, "c2": {"c2"}, "r2": {"r2", "p", "flat"}, "y": {"y"}}
    assert rule_ids(plan)["bn1"] == rule_ids(plan)["a"] == "placement.supergroup_interior"
    axes = {p.name: p.spec.axis for p in plan.params}
    assert axes == {"w1": 0, "w2": 0, "wf": 0}
    assert all(p.spec.symmetric for p in plan.params)
    biases = {b.name: (b.input_quantizer, b.weight_quantizer) for b in plan.biases}
    assert biases == {"b1": ("x", "w1"), "bf": ("r2", "wf")}
    _, x86 = plan_for(tiny_cnn(), cfg, target="x86-avx2")
    assert {p.name for p in x86.params} == {"w1", "wf"} and x86.skipped["w2"].rule_id == "kernel.depthwise_unaligned"


def test_every_float_tensor_is_quantized_or_explained():
    model, plan = plan_for(tiny_cnn(), "aimet")
    quantized = {t for q in plan.activations for t in q.tensors} | {p.name for p in plan.params}
    quantized |= {b.name for b in plan.biases}
    floats = {v.name for v in model.graph.inputs if is_float(v)} | set(model.graph.initializers)
    floats |= {v.name for n in model.graph for v in n.outputs if is_float(v)}
    assert floats == quantized | set(plan.skipped)
    assert not quantized & set(plan.skipped)
    # the aimet preset leaves biases float
    assert plan.biases == () and plan.skipped["bf"].rule_id == "placement.bias_off"
    assert set(rule_ids(plan).values()) <= set(PLACEMENT_RULES)


def test_every_skip_reason_has_a_listed_rule_id_and_readable_detail():
    for proto in (tiny_cnn(), _branches_concat(), _float_only_chain()):
        for config in ("onnxruntime", "aimet"):
            _, plan = plan_for(proto, config)
            for tensor_name, reason in plan.skipped.items():
                assert isinstance(reason, Reason), tensor_name
                assert reason.rule_id in PLACEMENT_RULES or reason.rule_id.startswith("kernel."), reason
                assert str(reason) == reason.detail and reason.detail


def _branches_concat():
    w = np.ones((2, 2, 1, 1), f32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["y"], name="cc"),
    ]
    return make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 2, 4, 4])],
                      {"wa": w, "wb": w * 2, "wc": np.ones((2, 4, 1, 1), f32)})


def test_concat_inputs_and_output_share_one_quantizer():
    _, plan = plan_for(_branches_concat())
    assert {"a", "b", "cat"} in groups(plan).values()


def test_exclusion_by_name_and_type():
    cfg = QuantSimConfig.from_dict({**load_config("onnxruntime").to_dict(), "exclude": {"nodes": ["cb"], "op_types": []}})
    _, plan = plan_for(_branches_concat(), cfg)
    assert plan.skipped["b"].rule_id == "placement.excluded_node" and "'cb'" in str(plan.skipped["b"])
    assert plan.param("wb") is None and plan.param("wa") is not None
    assert not any("b" in q.tensors for q in plan.activations)
    cfg = QuantSimConfig.from_dict({**load_config("onnxruntime").to_dict(), "exclude": {"op_types": ["Concat"]}})
    _, plan = plan_for(_branches_concat(), cfg)
    assert plan.skipped["cat"].rule_id == "placement.excluded_op_type"


def _float_only_chain():
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Erf", ["m1"], ["e"], name="erf"),
        helper.make_node("Tanh", ["e"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2"),
    ]
    rng = np.random.default_rng(0)
    return make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", ["N", 3])],
                      {"w1": rng.normal(size=(4, 4)).astype(f32), "w2": rng.normal(size=(4, 3)).astype(f32)})


def test_onnxruntime_preset_quantizes_only_boundaries_of_float_ops():
    _, plan = plan_for(_float_only_chain())
    assert set(groups(plan)) == {"x", "m1", "t", "y"}
    assert plan.skipped["e"].rule_id == "placement.output_not_quantized"
    _, plan = plan_for(_float_only_chain(), "aimet")
    assert set(groups(plan)) == {"x", "m1", "e", "t", "y"}


def test_weight_axes_per_op():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "wg"], ["g"], name="gemm"),  # transB = 0: [K, N] -> axis 1
        helper.make_node("MatMul", ["g", "wm"], ["m"], name="mm"),  # [K, N] -> axis 1
        helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape"),
        helper.make_node("ConvTranspose", ["r", "wt"], ["y"], name="deconv"),  # [C, M, k, k] -> axis 1
    ]
    proto = make_model(
        nodes, [tensor("x", [2, 4])], [tensor("y", [2, 5, 2, 2])],
        {"wg": rng.normal(size=(4, 6)).astype(f32), "wm": rng.normal(size=(6, 3)).astype(f32),
         "shape": np.array([2, 3, 1, 1], np.int64), "wt": rng.normal(size=(3, 5, 2, 2)).astype(f32)},
    )
    _, plan = plan_for(proto, load_config("onnxruntime").with_overrides(per_channel_quantization=True))
    assert {p.name: p.spec.axis for p in plan.params} == {"wg": 1, "wm": 1, "wt": 1}
    assert "r" in groups(plan)["m"]  # Reshape reuses its input's quantizer


def test_supergroup_needs_a_single_consumer():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["c", "r"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [tensor("x", [1, 1, 3, 3])], [tensor("y", [1, 1, 3, 3])],
                       {"w": np.ones((1, 1, 1, 1), f32)})
    _, plan = plan_for(proto)
    assert "c" in groups(plan)  # two consumers: no supergroup, the Conv output is quantized


def test_model_input_rule_and_node_overrides():
    cfg = QuantSimConfig.from_dict({
        **load_config("onnxruntime").to_dict(),
        "model_input": {"is_input_quantized": False},
        "nodes": {"mm1": {"activation_bw": 16, "param_bw": 4}},
    })
    _, plan = plan_for(_float_only_chain(), cfg)
    # x is still demanded by mm1 (MatMul is_input_quantized), so the input rule yields to it
    assert "x" in groups(plan)
    specs = {q.name: q.spec.bitwidth for q in plan.activations}
    assert specs["m1"] == 16 and specs["t"] == 8
    assert plan.param("w1").spec.bitwidth == 4 and plan.param("w2").spec.bitwidth == 8
    cfg = cfg.with_overrides(op_types={})  # nothing demands x any more
    _, plan = plan_for(_float_only_chain(), cfg)
    assert plan.skipped["x"].rule_id == "placement.model_input"


def test_bitwidths_from_arguments():
    _, plan = plan_for(tiny_cnn(), param_bw=4, activation_bw=16)
    assert {q.spec.bitwidth for q in plan.activations} == {16}
    assert {p.spec.bitwidth for p in plan.params} == {4}


@pytest.mark.parametrize("config", ["onnxruntime", "aimet"])
def test_activation_specs_follow_config_symmetry(config):
    _, plan = plan_for(tiny_cnn(), config)
    assert all(not q.spec.symmetric for q in plan.activations)
    cfg = load_config(config).with_overrides(activation_symmetric=True)
    _, plan = plan_for(tiny_cnn(), cfg)
    assert all(q.spec.symmetric for q in plan.activations)
