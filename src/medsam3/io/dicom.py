"""DICOM images: a series in a folder, one single-frame file, or one enhanced multi-frame file.

Series folders
--------------
Every file below the folder (recursively, hidden files skipped) whose content is DICOM is grouped by
Series Instance UID. Non-image objects (SEG, RTSTRUCT, SR, presentation states, ...) are set aside. Exactly
one image series must remain, or ``series_uid`` must choose one; otherwise the :class:`InputError` lists
every series with its description, modality and slice count.

Slices are ordered by their position along the slice normal ``n = row x column`` (Image Orientation
Patient), never by file name or Instance Number. The ITK geometry is then:

* direction columns ``(row cosine, column cosine, n)``; origin = Image Position Patient of the first slice;
* spacing ``(PixelSpacing[1], PixelSpacing[0], step)`` with ``step`` the distance between consecutive
  slice positions along ``n`` (not Slice Thickness). Unequal steps (a missing slice), two slices at one
  position (several echoes / phases in one series) or slices of different size / orientation are refused.
  Gantry tilt (slice positions not moving along ``n``) is logged; the normal is kept, as ITK does.

Pixel values get Rescale Slope / Intercept per slice. The result keeps the stored integer type when
nothing is rescaled, becomes the smallest signed/unsigned integer type holding the values for integer
rescales (CT: ``int16``), and ``float32`` otherwise (for example PET with per-slice slopes).

Single files: a file with Image Position / Orientation is a volume of one slice (its geometry is kept so a
DICOM SEG can refer to it); a projection image (radiograph, ultrasound frame, endoscopy photo) is a 2D
image with the pixel size of PixelSpacing / ImagerPixelSpacing when present. Enhanced multi-frame files
use the per-frame plane positions.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medsam3.errors import InputError
from medsam3.image import Image
from medsam3.io.geometry import slice_normal, unit
from medsam3.io.sniff import _content_format

log = logging.getLogger(__name__)

#: Modalities (and SOP classes, by their Modality tag) that are not images to segment.
NON_IMAGE_MODALITIES = frozenset(
    {
        "SEG",
        "RTSTRUCT",
        "RTPLAN",
        "RTRECORD",
        "RTDOSE",
        "SR",
        "PR",
        "KO",
        "DOC",
        "REG",
        "FID",
        "RWV",
        "PLAN",
        "AU",
        "ECG",
        "HD",
        "RESP",
    }
)

#: Header values kept in ``meta['dicom']`` (from the first slice) for writing derived objects later.
KEY_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "StudyDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "PatientPosition",
    "PhotometricInterpretation",
    "BitsStored",
    "SliceThickness",
    "WindowCenter",
    "WindowWidth",
    "SOPClassUID",
)


# -- finding and grouping files ----------------------------------------------------------------------
def find_dicom_files(folder: Path) -> list[Path]:
    """Files below ``folder`` (recursively, hidden entries skipped) whose content is DICOM."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            p = Path(root) / name
            try:
                with open(p, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if len(head) >= 8 and _content_format(p, head) == "dicom":
                found.append(p)
    return found


def read_header(path: Path) -> Dataset:
    """The DICOM header of ``path`` without pixel data; :class:`InputError` when it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, ValueError, ...
        raise InputError(path, f"cannot be read as DICOM ({exc})") from exc


def sop_instance_uid(ds: Dataset) -> str:
    """SOP Instance UID, falling back to the file meta (anonymisers sometimes blank the dataset copy)."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    return uid


def is_image(ds: Dataset) -> bool:
    """True for objects with pixels to segment (not SEG, RTSTRUCT, SR, ...)."""
    return str(ds.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES and "Rows" in ds


def group_series(folder: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[tuple[Path, Dataset]]]:
    """Image series of ``folder`` by Series Instance UID, and the non-image DICOM objects found."""
    files = find_dicom_files(folder)
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    other = []
    for p in files:
        try:
            ds = read_header(p)
        except InputError:
            log.warning("%s: skipped, not a readable DICOM file", p)
            continue
        if is_image(ds):
            series[str(ds.get("SeriesInstanceUID", "") or "")].append((p, ds))
        else:
            other.append((p, ds))
    return dict(series), other


def describe_series(uid: str, members: list[tuple[Path, Dataset]]) -> str:
    ds = members[0][1]
    desc = str(ds.get("SeriesDescription", "") or "").strip() or "no description"
    return (
        f"  {uid or '(empty SeriesInstanceUID)'}  '{desc}'  {ds.get('Modality', '?')}  "
        f"{len(members)} file{'s' if len(members) != 1 else ''}"
    )


def choose_series(folder: Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    """The files of the one image series in ``folder`` (or of ``series_uid``)."""
    series, other = group_series(folder)
    if not series:
        if other:
            kinds = sorted({str(ds.get("Modality", "?")) for _, ds in other})
            raise InputError(
                folder,
                f"holds no DICOM image series, only {len(other)} non-image object(s) ({', '.join(kinds)}); "
                "pass such a file itself (a DICOM SEG is read as a label map)",
            )
        raise InputError(folder, "is a folder without DICOM files (no file below it has DICOM content)")
    listing = "\n".join(describe_series(u, m) for u, m in sorted(series.items()))
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(folder, f"has no DICOM series with UID {series_uid}; it holds:\n{listing}")
        return series[series_uid]
    if len(series) > 1:
        raise InputError(
            folder,
            f"holds {len(series)} DICOM series; choose one with --series UID (series_uid=...):\n{listing}",
        )
    return next(iter(series.values()))


# -- geometry ------------------------------------------------------------------------------------------
def _floats(value: Any, n: int, what: str, path: Path) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"has an unreadable {what} ({value!r})") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(path, f"has an invalid {what} ({value!r})")
    return out


def stack_geometry(
    positions: list[np.ndarray],
    orientation: np.ndarray,
    pixel_spacing: np.ndarray | None,
    paths: list[Path],
    fallback_step: float | None,
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, ...], np.ndarray]:
    """Sort slice ``positions`` along the normal and return ``(order, spacing, origin, direction)``."""
    r, c = unit(orientation[:3]), unit(orientation[3:])
    n = slice_normal(r, c)
    proj = np.array([float(np.dot(p, n)) for p in positions])
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    if len(order) > 1:
        steps = np.diff(proj)
        dup = np.flatnonzero(steps < 1e-4)
        if dup.size:
            a, b = paths[order[dup[0]]], paths[order[dup[0] + 1]]
            raise InputError(
                paths[0].parent,
                f"has {dup.size + 1} or more slices at the same position ({proj[dup[0]]:.3f} mm along the "
                f"normal, e.g. {a.name} and {b.name}); several echoes, phases or acquisitions share this "
                "series: choose the slices of one of them",
            )
        step = float((proj[-1] - proj[0]) / (len(proj) - 1))
        if np.max(np.abs(steps - step)) > 1e-3 + 0.01 * step:
            k = int(np.argmax(np.abs(steps - step)))
            raise InputError(
                paths[0].parent,
                f"has unevenly spaced slices (step {steps[k]:.4f} mm between positions {proj[k]:.3f} and "
                f"{proj[k + 1]:.3f}, mean step {step:.4f} mm): a slice is missing or the series mixes "
                "reconstructions",
            )
        travel = positions[order[-1]] - positions[order[0]]
        tilt = travel - np.dot(travel, n) * n
        if np.linalg.norm(tilt) > 1e-2 * max(float(np.linalg.norm(travel)), 1e-6):
            log.warning(
                "%s: slices are not stacked along their normal (gantry tilt); the normal is used",
                paths[0].parent,
            )
    else:
        step = float(fallback_step) if fallback_step and fallback_step > 0 else 1.0
    if pixel_spacing is None:
        sx = sy = 1.0
    else:
        sy, sx = float(pixel_spacing[0]), float(pixel_spacing[1])
    direction = np.column_stack([r, c, n])
    origin = tuple(float(v) for v in positions[order[0]])
    return order, (sx, sy, step), origin, direction


# -- pixel data ------------------------------------------------------------------------------------------
def _rescale_pairs(datasets: list[Dataset]) -> list[tuple[float, float]]:
    return [
        (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)) for ds in datasets
    ]


