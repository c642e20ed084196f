"""The error and output contract (issue 11), case by case.

One line naming the problem and exit status 2; a failed command writes nothing; outputs replace
earlier ones only once all were written (one transaction, :mod:`onnxqat.outputs`); inputs are
never modified; nonsense is refused (or warned about) before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import ROOT, make_model, random_batches, tensor, tiny_cnn
from onnxqat import ConfigError, DataError, EncodingsError, ModelError, OutputError, QuantizationSimModel
from onnxqat import outputs
from onnxqat.cli import main
from onnxqat.io import load_model
from onnxqat.outputs import CONTROL_DIR, transaction

EXPORT = ["model.encodings", "model.onnx", "model_qdq.onnx"]


# -- helpers ----------------------------------------------------------------------------------------
def cli(capsys, *args):
    """Run the CLI in this process; returns (status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(code, out, err):
    """The one error line, the last of stderr (warnings and progress lines may come before it);
    fails on a traceback, another status, several error lines or a message continued on more lines."""
    assert code == 2, out + err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def before_any_work(out):
    """Calibration prints the plan first: an error before it came before any work."""
    assert "plan:" not in out, out


def visible(folder):
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def contents(folder):
    return {n: (folder / n).read_bytes() for n in visible(folder)}


def staging_left(folder):
    """Temporaries of the transaction in ``folder`` (there must be none after a command)."""
    return [n for n in os.listdir(folder) if n.startswith(".onnxqat-") or n.startswith(".checkpoint-")]


@pytest.fixture
def tiny(tmp_path):
    """The tiny CNN, calibration/training data with labels for its 5 classes."""
    model = tmp_path / "net.onnx"
    onnx.save(tiny_cnn(), model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, label=rng.integers(0, 5, 32))
    return model, data


@pytest.fixture(scope="module")
def sims():
    """Two calibrated simulations of one model whose exports differ (8-bit and 4-bit weights)."""
    out = []
    for bits in (8, 4):
        sim = QuantizationSimModel(tiny_cnn(), param_bw=bits)
        sim.compute_encodings(random_batches(), progress=False)
        out.append(sim)
    return out


# -- inputs are never modified ------------------------------------------------------------------------
def test_output_dir_and_prefix_naming_the_input_model_are_refused(tiny, capsys):
    model, data = tiny
    before = model.read_bytes()
    line = error_line(*cli(capsys, "quantize", model, "--data", data, "--output-dir", model.parent, "--prefix", "net"))
    assert "net.onnx: the output would replace the input" in line
    assert model.read_bytes() == before


def test_an_output_that_would_remove_the_models_external_data_is_refused(tmp_path, capsys):
    # the export set owns model.onnx.data (removed on publish when the new model needs none): here it
    # is the weights file of the input model
    onnx.save(tiny_cnn(), tmp_path / "net.onnx", save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    weights = (tmp_path / "model.onnx.data").read_bytes()
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32))
    code, out, err = cli(capsys, "quantize", tmp_path / "net.onnx", "--data", tmp_path / "data.npz",
                         "--output-dir", tmp_path)
    assert "model.onnx.data: the output would replace the input" in error_line(code, out, err)
    before_any_work(out)
    assert (tmp_path / "model.onnx.data").read_bytes() == weights and visible(tmp_path) == [
        "data.npz", "model.onnx.data", "net.onnx"]


def test_report_at_the_input_model_or_at_another_output_is_refused(tiny, tmp_path, capsys):
    model, data = tiny
    before = model.read_bytes()
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o", "--report", model)
    assert "net.onnx: the output would replace the input" in error_line(code, out, err)
    before_any_work(out)
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o",
                         "--report", tmp_path / "o" / "model.onnx")
    assert "both the output model.onnx and the report would be written there" in error_line(code, out, err)
    before_any_work(out)
    assert model.read_bytes() == before and not (tmp_path / "o").exists()


def test_an_exported_model_quantized_into_its_own_folder_is_refused(tiny, tmp_path, capsys):
    model, data = tiny
    out_dir = tmp_path / "o"
    assert cli(capsys, "quantize", model, "--data", data, "--output-dir", out_dir)[0] == 0
    exported = contents(out_dir)
    line = error_line(*cli(capsys, "quantize", out_dir / "model.onnx", "--data", data, "--output-dir", out_dir))
    assert "model.onnx: the output would replace the input" in line
    assert contents(out_dir) == exported


# -- a failed command writes nothing ------------------------------------------------------------------
def test_report_in_a_directory_or_an_unwritable_place_is_refused_before_work(tiny, tmp_path, capsys):
    model, data = tiny
    (tmp_path / "adir").mkdir()
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o",
                         "--report", tmp_path / "adir")
    assert "adir: is a directory" in error_line(code, out, err)
    before_any_work(out)
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o",
                         "--report", "/sys/onnxqat-report.json")  # read-only even for root
    assert "onnxqat-report.json" in error_line(code, out, err) and "cannot write" in err
    before_any_work(out)
    assert not (tmp_path / "o").exists()


