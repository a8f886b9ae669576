"""NIfTI, NRRD and MetaImage (MHA/MHD) through SimpleITK, with checks SimpleITK does not make.

Geometry comes straight from SimpleITK (ITK order, LPS), so it is exactly what ``sitk.ReadImage`` reports:
NIfTI's RAS affine is converted by ITK (sform preferred when valid, as ITK does), NRRD ``space`` fields
are honoured. A NIfTI whose affine ITK refuses (non-orthonormal direction cosines) is read with nibabel
instead and converted to LPS the same way.

Checks added here:

* a truncated ``.nii``/``.nii.gz`` is refused (SimpleITK silently fills the missing voxels with zeros);
* NaN / infinite voxels in float NIfTI data are refused (SimpleITK silently reads them as zeros); the
  other formats keep them and :func:`medsam3.io.readers.validate` refuses them;
* 4D data is refused unless the fourth axis has length 1 (one time point / channel);
* multi-component pixels are only accepted as 3- or 4-channel 2D colour images, or as the layers of a
  Slicer ``.seg.nrrd`` (returned separately, see :func:`read_volume`).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import SimpleITK as sitk

from medsam3.errors import InputError

if TYPE_CHECKING:
    from nibabel.analyze import AnalyzeImage

_FORMAT_NAME = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage"}


def _itk_message(exc: Exception) -> str:
    """The informative last line(s) of an ITK exception, without the C++ file/line noise."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("/", "sitk::ERROR", "itk::ERROR")) or ":" in ln]
    text = useful[-1] if useful else (lines[-1] if lines else type(exc).__name__)
    return text.split("): ", 1)[-1][:300]


def _raw_pixdim(path: Path, img: AnalyzeImage) -> np.ndarray:
    """The header's ``pixdim`` as stored (nibabel's loader silently makes zero or negative sizes positive)."""
    from nibabel.openers import ImageOpener

    try:
        holder = img.file_map.get("header") or img.file_map["image"]  # .hdr of a pair, else the file
        with ImageOpener(str(holder.filename or path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
    except Exception:  # a header nibabel cannot read twice: keep what it loaded
        return np.asarray(img.header["pixdim"], dtype=np.float64)
    return np.asarray(raw["pixdim"], dtype=np.float64)


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file whose voxel data is shorter than its header promises."""
    import nibabel as nib

    try:
        img = cast("AnalyzeImage", nib.load(str(path)))  # NIfTI-1/2 files and pairs are Analyze images
    except Exception as exc:  # nibabel raises many types for broken headers
        raise InputError(path, f"is not a readable NIfTI file ({exc})") from exc
    header = img.header
    shape = header.get_data_shape()
    pixdim = _raw_pixdim(path, img)[1 : 1 + min(len(shape), 3)]
    used = np.asarray(shape[: len(pixdim)]) > 1  # a single slice's thickness may be left at 0
    if not np.all(np.isfinite(pixdim[used])) or np.any(pixdim[used] <= 0):
        raise InputError(
            path, f"has invalid voxel sizes in its header (pixdim {pixdim.tolist()}); they must be positive"
        )
    nbytes = int(np.prod(shape, dtype=np.int64) * header.get_data_dtype().itemsize)
    data_file = Path(img.file_map["image"].filename or path)
    if data_file != path:  # a .hdr/.img pair: the voxels are in the .img file
        if not data_file.is_file() or data_file.stat().st_size < nbytes:
            raise InputError(
                path, f"its voxel file {data_file.name} is missing or shorter than {nbytes} bytes"
            )
        return _check_nifti_finite(path, img)
    # The loaded header's get_data_offset() can be 0; the data object knows where the voxels start.
    offset = int(getattr(img.dataobj, "offset", 0) or header.get_data_offset())
    expected = offset + nbytes
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    if not compressed:
        size = path.stat().st_size
        if size < expected:
            raise InputError(path, f"is truncated: it holds {size} bytes but its header needs {expected}")
        return _check_nifti_finite(path, img)
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        isize = int.from_bytes(fh.read(4), "little")
    if isize == expected % 2**32:
        return _check_nifti_finite(path, img)
    # The gzip trailer disagrees (truncated, or several gzip members): decompress to be sure.
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(
            path, f"is a truncated or corrupt gzip file ({total} of {expected} bytes could be decompressed)"
        ) from exc
    if total < expected:
        raise InputError(
            path, f"is truncated: it decompresses to {total} bytes but its header needs {expected}"
        )
    _check_nifti_finite(path, img)


def _check_nifti_finite(path: Path, img: AnalyzeImage) -> None:
    """Count NaN / infinite voxels of float NIfTI data (ITK's reader silently turns them into zeros)."""
    if img.header.get_data_dtype().kind != "f":
        return
    data = np.asanyarray(img.dataobj)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(data)))
        raise InputError(
            path, f"{bad} of {data.size} voxel values are not finite ({nan} NaN, {bad - nan} infinite)"
        )


#: Largest cosine between two voxel axes of a NIfTI read through nibabel (ITK refuses most non-orthonormal
#: affines; rounding in an sform is accepted, a real shear is refused).
SHEAR_TOLERANCE = 1e-3


def nibabel_geometry(
    affine: np.ndarray, ndim: int
) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """ITK geometry ``(spacing, origin, direction)`` in LPS of a nibabel (RAS) ``affine`` for the first
    ``ndim`` axes: spacing is each column's length, direction the normalised columns."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)  # RAS -> LPS
    lin = aff[:ndim, :ndim]
    spacing = np.linalg.norm(lin, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        direction = lin / spacing
    return tuple(float(v) for v in spacing), tuple(float(v) for v in aff[:ndim, 3]), direction


def _read_with_nibabel(path: Path) -> tuple[np.ndarray, tuple, tuple, np.ndarray]:
    """NIfTI through nibabel: array ``(Z, Y, X)`` and LPS geometry (for affines ITK refuses)."""
    import nibabel as nib

    img = cast("AnalyzeImage", nib.load(str(path)))  # a NIfTI file
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(path, f"has {data.ndim} dimensions {data.shape}; expected a 2D image or 3D volume")
    d = data.ndim
    spacing, origin, direction = nibabel_geometry(img.affine, d)
    shear = float(np.abs(direction.T @ direction - np.eye(d)).max())
    if shear > SHEAR_TOLERANCE:  # outputs are written with an orthogonal grid: they would not overlay it
        raise InputError(
            path,
            f"has a sheared (non-orthogonal) voxel grid (axes off by up to {shear:.3g} in cosine); masks "
            "could not be written on the same grid. Resample it to an orthogonal grid first (for example "
            "with SimpleITK's Resample or nibabel.processing.resample_from_to)",
        )
    return np.ascontiguousarray(data.T), spacing, origin, direction


def _metadata(reader: sitk.ImageFileReader) -> dict[str, str]:
    return {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}


def read_metadata(path: Path) -> dict[str, str]:
    """The header fields of a NIfTI / NRRD / MetaImage file without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"header cannot be read: {_itk_message(exc)}") from exc
    return _metadata(reader)


