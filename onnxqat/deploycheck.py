"""A check run of the deployable QDQ model before it is published.

The exported ``model_qdq.onnx`` is run in a default onnxruntime session (fused integer kernels)
and with graph optimizations off (the reference: every Q/DQ evaluated in float) on a few
calibration samples. A model that fails to load or run is an error (nothing is written); a gap
between fused and reference outputs beyond :data:`GAP_LSB` steps of the output's quantizer is a
warning naming the first quantized tensor where fused and reference part (found by running
prefixes of the graph).

Gaps are the 99.9th percentile of the per-element difference: broken arithmetic (saturating
kernels) moves most elements, while fused kernels' rounding, amplified at near-ties of a softmax
(PaddleOCR's 6625-way recognizer flips 2% of its positions between two close classes), moves few.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
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
        first_gap: The first quantized tensor (a DequantizeLinear output) where fused and reference
            differ by more than one step, when some output's gap exceeds :data:`GAP_LSB`.
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
        first = _first_gap(model, feed)
        worst = max((g for g in gaps.values() if g is not None), default=0.0)
        where = f"; fused and reference first part at '{first}'" if first else ""
        warnings.warn(f"the deployed model's fused integer kernels differ from the reference graph by {worst:.0f} "
                      f"quantization steps at the output{where}", RuntimeWarning, stacklevel=3)
    return DeployCheck(gaps, first, ort.__version__)


def _activation_dq(model: ir.Model) -> list[ir.Value]:
    return [n.outputs[0] for n in model.graph
            if n.op_type == "DequantizeLinear" and n.inputs[0] is not None and n.inputs[0].const_value is None]


def _prefix_gap(model: ir.Model, feed: Mapping[str, np.ndarray], value_name: str) -> float:
    clone = model.clone()
    values = {v.name: v for n in clone.graph for v in n.outputs}
    clone.graph.outputs.clear()
    clone.graph.outputs.append(values[value_name])
    remove_dead_nodes(clone.graph)
    dq = values[value_name].producer()
    assert dq is not None
    scale = dq.inputs[1].const_value.numpy() if dq.inputs[1] is not None and dq.inputs[1].const_value is not None else None
    a = Session(clone).run(feed)[0]
    b = Session(clone, optimize=False).run(feed)[0]
    lsb = float(np.max(scale)) if scale is not None else 1.0
    return _gap(a, b, lsb)


def _first_gap(model: ir.Model, feed: Mapping[str, np.ndarray]) -> str | None:
    """Bisection over activation DequantizeLinear outputs in graph order (gaps only grow)."""
    candidates: Sequence[ir.Value] = _activation_dq(model)
    lo, hi = -1, len(candidates) - 1
    try:
        if hi < 0 or _prefix_gap(model, feed, candidates[hi].name or "") <= 1.0:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _prefix_gap(model, feed, candidates[mid].name or "") > 1.0:
                hi = mid
            else:
                lo = mid
    except Exception:  # a prefix that cannot run on its own: no location, the warning still stands
        return None
    producer = candidates[hi].producer()
    q = producer.inputs[0].producer() if producer is not None and producer.inputs[0] is not None else None
    op = q.inputs[0].producer() if q is not None and q.inputs[0] is not None else None
    # a Relu/Clip is fused into the kernel before it: name the layer
    while op is not None and rule(op.op_type, op.domain).kind is OpKind.CLAMP and op.inputs[0] is not None \
            and op.inputs[0].producer() is not None:
        op = op.inputs[0].producer()
    return op.name if op is not None and op.name else candidates[hi].name