def test_a_report_that_fails_while_written_publishes_no_model(tiny, tmp_path, capsys, monkeypatch):
    model, data = tiny
    out_dir = tmp_path / "o"
    assert cli(capsys, "quantize", model, "--data", data, "--output-dir", out_dir, "--param-bw", "4")[0] == 0
    earlier = contents(out_dir)

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(QuantizationSimModel, "report", full_disk)
    line = error_line(*cli(capsys, "quantize", model, "--data", data, "--output-dir", out_dir,
                           "--report", tmp_path / "r.json"))
    assert "No space left on device" in line
    assert contents(out_dir) == earlier and not (tmp_path / "r.json").exists()
    assert staging_left(out_dir) == [] and staging_left(tmp_path) == []
    fresh = tmp_path / "fresh"  # a folder the failed command created is removed again
    error_line(*cli(capsys, "quantize", model, "--data", data, "--output-dir", fresh, "--report", tmp_path / "r.json"))
    assert not fresh.exists()


def test_a_too_long_prefix_is_refused_and_creates_no_folder(tiny, tmp_path, capsys, sims):
    model, data = tiny
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "new" / "o",
                         "--prefix", "x" * 300)
    assert "is longer than this file system allows" in error_line(code, out, err)
    before_any_work(out)
    assert not (tmp_path / "new").exists()
    with pytest.raises(OutputError, match="File name too long"):  # the API: the folder it made goes again
        sims[0].export(tmp_path / "api" / "o", prefix="x" * 300)
    assert not (tmp_path / "api").exists()


# -- the export set is one unit -------------------------------------------------------------------------
def _write_set(folder, files, name="export-model", join=True):
    with transaction(join=join) as tx:
        stage = tx.folder(folder, name, also=["model.onnx.data", "model_qdq.onnx.data"])
        for file, text in files.items():
            with open(stage.path(file), "w") as f:
                f.write(text)


OLD = {"model.onnx": "old float", "model.encodings": "old enc", "model_qdq.onnx": "old qdq",
       "model_qdq.onnx.data": "old weights"}
NEW = {"model.onnx": "new float", "model.encodings": "new enc", "model_qdq.onnx": "new qdq",
       "model.onnx.data": "new weights"}


def _seen(folder):
    return {n: (folder / n).read_text() for n in visible(folder) if (folder / n).exists()}


