"""Pipeline signatures made from the stage configs, and tasks fed from them by name.

A pipeline's parameters are the config fields (``qlora_kfp.configs``) with their types,
defaults and help text, which KFP shows as each parameter's description. The pipeline body
gets them as one dict and hands every task the parameters it declares (:func:`inputs_for`), so
a new config field reaches the component, the pipeline and the KFP UI with no edit here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

from kfp.dsl import pipeline_task

from qlora_kfp import configs


def _frames_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` less the source lines and modules, which KFP does not read."""
    frame, frames = sys._getframe(1), []
    while frame is not None:
        code = frame.f_code
        frames.append(
            inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None)
        )
        frame = frame.f_back
    return frames


@contextlib.contextmanager
def _cheap_caller_lookups() -> Iterator[None]:
    """While a pipeline body runs, KFP's caller lookup walks frames without reading sources.

    KFP 2.17's ``PipelineTask._ensure_container_spec_exists`` (kfp/dsl/pipeline_task.py) runs
    ``inspect.stack()[1][3]`` on every ``set_env_variable``, ``set_accelerator_type``... only to
    name its caller in an error message; ``inspect.stack`` finds the source file and module of
    every frame, which costs O(frames x loaded modules): 5 of 5.5 s to build both pipelines in
    a process that has torch loaded. The name it reads is the same here.
    """
    namespace = type(sys)("inspect")
    namespace.__dict__.update(vars(inspect), stack=_frames_without_source)
    real, pipeline_task.inspect = pipeline_task.inspect, namespace
    try:
        yield
    finally:
        pipeline_task.inspect = real


def pipeline_params(
    *classes: type,
    extra: tuple[tuple[str, type, Any, str], ...] = (),
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> Callable[[Callable[[dict], None]], Callable[..., None]]:
    """Decorator: give ``body(params: dict)`` one typed parameter per config field.

    Args:
        classes: Config dataclasses whose fields become parameters, each name once.
        extra: ``(name, type, default, help)`` parameters that are no config field (e.g. a
            sweep's grid); they come after the fields.
        exclude: Fields that are no parameter of this pipeline.
        defaults: Defaults of this pipeline that differ from the field's own.

    Returns:
        A function with the fields as its signature and an ``Args:`` docstring, which
        ``dsl.pipeline`` compiles like a hand-written one.
    """

    def wrap(body: Callable[[dict], None]) -> Callable[..., None]:
        params = [
            dataclasses.replace(p, default=(defaults or {}).get(p.name, p.default))
            for p in configs.params_of(*classes)
            if p.name not in exclude
        ]
        params += [configs.Param(n, t, d, h) for n, t, d, h in extra]
        ordered = [p for p in params if p.required] + [p for p in params if not p.required]
        names = [p.name for p in ordered]

        @functools.wraps(body)
        def pipeline(*args: Any) -> None:
            # dsl.pipeline calls the function with one channel per parameter, in order.
            with _cheap_caller_lookups():
                return body(dict(zip(names, args, strict=True)))

        del pipeline.__wrapped__  # inspect.signature must read __signature__, not body's
        pipeline.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    p.name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    annotation=p.type,
                    default=inspect.Parameter.empty if p.required else p.default,
                )
                for p in ordered
            ]
        )
        pipeline.__annotations__ = {p.name: p.type for p in ordered}
        # One line each: KFP keeps a wrapped description's line breaks in the UI.
        args_doc = "\n".join(f"    {p.name}: {p.help}" for p in ordered)
        pipeline.__doc__ = f"{inspect.getdoc(body) or ''}\n\nArgs:\n{args_doc}\n"
        return pipeline

    return wrap


def inputs_for(component: Any, params: dict, **given: Any) -> dict:
    """The arguments of one task: ``given`` ones, then every pipeline parameter the
    component declares under the same name."""
    inputs = component.component_spec.inputs or {}
    return {**{k: v for k, v in params.items() if k in inputs and k not in given}, **given}
