"""Deployment targets: the integer arithmetic the deployed kernels do.

The same QDQ file gives different numbers on different CPUs when a kernel's arithmetic is not
exact. onnxruntime's x86 U8S8 GEMM kernels (``QLinearConv``, ``QGemm``, ``QLinearMatMul``) on CPUs
without VNNI multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds each pair
of adjacent products in a *saturating* 16-bit lane: ``255 * (w1 + w2)`` overflows 32767 once two
same-sign weights of one output channel sum above 128 in magnitude. Full-range int8 weights (a
per-channel maximum at 127) hit that constantly; the outputs are silently wrong.

A target states what is exact there:

* ``x86-avx2``: x86 without VNNI (AVX2, or AVX-512 without VNNI). Weights of those kernels
  keep ``|q_i| + |q_j| <= 128`` for any two same-sign weights of an output channel (the
  *pair limit*): the scale is raised to ``(a1 + a2) / 127.5`` where ``a1, a2`` are the two largest
  same-sign magnitudes of the channel when that is above ``max|w| / 127``. This is exact for every
  pairing the kernel may use and keeps more precision than 7-bit weights (measured 1.0-3.4 dB
  weight SQNR on the demo and PaddleOCR models). Depthwise convolutions use an exact kernel and
  keep the full grid. A depthwise convolution whose channel count is not a multiple of 16 is
  padded to the next multiple when the model is prepared (:data:`onnxqat.ops.PAD_DEPTHWISE`:
  onnxruntime's generic integer depthwise kernel is several times slower than its symmetric one);
  one that cannot be padded runs in float (:data:`onnxqat.ops.UNALIGNED_DEPTHWISE`), between
  quantized activations. A Linear on a pooled ``[N, C, 1, 1]`` tensor is prepared as a 1x1 Conv
  (:data:`onnxqat.ops.POOLED_LINEAR`).
* ``x86-vnni``: ``vpdpbusd`` accumulates in 32 bits: full-range int8 weights are exact. The same
  onnxruntime depthwise kernel choice and layout as ``x86-avx2`` (the same padding, float and
  layout rules).
* ``arm64``: widening multiplies / dot-product instructions accumulate in 32 bits.
* ``htp``: Qualcomm HTP via QNN/SNPE (float model + encodings): 32-bit accumulation; the default
  placement is AIMET's (every op output quantized).

>>> TARGETS["x86-avx2"].pair_limit, TARGETS["x86-vnni"].pair_limit
(128, None)
>>> [r.rule_id for r in TARGETS["x86-avx2"].float_kernels], TARGETS["arm64"].float_kernels
(['kernel.depthwise_unaligned'], ())
"""

from __future__ import annotations

import dataclasses
import platform
import types
from collections.abc import Mapping

from onnxqat.errors import ConfigError
from onnxqat.ops import PAD_DEPTHWISE, POOLED_LINEAR, UNALIGNED_DEPTHWISE, ChannelPadRule, FloatKernelRule, LayoutRule

__all__ = ["TARGETS", "Target", "detect_target", "resolve_target"]


@dataclasses.dataclass(frozen=True)
class Target:
    """What the deployment kernels compute exactly.

    Attributes:
        name: Target name (``x86-avx2``, ``x86-vnni``, ``arm64``, ``htp``).
        description: One line for the CLI and reports.
        pair_limit: Largest ``|q_i| + |q_j|`` of two same-sign 8-bit weights of one output channel
            that the U8S8 GEMM kernels add without saturation, or None when they accumulate exactly.
        default_config: Placement preset used when the user gives no config.
        float_kernels: Nodes whose integer kernel there is slower than float: their weights stay
            float, so they run their float kernel between quantized activations.
        pad_depthwise: Depthwise convolutions padded to the rule's channel multiple when the model is
            prepared (before ``float_kernels`` apply: a padded one no longer takes the slow kernel).
        layout_rules: Rewrites applied when the model is prepared, into an equivalent graph the
            runtime lays out better (:class:`onnxqat.ops.LayoutRule`).
    """

    name: str
    description: str
    pair_limit: int | None
    default_config: str
    float_kernels: tuple[FloatKernelRule, ...] = ()
    pad_depthwise: ChannelPadRule | None = None
    layout_rules: tuple[LayoutRule, ...] = ()


TARGETS: Mapping[str, Target] = types.MappingProxyType({
    t.name: t for t in (
        Target("x86-avx2", "x86 without VNNI: U8S8 kernels add weight pairs in saturating 16-bit lanes; "
               "8-bit weights kept pair-safe", 128, "onnxruntime", (UNALIGNED_DEPTHWISE,), PAD_DEPTHWISE,
               (POOLED_LINEAR,)),
        Target("x86-vnni", "x86 with VNNI: 32-bit integer accumulation", None, "onnxruntime", (UNALIGNED_DEPTHWISE,),
               PAD_DEPTHWISE, (POOLED_LINEAR,)),
        Target("arm64", "ARM64: 32-bit integer accumulation", None, "onnxruntime"),
        Target("htp", "Qualcomm HTP (QNN/SNPE): 32-bit accumulation, every op output quantized", None, "aimet"),
    )
})


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_target(cpuinfo: str | None = None, machine: str | None = None) -> Target:
    """The target of this machine's onnxruntime CPU provider.

    ``cpuinfo`` and ``machine`` default to ``/proc/cpuinfo`` and ``platform.machine()``. Anything
    that is not recognisably ARM or x86 with VNNI is treated as ``x86-avx2``, the target whose
    weights are exact on every CPU.
    """
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return TARGETS["arm64"]
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags = _cpu_flags(cpuinfo)
    if flags & {"avx512_vnni", "avx_vnni", "avx512vnni"}:
        return TARGETS["x86-vnni"]
    return TARGETS["x86-avx2"]


def resolve_target(target: str | Target | None) -> Target:
    """A target from its name, or the detected one for None."""
    if isinstance(target, Target):
        return target
    if target is None:
        return detect_target()
    found = TARGETS.get(target)
    if found is None:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return found