def _kill_at(step, publish):
    """Run ``publish`` in a child process killed (os._exit) at its ``step``-th change; returns
    whether it ran to the end."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind runs after the kill
        calls = [0]

        def kill(what, path):
            if calls[0] == step:
                os._exit(9)
            calls[0] += 1

        try:
            outputs._step = kill
            publish()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("layout", ["links", "regular files of an earlier version", "first export"])
def test_a_publish_killed_at_every_step_leaves_the_old_or_the_new_set(tmp_path, layout):
    step = 0
    while True:
        out_dir = tmp_path / f"{layout[:5]}{step}"
        if layout == "links":
            _write_set(out_dir, OLD)
        elif layout.startswith("regular"):
            out_dir.mkdir()
            for n, text in OLD.items():
                (out_dir / n).write_text(text)
        old = _seen(out_dir) if out_dir.exists() else {}
        finished = _kill_at(step, lambda: _write_set(out_dir, NEW))
        assert _seen(out_dir) in (old, NEW), (step, _seen(out_dir))
        # the next run publishes over whatever the kill left, and removes its leftovers
        _write_set(out_dir, {"model.onnx": "next", "model.encodings": "next", "model_qdq.onnx": "next"})
        assert _seen(out_dir) == dict.fromkeys(EXPORT, "next")
        assert staging_left(out_dir) == []
        control = out_dir / CONTROL_DIR / "export-model"
        assert sorted(os.listdir(control))[0] == "current" and len(os.listdir(control)) == 2
        if finished:
            break
        step += 1
    assert step >= 6  # every change of the publish was a kill point (control, move, links, switch)


def test_a_single_file_output_killed_at_every_step_is_old_or_new(tmp_path):
    step = 0
    while True:
        folder = tmp_path / f"c{step}"
        _write_set(folder, {"checkpoint.ckpt": "old"}, "checkpoint", join=False)
        finished = _kill_at(step, lambda: _write_set(folder, {"checkpoint.ckpt": "new"}, "checkpoint", join=False))
        assert (folder / "checkpoint.ckpt").read_text() in ("old", "new")
        _write_set(folder, {"checkpoint.ckpt": "next"}, "checkpoint", join=False)
        assert os.listdir(folder) == ["checkpoint.ckpt"]  # one file: no control folder, leftovers gone
        if finished:
            break
        step += 1


def test_export_failing_at_every_publish_step_keeps_the_earlier_set(sims, tmp_path, monkeypatch):
    old_sim, new_sim = sims
    reference = tmp_path / "reference"
    new_sim.export(reference)
    new = contents(reference)
    step = 0
    while True:
        out_dir = tmp_path / f"o{step}"
        old_sim.export(out_dir)
        old = contents(out_dir)
        calls = [0]

        def fail(what, path, step=step):
            if calls[0] == step:
                raise OSError(errno.EIO, f"simulated failure before '{what}'")
            calls[0] += 1

        monkeypatch.setattr(outputs, "_step", fail)
        try:
            new_sim.export(out_dir)
            failed = False
        except OutputError as e:
            assert "simulated failure" in str(e)
            failed = True
        monkeypatch.setattr(outputs, "_step", lambda what, path: None)
        assert contents(out_dir) == (old if failed else new), step
        assert staging_left(out_dir) == []
        if not failed:
            break
        step += 1
    assert step >= 4  # control folder, move into place, switch link, switch


def test_analyze_publishes_its_three_reports_as_one_set(tiny, tmp_path, capsys, monkeypatch):
    model, data = tiny
    out_dir = tmp_path / "a"
    assert cli(capsys, "analyze", model, "--data", data, "--output-dir", out_dir, "--param-bw", "4")[0] == 0
    earlier = contents(out_dir)
    assert sorted(earlier) == ["mixed_precision.json", "report.html", "report.json"]

    def fail(what, path):
        if what == "switch":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_step", fail)  # all three written, the publish fails
    line = error_line(*cli(capsys, "analyze", model, "--data", data, "--output-dir", out_dir))
    assert "No space left on device" in line
    assert contents(out_dir) == earlier and staging_left(out_dir) == []


def test_demo_refuses_a_bad_output_dir_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = cli(capsys, "demo", "--output-dir", blocker)
    assert "file: exists and is not a directory" in error_line(code, out, err)
    assert out == ""  # the demo prints its first accuracy only after minutes of work


def test_without_symlinks_the_set_is_replaced_file_by_file_under_a_manifest(sims, tmp_path, monkeypatch):
    """Where symlinks cannot be made: regular files, and MANIFEST.json present exactly when the
    visible files are one complete set."""
    old_sim, new_sim = sims
    monkeypatch.setattr(outputs, "_symlinks_work", lambda directory: False)
    manifest = tmp_path / "o" / CONTROL_DIR / "export-model" / "MANIFEST.json"
    old_sim.export(tmp_path / "o")
    assert not any(os.path.islink(tmp_path / "o" / n) for n in EXPORT)
    old = contents(tmp_path / "o")
    sizes = {n: len(b) for n, b in old.items()}
    assert json.loads(manifest.read_text()) == {"files": sizes}
    new_sim.export(tmp_path / "new")
    new = contents(tmp_path / "new")

    def fail(what, path):
        if what == "replace" and os.path.basename(path) == "model.onnx":  # the second of the three
            raise OSError(errno.EIO, "simulated failure")

    monkeypatch.setattr(outputs, "_step", fail)
    with pytest.raises(OutputError, match="simulated failure"):
        new_sim.export(tmp_path / "o")
    assert not manifest.exists()  # a reader can tell the set is in flux (one file is new already)
    assert contents(tmp_path / "o")["model.encodings"] == new["model.encodings"]
    assert staging_left(tmp_path / "o") == []
    monkeypatch.setattr(outputs, "_step", lambda what, path: None)
    new_sim.export(tmp_path / "o")
    assert contents(tmp_path / "o") == new and manifest.exists()


def test_stale_staging_of_killed_runs_is_removed_by_the_next_run(sims, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = outputs._HOST
    out_dir = tmp_path / "o"
    sims[0].export(out_dir)
    leftovers = [f".onnxqat-{dead.pid}-{host}-0badc0de", f".onnxqat-{dead.pid}-{host}-0badc0de.tmp",
                 ".onnxqat-abcd1234", ".checkpoint-x1y2z3w4"]
    (out_dir / leftovers[0]).mkdir()
    for name in leftovers[1:]:
        (out_dir / name).write_text("")
    for name in leftovers[2:]:  # earlier versions' temporaries carry no process id: old ones go
        os.utime(out_dir / name, (time.time() - 7200,) * 2)
    stale_gen = out_dir / CONTROL_DIR / "export-model" / f"gen-{dead.pid}-{host}-0badc0de"
    stale_gen.mkdir()
    live = out_dir / f".onnxqat-{os.getpid()}-{host}-feedface"  # a running writer's staging stays
    live.mkdir()
    sims[1].export(out_dir)
    assert staging_left(out_dir) == [live.name] and not stale_gen.exists()


def test_stale_temporaries_in_a_checkpoint_dir_are_removed_by_the_next_checkpoint(trainer, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = outputs._HOST
    (tmp_path / f".onnxqat-{dead.pid}-{host}-0badc0de").mkdir()  # a killed save's staging folder
    for name in (f".onnxqat-{dead.pid}-{host}-0badc0de.bak", ".checkpoint-x1y2z3w4"):
        (tmp_path / name).write_text("")
    os.utime(tmp_path / ".checkpoint-x1y2z3w4", (time.time() - 7200,) * 2)  # an earlier version's temporary
    trainer.save_checkpoint(tmp_path)
    assert os.listdir(tmp_path) == ["checkpoint.ckpt"]


def test_sigterm_during_train_exits_like_ctrl_c(tiny, tmp_path):
    model, data = tiny
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxqat.cli", "train", str(model), "--data", str(data), "--calib", str(data),
         "--output-dir", str(tmp_path / "out"), "--loss", "distill", "--epochs", "1000", "--batch-size", "8",
         "--checkpoint-dir", str(ckpt)],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (ckpt / "checkpoint.ckpt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert any(n.startswith("onnxqat-train-") for n in os.listdir(tmpdir)), os.listdir(tmpdir)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)")
    assert os.listdir(tmpdir) == []  # the training folder is gone
    assert os.listdir(ckpt) == ["checkpoint.ckpt"]  # the last good checkpoint, nothing half-written
    assert not (tmp_path / "out").exists()


# -- nonsense is refused, or warned about ---------------------------------------------------------------
def test_eval_refuses_labels_outside_the_class_range(tiny, tmp_path, capsys):
    model, data = tiny
    x = np.load(data)["x"]
    for labels, shown in ((np.full(32, 99), "[99, 99]"), (np.full(32, -1), "[-1, -1]")):
        bad = tmp_path / "bad.npz"
        np.savez(bad, x=x, label=labels)
        line = error_line(*cli(capsys, "eval", model, "--data", bad))
        assert f"bad.npz: labels 'label' range over {shown} but the model output has 5 classes" in line


def test_the_api_refuses_labels_outside_the_class_range(sims):
    from onnxqat.evaluate import accuracy

    for bad in (99, -1):
        batches = [dict(b, label=np.full(8, bad)) for b in random_batches(2)]
        with pytest.raises(DataError, match=rf"batch 0: labels 'label' range over \[{bad}, {bad}\] but the model output "
                                            "has 5 classes"):
            accuracy(sims[0].run, batches)  # (was an accuracy of 0.0)


def test_train_and_analyze_refuse_out_of_range_labels_before_work(tiny, tmp_path, capsys):
    model, data = tiny
    x = np.load(data)["x"]
    for labels in (np.full(32, 99), np.full(32, -1)):
        bad = tmp_path / "bad.npz"
        np.savez(bad, x=x, label=labels)
        code, out, err = cli(capsys, "train", model, "--data", bad, "--calib", data, "--output-dir", tmp_path / "o")
        assert "labels 'label' range over" in error_line(code, out, err)
        before_any_work(out)
        code, out, err = cli(capsys, "train", model, "--data", data, "--calib", data, "--eval", bad,
                             "--output-dir", tmp_path / "o")
        assert "bad.npz: labels 'label' range over" in error_line(code, out, err)
        before_any_work(out)
        code, out, err = cli(capsys, "analyze", model, "--data", data, "--eval", bad, "--output-dir", tmp_path / "o")
        assert "bad.npz: labels 'label' range over" in error_line(code, out, err)
        before_any_work(out)
    assert not (tmp_path / "o").exists()


def test_data_of_the_wrong_shape_or_dtype_is_refused_before_work(tiny, tmp_path, capsys):
    model, data = tiny
    rng = np.random.default_rng(0)
    for name, x, message in (
        ("dims.npz", rng.normal(size=(32, 3, 9, 9)).astype(np.float32),
         "dims.npz: input 'x' has shape [32, 3, 9, 9], the model expects [?, 3, 8, 8]"),
        ("rank.npz", rng.normal(size=(32, 192)).astype(np.float32),
         "rank.npz: input 'x' has shape [32, 192], the model expects [?, 3, 8, 8]"),
        ("dtype.npz", rng.normal(size=(32, 3, 8, 8)), "dtype.npz: input 'x' has dtype float64, the model expects float32"),
    ):
        np.savez(tmp_path / name, x=x, label=rng.integers(0, 5, 32))
        code, out, err = cli(capsys, "quantize", model, "--data", tmp_path / name, "--output-dir", tmp_path / "o")
        assert message in error_line(code, out, err)
        before_any_work(out)
        code, out, err = cli(capsys, "train", model, "--data", data, "--calib", data, "--eval", tmp_path / name,
                             "--output-dir", tmp_path / "o")
        assert message in error_line(code, out, err)
        before_any_work(out)
    assert not (tmp_path / "o").exists()


def test_config_names_that_match_nothing_are_errors_naming_the_closest(tiny, tmp_path, capsys):
    model, data = tiny
    cases = {
        "nodes": ({"nodes": {"conv": {"activation_bw": 16}}}, "nodes: no node named 'conv' in the model (closest: 'conv1')"),
        "exclude": ({"exclude": {"nodes": ["dw_conv"]}}, "exclude.nodes: no node named 'dw_conv' in the model "
                                                         "(closest: 'dwconv')"),
        "op type": ({"exclude": {"op_types": ["Cnov"]}}, "exclude.op_types: 'Cnov' is no op type of the model or of "
                                                         "ONNX (closest: 'Conv')"),
    }
    for name, (doc, message) in cases.items():
        config = tmp_path / "c.json"
        config.write_text(json.dumps(doc))
        code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o", "--config", config)
        assert message in error_line(code, out, err), name
        before_any_work(out)
    config.write_text(json.dumps({"exclude": {"op_types": ["LSTM"]}}))  # a real op type the model lacks
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o", "--config", config)
    assert code == 0 and "warning: " in err and "the model has no LSTM node; the rule does nothing" in err


def test_a_denormal_encodings_scale_is_refused(sims):
    doc = sims[0].encodings_document()
    doc["activation_encodings"][0]["scale"] = [1e-45]
    name = doc["activation_encodings"][0]["name"]
    sim = QuantizationSimModel(tiny_cnn())
    with pytest.raises(EncodingsError, match=f"activation_encodings '{name}': scale 1e-45 is below float32's normal"):
        sim.load_encodings(doc)


def test_export_warns_about_a_scale_below_float32_normal_range(sims, tmp_path):
    sim = QuantizationSimModel(tiny_cnn())
    sim.compute_encodings(random_batches(), progress=False)
    name = sim.plan.activations[0].name
    tiny_enc = dataclasses.replace(sim.encodings[name], scale=np.full_like(sim.encodings[name].scale, 1e-40))
    sim.adopt(sim.state.with_encodings({name: tiny_enc}))
    with pytest.warns(RuntimeWarning, match=f"tensor '{name}': scale 1e-40 is below float32's normal range"):
        sim.export(tmp_path / "o")


def test_a_few_huge_calibration_samples_are_warned_about(tiny, tmp_path, capsys):
    model, data = tiny
    x = np.load(data)["x"]
    x[[3, 17]] = 3e30
    bad = tmp_path / "outliers.npz"
    np.savez(bad, x=x)
    code, out, err = cli(capsys, "quantize", model, "--data", bad, "--output-dir", tmp_path / "o")
    warning = [line for line in err.splitlines() if line.startswith("warning: ") and "outliers.npz" in line]
    assert code == 0 and len(warning) == 1, err
    assert "input 'x': 2 of 32 samples (e.g. sample 3) reach |x| = 3e+30" in warning[0]
    assert "they set the calibration range" in warning[0]
    x[[3, 17]] = 3e38  # the case: the model overflows on those two samples
    np.savez(bad, x=x)
    # min-max reduces every tensor in the graph: an overflowed tensor is one error line
    code, out, err = cli(capsys, "quantize", model, "--data", bad, "--output-dir", tmp_path / "o3", "--scheme", "minmax")
    assert "held no finite value on the calibration data" in error_line(code, out, err)
    assert "warning: " in err and "reach |x| = 3e+38" in err and not (tmp_path / "o3").exists()
    # the default (auto) histograms count non-finite values apart: calibrated from the finite
    # samples (the outlier warning above is the same one, printed once per process)
    code, out, err = cli(capsys, "quantize", model, "--data", bad, "--output-dir", tmp_path / "o4")
    assert code == 0 and (tmp_path / "o4" / "model_qdq.onnx").exists(), err


@pytest.mark.parametrize("lr, message", [("1e30", "far outside what fine-tuning uses"), ("nan", "finite number"),
                                         ("inf", "finite number"), ("-1", "must be > 0")])
def test_a_nonsense_learning_rate_is_refused_before_work(tiny, tmp_path, capsys, lr, message):
    model, data = tiny
    code, out, err = cli(capsys, "train", model, "--data", data, "--calib", data, "--output-dir", tmp_path / "o",
                         "--lr", lr)
    assert message in error_line(code, out, err)
    before_any_work(out)


def test_a_loss_that_rises_over_an_epoch_is_warned_about():
    from onnxqat.train.trainer import _loss_trend

    rng = np.random.default_rng(0)
    noise = rng.uniform(0.5, 1.5, 200)  # batch-to-batch spread of a real epoch's losses
    assert _loss_trend(noise * np.linspace(1.0, 0.5, 200))[2] is None  # falling
    assert _loss_trend(noise)[2] is None  # flat: noise alone is no rise
    assert _loss_trend(noise * np.linspace(1.0, 2.0, 200))[2].startswith("the training loss rose from")
    wrecked = np.concatenate([[0.01], 50 * noise[1:]])  # one step wrecks the model, then the loss is flat
    assert _loss_trend(wrecked)[2].startswith("the training loss went from 0.01 at the epoch's first step to ")
    assert _loss_trend(noise[:9])[2] is None  # too few steps to tell


@pytest.mark.parametrize("lr, warned", [(1e-3, False), (1.0, True)])
def test_a_learning_rate_that_wrecks_the_model_is_warned_about(lr, warned):
    # lr 1.0 (the highest the options accept): the second step takes the distillation loss from
    # 0.003 to ~15 and it stays there, finite; 1e-3 trains this model normally
    sim = QuantizationSimModel(tiny_cnn())
    sim.compute_encodings(random_batches(), progress=False)
    with warnings.catch_warnings(record=True) as caught, sim.trainer(loss="distill", lr=lr) as t:
        warnings.simplefilter("always")
        t.fit(random_batches(100, seed=3), epochs=1, progress=False)
    rose = [str(w.message) for w in caught if "the learning rate may be too high" in str(w.message)]
    assert len(rose) == int(warned), rose
    if warned:
        assert rose[0].startswith("epoch 1: the training loss went from 0.00")


@pytest.mark.parametrize("command, option, value", [
    ("train", "--seed", "-1"), ("analyze", "--keep-16bit", "-1"), ("train", "--epochs", "0"),
    ("train", "--max-samples", "0"), ("quantize", "--batch-size", "0"), ("analyze", "--eval-samples", "0"),
    ("quantize", "--activation-bw", "17"), ("train", "--train-last-n", "0"),
])
def test_negative_and_out_of_range_numbers_are_refused_before_work(tiny, tmp_path, capsys, command, option, value):
    model, data = tiny
    extra = ["--calib", data] if command == "train" else []
    code, out, err = cli(capsys, command, model, "--data", data, *extra, "--output-dir", tmp_path / "o", option, value)
    line = error_line(code, out, err)
    assert value in line and ("must be" in line), line
    before_any_work(out)


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--output-index", "7", "output index 7 is out of range: the model has 1 output(s)"),
    ("--output-index", "-9", "output index -9 is out of range: the model has 1 output(s)"),
])
def test_eval_refuses_out_of_range_numbers(tiny, capsys, option, value, message):
    model, data = tiny
    assert error_line(*cli(capsys, "eval", model, "--data", data, option, value)) == f"error: {message}"


def test_ir_version_99_is_refused_not_lowered(tmp_path):
    model = tiny_cnn()
    model.ir_version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="IR version 99 is newer than any ONNX release defines"):
        load_model(path)


def test_a_fifo_as_data_is_refused_without_blocking(tiny, tmp_path):
    model, _ = tiny
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    for args in (["eval", model, "--data", fifo], ["quantize", model, "--data", fifo, "--output-dir", tmp_path / "o"],
                 ["eval", fifo, "--data", fifo]):
        proc = subprocess.run([sys.executable, "-m", "onnxqat.cli", *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and "not a regular file (a FIFO" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_device_or_a_directory_as_data_is_refused(tiny, tmp_path):
    model, _ = tiny
    for data, message in (
        ("/dev/zero", "/dev/zero: not a regular file (a FIFO, socket or device); onnxqat reads only files"),
        (tmp_path, f"{tmp_path}: is a directory, not a file"),
    ):
        proc = subprocess.run([sys.executable, "-m", "onnxqat.cli", "eval", str(model), "--data", str(data)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)  # reading /dev/zero never ends
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr


# -- one line, never a traceback ------------------------------------------------------------------------
def _external(tmp_path, data: bytes, offset=None, length=None):
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor("x", [4])], [tensor("y", [4])],
                       {"w": np.ones(4, np.float32)})
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value="w.bin")
    if offset is not None:
        w.external_data.add(key="offset", value=str(offset))
    if length is not None:
        w.external_data.add(key="length", value=str(length))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    (tmp_path / "w.bin").write_bytes(data)
    return path


@pytest.mark.parametrize("data, offset, length, message", [
    (b"", None, None, "holds 0 bytes, its shape [4] float needs 16"),
    (b"\0" * 8, None, None, "holds 8 bytes, its shape [4] float needs 16"),
    (b"\0" * 16, 64, None, "offset 64 is past the end of the file (16 bytes)"),
    (b"\0" * 16, 8, 16, "offset 8 + length 16 runs past the end of the file (16 bytes)"),
    (b"\0" * 16, 0, 4, "holds 4 bytes, its shape [4] float needs 16"),
])
def test_broken_external_data_is_one_error_naming_the_tensor(tmp_path, capsys, data, offset, length, message):
    path = _external(tmp_path, data, offset, length)
    with pytest.raises(ModelError, match=r"m.onnx: tensor 'w' has external data at 'w.bin': " + message.replace("[", r"\[")
                       .replace("]", r"\]").replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")):
        load_model(path)
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32), label=np.zeros(2, np.int64))
    assert message in error_line(*cli(capsys, "eval", path, "--data", tmp_path / "d.npz"))


def test_an_initializer_shorter_than_its_shape_names_it(tmp_path):
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor("x", [4])], [tensor("y", [4])],
                       {"w": np.ones(4, np.float32)})
    model.graph.initializer[0].raw_data = np.ones(3, np.float32).tobytes()
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=r"short.onnx: tensor 'w': holds 12 bytes, its shape \[4\] float needs 16"):
        load_model(path)
    short = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4], float_data=[1.0, 2.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [tensor("x", [4])],
                              [tensor("y", [4])], [short])  # (helper.make_tensor refuses to build it)
    typed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path.write_bytes(typed.SerializeToString())
    with pytest.raises(ModelError, match=r"tensor 'w': holds 2 values, its shape \[4\] float needs 4"):
        load_model(path)


def test_npz_members_that_are_pickles_or_lie_about_their_shape(tmp_path, capsys):
    from onnxqat.data import load_npz

    pickled = tmp_path / "pickled.npz"
    with zipfile.ZipFile(pickled, "w") as z:
        import pickle

        z.writestr("x.npy", pickle.dumps(np.zeros(3)))
    with pytest.raises(DataError, match=r"pickled.npz: 'x' is not a numpy array \(raw bytes or a pickle\?\)"):
        load_npz(pickled, ["x"])
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="'x' holds Python objects"):
        load_npz(objects, ["x"])
    liar = tmp_path / "liar.npz"  # a header claiming 3 PiB for 64 bytes of data
    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 48, 3)}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 64)
        z.writestr("label.npy", labels.getvalue())  # (eval needs labels: the liar is then the only problem)
    with pytest.raises(DataError, match=r"liar.npz: 'x': its header claims shape \[281474976710656, 3\] float32 "
                                        r"\(3\.15e\+06 GiB\) but the member holds 64 bytes"):
        load_npz(liar, ["x"])
    onnx.save(tiny_cnn(), tmp_path / "m.onnx")
    assert "liar.npz: 'x': its header claims" in error_line(*cli(capsys, "eval", tmp_path / "m.onnx", "--data", liar))


def test_npz_arrays_beyond_the_memory_limit_are_refused(tmp_path, monkeypatch):
    from onnxqat.data import load_npz

    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((1000, 1000), np.float32))  # 4 MB expanded, a few KB on disk
    monkeypatch.setenv("ONNXQAT_MAX_DATA_BYTES", str(1 << 20))
    with pytest.raises(DataError, match=r"big.npz: the arrays need 3.81 MiB in memory \('x': 3.81 MiB\), more than "
                                        r"the limit of 1 MiB"):
        load_npz(path, ["x"])
    assert load_npz(path, ["x"], max_bytes=8 << 20)["x"].shape == (1000, 1000)


def test_deeply_nested_json_is_one_line(tiny, tmp_path, capsys):
    from onnxqat.encodings import read_document

    model, data = tiny
    deep = tmp_path / "deep.json"
    deep.write_text('{"defaults": ' + "[" * 100000 + "]" * 100000 + "}")
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o", "--config", deep)
    assert "deep.json: nested too deeply to be a quantization config" in error_line(code, out, err)
    with pytest.raises(EncodingsError, match="deep.json: nested too deeply to be an encodings file"):
        read_document(str(deep))


def test_nan_weights_name_the_weight(sims):
    sim = QuantizationSimModel(tiny_cnn())
    with pytest.raises(ModelError, match="initializer 'wf': values are not all finite"):
        sim.set_weights({"wf": np.full((5, 64), np.nan, np.float32)})


def test_the_gradient_builder_error_is_cut_to_its_reason():
    from onnxqat.train.canary import _ort_message

    signature = ("/onnxruntime_src/orttraining/orttraining/core/graph/gradient_builder_registry.cc:40 "
                 "onnxruntime::training::GradientDef onnxruntime::training::GetGradientForOp(const "
                 "onnxruntime::training::GradientGraphConfiguration&, onnxruntime::Graph*, const onnxruntime::Node*, "
                 "const std::unordered_set<std::__cxx11::basic_string<char> >&, ...) " * 3)
    message = _ort_message(RuntimeError(signature + "The gradient builder has not been registered: HardSwish for node "
                                        "/act/HardSwish\n"))
    assert message == "The gradient builder has not been registered: HardSwish for node /act/HardSwish"


def test_an_unexpected_exception_is_still_one_line(tiny, tmp_path, capsys, monkeypatch):
    import onnxqat.cli as cli_module

    model, data = tiny

    def bug(args):
        raise ValueError("something onnxqat did not expect\n  with a second line")

    monkeypatch.setattr(cli_module, "_quantize", bug)
    line = error_line(*cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o"))
    assert line == ("error: internal error, please report it (ONNXQAT_TRACEBACK=1 shows where): "
                    "ValueError: something onnxqat did not expect")


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer():
    sim = QuantizationSimModel(tiny_cnn())
    sim.compute_encodings(random_batches(), progress=False)
    with sim.trainer(loss="distill", lr=1e-4) as t:
        with pytest.warns(RuntimeWarning, match="optimizer steps"):
            t.fit(random_batches(4), epochs=1, progress=False)
        yield t


def test_a_truncated_checkpoint_is_one_line(trainer, tmp_path):
    path = trainer.save_checkpoint(tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    sim = QuantizationSimModel(tiny_cnn())
    sim.compute_encodings(random_batches(), progress=False)
    with sim.trainer(loss="distill", lr=1e-4) as t:
        with pytest.raises(ConfigError) as e:
            t.fit(random_batches(4), epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert str(e.value) == (f"{path}: not a readable training checkpoint (damaged or truncated); delete it to start "
                            "afresh, or use another checkpoint_dir")


def test_a_full_disk_while_checkpointing_is_one_line(trainer, tmp_path, monkeypatch):
    from onnxqat.train.ort_training import training_modules

    _, api = training_modules()
    trainer.save_checkpoint(tmp_path)
    before = (tmp_path / "checkpoint.ckpt").read_bytes()
    trace = "\n".join(["Traceback (most recent call last):", *[f'  File "x.py", line {i}, in f' for i in range(12)],
                       "onnxruntime.capi.onnxruntime_pybind11_state.Fail: [ONNXRuntimeError] : 1 : FAIL : "
                       "Failed to write checkpoint: No space left on device", ""])

    def full(*args, **kwargs):
        raise RuntimeError(trace)

    monkeypatch.setattr(api.CheckpointState, "save_checkpoint", full)
    with pytest.raises(OutputError) as e:
        trainer.save_checkpoint(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'checkpoint.ckpt'}: cannot write checkpoint: Failed to write checkpoint: "
                            "No space left on device")
    assert os.listdir(tmp_path) == ["checkpoint.ckpt"] and (tmp_path / "checkpoint.ckpt").read_bytes() == before


# -- errors come before any work ------------------------------------------------------------------------
def test_bad_output_and_checkpoint_dirs_are_reported_before_any_work(tiny, tmp_path, capsys):
    model, data = tiny
    blocker = tmp_path / "file"
    blocker.write_text("")
    for option, value, message in (
        ("--output-dir", blocker, "file: exists and is not a directory"),
        ("--output-dir", blocker / "sub", f"file/sub: {blocker} is not a directory"),
        ("--checkpoint-dir", blocker, "file: exists and is not a directory"),
        ("--checkpoint-dir", "/sys/onnxqat-ckpt", "cannot write outputs here"),
    ):
        args = ["--output-dir", tmp_path / "o", option, value] if option == "--checkpoint-dir" else [option, value]
        code, out, err = cli(capsys, "train", model, "--data", data, "--calib", data, "--loss", "distill", *args)
        assert message in error_line(code, out, err), option
        before_any_work(out)
    (tmp_path / "o2" / "model.onnx").mkdir(parents=True)
    code, out, err = cli(capsys, "quantize", model, "--data", data, "--output-dir", tmp_path / "o2")
    assert "model.onnx: exists and is a directory" in error_line(code, out, err)
    before_any_work(out)


# -- the property: whatever fails, the outputs are the complete old set or the complete new one ----------
class _FailAt:
    """Raises at the ``n``-th point: a publish step or a file write (``save_model``)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def tick(self):
        if self.calls == self.n:
            self.calls += 1
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        self.calls += 1


