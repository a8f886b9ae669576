"""Read any supported input into an :class:`~medsam3.image.Image`: the one entry point is :func:`read_image`.

The format is recognised by content (:func:`medsam3.io.sniff.detect_format`), then read by the module for
it: :mod:`~medsam3.io.volumes` (NIfTI, NRRD, MHA/MHD), :mod:`~medsam3.io.dicom` (series folders, single
files), :mod:`~medsam3.io.dicom_seg` (DICOM SEG), :mod:`~medsam3.io.npz` (BiomedSegFM), and
:mod:`~medsam3.io.raster` (PNG, JPEG, BMP, TIFF). Every image is then checked: no empty or single-voxel
images, no NaN / infinite values, positive finite spacing. Every problem is an
:class:`~medsam3.errors.InputError` naming the file.

Label maps (:func:`read_label_map`) are integer images of the smallest unsigned type that holds their
values, ``meta['is_label'] = True`` and ``meta['label_names'] = {value: name}`` when the file names them
(DICOM SEG segment labels, Slicer ``.seg.nrrd`` segment names, npz ``label_names`` / text prompts).
Picture masks follow the usual dataset conventions: grey copies in RGB(A) channels are one channel, a
mask holding only 0 and 255 is binary (255 -> 1), a JPEG mask is thresholded at 127 (JPEG cannot store
exact labels). A label map with overlapping segments (DICOM SEG, multi-layer ``.seg.nrrd``) is refused by
default; :func:`read_segments` returns one mask per segment instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputError
from medsam3.image import Image
from medsam3.io import dicom, dicom_seg, npz, raster, volumes
from medsam3.io.geometry import on_grid, place_on_grid
from medsam3.io.modality import guess_modality, normalise_modality
from medsam3.io.sniff import detect_format

log = logging.getLogger(__name__)

_OVERLAP = ("error", "last", "first")


# -- shared checks ---------------------------------------------------------------------------------------
def validate(image: Image, path: Path) -> Image:
    """Refuse empty or single-voxel images, NaN / infinite values and invalid spacing (InputError)."""
    shape = image.spatial_shape
    if any(s == 0 for s in shape):
        raise InputError(path, f"holds no voxels (shape {image.array.shape})")
    if int(np.prod(shape)) == 1:
        raise InputError(path, f"holds a single voxel (shape {image.array.shape}); nothing to segment")
    if image.array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(image.array)))
        if bad:
            nan = int(np.count_nonzero(np.isnan(image.array)))
            raise InputError(
                path,
                f"{bad} of {image.array.size} voxel values are not finite ({nan} NaN, {bad - nan} infinite)",
            )
    elif image.array.dtype.kind not in "biuf":
        raise InputError(path, f"holds {image.array.dtype} values; expected numbers")
    sp = np.asarray(image.spacing)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(path, f"has invalid voxel spacing {tuple(image.spacing)}")
    d = image.direction
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise InputError(path, f"has an invalid (singular) direction matrix {d.tolist()}")
    return image


#: The largest label value a label map may hold (uint32).
MAX_LABEL = int(np.iinfo(np.uint32).max)


#: Why a segmentation (a DICOM SEG, a Slicer segmentation) is refused as the image to segment.
NOT_AN_IMAGE = "this is a segmentation (label map / DICOM SEG), not an image to segment"


def check_segmentable(image: Image, path: str | Path | None = None) -> Image:
    """Refuse a segmentation given as the image to segment (the same message everywhere).

    Raises:
        InputError: ``image`` was read as a label map (``meta['is_label']``).
    """
    if image.meta.get("is_label"):
        raise InputError(path if path is not None else image.meta.get("path"), NOT_AN_IMAGE)
    return image


def smallest_unsigned(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ``0..max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {max_value} is too large")


def _as_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` as non-negative integer labels in the smallest unsigned dtype (InputError otherwise)."""
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(path, "holds non-integer values; a label map must hold integer labels")
    elif array.dtype.kind not in "iu":
        raise InputError(path, f"holds {array.dtype} values; a label map must hold integer labels")
    if array.size and array.min() < 0:
        raise InputError(path, f"holds negative values (minimum {array.min()}); labels must be >= 0")
    top = int(array.max()) if array.size else 0
    if top > MAX_LABEL:
        raise InputError(path, f"holds values up to {top:.6g}; label values go up to {MAX_LABEL}")
    return array.astype(smallest_unsigned(top), copy=False)


# -- reading by format -----------------------------------------------------------------------------------
def _from_volume(path: Path, fmt: str) -> tuple[Image, dict[str, Any]]:
    got = volumes.read_volume(path, fmt)
    meta = {"path": str(path), "format": fmt, "spacing_known": True, "header": got["header"]}
    if got["layers"]:
        arr = got["array"]
        # geometry carrier for the layers: the first layer
        image = Image(arr[..., 0], got["spacing"], got["origin"], got["direction"], "OTHER", meta)
        return image, got
    image = Image(got["array"], got["spacing"], got["origin"], got["direction"], "OTHER", meta)
    table = volumes.segment_table(got["header"])
    if table:
        meta["label_names"] = {s["label"]: s["name"] for s in table}
        meta["is_label"] = True
    return image, got


