"""Graph-size scaling: simulate, calibrate and export on chains of MatMul+Add+Relu blocks.

Each size runs in a fresh child process (the onnxqat venv) that builds a chain of
``nodes / 3`` blocks (``--width`` x ``--width`` weights), saves it, and times what a user runs:

    simulate  = QuantizationSimModel(path)
    calibrate = sim.compute_encodings([one batch of --batch rows])   (quant_scheme --scheme, minmax)
    export    = sim.export(<temp dir>)

Per stage it reports wall time, the part spent building onnxruntime sessions (every
``InferenceSession`` construction, timed around the call) and running them, and the rest: onnxqat's
own Python time (``own = wall - ort build - ort run``), and the sessions each stage built. The table ends with the log-log slope of
each column over the sizes that finished (1.0 = linear, 2.0 = quadratic) and the local slope
between the last two sizes. A child that exceeds ``--timeout`` is killed; the stages it finished
are kept and the rest are shown as ``>timeout``.

    .venv/bin/python bench/bench_graph_scaling.py [--nodes 1000,3000,10000,30000,100000] [--timeout 900]
        [--python .venv/bin/python] [--json OUT.json]

``--code DIR`` runs the children against another copy of the package (e.g. a ``git archive`` of an
older commit, for before/after tables): it is put first on the children's ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_DIR, load_average, machine_lines, progress  # noqa: E402

STAGES = ("simulate", "calibrate", "export")

CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile, time
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, width, batch, work, scheme = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    blocks = max(1, nodes // 3)
    rng = np.random.default_rng(0)
    graph_nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array((rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array((rng.normal(size=width) * 0.1).astype(np.float32), f"b{i}"))
        graph_nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                        helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                        helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, width])], inits)
    path = os.path.join(work, "chain.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    data = [{"x": rng.normal(size=(batch, width)).astype(np.float32)}]

    import onnxruntime as ort
    ort_time = {"build": 0.0, "run": 0.0, "build_cpu": 0.0, "run_cpu": 0.0, "sessions": 0}
    _init, _run = ort.InferenceSession.__init__, ort.InferenceSession.run
    def timed(fn, key):
        def wrapper(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                ort_time[key] += time.perf_counter() - t
                ort_time[key + "_cpu"] += time.process_time() - c
                ort_time["sessions"] += key == "build"
        return wrapper
    ort.InferenceSession.__init__, ort.InferenceSession.run = timed(_init, "build"), timed(_run, "run")

    import onnxqat
    from onnxqat import QuantizationSimModel

    def stage(name, fn):
        before = dict(ort_time)
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        d = {k: ort_time[k] - before[k] for k in ort_time}
        print(json.dumps({"stage": name, "wall": wall, "cpu": cpu, "ort_build": d["build"], "ort_run": d["run"],
                          "ort_build_cpu": d["build_cpu"], "ort_run_cpu": d["run_cpu"],
                          "own": wall - d["build"] - d["run"], "own_cpu": cpu - d["build_cpu"] - d["run_cpu"],
                          "sessions": d["sessions"], "load": os.getloadavg()[0]}), flush=True)
        return out

    print(json.dumps({"nodes": 3 * blocks, "onnxqat": os.path.dirname(onnxqat.__file__)}), flush=True)
    sim = stage("simulate", lambda: QuantizationSimModel(path, quant_scheme=scheme))
    print(json.dumps({"plan": sim.plan.summary()}), flush=True)
    stage("calibrate", lambda: sim.compute_encodings(data, progress=False))
    out = tempfile.mkdtemp(dir=work)
    stage("export", lambda: sim.export(out))
    """
)


def run_child(python: str, nodes: int, width: int, batch: int, timeout: float, code: str | None,
              scheme: str = "minmax") -> dict:
    """Results of one size: ``{"nodes", "plan", "stages": {stage: {...}}, "timeout": bool}``."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (code, env.get("PYTHONPATH")) if p)
    result: dict = {"nodes": nodes, "stages": {}, "timeout": False, "load_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="onnxqat-scaling-") as work:
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen([python, "-c", CHILD, str(nodes), str(width), str(batch), work, scheme],
                                    stdout=out, stderr=subprocess.PIPE, text=True, cwd=work, env=env)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                result["timeout"] = True
            out.seek(0)
            lines = [json.loads(line) for line in out if line.startswith("{")]
    for line in lines:
        if "stage" in line:
            result["stages"][line["stage"]] = line
        elif "plan" in line:
            result["plan"] = line["plan"]
        elif "onnxqat" in line:
            result["nodes"] = line["nodes"]
            result["onnxqat"] = line["onnxqat"]
    if proc.returncode not in (0, None) and not result["timeout"]:
        raise SystemExit(f"child for {nodes} nodes failed ({proc.returncode}):\n{err[-3000:]}")
    result["load_end"] = load_average()
    return result


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(nodes)."""
    points = [(n, t) for n, t in points if t > 0]
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


