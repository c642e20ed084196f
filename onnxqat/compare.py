"""Compare a quantized model with its float original on data, output by output.

For every output the float and the quantized model share (by name): SQNR, cosine similarity,
top-1 agreement along the last axis (outputs with 2 or more entries there), and the largest
difference; for the quantized model also fused (default session) against reference (graph
optimizations off), in steps of its output quantizer when the output comes out of a
DequantizeLinear. Any layout: inputs are batched along their own axes (``batch_axes``), outputs
are compared element by element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat.errors import DataError, ModelError
from onnxqat.graph import name_of
from onnxqat.runtime import Session

__all__ = ["OutputComparison", "compare_models"]


@dataclasses.dataclass
class _Acc:
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    norm_a: float = 0.0
    norm_b: float = 0.0
    agree: int = 0
    total: int = 0
    max_diff: float = 0.0
    classes: bool = True

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        self.signal += float(a @ a)
        self.noise += float((a - b) @ (a - b))
        self.dot += float(a @ b)
        self.norm_a += float(a @ a)
        self.norm_b += float(b @ b)
        self.max_diff = max(self.max_diff, float(np.abs(a - b).max()) if a.size else 0.0)
        if ref.ndim >= 1 and ref.shape[-1] >= 2:
            self.agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            self.total += int(np.prod(ref.shape[:-1]))
        else:
            self.classes = False


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """One output's numbers (see module docstring); None where not applicable."""

    output: str
    sqnr_db: float
    cosine: float
    top1_agreement: float | None
    max_abs_diff: float
    fused_vs_reference_lsb: float | None
    fused_vs_reference_agreement: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _output_scales(model: ir.Model) -> dict[str, float]:
    scales = {}
    for value in model.graph.outputs:
        node = value.producer()
        if node is not None and node.op_type == "DequantizeLinear" and len(node.inputs) > 1:
            scale = node.inputs[1]
            if scale is not None and scale.const_value is not None:
                scales[value.name or ""] = float(np.max(scale.const_value.numpy()))
    return scales


def _db(signal: float, noise: float) -> float:
    return 120.0 if noise <= signal * 1e-12 else float(10 * np.log10(max(signal, 1e-300) / noise))


def compare_models(float_model: ir.Model, quantized: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]) -> list[OutputComparison]:
    """Compare ``quantized`` with ``float_model`` on ``batches`` (dicts of input arrays)."""
    float_outputs = [name_of(v) for v in float_model.graph.outputs]
    q_outputs = [name_of(v) for v in quantized.graph.outputs]
    common = [n for n in float_outputs if n in q_outputs]
    if not common:
        raise ModelError(f"the models share no output name (float: {float_outputs}, quantized: {q_outputs})")
    try:
        ref_session = Session(float_model)
        fused = Session(quantized)
        unfused = Session(quantized, optimize=False)
    except Exception as e:
        raise ModelError(f"onnxruntime cannot load a model: {str(e).strip().splitlines()[0][:300]}") from None
    scales = _output_scales(quantized)
    vs_float = {n: _Acc() for n in common}
    vs_ref = {n: _Acc() for n in common}
    seen = 0
    for i, batch in enumerate(batches):
        try:
            a = dict(zip(ref_session.output_names, ref_session.run(batch)))
            b = dict(zip(fused.output_names, fused.run(batch)))
            c = dict(zip(unfused.output_names, unfused.run(batch)))
        except KeyError as e:
            raise DataError(f"batch {i}: no array for model input {e}") from None
        except Exception as e:
            raise DataError(f"batch {i}: onnxruntime failed: {str(e).strip().splitlines()[0][:300]}") from None
        for name in common:
            if a[name].shape != b[name].shape:
                raise ModelError(f"output '{name}': shapes differ ({list(a[name].shape)} vs {list(b[name].shape)})")
            if np.asarray(a[name]).dtype.kind == "f":
                vs_float[name].add(a[name], b[name])
                vs_ref[name].add(c[name], b[name])
        seen += 1
    if seen == 0:
        raise DataError("no batches to compare on")
    results = []
    for name in common:
        f, r = vs_float[name], vs_ref[name]
        lsb = scales.get(name)
        results.append(OutputComparison(
            output=name,
            sqnr_db=_db(f.signal, f.noise),
            cosine=f.dot / max(np.sqrt(f.norm_a * f.norm_b), 1e-300),
            top1_agreement=f.agree / f.total if f.classes and f.total else None,
            max_abs_diff=f.max_diff,
            fused_vs_reference_lsb=r.max_diff / lsb if lsb else None,
            fused_vs_reference_agreement=r.agree / r.total if r.classes and r.total else None,
        ))
    return results
