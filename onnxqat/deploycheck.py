"""A check run of the deployable QDQ model before it is published.

The exported ``model_qdq.onnx`` is run in a default onnxruntime session (fused integer kernels)
and with graph optimizations off (the reference: every Q/DQ evaluated in float) on a few
calibration samples. A model that fails to load or run is an error (nothing is written); a gap
between fused and reference outputs beyond :data:`GAP_LSB` steps of the output's quantizer is a
warning. It names the first integer kernel (in graph order) that is more than one step from the
reference *on the same input integers*: each kernel site (the nodes between the DequantizeLinear
of its inputs and its QuantizeLinear) is run fused and unfused on the reference graph's own
integers. Such a kernel computes something else than the graph says (saturating arithmetic);
when there is none, every fused kernel only rounds once where the reference rounds after float
ops, and the output gap is that rounding amplified downstream (a grid finer than its input's, a
steep function such as a Sigmoid before the output): the warning says so. PP-OCRv4 det W4A8:
21-31 steps at the output, each of its 195 kernel sites within one step (27 s for two 448x448 images).

Gaps are the 99.9th percentile of the per-element difference: broken arithmetic (saturating
kernels) moves most elements, while fused kernels' rounding, amplified at near-ties of a softmax
(PaddleOCR's 6625-way recognizer flips 2% of its positions between two close classes), moves few.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxqat.runtime import ort
from onnxqat.errors import ModelError
from onnxqat.graph import remove_dead_nodes
from onnxqat.ops import OpKind, rule
from onnxqat.runtime import SEGMENT_NODES, Session

__all__ = ["GAP_LSB", "DeployCheck", "check_deployment"]

# Fused kernels round each requantization once where the reference rounds after float ops: a few
# steps of difference at the output are normal after many layers; more points at a kernel whose
# arithmetic is not what the simulation assumed.
GAP_LSB = 4.0
_GAP_PERCENTILE = 99.9


def _gap(a: np.ndarray, b: np.ndarray, lsb: float) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
    return float(np.percentile(d, _GAP_PERCENTILE)) / lsb if d.size else 0.0


@dataclasses.dataclass(frozen=True)
class DeployCheck:
    """What the check run found.

    Attributes:
        gaps: Output name -> 99.9th percentile of |fused - reference| in steps of its quantizer
            (None when the output is not quantized).
        first_gap: When some output's gap exceeds :data:`GAP_LSB`: the first integer kernel (its
            layer's name) more than one step from the reference on the same input integers, or
            None when every kernel is within one step.
        runtime: onnxruntime version that ran it.
    """

    gaps: Mapping[str, float | None]
    first_gap: str | None
    runtime: str


_CPP_LOCATION = re.compile(r"/?[\w./-]+\.(?:h|cc|cpp):\d+\s+(?:[\w:<>&,\s*~]+\([^()]*\)\s*)?")


def _error_line(e: BaseException) -> str:
    """onnxruntime's message without its C++ locations and signatures, on one line."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
    text = text.rsplit("] : ", 1)[-1]
    text = _CPP_LOCATION.sub("", text)
    for marker in ("FAIL : ", "RUNTIME_EXCEPTION : "):
        text = text.rsplit(marker, 1)[-1]
    return text.strip()[:300]


