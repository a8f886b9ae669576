"""Files a model folder may carry beside its weights (``concepts.json``, ``domain.safetensors``), read once
per version of the file."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def model_file(folder: str | Path | None, name: str, load: Callable[[str], T]) -> T | None:
    """``load(path)`` of the file ``name`` in a model folder, or ``None`` (no folder, no such file); cached
    by the file's path, modification time and size."""
    if folder is None:
        return None
    path = Path(folder) / name
    try:
        stat = path.stat()
    except OSError:
        return None
    return _cached(load, str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cached(load: Callable[[str], Any], path: str, mtime_ns: int, size: int) -> Any:
    return load(path)
