"""Label names (and display colours) that travel with a label map, and where to read them back from.

The label table
---------------
One JSON document, the same in both places a NIfTI label map can carry it::

    {"medsam3_labels": 1, "labels": [{"value": 1, "name": "liver", "color": [230, 25, 75]}, ...]}

``medsam3_labels`` is the format version (1) and, being the first key, marks the document as this
package's label table. ``labels`` lists the named label values in ascending order (``value`` >= 1; the
background 0 is not listed), each with its ``name`` and its display ``color`` (sRGB, 0..255). Named values
that do not occur in the label map are listed too. Unless colours are given, they are
:func:`medsam3.overlay.label_colors` of the named values (the palette in rank order of the values).

Where it is stored
------------------
* **NIfTI header extension** (``.nii`` / ``.nii.gz``): extension code 6, ``NIFTI_ECODE_COMMENT``, holding
  the document as compact ASCII JSON (other characters as ``\\uXXXX`` escapes), padded with NUL bytes to a
  multiple of 16 bytes as the NIfTI standard asks. The comment code is the registered code for free text:
  no registered code denotes JSON, and an unregistered one could clash with another tool's, whereas a
  comment is shown as text by header dumps (``nibabel``, ``nifti_tool``) and skipped by readers that do
  not use it (SimpleITK / ITK and nibabel read the voxels as before). A comment extension is taken for a
  label table only when it holds a JSON object with the ``medsam3_labels`` key; other comments are left
  alone.
* **JSON sidecar** beside the label map: ``X_seg.json`` for ``X_seg.nii.gz`` / ``X_seg.nii`` (the name
  without ``.nii.gz`` / ``.nii``, otherwise without its last suffix, plus ``.json``), the same document
  indented and UTF-8 encoded. A JSON file there without the ``medsam3_labels`` key (a BIDS sidecar, a
  case summary) is not a label table and is ignored.

A NIfTI written with a table holds, once decompressed, the bytes of the file written without one (header
fields, qform / sform, dtype, voxels) except for ``vox_offset``, which moves the voxels behind the
extension, the extension flag after the header, and the extension itself. ``.nii.gz`` files are
recompressed here (gzip level :data:`GZIP_LEVEL`).

Reading back
------------
:func:`read_label_table` finds the names of any label map and says where they came from
(:data:`SOURCES`): the NIfTI extension, NRRD / MetaImage Slicer segment fields
(``Segment<i>_Name``, ``_LabelValue``, ``_Color``), the npz ``label_names`` (or ``text_prompts``), the
DICOM SEG segment labels (``SegmentLabel``, colour from ``RecommendedDisplayCIELabValue``). When the file
itself names nothing, the JSON sidecar is used. When both exist and disagree, the file's own names win
and a warning says so. A label table that is not valid JSON, or whose entries are malformed, is an
:class:`~medsam3.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from medsam3.errors import InputError, OutputError
from medsam3.io.atomic import atomic_path, is_write_failure, temporary_name_parts, write_error

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "NIFTI_ECODE_COMMENT",
    "SOURCES",
    "LabelTable",
    "cielab_to_rgb",
    "embed_label_table",
    "label_table",
    "nifti_extension_bytes",
    "nifti_extensions",
    "read_label_names",
    "read_label_table",
    "sidecar_path",
    "sidecar_text",
    "write_label_sidecar",
    "write_nifti_with_table",
]

#: The key that marks a JSON document as a label table (its value is :data:`FORMAT_VERSION`).
FORMAT_KEY = "medsam3_labels"
#: Version of the label-table document this module writes and reads.
FORMAT_VERSION = 1
#: NIfTI extension code of the table: ``NIFTI_ECODE_COMMENT`` (module docstring).
NIFTI_ECODE_COMMENT = 6

#: Where :func:`read_label_table` found the names (``None`` when nowhere).
SOURCES = (
    "nifti extension",
    "sidecar",
    "nrrd segment fields",
    "metaimage segment fields",
    "npz label_names",
    "npz text_prompts",
    "dicom seg",
)

RGB = tuple[int, int, int]

#: gzip level of a ``.nii.gz`` written with a label table (zlib's default balance of size and speed).
GZIP_LEVEL = 6
#: Largest label table read from a sidecar or a header extension (bytes).
_MAX_TABLE_BYTES = 64 << 20
_MARKER = b'"' + FORMAT_KEY.encode() + b'"'


# -- the document ---------------------------------------------------------------------------------------
def _rgb(value: Any, what: str) -> RGB:
    """``value`` as an ``(r, g, b)`` tuple of ints in 0..255; ValueError naming ``what`` otherwise."""
    try:
        items = list(value)
    except TypeError:
        items = []
    ok = len(items) == 3 and all(
        isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) and 0 <= c <= 255
        for c in items
    )
    if not ok:
        raise ValueError(f"{what}: a colour is three integers 0..255 (red, green, blue), not {value!r}")
    return (int(items[0]), int(items[1]), int(items[2]))


def label_table(
    names: Mapping[int, str], colors: Mapping[int, Sequence[int]] | None = None
) -> dict[str, Any]:
    """The label-table document (module docstring) for ``names`` (label value -> name).

    Values below 1 are left out (0 is the background). ``colors`` (value -> ``(r, g, b)``, 0..255) overrides
    the default :func:`medsam3.overlay.label_colors` colour of the values it names. Raises ValueError for
    a malformed colour.
    """
    from medsam3.overlay import label_colors

    named = {int(k): str(v) for k, v in names.items() if int(k) >= 1}
    default = label_colors(named)
    given = {int(k): _rgb(v, f"label {k}") for k, v in (colors or {}).items()}
    rows = [{"value": v, "name": named[v], "color": list(given.get(v, default[v]))} for v in sorted(named)]
    return {FORMAT_KEY: FORMAT_VERSION, "labels": rows}


def nifti_extension_bytes(table: Mapping[str, Any]) -> bytes:
    """The extension content of ``table``: compact ASCII JSON, NUL-padded so that the extension (8 bytes of
    size and code, then this) is a multiple of 16 bytes."""
    text = json.dumps(table, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return text + b"\0" * (-(len(text) + 8) % 16)


def sidecar_text(names: Mapping[int, str], colors: Mapping[int, Sequence[int]] | None = None) -> str:
    """The sidecar file's text for ``names`` / ``colors`` (:func:`label_table`, indented, non-ASCII kept)."""
    return json.dumps(label_table(names, colors), indent=2, ensure_ascii=False) + "\n"


