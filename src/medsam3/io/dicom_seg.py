"""DICOM Segmentation objects: read onto the source grid, write (through highdicom) referencing the source.

Reading
-------
Each frame of a SEG is one segment on one plane (BINARY, FRACTIONAL) or all segments of one plane
(LABELMAP). Frames are first placed on the SEG's **own grid**, built from the frame positions along the
slice normal (the slice step is Spacing Between Slices, else the smallest distance between frame
positions), and then moved onto the **source grid** with :func:`medsam3.io.geometry.place_on_grid`:

* the ``reference`` image when one is given (its Frame of Reference UID must match when both have one);
* otherwise the referenced source series when it is found near the SEG (its folder and its parent folder,
  at most two levels down and a few thousand files): ``meta['grid_source'] = 'source series'``;
* otherwise the SEG's own grid, which spans only the slices holding frames
  (``meta['grid_source'] = 'seg frames'``, logged as a warning).

Segment numbers become label values, segment labels become ``label_names``. FRACTIONAL segments are
thresholded at one half of Maximum Fractional Value.

Segments may overlap (DICOM allows it; the dcmqi sample's liver and heart share 522 voxels). A single label
map cannot hold overlapping segments, so :meth:`SegFrames.label_map` refuses them by default
(``overlap="error"``, the message lists the overlapping pairs) or resolves them explicitly
(``"last"``: the higher segment number wins; ``"first"``: the lower one); :meth:`SegFrames.masks` returns
one boolean mask per segment and loses nothing.

Writing
-------
:func:`write_dicom_seg` builds a BINARY SEG with highdicom from the source files listed in
``reference.meta['files']`` (headers only), one segment per label value. Segment numbers must run
1..N in DICOM, so label values are numbered in ascending order (values 1..N keep their numbers); names
come from ``label_names`` (default ``"label <value>"``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medsam3.errors import InputError, OutputError
from medsam3.image import Image
from medsam3.io.atomic import atomic_path, check_not_input
from medsam3.io.dicom import _floats, _frame_item, read_header, read_series, sop_instance_uid
from medsam3.io.geometry import on_grid, place_on_grid, slice_normal, unit

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")

#: Bounds of the search for a SEG's source series next to it.
_SEARCH_DEPTH = 2
_SEARCH_MAX_FILES = 3000


def is_seg(ds: Dataset) -> bool:
    """True for a DICOM Segmentation (or Label Map Segmentation) object."""
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return sop in SEG_SOP_CLASSES or str(ds.get("Modality", "")).upper() == "SEG"


@dataclass
class SegFrames:
    """The frames of a SEG placed on a grid: ``(segment, slice) -> 2D mask``.

    Attributes:
        grid: an image (zero array) carrying the target geometry and the SEG's ``meta``.
        names: segment number -> segment label.
        planes: segment number -> {slice index -> bool ``(Y, X)``}, slices indexing ``own_grid``.
        own_grid: the SEG's own grid the planes index (placed onto ``grid`` at conversion).
    """

    grid: Image
    names: dict[int, str]
    planes: dict[int, dict[int, np.ndarray]]
    own_grid: Image
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def _volume(self, numbers: list[int], dtype: Any) -> np.ndarray:
        out = np.zeros(self.own_grid.spatial_shape, dtype=dtype)
        for n in numbers:
            for k, plane in self.planes.get(n, {}).items():
                out[k][plane] = n if dtype is not bool else True
        return out

    def overlaps(self) -> dict[tuple[int, int], int]:
        """Voxels shared by each pair of segments (pairs with none are left out)."""
        out: dict[tuple[int, int], int] = {}
        numbers = sorted(self.planes)
        for a_i, a in enumerate(numbers):
            for b in numbers[a_i + 1 :]:
                shared = sum(
                    int(np.count_nonzero(pa & self.planes[b][k]))
                    for k, pa in self.planes[a].items()
                    if k in self.planes[b]
                )
                if shared:
                    out[(a, b)] = shared
        return out

    def masks(self) -> dict[int, Image]:
        """One ``uint8`` 0/1 mask per segment (every described segment, empty ones too), on ``grid``."""
        out = {}
        for n in sorted(self.names):
            vol = self._volume([n], bool).astype(np.uint8)
            placed = place_on_grid(self.own_grid.with_array(vol), self.grid, path=self.path)
            meta = dict(self.grid.meta, label_names={n: self.names[n]}, segment_number=n)
            out[n] = on_grid(self.grid, placed, meta)
        return out

    def label_map(self, overlap: str = "error") -> Image:
        """All segments in one label map (value = segment number) on ``grid``; see module docstring."""
        from medsam3.io.readers import smallest_unsigned  # readers imports this module

        pairs = self.overlaps()
        order = painting_order(
            self.path, self.names, pairs, overlap, "segments", "read one mask per segment (read_segments)"
        )
        vol = self._volume(order, smallest_unsigned(max(order, default=0)))
        placed = place_on_grid(self.own_grid.with_array(vol), self.grid, path=self.path)
        meta = dict(
            self.grid.meta,
            label_names=dict(self.names),
            overlaps={f"{a},{b}": v for (a, b), v in pairs.items()},
        )
        return on_grid(self.grid, placed, meta)


def painting_order(
    path: Path | None,
    names: Mapping[int, str],
    pairs: Mapping[tuple[int, int], int],
    overlap: str,
    what: str,
    instead: str,
) -> list[int]:
    """The order to paint numbered parts (segments, ROIs) into one label map so that ``overlap`` holds:
    ``"last"`` lets the higher number win (ascending), ``"first"`` the lower one (descending).

    Raises:
        ValueError: an unknown ``overlap``.
        InputError: ``overlap == "error"`` and ``pairs`` (number pair -> shared voxels) is not empty; the
            message lists the pairs and suggests ``instead``.
    """
    if overlap not in ("error", "last", "first"):
        raise ValueError(f"overlap must be 'error', 'last' or 'first', not {overlap!r}")
    if pairs and overlap == "error":
        listing = ", ".join(
            f"{names.get(a, a)} ({a}) & {names.get(b, b)} ({b}): {v} voxels" for (a, b), v in pairs.items()
        )
        raise InputError(
            path,
            f"has overlapping {what} ({listing}); one label map cannot hold them: {instead} or choose "
            "overlap='last' / 'first'",
        )
    numbers = sorted(names)
    return numbers if overlap == "last" else numbers[::-1]


def _frame_table(
    path: Path, ds: Dataset
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray | None, list[int | None]]:
    """Pixel frames ``(F, R, C)``, per-frame positions, orientation, pixel spacing and segment numbers."""
    try:
        frames = ds.pixel_array
    except Exception as exc:
        raise InputError(path, f"DICOM SEG pixel data cannot be decoded ({exc})") from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    positions, numbers = [], []
    orient = None
    for i in range(n_frames):
        plane = _frame_item(ds, i, "PlanePositionSequence")
        if plane is None:
            raise InputError(path, f"frame {i + 1} of the DICOM SEG has no plane position")
        positions.append(_floats(plane.ImagePositionPatient, 3, "Image Position (Patient)", path))
        orientation = _frame_item(ds, i, "PlaneOrientationSequence")
        if orientation is None:
            raise InputError(path, f"frame {i + 1} of the DICOM SEG has no plane orientation")
        o = _floats(orientation.ImageOrientationPatient, 6, "Image Orientation (Patient)", path)
        if orient is None:
            orient = o
        elif not np.allclose(o, orient, atol=1e-4):
            raise InputError(path, "the DICOM SEG frames have different orientations")
        ident = _frame_item(ds, i, "SegmentIdentificationSequence")
        numbers.append(int(ident.ReferencedSegmentNumber) if ident is not None else None)
    measures = _frame_item(ds, 0, "PixelMeasuresSequence")
    spacing = None
    if measures is not None and measures.get("PixelSpacing"):
        spacing = _floats(measures.PixelSpacing, 2, "Pixel Spacing", path)
    assert orient is not None  # read from the first frame (there is at least one)
    return frames, positions, orient, spacing, numbers


def _own_grid(
    path: Path, ds: Dataset, positions: list[np.ndarray], orient: np.ndarray, spacing: np.ndarray | None
) -> tuple[Image, np.ndarray]:
    """The SEG's own grid and the slice index of every frame on it."""
    r, c = unit(orient[:3]), unit(orient[3:])
    n = slice_normal(r, c)
    proj = np.array([float(np.dot(p, n)) for p in positions])
    unique = np.unique(np.round(proj, 4))
    measures = _frame_item(ds, 0, "PixelMeasuresSequence")
    step = float(measures.get("SpacingBetweenSlices", 0) or 0) if measures is not None else 0.0
    if step <= 0:
        step = (
            float(np.min(np.diff(unique)))
            if unique.size > 1
            else float((measures.get("SliceThickness", 0) if measures is not None else 0) or 1.0)
        )
    rel = (proj - unique[0]) / step
    index = np.round(rel).astype(int)
    if np.max(np.abs(rel - index)) > 0.01:
        raise InputError(path, f"DICOM SEG frame positions are not on a regular {step:.4f} mm slice grid")
    first = positions[int(np.argmin(proj))]
    for p, k in zip(positions, index, strict=True):
        expected = first + k * step * n
        if np.linalg.norm(p - expected) > 1e-2 * max(step, 1.0):
            raise InputError(path, "DICOM SEG frames are shifted within their planes; expected one stack")
    sy, sx = (float(spacing[0]), float(spacing[1])) if spacing is not None else (1.0, 1.0)
    shape = (int(index.max()) + 1, int(ds.Rows), int(ds.Columns))
    grid = Image(
        np.broadcast_to(np.zeros((), np.uint8), shape),
        (sx, sy, step),
        tuple(first),
        np.column_stack([r, c, n]),
        "OTHER",
        {},
    )
    return grid, index


