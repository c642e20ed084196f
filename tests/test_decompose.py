"""Decompositions for training: forward equal to onnxruntime's native op, gradients equal to
central differences of the native op, and the pass's findings.

Tolerances (float32):

* ``exact``: bit-identical (NaN equals NaN). Data movement, the same op with other attributes,
  stop-gradient forms and ``bit_exact=True``.
* ``ulps(k)``: at most ``k`` units in the last place per element. Elementwise rules made of
  ``exp``/``log``/``tanh``: each native kernel rounds once, the rewrite rounds once per op, and
  onnxruntime's vectorised ``Exp``/``Log`` differ from the scalar ``std::exp`` in its activation
  kernels by up to 1-2 ulps.
* ``scale(k)``: ``|got - want| <= k * eps * max|want|``. Rules that re-associate sums
  (normalizations, interpolation as MatMul, convolution order): per-element ulps are meaningless
  where the result cancels to near 0, while the error of a re-associated sum of ``n`` terms is
  bounded by ``n * eps * sum|terms|`` and in practice a few ``eps`` of the output scale.

Gradients: onnxruntime-training's gradient of ``L = sum(w * y)`` through the decomposed graph
against central differences of the *native* op, element by element, with ``L`` accumulated in
float64 from float32 outputs. The difference quotient's rounding error is about
``eps * sum|w * dy| / h``; points are drawn away from kinks by more than ``h``. Linear ops use
``h = 1`` (exact up to rounding), others ``h = 1e-3`` (truncation ``~h^2``); the tolerance is
``2e-3`` of the gradient's scale for ``h = 1e-3`` and ``1e-5`` for ``h = 1``, well below what a
wrong formula gives (errors of order 1).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxqat.train.builder import Builder
from onnxqat.train.decompose import (
    DECOMPOSITIONS,
    DecomposeForTrainingPass,
    DecomposeResult,
    exact_stop_gradient,
    with_derivative,
)
from onnxqat.train.ort_training import training_modules

EPS = float(np.finfo(np.float32).eps)
F = np.float32


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def one_node(op: str, data: Mapping[str, np.ndarray], consts: Mapping[str, np.ndarray] = {}, attrs: Mapping[str, Any] = {},
             opset: int = 17, order: Sequence[str] | None = None, outputs: int = 1) -> onnx.ModelProto:
    """``y = op(x + p, ...)``: data inputs are graph inputs plus trainable zero initializers ``p_<name>``."""
    nodes, inputs, inits = [], [], []
    for name, array in data.items():
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
        inits.append(numpy_helper.from_array(np.zeros_like(array), f"p_{name}"))
        nodes.append(helper.make_node("Add", [name, f"p_{name}"], [f"a_{name}"], name=f"add_{name}"))
    inits += [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()]
    order = list(order) if order is not None else list(data) + list(consts)
    names = [(f"a_{n}" if n in data else n) for n in order]
    outs = [f"y{k}" for k in range(outputs)]
    nodes.append(helper.make_node(op, names, outs, name="node", **attrs))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset > 18 else 8)
    return onnx.shape_inference.infer_shapes(model)


def decompose(model: onnx.ModelProto, **options: Any) -> tuple[onnx.ModelProto, DecomposeResult]:
    result = DecomposeForTrainingPass(**options)(ir.from_proto(model))
    assert isinstance(result, DecomposeResult)
    return ir.to_proto(result.model), result


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ulps(got: np.ndarray, want: np.ndarray) -> int:
    """Largest distance in units in the last place (NaN == NaN, +0 == -0)."""
    a = np.asarray(got, F).reshape(-1).view(np.int32).astype(np.int64)
    b = np.asarray(want, F).reshape(-1).view(np.int32).astype(np.int64)
    a = np.where(a < 0, -(a & 0x7FFFFFFF), a)
    b = np.where(b < 0, -(b & 0x7FFFFFFF), b)
    nan = np.isnan(np.asarray(got, F).reshape(-1)) & np.isnan(np.asarray(want, F).reshape(-1))
    return int(np.max(np.where(nan, 0, np.abs(a - b)), initial=0))


def assert_forward(got: np.ndarray, want: np.ndarray, tol: tuple[str, float]) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    kind, k = tol
    if kind == "exact":
        assert ulps(got, want) == 0, f"not bit-exact: {ulps(got, want)} ulps"
    elif kind == "ulps":
        assert ulps(got, want) <= k, f"{ulps(got, want)} ulps > {k}"
    else:
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite)
        scale = float(np.max(np.abs(want[finite]), initial=0.0))
        err = float(np.max(np.abs(got[finite].astype(np.float64) - want[finite]), initial=0.0))
        assert err <= k * EPS * scale, f"error {err:.3g} > {k} eps of the output scale {scale:.3g}"


def training_gradients(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], weights: Sequence[np.ndarray],
                       extra: bool = False, trained: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """d/dx of ``sum_k sum(w_k * y_k)`` (plus ``sum(x)`` per input if ``extra``) in onnxruntime-training,
    through the parameters ``p_<x>`` of the inputs ``trained`` (default: every feed)."""
    trained = list(feeds) if trained is None else list(trained)
    artifacts, api = training_modules()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    terms = []
    for k, (out, w) in enumerate(zip(list(g.output), weights)):
        g.initializer.append(numpy_helper.from_array(w, f"w{k}"))
        g.node.append(helper.make_node("Mul", [out.name, f"w{k}"], [f"m{k}"]))
        g.node.append(helper.make_node("ReduceSum", [f"m{k}"], [f"s{k}"], keepdims=0))
        terms.append(f"s{k}")
    if extra:
        for name in trained:
            g.node.append(helper.make_node("ReduceSum", [f"a_{name}"], [f"e_{name}"], keepdims=0))
            terms.append(f"e_{name}")
    total = terms[0]
    for k, t in enumerate(terms[1:]):
        g.node.append(helper.make_node("Add", [total, t], [f"t{k}"]))
        total = f"t{k}"
    g.node.append(helper.make_node("Identity", [total], ["loss"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    params = [f"p_{n}" for n in trained]
    with tempfile.TemporaryDirectory() as folder:
        artifacts.generate_artifacts(m, requires_grad=params, frozen_params=[], loss=None, optimizer=None,
                                     artifact_directory=folder)
        state = api.CheckpointState.load_checkpoint(f"{folder}/checkpoint")
        module = api.Module(f"{folder}/training_model.onnx", state, f"{folder}/eval_model.onnx")
        module.train()
        module(*[feeds[i.name] for i in g.input])
        return {n: np.array(state.parameters[f"p_{n}"].grad, np.float64) for n in trained}


def numeric_gradients(native: onnx.ModelProto, feeds: Mapping[str, np.ndarray], weights: Sequence[np.ndarray],
                      h: float) -> dict[str, np.ndarray]:
    """Central differences of ``sum(w * y)`` of the native op, element by element (float64 sums)."""
    run = session(native)

    def loss(f: Mapping[str, np.ndarray]) -> float:
        return sum(float(np.sum(np.asarray(y, np.float64) * w)) for y, w in zip(run.run(None, dict(f)), weights))

    grads = {}
    for name, x in feeds.items():
        g = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[idx] += h
            down[idx] -= h
            g[idx] = (loss({**feeds, name: up}) - loss({**feeds, name: down})) / (2 * h)
        grads[name] = g
    return grads


def away(rng: np.random.Generator, *shape: int, lo: float = 0.2, hi: float = 1.5) -> np.ndarray:
    """Magnitudes in [lo, hi] with random signs: more than h away from kinks at 0."""
    return (rng.uniform(lo, hi, shape) * np.where(rng.random(shape) < 0.5, -1, 1)).astype(F)


def grid(rng: np.random.Generator, *shape: int, shift: float = 0.0125) -> np.ndarray:
    """Distinct values 0.05 apart (no ties, so max-like ops are differentiable at them)."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n // 2) * 0.05 + shift).reshape(shape).astype(F)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """A decomposition test: random data (away from kinks) and edge data (for the forward only)."""

    id: str
    op: str
    data: Mapping[str, np.ndarray]
    consts: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    opset: int = 17
    order: Sequence[str] | None = None
    forward: tuple[str, float] = ("exact", 0)
    h: float = 1e-3
    edge: Mapping[str, np.ndarray] | None = None
    zero_grad: bool = False  # the gradient must be exactly 0 (rounding, sign)
    identity_grad: bool = False  # straight-through: the gradient is the incoming one
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


EDGE = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-45, 3.0, -3.0, 2.5, -2.5, 1.0, -1.0, 0.5, -0.5, 88.0, -88.0, 100.0,
                 -100.0, 1e30, -1e30, np.inf, -np.inf], F)


def _cases() -> list[Case]:
    r = np.random.default_rng(0)
    x = away(r, 2, 3, 4)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    f32 = lambda *v: np.array(v, F)  # noqa: E731
    cases = [
        Case("HardSigmoid", "HardSigmoid", {"x": x}, edge={"x": EDGE}),
        Case("HardSigmoid-1/6", "HardSigmoid", {"x": x}, attrs={"alpha": 1 / 6, "beta": 0.5}, edge={"x": EDGE}),
        Case("HardSigmoid-0.3,0.4", "HardSigmoid", {"x": x}, attrs={"alpha": 0.3, "beta": 0.4},
             edge={"x": np.concatenate([EDGE, f32(-4 / 3, 2.0)])}),
        Case("HardSwish", "HardSwish", {"x": away(r, 2, 3, 4, hi=2.9)}, forward=("ulps", 1), edge={"x": EDGE}),
        Case("PRelu", "PRelu", {"x": away(r, 2, 3, 4, 4), "s": r.uniform(0.05, 0.5, (3, 1, 1)).astype(F)}),
        Case("PRelu-scalar-slope", "PRelu", {"x": away(r, 2, 3), "s": f32(0.25)}),
        Case("Elu", "Elu", {"x": x}, forward=("ulps", 2), edge={"x": EDGE}),
        Case("Elu-alpha", "Elu", {"x": x}, attrs={"alpha": 0.3}, forward=("ulps", 2), edge={"x": EDGE}),
        Case("Selu", "Selu", {"x": x}, forward=("ulps", 2), edge={"x": EDGE}),
        Case("Celu", "Celu", {"x": x}, attrs={"alpha": 0.7}, forward=("ulps", 2), edge={"x": EDGE}),
        Case("Softplus", "Softplus", {"x": x}, forward=("ulps", 4), edge={"x": EDGE}),
        Case("Softsign", "Softsign", {"x": x}, forward=("ulps", 1), edge={"x": EDGE}),
        Case("Mish", "Mish", {"x": x}, opset=18, forward=("ulps", 4), edge={"x": EDGE}),
        Case("ThresholdedRelu", "ThresholdedRelu", {"x": away(r, 2, 3, 4, lo=1.1, hi=2.0)}, edge={"x": EDGE}),
        Case("Shrink", "Shrink", {"x": away(r, 2, 3, 4, lo=0.4)}, attrs={"lambd": 0.3, "bias": 0.1}, edge={"x": EDGE}),
        Case("Sum", "Sum", {"a": grid(r, 2, 3, 4), "b": grid(r, 3, 4), "c": grid(r, 2, 3, 4)}),
        Case("Sum-1", "Sum", {"a": grid(r, 2, 3)}),
        Case("Mean", "Mean", {"a": grid(r, 2, 3, 4), "b": grid(r, 3, 4), "c": grid(r, 2, 3, 4)}, forward=("ulps", 1)),
        Case("Clip-6", "Clip", {"x": r.uniform(-1, 1, (2, 3, 4)).astype(F)}, attrs={"min": -0.45, "max": 0.55}, opset=10,
             edge={"x": EDGE}),
        Case("Clip-11", "Clip", {"x": r.uniform(-1, 1, (2, 3, 4)).astype(F)}, {"lo": f32(-0.45), "hi": f32(0.55)},
             opset=11, edge={"x": EDGE}),
        Case("Clip-11-max-only", "Clip", {"x": r.uniform(-1, 1, (2, 3, 4)).astype(F)}, {"hi": f32(0.55)}, opset=11,
             order=["x", "", "hi"], edge={"x": EDGE}),
        Case("Clip-11-min>max", "Clip", {"x": r.uniform(-1, 1, (2, 3, 4)).astype(F)}, {"lo": f32(0.5), "hi": f32(-0.5)},
             opset=11, edge={"x": EDGE}),
    ]
    for op in ("Round", "Floor", "Ceil", "Sign"):
        half = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 1e10, -0.0, 0.0, 4e-45, np.inf, -np.inf, np.nan], F)
        cases.append(Case(op, op, {"x": away(r, 2, 3, lo=0.1, hi=0.4) + 1.0}, zero_grad=True, edge={"x": half}))
    cases.append(Case("Round-ste", "Round", {"x": away(r, 2, 3, lo=0.1, hi=0.4) + 1.0},
                      options={"straight_through_rounding": True}, edge={"x": EDGE}, identity_grad=True))
    cases.append(Case("Hardmax", "Hardmax", {"x": grid(r, 2, 3, 4)}, zero_grad=True))
    unit = r.uniform(-0.9, 0.9, (2, 3)).astype(F)
    for op in ("Tan", "Sinh", "Cosh", "Atan", "Asinh"):
        cases.append(Case(op, op, {"x": x}, edge={"x": EDGE[np.abs(EDGE) < 80]}))
    for op in ("Asin", "Acos", "Atanh"):
        cases.append(Case(op, op, {"x": unit}, edge={"x": f32(-1, 1, 0, -0.0, 0.999, 2.0)}))
    cases.append(Case("Acosh", "Acosh", {"x": r.uniform(1.2, 3, (2, 3)).astype(F)}, edge={"x": f32(1, 1.0001, 1e30, 0.5)}))
    # reductions: ties in the edge data (two and three equal maxima, infinities)
    ties = np.array([[[1, 3, 3, -2], [0, 0, 0, 0], [-np.inf, -np.inf, -np.inf, -np.inf]],
                     [[np.inf, 1, np.inf, 2], [-1, -7, -7, -1], [5, 5, 5, 4]]], F)
    g3 = grid(r, 2, 3, 4)
    for op in ("ReduceMax", "ReduceMin"):
        cases += [
            Case(f"{op}-18-axis1", op, {"x": g3}, {"axes": i64(1)}, {"keepdims": 1}, opset=18, edge={"x": ties}),
            Case(f"{op}-18-axes02-drop", op, {"x": g3}, {"axes": i64(0, 2)}, {"keepdims": 0}, opset=18, edge={"x": ties}),
            Case(f"{op}-18-all-drop", op, {"x": g3}, {}, {"keepdims": 0}, opset=18, edge={"x": ties}),
            Case(f"{op}-18-noop", op, {"x": g3}, {"axes": np.zeros(0, np.int64)}, {"noop_with_empty_axes": 1}, opset=18),
            Case(f"{op}-13-axis-attr", op, {"x": g3}, {}, {"axes": [-1], "keepdims": 0}, opset=13, edge={"x": ties}),
            Case(f"{op}-13-all", op, {"x": g3}, {}, {"keepdims": 1}, opset=13, edge={"x": ties}),
        ]
    cases.append(Case("GlobalMaxPool", "GlobalMaxPool", {"x": grid(r, 2, 3, 4, 4)}, edge={"x": ties.reshape(2, 3, 2, 2)}))
    pos = r.uniform(0.2, 1.5, (2, 3, 4)).astype(F)
    for op, data in (("ReduceL1", x), ("ReduceSumSquare", x), ("ReduceLogSum", pos)):
        cases += [
            Case(f"{op}-18-axis1", op, {"x": data}, {"axes": i64(1)}, {"keepdims": 1}, opset=18, forward=("scale", 2)),
            Case(f"{op}-18-all-drop", op, {"x": data}, {}, {"keepdims": 0}, opset=18, forward=("scale", 4)),
            Case(f"{op}-13-attr", op, {"x": data}, {}, {"axes": [2], "keepdims": 0}, opset=13, forward=("scale", 2)),
        ]
    for op in ("ReduceL2", "ReduceLogSumExp"):
        cases.append(Case(f"{op}-all-drop", op, {"x": x}, {}, {"keepdims": 0}, opset=18))
    n = r.standard_normal
    cases += [
        Case("InstanceNormalization", "InstanceNormalization", {"x": n((2, 3, 4, 4)).astype(F),
             "s": r.uniform(0.5, 1.5, 3).astype(F), "b": n(3).astype(F)}, forward=("scale", 4)),
        Case("GroupNormalization-21", "GroupNormalization", {"x": n((2, 4, 3, 3)).astype(F),
             "s": r.uniform(0.5, 1.5, 4).astype(F), "b": n(4).astype(F)}, attrs={"num_groups": 2}, opset=21, forward=("scale", 4)),
        Case("GroupNormalization-18", "GroupNormalization", {"x": n((2, 4, 3, 3)).astype(F),
             "s": r.uniform(0.5, 1.5, 2).astype(F), "b": n(2).astype(F)}, attrs={"num_groups": 2}, opset=18, forward=("scale", 4)),
        Case("LayerNormalization", "LayerNormalization", {"x": n((2, 3, 4)).astype(F), "s": r.uniform(0.5, 1.5, 4).astype(F),
             "b": n(4).astype(F)}, attrs={"axis": -1}),
        Case("LayerNormalization-axis1", "LayerNormalization", {"x": n((2, 3, 4)).astype(F),
             "s": r.uniform(0.5, 1.5, (3, 4)).astype(F), "b": n((3, 4)).astype(F)}, attrs={"axis": 1}),
        Case("MeanVarianceNormalization", "MeanVarianceNormalization", {"x": n((2, 3, 4, 4)).astype(F)}, forward=("scale", 4)),
        Case("LRN", "LRN", {"x": n((1, 5, 3, 3)).astype(F)}, attrs={"size": 3}, forward=("scale", 2)),
        Case("LRN-5", "LRN", {"x": n((1, 6, 2, 2)).astype(F)}, attrs={"size": 5, "alpha": 0.1, "beta": 0.6, "bias": 2.0},
             forward=("scale", 2)),
        Case("LpNormalization-2", "LpNormalization", {"x": n((2, 3)).astype(F)}, attrs={"p": 2}, forward=("scale", 2)),
        Case("LpNormalization-1", "LpNormalization", {"x": away(r, 2, 3)}, attrs={"p": 1, "axis": 0}, forward=("scale", 2)),
        Case("GlobalLpPool", "GlobalLpPool", {"x": n((1, 2, 3, 3)).astype(F)}, forward=("scale", 2)),
        Case("GlobalLpPool-3", "GlobalLpPool", {"x": away(r, 1, 2, 3, 3)}, attrs={"p": 3}, forward=("scale", 4)),
        Case("BatchNormalization", "BatchNormalization", {"x": n((2, 3, 4, 4)).astype(F), "s": r.uniform(0.5, 1.5, 3).astype(F),
             "b": n(3).astype(F)}, {"mean": n(3).astype(F), "var": r.uniform(0.5, 2, 3).astype(F)}, forward=("scale", 4)),
        Case("DepthToSpace-DCR", "DepthToSpace", {"x": n((1, 8, 2, 3)).astype(F)}, attrs={"blocksize": 2}, h=1.0),
        Case("DepthToSpace-CRD", "DepthToSpace", {"x": n((1, 8, 2, 3)).astype(F)}, attrs={"blocksize": 2, "mode": "CRD"}, h=1.0),
        Case("SpaceToDepth", "SpaceToDepth", {"x": n((1, 2, 4, 6)).astype(F)}, attrs={"blocksize": 2}, h=1.0),
        Case("Slice-negative-steps", "Slice", {"x": n((3, 5)).astype(F)}, {"st": i64(-1, 4), "en": i64(-100, 0),
             "ax": i64(0, 1), "sp": i64(-1, -2)}, h=1.0),
        Case("Compress", "Compress", {"x": n((3, 2)).astype(F)}, {"c": np.array([True, False, True])}, {"axis": 0}, h=1.0),
        Case("Compress-flat", "Compress", {"x": n((3, 2)).astype(F)}, {"c": np.array([False, True, True, False, True])}, h=1.0),
        Case("CumSum", "CumSum", {"x": n((2, 5)).astype(F)}, {"ax": np.array(1, np.int64)}, h=1.0, forward=("scale", 4)),
        Case("CumSum-exclusive-reverse", "CumSum", {"x": n((4, 3)).astype(F)}, {"ax": np.array(0, np.int64)},
             {"exclusive": 1, "reverse": 1}, h=1.0, forward=("scale", 4)),
        Case("CastLike", "CastLike", {"x": n((2, 3)).astype(F)}, {"t": np.zeros(1, F)}, h=1.0),
        Case("SoftmaxCrossEntropyLoss", "SoftmaxCrossEntropyLoss", {"x": n((3, 4)).astype(F)},
             {"labels": np.array([1, 0, 3], np.int64)}, {"reduction": "mean"}),
        Case("ScatterElements-add", "ScatterElements", {"d": n((3, 3)).astype(F), "u": n((2, 3)).astype(F)},
             {"i": np.array([[1, 0, 2], [1, 1, 0]], np.int64)}, {"axis": 0, "reduction": "add"}, opset=18,
             order=["d", "i", "u"], h=1.0, forward=("ulps", 1)),
        Case("ScatterND-add", "ScatterND", {"d": n((4, 3)).astype(F), "u": n((3, 3)).astype(F)},
             {"i": np.array([[1], [3], [1]], np.int64)}, {"reduction": "add"}, opset=18, order=["d", "i", "u"], h=1.0,
             forward=("ulps", 1)),
    ]
    for mode in ("reflect", "edge", "wrap"):
        cases.append(Case(f"Pad-{mode}", "Pad", {"x": n((3, 4)).astype(F)}, {"pads": i64(1, 2, 2, 3)}, {"mode": mode},
                          opset=19, h=1.0))
    cases.append(Case("Pad-reflect-axes", "Pad", {"x": n((2, 3, 4)).astype(F)}, {"pads": i64(1, 2, 2, 1), "axes": i64(1, 2)},
                      {"mode": "reflect"}, opset=19, order=["x", "pads", "", "axes"], h=1.0))
    # Resize / Upsample
    img = n((1, 2, 3, 4)).astype(F)
    resize_modes = {
        "nearest": {"mode": "nearest"},
        "nearest-asymmetric-floor": {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        "linear": {"mode": "linear"},
        "linear-align_corners": {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        "linear-pytorch_half_pixel": {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        "cubic": {"mode": "cubic"},
        "cubic-exclude_outside": {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
    }
    for opset in (19, 13, 11):
        for name, attrs in resize_modes.items():
            consts = {"roi": np.zeros(0, F), "sc": f32(1, 1, 2, 1.5)} if opset < 13 else {"sc": f32(1, 1, 2, 1.5)}
            order = ["x", "roi", "sc"] if opset < 13 else ["x", "", "sc"]
            tol = ("exact", 0) if attrs["mode"] == "nearest" else ("scale", 4)
            cases.append(Case(f"Resize-{opset}-{name}", "Resize", {"x": img}, consts, attrs, opset=opset, order=order,
                              h=1.0, forward=tol))
    cases += [
        Case("Resize-19-linear-antialias", "Resize", {"x": img}, {"sc": f32(1, 1, 0.5, 0.6)}, {"mode": "linear", "antialias": 1},
             opset=19, order=["x", "", "sc"], h=1.0, forward=("scale", 4)),
        Case("Resize-19-cubic-antialias", "Resize", {"x": img}, {"sc": f32(1, 1, 0.5, 0.6)}, {"mode": "cubic", "antialias": 1},
             opset=19, order=["x", "", "sc"], h=1.0, forward=("scale", 4)),
        Case("Resize-19-nearest-sizes", "Resize", {"x": img}, {"sz": i64(1, 2, 6, 7)}, {"mode": "nearest"}, opset=19,
             order=["x", "", "", "sz"], h=1.0),
        Case("Resize-19-linear-sizes", "Resize", {"x": img}, {"sz": i64(1, 2, 5, 3)}, {"mode": "linear"}, opset=19,
             order=["x", "", "", "sz"], h=1.0, forward=("scale", 4)),
        Case("Resize-19-linear-axes", "Resize", {"x": img}, {"sz": i64(5, 3)}, {"mode": "linear", "axes": [2, 3]}, opset=19,
             order=["x", "", "", "sz"], h=1.0, forward=("scale", 4)),
        Case("Resize-19-linear-3d", "Resize", {"x": n((2, 3, 4)).astype(F)}, {"sc": f32(1, 2, 1.5)}, {"mode": "linear"},
             opset=19, order=["x", "", "sc"], h=1.0, forward=("scale", 4)),
        Case("Resize-19-nearest-nhwc", "Resize", {"x": n((1, 3, 2, 2)).astype(F)}, {"sc": f32(1, 2, 3, 1)},
             {"mode": "nearest"}, opset=19, order=["x", "", "sc"], h=1.0),
        Case("Resize-10-nearest", "Resize", {"x": img}, {"sc": f32(1, 1, 2, 2)}, {"mode": "nearest"}, opset=10, h=1.0),
        Case("Resize-10-linear", "Resize", {"x": img}, {"sc": f32(1, 1, 2, 2)}, {"mode": "linear"}, opset=10, h=1.0,
             forward=("scale", 4)),
        Case("Upsample-9-nearest", "Upsample", {"x": img}, {"sc": f32(1, 1, 2, 2)}, {"mode": "nearest"}, opset=9, h=1.0),
        Case("Upsample-7-linear", "Upsample", {"x": img}, {}, {"mode": "linear", "scales": [1.0, 1.0, 2.0, 1.5]}, opset=8,
             h=1.0, forward=("scale", 4)),
    ]

    def ct(id_: str, xs: tuple[int, ...], ws: tuple[int, ...], bias: bool = True, **attrs: Any) -> Case:
        data = {"x": n(xs).astype(F), "w": (0.5 * n(ws)).astype(F)}
        if bias:
            data["b"] = n(ws[1] * attrs.get("group", 1)).astype(F)
        return Case(f"ConvTranspose-{id_}", "ConvTranspose", data, attrs=attrs, h=1.0, forward=("scale", 4))

    cases += [
        ct("2d", (1, 2, 4, 4), (2, 3, 3, 3)),
        ct("stride2-output_padding-pads", (1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], output_padding=[1, 1], pads=[1, 1, 1, 1]),
        ct("group-dilation-asym", (1, 4, 3, 5), (4, 2, 2, 3), group=2, strides=[2, 3], dilations=[2, 1], pads=[0, 1, 2, 0]),
        ct("1d-crop", (1, 2, 5), (2, 3, 3), bias=False, strides=[3], pads=[2, 4]),
        ct("3d", (1, 2, 3, 3, 3), (2, 2, 2, 2, 2), bias=False, strides=[2, 1, 2]),
        ct("SAME_UPPER", (1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
        ct("SAME_LOWER", (1, 2, 5, 4), (2, 3, 3, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
        ct("output_shape", (1, 2, 4, 4), (2, 3, 3, 3), strides=[2, 2], output_shape=[9, 8]),
        ct("k4s2p1", (1, 2, 4, 4), (2, 3, 4, 4), strides=[2, 2], pads=[1, 1, 1, 1]),
        ct("depthwise", (1, 3, 4, 4), (3, 1, 3, 3), group=3, strides=[2, 2]),
        Case("Conv-SAME_UPPER", "Conv", {"x": n((1, 2, 5, 5)).astype(F), "w": n((3, 2, 3, 3)).astype(F)},
             attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}, h=1.0),
        Case("Conv-SAME_LOWER", "Conv", {"x": n((1, 2, 6, 5)).astype(F), "w": n((3, 2, 2, 3)).astype(F)},
             attrs={"auto_pad": "SAME_LOWER"}, h=1.0),
        Case("AveragePool-SAME_UPPER", "AveragePool", {"x": n((1, 2, 5, 5)).astype(F)},
             attrs={"auto_pad": "SAME_UPPER", "kernel_shape": [3, 3]}, opset=19, h=1.0),
        Case("AveragePool-11-SAME_LOWER", "AveragePool", {"x": n((1, 2, 6, 5)).astype(F)},
             attrs={"auto_pad": "SAME_LOWER", "kernel_shape": [2, 2], "strides": [2, 2]}, h=1.0),
    ]
    for eq, shapes in [("ij,jk->ik", [(2, 3), (3, 4)]), ("bhid,bhjd->bhij", [(2, 2, 3, 4), (2, 2, 5, 4)]),
                       ("i,j->ij", [(3,), (4,)]), ("ij->ji", [(2, 3)]), ("bij->b", [(2, 3, 4)]),
                       ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]), ("bnd,dk->bnk", [(2, 3, 4), (4, 5)]),
                       ("ij,ij->i", [(3, 4), (3, 4)]), ("bcq,bck->bqk", [(2, 3, 4), (2, 3, 5)]),
                       ("ijk,jl->ilk", [(2, 3, 4), (3, 5)]), ("ij,kj", [(2, 3), (4, 3)]), ("abc,cd->abd", [(1, 3, 4), (4, 2)]),
                       ("ij,jk", [(2, 3), (3, 4)]), ("bi,bi->b", [(3, 4), (3, 4)])]:
        data = {f"x{k}": n(s).astype(F) for k, s in enumerate(shapes)}
        cases.append(Case(f"Einsum-{eq}", "Einsum", data, attrs={"equation": eq}, h=1.0, forward=("scale", 4)))
    cases += [
        Case("bit_exact-Softplus", "Softplus", {"x": x}, options={"bit_exact": True}, edge={"x": EDGE[np.abs(EDGE) < 1e30]}),
        Case("bit_exact-InstanceNormalization", "InstanceNormalization", {"x": n((2, 3, 4, 4)).astype(F), "s": n(3).astype(F),
             "b": n(3).astype(F)}, options={"bit_exact": True}),
        Case("bit_exact-ConvTranspose", "ConvTranspose", {"x": n((1, 2, 4, 4)).astype(F), "w": n((2, 3, 3, 3)).astype(F)},
             attrs={"strides": [2, 2]}, options={"bit_exact": True}, h=1.0),
    ]
    return cases


CASES = _cases()


def test_cases_cover_every_rule() -> None:
    assert {c.op for c in CASES} | {op for op, _, _, _ in SYMBOLIC} >= set(DECOMPOSITIONS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_and_gradient(case: Case) -> None:
    native = one_node(case.op, case.data, case.consts, case.attrs, case.opset, case.order)
    decomposed, result = decompose(native, **case.options)
    assert result.rewritten == {"node": case.op}, result.not_decomposable
    assert not result.not_decomposable
    assert [o.name for o in decomposed.graph.output] == ["y0"]
    weights = [np.random.default_rng(1).standard_normal(np.shape(y)).astype(F)
               for y in session(native).run(None, dict(case.data))]
    # (a) forward, on the random data and on the edge values
    for data in [case.data] + ([case.edge] if case.edge else []):
        if data is not case.data:
            native_e = one_node(case.op, data, case.consts, case.attrs, case.opset, case.order)
            decomposed_e, _ = decompose(native_e, **case.options)
        else:
            native_e, decomposed_e = native, decomposed
        want = session(native_e).run(None, dict(data))[0]
        got = session(decomposed_e).run(None, dict(data))[0]
        assert_forward(got, want, case.forward)
    # (b) gradient through the decomposed graph vs central differences of the native op
    got_grads = training_gradients(decomposed, case.data, weights, extra=case.zero_grad)
    if case.zero_grad:  # the only gradient is the extra sum(x) term
        for name, g in got_grads.items():
            np.testing.assert_array_equal(g, np.ones_like(g))
        return
    if case.identity_grad:
        for name, g in got_grads.items():
            np.testing.assert_array_equal(g, weights[0].astype(np.float64))
        return
    want_grads = numeric_gradients(native, case.data, weights, case.h)
    for name, g in got_grads.items():
        scale = max(1.0, float(np.max(np.abs(want_grads[name]))))
        tol = 1e-5 if case.h >= 1.0 else 2e-3
        np.testing.assert_allclose(g, want_grads[name], rtol=0, atol=tol * scale, err_msg=f"gradient of {name}")


def test_native_ops_really_lack_gradients() -> None:
    """The premise: onnxruntime-training cannot train through the native ops (pinned on three)."""
    x = np.ones((2, 3), F)
    for op, expected in (("HardSwish", "not been registered"), ("Round", "not been registered")):
        model = one_node(op, {"x": x})
        with pytest.raises(Exception, match=expected):
            training_gradients(model, {"x": x}, [np.ones((2, 3), F)])
    model = one_node("ConvTranspose", {"x": np.ones((1, 2, 3, 3), F), "w": np.ones((2, 2, 3, 3), F)})
    with pytest.raises(Exception, match="ConvTransposeGrad"):
        training_gradients(model, {"x": np.ones((1, 2, 3, 3), F), "w": np.ones((2, 2, 3, 3), F)}, [np.ones((1, 2, 5, 5), F)])


# ---------------------------------------------------------------------------------------------
# symbolic shapes: the native gradients are wrong, the rewrites are not
# ---------------------------------------------------------------------------------------------
SYMBOLIC = [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (1, 2, 5, 5), 17),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (1, 2, 5, 6), 17),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (1, 2, 5, 5), 17),
    ("MaxPool", {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [2, 1], "pads": [1, 0, 2, 1], "ceil_mode": 1},
     (2, 2, 7, 6), 17),
    ("MaxPool", {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]}, (1, 2, 6, 6), 17),  # YOLO's SPPF
    ("MaxPool", {"kernel_shape": [3], "strides": [2]}, (1, 2, 9), 17),
    ("AveragePool", {"kernel_shape": [3, 3]}, (1, 2, 5, 5), 19),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (1, 2, 5, 6), 19),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, (1, 2, 5, 6), 19),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (1, 2, 5, 5), 19),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1],
                     "count_include_pad": 1}, (1, 2, 6, 6), 19),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 0, 0]}, (1, 2, 6, 7), 19),
    ("AveragePool", {"kernel_shape": [2, 3], "strides": [1, 2], "dilations": [2, 1]}, (2, 2, 6, 7), 19),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (1, 2, 5, 6), 17),  # MTCNN
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, (1, 2, 7, 6), 17),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (1, 2, 7, 6), 19),
    ("AveragePool", {"kernel_shape": [2, 3], "auto_pad": "SAME_LOWER", "count_include_pad": 1}, (1, 2, 5, 5), 19),
    ("Expand", {}, (3, 1), 13),
]


def _symbolic_model(op: str, x: np.ndarray, attrs: Mapping[str, Any], opset: int) -> onnx.ModelProto:
    """``op(x + p)`` with x's dims symbolic and ``p`` per channel (axis 1), so they stay symbolic."""
    r = x.ndim
    p = np.zeros([1, x.shape[1]] + [1] * (r - 2), F)
    inputs = ["a_x", "shape"] if op == "Expand" else ["a_x"]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "p_x"], ["a_x"]), helper.make_node(op, inputs, ["y0"], name="node", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [f"s{k}" for k in range(r)])],
        [helper.make_empty_tensor_value_info("y0")],
        [numpy_helper.from_array(p, "p_x"), numpy_helper.from_array(np.array([2, 3, 4], np.int64), "shape")])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                                               ir_version=8))