def sidecar_path(label_path: str | Path) -> Path:
    """The JSON sidecar of a label map: ``X_seg.json`` for ``X_seg.nii.gz``, ``X_seg.nii``, ``X_seg.mha``."""
    path = Path(label_path)
    name = path.name
    for ending in (".nii.gz", ".nii"):
        if name.lower().endswith(ending):
            return path.with_name(name[: -len(ending)] + ".json")
    return path.with_suffix(".json")


def write_label_sidecar(
    path: str | Path,
    names: Mapping[int, str],
    colors: Mapping[int, Sequence[int]] | None = None,
    *,
    atomic: bool = True,
) -> Path:
    """Write the label table of ``names`` as a JSON sidecar and return the path written.

    Args:
        path: the label map (the sidecar goes to :func:`sidecar_path` of it) or, ending in ``.json``, the
            sidecar itself.
        names: label value -> name (values below 1 are left out).
        colors: optional value -> ``(r, g, b)`` overriding the default colours.
        atomic: ``True`` writes through :func:`medsam3.io.atomic.atomic_path` (temporary name, then
            renamed). ``False`` writes exactly ``path``, which must then end in ``.json``: for a caller
            that already holds a temporary path from ``atomic_path(sidecar_path(label_map))`` and renames
            it into place with its other files.

    Raises:
        OutputError: the file cannot be written, or is one of the command's inputs.
        ValueError: ``atomic=False`` with a path not ending in ``.json``, or a malformed colour.
    """
    path = Path(path)
    is_json = path.name.lower().endswith(".json")
    if not atomic and not is_json:
        raise ValueError(f"{path}: with atomic=False give the sidecar's own (temporary) .json path")
    target = path if is_json else sidecar_path(path)
    data = sidecar_text(names, colors).encode("utf-8")
    if not atomic:
        try:
            target.write_bytes(data)
        except OSError as exc:
            if is_write_failure(exc):
                raise write_error(target, exc) from None
            raise
        return target
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


# -- NIfTI header extensions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _NiftiLayout:
    """A NIfTI-1/2 header as read: its bytes (348 or 540), the byte order (``"<"`` / ``">"`` for
    :mod:`struct`), ``vox_offset`` (where the voxels start) and whether they follow in the same file."""

    header: bytes
    endian: str
    vox_offset: int
    single: bool

    @property
    def size(self) -> int:
        return len(self.header)

    def with_vox_offset(self, offset: int) -> bytes:
        """The header bytes with ``vox_offset`` replaced (float32 at 108 in NIfTI-1, int64 at 168 in -2)."""
        head = bytearray(self.header)
        if self.size == 348:
            head[108:112] = struct.pack(self.endian + "f", float(offset))
        else:
            head[168:176] = struct.pack(self.endian + "q", int(offset))
        return bytes(head)


