"""Recognise an input by its content (magic bytes and headers), never by its file name alone.

:func:`detect_format` returns one of ``dicom-folder``, ``dicom``, ``nifti``, ``nrrd``, ``metaimage``, ``png``,
``jpeg``, ``bmp``, ``tiff`` and ``npz``. The file name is only used to cross-check: a name whose extension
belongs to a *different* known format than the content (a PNG called ``scan.nii.gz``) is refused with an
:class:`~medsam3.errors.InputError`, because such a file has usually been mixed up upstream and reading it
as something else would silently change what the user analyses. Names with no extension or an unknown one
(DICOM files are often called ``IM0001`` or ``CT.1.2.840...``) are read by content.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from pathlib import Path

from medsam3.errors import InputError

#: Extensions (lower case, longest first) and the format they announce.
_EXTENSIONS = (
    (".seg.nrrd", "nrrd"),
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".mha", "metaimage"),
    (".mhd", "metaimage"),
    (".png", "png"),
    (".jpg", "jpeg"),
    (".jpeg", "jpeg"),
    (".bmp", "bmp"),
    (".tif", "tiff"),
    (".tiff", "tiff"),
    (".npz", "npz"),
    (".dcm", "dicom"),
    (".dicom", "dicom"),
    (".ima", "dicom"),
)

#: Human names of the formats for messages.
FORMAT_NAMES = {
    "dicom-folder": "DICOM series folder",
    "dicom": "DICOM",
    "nifti": "NIfTI",
    "nrrd": "NRRD",
    "metaimage": "MetaImage (MHA/MHD)",
    "png": "PNG",
    "jpeg": "JPEG",
    "bmp": "BMP",
    "tiff": "TIFF",
    "npz": "NumPy .npz",
    "npy": "NumPy .npy",
    "gzip": "gzip archive",
    "zip": "zip archive",
}


def extension_format(path: str | Path) -> str | None:
    """The format a file name announces by its extension, or ``None`` for unknown / no extension."""
    name = Path(path).name.lower()
    for ext, fmt in _EXTENSIONS:
        if name.endswith(ext):
            return fmt
    return None


def check_readable_file(path: Path) -> None:
    """Raise :class:`InputError` unless ``path`` is an existing, readable, non-empty regular file."""
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied (the file is not readable)")
    if path.stat().st_size == 0:
        raise InputError(path, "the file is empty (0 bytes)")


def _head(path: Path, n: int = 1024) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from exc


def _gunzip_head(path: Path, n: int = 1024) -> bytes:
    """The first ``n`` decompressed bytes of a gzip file (fewer if it is shorter or broken early)."""
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def _content_format(path: Path, head: bytes) -> str | None:
    """Format from the leading bytes; ``None`` when nothing is recognised."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        inner = _gunzip_head(path)
        if _is_nifti_header(inner):
            return "nifti"
        if inner.startswith(b"NRRD000"):
            return "nrrd"
        return "gzip"
    text = head[:512]
    if b"ObjectType" in text and b"NDims" in text:
        return "metaimage"
    if _looks_like_raw_dicom(head):
        return "dicom"
    return None


def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (magic ``n+1``/``ni1`` at byte 344) or NIfTI-2 (``n+2``/``ni2`` at byte 4)."""
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return True
    return len(head) >= 8 and head[4:7] in (b"n+2", b"ni2")


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM file written without the 128-byte preamble (old ACR-NEMA style): group 0x0008 first."""
    return len(head) >= 8 and head[0:2] == b"\x08\x00" and head[3:4] == b"\x00"


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its content (one of the formats the module docstring lists).

    A folder is ``"dicom-folder"`` (whether it really holds DICOM is checked when it is read). Raises
    :class:`InputError` for a missing, unreadable or empty file, an unrecognised content, or a file whose
    known extension names a different format than its content.
    """
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise InputError(path, "permission denied (the folder is not readable)")
        return "dicom-folder"
    check_readable_file(path)
    head = _head(path)
    fmt = _content_format(path, head)
    announced = extension_format(path)
    if fmt is None or fmt in ("npy", "zip", "gzip"):
        what = FORMAT_NAMES.get(fmt, "an unrecognised format") if fmt else "an unrecognised format"
        if fmt == "gzip":
            what = "a gzip file that does not start with a NIfTI header"
            if announced == "nifti" and not _gunzip_head(path):
                what = "a truncated or corrupt gzip file"
        raise InputError(
            path,
            f"content is {what}; expected NIfTI, NRRD, MHA/MHD, DICOM, PNG, JPEG, BMP, TIFF or a "
            "BiomedSegFM .npz",
        )
    if announced is not None and announced != fmt:
        raise InputError(
            path,
            f"the name says {FORMAT_NAMES[announced]} but the content is {FORMAT_NAMES[fmt]}; "
            "rename the file to match its content",
        )
    return fmt