def _survives(publish, monkeypatch):
    """Run ``publish`` with the failures armed (then disarm them); whether it succeeded. A failure
    must be the simulated one, as one OutputError."""
    try:
        publish()
        return True
    except OutputError as e:
        assert "No space left on device (simulated)" in str(e)
        return False
    finally:
        monkeypatch.undo()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(point=st.integers(0, 30), prefix=st.sampled_from(["model", "net"]))
def test_property_export_holds_the_old_or_the_new_set(sims, tmp_path_factory, monkeypatch, point, prefix):
    import onnxqat.pipeline as pipeline

    old_sim, new_sim = sims
    folder = tmp_path_factory.mktemp("export")
    reference = tmp_path_factory.mktemp("reference")
    new_sim.export(reference, prefix)
    new = contents(reference)
    old_sim.export(folder, prefix)
    old = contents(folder)
    fail = _FailAt(point)
    save = pipeline.save_model

    def failing_save(model, path):
        fail.tick()
        return save(model, path)

    monkeypatch.setattr(outputs, "_step", lambda what, path: fail.tick())
    monkeypatch.setattr(pipeline, "save_model", failing_save)
    ok = _survives(lambda: new_sim.export(folder, prefix), monkeypatch)
    assert contents(folder) == (new if ok else old)
    assert staging_left(folder) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(point=st.integers(0, 7), report_first=st.booleans())  # 6 publish steps, then success
