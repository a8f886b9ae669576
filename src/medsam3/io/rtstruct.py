"""DICOM RT Structure Sets (RTSTRUCT): label maps as planar contours, written and read back on a DICOM grid.

Frames and conventions
----------------------
A label map ``(Z, Y, X)`` lives on the grid of a DICOM source series (:mod:`medsam3.image`): the centre of
voxel ``array[k, row, col]`` is the patient point (LPS millimetres, the DICOM patient frame)::

    P = origin + direction @ (spacing * (col, row, k))  # ITK order (x, y, z)

which :func:`medsam3.io.geometry.array_affine` writes as one matrix acting on ``(k, row, col, 1)``. The
mapping holds for any orientation (axial, sagittal, coronal, oblique), so contours are right for all of
them; slice ``k`` is the plane through slice ``k``'s voxel centres, its normal the third direction column.

Writing (:func:`write_rtstruct`)
    One ROI per label value; the ROI number **is** the label value (so a read-back label map has the same
    values). For every slice and ROI the binary mask of that slice is padded with zeros (so contours at the
    image border close) and traced with marching squares at level 0.5. On a 0/1 mask the traced points are
    midpoints of pixel edges, a fixed half pixel from every pixel centre; points in the middle of straight
    runs are dropped, which leaves the polygon unchanged. Every closed ring, the outline of an island or of
    a hole, is its own ``CLOSED_PLANAR`` contour; outlines run counter-clockwise about the slice normal
    (right-hand rule), holes clockwise. Coordinates are written with 0.1 micrometre resolution.

Reading (:func:`read_rtstruct`)
    Contour points are mapped back to ``(k, row, col)`` through the inverse geometry of the reference; a
    contour must lie in one slice plane (all points within :data:`SLICE_TOLERANCE` of the slice step of
    one slice). Each ring is filled at the pixel centres it encloses and the rings of a slice are combined
    with the **even-odd rule** (XOR): a ring inside another is a hole, a ring inside a hole an island.
    This is how common planning systems interpret nested contours, and it makes the round trip of any
    mask exact: the mask is recovered voxel for voxel.

References
    Each contour references the SOP instance of its slice (and, for an enhanced multi-frame source, the
    frame number in the file's own frame order, ``reference.meta['frame_order']``). The top-level
    Referenced Frame of Reference Sequence lists every source instance once. Patient and study attributes
    are copied from the first source header.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsam3.errors import InputError, OutputError
from medsam3.image import Image
from medsam3.io.atomic import atomic_path, check_not_input
from medsam3.io.dicom import sop_instance_uid
from medsam3.io.dicom_seg import painting_order
from medsam3.io.geometry import array_affine, on_grid

log = logging.getLogger(__name__)

#: SOP Class UID of the RT Structure Set Storage.
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Referenced SOP Class of the RT Referenced Study item (Detached Study Management, as is customary).
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

#: How far (a fraction of the slice step) a contour point may lie from the slice plane it belongs to.
SLICE_TOLERANCE = 0.05
#: Smallest such distance in millimetres (for very thin slices and coordinates rounded by other writers).
_MIN_TOLERANCE_MM = 0.01

#: Patient and General Study attributes copied from the first source header (empty when absent).
_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def is_rtstruct(ds: Dataset) -> bool:
    """True for a DICOM RT Structure Set."""
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return sop == RTSTRUCT_SOP_CLASS or str(ds.get("Modality", "")).upper() == "RTSTRUCT"


def rtstruct_problem(reference: Image) -> str | None:
    """Why no RT Structure Set can reference ``reference``'s source files, or ``None`` when one can.

    ``None`` only for a DICOM volume whose series carries the UIDs an RTSTRUCT must reference: Study,
    Series and SOP Instance UIDs, and the Frame of Reference UID the contours are given in.
    """
    meta = reference.meta
    if meta.get("format") != "dicom" or not meta.get("files"):
        return "the input is not DICOM"
    if reference.ndim != 3:
        return "the input is a 2D DICOM image without patient position / orientation"
    missing = [
        name
        for name, ok in (
            ("StudyInstanceUID", meta.get("study_uid")),
            ("SeriesInstanceUID", meta.get("series_uid")),
            ("SOPInstanceUID", all(meta.get("sop_instance_uids") or [""])),
            ("FrameOfReferenceUID", meta.get("frame_of_reference_uid")),
        )
        if not ok
    ]
    if missing:
        return (
            f"the source series lacks {', '.join(missing)} (anonymised?), which a DICOM RT Structure Set "
            "must reference"
        )
    return None


# -- geometry ---------------------------------------------------------------------------------------------
def index_to_patient(reference: Image, k: float, rows_cols: np.ndarray) -> np.ndarray:
    """Patient points ``(N, 3)`` (LPS mm) of the ``(N, 2)`` ``(row, col)`` positions on slice ``k``."""
    affine = array_affine(reference)
    rc = np.asarray(rows_cols, dtype=np.float64)
    idx = np.column_stack([np.full(len(rc), float(k)), rc[:, 0], rc[:, 1]])
    return idx @ affine[:3, :3].T + affine[:3, 3]


def patient_to_index(reference: Image, points: np.ndarray) -> np.ndarray:
    """Fractional array indices ``(N, 3)`` ``(k, row, col)`` of patient points ``(N, 3)`` (LPS mm)."""
    affine = array_affine(reference)
    rel = np.asarray(points, dtype=np.float64) - affine[:3, 3]
    return np.linalg.solve(affine[:3, :3], rel.T).T


# -- tracing ----------------------------------------------------------------------------------------------
def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """``ring`` ``(N, 2)`` (open, no repeated end) without the vertices in the middle of straight runs."""
    before = ring - np.roll(ring, 1, axis=0)
    after = np.roll(ring, -1, axis=0) - ring
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return ring[turn != 0]


def slice_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed rings ``(N, 2)`` in ``(row, col)`` pixel units outlining the ``True`` pixels of ``mask`` (Y, X).

    Marching squares at level 0.5 on the zero-padded mask (only its bounding box is traced). Rings are open
    (the last point joins the first), outlines counter-clockwise and holes clockwise in ``(col, row)``.
    """
    import contourpy
    from contourpy import LineType

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return []
    r0, r1 = np.flatnonzero(rows)[[0, -1]]
    c0, c1 = np.flatnonzero(cols)[[0, -1]]
    z = np.pad(mask[r0 : r1 + 1, c0 : c1 + 1], 1).astype(np.float64)
    generator = contourpy.contour_generator(z=z, name="serial", line_type=LineType.Separate, chunk_size=0)
    rings = []
    for line in generator.lines(0.5):
        xy = np.asarray(line, dtype=np.float64)
        if len(xy) < 4 or not np.array_equal(xy[0], xy[-1]):
            raise RuntimeError(f"marching squares returned an open line of {len(xy)} points")
        ring = _drop_collinear(xy[:-1, ::-1])  # (x, y) = (col, row) -> (row, col)
        rings.append(ring + (r0 - 1, c0 - 1))
    return rings