def _read_layout(fh: IO[bytes]) -> _NiftiLayout | None:
    """The header at the start of ``fh`` (decompressed), or ``None`` when it is no NIfTI-1/2 header."""
    first = fh.read(4)
    if len(first) < 4:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", first)[0]
        if size in (348, 540):
            break
    else:
        return None
    rest = fh.read(size - 4)
    if len(rest) < size - 4:
        return None
    header = first + rest
    if size == 348:
        magic = header[344:348]
        vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    else:
        magic = header[4:8]
        vox_offset = struct.unpack(endian + "q", header[168:176])[0]
    if magic[:3] not in (b"n+1", b"ni1", b"n+2", b"ni2") or not np.isfinite(vox_offset):
        return None
    return _NiftiLayout(header, endian, int(vox_offset), magic[1:2] == b"+")


def _read_extensions(fh: IO[bytes], layout: _NiftiLayout) -> list[tuple[int, bytes]]:
    """The ``(code, content)`` extensions after the header (``fh`` positioned after it); a malformed chain
    ends the list (the voxels do not depend on it)."""
    extender = fh.read(4)
    if len(extender) < 4 or extender[0] == 0:
        return []
    pos = layout.size + 4
    limit = layout.vox_offset if layout.single else pos + _MAX_TABLE_BYTES
    out = []
    while pos + 8 <= limit:
        head = fh.read(8)
        if len(head) < 8:
            break
        esize, ecode = struct.unpack(layout.endian + "ii", head)
        if esize < 8 or pos + esize > limit:
            break
        content = fh.read(esize - 8)
        if len(content) < esize - 8:
            break
        out.append((int(ecode), content))
        pos += esize
    return out


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    return cast("IO[bytes]", gzip.open(path, "rb") if compressed else open(path, "rb"))


def nifti_extensions(path: str | Path) -> list[tuple[int, bytes]]:
    """The header extensions ``[(code, content)]`` of a NIfTI-1/2 file (``.nii``, ``.nii.gz``, ``.hdr``);
    empty when it has none or is not NIfTI (a damaged file is left to the image readers to report)."""
    try:
        with _open_maybe_gzip(Path(path)) as fh:
            layout = _read_layout(fh)
            return [] if layout is None else _read_extensions(fh, layout)
    except (OSError, EOFError, ValueError, struct.error):
        return []


def _sibling_temporary(target: Path, suffix: str) -> Path:
    """An empty temporary file beside ``target`` named as :mod:`medsam3.io.atomic` names them."""
    prefix, _ = temporary_name_parts(target.name)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=f".part{suffix}", dir=target.parent)
    os.close(fd)
    return Path(name)


def embed_label_table(source: str | Path, target: str | Path, table: Mapping[str, Any]) -> None:
    """Copy the single-file NIfTI ``source`` (``.nii``, as written) to ``target`` with ``table`` added as a
    comment extension (module docstring); ``target`` is gzip-compressed when its name ends in ``.gz``.

    Every byte of ``source`` is kept except ``vox_offset`` and the extension flag: the header, any
    extensions already there, then the new one, then the voxels. ``target`` is written as given (callers
    pass a temporary path of :func:`~medsam3.io.atomic.atomic_path`). Raises OutputError when ``source``
    is not a single-file NIfTI.
    """
    source, target = Path(source), Path(target)
    content = nifti_extension_bytes(table)
    with _open_maybe_gzip(source) as src:
        layout = _read_layout(src)
        if layout is None or not layout.single:
            raise OutputError(
                f"{target}: cannot add the label table: {source.name} is not a single-file NIfTI"
            )
        old = _read_extensions(src, layout)
        src.seek(layout.vox_offset)
        extensions = [*old, (NIFTI_ECODE_COMMENT, content)]
        blob = b"".join(
            struct.pack(layout.endian + "ii", len(data) + 8, code) + data + b"\0" * (-(len(data) + 8) % 16)
            for code, data in extensions
        )
        vox_offset = layout.size + 4 + len(blob)
        gz = target.name.lower().endswith(".gz")
        with open(target, "wb") as raw:
            out = cast(
                "IO[bytes]",
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0)
                if gz
                else raw,
            )
            try:
                out.write(layout.with_vox_offset(vox_offset))
                out.write(b"\1\0\0\0")
                out.write(blob)
                shutil.copyfileobj(src, out, 1 << 22)
            finally:
                if gz:
                    out.close()


