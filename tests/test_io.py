"""Bad model files, external-data safety, atomic outputs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, random_batches, tensor, tiny_cnn
from onnxqat import ModelError, OutputError, QuantizationSimModel
from onnxqat.io import MAX_IR_VERSION, MAX_OPSET, load_model
from onnxqat.outputs import transaction


def visible(folder):
    """The files a reader sees (not the hidden .onnxqat control folder)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xff this is not a protobuf \x12\x99" * 10)
    with pytest.raises(ModelError, match="junk.onnx: not an ONNX model"):
        load_model(path)


def test_protobuf_that_is_not_a_model(tmp_path):
    path = tmp_path / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString())
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_model(path)


def test_truncated_model(tmp_path):
    data = tiny_cnn().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.onnx"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_checker_failure_is_reported(tmp_path):
    model = tiny_cnn()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        load_model(path)


def test_newer_opset_is_converted_down_or_refused(tmp_path):
    # the limits are the installed runtime's: opset 21 / IR 10 for onnxruntime-training 1.19
    model = tiny_cnn(opset=21)
    path = tmp_path / "new.onnx"
    if MAX_OPSET < onnx.defs.onnx_opset_version():  # onnx knows a newer opset than the runtime runs
        model.ir_version = MAX_IR_VERSION + 1
        model.opset_import[0].version = MAX_OPSET + 1
        path.write_bytes(model.SerializeToString())
        loaded = load_model(path)
        assert loaded.opset_imports[""] == MAX_OPSET and loaded.ir_version == MAX_IR_VERSION
    unknown = onnx.defs.onnx_opset_version() + 3
    model.opset_import[0].version = unknown
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=f"opset {unknown} is newer than {MAX_OPSET} .* cannot convert it down"):
        load_model(path)


def _with_external_location(tmp_path, location):
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor("x", [4])], [tensor("y", [4])],
                       {"w": np.ones(4, np.float32)})
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="offset", value="0")
    w.external_data.add(key="length", value="16")
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_model_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _with_external_location(tmp_path, location)
    with pytest.raises(ModelError, match="external data"):
        load_model(path)


def test_external_data_symlink_escape_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _with_external_location(tmp_path, "link.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    with pytest.raises(ModelError, match="resolves outside"):
        load_model(path)


def test_external_data_inside_folder_loads(tmp_path):
    path = _with_external_location(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(np.full(4, 2.0, np.float32).tobytes())
    model = load_model(path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), np.full(4, 2.0))


def test_staged_outputs_leave_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("earlier result")
    with pytest.raises(RuntimeError):
        with transaction() as tx:
            stage = tx.folder(out, "export-model")
            open(stage.path("model.onnx"), "w").write("half")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(out)) == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "earlier result"


def test_unwritable_output_dir(tmp_path, tiny_model_path):
    sim = QuantizationSimModel(tiny_model_path)
    sim.compute_encodings(random_batches(), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        sim.export(blocker)
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputError, match="cannot write"):
            sim.export(ro / "sub")


def test_export_failure_keeps_earlier_outputs(tmp_path, tiny_model_path, monkeypatch):
    sim = QuantizationSimModel(tiny_model_path)
    sim.compute_encodings(random_batches(), progress=False)
    out = tmp_path / "out"
    sim.export(out)
    before = {p: (out / p).read_bytes() for p in visible(out)}
    import onnxqat.pipeline as sim_module

    original = sim_module.save_model

    def failing_save(model, path):
        if path.endswith("_qdq.onnx"):
            raise OSError(28, "No space left on device")
        return original(model, path)

    monkeypatch.setattr(sim_module, "save_model", failing_save)
    with pytest.raises(OutputError, match="No space left"):
        sim.export(out)
    assert {p: (out / p).read_bytes() for p in visible(out)} == before


def test_external_data_models_round_trip_through_the_large_model_path(tmp_path, monkeypatch):
    """Above the protobuf limit, sessions and exports go through external data files. The limit
    is lowered here so a small model takes that path."""
    import onnxqat.runtime as runtime_module

    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save(tiny_cnn(), source, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    monkeypatch.setattr(runtime_module, "PROTO_LIMIT", 100)
    sim = QuantizationSimModel(source, per_channel=True)
    sim.compute_encodings(random_batches(), progress=False)
    paths = sim.export(tmp_path / "out")
    assert visible(tmp_path / "out") == [
        "model.encodings", "model.onnx", "model.onnx.data", "model_qdq.onnx", "model_qdq.onnx.data"]
    x = random_batches(1)[0]
    from conftest import run_onnx

    ref = run_onnx(source, x)[0]
    np.testing.assert_allclose(run_onnx(paths["float"], x)[0], ref, rtol=1e-5, atol=1e-5)
    from onnxqat.runtime import Session

    np.testing.assert_array_equal(Session(load_model(paths["qdq"])).run(x)[0], sim.run(x)[0])
    assert sorted(os.listdir(source.parent)) == ["model.onnx", "weights.bin"]  # input untouched


def test_small_model_with_external_data_is_self_contained_once_loaded(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), source, save_as_external_data=True, location="w.bin", size_threshold=0)
    sim = QuantizationSimModel(source)
    sim.compute_encodings(random_batches(), progress=False)
    from conftest import run_onnx

    x = random_batches(1)[0]
    assert run_onnx(sim.model, x)[0].shape == (8, 5)  # serializes without the w.bin beside it


def test_npz_problems_are_named(tmp_path):
    from onnxqat import DataError
    from onnxqat.data import load_npz

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.npz: cannot read npz data"):
        load_npz(empty, ["x"])
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, x=np.zeros((4, 2)), label=np.zeros(3))
    with pytest.raises(DataError, match="sample counts differ"):
        load_npz(uneven, ["x", "label"])
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="not an npz archive"):
        load_npz(single, ["x"])