def segment_table(header: dict[str, str]) -> list[dict[str, Any]]:
    """Slicer ``.seg.nrrd`` segments from the header: ``[{index, name, label, layer}]`` (empty if none)."""
    out = []
    i = 0
    while f"Segment{i}_ID" in header or f"Segment{i}_Name" in header:
        name = header.get(f"Segment{i}_Name", header.get(f"Segment{i}_ID", f"segment {i}"))
        label = int(header.get(f"Segment{i}_LabelValue", i + 1))
        layer = int(header.get(f"Segment{i}_Layer", 0))
        out.append({"index": i, "name": name, "label": label, "layer": layer})
        i += 1
    return out


#: Environment variable with the largest number of voxels (times components) a volume may declare.
MAX_VOXELS_ENV = "MEDSAM3_MAX_VOXELS"
#: Its default: 2^30 voxels (a 512 x 512 x 4096 CT; 2 GB of int16).
DEFAULT_MAX_VOXELS = 2**30


def max_voxels() -> int:
    """The voxel limit of :func:`read_volume` (``$MEDSAM3_MAX_VOXELS`` or :data:`DEFAULT_MAX_VOXELS`)."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        raise InputError(None, f"{MAX_VOXELS_ENV}={text!r} is not a number of voxels") from None
    if value <= 0:
        raise InputError(None, f"{MAX_VOXELS_ENV}={text!r} must be positive")
    return value


def _check_declared_size(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse a file whose header declares more voxels than the limit, or more raw data than it holds.

    Only the header is read (``ReadImageInformation``). A header SimpleITK cannot read is left to the
    reader, which says what is wrong.
    """
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return
    size = [int(s) for s in reader.GetSize()]
    voxels = int(np.prod(size, dtype=np.int64)) * max(int(reader.GetNumberOfComponents()), 1)
    limit = max_voxels()
    if voxels > limit:
        raise InputError(
            path,
            f"declares {' x '.join(map(str, size))} = {voxels:,} voxels, more than the limit of {limit:,} "
            f"(set {MAX_VOXELS_ENV} to read larger volumes)",
        )
    if not path.name.lower().endswith(".nrrd"):
        return
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if b"encoding: raw" in head and b"data file:" not in head:
        needed = voxels * _itemsize(reader)
        if path.stat().st_size < needed:
            raise InputError(
                path,
                f"is truncated: its header declares {needed:,} bytes of raw voxels, the file holds "
                f"{path.stat().st_size:,} bytes in all",
            )