# -- writing ---------------------------------------------------------------------------------------------
@dataclass
class _SliceRef:
    """The source instance (and frame, 1-based, for a multi-frame file) holding one slice."""

    sop_class: str
    sop_instance: str
    frame: int | None = None

    def item(self) -> Dataset:
        ds = Dataset()
        ds.ReferencedSOPClassUID = self.sop_class
        ds.ReferencedSOPInstanceUID = self.sop_instance
        if self.frame is not None:
            ds.ReferencedFrameNumber = self.frame
        return ds


def _roi_masks(
    labels: Any, reference: Image, path: str | Path, names: dict[int, str]
) -> dict[int, np.ndarray]:
    """One boolean ``(Z, Y, X)`` mask per ROI number (= label value), ascending; named empty ROIs too."""
    shape = tuple(reference.spatial_shape)
    if isinstance(labels, Mapping):
        values = sorted(int(k) for k in labels)
        if not values or min(values) <= 0:
            raise OutputError(f"{path}: ROI masks need label values >= 1 (got {values})")
        out = {}
        for v in values:
            m = np.asarray(labels[v])
            if m.shape != shape:
                raise OutputError(f"{path}: mask of label {v} has shape {m.shape}, the reference {shape}")
            out[v] = m.astype(bool)
        return out
    arr = np.asarray(labels)
    if arr.shape != shape:
        raise OutputError(f"{path}: labels have shape {arr.shape}, the reference {shape}")
    if arr.dtype.kind not in "biu" or (arr.dtype.kind == "i" and arr.size and arr.min() < 0):
        raise OutputError(f"{path}: labels must be non-negative integers (got {arr.dtype})")
    values = sorted(set(np.unique(arr).astype(int).tolist()) - {0} | set(names))
    if not values:
        raise OutputError(f"{path}: nothing to write: the label map is empty and no label names were given")
    return {v: arr == v for v in values}