@pytest.mark.parametrize(("op", "attrs", "shape", "opset"), SYMBOLIC, ids=[f"{c[0]}-{i}" for i, c in enumerate(SYMBOLIC)])
def test_symbolic_shapes(op: str, attrs: Mapping[str, Any], shape: tuple[int, ...], opset: int) -> None:
    x = grid(np.random.default_rng(len(shape) + sum(shape)), *shape)
    native = _symbolic_model(op, x, attrs, opset)
    decomposed, result = decompose(native, trainable=["p_x"])
    assert result.rewritten == {"node": op}
    want = session(native).run(None, {"x": x})[0]
    assert_forward(session(decomposed).run(None, {"x": x})[0], want, ("exact", 0))
    weights = [np.random.default_rng(2).standard_normal(want.shape).astype(F)]
    per_channel = tuple(k for k in range(x.ndim) if k != 1)  # p is per channel: its gradient sums the rest
    reference = numeric_gradients(native, {"x": x}, weights, 1e-3)["x"].sum(axis=per_channel)
    scale = max(1.0, float(np.max(np.abs(reference))))
    got = _per_channel_gradient(decomposed, x, weights[0]).reshape(-1)
    np.testing.assert_allclose(got, reference, rtol=0, atol=2e-3 * scale)
    try:
        native_grad = _per_channel_gradient(native, x, weights[0]).reshape(-1)
    except Exception:  # noqa: BLE001 - Expand: the native gradient fails at run time
        return
    assert np.max(np.abs(native_grad - reference)) > 0.1 * scale, "the native gradient is right: the rule is not needed"


