"""Pad the channels of depthwise convolutions to a multiple at their producers (:data:`onnxqat.ops.PAD_DEPTHWISE`).

onnxruntime's x86 QLinearConv runs a depthwise convolution on its fast (symmetric, indirect)
kernel only when the channel count is a multiple of 16. A depthwise Conv of ``C`` channels, its
*channel region* (every tensor that carries those channels: the pointwise Conv that produces them,
the elementwise activations and squeeze-excitation ops on them, the Conv that reads them) gets
``C' = ceil(C / m) * m`` channels: zero filters in the Convs that produce the region, zero weights
for the extra input channels of the Convs that read it, zero filters and bias in the depthwise
Convs. The extra channels hold values of their own (zero, or an activation of zero) that no real
channel reads, so every real channel computes what it computed before, in float and in integers
alike; the graph has no Pad or Slice. The padded graph is the one the sim calibrates and runs, and
the one deployed.

Calibration observes the padded tensors whole: zeros are inside every min-max range already;
an activation of zero (a squeeze-excitation gate of 0.5, ``x + 3`` = 3 inside a decomposed
HardSwish) widens a range only where the real channels do not reach it; in a histogram the extra
values count as more samples (a percentile moves a little). In training the zero weights see
zero gradients wherever the extra channels that reach them are zero (the Convs reading a region
read ``HardSwish(0)``, ``0 x gate``: zero in PP-LCNet and MobileNetV3 blocks).

A region is padded only when every op in it is per channel (see ``_PER_CHANNEL``) with scalar
constants, it reaches no graph input or output, and its boundary Convs have constant weights that
nothing else reads. Otherwise it is left as it is, with its reason (``pad.*`` rule ids), and the
target's float-kernel rule (:data:`onnxqat.ops.UNALIGNED_DEPTHWISE`) applies to it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxqat.graph import const_array, name_of
from onnxqat.ops import Reason, is_depthwise
from onnxqat.passes import TypedInPlacePass

__all__ = ["PadDepthwiseChannelsPass", "PadDepthwiseChannelsResult", "channel_region"]

# Ops that compute each channel from the same channel of their inputs (and scalar constants).
_PER_CHANNEL = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Relu", "HardSwish", "HardSigmoid", "Sigmoid",
                          "LeakyRelu", "Identity", "GlobalAveragePool", "MaxPool", "AveragePool"})


@dataclasses.dataclass
class PadDepthwiseChannelsResult(ir.passes.PassResult):
    """Attributes:
        padded: Depthwise Conv -> its channel count before and after padding.
        unpadded: Depthwise Conv of a channel count not a multiple left as it is -> why.
    """

    padded: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    unpadded: dict[str, Reason] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ChannelRegion:
    """The tensors carrying a depthwise Conv's channels and the Convs that bound them.

    Attributes:
        channels: The channel count of every tensor in the region.
        tensors: The tensors (channels on axis 1).
        depthwise: Depthwise Convs inside the region (input and output in it).
        producers: Convs writing a tensor of the region (their output channels padded).
        readers: Convs reading a tensor of the region as input 0 (their input channels padded).
    """

    channels: int
    tensors: tuple[ir.Value, ...]
    depthwise: tuple[ir.Node, ...]
    producers: tuple[ir.Node, ...]
    readers: tuple[ir.Node, ...]


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _channels(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[1], int):
        return None
    return shape[1]


def _own_constant(value: ir.Value | None, node: ir.Node) -> np.ndarray | None:
    """The value of a constant weight or bias that only ``node`` reads, else None."""
    array = const_array(value)
    if array is None or value is None or any(use.node is not node for use in value.uses()):
        return None
    return array


def _boundary_conv(node: ir.Node) -> bool | Reason:
    """True for a Conv with one group and a constant weight (and bias) of its own, which can take
    zero channels; its reason for a Conv with one group that cannot; False for any other node."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or _attr_int(node, "group", 1) != 1:
        return False
    own = [_own_constant(v, node) is not None for v in node.inputs[1:3] if v is not None]
    if len(own) < 1 or not all(own):
        return Reason("pad.weight_shared", f"Conv '{node.name}': its weight or bias is not a constant of its own")
    return True