def write_nifti_with_table(write: Callable[[Path], None], target: Path, table: Mapping[str, Any]) -> None:
    """Call ``write(path)`` to write a plain ``.nii`` beside ``target``, then :func:`embed_label_table` it
    into ``target``; the intermediate file is removed whatever happens."""
    plain = _sibling_temporary(target, ".nii")
    try:
        write(plain)
        embed_label_table(plain, target, table)
    finally:
        plain.unlink(missing_ok=True)


# -- reading --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelTable:
    """The label names of a file and where they came from.

    Attributes:
        names: label value -> name (empty when the file names nothing).
        colors: label value -> ``(r, g, b)`` 0..255, for the values whose colour is known.
        source: one of :data:`SOURCES`, or ``None`` when no names were found.
        file: the file the names were read from (the sidecar for ``"sidecar"``), or ``None``.
        warnings: problems worth telling (a sidecar that disagrees with the file's own names).
    """

    names: dict[int, str] = field(default_factory=dict)
    colors: dict[int, RGB] = field(default_factory=dict)
    source: str | None = None
    file: Path | None = None
    warnings: tuple[str, ...] = ()


def _parse_document(doc: Any, where: Path, what: str) -> tuple[dict[int, str], dict[int, RGB]]:
    """Names and colours of a parsed label-table document; InputError naming ``where`` when malformed."""
    version = doc.get(FORMAT_KEY)
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise InputError(
            where, f"{what}: {FORMAT_KEY} version {version!r} is not supported (this version reads 1)"
        )
    rows = doc.get("labels")
    if not isinstance(rows, list):
        raise InputError(where, f"{what}: 'labels' must be a list of {{value, name, color}} entries")
    names: dict[int, str] = {}
    colors: dict[int, RGB] = {}
    for i, row in enumerate(rows):
        value = row.get("value") if isinstance(row, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(where, f"{what}: entry {i + 1} has no label value (an integer >= 0): {row!r}")
        name = row.get("name")
        if not isinstance(name, str):
            raise InputError(where, f"{what}: label {value} has no name (a string): {row!r}")
        if value in names:
            raise InputError(where, f"{what}: label {value} is listed twice")
        names[value] = name
        color = row.get("color")
        if color is not None:
            try:
                colors[value] = _rgb(color, f"label {value}")
            except ValueError as exc:
                raise InputError(where, f"{what}: {exc}") from None
    return names, colors


def _load_document(data: bytes, where: Path, what: str) -> dict[str, Any] | None:
    """The parsed label table in ``data``, ``None`` when ``data`` is no label table (no marker key)."""
    data = data.rstrip(b"\0").strip()
    if _MARKER not in data[:4096]:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(where, f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            where, f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(doc, dict) or FORMAT_KEY not in doc:
        return None
    return doc


def _from_extension(path: Path) -> LabelTable | None:
    for code, content in nifti_extensions(path):
        if code != NIFTI_ECODE_COMMENT:
            continue
        what = "the label table in its NIfTI header extension"
        doc = _load_document(content, path, what)
        if doc is not None:
            names, colors = _parse_document(doc, path, what)
            return LabelTable(names, colors, "nifti extension", path)
    return None


def _from_sidecar(label_path: Path) -> LabelTable | None:
    side = sidecar_path(label_path)
    if side == label_path or not side.is_file():
        return None
    try:
        size = side.stat().st_size
        if size > _MAX_TABLE_BYTES:
            return None
        data = side.read_bytes()
    except OSError as exc:
        raise InputError(side, f"cannot be read ({exc.strerror or exc})") from None
    what = f"the label-table sidecar of {label_path.name}"
    doc = _load_document(data, side, what)
    if doc is None:
        log.debug("%s: no %s key; not a label-table sidecar", side, FORMAT_KEY)
        return None
    names, colors = _parse_document(doc, side, what)
    return LabelTable(names, colors, "sidecar", side)


def _from_segment_fields(path: Path, fmt: str) -> LabelTable | None:
    import SimpleITK as sitk

    from medsam3.io import volumes

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        volumes.read_metadata(path)  # raises the InputError with ITK's message
        return None
    header = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    table = volumes.segment_table(header)
    if not table:
        return None
    layered = reader.GetNumberOfComponents() > 1  # values as medsam3.io.readers numbers the layers' masks
    names: dict[int, str] = {}
    colors: dict[int, RGB] = {}
    for seg in table:
        value = seg["index"] + 1 if layered else seg["label"]
        names[value] = seg["name"]
        text = header.get(f"Segment{seg['index']}_Color", "")
        try:
            parts = [float(x) for x in text.split()]
        except ValueError:
            parts = []
        if len(parts) == 3 and all(0.0 <= c <= 1.0 for c in parts):
            colors[value] = (round(parts[0] * 255), round(parts[1] * 255), round(parts[2] * 255))
    return LabelTable(names, colors, f"{'nrrd' if fmt == 'nrrd' else 'metaimage'} segment fields", path)


def cielab_to_rgb(value: Sequence[int]) -> RGB:
    """sRGB 0..255 of a DICOM ``RecommendedDisplayCIELabValue`` (L*, a*, b* scaled to 0..65535, D65)."""
    lightness = value[0] / 65535.0 * 100.0
    a = value[1] / 65535.0 * 255.0 - 128.0
    b = value[2] / 65535.0 * 255.0 - 128.0
    fy = (lightness + 16.0) / 116.0
    fx, fz = fy + a / 500.0, fy - b / 200.0
    delta = 6.0 / 29.0

    def inverse(t: float) -> float:
        return t**3 if t > delta else 3 * delta**2 * (t - 4.0 / 29.0)

    xyz = np.array([0.95047 * inverse(fx), inverse(fy), 1.08883 * inverse(fz)])
    matrix = np.array(
        [
            [3.2404542, -1.5371385, -0.4985314],
            [-0.9692660, 1.8760108, 0.0415560],
            [0.0556434, -0.2040259, 1.0572252],
        ]
    )
    linear = np.clip(matrix @ xyz, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    r, g, bl = (int(round(float(c) * 255)) for c in np.clip(srgb, 0.0, 1.0))
    return (r, g, bl)


def _from_dicom_seg(path: Path) -> LabelTable | None:
    from medsam3.io import dicom, dicom_seg

    ds = dicom.read_header(path)
    if not dicom_seg.is_seg(ds):
        return None
    names: dict[int, str] = {}
    colors: dict[int, RGB] = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        names[number] = str(item.get("SegmentLabel", "") or f"segment {number}")
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab is not None and len(lab) == 3:
            colors[number] = cielab_to_rgb([int(v) for v in lab])
    return LabelTable(names, colors, "dicom seg", path) if names else None


def _from_npz(path: Path) -> LabelTable | None:
    from medsam3.io import npz

    _, labels, _ = npz.read_npz(path)
    names = dict(labels.meta.get("label_names", {})) if labels is not None else {}
    if not names:  # no label map in the file, or none named
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            stored = "label_names.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        stored = False
    return LabelTable(names, {}, "npz label_names" if stored else "npz text_prompts", path)


def _same(a: LabelTable, b: LabelTable) -> bool:
    shared = set(a.colors) & set(b.colors)
    return a.names == b.names and all(a.colors[v] == b.colors[v] for v in shared)


def read_label_table(path: str | Path) -> LabelTable:
    """The label names and colours of the label map ``path`` and where they came from (module docstring).

    The file's own names come first (NIfTI extension, segment fields, npz, DICOM SEG); the JSON sidecar is
    used when the file names nothing, and a warning (logged and in :attr:`LabelTable.warnings`) says when
    both exist and disagree. A DICOM series folder has no names. Raises InputError for an unreadable
    file or a malformed label table (naming the file that holds it).
    """
    from medsam3.io.sniff import detect_format

    path = Path(path).expanduser()
    fmt = detect_format(path)
    if fmt == "dicom-folder":
        return LabelTable()
    own: LabelTable | None = None
    if fmt == "nifti":
        own = _from_extension(path)
    elif fmt in ("nrrd", "metaimage"):
        own = _from_segment_fields(path, fmt)
    elif fmt == "npz":
        own = _from_npz(path)
    elif fmt == "dicom":
        return _from_dicom_seg(path) or LabelTable()
    side = _from_sidecar(path)
    if own is None:
        return side or LabelTable()
    if side is not None and not _same(own, side):
        message = (
            f"{path}: the label names of its {own.source} differ from those of the sidecar "
            f"{sidecar_path(path).name}; the {own.source} is used"
        )
        log.warning("%s", message)
        return LabelTable(own.names, own.colors, own.source, own.file, (*own.warnings, message))
    return own


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> name of the label map ``path`` (:func:`read_label_table`; empty when unnamed)."""
    return dict(read_label_table(path).names)
