"""Model loading with validation, and atomic output writing.

Loading never modifies the input file and never reads outside the model's folder: external-data
locations that are absolute, climb out with ``..``, or resolve (through symlinks) outside the
folder are refused before any weight is read. Outputs are staged in a temporary folder next to
their destination and moved into place only when all of them were written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxqat.errors import ModelError, OutputError
from onnxqat.graph import array_tensor
from onnxqat.runtime import PROTO_LIMIT, model_bytes_size, save_with_external_data

__all__ = ["MAX_IR_VERSION", "MAX_OPSET", "load_model", "save_model", "staged_outputs", "write_text_atomic"]

MAX_OPSET = 21
MAX_IR_VERSION = 10


def _tensors_with_external_data(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors_with_external_data(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors_with_external_data(g)


def _check_external_paths(proto: onnx.ModelProto, path: str) -> None:
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in _tensors_with_external_data(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        where = f"{path}: tensor '{tensor.name}' has external data at '{location}'"
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ModelError(f"{where}: external data must be a relative path inside the model's folder")
        parts = location.replace("\\", "/").split("/")
        if ".." in parts:
            raise ModelError(f"{where}: '..' is not allowed in external data paths")
        resolved = os.path.realpath(os.path.join(base, location))
        if os.path.commonpath([base, resolved]) != base:
            raise ModelError(f"{where}: resolves outside the model's folder")
        if not os.path.isfile(resolved):
            raise ModelError(f"{where}: file not found")


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load and validate an ONNX model file; raises :class:`ModelError` naming what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: not a file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: not an ONNX model (cannot parse protobuf: {e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e}") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph, IR version or opset)")
    _check_external_paths(proto, path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > MAX_OPSET or proto.ir_version > MAX_IR_VERSION:
        return _convert_down(proto, path, opset)
    external = _has_external(proto)
    try:
        onnx.checker.check_model(path if external else proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{path}: fails the ONNX checker: {first}") from None
    if not external:
        return ir.from_proto(proto)  # what ir.load gives, without parsing the file again
    model = ir.load(path)
    if model_bytes_size(model) < PROTO_LIMIT:
        _materialize(model)
    return model


def _materialize(model: ir.Model) -> None:
    """Read external weights into memory, so the model serializes into one self-contained protobuf.

    Only for models under the protobuf limit; bigger ones stay memory-mapped from their files.
    """
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = array_tensor(np.array(tensor.numpy()), name=name)


def _convert_down(proto: onnx.ModelProto, path: str, opset: int) -> ir.Model:
    """A model newer than onnxruntime-training 1.19 runs, converted down where onnx can."""
    if _has_external(proto):
        raise ModelError(
            f"{path}: opset {opset} / IR {proto.ir_version} is newer than onnxruntime-training 1.19 runs "
            f"(opset {MAX_OPSET}, IR {MAX_IR_VERSION}); convert it down before quantizing"
        )
    proto = onnx.load(path)
    if opset > MAX_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MAX_OPSET)
        except Exception as e:  # the converter raises bare RuntimeErrors for unknown adapters
            raise ModelError(
                f"{path}: opset {opset} is newer than {MAX_OPSET} (the newest onnxruntime-training 1.19 "
                f"runs) and onnx cannot convert it down: {str(e).strip().splitlines()[0]}"
            ) from None
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"{path}: fails the ONNX checker after conversion to opset {MAX_OPSET}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    return ir.from_proto(proto)


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors_with_external_data(proto.graph))


def save_model(model: ir.Model, path: str) -> list[str]:
    """Save ``model`` at ``path`` (external data beside it when too big for one protobuf).

    Inferred types of intermediate values (value_info) are not written: they are derivable and
    would only add bytes to the file. Returns the files written.
    """
    # Strip the types while saving and put them back after: the same file as saving a stripped
    # clone, without copying the whole graph.
    stripped = [(v, v.type, v.shape) for node in model.graph for v in node.outputs if not v.is_graph_output()]
    try:
        for value, _, _ in stripped:
            value.shape = None
            value.type = None
        if model_bytes_size(model) >= PROTO_LIMIT:
            data_name = os.path.basename(path) + ".data"
            save_with_external_data(model, path, data_name)
            return [path, os.path.join(os.path.dirname(path), data_name)]
        ir.save(model, path)
        return [path]
    finally:
        for value, type_, shape in stripped:
            value.type = type_
            value.shape = shape


class _Stage:
    def __init__(self, directory: str, tmp: str) -> None:
        self.directory = directory
        self.tmp = tmp
        self.files: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def add(self, staged_path: str) -> None:
        self.files.append(os.path.basename(staged_path))


@contextlib.contextmanager
def staged_outputs(directory: str | os.PathLike[str]) -> Iterator[_Stage]:
    """Write outputs into a temp folder inside ``directory``; move them in place at the end.

    Files registered with ``stage.add`` replace their namesakes in ``directory`` only if the
    ``with`` block finishes without error; otherwise nothing in ``directory`` changes.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputError(f"{directory}: exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".onnxqat-", dir=directory)
    except OSError as e:
        raise OutputError(f"{directory}: cannot write outputs here: {e.strerror or e}") from None
    stage = _Stage(directory, tmp)
    try:
        yield stage
        for name in stage.files:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    except OSError as e:
        raise OutputError(f"{directory}: writing outputs failed: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file through a temporary name in the same folder, then rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".onnxqat-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