def channel_region(node: ir.Node) -> ChannelRegion | Reason:
    """The channel region of a depthwise Conv (see the module notes), or why it cannot be padded."""
    label = f"Conv '{node.name}'"
    if not is_depthwise(node) or node.inputs[0] is None:
        return Reason("pad.not_depthwise", f"{label} is not a depthwise convolution")
    channels = _attr_int(node, "group", 1)
    tensors: dict[int, ir.Value] = {}
    depthwise: dict[int, ir.Node] = {}
    producers: dict[int, ir.Node] = {}
    readers: dict[int, ir.Node] = {}
    inner: dict[int, ir.Node] = {}
    todo: list[ir.Value] = []

    def add(value: ir.Value) -> Reason | None:
        if id(value) in tensors:
            return None
        if _channels(value) != channels:
            return Reason("pad.shape", f"{label}: tensor '{value.name}' does not have {channels} channels on axis 1")
        if value.is_graph_input() or value.is_graph_output() or value.const_value is not None:
            return Reason("pad.interface", f"{label}: tensor '{value.name}' is a graph input, output or constant")
        tensors[id(value)] = value
        todo.append(value)
        return None

    def enter(op: ir.Node) -> Reason | None:
        """A per-channel op or a depthwise Conv: all its tensors join the region."""
        if id(op) in inner or id(op) in depthwise:
            return None
        if is_depthwise(op) and _attr_int(op, "group", 1) == channels:
            if _own_constant(op.inputs[1], op) is None or (len(op.inputs) > 2 and op.inputs[2] is not None
                                                          and _own_constant(op.inputs[2], op) is None):
                return Reason("pad.weight_shared", f"{label}: depthwise Conv '{op.name}' has a weight read elsewhere")
            depthwise[id(op)] = op
            data = [op.inputs[0]]
        elif op.op_type in _PER_CHANNEL and op.domain in ("", "ai.onnx"):
            if sum(1 for v in op.outputs if v.uses() or v.is_graph_output()) > 1:
                return Reason("pad.op", f"{label}: {op.op_type} '{op.name}' has a second output (indices of the padded shape)")
            if op.op_type == "Div" and const_array(op.inputs[1]) is None:
                return Reason("pad.op", f"{label}: Div '{op.name}' divides by a tensor (the extra channels would divide by zero)")
            inner[id(op)] = op
            data = []
            for v in op.inputs:
                if v is None:
                    continue
                array = const_array(v)
                if array is not None:
                    if array.size != 1:
                        return Reason("pad.constant", f"{label}: {op.op_type} '{op.name}' has a constant of "
                                      f"{array.size} values")
                    continue
                data.append(v)
        else:
            return Reason("pad.op", f"{label}: {op.op_type} '{op.name}' mixes or reshapes the channels")
        for v in [*data, *op.outputs]:
            if v is None:
                continue
            problem = add(v)
            if problem is not None:
                return problem
        return None

    problem = enter(node)
    while problem is None and todo:
        value = todo.pop()
        producer = value.producer()
        if producer is None:
            problem = Reason("pad.interface", f"{label}: tensor '{value.name}' has no producer")
        else:
            boundary = _boundary_conv(producer)
            if isinstance(boundary, Reason):
                problem = Reason(boundary.rule_id, f"{label}: {boundary.detail}")
            elif boundary:
                producers[id(producer)] = producer
            else:
                problem = enter(producer)
        for use in list(value.uses()) if problem is None else []:
            user = use.node
            boundary = _boundary_conv(user)
            if isinstance(boundary, Reason):
                problem = Reason(boundary.rule_id, f"{label}: {boundary.detail}")
            elif boundary and use.idx == 0:
                readers[id(user)] = user
            else:
                problem = enter(user)
            if problem is not None:
                break
    if problem is not None:
        return problem
    if set(producers) & set(readers):
        return Reason("pad.shape", f"{label}: a Conv both reads and writes the region")
    return ChannelRegion(channels, tuple(tensors.values()), tuple(depthwise.values()), tuple(producers.values()),
                         tuple(readers.values()))


def _replace_constant(node: ir.Node, index: int, array: np.ndarray) -> None:
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _pad_axis(array: np.ndarray, axis: int, extra: int) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, extra)
    return np.pad(array, widths)


def pad_region(region: ChannelRegion, multiple: int) -> int:
    """Pad a region in place to the next multiple of ``multiple`` channels; the new channel count."""
    padded = -(-region.channels // multiple) * multiple
    extra = padded - region.channels
    for conv in (*region.producers, *region.depthwise):
        for index in (1, 2):
            array = const_array(conv.inputs[index]) if len(conv.inputs) > index else None
            if array is not None:
                _replace_constant(conv, index, _pad_axis(array, 0, extra))
    for conv in region.depthwise:
        conv.attributes["group"] = ir.AttrInt64("group", padded)
    for conv in region.readers:
        array = const_array(conv.inputs[1])
        assert array is not None
        _replace_constant(conv, 1, _pad_axis(array, 1, extra))
    for value in region.tensors:
        assert value.shape is not None
        dims = list(value.shape)
        dims[1] = padded
        value.shape = ir.Shape(dims)
    return padded


class PadDepthwiseChannelsPass(TypedInPlacePass[PadDepthwiseChannelsResult]):
    """Pad every depthwise Conv whose channel count is not a multiple of ``multiple`` whose region allows it."""

    def __init__(self, multiple: int) -> None:
        super().__init__()
        if multiple < 2:
            raise ValueError(f"a channel multiple is at least 2, got {multiple}")
        self.multiple = multiple

    def call(self, model: ir.Model) -> PadDepthwiseChannelsResult:
        result = PadDepthwiseChannelsResult(model, False)
        for node in list(model.graph):
            if not is_depthwise(node) or node.domain not in ("", "ai.onnx"):
                continue
            channels = _attr_int(node, "group", 1)
            if channels % self.multiple == 0:
                continue
            region = channel_region(node)
            if isinstance(region, Reason):
                result.unpadded[name_of(node)] = region
                continue
            padded = pad_region(region, self.multiple)
            for conv in region.depthwise:
                result.padded[name_of(conv)] = (channels, padded)
            result.modified = True
        return result