def apply_rescale(raw: np.ndarray, pairs: list[tuple[float, float]]) -> np.ndarray:
    """Apply per-slice ``(slope, intercept)`` to ``raw`` ``(Z, Y, X)`` (dtype rules: module docstring)."""
    if all(s == 1 and i == 0 for s, i in pairs):
        return raw
    integral = raw.dtype.kind in "iu" and all(s == 1 and float(i).is_integer() for s, i in pairs)
    if not integral:
        out = raw.astype(np.float32)
        for k, (s, i) in enumerate(pairs):
            out[k] *= np.float32(s)
            out[k] += np.float32(i)
        return out
    lo = int(raw.min()) + int(min(i for _, i in pairs))
    hi = int(raw.max()) + int(max(i for _, i in pairs))
    dtype: np.dtype[Any] = np.dtype(np.int64)
    for candidate in (raw.dtype, np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32)):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            dtype = candidate
            break
    out = np.empty(raw.shape, dtype=dtype)
    for k, (_, i) in enumerate(pairs):
        out[k] = raw[k].astype(np.int64) + int(i)
    return out


#: What decodes compressed pixel data (all permissively licensed): GDCM (JPEG Baseline / Extended /
#: Lossless, JPEG-LS, JPEG 2000, RLE), pylibjpeg-openjpeg (JPEG 2000, HTJ2K), pylibjpeg-rle (RLE), pyjpegls
#: (JPEG-LS); pydicom itself reads Deflate and RLE.
DECODERS = "python-gdcm pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls"


