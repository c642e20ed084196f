"""Weight rounding for PTQ: SeqMSE scale search, AdaRound, bias correction, from layer statistics.

A weighted layer computes ``y_m = w_m . x`` for each output channel ``m`` over input patches
``x`` (a Conv's receptive fields, a MatMul's rows). With quantized weights ``w + d`` the output
error is ``d^T H d`` with ``H = E[x x^T]``, and its mean is ``d . mu`` with ``mu = E[x]``. So one
pass of the calibration data through the simulation, accumulating ``H`` and ``mu`` of every
weighted layer's (quantized) input, is all the data these methods need; memory is one ``K x K``
matrix per layer (per group for grouped convolutions), whatever the data size.

* ``seqmse``: per output channel, the scale ``alpha * s`` (``alpha`` from 1 down to 0.2, never
  below the target's pair limit) that minimises ``d^T H d``: clipping traded against rounding,
  measured on the layer's output (AIMET's Sequential MSE idea, with the exact quadratic instead
  of re-running the layer per candidate).
* ``adaround``: on the chosen grid, each weight rounds up or down as a relaxed variable optimised
  against ``d^T H d`` with AdaRound's annealed regulariser (Nagel et al. 2020), by Adam in numpy.
* bias correction: ``b -= d . mu`` per channel, so the layer's mean output is unbiased. Where a
  layer's bias is corrected, the two methods minimise the error's variance
  ``d^T (H - mu mu^T) d`` instead (the mean part is removed by the correction anyway).
* target: by default the layer is matched to the float weights on the same simulated input;
  with ``target="float"`` (and the float model's inputs ``f`` in the statistics) to the float
  model's ``w . f``, which also absorbs the input's error.

Results are weight encodings that no longer follow the weights (``SimState.fixed``) and, for
AdaRound, weights moved onto their rounded grid values (``s * q``), so that quantizing them gives
exactly the chosen integers; QAT afterwards trains weights on that grid.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat import ops
from onnxqat.graph import const_array
from onnxqat.passes.expose import ExposeValuesPass
from onnxqat.passes.insert_qdq import InsertQDQPass
from onnxqat.plan import ParamQuantizer
from onnxqat.progress import Progress
from onnxqat.qparams import Encoding, pair_safe_scale
from onnxqat.runtime import Session
from onnxqat.spec import Choice

__all__ = ["LayerStats", "Rounding", "WeightRoundingReport", "collect_layer_stats", "round_weights"]

_POSITIONS_PER_BATCH = 2048  # patches sampled per batch and layer (convolutions)
_SEQMSE_FACTORS = np.linspace(1.0, 0.2, 41)


class Rounding(Choice):
    """How weights are rounded after calibration."""

    NONE = "none"
    SEQMSE = "seqmse"
    ADAROUND = "adaround"

    @classmethod
    def describe(cls) -> str:
        return "weight rounding"


@dataclasses.dataclass
class LayerStats:
    """``H = E[x x^T]`` and ``mu = E[x]`` of one weighted layer's input patches ``x`` in the
    simulation, per group; with the float model's patches ``f`` at the same positions, also
    ``C = E[x f^T]`` and ``mu_f = E[f]`` (None when they were not collected)."""

    node: str
    groups: int
    hessian: np.ndarray  # [groups, K, K]
    mean: np.ndarray  # [groups, K]
    rows: int = 0
    cross: np.ndarray | None = None  # [groups, K, K]
    mean_float: np.ndarray | None = None  # [groups, K]

    def add(self, patches: np.ndarray, float_patches: np.ndarray | None = None) -> None:
        """``patches`` (and ``float_patches``, the same positions in the float model): [groups, n, K]."""
        n = patches.shape[1]
        if n == 0:
            return
        total = self.rows + n
        keep = self.rows / total
        p = patches.astype(np.float64)
        pt = p.transpose(0, 2, 1)
        self.hessian = self.hessian * keep + (pt @ p) / total
        self.mean = self.mean * keep + p.sum(axis=1) / total
        if float_patches is not None:
            f = float_patches.astype(np.float64)
            cross = np.zeros_like(self.hessian) if self.cross is None else self.cross
            mean_float = np.zeros_like(self.mean) if self.mean_float is None else self.mean_float
            self.cross = cross * keep + (pt @ f) / total
            self.mean_float = mean_float * keep + f.sum(axis=1) / total
        self.rows = total


@dataclasses.dataclass(frozen=True)
class WeightRoundingReport:
    """Per weight: output MSE of the layer (``d^T H d`` summed over channels) before and after."""

    method: str
    seconds: float
    layers: Mapping[str, tuple[float, float]]


_OPENBLAS_THREADS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_",
                     "openblas_get_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_get_num_threads", "openblas_set_num_threads")


def _openblas() -> tuple[Any, Any] | None:
    """(get, set) of the thread count of the OpenBLAS numpy has loaded, if any (Linux: found in
    /proc/self/maps, as threadpoolctl finds it)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in zip(_OPENBLAS_THREADS[::2], _OPENBLAS_THREADS[1::2]):
            get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and put is not None:
                return get, put
    return None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """One BLAS thread for the per-layer numerics (numpy's OpenBLAS; elsewhere unchanged).

    Their matrices are small and batched (a depthwise 5x5 convolution's 200 Hessians of 25 x 25
    from 2048 patches): OpenBLAS's threads on them ran 10-20x slower than one thread on the
    shared 2-core machine measured (bench/results/ptq.md)."""
    found = _openblas()
    if found is None:
        yield
        return
    get, put = found
    before = int(get())
    put(ctypes.c_int(1))
    try:
        yield
    finally:
        put(ctypes.c_int(before))