def test_property_an_export_and_its_report_are_published_together(sims, tmp_path_factory, monkeypatch, point,
                                                                  report_first):
    """The CLI's transaction: the export set in OUT and a report elsewhere are both old or both new."""
    old_sim, new_sim = sims
    root = tmp_path_factory.mktemp("together")
    folder, report = root / "out", root / "reports" / "r.json"

    def publish(sim, text):
        with transaction() as tx:
            if report_first:  # the order members were staged in must not matter
                with open(tx.file(report), "w") as f:
                    f.write(text)
            sim.export(folder)
            if not report_first:
                with open(tx.file(report), "w") as f:
                    f.write(text)

    publish(new_sim, "new")
    new = contents(folder)
    publish(old_sim, "old")
    old = contents(folder)
    fail = _FailAt(point)
    monkeypatch.setattr(outputs, "_step", lambda what, path: fail.tick())
    ok = _survives(lambda: publish(new_sim, "new"), monkeypatch)
    assert (contents(folder), report.read_text()) == ((new, "new") if ok else (old, "old"))
    assert staging_left(folder) == [] and staging_left(report.parent) == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(point=st.integers(0, 6))
def test_property_checkpoint_is_the_old_or_the_new_one(trainer, tmp_path_factory, monkeypatch, point):
    from onnxqat.train.ort_training import training_modules

    _, api = training_modules()
    folder = tmp_path_factory.mktemp("ckpt")
    trainer.epochs_done = 1
    old = open(trainer.save_checkpoint(folder), "rb").read()
    trainer.epochs_done = 2
    reference = tmp_path_factory.mktemp("reference")
    new = open(trainer.save_checkpoint(reference), "rb").read()
    assert new != old
    fail = _FailAt(point)
    save = api.CheckpointState.save_checkpoint

    def failing_save(*args, **kwargs):
        fail.tick()
        return save(*args, **kwargs)

    monkeypatch.setattr(outputs, "_step", lambda what, path: fail.tick())
    monkeypatch.setattr(api.CheckpointState, "save_checkpoint", failing_save)
    ok = _survives(lambda: trainer.save_checkpoint(folder), monkeypatch)
    assert os.listdir(folder) == ["checkpoint.ckpt"]
    assert (folder / "checkpoint.ckpt").read_bytes() == (new if ok else old)