def missing_decoder(ds: Dataset) -> str | None:
    """Why the pixel data of ``ds`` cannot be decoded here (its transfer syntax named), or ``None``."""
    from pydicom.pixels import get_decoder

    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None or not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"its transfer syntax {uid.name} ({uid}) has no decoder in pydicom"
    if decoder.is_available:
        return None
    return (
        f"its transfer syntax {uid.name} ({uid}) needs a decoder that is not installed "
        f"(pip install {DECODERS})"
    )


def _decode(path: Path) -> tuple[Dataset, np.ndarray]:
    """Full dataset and its pixel array (pydicom decoders; colour is returned as RGB)."""
    try:
        full = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InputError(path, f"cannot be read as DICOM ({exc})") from exc
    missing = missing_decoder(full)
    if missing is not None:
        raise InputError(path, f"DICOM pixel data cannot be decoded: {missing}")
    try:
        return full, full.pixel_array
    except Exception as exc:  # corrupt pixel data, a decoder that fails on it, ...
        raise InputError(path, f"DICOM pixel data cannot be decoded ({exc})") from exc


def _key_tags(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in KEY_TAGS:
        if tag in ds and ds.get(tag) not in (None, ""):
            v = ds.get(tag)
            out[tag] = (
                [float(x) for x in v]
                if isinstance(v, pydicom.multival.MultiValue)
                else (str(v) if not isinstance(v, (int, float)) else v)
            )
    if not out.get("SOPClassUID") and getattr(ds, "file_meta", None) is not None:
        out["SOPClassUID"] = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return out


def _series_meta(path: Path, first: Dataset, files: list[Path], sops: list[str]) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": "dicom",
        "series_uid": str(first.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(first.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "") or ""),
        "sop_instance_uids": sops,
        "files": [str(f) for f in files],
        "dicom_modality": str(first.get("Modality", "") or ""),
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "dicom": _key_tags(first),
    }


def read_series(folder: Path, members: list[tuple[Path, Dataset]], *, pixels: bool = True) -> Image:
    """Stack the files of one series into a volume (``pixels=False``: geometry only, zero array)."""
    if len(members) == 1 and not _has_plane(members[0][1]):
        return read_file(members[0][0]) if pixels else _grid_only(read_file(members[0][0]))
    paths = [p for p, _ in members]
    heads = [ds for _, ds in members]
    for p, ds in members:
        if not _has_plane(ds):
            raise InputError(p, "has no Image Position / Orientation (Patient); the slices cannot be stacked")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(p, "is a multi-frame file inside a multi-file series; pass the file itself")
    ref = heads[0]
    orient = _floats(ref.ImageOrientationPatient, 6, "Image Orientation (Patient)", paths[0])
    size = (int(ref.Rows), int(ref.Columns))
    spacing = _pixel_spacing(ref, paths[0])
    for p, ds in members[1:]:
        o = _floats(ds.ImageOrientationPatient, 6, "Image Orientation (Patient)", p)
        if not np.allclose(o, orient, atol=1e-4) or (int(ds.Rows), int(ds.Columns)) != size:
            raise InputError(
                folder,
                f"mixes slices of different orientation or size ({paths[0].name}: {size}, "
                f"{np.round(orient, 4).tolist()}; {p.name}: {(int(ds.Rows), int(ds.Columns))}, "
                f"{np.round(o, 4).tolist()})",
            )
    positions = [_floats(ds.ImagePositionPatient, 3, "Image Position (Patient)", p) for p, ds in members]
    thickness = float(ref.get("SpacingBetweenSlices", 0) or ref.get("SliceThickness", 0) or 0)
    order, sp, origin, direction = stack_geometry(positions, orient, spacing, paths, thickness)
    files = [paths[i] for i in order]
    sops = [sop_instance_uid(heads[i]) for i in order]
    meta = _series_meta(folder, heads[order[0]], files, sops)
    meta["spacing_known"] = spacing is not None
    if not pixels:
        shape = (len(files), *size)
        return Image(np.broadcast_to(np.zeros((), np.uint8), shape), sp, origin, direction, "OTHER", meta)
    decoded = [_decode(f) for f in files]
    raw = np.stack([a for _, a in decoded])
    if raw.ndim != 3:
        raise InputError(
            folder, f"has colour or multi-frame slices (pixel array {raw.shape}); expected grey slices"
        )
    array = apply_rescale(raw, _rescale_pairs([d for d, _ in decoded]))
    return Image(array, sp, origin, direction, "OTHER", meta)