def _itemsize(reader: sitk.ImageFileReader) -> int:
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return int(sitk.GetArrayViewFromImage(probe).dtype.itemsize)


#: Endings the NIfTI readers recognise (others are read through a link named ``.nii`` / ``.nii.gz``).
NIFTI_NAMES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


def read_volume(path: Path, fmt: str) -> dict[str, Any]:
    """Read a NIfTI / NRRD / MetaImage file.

    Returns a dict with ``array`` (``(Z, Y, X)``, ``(Y, X)``, ``(Y, X, C)`` colour, or for a multi-layer
    ``.seg.nrrd`` ``(Z, Y, X, L)`` with ``layers=True``), ``spacing``, ``origin``, ``direction`` (ITK order,
    LPS), ``is_color``, ``layers`` and ``header`` (the file's metadata dictionary).

    A NIfTI file recognised by its content but named without ``.nii`` / ``.nii.gz`` is read through a link
    with the right name (the readers choose by name); messages name the file itself.
    """
    if fmt == "nifti" and not path.name.lower().endswith(NIFTI_NAMES):
        import tempfile

        with open(path, "rb") as fh:
            suffix = ".nii.gz" if fh.read(2) == b"\x1f\x8b" else ".nii"
        with tempfile.TemporaryDirectory(prefix="medsam3-") as folder:
            link = Path(folder) / f"image{suffix}"
            link.symlink_to(path.resolve())
            try:
                return _read_volume(link, fmt)
            except InputError as exc:
                raise InputError(path, exc.problem.replace(str(link), str(path))) from None
    return _read_volume(path, fmt)


def _read_volume(path: Path, fmt: str) -> dict[str, Any]:
    what = _FORMAT_NAME[fmt]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _check_declared_size(path, reader)  # before anything is allocated
    if fmt == "nifti":
        _check_nifti_complete(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        message = _itk_message(exc)
        if fmt == "nifti" and "orthonormal" in str(exc).lower():
            array, spacing, origin, direction = _read_with_nibabel(path)
            return {
                "array": array,
                "spacing": spacing,
                "origin": origin,
                "direction": direction,
                "is_color": False,
                "layers": False,
                "header": {},
            }
        raise InputError(path, f"cannot be read as {what}: {message}") from exc
    header = _metadata(reader)
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(
                path,
                f"is a 4D image of size {size} (x, y, z, t); medsam3 reads one 3D volume: extract a single "
                "time point or channel first",
            )
        image = sitk.Extract(image, (*size[:3], 0), (0, 0, 0, 0))
        dim = 3
    if dim not in (2, 3):
        raise InputError(path, f"has {dim} dimensions; expected a 2D image or a 3D volume")
    comps = image.GetNumberOfComponentsPerPixel()
    segments = segment_table(header)
    layers = False
    is_color = False
    if comps > 1:
        if dim == 2 and comps in (3, 4):
            is_color = True
        elif segments:
            layers = True
        else:
            raise InputError(
                path,
                f"has {comps} values per voxel in a {dim}D image; expected one (grey) value, or 3/4 colour "
                "channels in a 2D image",
            )
    array = sitk.GetArrayFromImage(image)
    return {
        "array": array,
        "spacing": image.GetSpacing(),
        "origin": image.GetOrigin(),
        "direction": np.array(image.GetDirection()).reshape(dim, dim),
        "is_color": is_color,
        "layers": layers,
        "header": header,
    }


def sitk_image(
    array: np.ndarray, spacing: Any, origin: Any, direction: np.ndarray, *, is_color: bool = False
) -> sitk.Image:
    """A ``SimpleITK.Image`` of ``array`` (array order) with the given ITK geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_color)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction, dtype=np.float64).ravel()))
    return image


def write_volume(
    array: np.ndarray,
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    direction: np.ndarray,
    path: Path,
    *,
    is_color: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``array`` (array order) with the given ITK geometry; format from ``path``'s suffix.

    Compression is on (gzip for NIfTI ``.nii.gz``, NRRD and MHA). ``metadata`` entries become header fields
    (NRRD ``key:=value`` lines, MetaImage ``key = value``).
    """
    image = sitk_image(array, spacing, origin, direction, is_color=is_color)
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    name = path.name.lower()
    compress = not name.endswith(".nii")
    sitk.WriteImage(image, str(path), useCompression=compress)
