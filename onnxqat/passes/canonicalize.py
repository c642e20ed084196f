"""Bring an exported model into the form the other passes expect.

* Constant nodes become initializers (exporters such as PaddlePaddle keep weights in Constant nodes;
  they are weights all the same).
* Initializers listed as graph inputs (old IR versions) become plain initializers.
* Every node and value has a unique name.
* Models below opset 13 are upgraded to 13 (per-channel DequantizeLinear needs its ``axis``).
* Constant chains that compute weights (Cast, Transpose, ... of an initializer) are folded.
* Shapes and dtypes are inferred where onnx can; dtypes it cannot find come from onnxruntime.
"""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveInitializersFromInputsPass,
)

from onnxqat.errors import ModelError
from onnxqat.graph import call_with_light_proto, opset_version
from onnxqat.passes import TypedInPlacePass
from onnxqat.passes.fold_constants import FoldWeightChainsPass
from onnxqat.passes.infer_types import InferShapesPass, InferTypesWithOnnxruntimePass

__all__ = ["MIN_OPSET", "UpgradeOpsetPass", "UpgradeOpsetResult", "canonical_passes"]

MIN_OPSET = 13


@dataclasses.dataclass
class UpgradeOpsetResult(ir.passes.PassResult):
    """Attributes: previous: the default-domain opset before the pass; opset: after it."""

    previous: int = 0
    opset: int = 0


class UpgradeOpsetPass(TypedInPlacePass[UpgradeOpsetResult]):
    """Convert the default-domain opset up to ``target`` with onnx's version converter.

    In place: a model already at ``target`` or above is left as it is (no copy of the graph);
    an upgraded one takes the converted graph and model fields.
    """

    def __init__(self, target: int = MIN_OPSET) -> None:
        super().__init__()
        self.target = target

    def ensures(self, model: ir.Model) -> None:
        """The default-domain opset is at least ``target``."""
        if opset_version(model) < self.target:
            raise ir.passes.PostconditionError(
                f"the default-domain opset is {opset_version(model)} after upgrading to {self.target}")

    def call(self, model: ir.Model) -> UpgradeOpsetResult:
        current = opset_version(model)
        if current >= self.target:
            return UpgradeOpsetResult(model, False, current, current)
        tensors = {name: v.const_value for name, v in model.graph.initializers.items()}
        try:
            converted = call_with_light_proto(
                lambda proto: onnx.version_converter.convert_version(proto, self.target), model
            )
        except Exception as e:  # the converter raises bare RuntimeErrors and more
            raise ModelError(f"cannot upgrade the model from opset {current} to {self.target}: {e}") from None
        new = ir.from_proto(converted)
        kept_inputs = [v for v in new.graph.inputs if v.name not in tensors]
        by_name = {v.name: v for v in new.graph.inputs}
        new.graph.inputs.clear()
        new.graph.inputs.extend(kept_inputs)
        for name, tensor in tensors.items():
            value = new.graph.initializers.get(name) or by_name.get(name)
            if value is None:
                continue
            if value.const_value is None:
                value.const_value = tensor
            if name not in new.graph.initializers:
                new.graph.register_initializer(value)
        _adopt(model, new)
        return UpgradeOpsetResult(model, True, current, opset_version(model))


def _adopt(model: ir.Model, new: ir.Model) -> None:
    """Make ``model`` the same model as ``new`` (its graph and every model-level field)."""
    model.graph = new.graph
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string",
                  "device_configurations"):
        setattr(model, field, getattr(new, field))
    model.functions.clear()
    model.functions.update(new.functions)
    model.metadata_props.clear()
    model.metadata_props.update(new.metadata_props)
    model.meta.clear()
    model.meta.update(new.meta)


def canonical_passes() -> ir.passes.PassManager:
    """The passes above, in order; all in place (the model passed in is the one returned)."""
    return ir.passes.PassManager(
        [
            LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
            RemoveInitializersFromInputsPass(),
            NameFixPass(),
            UpgradeOpsetPass(MIN_OPSET),
            FoldWeightChainsPass(),
            InferShapesPass(strict_mode=False),
            InferTypesWithOnnxruntimePass(),
        ]
    )