def _from_raster(path: Path, fmt: str, as_labels: bool) -> Image:
    got = raster.read_raster(path, fmt, as_labels=as_labels)
    nd = got["array"].ndim - (1 if got["is_color"] else 0)
    meta = {"path": str(path), "format": fmt, "spacing_known": got["spacing_known"], "mode": got["mode"]}
    if got["collapsed_channels"]:
        meta["collapsed_channels"] = got["collapsed_channels"]
    return Image(got["array"], got["spacing"], (0.0,) * nd, np.eye(nd), "OTHER", meta)


def _load(path: Path, fmt: str, series_uid: str | None, as_labels: bool) -> Image:
    if fmt == "dicom-folder":
        members = dicom.choose_series(path, series_uid)
        return dicom.read_series(path, members)
    if fmt == "dicom":
        head = dicom.read_header(path)
        if dicom_seg.is_seg(head):
            return dicom_seg.read_seg(path).label_map("error")
        if not dicom.is_image(head):
            raise InputError(path, f"is a DICOM {head.get('Modality', '?')} object, not an image")
        return dicom.read_file(path)
    if fmt in ("nifti", "nrrd", "metaimage"):
        image, got = _from_volume(path, fmt)
        if got["layers"]:
            return _layered_label_map(path, image, got, "error")
        return image
    if fmt == "npz":
        image, labels, _ = npz.read_npz(path)
        return labels if as_labels and labels is not None else image
    return _from_raster(path, fmt, as_labels)


def _resolve(path: str | Path) -> tuple[Path, str]:
    p = Path(path).expanduser()
    return p, detect_format(p)


def read_image(path: str | Path, *, series_uid: str | None = None, modality: str | None = None) -> Image:
    """Read an image or volume (any supported format, recognised by content).

    Args:
        path: a file, or a folder holding one DICOM series.
        series_uid: the Series Instance UID to read when a folder holds several series.
        modality: force the modality (``CT``, ``MR``, ...; DICOM codes accepted) instead of guessing it.

    Returns:
        :class:`Image` with ``meta['path']``, ``meta['format']`` and the format's own keys (DICOM:
        ``series_uid``, ``study_uid``, ``frame_of_reference_uid``, ``sop_instance_uids`` and ``files`` in
        slice order, ``dicom`` key tags; npz: ``text_prompts``). A DICOM SEG or Slicer segmentation is
        returned as a label map (``meta['is_label']``).
    """
    p, fmt = _resolve(path)
    image = validate(_load(p, fmt, series_uid, as_labels=False), p)
    if image.array.dtype.kind == "b":  # a boolean image is a 0 / 1 image
        image.array = image.array.astype(np.uint8)
    if modality is not None:
        try:
            image.modality = normalise_modality(modality)
        except ValueError as exc:
            raise InputError(None, str(exc)) from exc
    elif not image.meta.get("is_label"):
        image.modality = guess_modality(
            image.array,
            dicom_modality=image.meta.get("dicom_modality"),
            is_color=image.is_color,
            ndim=image.ndim,
            name=p.name,
            file_format=fmt,
        )
    return image


# -- label maps ------------------------------------------------------------------------------------------
def _layered_masks(path: Path, image: Image, got: dict[str, Any]) -> dict[int, tuple[str, np.ndarray]]:
    arr = got["array"]
    out = {}
    for seg in volumes.segment_table(got["header"]):
        if seg["layer"] >= arr.shape[-1]:
            raise InputError(path, f"segment {seg['name']} is on layer {seg['layer']} of {arr.shape[-1]}")
        out[seg["index"] + 1] = (seg["name"], arr[..., seg["layer"]] == seg["label"])
    return out


def _merge(path: Path, masks: dict[int, tuple[str, np.ndarray]], overlap: str) -> tuple[np.ndarray, dict]:
    if overlap not in _OVERLAP:
        raise ValueError(f"overlap must be one of {_OVERLAP}, not {overlap!r}")
    keys = sorted(masks)
    shape = masks[keys[0]][1].shape if keys else ()
    out = np.zeros(shape, dtype=smallest_unsigned(max(keys) if keys else 0))
    covered = np.zeros(shape, dtype=bool)
    clashes = []
    for k in keys if overlap != "first" else keys[::-1]:
        name, m = masks[k]
        shared = int(np.count_nonzero(covered & m))
        if shared:
            clashes.append(f"{name} ({k}): {shared} voxels")
        out[m] = k
        covered |= m
    if clashes and overlap == "error":
        raise InputError(
            path,
            f"has overlapping segments ({', '.join(clashes)} shared with earlier ones); "
            "one label map cannot hold them: use read_segments or overlap='last' / 'first'",
        )
    return out, {k: masks[k][0] for k in keys}


def _layered_label_map(path: Path, image: Image, got: dict[str, Any], overlap: str) -> Image:
    merged, names = _merge(path, _layered_masks(path, image, got), overlap)
    return on_grid(image, merged, dict(image.meta, is_label=True, label_names=names))


