"""KFP v2 components: thin typed wrappers, one per task, over ``qlora_kfp.tasks``.

Each component lives in its own module, generated from ``components/spec.py`` and the stage
configs (``make generate``). Importing this package needs only kfp: every component imports
the library inside its body, so compiling never imports torch. Components load on first use
(``from qlora_kfp.components import train``), so the generator can import the spec before the
modules it writes exist.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from qlora_kfp.components.spec import COMPONENTS

__all__ = sorted(s.name for s in COMPONENTS)


def __getattr__(name: str) -> Any:
    if name in __all__:
        component = getattr(importlib.import_module(f"qlora_kfp.components.{name}"), name)
        # Importing the module bound its name here to the module; the component replaces it.
        globals()[name] = component
        return component
    raise AttributeError(f"module 'qlora_kfp.components' has no attribute {name!r}")


class _Package(types.ModuleType):
    """This package: importing a component's module (``import qlora_kfp.components.train``)
    makes the import system bind ``train`` here to the module, after the module has run;
    the component it defines is bound instead, so the name means one thing however it was
    first imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
