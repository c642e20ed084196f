"""Calibration time grows linearly with the graph (issue 14).

The statistics model used to expose two scalar graph outputs per quantized tensor, appended at
the end of the graph: onnxruntime kept every quantized tensor alive to the end of the run, and
session creation and first-run memory planning grew quadratically (a 10k-node chain took minutes).
These tests pin the layout that fixed it and bound the growth of onnxqat's own calibration time.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxqat import QuantizationSimModel
from onnxqat.calibrate import runner
from onnxqat.calibrate.observers import MinMaxObserver
from onnxqat.calibrate.schemes import Scheme
from onnxqat.graph import NameScope, values_by_name
from onnxqat import runtime
from onnxqat.runtime import Session

WIDTH = 8
BATCH = 64


def chain(nodes: int, seed: int = 0) -> onnx.ModelProto:
    """``nodes / 3`` blocks of MatMul (8x8 weight) + Add (bias) + Relu."""
    rng = np.random.default_rng(seed)
    graph_nodes, inits, x = [], [], "x"
    for i in range(nodes // 3):
        w = (rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((rng.normal(size=WIDTH) * 0.1).astype(np.float32), f"b{i}")]
        graph_nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                        helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                        helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [BATCH, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _batch() -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(1).normal(size=(BATCH, WIDTH)).astype(np.float32)}]


def test_statistics_model_gathers_bounds_beside_their_producers():
    sim = QuantizationSimModel(chain(300))
    observers = {q.name: MinMaxObserver() for q in sim.plan.activations}
    stats = runner._statistics_model(sim.float_model, sim.plan, Scheme.MINMAX, observers)
    graph = runner._with_additions_proto(ir.to_proto(sim.float_model), stats).graph
    # one output for the model's own, one holding every bound (all tensors are float [64, 8])
    assert len(graph.output) == len(sim.float_model.graph.outputs) + 1
    (name, targets), = stats.fetches
    values = values_by_name(sim.float_model.graph)
    reduced = [t for q in sim.plan.activations for t in q.tensors if values[t].producer() is not None]
    assert name == graph.output[-1].name and len(targets) == 2 * len(reduced)
    # each reduction comes right after the node producing the tensor it reads (Concats may follow)
    added = ("ReduceMin", "ReduceMax", "Flatten", "Concat")
    producer_of = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for i, node in enumerate(graph.node):
        if node.op_type in ("ReduceMin", "ReduceMax"):
            before = next(j for j in range(i - 1, -1, -1) if graph.node[j].op_type not in added)
            assert producer_of[node.input[0]] == before
    assert all(n.op_type != "Concat" or len(n.input) <= runner._FAN_IN for n in graph.node)


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 200, 255, 256, 257, 300, 4097])
def test_bound_gatherer_concats_at_most_fan_in_inputs_in_order(count):
    """Every bound count gives Concats of at most _FAN_IN inputs whose flattened leaves are the
    bounds in the order they were added (a leftover of up to _FAN_IN - 1 per level included)."""
    gatherer = runner._BoundGatherer(NameScope(ir.from_proto(chain(3))), "bounds")
    emitted: list = []
    for i in range(count):
        gatherer.add(f"b{i}", (f"t{i}", False), emitted)
    out = gatherer.finish(emitted)
    assert all(len(op.inputs) <= runner._FAN_IN for op in emitted)
    made = {op.output: op.inputs for op in emitted}

    def leaves(name):
        return [leaf for child in made[name] for leaf in leaves(child)] if name in made else [name]

    assert leaves(out) == [f"b{i}" for i in range(count)]


class _UnoptimizedSession(Session):
    """The timing test measures onnxqat, not onnxruntime's graph optimizer: skip the latter."""

    def __init__(self, model, **options):
        options["optimize"] = False
        super().__init__(model, **options)


def _own_calibration_seconds(nodes: int, monkeypatch: pytest.MonkeyPatch) -> float:
    """CPU seconds of min-max compute_encodings outside onnxruntime (session creation and runs).

    Min-max: the statistics layout is what grew superlinearly; the default ``auto`` scheme adds a
    histogram per quantizer and the choice between schemes (~10x the CPU at 2k nodes)."""
    sim = QuantizationSimModel(chain(nodes), quant_scheme="minmax")
    spent = {"ort": 0.0}
    init, run = ort.InferenceSession.__init__, ort.InferenceSession.run

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["ort"] += time.process_time() - start
        return wrapper

    monkeypatch.setattr(ort.InferenceSession, "__init__", timed(init))
    monkeypatch.setattr(ort.InferenceSession, "run", timed(run))
    monkeypatch.setattr(runner, "Session", _UnoptimizedSession)
    gc.collect()
    start = time.process_time()
    sim.compute_encodings(_batch(), progress=False)
    total = time.process_time() - start
    monkeypatch.undo()
    assert sim.calibrated
    return total - spent["ort"]


def test_calibration_time_grows_linearly_with_the_graph(monkeypatch):
    small = min(_own_calibration_seconds(2_000, monkeypatch) for _ in range(2))
    large = _own_calibration_seconds(20_000, monkeypatch)
    # 10x the nodes: linear is ~10x; the quadratic layout was over 100x
    assert large < 20 * small, f"2k nodes: {small:.2f} s, 20k nodes: {large:.2f} s ({large / small:.1f}x)"