def _has_plane(ds: Dataset) -> bool:
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _pixel_spacing(ds: Dataset, path: Path) -> np.ndarray | None:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag in ds and ds.get(tag):
            value = _floats(ds.get(tag), 2, tag, path)
            if np.all(value > 0):
                return value
    return None


def _grid_only(image: Image) -> Image:
    return image.with_array(np.broadcast_to(np.zeros((), np.uint8), image.spatial_shape))


def _frame_item(ds: Dataset, index: int, group: str) -> Dataset | None:
    """Functional-group item ``group`` of frame ``index`` (per-frame first, then shared)."""
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        item = seq[index] if seq_name.startswith("PerFrame") else seq[0]
        if group in item and item.get(group):
            return item.get(group)[0]
    return None


def read_file(path: Path) -> Image:
    """One DICOM image file (not a SEG): single-frame slice or 2D image, or enhanced multi-frame volume."""
    ds, raw = _decode(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    meta = _series_meta(path, ds, [path], [sop_instance_uid(ds)])
    if frames > 1:
        return _read_multiframe(path, ds, raw, frames, meta)
    spacing = _pixel_spacing(ds, path)
    meta["spacing_known"] = spacing is not None
    if _has_plane(ds) and not colour:
        orient = _floats(ds.ImageOrientationPatient, 6, "Image Orientation (Patient)", path)
        pos = _floats(ds.ImagePositionPatient, 3, "Image Position (Patient)", path)
        step = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 0)
        _, sp, origin, direction = stack_geometry([pos], orient, spacing, [path], step)
        array = apply_rescale(raw[None], _rescale_pairs([ds]))
        return Image(array, sp, origin, direction, "OTHER", meta)
    sy, sx = (float(spacing[0]), float(spacing[1])) if spacing is not None else (1.0, 1.0)
    array = raw if colour else apply_rescale(raw[None], _rescale_pairs([ds]))[0]
    if colour and array.shape[-1] not in (3, 4):
        raise InputError(path, f"has {array.shape[-1]} samples per pixel; expected grey, RGB or RGBA")
    return Image(array, (sx, sy), (0.0, 0.0), np.eye(2), "OTHER", meta)


def _read_multiframe(path: Path, ds: Dataset, raw: np.ndarray, frames: int, meta: dict) -> Image:
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        raise InputError(path, f"is a colour multi-frame DICOM ({frames} frames); expected grey frames")
    positions, orients, pairs = [], [], []
    for i in range(frames):
        plane = _frame_item(ds, i, "PlanePositionSequence")
        orient = _frame_item(ds, i, "PlaneOrientationSequence")
        if plane is None or orient is None:
            raise InputError(
                path,
                f"is a multi-frame DICOM ({frames} frames) without plane positions (a cine loop?); "
                "only volumes with per-frame positions are supported",
            )
        positions.append(_floats(plane.ImagePositionPatient, 3, "Image Position (Patient)", path))
        orients.append(_floats(orient.ImageOrientationPatient, 6, "Image Orientation (Patient)", path))
        tr = _frame_item(ds, i, "PixelValueTransformationSequence")
        pairs.append(
            (float(tr.get("RescaleSlope", 1) or 1), float(tr.get("RescaleIntercept", 0) or 0))
            if tr is not None
            else (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
        )
    if not all(np.allclose(o, orients[0], atol=1e-4) for o in orients):
        raise InputError(path, "has frames of different orientation")
    measures = _frame_item(ds, 0, "PixelMeasuresSequence")
    spacing = _pixel_spacing(measures, path) if measures is not None else None
    step = (
        float(measures.get("SpacingBetweenSlices", 0) or measures.get("SliceThickness", 0) or 0)
        if measures is not None
        else 0.0
    )
    order, sp, origin, direction = stack_geometry(positions, orients[0], spacing, [path] * frames, step)
    array = apply_rescale(raw[order], [pairs[i] for i in order])
    meta["frame_order"] = [int(i) for i in order]
    meta["spacing_known"] = spacing is not None
    return Image(array, sp, origin, direction, "OTHER", meta)
