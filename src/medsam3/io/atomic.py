"""Atomic output files: write to a temporary name in the same folder, then rename.

A failure (exception, interrupt) never leaves a half-written file at the final name, and an output path that
is one of the inputs is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from medsam3.errors import OutputError

#: Paths of the inputs of the running command; writers refuse to overwrite any of them.
_PROTECTED: set[Path] = set()


def protect_inputs(paths: Iterable[str | Path]) -> None:
    """Register input files (or folders, protecting every file below them) that must never be overwritten."""
    for p in paths:
        _PROTECTED.add(Path(p).resolve())


def check_not_input(path: str | Path) -> Path:
    """Resolve ``path`` and raise :class:`OutputError` if it is, or lies inside, a protected input."""
    target = Path(path).resolve()
    for p in _PROTECTED:
        if target == p or p in target.parents:
            raise OutputError(f"{path}: refusing to write over an input ({p})")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _split_suffix(name: str) -> tuple[str, str]:
    for double in (".nii.gz", ".seg.nrrd", ".tar.gz"):
        if name.lower().endswith(double):
            return name[: -len(double)], name[-len(double) :]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot else (name, "")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so format-sniffing writers work).

    On normal exit the temporary file is renamed to ``path``; on error it is removed and ``path`` is left
    as it was. The parent folder is created if missing.
    """
    target = check_not_input(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split_suffix(target.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".part{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.exists() or tmp_path.stat().st_size == 0:
            raise OutputError(f"{path}: the writer produced no data")
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the final path."""
    return write_bytes_atomic(path, text.encode("utf-8"))