def _interpolate_model(mode: str, proven: bool = True) -> onnx.ModelProto:
    """PyTorch's ``interpolate(x, size=(6, 7))`` export: sizes = Concat(Slice(Shape(x), 0, 2), [6, 7])."""
    node = helper.make_node
    source = "a_x" if proven else "other"
    graph = helper.make_graph(
        [node("Add", ["x", "p_x"], ["a_x"]), node("Shape", [source], ["shape"]),
         node("Slice", ["shape", "zero", "two"], ["nc"]), node("Concat", ["nc", "hw"], ["sizes"], axis=0),
         node("Resize", ["a_x", "", "", "sizes"], ["y0"], name="node", mode=mode)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, "h", "w"]),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [helper.make_empty_tensor_value_info("y0")],
        [numpy_helper.from_array(np.zeros((1, 2, 1, 1), F), "p_x"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array([2], np.int64), "two"), numpy_helper.from_array(np.array([6, 7], np.int64), "hw")])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                               ir_version=8))


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_with_sizes_computed_at_run_time(mode: str) -> None:
    x = np.random.default_rng(3).standard_normal((2, 2, 3, 4)).astype(F)
    native = _interpolate_model(mode)
    decomposed, result = decompose(native, trainable=["p_x"])
    assert result.rewritten == {"node": "Resize"}
    want = session(native).run(None, {"x": x, "other": x})[0]
    assert_forward(session(decomposed).run(None, {"x": x, "other": x})[0], want,
                   ("exact", 0) if mode == "nearest" else ("scale", 4))
    # a batch of another size and image size: nothing was specialised to the first one
    x2 = np.random.default_rng(4).standard_normal((1, 2, 5, 2)).astype(F)
    assert_forward(session(decomposed).run(None, {"x": x2, "other": x2})[0], session(native).run(None, {"x": x2, "other": x2})[0],
                   ("exact", 0) if mode == "nearest" else ("scale", 4))
    weights = [np.random.default_rng(5).standard_normal(want.shape).astype(F)]
    feeds = {"x": x, "other": x}
    got = training_gradients(decomposed, feeds, weights, trained=["x"])["x"].reshape(-1)
    run = session(native)
    reference = np.zeros(2)
    for c in range(2):  # d/dp_c by central differences of the native op (linear in x: h = 1 is exact)
        step = np.zeros_like(x)
        step[:, c] = 1.0
        up = sum(float(np.sum(np.asarray(y, np.float64) * w)) for y, w in zip(run.run(None, {"x": x + step, "other": x}), weights))
        down = sum(float(np.sum(np.asarray(y, np.float64) * w)) for y, w in zip(run.run(None, {"x": x - step, "other": x}), weights))
        reference[c] = (up - down) / 2
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_resize_with_unproven_run_time_sizes_is_reported() -> None:
    _, result = decompose(_interpolate_model("linear", proven=False), trainable=["p_x"])
    assert result.rewritten == {}
    assert "does not show which axes keep their size" in result.not_decomposable["node"]


