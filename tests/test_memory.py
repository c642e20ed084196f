"""Peak memory of calibration, measured in fresh processes (VmHWM; Linux only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")

# A depthwise Conv + Relu chain on [16, 32, 128, 128]: six observed tensors of 32 MiB a batch
# (192 MiB fetched by a histogram scheme's run of the whole batch), little compute.
_SCRIPT = r"""
import json, sys
import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxqat.calibrate.runner as runner
from onnxqat.calibrate.schemes import Scheme
from onnxqat.config import load_config
from onnxqat.passes.annotate import annotate
from onnxqat.sim import prepare_model

budget = int(sys.argv[1])
if budget:
    runner.RUN_BUDGET = budget
nodes, inits, prev = [], [], "x"
for i in range(6):
    w = np.random.default_rng(i).normal(size=(32, 1, 3, 3)).astype(np.float32) * 0.3
    inits.append(numpy_helper.from_array(w, f"w{i}"))
    nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], group=32, pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
    prev = f"r{i}"
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 128, 128])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
model = prepare_model(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)))
plan = annotate(model, load_config("onnxruntime"))
batches = [{"x": np.random.default_rng(b).normal(size=(16, 32, 128, 128)).astype(np.float32)} for b in range(2)]

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024.0

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
observers = runner.collect_statistics(model, plan, batches, Scheme.PERCENTILE, progress=False)
grown = status("VmHWM:") - before
fetched = sum(16 * 32 * 128 * 128 * 4 for q in plan.activations if q.name != "x") / 2**20
digest = {name: [o.lo, o.width, o.counts.tolist()] for name, o in observers.items()}
print(json.dumps({"grown": grown, "fetched": fetched, "digest": digest}))
"""


def _calibrate(budget: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(budget)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_histogram_calibration_peak_is_bounded_by_the_run_budget_not_the_batch():
    """With the default budget (64 MiB) a batch of 192 MiB of observed tensors runs in pieces: the
    statistics pass grows the process by under half of what the whole batch's run grows it by
    (that run holds every fetched tensor at once), and the histograms are the same."""
    whole = _calibrate(1 << 40)  # no batch is ever split
    split = _calibrate(0)  # the default RUN_BUDGET
    assert whole["fetched"] == split["fetched"] == 192
    assert whole["grown"] >= 0.9 * whole["fetched"], whole["grown"]  # the measurement sees the fetches
    assert split["grown"] < 0.5 * whole["grown"], (split["grown"], whole["grown"])
    assert split["digest"] == whole["digest"]