def _rgb(value: Any) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in value)
    return (r, g, b)


def _roi_colors(masks: dict[int, np.ndarray]) -> dict[int, tuple[int, int, int]]:
    """Overlay colours: present values by rank, as the overlays draw them, then the empty named ROIs."""
    from medsam3.overlay import ranked_colors

    return ranked_colors([v for v, m in masks.items() if m.any()], masks)


def _source_headers(reference: Image, path: str | Path) -> list[Dataset]:
    """Headers of the source files (re-read), checked against the SOP Instance UIDs read before."""
    files = [str(f) for f in reference.meta["files"]]
    uids = reference.meta.get("sop_instance_uids") or [None] * len(files)
    headers: list[Dataset] = []
    for f, uid in zip(files, uids, strict=True):
        if Path(f).resolve() == Path(path).resolve():
            raise OutputError(f"{path}: refusing to write over a source file of the reference ({f})")
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise OutputError(f"{f}: source DICOM file cannot be read again ({exc})") from exc
        if uid and sop_instance_uid(ds) != uid:
            raise OutputError(f"{f}: source DICOM file changed since it was read (SOP Instance UID differs)")
        headers.append(ds)
    return headers


def _sop_class(ds: Dataset, f: str) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if not uid:
        raise OutputError(
            f"{f}: the source DICOM lacks SOPClassUID, which an RT Structure Set must reference"
        )
    return uid


def _slice_refs(reference: Image, headers: list[Dataset], path: str | Path) -> list[_SliceRef]:
    """The source instance of every slice ``k`` (multi-frame files: the frame in the file's order)."""
    files = [str(f) for f in reference.meta["files"]]
    uids = [str(u) for u in reference.meta["sop_instance_uids"]]
    classes = [_sop_class(ds, f) for ds, f in zip(headers, files, strict=True)]
    depth = reference.spatial_shape[0]
    if len(files) == depth:
        return [_SliceRef(c, u) for c, u in zip(classes, uids, strict=True)]
    order = reference.meta.get("frame_order")
    if len(files) == 1 and order is not None and len(order) == depth:
        return [_SliceRef(classes[0], uids[0], int(i) + 1) for i in order]
    raise OutputError(
        f"{path}: the reference has {depth} slices but {len(files)} source files and no frame order; "
        "its slices cannot be matched to source instances"
    )


