"""Names a package exports without importing their modules until first use (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def lazy_attribute(package: str, table: Mapping[str, str], name: str) -> Any:
    """``name`` from the module ``table[name]``, for a package's ``__getattr__``.

    Raises:
        AttributeError: ``name`` is not in ``table`` (the message names ``package``).
    """
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(table[name]), name)
