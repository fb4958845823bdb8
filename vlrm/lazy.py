"""Public names that load on first use: what ``vlrm`` and each wing's ``__init__`` hand on.

    # in a package's __init__.py
    __getattr__, __dir__ = public_names(__name__, {"RewardScorer": "vlrm.use.scoring", ...})

``import vlrm.use`` then imports nothing else; ``from vlrm.use import RewardScorer`` imports ``vlrm.use.scoring`` (and
only what it needs), so scoring a checkpoint never loads the trainer's or the data preparation's dependencies (TRL,
datasets, DeepSpeed). A submodule's name imports it, as an eager ``__init__`` would have made it reachable.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def public_names(package: str, public: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``: ``public`` maps each name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in public:
            value = getattr(importlib.import_module(public[name]), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":  # the submodule exists; something it imports does not
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__