def _failing_node(model: ir.Model, feed: Mapping[str, np.ndarray], message: str = "") -> ir.Node | None:
    """The node that fails: the first whose prefix of the graph fails to load or run fused (a
    prefix changes what onnxruntime fuses, so it can land just after the culprit); when the message
    names an op type, the nearest such node upstream of it."""
    nodes = [n for n in model.graph if n.outputs and n.outputs[0].name]

    def fails(k: int) -> bool:
        clone = model.clone()
        values = {v.name: v for n in clone.graph for v in n.outputs}
        clone.graph.outputs.clear()
        clone.graph.outputs.append(values[nodes[k].outputs[0].name])
        remove_dead_nodes(clone.graph)  # onnxruntime builds kernels for every node present
        try:
            Session(clone).run(feed)
        except Exception:
            return True
        return False

    lo, hi = -1, len(nodes) - 1
    if hi < 0 or not fails(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid
    found = nodes[hi]
    named = {n.op_type for n in model.graph if re.search(rf"\b{re.escape(n.op_type)}\b", message)}
    named -= {"QuantizeLinear", "DequantizeLinear"}
    queue, seen = [found], set[int]()
    while queue:  # breadth-first upstream
        node = queue.pop(0)
        if id(node) in seen or len(seen) > 64:
            continue
        seen.add(id(node))
        if node.op_type in named:
            return node
        queue.extend(p for v in node.inputs if v is not None and (p := v.producer()) is not None)
    while found.op_type in ("QuantizeLinear", "DequantizeLinear") and found.inputs[0] is not None:
        producer = found.inputs[0].producer()
        if producer is None:
            break
        found = producer
    return found


def check_deployment(model: ir.Model, feed: Mapping[str, np.ndarray], lsbs: Mapping[str, float | None]) -> DeployCheck:
    """Run ``model`` fused and unfused on ``feed``; raise :class:`ModelError` if it cannot run.

    ``lsbs``: output name -> scale of its quantizer (None for float outputs).
    """
    try:
        fused = Session(model, max_nodes=SEGMENT_NODES)  # linear build on large graphs (runtime.segment_model)
        outputs = fused.run(feed)
    except Exception as e:  # onnxruntime raises its own exception types
        message = _error_line(e)
        node = _failing_node(model, feed, message)
        at = f" at node '{node.name}' ({node.op_type})" if node is not None else ""
        raise ModelError(f"the exported QDQ model does not run in onnxruntime {ort.__version__}{at}: {message}") from None
    try:
        reference = Session(model, optimize=False, max_nodes=SEGMENT_NODES).run(feed)
    except Exception as e:
        raise ModelError(f"the exported QDQ model's reference graph does not run: {_error_line(e)}") from None
    gaps: dict[str, float | None] = {}
    for name, a, b in zip(fused.output_names, outputs, reference):
        lsb = lsbs.get(name)
        if lsb is None or np.asarray(a).dtype.kind != "f":
            gaps[name] = None
            continue
        gaps[name] = _gap(a, b, lsb)
    first = None
    if any(g is not None and g > GAP_LSB for g in gaps.values()):
        first, scanned = _first_local_gap(model, feed)
        worst = max((g for g in gaps.values() if g is not None), default=0.0)
        if first:
            where = (f"; fused and reference first part at '{first}' (more than one step off on the same input "
                     "integers)")
        elif scanned:
            where = (f"; each of the {scanned} integer kernels is within one step of the reference on the same inputs: "
                     "their rounding, amplified downstream (a finer grid after a coarse one, a steep function before "
                     "the output)")
        else:
            where = ""
        warnings.warn(f"the deployed model's fused integer kernels differ from the reference graph by {worst:.0f} "
                      f"quantization steps at the output{where}", RuntimeWarning, stacklevel=3)
    return DeployCheck(gaps, first, ort.__version__)


_LOCAL_STEPS = 1.0 + 1e-3
_MAX_SITE_NODES = 64


def _kernel_sites(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto], set[str]]]:
    """Each activation QuantizeLinear with the nodes computing its input back to the integers it
    reads (QuantizeLinear outputs or graph inputs; constants come along): ``(q, nodes, boundary)``,
    nodes in graph order, in graph order of ``q``."""
    g = proto.graph
    constants = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    order = {id(n): i for i, n in enumerate(g.node)}
    sites = []
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in constants:
            continue
        nodes: list[onnx.NodeProto] = []
        boundary: set[str] = set()
        stack, seen = [q.input[0]], set()
        while stack and len(nodes) <= _MAX_SITE_NODES:
            t = stack.pop()
            if not t or t in seen or t in constants:
                continue
            seen.add(t)
            n = producer.get(t)
            if n is None or (n.op_type == "QuantizeLinear" and n.input[0] not in constants):
                boundary.add(t)
            else:
                nodes.append(n)
                stack.extend(n.input)
        if len(nodes) <= _MAX_SITE_NODES and nodes:
            sites.append((q, sorted(nodes, key=lambda n: order[id(n)]), boundary))
    return sites


def _first_local_gap(model: ir.Model, feed: Mapping[str, np.ndarray]) -> tuple[str | None, int]:
    """The first integer kernel more than one step from the reference on the reference's own input
    integers (its layer's name), and how many kernel sites were compared."""
    try:
        proto = ir.to_proto(model)
        g = proto.graph
        given = dict(feed)
        sites = _kernel_sites(proto)
        boundary = sorted({b for _, _, bs in sites for b in bs if b not in given})
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(b, onnx.TensorProto.UNDEFINED, None) for b in boundary)
        for out in probe.graph.output:  # QuantizeLinear outputs: the dtype of their zero point
            q = next(n for n in g.node if out.name in n.output)
            zp = next((i for i in g.initializer if len(q.input) > 2 and i.name == q.input[2]), None)
            out.type.tensor_type.elem_type = zp.data_type if zp is not None else onnx.TensorProto.UINT8
        values = {**given, **dict(zip(boundary, Session(probe, optimize=False).run(given)))}
        initializers = {i.name: i for i in g.initializer}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for q, nodes, bounds in sites:
            dq = next((n for n in consumers.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None)
            if dq is None:
                continue
            inputs = []
            for b in sorted(bounds):
                array = values[b]
                inputs.append(onnx.helper.make_tensor_value_info(
                    b, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
            used = {i for n in [*nodes, q, dq] for i in n.input}
            sub = onnx.helper.make_graph([*nodes, q, dq], "site", inputs,
                                         [onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)],
                                         [initializers[i] for i in sorted(used) if i in initializers])
            site = onnx.helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)
            site_feed = {b: values[b] for b in bounds}
            fused = Session(site).run(site_feed)[0]
            reference = Session(site, optimize=False).run(site_feed)[0]
            scale = initializers.get(dq.input[1])
            lsb = float(np.max(onnx.numpy_helper.to_array(scale))) if scale is not None else 1.0
            if np.abs(np.asarray(fused, np.float64) - np.asarray(reference, np.float64)).max() / lsb > _LOCAL_STEPS:
                return _layer_name(model, q.input[0]), len(sites)
        return None, len(sites)
    except Exception:  # a site that cannot run on its own: no location, the warning still stands
        return None, 0


def _layer_name(model: ir.Model, tensor: str) -> str:
    """The node producing ``tensor`` (a Relu/Clip fused into the kernel before it: that kernel)."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    value = values.get(tensor)
    op = value.producer() if value is not None else None
    while op is not None and rule(op.op_type, op.domain).kind is OpKind.CLAMP and op.inputs[0] is not None \
            and op.inputs[0].producer() is not None:
        op = op.inputs[0].producer()
    return op.name if op is not None and op.name else tensor
