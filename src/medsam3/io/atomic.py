"""Atomic output files: write to a temporary name in the same folder, then rename.

A failure (exception, interrupt) never leaves a half-written file at the final name, and an output path that
is one of the inputs is refused before anything is written. An operating-system error while writing (disk
full, read-only folder, permission, a name too long, a file where a folder should be) becomes an
:class:`~medsam3.errors.OutputError` ``<path>: cannot write (<reason>)``.

Temporary names are short whatever the output's name: ``.<first 24 characters of the stem>.<pid>-<random>
.part<suffix>`` stays far below the 255-byte limit of file names, and names the process that owns it. A
process killed outright (SIGKILL, power loss) cannot remove its temporaries; :func:`remove_stale_temporaries`
removes those whose process no longer runs on this machine (a process id that is alive, or that this user
may not signal, is taken as a live owner and its files are left alone).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
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


#: Characters of the output's stem kept in a temporary name.
TEMP_STEM_CHARS = 24


def temporary_name_parts(name: str) -> tuple[str, str]:
    """``(prefix, suffix)`` of the temporary files for an output called ``name`` (module docstring)."""
    stem, suffix = _split_suffix(name)
    return f".{stem[:TEMP_STEM_CHARS]}.{os.getpid()}-", f".part{suffix}"


def write_error(path: str | os.PathLike[str], exc: BaseException) -> OutputError:
    """The :class:`OutputError` for an operating-system error ``exc`` while writing ``path``."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return OutputError(f"{path}: cannot write ({reason})")


#: The errors of a refused write (other OS errors inside a writer, such as a source file that vanished, are
#: not reported as write failures).
WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EFBIG",
        "EROFS",
        "EACCES",
        "EPERM",
        "ENAMETOOLONG",
        "EEXIST",
        "ENOTDIR",
        "EISDIR",
        "EIO",
    )
    if hasattr(errno, name)
)


def is_write_failure(exc: BaseException) -> bool:
    """True when ``exc`` is the system refusing a write (:data:`WRITE_ERRNOS`, or safetensors' error)."""
    # safetensors reports a failed write (disk full, file-size limit) as its own error type
    return (isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS) or type(exc).__name__ == "SafetensorError"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so format-sniffing writers work).

    On normal exit the temporary file is renamed to ``path``; on error it is removed and ``path`` is left
    as it was. The parent folder is created if missing.

    Raises:
        OutputError: ``path`` is an input, or the system refused the write (module docstring).
    """
    target = check_not_input(path)
    prefix, suffix = temporary_name_parts(target.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.exists() or tmp_path.stat().st_size == 0:
            raise OutputError(f"{path}: the writer produced no data")
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if is_write_failure(exc):
            raise write_error(path, exc) from None
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the final path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


#: A temporary file or folder of :func:`atomic_path` / ``atomic_directory``: its owner's process id.
_TEMPORARY = re.compile(r"^\..*\.(\d+)-[^./]+\.part")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process this user may not signal counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries in ``folder`` (not below it) left by processes that no longer run; returns
    what was removed. Only names of this module's pattern are touched."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        match = _TEMPORARY.match(item.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
            removed.append(item)
    return removed