def _raster_labels(image: Image, path: Path, fmt: str) -> Image:
    arr = image.array
    if image.is_color:
        raise InputError(
            path,
            "is a colour picture whose channels differ; a label picture must be grey "
            "(or a palette PNG whose indices are the labels)",
        )
    if fmt == "jpeg":
        arr = (arr > 127).astype(np.uint8)
        image.meta["binarised"] = "JPEG mask thresholded at 127"
    else:
        values = np.unique(arr)
        if values.size <= 2 and set(values.tolist()) <= {0, 255} and 255 in values:
            arr = (arr == 255).astype(np.uint8)
            image.meta["binarised"] = "0/255 mask read as 0/1"
    return image.with_array(arr)


def read_label_map(
    path: str | Path, reference: Image | None = None, *, series_uid: str | None = None, overlap: str = "error"
) -> Image:
    """Read an integer label map, optionally placed on ``reference``'s grid.

    Args:
        path: any supported file (DICOM SEG, ``.seg.nrrd``, NIfTI/NRRD/MHA, npz ``gts``/``segs``, picture).
        reference: image whose grid the labels must match. Grids related by axis flips / permutations and
            integer offsets are rearranged exactly (no resampling); picture masks without a stated pixel
            size take the reference geometry when their shape matches; anything else is an InputError.
        series_uid: for a DICOM folder holding several series.
        overlap: ``"error"`` (default), ``"last"`` or ``"first"`` for overlapping segments.

    Returns:
        :class:`Image` with an unsigned integer array, ``meta['is_label'] = True`` and
        ``meta['label_names']`` (possibly empty). Its modality is the reference's, else ``OTHER``.
    """
    p, fmt = _resolve(path)
    if fmt == "dicom" and dicom_seg.is_seg(dicom.read_header(p)):
        image = dicom_seg.read_seg(p, reference).label_map(overlap)
        return validate(image, p)
    if fmt in ("nifti", "nrrd", "metaimage"):
        image, got = _from_volume(p, fmt)
        if got["layers"]:
            image = _layered_label_map(p, image, got, overlap)
    elif fmt in ("png", "jpeg", "bmp", "tiff"):
        image = _raster_labels(_from_raster(p, fmt, as_labels=True), p, fmt)
    else:
        image = _load(p, fmt, series_uid, as_labels=True)
    validate(image, p)
    labels = image.with_array(_as_labels(image.array, p))
    labels.meta.setdefault("label_names", {})
    labels.meta["is_label"] = True
    if reference is not None:
        if not labels.meta.get("spacing_known", True) and labels.spatial_shape == reference.spatial_shape:
            placed = labels.array
        else:
            placed = place_on_grid(labels, reference, path=p)
        labels = on_grid(reference, placed, dict(labels.meta, reference=reference.meta.get("path")))
    labels.modality = reference.modality if reference is not None else "OTHER"
    return labels


def read_segments(path: str | Path, reference: Image | None = None) -> dict[int, Image]:
    """One ``uint8`` 0/1 mask per segment: ``{label value: Image}`` with ``meta['label_names']``.

    Unlike :func:`read_label_map` nothing is lost where segments overlap (DICOM SEG, multi-layer
    ``.seg.nrrd``). For a plain label map every non-zero value is one segment.
    """
    p, fmt = _resolve(path)
    if fmt == "dicom" and dicom_seg.is_seg(dicom.read_header(p)):
        return dicom_seg.read_seg(p, reference).masks()
    if fmt in ("nifti", "nrrd", "metaimage"):
        image, got = _from_volume(p, fmt)
        if got["layers"]:
            out = {}
            for k, (name, mask) in _layered_masks(p, image, got).items():
                m = on_grid(image, mask.astype(np.uint8), dict(image.meta, label_names={k: name}))
                if reference is not None:
                    m = on_grid(reference, place_on_grid(m, reference, path=p), m.meta)
                out[k] = m
            return out
    labels = read_label_map(p, reference)
    names = labels.meta.get("label_names", {})
    out = {}
    for v in np.unique(labels.array).tolist():
        if v == 0:
            continue
        meta = dict(labels.meta, label_names={int(v): names.get(int(v), f"label {v}")})
        out[int(v)] = on_grid(labels, (labels.array == v).astype(np.uint8), meta)
    return out


def read_npz_case(path: str | Path) -> tuple[Image, Image | None, dict[int, str]]:
    """A BiomedSegFM npz case: ``(image, labels or None, text prompts {label value: text})``."""
    p, fmt = _resolve(path)
    if fmt != "npz":
        raise InputError(p, f"is {fmt}, not a BiomedSegFM .npz case")
    image, labels, prompts = npz.read_npz(p)
    validate(image, p)
    if labels is not None:
        validate(labels, p)
        labels = labels.with_array(_as_labels(labels.array, p))
    image.modality = guess_modality(
        image.array, is_color=image.is_color, ndim=image.ndim, name=p.name, file_format="npz"
    )
    return image, labels, prompts
