"""Receiving uploads safely: size limit while streaming, format by content, zip and voxel checks.

Flow of one upload (:func:`receive_upload`, then :func:`store_upload`):

1. The request body is streamed to ``<image folder>/upload.part`` and counted: more than the limit
   answers 413 before the rest is read (a ``Content-Length`` above it is refused before reading anything).
   A ``multipart/form-data`` body carries the file in the field ``file`` (optional fields ``series_uid`` and
   ``modality``); any other body is the file itself (name in the ``X-Filename`` header).
2. The format is recognised by **content** (:func:`medsam3.io.sniff.detect_format`, plus the zip magic
   number for DICOM archives). The client's file name is only a label for messages and downloads, sanitised
   and never used as a path; a name whose extension announces another format than the content is refused,
   as :mod:`medsam3.io.sniff` does for local files.
3. Formats that could make the server read *other* files are refused: detached NRRD headers (``data
   file:``), NIfTI header/image pairs (``ni1``), MetaImage (``ElementDataFile``).
4. A zip archive must hold a DICOM series: every entry is checked before anything is extracted (no absolute
   path or drive letter, no ``..`` component, no symlink, no encryption, at most ``max_zip_entries``
   entries, total uncompressed size and compression ratio within limits), then entries are extracted under
   server-generated names, counting the bytes actually written.
5. The number of voxels the header declares must not exceed ``max_voxels`` (a few compressed kilobytes can
   declare gigabytes of pixels), checked before the pixels are read.

Every refusal is an :class:`~medsam3.serve.errors.ApiError` (400, 413 or 415) whose message names the
upload by its display name and says what is wrong.
"""

from __future__ import annotations

import gzip
import re
import stat
import unicodedata
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from medsam3.errors import InputError
from medsam3.io.sniff import FORMAT_NAMES, detect_format, extension_format
from medsam3.serve.errors import ApiError
from medsam3.serve.settings import ServeSettings

if TYPE_CHECKING:
    from nibabel.analyze import AnalyzeImage

#: Formats the server accepts, by the name :func:`detect_format` gives them (plus ``dicom-zip``).
ACCEPTED = ("nifti", "nrrd", "png", "jpeg", "bmp", "tiff", "dicom", "dicom-zip")

#: Stored file name suffix for each accepted single-file format (readers pick their decoder by suffix).
_SUFFIX = {"nrrd": ".nrrd", "png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif", "dicom": ".dcm"}

#: Label-map outputs for each upload format: ``(file name, media type)``; DICOM also gets a DICOM SEG.
MASK_OUTPUTS = {
    "nifti": ("mask.nii.gz", "application/gzip"),
    "nrrd": ("mask.nrrd", "application/octet-stream"),
    "png": ("mask.png", "image/png"),
    "jpeg": ("mask.png", "image/png"),
    "bmp": ("mask.png", "image/png"),
    "tiff": ("mask.tif", "image/tiff"),
    "dicom": ("mask.nii.gz", "application/gzip"),
    "dicom-zip": ("mask.nii.gz", "application/gzip"),
}

#: Multipart overhead allowed on top of the file limit (boundaries, part headers, small fields).
_MULTIPART_SLACK = 64 * 1024
#: Entries smaller than this are not judged by their compression ratio (tiny files compress oddly).
_RATIO_MIN_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024


@dataclass
class Received:
    """An upload streamed to disk: ``path`` (raw bytes), the client's sanitised ``name`` and form fields."""

    path: Path
    name: str
    size: int
    series_uid: str | None = None
    modality: str | None = None


@dataclass
class Stored:
    """An accepted upload: ``source`` is what :func:`medsam3.io.readers.read_image` reads (file or folder)."""

    source: Path
    kind: str  # one of ACCEPTED
    declared_voxels: int

    @property
    def format_name(self) -> str:
        return "DICOM series (zip)" if self.kind == "dicom-zip" else FORMAT_NAMES.get(self.kind, self.kind)