COLUMNS = [(stage, key) for stage in STAGES for key in ("own", "own_cpu", "ort_build", "ort_build_cpu")]
LABELS = {"own": "own", "own_cpu": "own CPU", "ort_build": "ort build", "ort_build_cpu": "ort build CPU"}


def table(results: list[dict], timeout: float) -> str:
    """Markdown table: per stage onnxqat's own wall and CPU seconds and onnxruntime's session
    build (wall), then totals; the last rows are log-log slopes."""
    head = ["nodes"] + [f"{stage} {LABELS[key]} (s)" for stage, key in COLUMNS]
    head += ["total own (s)", "total own CPU (s)", "total wall (s)", "sessions", "load 1-min (start/end)"]
    rows = [head, ["---:"] * (len(head) - 1) + [":--"]]
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in head[1:-2]}
    for r in results:
        row = [f"{r['nodes']:,}"]
        for (stage, key), name in zip(COLUMNS, head[1:]):
            s = r["stages"].get(stage)
            if s is None:
                row.append(f">{timeout:.0f} (timeout)" if r["timeout"] else "-")
                continue
            if key not in s:  # results of an older version of this script
                row.append("n/a")
                continue
            row.append(f"{s[key]:.2f}")
            series[name].append((r["nodes"], s[key]))
        done = [r["stages"][s] for s in STAGES if s in r["stages"]]
        complete = len(done) == len(STAGES)
        for label, key in (("total own (s)", "own"), ("total own CPU (s)", "own_cpu"), ("total wall (s)", "wall")):
            if not all(key in s for s in done):
                row.append("n/a")
                continue
            total = sum(s[key] for s in done)
            row.append(f"{total:.2f}" if complete else f"{total:.2f} + timeout")
            if complete:
                series[label].append((r["nodes"], total))
        row.append("/".join(str(s.get("sessions", "?")) for s in done))
        row.append(f"{r['load_start'].split()[0]} / {r['load_end'].split()[0]}")
        rows.append(row)
    fit = ["slope (fit)"]
    last = ["slope (last two)"]
    for name in head[1:-2]:
        s = slope(series[name])
        fit.append("-" if s is None else f"{s:.2f}")
        s = slope(series[name][-2:])
        last.append("-" if s is None else f"{s:.2f}")
    rows += [fit + ["", ""], last + ["", ""]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1000,3000,10000,30000,100000",
                        help="comma-separated graph sizes in nodes (3 per block)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scheme", default="minmax",
                        help="quant_scheme of the sim (default minmax: auto switches from histograms to min-max "
                             "above 5000 observed tensors, so its sizes would not compare)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per size (all three stages)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with onnxqat installed")
    parser.add_argument("--code", default=None, help="directory put first on the children's PYTHONPATH")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--table-from", default=None, help="only print the table of an earlier --json file")
    args = parser.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            print(table(json.load(f), args.timeout))
        return
    sizes = [int(s) for s in args.nodes.split(",") if s]
    started = machine_lines()
    load = load_average()
    results = []
    for nodes in sizes:
        progress("scaling", f"{nodes} nodes (load {load_average()})")
        t = time.perf_counter()
        results.append(run_child(args.python, nodes, args.width, args.batch, args.timeout, args.code,
                                 args.scheme))
        progress("scaling", f"{nodes} nodes done in {time.perf_counter() - t:.1f} s "
                            f"{'(timeout)' if results[-1]['timeout'] else ''}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(table(results, args.timeout))
    print()
    for line in started:
        print(f"- {line}")
    print(f"- load average (1/5/15 min) at start: {load}; at end: {load_average()}")
    print(f"- onnxqat imported from: {results[0].get('onnxqat', '?') if results else '?'}")
    print("- plans: " + "; ".join(f"{r['nodes']:,}: {r.get('plan', '?')}" for r in results))
    print(f"- command: {' '.join([os.path.relpath(sys.executable, REPO_DIR), 'bench/bench_graph_scaling.py', *(argv if argv is not None else sys.argv[1:])])}")


if __name__ == "__main__":
    main()