def _per_channel_gradient(model: onnx.ModelProto, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return training_gradients(model, {"x": x}, [w])["x"]


# ---------------------------------------------------------------------------------------------
# ties and edge gradients
# ---------------------------------------------------------------------------------------------
def test_reduce_max_splits_the_gradient_evenly_among_ties() -> None:
    x = np.array([[1.0, 3.0, 3.0, -2.0], [5.0, 5.0, 5.0, 4.0]], F)
    model = one_node("ReduceMax", {"x": x}, {"axes": np.array([1], np.int64)}, {"keepdims": 0}, opset=18)
    decomposed, _ = decompose(model)
    g = training_gradients(decomposed, {"x": x}, [np.ones(2, F)])["x"]
    np.testing.assert_allclose(g, [[0, 0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3, 0]], rtol=1e-7)


def test_reduce_max_with_infinite_maximum_is_exact_and_finite() -> None:
    x = np.array([[np.inf, 1.0, np.inf], [-np.inf, -np.inf, -np.inf]], F)
    model = one_node("ReduceMax", {"x": x}, {"axes": np.array([1], np.int64)}, {"keepdims": 1}, opset=18)
    decomposed, _ = decompose(model)
    np.testing.assert_array_equal(session(decomposed).run(None, {"x": x})[0], [[np.inf], [-np.inf]])
    g = training_gradients(decomposed, {"x": x}, [np.ones((2, 1), F)])["x"]
    assert np.all(np.isfinite(g))


def test_hard_sigmoid_gradient_is_zero_at_and_beyond_the_knees() -> None:
    x = np.array([-3.0, -2.5, -1.0, 0.0, 2.0, 2.5, 3.0], F)
    decomposed, _ = decompose(one_node("HardSigmoid", {"x": x}))
    g = training_gradients(decomposed, {"x": x}, [np.ones(7, F)])["x"]
    np.testing.assert_allclose(g, [0, 0, 0.2, 0.2, 0.2, 0, 0], rtol=1e-6)


def test_elu_and_softplus_gradients_stay_finite_for_huge_inputs() -> None:
    """The unselected branch is fed a clamped input, so 0 * inf never reaches the gradient."""
    x = np.array([-1e4, -100.0, 0.0, 100.0, 1e4], F)
    for op, expected in (("Elu", [0.0, 0.0, 1.0, 1.0, 1.0]), ("Softplus", [0.0, 0.0, 0.5, 1.0, 1.0])):
        decomposed, _ = decompose(one_node(op, {"x": x}))
        g = training_gradients(decomposed, {"x": x}, [np.ones(5, F)])["x"]
        np.testing.assert_allclose(g, expected, atol=1e-6, err_msg=op)


def test_clip_whose_declared_output_shape_has_a_zero_dim_trains() -> None:
    """tf2onnx-style stale shape: ClipGrad fails ('Can broadcast 0 by 0 or 1. 16 is invalid')."""
    artifacts, api = training_modules()
    x = (np.random.default_rng(0).standard_normal((16, 8)) * 4).astype(F)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "p"], ["a"]), helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="Relu/Clip"),
         helper.make_node("ReduceSum", ["c"], ["loss"], keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.zeros((1, 8), F), "p"), numpy_helper.from_array(np.array(0, F), "lo"),
         numpy_helper.from_array(np.array(6, F), "hi")],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [0, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    def step(m: onnx.ModelProto) -> np.ndarray:
        with tempfile.TemporaryDirectory() as d:
            artifacts.generate_artifacts(m, requires_grad=["p"], frozen_params=[], loss=None, optimizer=None,
                                         artifact_directory=d)
            state = api.CheckpointState.load_checkpoint(f"{d}/checkpoint")
            module = api.Module(f"{d}/training_model.onnx", state, f"{d}/eval_model.onnx")
            module.train()
            module(x)
            return np.array(state.parameters["p"].grad)

    with pytest.raises(Exception, match="Can broadcast 0 by 0 or 1"):
        step(model)
    decomposed, result = decompose(model)
    assert result.rewritten == {"Relu/Clip": "Clip"}
    np.testing.assert_array_equal(step(decomposed), ((x > 0) & (x < 6)).sum(0, keepdims=True))


# ---------------------------------------------------------------------------------------------
# stop-gradient primitives
# ---------------------------------------------------------------------------------------------
def _primitive_model(build: str, n: int) -> onnx.ModelProto:
    graph = ir.Graph([ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))], [], nodes=[],
                     name="g")
    graph.opset_imports[""] = 17
    model = ir.Model(graph, ir_version=8)
    b = Builder(model)
    x = graph.inputs[0]
    p = b.param("p", np.zeros(n, F))
    a = b.op("Add", [x, p], "a")
    y = exact_stop_gradient(b, a, "s") if build == "stop" else with_derivative(b, a, b.op("Sin", [a], "s"), b.op("Cos", [a], "s"), "s")
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([n])
    graph.outputs.append(y)
    if build == "stop":  # keep p reachable: y2 = a
        y2 = b.op("Identity", [a], "i")
        y2.name, y2.type, y2.shape = "y2", ir.TensorType(ir.DataType.FLOAT), ir.Shape([n])
        graph.outputs.append(y2)
    return ir.to_proto(model)


