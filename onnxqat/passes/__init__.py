"""Graph passes over onnx-ir models (canonicalise, fold BatchNorm, annotate, insert/strip QDQ).

A pass that reports findings returns a :class:`onnx_ir.passes.PassResult` subclass; it derives
from :class:`TypedInPlacePass` or :class:`TypedFunctionalPass` with that class as parameter, so
``SomePass()(model)`` is typed as the pass's own result (onnx-ir's ``__call__`` says only
``PassResult``) and its findings are read off the result, never off the pass.
"""

from __future__ import annotations

import abc
from typing import Generic, TypeVar, cast

import onnx_ir as ir

__all__ = ["TypedFunctionalPass", "TypedInPlacePass"]

ResultT = TypeVar("ResultT", bound=ir.passes.PassResult)


class TypedInPlacePass(ir.passes.InPlacePass, Generic[ResultT]):
    """An in-place pass whose ``call`` returns ``ResultT``."""

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ResultT:
        return cast(ResultT, super().__call__(model_or_result))  # what self.call returned

    @abc.abstractmethod
    def call(self, model: ir.Model) -> ResultT: ...


class TypedFunctionalPass(ir.passes.FunctionalPass, Generic[ResultT]):
    """A functional pass (a new model, the input untouched) whose ``call`` returns ``ResultT``."""

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ResultT:
        return cast(ResultT, super().__call__(model_or_result))  # what self.call returned

    @abc.abstractmethod
    def call(self, model: ir.Model) -> ResultT: ...