def _ds_number(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _contour_items(mask: np.ndarray, reference: Image, refs: list[_SliceRef]) -> list[Dataset]:
    """CLOSED_PLANAR contour items of one ROI, ``mask`` bool ``(Z, Y, X)``, slice by slice."""
    items: list[Dataset] = []
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        for ring in slice_rings(mask[k]):
            points = index_to_patient(reference, int(k), ring)
            item = Dataset()
            item.ContourImageSequence = Sequence([refs[int(k)].item()])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(items) + 1
            item.ContourData = [_ds_number(v) for v in points.ravel()]
            items.append(item)
    return items


def _referenced_frame(reference: Image, refs: list[_SliceRef]) -> Dataset:
    """Referenced Frame of Reference item: study -> series -> every source instance, once."""
    seen: dict[str, _SliceRef] = {}
    for r in refs:
        seen.setdefault(r.sop_instance, _SliceRef(r.sop_class, r.sop_instance))
    series = Dataset()
    series.SeriesInstanceUID = str(reference.meta["series_uid"])
    series.ContourImageSequence = Sequence([r.item() for r in seen.values()])
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study.ReferencedSOPInstanceUID = str(reference.meta["study_uid"])
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = str(reference.meta["frame_of_reference_uid"])
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _header(first: Dataset, series_description: str, series_number: int) -> Dataset:
    """Patient, study, RT series, equipment, structure set and SOP common attributes (no ROIs yet)."""
    from medsam3 import __version__

    ds = Dataset()
    if first.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    for keyword in _COPIED:
        if keyword in first:
            ds[keyword] = copy.deepcopy(first[keyword])
        else:
            setattr(ds, keyword, "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "medsam3"
    ds.ManufacturerModelName = "medsam3"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "medsam3"
    ds.StructureSetName = series_description[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _add_rois(
    ds: Dataset,
    masks: dict[int, np.ndarray],
    names: dict[int, str],
    colors: Mapping[int, tuple[int, int, int]],
    reference: Image,
    refs: list[_SliceRef],
) -> None:
    """Structure Set ROI, ROI Contour and RT ROI Observations sequences, one item per ROI."""
    from medsam3 import __version__

    frame_uid = str(reference.meta["frame_of_reference_uid"])
    rois, contours, observations = Sequence(), Sequence(), Sequence()
    for i, (number, mask) in enumerate(masks.items()):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = names.get(number, f"label {number}")[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"medsam3 {__version__}"
        rois.append(roi)
        contour = Dataset()
        contour.ROIDisplayColor = [int(c) for c in colors[number]]
        items = _contour_items(mask, reference, refs)
        if items:
            contour.ContourSequence = Sequence(items)
        contour.ReferencedROINumber = number
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber = i + 1
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations


def write_rtstruct(
    labels: np.ndarray | Mapping[int, np.ndarray],
    reference: Image,
    path: str | Path,
    label_names: dict[int, str] | None = None,
    *,
    colors: Mapping[int, tuple[int, int, int]] | None = None,
    series_description: str = "medsam3 segmentation",
    series_number: int = 301,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Path:
    """Write a DICOM RT Structure Set of ``labels`` referencing ``reference``'s source series.

    Args:
        labels: a label map ``(Z, Y, X)`` on ``reference``'s grid (integers >= 0), or ``{label value:
            mask}`` with one ``(Z, Y, X)`` mask per ROI (ROIs may then overlap).
        reference: a DICOM volume from :func:`medsam3.io.readers.read_image`; its source files are read
            again (headers only) to reference them.
        path: the output file (conventionally ``.dcm``).
        label_names: label value -> ROI name (default ``"label <value>"``); named values absent from the
            labels still get an ROI, without contours.
        colors: label value -> ``(r, g, b)`` display colour (default: the overlay colours).
        series_description, series_number: of the new RTSTRUCT series.
        series_instance_uid, sop_instance_uid: its UIDs (default: new random ones;
            :func:`medsam3.predict.volume.outputs.derived_uids` gives ones that repeat for the same result).

    Returns the final path. Contours and frames: module docstring.

    Raises :class:`OutputError` when ``path`` is an input, the reference is not a DICOM volume or lacks
    UIDs (:func:`rtstruct_problem`), the shapes differ, or there is nothing to write.
    """
    check_not_input(path)
    problem = rtstruct_problem(reference)
    if problem is not None:
        raise OutputError(f"{path}: no DICOM RT Structure Set can be written: {problem}")
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) > 0}
    masks = _roi_masks(labels, reference, path, names)
    chosen = {int(k): _rgb(v) for k, v in (colors or {}).items()}
    palette = _roi_colors(masks)
    roi_colors = {v: chosen.get(v, palette[v]) for v in masks}
    headers = _source_headers(reference, path)
    refs = _slice_refs(reference, headers, path)
    ds = _header(headers[0], series_description, series_number)
    if series_instance_uid:
        ds.SeriesInstanceUID = series_instance_uid
    if sop_instance_uid:
        ds.SOPInstanceUID = sop_instance_uid
    ds.FrameOfReferenceUID = str(reference.meta["frame_of_reference_uid"])
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(reference, refs)])
    _add_rois(ds, masks, names, roi_colors, reference, refs)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


# -- reading ---------------------------------------------------------------------------------------------
def _fill_ring(plane: np.ndarray, ring: np.ndarray) -> None:
    """XOR into ``plane`` (Y, X) the pixel centres inside ``ring`` ``(N, 2)`` ``(row, col)`` (even-odd)."""
    from matplotlib.path import Path as PolygonPath

    lo = np.maximum(np.ceil(ring.min(axis=0)), 0).astype(int)
    hi = np.minimum(np.floor(ring.max(axis=0)), np.array(plane.shape) - 1).astype(int)
    if np.any(hi < lo):
        return
    rr, cc = np.mgrid[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1]
    centres = np.column_stack([cc.ravel(), rr.ravel()]).astype(np.float64)
    inside = PolygonPath(ring[:, ::-1]).contains_points(centres).reshape(rr.shape)
    plane[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1] ^= inside


@dataclass
class RTStructure:
    """The ROIs of an RT Structure Set, contours mapped onto a reference grid.

    Attributes:
        path: the RTSTRUCT file.
        reference: the image whose grid the contours were mapped onto.
        names: ROI number -> ROI name.
        colors: ROI number -> ROI Display Color ``(r, g, b)``, or ``None`` when the file gives none.
        contours: ROI number -> ``[(slice index k, (N, 2) ring in (row, col) pixel units), ...]``; closed
            planar contours only (points and open lines enclose nothing and are left out).
        meta: ``path``, ``format`` (``"dicom-rtstruct"``), UIDs, the structure set label.
    """

    path: Path
    reference: Image
    names: dict[int, str]
    colors: dict[int, tuple[int, int, int] | None]
    contours: dict[int, list[tuple[int, np.ndarray]]]
    meta: dict[str, Any] = field(default_factory=dict)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def mask(self, number: int) -> np.ndarray:
        """ROI ``number`` rasterised: bool ``(Z, Y, X)`` on the reference grid, rings combined even-odd."""
        if number not in self._cache:
            out = np.zeros(self.reference.spatial_shape, dtype=bool)
            for k, ring in self.contours.get(number, []):
                _fill_ring(out[k], ring)
            self._cache[number] = out
        return self._cache[number]

    def masks(self, key: str = "number") -> dict[Any, np.ndarray]:
        """Every ROI (empty ones too) as bool ``(Z, Y, X)``, keyed by ROI ``"number"`` or ``"name"``."""
        if key not in ("number", "name"):
            raise ValueError(f"key must be 'number' or 'name', not {key!r}")
        if key == "number":
            return {n: self.mask(n) for n in sorted(self.names)}
        doubles = sorted({v for v in self.names.values() if list(self.names.values()).count(v) > 1})
        if doubles:
            raise InputError(
                self.path, f"has several ROIs named {', '.join(map(repr, doubles))}; key by number"
            )
        return {self.names[n]: self.mask(n) for n in sorted(self.names)}

    def overlaps(self) -> dict[tuple[int, int], int]:
        """Voxels shared by each pair of ROIs (pairs with none are left out)."""
        out: dict[tuple[int, int], int] = {}
        numbers = sorted(self.names)
        for a_i, a in enumerate(numbers):
            for b in numbers[a_i + 1 :]:
                shared = int(np.count_nonzero(self.mask(a) & self.mask(b)))
                if shared:
                    out[(a, b)] = shared
        return out

    def label_map(self, overlap: str = "error") -> Image:
        """All ROIs in one label map (value = ROI number) on the reference grid.

        ``overlap``: ``"error"`` refuses overlapping ROIs (the message lists the pairs), ``"last"`` lets
        the higher ROI number win, ``"first"`` the lower one.
        """
        from medsam3.io.readers import smallest_unsigned

        pairs = self.overlaps()
        order = painting_order(self.path, self.names, pairs, overlap, "ROIs", "use masks()")
        vol = np.zeros(self.reference.spatial_shape, dtype=smallest_unsigned(max(order, default=0)))
        for n in order:
            vol[self.mask(n)] = n
        meta = dict(
            self.meta,
            is_label=True,
            label_names=dict(self.names),
            overlaps={f"{a},{b}": v for (a, b), v in pairs.items()},
        )
        return on_grid(self.reference, vol, meta)


def _roi_number(path: Path, item: Dataset, keyword: str) -> int:
    """The ROI number ``keyword`` of ``item``; :class:`InputError` when it is missing or not an integer."""
    try:
        return int(item.get(keyword))
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"has an ROI item without a valid {keyword} ({item.get(keyword)!r})") from exc