def _deployed_chain(nodes: int, deploy: bool = True) -> tuple[ir.Model, dict[str, np.ndarray]]:
    sim = QuantizationSimModel(chain(nodes), quant_scheme="minmax")
    sim.compute_encodings(_batch(), progress=False)
    return sim.sim_ir(fold_weights=deploy), _batch()[0]


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("deploy", [True, False])
def test_segmented_session_computes_what_one_session_computes(optimize, deploy):
    """The export check's sessions (deployable graph) and the auto scheme's (simulation graph)
    are built in segments (onnxruntime's build grows about quadratically with the graph): cut
    only at QuantizeLinear outputs, they give the very bits of one session of the whole graph,
    fused integer kernels and reference alike."""
    model, feed = _deployed_chain(900, deploy)
    segmented = Session(model, optimize=optimize, max_nodes=200)
    assert len(segmented.segments) >= 5 and segmented.session is None
    proto = ir.to_proto(model)
    op_of = {out: node.op_type for node in proto.graph.node for out in node.output}
    for part, _ in segmented.segments[1:]:
        assert part.inputs and all(op_of[name] == "QuantizeLinear" for name in part.inputs)
        assert part.stop - part.start >= 100
    assert sum(part.stop - part.start for part, _ in segmented.segments) == len(proto.graph.node)
    whole = Session(model, optimize=optimize)
    assert whole.segments == [] and segmented.output_names == whole.output_names
    np.testing.assert_array_equal(segmented.run(feed)[0], whole.run(feed)[0])


def test_a_graph_without_integer_cuts_is_one_session():
    """Float tensors never cross a cut (a fusion could span it): the float chain stays whole, and
    so does a graph under the limit."""
    proto = chain(900)
    assert runtime.segment_model(proto, 100) is None
    model, _ = _deployed_chain(300)
    assert runtime.segment_model(ir.to_proto(model), 10_000) is None
    assert Session(proto, max_nodes=100).segments == []


def test_the_check_run_still_names_a_failing_node_deep_in_a_segmented_graph(monkeypatch):
    """A node that cannot run in the last segments fails the segmented check as it failed the
    whole graph's, and the error names it."""
    from onnxqat import deploycheck
    from onnxqat.errors import ModelError

    monkeypatch.setattr(deploycheck, "SEGMENT_NODES", 200)

    model, feed = _deployed_chain(900)
    relus = [node for node in model.graph if node.op_type == "Relu"]
    bad = relus[-20]
    shape = ir.Value(name="bad_shape", const_value=ir.tensor(np.array([7, -1], np.int64), name="bad_shape"))
    model.graph.register_initializer(shape)
    reshape = ir.Node("", "Reshape", [bad.inputs[0], shape], name="bad_reshape")
    model.graph.insert_before(bad, reshape)
    bad.replace_input_with(0, reshape.outputs[0])
    reshape.outputs[0].name = "bad_reshape_out"
    segments = runtime.segment_model(ir.to_proto(model), 200)
    assert segments is not None and len(segments) > 5
    with pytest.raises(ModelError, match="does not run in onnxruntime .* at node 'bad_reshape' \\(Reshape\\)"):
        deploycheck.check_deployment(model, feed, {})


def test_sessions_of_a_pinned_model_share_one_protobuf_and_one_cut(monkeypatch):
    model, feed = _deployed_chain(600)
    expected = Session(model).run(feed)[0]
    calls = {"to_proto": 0, "segment": 0}
    to_proto, segment = ir.to_proto, runtime.segment_model

    def counted_to_proto(*args, **kwargs):
        calls["to_proto"] += 1
        return to_proto(*args, **kwargs)

    def counted_segment(*args, **kwargs):
        calls["segment"] += 1
        return segment(*args, **kwargs)

    monkeypatch.setattr(ir, "to_proto", counted_to_proto)
    monkeypatch.setattr(runtime, "segment_model", counted_segment)
    with runtime.serialized_once(model):
        fused = Session(model, max_nodes=300)
        reference = Session(model, optimize=False, max_nodes=300)
        other = Session(model.clone(), max_nodes=300)  # another object: serialized on its own
    assert calls == {"to_proto": 2, "segment": 2} and fused.segments and reference.segments and other.segments
    np.testing.assert_array_equal(fused.run(feed)[0], expected)
    Session(model, max_nodes=300)  # outside the block: serialized again
    assert calls == {"to_proto": 3, "segment": 3}


def test_segment_types_come_from_the_graph_without_shape_inference(monkeypatch):
    """The deployable graph has no value types on QuantizeLinear outputs: the cut types them from
    their zero point and input (onnx shape inference of the whole graph is not run)."""
    model, _ = _deployed_chain(600)
    proto = ir.to_proto(model)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda *a, **k: pytest.fail("shape inference ran"))
    segments = runtime.segment_model(proto, 300)
    assert segments is not None and len(segments) >= 3
    for part in segments[1:]:
        (value,) = [v for v in part.model.graph.input if v.name == part.inputs[0]]
        assert value.type.tensor_type.elem_type == TensorProto.UINT8
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [BATCH, WIDTH]