def _int_attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_ints() if isinstance(default, list) else attr.as_int()


def _conv_pads(node: ir.Node, x: np.ndarray, kernel: tuple[int, ...], strides: list[int],
               dilations: list[int]) -> list[int]:
    spatial = len(kernel)
    auto_pad = node.attributes.get("auto_pad")
    mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    if mode in ("NOTSET", ""):
        return list(_int_attr(node, "pads", [0] * (2 * spatial)))
    if mode == "VALID":
        return [0] * (2 * spatial)
    begin, end = [], []
    for i in range(spatial):
        out = -(-x.shape[2 + i] // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x.shape[2 + i], 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _conv_patches(node: ir.Node, x: np.ndarray, kernel: tuple[int, ...], rng: np.random.Generator,
                  others: tuple[np.ndarray, ...] = ()) -> list[np.ndarray]:
    """Receptive fields of a 1-d/2-d Conv as [groups, n, C/g * prod(kernel)] (sampled), in the
    weight's (channel, kernel...) order; for ``x`` and then each of ``others`` (same shape) at the
    same sampled positions."""
    spatial = x.ndim - 2
    group = _int_attr(node, "group", 1)
    strides = list(_int_attr(node, "strides", [1] * spatial))
    dilations = list(_int_attr(node, "dilations", [1] * spatial))
    pads = _conv_pads(node, x, kernel, strides, dilations)
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[spatial + i]) for i in range(spatial)]
    padded_shape = [x.shape[2 + i] + pads[i] + pads[spatial + i] for i in range(spatial)]
    out_shape = [(padded_shape[i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(spatial)]
    n, c = x.shape[:2]
    positions = n * int(np.prod(out_shape))
    take = min(positions, _POSITIONS_PER_BATCH)
    flat = rng.choice(positions, size=take, replace=False) if take < positions else np.arange(positions)
    idx = np.unravel_index(flat, [n, *out_shape])
    channels = np.arange(c)[None, :]
    cg = c // group
    result = []
    for array in (x, *others):
        xp = np.pad(array, widths)
        taps = []
        for offset in np.ndindex(*kernel):
            coords = tuple((idx[1 + i] * strides[i] + offset[i] * dilations[i])[:, None] for i in range(spatial))
            taps.append(xp[(idx[0][:, None], channels) + coords])  # [take, C]
        patches = np.stack(taps, axis=-1)  # [take, C, taps]
        result.append(patches.reshape(take, group, cg * len(taps)).transpose(1, 0, 2))
    return result


def _rows(node: ir.Node, index: int, x: np.ndarray) -> np.ndarray:
    """MatMul/Gemm input rows as [1, n, K]."""
    if node.op_type == "Gemm" and _int_attr(node, "transA", 0):
        x = x.T
    if index == 0:  # constant first operand: the data is B, contracted over its first axis
        x = np.moveaxis(x, -2, -1)
    return x.reshape(1, -1, x.shape[-1])


def _weight_rows(node: ir.Node, index: int, w: np.ndarray) -> np.ndarray:
    """The weight as [groups, M/g, K], matching the patches' K order; and back via _unrows."""
    if node.op_type in ("Conv",):
        group = _int_attr(node, "group", 1)
        m = w.shape[0]
        return w.reshape(group, m // group, -1)
    if node.op_type == "Gemm":
        if index == 1:
            return (w if _int_attr(node, "transB", 0) else w.T)[None]
        return (w.T if _int_attr(node, "transA", 0) else w)[None]
    # MatMul: x [.., K] @ w [K, N] -> rows of w.T
    return w.T[None] if index == 1 else w[None]


def _unrows(node: ir.Node, index: int, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv":
        return rows.reshape(shape)
    r: np.ndarray = rows[0]
    if node.op_type == "Gemm":
        if index == 1:
            return r if _int_attr(node, "transB", 0) else r.T
        return r.T if _int_attr(node, "transA", 0) else r
    return r.T if index == 1 else r


def collect_layer_stats(state: Any, batches: Iterable[Mapping[str, np.ndarray]], *, progress: bool | None = None,
                        seed: int = 0, float_inputs: bool = True) -> dict[str, LayerStats]:
    """Streams ``batches`` through the simulation of ``state`` (a SimState) and accumulates the
    input statistics of every node that consumes a quantized weight (keyed by weight name).
    With ``float_inputs``, the float model runs on the same batches too, and each layer's
    statistics also hold the cross moments of its simulated and float inputs (for the methods'
    float target: ``w_q . x`` against ``w . f``)."""
    plan = state.effective_plan
    model = state.float_model
    nodes = {n.name: n for n in model.graph}
    targets: dict[str, tuple[ir.Node, int, str]] = {}
    for p in plan.params:
        for consumer in p.consumers:
            node = nodes.get(consumer)
            index = ops.weight_index(node) if node is not None else None
            if node is None or index is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            data = node.inputs[1 - index] if node.op_type != "Conv" else node.inputs[0]
            if data is None or not data.name:
                continue
            if node.op_type == "Conv" and (node.inputs[1].shape is None or len(node.inputs[1].shape) not in (3, 4)):
                continue
            targets.setdefault(p.name, (node, index, data.name))  # a shared weight: its first consumer
    inserted = InsertQDQPass(plan, state.encodings, fold_weights=False)(model)
    sites = inserted.sites
    sim = ExposeValuesPass(sorted({sites.get(t, t) for _, _, t in targets.values()}))(inserted.model).model
    session = Session(sim)
    float_session = None
    if float_inputs:
        float_session = Session(ExposeValuesPass(sorted({t for _, _, t in targets.values()}))(model.clone()).model)
    rng = np.random.default_rng(seed)
    stats: dict[str, LayerStats] = {}
    with _one_blas_thread():
        for batch in Progress(batches, total=None, desc="layer statistics", enabled=progress):
            _add_batch(batch, session, float_session, sites, targets, rng, stats)
    return stats


def _add_batch(batch: Mapping[str, np.ndarray], session: Session, float_session: Session | None,
               sites: Mapping[str, str], targets: Mapping[str, tuple[ir.Node, int, str]], rng: np.random.Generator,
               stats: dict[str, LayerStats]) -> None:
    outs = dict(zip(session.output_names, session.run(batch)))
    fed = {**{k: np.asarray(v) for k, v in batch.items()}, **outs}
    float_fed: dict[str, np.ndarray] = {}
    if float_session is not None:
        float_fed = {**{k: np.asarray(v) for k, v in batch.items()},
                     **dict(zip(float_session.output_names, float_session.run(batch)))}
    for weight, (node, index, tensor) in targets.items():
        x = fed.get(sites.get(tensor, tensor))
        if x is None:
            continue
        x = np.asarray(x, dtype=np.float32)
        f = float_fed.get(tensor)
        others = () if f is None else (np.asarray(f, dtype=np.float32),)
        w = const_array(node.inputs[index])
        assert w is not None
        if node.op_type == "Conv":
            patches, *rest = _conv_patches(node, x, tuple(w.shape[2:]), rng, others)
        else:
            patches, *rest = (_rows(node, index, a) for a in (x, *others))
            if patches.shape[1] > _POSITIONS_PER_BATCH:
                pick = rng.choice(patches.shape[1], _POSITIONS_PER_BATCH, replace=False)
                patches, rest = patches[:, pick], [r[:, pick] for r in rest]
        entry = stats.get(weight)
        if entry is None:
            g, _, k = patches.shape
            entry = stats[weight] = LayerStats(node.name or weight, g, np.zeros((g, k, k)), np.zeros((g, k)))
        entry.add(patches, rest[0] if rest else None)


def _quantize_rows(rows: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    q: np.ndarray = np.clip(np.rint(rows / scale[..., None]), qmin, qmax)
    return q


def _row_error(delta: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``d^T H d`` for every row: delta [g, m, K], hessian [g, K, K] -> [g, m]."""
    err: np.ndarray = ((delta @ hessian) * delta).sum(axis=-1)  # batched BLAS: einsum's three-operand loop is ~100x slower
    return err


@dataclasses.dataclass(frozen=True)
class _Objective:
    """One layer's output error as a function of the weight error ``d`` (per row):
    ``d^T H d + 2 d . lin`` (+ a constant that no choice changes)."""

    hessian: np.ndarray  # [g, K, K]
    lin: np.ndarray  # [g, m, K]

    def error(self, delta: np.ndarray) -> np.ndarray:
        err: np.ndarray = _row_error(delta, self.hessian) + 2.0 * (delta * self.lin).sum(axis=-1)
        return err

    def gradient(self, delta: np.ndarray) -> np.ndarray:
        grad: np.ndarray = 2.0 * (delta @ self.hessian + self.lin)
        return grad


def _objective(st: LayerStats, rows: np.ndarray, *, target: str, centered: bool) -> _Objective:
    """``target="quantized"``: ``(w_q - w) . x`` on the simulation's input ``x``; ``"float"``:
    ``w_q . x - w . f`` against the float model's input ``f`` (AIMET's choice: the weights also
    absorb the input's error). ``centered``: of the error's variance, its mean being removed
    by bias correction afterwards."""
    hessian = st.hessian
    use_float = target == "float" and st.cross is not None and st.mean_float is not None
    cross = st.cross if use_float else None
    if centered:
        hessian = hessian - st.mean[:, :, None] * st.mean[:, None, :]
        if cross is not None:
            assert st.mean_float is not None
            cross = cross - st.mean[:, :, None] * st.mean_float[:, None, :]
    if cross is None:
        return _Objective(hessian, np.zeros_like(rows))
    # E[(w_q x - w f)^2] = d^T H d + 2 d^T (H - C) w + const, with w_q = w + d and C = E[x f^T]
    return _Objective(hessian, rows @ (hessian - cross).transpose(0, 2, 1))


def _seqmse_scale(rows: np.ndarray, base: np.ndarray, floor: np.ndarray, objective: _Objective,
                  qmin: int, qmax: int) -> np.ndarray:
    best = np.full(base.shape, np.inf)
    chosen: np.ndarray = base.copy()
    for factor in _SEQMSE_FACTORS:
        scale = np.maximum(base * factor, floor)
        delta = _quantize_rows(rows, scale, qmin, qmax) * scale[..., None] - rows
        err = objective.error(delta)
        better = err < best
        best[better], chosen[better] = err[better], scale[better]
    return chosen


def _adaround(rows: np.ndarray, scale: np.ndarray, objective: _Objective, qmin: int, qmax: int,
              iterations: int, reg: float = 0.1) -> np.ndarray:
    """Integer weights [g, m, K] chosen by AdaRound on the layer quadratic."""
    zeta, gamma = 1.1, -0.1
    hessian = objective.hessian
    s = scale[..., None]
    base = np.floor(rows / s)
    rest = rows / s - base
    # initialise so that the rectified sigmoid reproduces the fractional part
    init = np.clip((rest - gamma) / (zeta - gamma), 1e-4, 1 - 1e-4)
    v = np.log(init / (1 - init))
    m_t = np.zeros_like(v)
    v_t = np.zeros_like(v)
    norm = max(float(np.einsum("gkk->", hessian)) / hessian.shape[-1], 1e-30) * float(np.mean(s * s))
    lr = 1e-2
    for it in range(iterations):
        sig = 1.0 / (1.0 + np.exp(-v))
        soft = sig * (zeta - gamma) + gamma
        h = np.clip(soft, 0.0, 1.0)
        q = np.clip(base + h, qmin, qmax)
        delta = q * s - rows
        grad_q = objective.gradient(delta) * s / (norm * delta.shape[1])
        inside = (base + h > qmin) & (base + h < qmax)
        grad_h = grad_q * inside
        beta = 20.0 + (2.0 - 20.0) * min(1.0, it / max(iterations * 0.8, 1))
        if it >= iterations * 0.2:
            t = 2 * h - 1
            grad_h = grad_h - reg * beta * np.abs(t) ** (beta - 1) * np.sign(t) * 2
        grad_v = grad_h * ((soft > 0) & (soft < 1)) * (zeta - gamma) * sig * (1 - sig)
        m_t = 0.9 * m_t + 0.1 * grad_v
        v_t = 0.999 * v_t + 0.001 * grad_v * grad_v
        v -= lr * (m_t / (1 - 0.9 ** (it + 1))) / (np.sqrt(v_t / (1 - 0.999 ** (it + 1))) + 1e-8)
    h = np.clip((1.0 / (1.0 + np.exp(-v))) * (zeta - gamma) + gamma, 0, 1)
    learned = np.clip(base + (h >= 0.5), qmin, qmax)
    # the relaxation can end between grid points; per output channel, keep whichever of the
    # learned and the nearest rounding has the smaller exact layer error
    nearest = _quantize_rows(rows, scale, qmin, qmax)
    keep = objective.error(learned * s - rows) <= objective.error(nearest * s - rows)
    return np.where(keep[..., None], learned, nearest)


def round_weights(state: Any, stats: Mapping[str, LayerStats], method: Rounding | str, *,
                  bias_correction: bool = True, iterations: int = 500, target: str = "quantized",
                  centered: bool = True, progress: bool | None = None) -> tuple[Any, WeightRoundingReport]:
    """A new state with the weight encodings (and, for AdaRound, the weights) the method chose,
    biases corrected for the layer's mean output error. Weights without statistics are left alone.

    ``target``: ``"quantized"`` (default) matches ``w_q . x`` to ``w . x`` on the simulated input,
    ``"float"`` to the float model's ``w . f`` where the statistics hold the float inputs (and
    corrects the bias for the input's mean shift too). All layers are rounded from one pass of
    statistics, so with ``"float"`` each layer also absorbs upstream errors that the upstream
    layers correct themselves: on MTCNN's P-Net at W4A8 that doubled correction cost 19 points
    of top-1 (BENCHMARKS.md, "PTQ accuracy", evening run). ``centered``: where
    the layer's bias is corrected afterwards, minimise the error's variance rather than its
    second moment. The report holds the minimised error before and after (with the float target,
    relative to that of the float weights on the simulated input, so it can be negative)."""
    if target not in ("float", "quantized"):
        raise ValueError(f"unknown weight rounding target {target!r}; expected 'float' or 'quantized'")
    from onnxqat import pipeline

    method = Rounding.parse(method)
    start = time.perf_counter()
    model = state.float_model
    nodes = {n.name: n for n in model.graph}
    params: dict[str, ParamQuantizer] = {p.name: p for p in state.plan.params}
    new_encodings: dict[str, Encoding] = {}
    new_weights: dict[str, np.ndarray] = {}
    fixed = set(state.fixed)
    report: dict[str, tuple[float, float]] = {}
    items = [(name, st) for name, st in stats.items() if name in params]
    with _one_blas_thread():
        for name, st in Progress(items, total=len(items), desc=f"weights ({method.value})", unit="layer", enabled=progress):
            p = params[name]
            node = nodes[st.node] if st.node in nodes else nodes[p.consumers[0]]
            index = ops.weight_index(node)
            assert index is not None
            w = const_array(model.graph.initializers[name])
            assert w is not None
            enc = state.encodings[name]
            if not enc.symmetric:
                continue  # asymmetric weights: left as calibrated
            rows = _weight_rows(node, index, w.astype(np.float64))
            g, mg, k = rows.shape
            channel_scale = np.broadcast_to(enc.scale.astype(np.float64), (g * mg,)) if enc.axis is not None \
                else np.full(g * mg, float(enc.scale))
            base = channel_scale.reshape(g, mg)
            floor = np.zeros_like(base)
            if p.spec.pair_limit is not None:
                floor = pair_safe_scale(rows.reshape(g * mg, k), p.spec.pair_limit).astype(np.float64).reshape(g, mg)
                floor = np.maximum(floor, 0.0)
            qmin, qmax = enc.qmin, enc.qmax
            bias_name = None
            if bias_correction and node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None \
                    and node.inputs[2].name in model.graph.initializers:
                bias_name = node.inputs[2].name
            objective = _objective(st, rows, target=target, centered=centered and bias_name is not None)
            before_delta = _quantize_rows(rows, base, qmin, qmax) * base[..., None] - rows
            before = float(objective.error(before_delta).sum())
            scale = base
            if method in (Rounding.SEQMSE, Rounding.ADAROUND) and enc.axis is not None:
                scale = _seqmse_scale(rows, base, np.minimum(floor, base), objective, qmin, qmax)
            if method is Rounding.ADAROUND:
                q = _adaround(rows, scale, objective, qmin, qmax, iterations)
            else:
                q = _quantize_rows(rows, scale, qmin, qmax)
            delta = q * scale[..., None] - rows
            after = float(objective.error(delta).sum())
            report[name] = (before, after)
            flat_scale = scale.reshape(-1).astype(np.float32)
            if method is not Rounding.NONE:  # bias correction alone keeps the grid following the weights
                if enc.axis is not None:
                    new_encodings[name] = dataclasses.replace(enc, scale=flat_scale)
                fixed.add(name)
            if method is Rounding.ADAROUND:
                new_weights[name] = _unrows(node, index, q * scale[..., None], w.shape).astype(w.dtype)
            if bias_name is not None:
                bias = const_array(node.inputs[2])
                assert bias is not None
                # the mean output error: E[w_q x - w f] (float target) or E[(w_q - w) x]
                shift = np.einsum("gmk,gk->gm", delta, st.mean)
                if target == "float" and st.mean_float is not None:
                    shift = shift + np.einsum("gmk,gk->gm", rows, st.mean - st.mean_float)
                shift = shift.reshape(-1)
                if bias.shape == shift.shape:
                    new_weights[bias_name] = (bias.astype(np.float64) - shift).astype(bias.dtype)
    new_state = state.with_encodings(new_encodings, fixed=frozenset(fixed))
    if new_weights:
        new_state = pipeline.apply_weights(new_state, new_weights)
    return new_state, WeightRoundingReport(method.value, time.perf_counter() - start, report)