def test_exact_stop_gradient_is_bit_exact_for_every_kind_of_float() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(F)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38,
                        2.0**-60, 2.0**60, 2.0**-61, 2.0**61, 1.0, -1.0, 0.1], F)
    x = np.concatenate([bits, special, rng.standard_normal(1000).astype(F)])
    y = session(_primitive_model("stop", x.size)).run(["y"], {"x": x})[0]
    same = (y.view(np.uint32) == x.view(np.uint32)) | (np.isnan(x) & np.isnan(y)) | ((x == 0) & (y == 0))
    assert same.all(), x[~same][:5]
    kept = y.view(np.uint32) == x.view(np.uint32)
    assert kept[~np.isnan(x) & ~((x == 0) & np.signbit(x))].all(), "every bit is kept but NaN payloads and -0.0's sign"


def test_exact_stop_gradient_has_no_gradient() -> None:
    x = np.array([0.5, -3.0, 7.0], F)
    g = _grads_of(_primitive_model("stop", 3), x, {"y": np.full(3, 5.0, F), "y2": np.ones(3, F)})
    np.testing.assert_array_equal(g, [1.0, 1.0, 1.0])  # only the y2 = x term


def test_with_derivative_keeps_the_forward_and_uses_the_formula() -> None:
    x = np.array([0.3, -1.2, 2.0, 0.0], F)
    model = _primitive_model("derivative", 4)
    y = session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, np.sin(x))
    g = _grads_of(model, x, {"y": np.ones(4, F)})
    np.testing.assert_allclose(g, np.cos(x.astype(np.float64)), rtol=1e-6)