def _frame_uids(path: Path, ds: Dataset) -> tuple[set[str], dict[int, str]]:
    """Frame of Reference UIDs of the file, and of each ROI that names one."""
    found = {str(ds.get("FrameOfReferenceUID", "") or "")}
    for item in ds.get("ReferencedFrameOfReferenceSequence") or []:
        found.add(str(item.get("FrameOfReferenceUID", "") or ""))
    per_roi = {
        _roi_number(path, r, "ROINumber"): str(r.get("ReferencedFrameOfReferenceUID", "") or "")
        for r in ds.get("StructureSetROISequence") or []
    }
    found |= set(per_roi.values())
    return found - {""}, per_roi


def _check_frame(path: Path, ds: Dataset, reference: Image) -> str:
    """The file's Frame of Reference UID; :class:`InputError` when it differs from the reference's."""
    found, per_roi = _frame_uids(path, ds)
    ref_uid = str(reference.meta.get("frame_of_reference_uid", "") or "")
    if ref_uid and found and ref_uid not in found:
        raise InputError(
            path,
            f"belongs to frame of reference {', '.join(sorted(found))}, but the reference image to {ref_uid}",
        )
    stray = sorted(n for n, uid in per_roi.items() if ref_uid and uid and uid != ref_uid)
    if stray:
        raise InputError(
            path, f"ROIs {stray} belong to another frame of reference than the reference image ({ref_uid})"
        )
    return ref_uid if ref_uid in found else (sorted(found)[0] if found else "")


