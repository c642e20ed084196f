"""Packaging: which runtime is installed (none, two, no training build), the device's execution
providers, the model limits the runtime sets, and the demo assets shipped inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, ROOT, random_batches, tiny_cnn
from onnx import TensorProto, helper

from onnxqat import backend, demo
from onnxqat.backend import RuntimeSetupError


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _quantize_in_child(tmp_path: Path, prelude: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``onnxqat quantize`` on a tiny model in a child interpreter after ``prelude``."""
    model = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), model)
    np.savez(tmp_path / "c.npz", x=random_batches(1)[0]["x"])
    code = prelude + textwrap.dedent(f"""
        import sys
        from onnxqat.cli import main
        sys.exit(main(["quantize", {str(model)!r}, "--data", {str(tmp_path / 'c.npz')!r},
                       "--output-dir", {str(tmp_path / 'out')!r}]))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **(env or {})})


def test_without_any_onnxruntime_the_cli_says_what_to_install(tmp_path):
    # the child sees no onnxruntime distribution and cannot import the module
    prelude = textwrap.dedent("""
        import importlib.metadata as md, sys
        class _NoRuntime:
            def find_spec(self, name, path=None, target=None):
                if name == "onnxruntime" or name.startswith("onnxruntime."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, _NoRuntime())
        _all = md.distributions
        md.distributions = lambda **kw: [d for d in _all(**kw)
                                         if not (d.metadata["Name"] or "").lower().startswith("onnxruntime")]
    """)
    line = _error_line(_quantize_in_child(tmp_path, prelude))
    assert "no onnxruntime is installed" in line and "onnxqat[cpu]" in line and "onnxqat[train]" in line
    assert not (tmp_path / "out").exists()


def test_two_runtimes_in_one_environment_are_refused(tmp_path):
    # a second distribution that installs the module onnxruntime, found by its metadata on sys.path
    site = tmp_path / "site"
    info = site / "onnxruntime_gpu-1.32.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.32.0\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\nonnxruntime_gpu-1.32.0.dist-info/METADATA,,\n")
    line = _error_line(_quantize_in_child(tmp_path, "", {"PYTHONPATH": str(site)}))
    name, version = backend.check_environment()
    assert f"{name} {version}" in line and "onnxruntime-gpu 1.32.0" in line
    assert "overwrite each other" in line and "pip uninstall" in line
    assert not (tmp_path / "out").exists()


def test_distributions_that_do_not_install_the_module_do_not_count(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "onnxruntime_extensions-0.14.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-extensions\nVersion: 0.14.0\n")
    (info / "RECORD").write_text("onnxruntime_extensions/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(site))
    backend.runtime_distributions.cache_clear()
    try:
        names = [n for n, _ in backend.runtime_distributions()]
    finally:
        backend.runtime_distributions.cache_clear()
    assert names == [backend.check_environment()[0]]


def test_training_without_the_training_runtime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "runtime_distributions", lambda: [("onnxruntime", "1.32.0")])
    with pytest.raises(RuntimeSetupError, match=r"pip install 'onnxqat\[train\]'"):
        backend.require_training()
    from onnxqat import QuantizationSimModel

    sim = QuantizationSimModel(tiny_cnn()).compute_encodings(random_batches(2), progress=False)
    with pytest.raises(RuntimeSetupError, match=r"quantization-aware training needs .*onnxqat\[train\]"):
        sim.trainer()
    from onnxqat.cli import main

    assert main(["train", str(DEMO_MODEL), "--data", "x.npz", "--calib", "x.npz", "--output-dir",
                 str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(backend.has_training(), reason="the training runtime is installed here")
def test_cli_train_in_a_ptq_environment(cli, tmp_path):
    line = _error_line(cli("train", DEMO_MODEL, "--data", "x.npz", "--calib", "x.npz", "--output-dir", tmp_path))
    assert "onnxqat train needs onnxruntime's training build" in line and "onnxqat[train]" in line


def test_model_limits_are_what_the_runtime_loads():
    ort = backend.onnxruntime()
    opset, ir_version = backend.model_limits()
    assert backend._loads(ort, ir_version, opset)
    if ir_version < onnx.IR_VERSION:
        assert not backend._loads(ort, ir_version + 1, 21)
    if opset < onnx.defs.onnx_opset_version():
        assert not backend._loads(ort, ir_version, opset + 1)
    if backend.has_training():  # onnxruntime-training 1.19.2
        assert (opset, ir_version) == (21, 10)
    from onnxqat import io

    assert (io.MAX_OPSET, io.MAX_IR_VERSION) == (opset, ir_version)


# -- devices ----------------------------------------------------------------------------------------
_CUDA = "CUDAExecutionProvider" in backend.onnxruntime().get_available_providers()


def test_unknown_device_is_refused():
    with pytest.raises(RuntimeSetupError, match="device 'tpu': unknown"):
        backend.providers("tpu")


@pytest.mark.skipif(_CUDA, reason="this runtime has the CUDA provider")
def test_cuda_without_the_provider_is_one_line_error_before_any_work(cli, tmp_path):
    from onnxqat import QuantizationSimModel
    from onnxqat.train.options import TrainOptions

    with pytest.raises(RuntimeSetupError, match="device 'cuda': .* has no CUDA execution provider"):
        QuantizationSimModel(tiny_cnn(), device="cuda")
    sim = QuantizationSimModel(tiny_cnn()).compute_encodings(random_batches(2), progress=False)
    if backend.has_training():
        from onnxqat.train.trainer import QATTrainer

        with pytest.raises(RuntimeSetupError, match="device 'cuda'"):
            QATTrainer(sim.state, TrainOptions(device="cuda"))
        with pytest.raises(RuntimeSetupError, match="device 'cuda'"):
            sim.trainer(device="cuda")
    line = _error_line(cli("quantize", DEMO_MODEL, "--data", DEMO_CALIB, "--output-dir", tmp_path / "out",
                           "--device", "cuda"))
    assert "device 'cuda'" in line and "onnxruntime-gpu" in line
    assert not (tmp_path / "out").exists()


def test_cuda_device_selects_the_cuda_provider(monkeypatch):
    """With a runtime that lists the CUDA provider, every session of simulation and calibration asks
    for it first (the sessions are recorded; they run on the CPU provider here)."""
    from onnxqat import QuantizationSimModel
    from onnxqat import runtime as runtime_module

    ort = backend.onnxruntime()
    real = ort.InferenceSession
    asked: list[list[str]] = []

    def recording(payload, options=None, providers=None, **kw):
        asked.append(list(providers or []))
        return real(payload, options, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime_module.ort, "InferenceSession", recording)
    assert backend.providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert backend.providers("cpu") == ["CPUExecutionProvider"]
    sim = QuantizationSimModel(tiny_cnn(), quant_scheme="minmax", device="cuda")
    asked.clear()
    sim.compute_encodings(random_batches(2), progress=False)
    assert asked and all(p[0] == "CUDAExecutionProvider" for p in asked)  # calibration
    asked.clear()
    sim.run(random_batches(1)[0])
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    asked.clear()
    QuantizationSimModel(tiny_cnn(), quant_scheme="minmax").compute_encodings(random_batches(2), progress=False)
    assert asked and all(p == ["CPUExecutionProvider"] for p in asked)
    if backend.has_training():
        from onnxqat.train.sessions import EvalSession

        asked.clear()
        EvalSession(sim.sim_ir(), device="cuda")
        assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]


# -- the demo assets in the package -------------------------------------------------------------------
PACKAGED = ROOT / "onnxqat" / "demo_data"


def test_demo_finds_the_packaged_assets_outside_a_checkout(tmp_path, monkeypatch):
    assert demo.find_models(None) == ROOT / "models"  # a checkout: the full data
    monkeypatch.setattr(demo, "_REPO", tmp_path)  # an installed package: no pyproject.toml beside it
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fmnist_dsconv.onnx").write_bytes(b"another project's models/")
    assert demo.find_models(None) == PACKAGED
    with pytest.raises(Exception, match="demo assets are not here .*fmnist_train.npz"):
        demo.find_models(str(tmp_path / "models"))


def test_packaged_assets_are_a_small_balanced_subset_of_the_shipped_data():
    sizes = {p.name: p.stat().st_size for p in PACKAGED.iterdir()}
    assert set(sizes) == {"fmnist_dsconv.onnx", "fmnist_calib.npz", "fmnist_train.npz", "fmnist_test.npz"}
    assert sum(sizes.values()) < 5_000_000
    assert (PACKAGED / "fmnist_dsconv.onnx").read_bytes() == DEMO_MODEL.read_bytes()
    for part, n in (("calib", 512), ("train", 3000), ("test", 2000)):
        with np.load(PACKAGED / f"fmnist_{part}.npz") as small, np.load(ROOT / "models" / f"fmnist_{part}.npz") as full:
            assert len(small["label"]) == n and small["image"].dtype == np.float32
            if n < len(full["label"]):  # subsampled: every class in equal share
                assert np.bincount(small["label"]).min() == n // 10
            rows = {r.tobytes() for r in full["image"].reshape(len(full["image"]), -1)}
            assert all(r.tobytes() in rows for r in small["image"].reshape(n, -1))
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert '"demo_data/*"' in package_data


@pytest.mark.slow
def test_the_wheel_holds_the_package_data_and_stays_small(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "No matching distribution found for setuptools" in proc.stderr:
        pytest.skip("no build backend can be installed here")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("onnxqat-*.whl")
    assert wheel.stat().st_size < 6_000_000
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("fmnist_dsconv.onnx", "fmnist_calib.npz", "fmnist_train.npz", "fmnist_test.npz"):
        assert f"onnxqat/demo_data/{name}" in names
    assert {"onnxqat/configs/onnxruntime.json", "onnxqat/train/gradients.json", "onnxqat/tools/plain_ort.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("onnxruntime" in r and "extra ==" not in r for r in requires)  # the runtime comes from an extra
    assert any(r.startswith("Requires-Dist: onnxruntime>=") and 'extra == "cpu"' in r for r in requires)
    assert any("onnxruntime-training-cpu==1.19.2" in r and 'extra == "train"' in r for r in requires)


# -- one environment: deployed models checked with this environment's runtime -------------------------
def test_deploy_check_falls_back_to_this_environment(tmp_path, monkeypatch):
    from deployrt import DeployedSession, deploy_interpreter

    monkeypatch.setattr(demo, "find_deploy_python", lambda: None)
    python, note = deploy_interpreter()
    name, version = backend.check_environment()
    assert python == sys.executable and f"this environment's {name} {version}" in note
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    with DeployedSession(python, str(path)) as session:
        (y,) = session.run({"x": np.array([-1.0, 2.0], np.float32)})
        assert session.version == version
    np.testing.assert_array_equal(y, [0.0, 2.0])
