"""Write label maps and images with the geometry of a reference image; the format comes from the suffix.

* ``.nii`` / ``.nii.gz``: NIfTI through SimpleITK (geometry stored as float32 qform/sform, as NIfTI does);
  label names (and colours) as a JSON header extension, :mod:`medsam3.io.label_names` (the file is
  otherwise byte for byte what SimpleITK writes);
* ``.nrrd`` / ``.seg.nrrd``: NRRD (gzip); label names as Slicer segment fields (``Segment0_Name:=liver``);
* ``.mha``: MetaImage (compressed); ``.mhd`` is refused (its second data file would escape the atomic write);
* ``.png``: 2D only, ``uint8`` / ``uint16`` grey or ``uint8`` RGB(A); no geometry;
* ``.tif`` / ``.tiff``: 2D or 3D stacks, any unsigned integer type; no geometry;
* ``.npz``: BiomedSegFM keys ``segs`` (labels) or ``imgs`` (images), ``spacing``, ``origin``, ``direction``,
  and ``label_names`` as JSON;
* ``.dcm``: DICOM SEG (labels only; the reference must be a DICOM series): :func:`write_dicom_seg`.

Label values are stored as given in the smallest unsigned integer type that holds them (a binary mask is
``uint8`` 0/1, also in PNG). Every file goes through :func:`medsam3.io.atomic.atomic_path`: a temporary
name beside the target, renamed when complete, and never one of the command's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medsam3.errors import OutputError
from medsam3.image import Image
from medsam3.io import label_names as label_tables
from medsam3.io import npz, raster, volumes
from medsam3.io.atomic import atomic_path
from medsam3.io.dicom_seg import write_dicom_seg
from medsam3.io.readers import smallest_unsigned
from medsam3.io.sniff import extension_format

__all__ = ["label_array", "write_dicom_seg", "write_image", "write_label_map"]

_VOLUME_SUFFIXES = {"nifti", "nrrd", "metaimage"}


def _kind(path: Path) -> str:
    if path.name.lower().endswith(".mhd"):
        raise OutputError(f"{path}: .mhd keeps the voxels in a second file; write a single-file .mha instead")
    fmt = extension_format(path)
    if fmt is None or fmt in ("jpeg", "bmp"):
        raise OutputError(
            f"{path}: unsupported output suffix; use .nii.gz, .nii, .nrrd, .mha, .png, .tif, .npz or .dcm"
            + (" (JPEG is lossy and cannot store labels or exact values)" if fmt == "jpeg" else "")
        )
    return fmt


def label_array(labels: np.ndarray, path: str | Path = "labels") -> np.ndarray:
    """``labels`` as non-negative integers in the smallest unsigned dtype (OutputError otherwise)."""
    arr = np.asarray(labels)
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise OutputError(f"{path}: label values must be integers (got non-integer {arr.dtype} values)")
    elif arr.dtype.kind not in "iu":
        raise OutputError(f"{path}: label values must be integers (got {arr.dtype})")
    if arr.size and arr.min() < 0:
        raise OutputError(f"{path}: label values must be >= 0 (minimum {arr.min()})")
    return arr.astype(smallest_unsigned(int(arr.max()) if arr.size else 0), copy=False)


def _segment_fields(labels: np.ndarray, names: dict[int, str]) -> dict[str, str]:
    """Slicer ``.seg.nrrd`` header fields naming the label values (one layer)."""
    values = sorted(set(np.unique(labels).astype(int).tolist()) - {0} | {int(k) for k in names if k > 0})
    fields = {}
    for i, v in enumerate(values):
        name = names.get(v, f"label {v}")
        fields.update(
            {
                f"Segment{i}_ID": f"Segment_{v}",
                f"Segment{i}_Name": name,
                f"Segment{i}_LabelValue": str(v),
                f"Segment{i}_Layer": "0",
            }
        )
    if fields:
        fields["Segmentation_MasterRepresentation"] = "Binary labelmap"
        fields["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    return fields


def write_label_map(
    labels: np.ndarray,
    path: str | Path,
    reference: Image,
    label_names: dict[int, str] | None = None,
    *,
    colors: Mapping[int, Sequence[int]] | None = None,
) -> Path:
    """Write ``labels`` (``reference.spatial_shape``, array order) with ``reference``'s geometry.

    The format comes from ``path``'s suffix (table in the module docstring); ``.dcm`` writes a DICOM SEG.
    Label names are stored where the format can hold them (NIfTI header extension, NRRD, npz, DICOM SEG);
    ``colors`` (value -> ``(r, g, b)`` 0..255) replace the default colours of the NIfTI label table. Returns
    the final path. Raises :class:`OutputError` for a shape mismatch, non-integer or negative labels, an
    unsupported suffix, a 3D label map to PNG, or a path that is one of the inputs.
    """
    path = Path(path)
    fmt = _kind(path)
    arr = label_array(labels, path)
    if arr.shape != tuple(reference.spatial_shape):
        raise OutputError(
            f"{path}: labels have shape {arr.shape} but the reference image {tuple(reference.spatial_shape)}"
        )
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    table = None
    if fmt == "nifti" and any(k >= 1 for k in names):
        try:
            table = label_tables.label_table(names, colors)
        except ValueError as exc:
            raise OutputError(f"{path}: {exc}") from None
    if fmt == "dicom":
        return write_dicom_seg(arr, reference, path, names)
    if fmt == "png":
        if arr.ndim != 2:
            raise OutputError(f"{path}: PNG holds 2D label maps; this one is {arr.ndim}D (use .nii.gz)")
        if arr.dtype.itemsize > 2:
            raise OutputError(f"{path}: label values up to {arr.max()} do not fit a 16-bit PNG (use .tif)")
    with atomic_path(path) as tmp:
        if table is not None:  # written as usual, then copied with the extension into the temporary file
            label_tables.write_nifti_with_table(
                lambda plain: volumes.write_volume(
                    arr, reference.spacing, reference.origin, reference.direction, plain
                ),
                tmp,
                table,
            )
        elif fmt in _VOLUME_SUFFIXES:
            meta = _segment_fields(arr, names) if fmt == "nrrd" else None
            volumes.write_volume(
                arr, reference.spacing, reference.origin, reference.direction, tmp, metadata=meta
            )
        elif fmt in ("png", "tiff"):
            raster.write_raster(arr, tmp)
        elif fmt == "npz":
            npz.write_npz(arr, tmp, reference, names)
    return path


def write_image(image: Image, path: str | Path) -> Path:
    """Write an image with its geometry: NIfTI, NRRD, MHA, npz (``imgs``), PNG/TIFF (pixels only).

    PNG takes 2D ``uint8``/``uint16`` grey or ``uint8`` colour; convert other dtypes first (no silent
    rescaling happens here). Returns the final path.
    """
    path = Path(path)
    fmt = _kind(path)
    arr = image.array
    if fmt == "dicom":
        raise OutputError(f"{path}: writing images as DICOM is not supported; use .nii.gz or .nrrd")
    if fmt == "png":
        ok = image.ndim == 2 and (
            (not image.is_color and arr.dtype in (np.uint8, np.uint16))
            or (image.is_color and arr.dtype == np.uint8)
        )
        if not ok:
            raise OutputError(
                f"{path}: PNG holds 2D uint8/uint16 grey or uint8 colour images; this one is "
                f"{image.ndim}D {arr.dtype}{' colour' if image.is_color else ''}"
            )
    with atomic_path(path) as tmp:
        if fmt in _VOLUME_SUFFIXES:
            volumes.write_volume(
                arr, image.spacing, image.origin, image.direction, tmp, is_color=image.is_color
            )
        elif fmt in ("png", "tiff"):
            raster.write_raster(arr, tmp)
        else:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh,
                    imgs=arr,
                    spacing=np.asarray(image.spacing),
                    origin=np.asarray(image.origin),
                    direction=np.asarray(image.direction).ravel(),
                )
    return path