def _on_slice(path: Path, points: np.ndarray, reference: Image, what: str) -> tuple[int, np.ndarray]:
    """Slice index and ``(N, 2)`` ``(row, col)`` of a contour's patient points ``(N, 3)``; refuses a
    contour that is not in one slice plane of ``reference``."""
    idx = patient_to_index(reference, points)
    step = float(reference.spacing[2])
    tol = max(SLICE_TOLERANCE * step, _MIN_TOLERANCE_MM)
    spread = float(np.ptp(idx[:, 0])) * step
    if spread > tol:
        raise InputError(
            path,
            f"{what} is not in a slice plane of the reference image (its points spread over {spread:.3f} mm "
            "along the slice normal)",
        )
    k_float = float(np.mean(idx[:, 0]))
    k = int(np.round(k_float))
    off = abs(k_float - k) * step
    if off > tol:
        raise InputError(
            path, f"{what} lies {off:.3f} mm from the nearest slice plane of the reference image"
        )
    depth = reference.spatial_shape[0]
    if not 0 <= k < depth:
        raise InputError(
            path, f"{what} lies on slice {k}, outside the reference image's slices 0..{depth - 1}"
        )
    return k, idx[:, 1:]


def _contour_points(path: Path, item: Dataset, what: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in item.get("ContourData") or []], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"{what} has unreadable Contour Data ({exc})") from exc
    count = int(item.get("NumberOfContourPoints", len(values) // 3) or 0)
    if values.size % 3 or values.size // 3 != count or not np.all(np.isfinite(values)):
        raise InputError(
            path, f"{what} has {values.size} Contour Data values for {count} points; expected 3 per point"
        )
    return values.reshape(-1, 3)


def _roi_contours(path: Path, item: Dataset, reference: Image, name: str) -> list[tuple[int, np.ndarray]]:
    """The closed planar rings of one ROI Contour item on ``reference``'s slices."""
    number = _roi_number(path, item, "ReferencedROINumber")
    out = []
    for i, contour in enumerate(item.get("ContourSequence") or []):
        what = f"contour {i + 1} of ROI {number} ({name!r})"
        kind = str(contour.get("ContourGeometricType", "") or "").upper()
        if kind != "CLOSED_PLANAR":
            log.warning("%s: %s is %s, which encloses nothing; skipped", path, what, kind or "untyped")
            continue
        points = _contour_points(path, contour, what)
        if len(points) < 3:
            log.warning("%s: %s has %d points, which enclose nothing; skipped", path, what, len(points))
            continue
        out.append(_on_slice(path, points, reference, what))
    return out


def _color(item: Dataset) -> tuple[int, int, int] | None:
    value = item.get("ROIDisplayColor")
    return None if value is None or len(value) != 3 else _rgb(value)


def read_rtstruct(path: str | Path, reference: Image) -> RTStructure:
    """Read a DICOM RT Structure Set, its contours mapped onto ``reference``'s grid.

    Args:
        path: the RTSTRUCT file.
        reference: the image the contours were drawn on (a DICOM volume, or any image with its geometry).

    Returns an :class:`RTStructure`; :meth:`RTStructure.masks` and :meth:`RTStructure.label_map` rasterise
    it (bool / integer ``(Z, Y, X)``).

    Raises :class:`InputError` when the file is not an RT Structure Set, belongs to another Frame of
    Reference than ``reference`` (both known), or holds a contour that is not planar or not on a slice.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InputError(path, f"cannot be read as DICOM ({exc})") from exc
    if not is_rtstruct(ds):
        raise InputError(path, "is not a DICOM RT Structure Set (RTSTRUCT)")
    if reference.ndim != 3:
        raise InputError(path, "an RT Structure Set needs a 3D reference image to be placed on")
    frame_uid = _check_frame(path, ds, reference)
    numbers = [(_roi_number(path, r, "ROINumber"), r) for r in ds.get("StructureSetROISequence") or []]
    names = {n: str(r.get("ROIName", "") or f"ROI {n}") for n, r in numbers}
    colors: dict[int, tuple[int, int, int] | None] = dict.fromkeys(names)
    contours: dict[int, list[tuple[int, np.ndarray]]] = {n: [] for n in names}
    for item in ds.get("ROIContourSequence") or []:
        number = _roi_number(path, item, "ReferencedROINumber")
        names.setdefault(number, f"ROI {number}")
        colors[number] = _color(item)
        contours.setdefault(number, []).extend(_roi_contours(path, item, reference, names[number]))
    meta = {
        "path": str(path),
        "format": "dicom-rtstruct",
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": frame_uid,
        "sop_instance_uids": [sop_instance_uid(ds)],
        "structure_set_label": str(ds.get("StructureSetLabel", "") or ""),
    }
    return RTStructure(
        path=path, reference=reference, names=names, colors=colors, contours=contours, meta=meta
    )
