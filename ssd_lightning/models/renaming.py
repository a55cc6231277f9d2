"""Renaming a published state dict's keys into ours: the helpers each architecture's conversions use
(`PublishedDetector.convert` in its module)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# (regex on a module path, replacement): one rename rule.
Patterns = tuple[tuple[str, str], ...]


def count_numbered(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many numbered submodules `prefix<N>.` the state dict holds."""
    heads = (k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix))
    return len({h for h in heads if h.isdigit()})


def names_by_pattern(state: Mapping[str, Tensor], patterns: Patterns) -> dict[str, str]:
    """Module renames for every key whose module path matches one of the (regex, replacement) patterns."""
    names = {}
    for key in state:
        module = key.rpartition(".")[0]
        for pattern, replacement in patterns:
            if re.fullmatch(pattern, module):
                names[module] = re.sub(pattern, replacement, module)
                break
    return names


def rename(state: Mapping[str, Tensor], names: Mapping[str, str], source: str) -> dict[str, Tensor]:
    """`state` with each key's module (or the whole key) renamed by `names`; a key with no new name is an
    error naming `source`."""
    converted: dict[str, Tensor] = {}
    unused = []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if key in names:  # whole-key entries such as L2Norm.weight
            converted[names[key]] = tensor
        elif module in names:
            converted[f"{names[module]}.{param}"] = tensor
        else:
            unused.append(key)
    if unused:
        raise ValueError(f"{source} state dict has keys with no place in our SSD: {unused[:8]}")
    return converted