def _find_source_series(path: Path, series_uid: str) -> Image | None:
    """Geometry of the source series ``series_uid`` found near ``path`` (bounded search), or ``None``."""
    seen = 0
    members: list[tuple[Path, Dataset]] = []
    for top in (path.parent, path.parent.parent):
        base_depth = len(top.parts)
        for root, dirs, files in os.walk(top):
            depth = len(Path(root).parts) - base_depth
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _SEARCH_DEPTH else []
            for name in sorted(files):
                p = Path(root) / name
                if name.startswith(".") or p == path or any(p == m for m, _ in members):
                    continue
                seen += 1
                if seen > _SEARCH_MAX_FILES:
                    return None
                try:
                    ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                except Exception:
                    continue
                if str(ds.get("SeriesInstanceUID", "")) == series_uid:
                    members.append((p, read_header(p)))
        if members:
            try:
                return read_series(members[0][0].parent, members, pixels=False)
            except InputError as exc:
                log.warning("%s: source series found but unusable (%s)", path, exc)
                return None
    return None


def read_seg(path: Path, reference: Image | None = None) -> SegFrames:
    """Read a DICOM SEG file into :class:`SegFrames` on the source grid (see module docstring)."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InputError(path, f"cannot be read as DICOM ({exc})") from exc
    if not is_seg(ds):
        raise InputError(path, "is a DICOM file but not a DICOM Segmentation (SEG)")
    names = {
        int(s.SegmentNumber): str(s.get("SegmentLabel", "") or f"segment {int(s.SegmentNumber)}")
        for s in ds.get("SegmentSequence", [])
    }
    frames, positions, orient, spacing, numbers = _frame_table(path, ds)
    own, index = _own_grid(path, ds, positions, orient, spacing)
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    planes: dict[int, dict[int, np.ndarray]] = {n: {} for n in names}
    for f, (k, number) in enumerate(zip(index, numbers, strict=True)):
        frame = frames[f]
        if seg_type == "LABELMAP":
            for value in np.unique(frame[frame > 0]):
                planes.setdefault(int(value), {})[int(k)] = frame == value
            continue
        if number is None:
            raise InputError(path, f"frame {f + 1} of the DICOM SEG names no segment")
        if seg_type == "FRACTIONAL":
            mask = frame >= float(ds.get("MaximumFractionalValue", 255)) / 2.0
        else:
            mask = frame > 0
        plane = planes.setdefault(number, {})
        plane[int(k)] = plane[int(k)] | mask if int(k) in plane else mask
    for n in planes:
        names.setdefault(n, f"segment {n}")
    meta = {
        "path": str(path),
        "format": "dicom-seg",
        "is_label": True,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "sop_instance_uids": [sop_instance_uid(ds)],
        "files": [str(path)],
        "dicom_modality": "SEG",
        "segmentation_type": seg_type,
    }
    refs = ds.get("ReferencedSeriesSequence") or []
    source_uid = str(refs[0].get("SeriesInstanceUID", "")) if refs else ""
    meta["source_series_uid"] = source_uid
    if reference is not None:
        ref_for = str(reference.meta.get("frame_of_reference_uid", "") or "")
        if ref_for and meta["frame_of_reference_uid"] and ref_for != meta["frame_of_reference_uid"]:
            raise InputError(
                path,
                f"belongs to frame of reference {meta['frame_of_reference_uid']}, "
                f"but the reference image to {ref_for}",
            )
        grid, meta["grid_source"] = reference, "reference"
    else:
        found = _find_source_series(path, source_uid) if source_uid else None
        if found is not None:
            grid, meta["grid_source"] = found, "source series"
            meta["source_files"] = found.meta.get("files", [])
        else:
            log.warning("%s: source series not found; the label map covers only the SEG's own frames", path)
            grid, meta["grid_source"] = own, "seg frames"
    grid = on_grid(grid, np.broadcast_to(np.zeros((), np.uint8), grid.spatial_shape), meta)
    return SegFrames(grid=grid, names=names, planes=planes, own_grid=own, path=path, meta=meta)


# -- writing --------------------------------------------------------------------------------------------
def _property_code(name: str) -> Any:
    """SNOMED CT code for ``name`` if pydicom's code dictionary has it (``liver`` -> Liver), else Tissue."""
    from pydicom.sr.codedict import codes

    keyword = "".join(part.capitalize() for part in name.replace("-", " ").replace("_", " ").split())
    try:
        return getattr(codes.SCT, keyword)
    except (AttributeError, KeyError):
        return codes.SCT.Tissue