# -- names -------------------------------------------------------------------------------------------------
def display_name(raw: str | None) -> str:
    """The client's file name reduced to a harmless label: last path part, printable, at most 120 chars."""
    name = unicodedata.normalize("NFC", str(raw or ""))
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in "\"'<>`")
    name = name.strip().strip(".") or "upload"
    return name[:120]


def download_stem(name: str) -> str:
    """A file-name stem for downloads: the display name without extension, ASCII letters/digits/-_."""
    base = name
    for double in (".nii.gz", ".seg.nrrd"):
        if base.lower().endswith(double):
            base = base[: -len(double)]
            break
    else:
        base = base.rsplit(".", 1)[0] if "." in base else base
    ascii_ = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_).strip("_")
    return stem[:80] or "image"


# -- streaming the body --------------------------------------------------------------------------------
def _too_large(settings: ServeSettings) -> ApiError:
    return ApiError(
        413, f"upload too large: the limit is {settings.max_upload_mb:g} MB (server option --max-upload-mb)"
    )


async def _limited(
    stream: AsyncIterator[bytes], limit: int, settings: ServeSettings
) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise _too_large(settings)
        yield chunk


async def receive_upload(request: Request, folder: Path, settings: ServeSettings) -> Received:
    """Stream the request's file into ``folder / "upload.part"`` (413 above the limit)."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise _too_large(settings)
    target = folder / "upload.part"
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        body = _limited(request.stream(), limit + _MULTIPART_SLACK, settings)
        parser = MultiPartParser(request.headers, body, max_files=1, max_fields=4, max_part_size=4096)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, f"malformed multipart upload: {exc.message}") from exc
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "the upload has no file: send it in the multipart field 'file'")
            size = 0
            with open(target, "wb") as out:
                while chunk := await upload.read(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(settings)
                    out.write(chunk)
            fields: dict[str, str | None] = {k: v for k, v in form.items() if isinstance(v, str)}
            name = display_name(upload.filename)
        finally:
            await form.close()
    else:
        size = 0
        with open(target, "wb") as out:
            async for chunk in _limited(request.stream(), limit, settings):
                size += len(chunk)
                out.write(chunk)
        fields = {
            "series_uid": request.query_params.get("series_uid"),
            "modality": request.query_params.get("modality"),
        }
        name = display_name(request.headers.get("x-filename") or request.query_params.get("name"))
    if size == 0:
        raise ApiError(400, f"{name}: the upload is empty (0 bytes)")
    series = (fields.get("series_uid") or "").strip() or None
    if series is not None and not re.fullmatch(r"[0-9.]{1,64}", series):
        raise ApiError(400, f"series_uid {series[:70]!r} is not a DICOM UID (digits and dots)")
    modality = (fields.get("modality") or "").strip() or None
    return Received(target, name, size, series, modality)


# -- format checks -------------------------------------------------------------------------------------
def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06")


def _nrrd_header(path: Path) -> list[str]:
    """Header lines of an NRRD file (gzip-compressed or not), up to the blank line."""
    with open(path, "rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    lines: list[str] = []
    with opener(path, "rb") as fh:
        for _ in range(1024):
            line = fh.readline(4096)
            if not line or not line.strip():
                break
            lines.append(line.decode("latin-1").rstrip("\r\n"))
    return lines


def _refuse_external_references(path: Path, fmt: str, name: str) -> None:
    """Refuse formats whose header can point the reader at another file on the server."""
    if fmt == "nrrd":
        for line in _nrrd_header(path):
            key = line.split(":", 1)[0].strip().lower()
            if key in ("data file", "datafile"):
                raise ApiError(
                    400,
                    f"{name}: detached NRRD header ('{key}:' names a separate data file); "
                    "upload a single .nrrd file with the data attached",
                )
    if fmt == "nifti":
        with open(path, "rb") as fh:
            head = fh.read(352)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                head = fh.read(352)
        if head[344:347] == b"ni1" or head[4:7] == b"ni2":
            raise ApiError(
                400,
                f"{name}: a NIfTI header without its image data (.hdr/.img pair); "
                "upload a single .nii or .nii.gz file",
            )


def sniff_upload(path: Path, name: str) -> str:
    """The accepted format of the raw upload at ``path`` (``dicom-zip`` for a zip archive); 415 otherwise."""
    if _is_zip(path):
        if not zipfile.is_zipfile(path):
            raise ApiError(400, f"{name}: a damaged zip archive (no readable central directory)")
        with zipfile.ZipFile(path) as zf:
            members = [i.filename for i in zf.infolist() if not i.is_dir()]
        if members and all(m.endswith(".npy") for m in members):
            raise ApiError(
                415,
                f"{name}: a numpy .npz archive; the server takes NIfTI, NRRD, a DICOM series as .zip, a "
                "DICOM file, PNG, JPEG, BMP or TIFF (the command line reads npz: medsam3 segment case.npz)",
            )
        return "dicom-zip"
    try:
        fmt = detect_format(path)
    except InputError as exc:
        raise ApiError(415, f"{name}: {exc.problem}") from None
    announced = extension_format(name)
    if announced is not None and announced != fmt:
        raise ApiError(
            415,
            f"{name}: the name says {FORMAT_NAMES[announced]} but the content is "
            f"{FORMAT_NAMES[fmt]}; rename the file to match its content",
        )
    if fmt not in ACCEPTED:
        raise ApiError(
            415,
            f"{name}: {FORMAT_NAMES.get(fmt, fmt)} uploads are not accepted; upload NIfTI, "
            "NRRD, a DICOM series as .zip, a DICOM file, PNG, JPEG, BMP or TIFF",
        )
    _refuse_external_references(path, fmt, name)
    return fmt


# -- zip archives --------------------------------------------------------------------------------------
def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    raw = info.filename
    parts = re.split(r"[\\/]", raw)
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        return "has an absolute path"
    if ".." in parts:
        return "would leave the upload folder ('..')"
    if any(ord(ch) < 32 for ch in raw):
        return "has control characters in its name"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
        return "is not a regular file"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def check_zip(path: Path, name: str, settings: ServeSettings) -> list[zipfile.ZipInfo]:
    """The file entries of a DICOM zip after every check of the module docstring (ApiError 400)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ApiError(400, f"{name}: a damaged zip archive ({exc})") from None
    if len(infos) > settings.max_zip_entries:
        raise ApiError(
            400,
            f"{name}: the zip holds {len(infos)} entries; at most {settings.max_zip_entries} "
            "are accepted (server option --max-zip-entries)",
        )
    files = []
    total = compressed = 0
    for info in infos:
        problem = _entry_problem(info)
        shown = info.filename[:120].encode("unicode_escape").decode("ascii")
        if problem:
            raise ApiError(400, f"{name}: zip entry '{shown}' {problem}; refused")
        if info.is_dir():
            continue
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ApiError(
                400,
                f"{name}: zip entry '{shown}' uses an unsupported compression method "
                f"({info.compress_type}); use deflate or store",
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_MIN_BYTES and ratio > settings.max_zip_ratio:
            raise ApiError(
                400,
                f"{name}: zip entry '{shown}' expands {ratio:.0f}x "
                f"(limit {settings.max_zip_ratio:g}x): refused as a possible zip bomb",
            )
        total += info.file_size
        compressed += info.compress_size
        files.append(info)
    if total > settings.max_unzipped_bytes:
        raise ApiError(
            400,
            f"{name}: the zip expands to {total / 2**20:.1f} MB; the limit is "
            f"{settings.max_unzipped_mb:g} MB (server option --max-unzipped-mb)",
        )
    if total > _RATIO_MIN_BYTES and total / max(compressed, 1) > settings.max_zip_ratio:
        raise ApiError(
            400,
            f"{name}: the zip expands {total / max(compressed, 1):.0f}x (limit "
            f"{settings.max_zip_ratio:g}x): refused as a possible zip bomb",
        )
    if not files:
        raise ApiError(400, f"{name}: the zip archive holds no files")
    return files


def _skip_entry(info: zipfile.ZipInfo) -> bool:
    """Operating-system litter that is never image data (macOS resource forks, Windows thumbnails)."""
    parts = re.split(r"[\\/]", info.filename)
    base = parts[-1]
    return "__MACOSX" in parts or base.startswith("._") or base in (".DS_Store", "Thumbs.db", "desktop.ini")


def extract_zip(path: Path, target: Path, name: str, settings: ServeSettings) -> int:
    """Extract the checked entries of ``path`` into ``target`` under generated names; returns the count.

    Bytes are counted as they are written (the sizes in the archive's directory could lie), so the total
    never exceeds ``max_unzipped_mb``.
    """
    files = [i for i in check_zip(path, name, settings) if not _skip_entry(i)]
    target.mkdir(parents=True, exist_ok=False)
    budget = settings.max_unzipped_bytes
    written = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for n, info in enumerate(files):
                out_path = target / f"f{n:06d}"
                with zf.open(info) as src, open(out_path, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > budget:
                            raise ApiError(
                                400,
                                f"{name}: the zip expands beyond "
                                f"{settings.max_unzipped_mb:g} MB (server option "
                                "--max-unzipped-mb)",
                            )
                        out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ApiError(400, f"{name}: a damaged zip archive ({exc})") from None
    return len(files)


# -- declared sizes ----------------------------------------------------------------------------------
def _dicom_voxels(files: list[Path]) -> int:
    import pydicom

    total = 0
    for f in files:
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"]
            )
        except Exception:  # not DICOM: the reader skips it
            continue
        frames = ds.get("NumberOfFrames", 1) or 1
        total += int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(frames)
    return total


def declared_voxels(source: Path, kind: str) -> int:
    """Voxels the header(s) of an upload declare, read without decoding the pixels."""
    if kind == "nifti":
        import nibabel as nib

        shape = cast("AnalyzeImage", nib.load(str(source))).header.get_data_shape()  # NIfTI: an Analyze image
        return int(np.prod([max(int(s), 1) for s in shape], dtype=np.int64))
    if kind == "nrrd":
        import nrrd

        header = nrrd.read_header(str(source))
        return int(np.prod([int(s) for s in header.get("sizes", [0])], dtype=np.int64))
    if kind in ("png", "jpeg", "bmp"):
        from PIL import Image as PILImage

        with PILImage.open(source) as im:
            return int(im.size[0]) * int(im.size[1]) * max(len(im.getbands()), 1)
    if kind == "tiff":
        import tifffile

        with tifffile.TiffFile(source) as tf:
            return sum(int(np.prod(s.shape, dtype=np.int64)) for s in tf.series)
    if kind == "dicom":
        return _dicom_voxels([source])
    if kind == "dicom-zip":
        return _dicom_voxels(sorted(p for p in source.iterdir() if p.is_file()))
    raise ValueError(f"unknown upload kind {kind!r}")


def store_upload(received: Received, folder: Path, settings: ServeSettings) -> Stored:
    """Check ``received`` (format, zip, declared size) and move it to its readable name in ``folder``."""
    name = received.name
    kind = sniff_upload(received.path, name)
    if kind == "dicom-zip":
        source = folder / "series"
        extract_zip(received.path, source, name, settings)
        received.path.unlink()
    elif kind == "nifti":
        with open(received.path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        source = folder / ("source.nii.gz" if gz else "source.nii")
        received.path.replace(source)
    else:
        source = folder / f"source{_SUFFIX[kind]}"
        received.path.replace(source)
    from PIL.Image import DecompressionBombError

    try:
        voxels = declared_voxels(source, kind)
    except ApiError:
        raise
    except DecompressionBombError as exc:
        from medsam3.io.raster import picture_bomb_message

        raise ApiError(413, f"{name}: {picture_bomb_message(exc)}") from None
    except Exception as exc:  # an unreadable header: the reader will say what is wrong
        if kind == "dicom-zip":
            raise ApiError(400, f"{name}: cannot read the DICOM headers ({exc})") from None
        voxels = 0
    if voxels > settings.max_voxels:
        raise ApiError(
            413,
            f"{name}: the image declares {voxels:,} voxels; the limit is "
            f"{settings.max_voxels:,} (server option --max-voxels)",
        )
    return Stored(source, kind, voxels)
