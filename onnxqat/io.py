"""Model loading with validation, and atomic output writing.

Loading never modifies the input file and never reads outside the model's folder: external-data
locations that are absolute, climb out with ``..``, or resolve (through symlinks) outside the
folder are refused before any weight is read, and so is a tensor whose data (inline or in its
external file) is shorter than its shape. Outputs go through :mod:`onnxqat.outputs`: staged,
then published all together or not at all.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxqat.backend import check_environment, model_limits
from onnxqat.errors import ModelError, OnnxQatError
from onnxqat.graph import array_tensor
from onnxqat.outputs import transaction
from onnxqat.runtime import fits_in_proto, save_with_external_data

__all__ = ["MAX_IR_VERSION", "MAX_OPSET", "NEWEST_IR_VERSION", "check_input_file", "external_data_files",
           "load_model", "save_model", "write_text_atomic"]

# The newest opset and IR version the installed runtime loads (onnxruntime-training 1.19: 21 and
# 10; current plain releases: newer); models above them are converted down.
MAX_OPSET, MAX_IR_VERSION = model_limits()
_RUNTIME = "{} {}".format(*check_environment())
# The newest IR version an ONNX release defines (onnx 1.18); newer ones are refused, not lowered.
NEWEST_IR_VERSION = max(11, onnx.IR_VERSION)


def check_input_file(path: str | os.PathLike[str], error: type[OnnxQatError] = ModelError) -> str:
    """Refuse an input that is missing or is no regular file (a FIFO would block, a directory or
    device is no data); returns the path as a string."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file (a FIFO, socket or device); onnxqat reads only files")
    return path


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
        _check_external_size(tensor, resolved, where)