def _source_datasets(reference: Image) -> list[Dataset]:
    files = reference.meta.get("files") or []
    if reference.meta.get("format") != "dicom" or not files:
        raise OutputError(
            f"{reference.meta.get('path', 'the reference image')}: a DICOM SEG needs a DICOM source series "
            "(read with read_image from DICOM files); write NIfTI or NRRD for other inputs"
        )
    datasets: list[Dataset] = []
    for f, uid in zip(files, reference.meta.get("sop_instance_uids") or [None] * len(files), strict=True):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise OutputError(f"{f}: source DICOM file cannot be read again ({exc})") from exc
        if uid and sop_instance_uid(ds) != uid:
            raise OutputError(f"{f}: source DICOM file changed since it was read (SOP Instance UID differs)")
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = sop_instance_uid(ds)
        if not ds.get("SOPClassUID") and getattr(ds, "file_meta", None) is not None:
            ds.SOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID", "")
        missing = [
            t
            for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
            if not ds.get(t)
        ]
        if missing:
            raise OutputError(
                f"{f}: the source DICOM lacks {', '.join(missing)} (anonymised?); a DICOM SEG must reference "
                "them: write NIfTI or NRRD instead"
            )
        datasets.append(ds)
    return datasets


def _numbered(
    labels: Any, reference: Image, path: Path | str, names: dict[int, str]
) -> tuple[np.ndarray, list[int]]:
    """Segment-numbered pixels for highdicom and the label value of each segment (number = index + 1).

    A label map becomes ``(Z, Y, X)`` segment numbers; a ``{value: mask}`` mapping becomes ``(Z, Y, X, S)``
    binary channels (segments may overlap).
    """
    shape = tuple(reference.spatial_shape)
    if isinstance(labels, Mapping):
        values = sorted(int(k) for k in labels)
        if not values or min(values) <= 0:
            raise OutputError(f"{path}: segment masks need label values >= 1 (got {values})")
        masks = [np.asarray(labels[v]) for v in values]
        for v, m in zip(values, masks, strict=True):
            if m.shape != shape:
                raise OutputError(f"{path}: mask of label {v} has shape {m.shape}, the reference {shape}")
        return np.stack([m.astype(bool) for m in masks], axis=-1).astype(np.uint8), values
    arr = np.asarray(labels)
    if arr.shape != shape:
        raise OutputError(f"{path}: labels have shape {arr.shape}, the reference {shape}")
    if arr.dtype.kind not in "biu" or (arr.dtype.kind == "i" and arr.size and arr.min() < 0):
        raise OutputError(f"{path}: labels must be non-negative integers (got {arr.dtype})")
    values = sorted(set(np.unique(arr).astype(int).tolist()) - {0} | set(names))
    if not values:
        raise OutputError(f"{path}: nothing to write: the label map is empty and no label names were given")
    lut = np.zeros(int(max(values)) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    for i, v in enumerate(values):
        lut[v] = i + 1
    return lut[arr.astype(np.int64)], values


def write_dicom_seg(
    labels: np.ndarray | Mapping[int, np.ndarray],
    reference: Image,
    path: str | Path,
    label_names: dict[int, str] | None = None,
    *,
    series_description: str = "medsam3 segmentation",
    series_number: int = 300,
    algorithm_name: str = "medsam3",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Path:
    """Write a BINARY DICOM SEG referencing ``reference``'s source series; returns the final path.

    Args:
        labels: a label map ``(Z, Y, X)`` on ``reference``'s grid (integers >= 0), or ``{label value:
            mask}`` with one ``(Z, Y, X)`` mask per segment (segments may then overlap).
        reference: a DICOM image from :func:`medsam3.io.readers.read_image`; its source files are read
            again (headers only) to reference them.
        label_names: label value -> segment label (default ``"label <value>"``); named values absent from
            the labels still get an (empty) segment.
        series_instance_uid, sop_instance_uid: the SEG's UIDs (default: new random ones);
            :func:`medsam3.predict.volume.outputs.derived_uids` gives ones that repeat for the same result.

    Raises :class:`OutputError` when the reference is not DICOM or lacks UIDs, the shapes differ, or there
    is no segment to write.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medsam3 import __version__

    check_not_input(path)
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) > 0}
    numbered, values = _numbered(labels, reference, path, names)
    sources = _source_datasets(reference)
    number_of = {v: i + 1 for i, v in enumerate(values)}
    order = reference.meta.get("frame_order")
    if len(sources) == 1 and order is not None:
        numbered = numbered[np.argsort(order)]  # back to the file's frame order
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=__version__, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number_of[v],
            segment_label=names.get(v, f"label {v}")[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=_property_code(names.get(v, "")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for v in values
    ]
    charset = sources[0].get("SpecificCharacterSet") or None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*")
        try:
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=numbered,
                segmentation_type="BINARY",
                segment_descriptions=descriptions,
                series_instance_uid=series_instance_uid or hd.UID(),
                series_number=series_number,
                sop_instance_uid=sop_instance_uid or hd.UID(),
                instance_number=1,
                manufacturer="medsam3",
                manufacturer_model_name="medsam3",
                software_versions=__version__,
                device_serial_number="0",
                series_description=series_description[:64],
                specific_character_set=charset,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise OutputError(
                f"{path}: the DICOM SEG cannot be built from this source series ({exc})"
            ) from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