def _grads_of(model: onnx.ModelProto, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    artifacts, api = training_modules()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    terms = []
    for out in list(g.output):
        g.initializer.append(numpy_helper.from_array(weights[out.name], f"w_{out.name}"))
        g.node.append(helper.make_node("Mul", [out.name, f"w_{out.name}"], [f"m_{out.name}"]))
        g.node.append(helper.make_node("ReduceSum", [f"m_{out.name}"], [f"s_{out.name}"], keepdims=0))
        terms.append(f"s_{out.name}")
    total = terms[0]
    for k, t in enumerate(terms[1:]):
        g.node.append(helper.make_node("Add", [total, t], [f"t{k}"]))
        total = f"t{k}"
    g.node.append(helper.make_node("Identity", [total], ["loss"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    with tempfile.TemporaryDirectory() as d:
        artifacts.generate_artifacts(m, requires_grad=["p"], frozen_params=[], loss=None, optimizer=None,
                                     artifact_directory=d)
        state = api.CheckpointState.load_checkpoint(f"{d}/checkpoint")
        module = api.Module(f"{d}/training_model.onnx", state, f"{d}/eval_model.onnx")
        module.train()
        module(x)
        return np.array(state.parameters["p"].grad)


# ---------------------------------------------------------------------------------------------
# the pass: findings and the naming contract
# ---------------------------------------------------------------------------------------------
def _small_net() -> onnx.ModelProto:
    """A net with rewritable, undecomposable and off-path nodes, names as an exporter writes them.

    Off the gradient path: a HardSwish on the input (before every weight) and a Floor on a shape
    computation. On it: HardSwish and a nearest Resize (rewritten), a linear Resize with sizes
    computed at run time, an Einsum diagonal and an LSTM (reported).
    """
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [
        node("Shape", ["x"], ["shape_i"], name="/shape/Shape"),
        node("Cast", ["shape_i"], ["shape_f"], name="/shape/Cast", to=TensorProto.FLOAT),
        node("Floor", ["shape_f"], ["shape_floor"], name="/shape/Floor"),
        node("Cast", ["shape_floor"], ["shape_c"], name="/shape/Cast2", to=TensorProto.INT64),
        node("Slice", ["shape_c", "s0", "s1"], ["hw"], name="/shape/Slice"),
        node("Concat", ["nc", "hw"], ["dyn_sizes"], name="/shape/Concat", axis=0),
        node("HardSwish", ["x"], ["/pre/hs"], name="/pre/HardSwish"),
        node("Conv", ["/pre/hs", "conv.weight"], ["/conv/out"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        node("HardSwish", ["/conv/out"], ["/act/out"], name="/act/HardSwish"),
        node("Resize", ["/act/out", "", "scales"], ["up"], name="/up/Resize", mode="nearest"),
        node("Resize", ["/act/out", "", "", "dyn_sizes"], ["up2"], name="/up2/Resize", mode="linear"),
        node("ReduceMean", ["up2"], ["sq"], name="/sq/ReduceMean", axes=[0, 1], keepdims=0),
        node("Einsum", ["sq"], ["diag"], name="/diag/Einsum", equation="ii->i"),
        node("Reshape", ["/act/out", "seq_shape"], ["seq"], name="/rnn/Reshape"),
        node("LSTM", ["seq", "lw", "lr"], ["lstm_y"], name="/rnn/LSTM", hidden_size=2),
    ]
    inits = {
        "conv.weight": (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(F), "scales": np.array([1, 1, 2, 2], F),
        "lw": rng.standard_normal((1, 8, 4)).astype(F), "lr": rng.standard_normal((1, 8, 2)).astype(F),
        "s0": np.array([2], np.int64), "s1": np.array([4], np.int64), "nc": np.array([1, 4], np.int64),
        "seq_shape": np.array([16, 1, 4], np.int64),
    }
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_empty_tensor_value_info(name) for name in ("up", "diag", "lstm_y")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def test_pass_reports_rewritten_and_undecomposable_nodes() -> None:
    model = _small_net()
    decomposed, result = decompose(model)
    assert result.modified
    assert result.rewritten == {"/act/HardSwish": "HardSwish", "/up/Resize": "Resize"}
    assert set(result.not_decomposable) == {"/up2/Resize", "/diag/Einsum", "/rnn/LSTM"}
    assert "does not show which axes keep their size" in result.not_decomposable["/up2/Resize"]
    assert "diagonal" in result.not_decomposable["/diag/Einsum"]
    assert "no decomposition exists" in result.not_decomposable["/rnn/LSTM"]
    for name, reason in result.not_decomposable.items():
        assert "\n" not in reason and name in reason and "freeze" in reason and "train_last_n" in reason
    # off the gradient path: before every weight (HardSwish on the input) and on the shape path (Floor)
    kept = {n.name for n in decomposed.graph.node}
    assert {"/pre/HardSwish", "/shape/Floor"} <= kept
    assert not {"/act/HardSwish", "/up/Resize"} & kept


def test_pass_keeps_every_tensor_name_and_value_and_the_graph_outputs() -> None:
    model = _small_net()
    decomposed, result = decompose(model)
    names = [v.name for v in model.graph.output]
    assert [v.name for v in decomposed.graph.output] == names
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(F)
    tensors = [o for n in model.graph.node for o in n.output if o]

    def expose(m: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(m)
        have = {o.name for o in out.graph.output}
        out.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors if t not in have)
        return out

    want = dict(zip([o.name for o in expose(model).graph.output], session(expose(model)).run(None, {"x": x})))
    got = dict(zip([o.name for o in expose(decomposed).graph.output], session(expose(decomposed)).run(None, {"x": x})))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert set(model.graph.initializer[i].name for i in range(len(model.graph.initializer))) <= \
        {i.name for i in decomposed.graph.initializer}
    assert result.created_initializers == frozenset(
        {i.name for i in decomposed.graph.initializer} - {i.name for i in model.graph.initializer})


def test_pass_only_considers_the_given_trainable_parameters() -> None:
    model = _small_net()
    _, result = decompose(model, trainable=["lw"])  # only the LSTM weight trains
    assert result.rewritten == {}
    assert set(result.not_decomposable) == {"/rnn/LSTM"}
    unchanged, result = decompose(model, trainable=[])
    assert not result.modified and result.rewritten == {} and result.not_decomposable == {}
    assert len(unchanged.graph.node) == len(model.graph.node)


def test_pass_rewrites_inside_a_real_conv_net_and_it_trains() -> None:
    """Weights as initializers, several rewritten ops in sequence, a training step end to end."""
    rng = np.random.default_rng(0)
    f = lambda *s: (0.3 * rng.standard_normal(s)).astype(F)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hs1"),
        helper.make_node("ConvTranspose", ["h1", "wt"], ["up"], name="deconv", strides=[2, 2]),
        helper.make_node("InstanceNormalization", ["up", "g", "b"], ["n"], name="norm"),
        helper.make_node("PRelu", ["n", "slope"], ["pr"], name="prelu"),
        helper.make_node("ReduceMin", ["pr"], ["gp"], name="gmp", axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["gp"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "wf"], ["y"], name="fc", transB=1),
    ]
    inits = {"w1": f(4, 3, 3, 3), "b1": f(4), "wt": f(4, 2, 3, 3), "g": (1 + f(2)), "b": f(2), "slope": np.full((2, 1, 1), 0.25, F),
             "wf": f(5, 2)}
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    decomposed, result = decompose(model)
    assert set(result.rewritten) == {"hs1", "deconv", "norm", "prelu", "gmp"} and not result.not_decomposable
    x = rng.standard_normal((2, 3, 6, 6)).astype(F)
    np.testing.assert_allclose(session(decomposed).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)
    artifacts, api = training_modules()
    loss = onnx.ModelProto()
    loss.CopyFrom(decomposed)
    loss.graph.node.append(helper.make_node("Mul", ["y", "y"], ["y2"]))
    loss.graph.node.append(helper.make_node("ReduceSum", ["y2"], ["loss"], keepdims=0))
    del loss.graph.output[:]
    loss.graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    with tempfile.TemporaryDirectory() as d:
        artifacts.generate_artifacts(loss, requires_grad=sorted(inits), frozen_params=[], loss=None, optimizer=None,
                                     artifact_directory=d)
        state = api.CheckpointState.load_checkpoint(f"{d}/checkpoint")
        module = api.Module(f"{d}/training_model.onnx", state, f"{d}/eval_model.onnx")
        module.train()
        module(x)
        for name in inits:
            g = np.array(state.parameters[name].grad)
            assert np.all(np.isfinite(g)) and np.any(g != 0), name
