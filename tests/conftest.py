"""Shared fixtures: small models built in code, the shipped demo assets, the deploy runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DEMO_MODEL = MODELS / "fmnist_dsconv.onnx"
DEMO_CALIB = MODELS / "fmnist_calib.npz"
DEMO_TEST = MODELS / "fmnist_test.npz"
DEMO_TRAIN = MODELS / "fmnist_train.npz"


def make_model(nodes, inputs, outputs, initializers=(), opset=13, ir_version=8, name="g"):
    """A checked ModelProto from onnx.helper pieces; initializers given as {name: array}."""
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()]
    if ir_version < 4:  # initializers had to be listed as graph inputs too
        inputs = list(inputs) + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def tiny_cnn(seed=0, opset=13):
    """Conv+BN+Relu, depthwise Conv + residual Add+Relu, MaxPool, Flatten, Gemm(+bias)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = {
        "w1": (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(f),
        "b1": rng.normal(size=4).astype(f),
        "gamma": rng.uniform(0.5, 2, 4).astype(f),
        "beta": rng.normal(size=4).astype(f),
        "mean": rng.normal(size=4).astype(f),
        "var": rng.uniform(0.5, 2, 4).astype(f),
        "w2": (rng.normal(size=(4, 1, 3, 3)) * 0.3).astype(f),
        "wf": (rng.normal(size=(5, 64)) * 0.1).astype(f),
        "bf": rng.normal(size=5).astype(f),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dwconv", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 5])], inits, opset=opset)


def random_batches(n_batches=4, batch=8, shape=(3, 8, 8), seed=1, name="x"):
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(size=(batch, *shape)).astype(np.float32)} for _ in range(n_batches)]


def run_onnx(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.fixture
def tiny_model_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    return path


_TRAINING_MISSING = "needs onnxruntime's training build"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In an environment with the plain runtime alone (``onnxqat[cpu]``), a test that reaches
    training fails with the error naming the training extra: it is reported as skipped."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _TRAINING_MISSING in str(call.excinfo.value):
        from onnxqat.backend import has_training

        if not has_training():
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               "Skipped: needs the training runtime (pip install 'onnxqat[train]')")


def pytest_report_header(config):
    from deployrt import deploy_interpreter

    python, note = deploy_interpreter()
    return [f"deployed models run in: {python}" + (f" ({note})" if note else "")]


@pytest.fixture(scope="session")
def deploy_python():
    """Interpreter of the separate environment with the plain, current onnxruntime release, or of
    this one when there is none (see ``deployrt.deploy_interpreter``; the report header says which)."""
    from deployrt import deploy_interpreter

    python, _ = deploy_interpreter()
    check = subprocess.run([python, "-c", "import onnxruntime, numpy"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.fail(f"deploy environment {python} cannot import onnxruntime: {check.stderr.strip()}")
    return python


@pytest.fixture(scope="session")
def demo_assets():
    missing = [p for p in (DEMO_MODEL, DEMO_CALIB, DEMO_TEST) if not p.exists()]
    if missing:
        pytest.fail(f"shipped demo assets missing: {missing}")
    return DEMO_MODEL, DEMO_CALIB, DEMO_TEST


@pytest.fixture
def cli():
    """Run the onnxqat CLI in a subprocess; returns CompletedProcess."""

    def _run(*args, check=False):
        proc = subprocess.run([sys.executable, "-m", "onnxqat.cli", *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"onnxqat {' '.join(map(str, args))} failed:\n{proc.stderr}")
        return proc

    return _run


def visible(folder):
    """The files a reader sees in an output folder (not the hidden .onnxqat control folder)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))