def _data_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape needs, or None for types without a fixed size (strings)."""
    n: int = math.prod(tensor.dims)
    if tensor.data_type in _FOUR_BIT:
        return (n + 1) // 2
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _shape_text(tensor: onnx.TensorProto) -> str:
    return f"shape {list(tensor.dims)} {onnx.TensorProto.DataType.Name(tensor.data_type).lower()}"


def _check_external_size(tensor: onnx.TensorProto, file: str, where: str) -> None:
    fields = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(fields.get("offset", "0") or 0)
        length = int(fields["length"]) if fields.get("length") else None
    except ValueError:
        raise ModelError(f"{where}: offset/length are not integers") from None
    size = os.path.getsize(file)
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{where}: negative offset or length")
    if offset > size or (offset == size and (length or 0) > 0):
        raise ModelError(f"{where}: offset {offset} is past the end of the file ({size} bytes)")
    if length is not None and offset + length > size:
        raise ModelError(f"{where}: offset {offset} + length {length} runs past the end of the file ({size} bytes)")
    need = _data_bytes(tensor)
    have = length if length is not None else size - offset
    if need is not None and have < need:
        raise ModelError(f"{where}: holds {have} bytes, its {_shape_text(tensor)} needs {need}")


# the typed field holding each element type's values, and values per element
_TYPED: dict[int, tuple[str, int]] = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.INT32: ("int32_data", 1),
    onnx.TensorProto.INT16: ("int32_data", 1), onnx.TensorProto.INT8: ("int32_data", 1),
    onnx.TensorProto.UINT16: ("int32_data", 1), onnx.TensorProto.UINT8: ("int32_data", 1),
    onnx.TensorProto.BOOL: ("int32_data", 1), onnx.TensorProto.FLOAT16: ("int32_data", 1),
    onnx.TensorProto.BFLOAT16: ("int32_data", 1),
}


def _check_inline_sizes(proto: onnx.ModelProto, path: str) -> None:
    """Every inline tensor holds as many values as its shape says (a short one would be read
    past its end or fail deep inside a later stage)."""
    for tensor in _tensors_with_external_data(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        where = f"{path}: tensor '{tensor.name}'"
        if tensor.HasField("raw_data"):
            need = _data_bytes(tensor)
            if need is not None and len(tensor.raw_data) != need:
                raise ModelError(f"{where}: holds {len(tensor.raw_data)} bytes, its {_shape_text(tensor)} needs {need}")
            continue
        typed = _TYPED.get(tensor.data_type)
        if typed is None:
            continue
        field, per = typed
        n = math.prod(tensor.dims)
        have = len(getattr(tensor, field))
        if have != n * per and not (n == 0 and have == 0):
            raise ModelError(f"{where}: holds {have // per} values, its {_shape_text(tensor)} needs {n}")


def external_data_files(path: str | os.PathLike[str]) -> list[str]:
    """The external-data files a model file refers to (absolute paths; read from its header only)."""
    path = os.fspath(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # not a model: load_model reports it
        return []
    base = os.path.dirname(os.path.abspath(path))
    files = []
    for tensor in _tensors_with_external_data(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location:
                files.append(os.path.join(base, location))
    return sorted(set(files))


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load and validate an ONNX model file; raises :class:`ModelError` naming what is wrong."""
    path = check_input_file(path, ModelError)
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: not an ONNX model (cannot parse protobuf: {e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e}") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph, IR version or opset)")
    if proto.ir_version > NEWEST_IR_VERSION:
        raise ModelError(f"{path}: IR version {proto.ir_version} is newer than any ONNX release defines "
                         f"({NEWEST_IR_VERSION}); the file is damaged or from an unknown future format")
    _check_external_paths(proto, path)
    _check_inline_sizes(proto, path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > MAX_OPSET or proto.ir_version > MAX_IR_VERSION:
        return _convert_down(proto, path, opset)
    external = _has_external(proto)
    # onnx 1.18+ refuses external data reached through a symlink, which is how onnxqat publishes
    # output sets (onnxqat.outputs): read such a model from where its link points, when its data
    # is there too (the checks above resolved every location inside the folder)
    real = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if external and not all(os.path.isfile(os.path.join(os.path.dirname(real), os.path.relpath(f, folder)))
                            for f in external_data_files(path)):
        real = path
    try:
        onnx.checker.check_model(real if external else proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{path}: fails the ONNX checker: {first}") from None
    if not external:
        return ir.from_proto(proto)  # what ir.load gives, without parsing the file again
    model = ir.load(real)
    if fits_in_proto(model):
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
    """A model newer than the installed runtime runs, converted down where onnx can."""
    if _has_external(proto):
        raise ModelError(
            f"{path}: opset {opset} / IR {proto.ir_version} is newer than {_RUNTIME} runs "
            f"(opset {MAX_OPSET}, IR {MAX_IR_VERSION}); convert it down before quantizing"
        )
    proto = onnx.load(path)
    if opset > MAX_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MAX_OPSET)
        except Exception as e:  # the converter raises bare RuntimeErrors for unknown adapters
            raise ModelError(
                f"{path}: opset {opset} is newer than {MAX_OPSET} (the newest {_RUNTIME} "
                f"runs) and onnx cannot convert it down: {str(e).strip().splitlines()[0]}"
            ) from None
    if proto.ir_version > MAX_IR_VERSION:
        warnings.warn(f"{path}: IR version {proto.ir_version} lowered to {MAX_IR_VERSION} (the newest "
                      f"{_RUNTIME} loads)", RuntimeWarning, stacklevel=3)
        proto.ir_version = MAX_IR_VERSION
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
        if not fits_in_proto(model):
            data_name = os.path.basename(path) + ".data"
            save_with_external_data(model, path, data_name)
            return [path, os.path.join(os.path.dirname(path), data_name)]
        ir.save(model, path)
        return [path]
    finally:
        for value, type_, shape in stripped:
            value.type = type_
            value.shape = shape


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file as one output transaction (joining the caller's, if any)."""
    with transaction() as tx:
        with open(tx.file(path), "w", encoding="utf-8") as f:
            f.write(text)
