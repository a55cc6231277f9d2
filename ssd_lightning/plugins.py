"""A class of the user's own code, named in a config as `{"_target_": "package.module.Class", **arguments}`.

The network (a backbone), the DataModule (a data source) and the train transform take such a spec as plain
data, so a checkpoint keeps it and rebuilds the object without Hydra or pickled code. Only a subclass of the
kind expected is built: a spec cannot name an arbitrary callable (`os.system`) to be called at load.
This is Hydra's `_target_` convention; the lookup is a few lines here so that the plain-PyTorch floors do
not depend on Hydra.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")
TARGET = "_target_"


def is_spec(value: Any) -> bool:
    """Whether `value` names a class to build (`{"_target_": ...}`)."""
    return isinstance(value, Mapping) and TARGET in value


def plugin_class(target: str, kind: type[T], option: str) -> type[T]:
    """The class `target` ("package.module.Class"), which must subclass `kind`."""
    module_name, _, class_name = str(target).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"{option}._target_={target}: cannot import it ({error}); is its package installed?"
        ) from None
    if not (isinstance(found, type) and issubclass(found, kind)):
        raise ValueError(
            f"{option}._target_={target} is not a subclass of {kind.__module__}.{kind.__qualname__}: "
            f"only such classes are built from a config or a checkpoint"
        )
    return found


def build_plugin(spec: Mapping[str, Any], kind: type[T], option: str, **extra: Any) -> T:
    """An instance of the class `spec` names, with its other keys (and `extra`) as arguments."""
    arguments = {key: value for key, value in spec.items() if key != TARGET}
    return plugin_class(spec[TARGET], kind, option)(**extra, **arguments)
