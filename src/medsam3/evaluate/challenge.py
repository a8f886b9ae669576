"""``medsam3 evaluate --protocol``: challenge protocols for BiomedSegFM ``.npz`` predictions and references.

Usage::

    # the CVPR 2025 text-guided 3D challenge ("Foundation Models for Text-guided 3D Biomedical Image
    # Segmentation"), as the organisers' later evaluation script scores it
    medsam3 evaluate --protocol cvpr25 --pred PRED_DIR --ref REF_DIR -o REPORT_DIR
        [--nsd-tolerance 2.0] [--spacing-order xyz|zyx] [--model-name NAME] [--allow-missing]

    # Medical SAM3 V2's own 3D evaluation (label 1, one 8-slice window): NOT the challenge metric
    medsam3 evaluate --protocol v2-window --pred PRED_DIR --ref REF_DIR -o REPORT_DIR

Files
-----
``REF_DIR/<name>.npz`` (every ``*.npz`` file is a case) holds ``gts`` (``(D, H, W)`` = array order
``(Z, Y, X)``, integer labels), ``spacing`` (voxel size in mm, ITK order ``(x, y, z)``, see
:mod:`medsam3.io.npz`) and ``text_prompts`` (a pickled 0-d object array: ``{"1": "sentence", ...,
"instance_label": 0 | 1}``, read with :func:`medsam3.data.npz_layout.read_text_prompts`, whose unpickler
admits plain containers and numbers only); ``imgs`` may be present and is not read.
``PRED_DIR/<name>.npz`` (the same file name) holds ``segs`` ``(D, H, W)``.

``--spacing-order zyx`` (default) applies the stored values to the array axes as they are, which is what
the organisers' script does (it passes ``spacing`` unchanged to ``compute_surface_distances`` of
``(D, H, W)`` arrays), so the NSD matches the challenge's numbers; ``xyz`` reverses the stored ``(x, y, z)``
onto the array axes ``(z, y, x)``, the physically correct distances. The two differ wherever the voxels are
anisotropic (a 0.8 x 0.8 x 5 mm CT measured as 5 x 0.8 x 0.8 mm); the report records which was used.

CVPR 2025 protocol (``cvpr25``)
-------------------------------
Labels and predictions are cast to ``uint8`` as the organisers do: a value ``v`` outside 0..255 becomes
``v mod 256`` (256 turns into background, 257 into 1, -1 into 255). Such a case gets a warning. A
prompted id above 255 is then never found in either map, so it scores NaN and drops out of the mean.

* ``class_ids``: every integer key of ``text_prompts`` (id 0 is left out with a warning), whether or not
  the reference holds it.
* Semantic cases (``instance_label`` 0), per id: ``DSC = 2|P & R| / (|P| + |R|)``; ``NSD`` at the tolerance
  (2 mm) with DeepMind's ``surface-distance`` definitions: the surface is made of surfels placed on the
  voxel-corner grid, found from each 2x2x2 neighbourhood code, each with the marching-cubes area of its
  code for the spacing; ``NSD = (area of reference surfels within tau of the predicted surface + area of
  predicted surfels within tau of the reference surface) / (total area of both)``, distances between
  surfel positions, ``<= tau`` counts. Both masks empty: DSC and NSD NaN. Exactly one empty: 0. The case's
  DSC / NSD are the ``nanmean`` over the ids (NaN when every id is NaN; such a case is left out of the
  means). So a prompted class absent from both maps is skipped, and a mask predicted for a prompted class
  the reference lacks scores 0.
* Instance cases (``instance_label`` 1): the reference's values are the instances, renumbered 1..N. A
  prediction holding one non-zero value is split into 6-connected components (:func:`scipy.ndimage.label`
  with the face-connected structure, the same partition as ``cc3d`` with ``connectivity=6``); a prediction
  holding several non-zero values is read as instances already (the organisers' rule). IoU matrix between
  instances; Hungarian matching (:func:`scipy.optimize.linear_sum_assignment`, the organisers' cost
  ``-(IoU >= 0.5) - IoU / (2 min(N, M))``) keeping pairs with IoU >= 0.5: ``TP`` matched pairs,
  ``FP = M - TP``, ``FN = N - TP``; ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 =
  2PR / (P + R)``, each 0 when its denominator is 0, as in the official script. Hence: no predicted
  instance -> P = R = F1 = 0 (also when the reference has none: a correct empty answer scores 0 there,
  and the row says so); predicted instances but no reference instance -> 0. ``DSC_TP`` = mean Dice of the
  matched pairs (NaN without a match). DSC / NSD are not reported for instance cases. Two differences
  from the official code, neither changing a result below 255 components: components are numbered in
  int32 (the official script writes them back into the uint8 map, which merges components past 254),
  and only instances with a partner at IoU >= 0.5 enter the assignment (the same number of matches).
* Always, beside them: the absent-prompt false-positive rate. A prompted id is *absent* when the reference
  has no voxel of it (instance cases: no instance at all); it is a *false positive* when the prediction
  has any voxel of it (instance cases: any non-zero voxel). Rate = false positives / absent prompts, over
  the cases with a prediction. The official mean hides these: an absent id counts only through one 0 in a
  case mean.

V2 window protocol (``v2-window``, not the challenge metric)
--------------------------------------------------------------
Medical SAM3 V2's ``3d_val.py``: reference ``gts == 1``, prediction ``segs == 1`` (no uint8 cast); ``init``
= the first slice with the largest reference area; the window is ``b .. b+7`` with ``b = clamp(init - 3, 0,
D - 8)`` (all slices when ``D <= 8``); per-slice Dice over the window, slices where both are empty skipped,
averaged per volume, then over volumes. Volumes without label 1 (or with fewer than 2 slices) are skipped,
as V2 skips them. V2's published 0.411 also dropped cases whose prompt did not map to a training class
and ran its model on lossy video frames; this protocol only reproduces the scoring.

Missing and failed predictions
------------------------------
A reference without a prediction file is ``missing``; a prediction that cannot be read, lacks ``segs``,
holds non-integer values or has another shape than ``gts`` is ``failed``. Both are scored as failures
(semantic case DSC 0 and NSD 0, instance F1 / precision / recall 0, window Dice 0), listed in the report
and left out of the absent-prompt rate. A reference that cannot be read or lacks ``gts``, ``spacing`` or
(for ``cvpr25``) ``text_prompts`` is an error.

Report files (:func:`write_challenge_report`, written together at the end): ``cases.csv`` (``level`` =
``case`` rows and, for ``cvpr25``, ``label`` rows per prompted id), ``summary.csv`` (per modality, the
file-name prefix before the first underscore, and ``all``: means over cases with 95% bootstrap
intervals), ``table.md`` and ``config.json``.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from medsam3.errors import InputError

log = logging.getLogger(__name__)

PROTOCOLS = ("cvpr25", "v2-window")
SPACING_ORDERS = ("xyz", "zyx")
#: The challenge's NSD tolerance (mm) and instance-matching IoU threshold.
CVPR25_TOLERANCE_MM = 2.0
IOU_THRESHOLD = 0.5
#: V2's window: 8 slices, starting 3 before the largest reference slice.
V2_WINDOW, V2_BEFORE = 8, 3

# -- DeepMind surface distances (surfels) -------------------------------------------------------------------
#: Surfel normals of each 2x2x2 neighbourhood code (the marching-cubes table of DeepMind's surface-distance
#: package, Apache-2.0, also shipped by MONAI): per code, up to 4 normals of 3 components in array-axis
#: order, each component written as one digit ``8 * value + 4`` (values are multiples of 1/8 in
#: [-1/2, 1/2]); ``-`` for a code without surface. A normal's length is its surfel's area in voxel units.
_NORMALS_TEXT = (
    "- 555 335 224664 535 242646 535335 844666555 355 555355 246246 844226335 624624 844626353 044266355 "
    "844844 533 422466 335533 404666555 535533 440666333 335535533 333222666555 355533 422466355 "
    "246246533 555777426246 533624624 777462333264 044333222555 044333222 535 555535 426462 404553662 "
    "535535 535242646 426462535 117466553242 355535 555535355 448226335 662662553335 535624624 "
    "844626353535 462711355664 044226335 624264 484266533 484535262 484404 624264535 111246333264 "
    "555404222333 404222333 355624264 484662335335 171224353246 484662335 624264624624 224224335 "
    "555224224 224224 335 555335 335335 335224664 426426 448626535 426426335 717422353664 335355 "
    "555335355 335246246 844226335335 484262535 262262353353 242711462355 844262535 246642 448266355 "
    "335246642 242177224355 440662335 448448 555555666448 555666448 246642355 448626535535 246246246642 "
    "535646646 646117264335 448626535 555646646 646646 335535 555335535 335426462 404553662335 426426535 "
    "448626535535 426426426462 466466533 355535335 355535335555 448226335335 555535533 484262535535 "
    "555335533 422466555 555533 844622533 266355266533 717466353246 404266355 117624466335 355266448 "
    "555466466 466466 844666555555 535335555 242646555 555535 224664555 555335 555555 555 555 555555 "
    "555335 224664555 555535 242646555 535335555 844666555555 466466 555466466 355266448 117624466335 "
    "404266355 717466353246 266355266533 844622533 555533 422466555 555335533 484262535535 555535533 "
    "448226335335 355535335555 355535335 466466533 422466466466 448626535535 426426535 404553662335 "
    "335426462 555335535 335535 646646 555646646 448626535 646117264335 535646646 242646646646 "
    "448626535535 246642355 555666448 555555666448 448448 440662335 242177224355 335246642 448266355 "
    "246642 844262535 242711462355 262262353353 484262535 844226335335 335246246 555335355 335355 "
    "717422353664 426426335 448626535 426426 335224664 335335 555335 335 224224 555224224 224224335 "
    "224224224664 484662335 171224353246 484662335335 355624264 404222333 555404222333 111246333264 "
    "624264535 484404 484535262 484266533 624264 044226335 462711355664 844626353535 535624624 "
    "662662553335 448226335 555535355 355535 117466553242 426462535 535242646 535535 404553662 426462 "
    "555535 535 044333222 044333222555 777462333264 533624624 555777426246 246246533 422466355 355533 "
    "333222666555 335535533 440666333 535533 404666555 335533 422466 533 844844 044266355 844626353 "
    "624624 844226335 246246 555355 355 844666555 535335 242646 555 224664 555 555 -"
)


@functools.lru_cache(maxsize=1)
def surfel_normals() -> np.ndarray:
    """``(256, 4, 3)`` float64: the surfel normals of every neighbourhood code (zero rows for fewer)."""
    codes = _NORMALS_TEXT.split()
    if len(codes) != 256:
        raise RuntimeError(f"surfel table holds {len(codes)} codes, expected 256")
    out = np.zeros((256, 4, 3), dtype=np.float64)
    for code, text in enumerate(codes):
        digits = [] if text == "-" else [(int(ch) - 4) / 8.0 for ch in text]
        out[code].flat[: len(digits)] = digits
    return out


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """``(256,)`` surfel area in mm² of each neighbourhood code for ``spacing`` (mm, array order)."""
    s0, s1, s2 = (float(s) for s in spacing)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(surfel_normals() * scale, axis=-1).sum(axis=-1)


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """8-bit code of every voxel corner of a 3D bool mask: shape ``mask.shape + 1``.

    Corner ``(i, j, k)`` lies between voxels ``i-1 .. i`` (and so on per axis); voxel ``(i-1+a, j-1+b,
    k-1+c)`` sets bit ``7 - (4a + 2b + c)``, everything outside the array counting as background. This is
    DeepMind's ``correlate`` with the kernel ``[[[128, 64], [32, 16]], [[8, 4], [2, 1]]]`` on the mask
    padded by one voxel at the high end.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                shift = np.uint8(7 - (4 * a + 2 * b + c))
                codes |= padded[a : a + n0, b : b + n1, c : c + n2] << shift
    return codes


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every true voxel of ``mask``, or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


@dataclass
class SurfelDistances:
    """DeepMind's ``compute_surface_distances`` result: one entry per surfel, distances in mm, areas mm²."""

    ref_to_pred: np.ndarray
    pred_to_ref: np.ndarray
    ref_areas: np.ndarray
    pred_areas: np.ndarray


def _distance_field(borders: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    if not borders.any():
        return np.full(borders.shape, np.inf)
    return np.asarray(ndimage.distance_transform_edt(~borders, sampling=spacing), dtype=np.float64)


def surfel_distances(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfelDistances:
    """Surface distances of two 3D bool masks ``(Z, Y, X)`` on one grid; ``spacing`` mm in array order.

    Both masks are cropped to the box of their union (corners outside it cannot be surface). A surfel is a
    corner whose code is neither 0 nor 255; its distance is to the nearest surfel of the other mask (``inf``
    when that mask is empty).
    """
    if ref.shape != pred.shape or ref.ndim != 3:
        raise InputError(None, f"masks must be 3D of one shape; got {ref.shape} and {pred.shape}")
    sp = tuple(float(s) for s in spacing)
    box = bounding_box(ref | pred)
    if box is None:
        empty = np.zeros(0)
        return SurfelDistances(empty, empty, empty, empty)
    codes_ref, codes_pred = neighbour_codes(ref[box]), neighbour_codes(pred[box])
    borders_ref = (codes_ref != 0) & (codes_ref != 255)
    borders_pred = (codes_pred != 0) & (codes_pred != 255)
    areas = surfel_area_table(sp)
    return SurfelDistances(
        ref_to_pred=_distance_field(borders_pred, sp)[borders_ref],
        pred_to_ref=_distance_field(borders_ref, sp)[borders_pred],
        ref_areas=areas[codes_ref[borders_ref]],
        pred_areas=areas[codes_pred[borders_pred]],
    )


def surface_dice_at_tolerance(d: SurfelDistances, tolerance_mm: float) -> float:
    """Area-weighted share of both surfaces within ``tolerance_mm`` of the other; NaN when both are empty."""
    total = float(d.ref_areas.sum() + d.pred_areas.sum())
    if total == 0.0:
        return math.nan
    near = (
        d.ref_areas[d.ref_to_pred <= tolerance_mm].sum() + d.pred_areas[d.pred_to_ref <= tolerance_mm].sum()
    )
    return float(near / total)


def normalized_surface_dice(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float = CVPR25_TOLERANCE_MM
) -> float:
    """NSD of two 3D bool masks with DeepMind's surfel definition (see the module docstring)."""
    return surface_dice_at_tolerance(surfel_distances(ref, pred, spacing), tolerance_mm)


def dice_or_nan(ref: np.ndarray, pred: np.ndarray) -> float:
    """``2|R & P| / (|R| + |P|)``; NaN when both masks are empty (DeepMind's ``compute_dice_coefficient``)."""
    total = int(np.count_nonzero(ref)) + int(np.count_nonzero(pred))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(ref & pred)) / total


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there is none (without numpy's warning)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


# -- casting and instances ---------------------------------------------------------------------------------
def as_uint8(labels: np.ndarray) -> tuple[np.ndarray, bool]:
    """``labels.astype(uint8)`` as the organisers cast, and whether any value lay outside 0..255 (wrapped)."""
    arr = np.asarray(labels)
    if arr.dtype == np.uint8:
        return arr, False
    wrapped = bool(arr.size) and (int(arr.min()) < 0 or int(arr.max()) > 255)
    return arr.astype(np.uint8), wrapped


def nonzero_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct non-zero values of an integer array (a histogram for uint8, no sort of the volume)."""
    if labels.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    else:
        values = np.unique(labels)
    return values[values != 0]


def relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-zero values renumbered ``1..N`` in ascending order (int32), and ``N``."""
    values = nonzero_values(labels)
    if labels.dtype == np.uint8:
        lut = np.zeros(256, dtype=np.int32)
        lut[values] = np.arange(1, values.size + 1, dtype=np.int32)
        return lut[labels], int(values.size)
    out = np.zeros(labels.shape, dtype=np.int32)
    if values.size:
        nz = labels != 0
        out[nz] = np.searchsorted(values, labels[nz]).astype(np.int32) + 1
    return out, int(values.size)


#: 6-connectivity (faces only) in 3D.
SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def prediction_instances(segs: np.ndarray) -> tuple[np.ndarray, int, str]:
    """Instances of a prediction ``(Z, Y, X)``: ``(labels 0..M int32, M, how)``.

    One non-zero value: its 6-connected components (``how = "components"``); several: the values are
    the instances (``how = "values"``); none: no instance (``how = "empty"``).
    """
    values = nonzero_values(segs)
    if values.size == 0:
        return np.zeros(segs.shape, dtype=np.int32), 0, "empty"
    if values.size == 1:
        comps, n = ndimage.label(segs != 0, structure=SIX_CONNECTED)
        return comps.astype(np.int32, copy=False), int(n), "components"
    labels, n = relabel_sequential(segs)
    return labels, n, "values"


@dataclass
class InstanceScores:
    """Instance detection scores of one case (see the module docstring)."""

    ref_instances: int
    pred_instances: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    dsc_tp: float
    pairs: list[tuple[int, int, float]] = field(default_factory=list)


def _ratio_or_zero(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _overlaps(ref: np.ndarray, pred: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ref id, pred id, shared voxels)`` of every overlapping instance pair."""
    both = (ref > 0) & (pred > 0)
    keys = ref[both].astype(np.int64) * (n_pred + 1) + pred[both]
    pairs, counts = np.unique(keys, return_counts=True)
    return pairs // (n_pred + 1), pairs % (n_pred + 1), counts


def match_instances(
    ref: np.ndarray, n_ref: int, pred: np.ndarray, n_pred: int, threshold: float = IOU_THRESHOLD
) -> InstanceScores:
    """Hungarian matching of instance maps ``ref`` (``1..n_ref``) and ``pred`` (``1..n_pred``) at IoU >= 0.5.

    Only the instances that have a partner with IoU >= threshold enter the assignment (the others cannot
    be matched, so the number of matches is the organisers'); the cost is theirs.
    """
    size_ref = np.bincount(ref.ravel(), minlength=n_ref + 1)
    size_pred = np.bincount(pred.ravel(), minlength=n_pred + 1)
    pairs: list[tuple[int, int, float]] = []
    if n_ref and n_pred:
        r_ids, p_ids, inter = _overlaps(ref, pred, n_pred)
        iou = inter / (size_ref[r_ids] + size_pred[p_ids] - inter)
        keep = iou >= threshold
        rows, cols = np.unique(r_ids[keep]), np.unique(p_ids[keep])
        if rows.size:
            sel = np.isin(r_ids, rows) & np.isin(p_ids, cols)
            matrix = np.zeros((rows.size, cols.size))
            matrix[np.searchsorted(rows, r_ids[sel]), np.searchsorted(cols, p_ids[sel])] = iou[sel]
            n_min = min(matrix.shape)
            cost = -(matrix >= threshold).astype(np.float64) - matrix / (2 * n_min)
            ri, ci = linear_sum_assignment(cost)
            pairs = [
                (int(rows[i]), int(cols[j]), float(matrix[i, j]))
                for i, j in zip(ri, ci, strict=True)
                if matrix[i, j] >= threshold
            ]
    tp = len(pairs)
    fp, fn = n_pred - tp, n_ref - tp
    precision, recall = _ratio_or_zero(tp, tp + fp), _ratio_or_zero(tp, tp + fn)
    f1 = _ratio_or_zero(2 * precision * recall, precision + recall)
    dsc_tp = nanmean([2 * v / (1 + v) for _, _, v in pairs])
    return InstanceScores(n_ref, n_pred, tp, fp, fn, precision, recall, f1, dsc_tp, pairs)


# -- V2's window ------------------------------------------------------------------------------------------
def largest_slice(ref: np.ndarray) -> int | None:
    """Index of the first slice with the largest reference area (axis 0), None when the mask is empty."""
    areas = ref.reshape(ref.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas)) if areas.any() else None


def v2_window(depth: int, init: int, length: int = V2_WINDOW, before: int = V2_BEFORE) -> range:
    """Slices of V2's window: ``b .. b+length-1`` with ``b = clamp(init - before, 0, depth - length)``.

    Every slice when ``depth <= length``.
    """
    if depth <= length:
        return range(depth)
    start = min(max(init - before, 0), depth - length)
    return range(start, start + length)


def window_dice(ref: np.ndarray, pred: np.ndarray) -> dict[str, Any] | None:
    """V2's volume score of bool masks ``(Z, Y, X)``; None when V2 skips the volume.

    Returns ``init`` (largest slice), ``start`` / ``stop`` (first and last window slice), ``slices_scored``
    and ``dice`` (mean per-slice Dice over the window slices where either mask is non-empty).
    """
    init = largest_slice(ref)
    if init is None or ref.shape[0] < 2:
        return None
    window = v2_window(ref.shape[0], init)
    scores = []
    for z in window:
        r, p = ref[z], pred[z]
        total = int(np.count_nonzero(r)) + int(np.count_nonzero(p))
        if total:
            scores.append(2.0 * int(np.count_nonzero(r & p)) / total)
    return {
        "init": init,
        "start": window.start,
        "stop": window.stop - 1,
        "slices_scored": len(scores),
        "dice": float(np.mean(scores)) if scores else math.nan,
    }


# -- reading ------------------------------------------------------------------------------------------------
def modality_of(name: str) -> str:
    """``CT_AbdomenCT-1K_0001.npz`` -> ``CT``: the file-name prefix before the first underscore."""
    stem = Path(name).name
    return stem.split("_", 1)[0] if "_" in stem else "unknown"


def _check_members(path: Path, keys: Sequence[str]) -> None:
    """Refuse members whose ``.npy`` headers declare more values than the voxel limit, before loading."""
    from medsam3.io.volumes import MAX_VOXELS_ENV, max_voxels

    limit = max_voxels()
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        for key in keys:
            if f"{key}.npy" not in names:
                continue
            with zf.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape = read(fh)[0]
            count = int(np.prod(shape, dtype=np.float64))
            if count > limit:
                raise InputError(
                    path,
                    f"array {key!r} declares shape {tuple(shape)}: more than {limit:,} values "
                    f"(set {MAX_VOXELS_ENV} to read larger volumes)",
                )


def read_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz file that has them (``allow_pickle=False``; others are not loaded)."""
    try:
        _check_members(path, keys)
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in keys if k in z.files}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"cannot be read as a NumPy .npz archive ({exc})") from exc


def integer_labels(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """``arr`` as an integer array: integers and bools as they are, integral finite floats converted."""
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise InputError(path, f"{key!r} holds {arr.dtype} values; expected integer labels")


def array_spacing(stored: np.ndarray, path: Path, order: str) -> tuple[float, float, float]:
    """Voxel size in mm in array order ``(z, y, x)`` from a stored ``spacing`` (see ``--spacing-order``)."""
    values = np.asarray(stored, dtype=np.float64).ravel()
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(path, f"has spacing {values.tolist()}; expected 3 positive values (x, y, z) in mm")
    if order not in SPACING_ORDERS:
        raise InputError(None, f"spacing order {order!r} must be one of {SPACING_ORDERS}")
    ordered = values[::-1] if order == "xyz" else values
    return float(ordered[0]), float(ordered[1]), float(ordered[2])


@dataclass
class Reference:
    """A challenge reference case: labels ``(Z, Y, X)`` as stored, spacing mm in array order, prompts."""

    path: Path
    labels: np.ndarray
    spacing: tuple[float, float, float]
    prompts: dict[int, str]
    instance: bool
    warnings: list[str] = field(default_factory=list)


def _flag(value: Any, path: Path) -> bool:
    try:
        flag = int(str(value).strip()) if value is not None else 0
    except ValueError:
        flag = -1
    if flag not in (0, 1):
        raise InputError(path, f"text_prompts instance_label is {value!r}; expected 0 or 1")
    return bool(flag)


def _text(value: Any) -> str:
    """A prompt's text; for a list of phrasings, the first non-empty one."""
    if isinstance(value, (list, tuple)):
        return next((str(v).strip() for v in value if str(v).strip()), "")
    return str(value).strip()


def parse_prompts(value: Mapping[str, Any], path: Path) -> tuple[dict[int, str], bool, list[str]]:
    """``{"1": "text", "instance_label": 0}`` -> ``(id -> text, instance flag, warnings)``."""
    notes = []
    if "instance_label" not in value:
        notes.append(f"{path.name}: text_prompts has no instance_label; scored as a semantic case")
    instance = _flag(value.get("instance_label", 0), path)
    prompts: dict[int, str] = {}
    for key, text in value.items():
        if key == "instance_label":
            continue
        try:
            label = int(str(key).strip())
        except ValueError:
            raise InputError(path, f"text_prompts key {key!r} is not a label id") from None
        if label in prompts:
            raise InputError(path, f"text_prompts names label {label} twice")
        if label == 0:
            notes.append(f"{path.name}: prompt for label 0 (background) not scored")
            continue
        prompts[label] = _text(text)
    if not prompts:
        raise InputError(path, "text_prompts names no label id to score")
    return dict(sorted(prompts.items())), instance, notes


def read_reference(path: Path, spacing_order: str = "zyx", need_prompts: bool = True) -> Reference:
    """Read a reference npz (``gts``, ``spacing``, ``text_prompts``); a bad reference raises InputError."""
    from medsam3.data.npz_layout import read_text_prompts

    arrays = read_arrays(path, ("gts", "spacing"))
    for key in ("gts", "spacing"):
        if key not in arrays:
            raise InputError(path, f"has no {key!r} array (a challenge reference holds gts and spacing)")
    labels = integer_labels(arrays["gts"], path, "gts")
    if labels.ndim != 3:
        raise InputError(path, f"'gts' has shape {labels.shape}; expected a volume (D, H, W)")
    spacing = array_spacing(arrays["spacing"], path, spacing_order)
    prompts: dict[int, str] = {}
    instance, notes = False, list[str]()
    if need_prompts:
        value = read_text_prompts(path)
        if value is None:
            raise InputError(path, "has no text_prompts (the prompted label ids are scored)")
        prompts, instance, notes = parse_prompts(value, path)
    return Reference(path, labels, spacing, prompts, instance, notes)


def read_prediction(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """``segs`` of a prediction npz with the reference's ``shape``; InputError says why it cannot be used."""
    arrays = read_arrays(path, ("segs",))
    if "segs" not in arrays:
        raise InputError(path, "has no 'segs' array")
    segs = integer_labels(arrays["segs"], path, "segs")
    if segs.shape != tuple(shape):
        raise InputError(path, f"'segs' has shape {segs.shape} but the reference 'gts' {tuple(shape)}")
    return segs


# -- scoring ------------------------------------------------------------------------------------------------
@dataclass
class LabelScore:
    """One prompted id of a case (``cvpr25``). ``dsc`` / ``nsd`` are None for instance cases."""

    label: int
    prompt: str
    ref_voxels: int
    pred_voxels: int
    dsc: float | None = None
    nsd: float | None = None

    @property
    def absent(self) -> bool:
        return self.ref_voxels == 0

    @property
    def false_positive(self) -> bool:
        return self.absent and self.pred_voxels > 0


@dataclass
class ChallengeCase:
    """One case of the ``cvpr25`` protocol: case scores, per-id scores and (instance cases) detection."""

    case: str
    modality: str
    task: str
    status: str
    labels: list[LabelScore]
    dsc: float | None = None
    nsd: float | None = None
    instances: InstanceScores | None = None
    note: str = ""
    reference: str = ""
    prediction: str = ""

    @property
    def absent_prompts(self) -> int:
        return sum(s.absent for s in self.labels) if self.status == "ok" else 0

    @property
    def absent_with_fp(self) -> int:
        return sum(s.false_positive for s in self.labels) if self.status == "ok" else 0


@dataclass
class WindowCase:
    """One case of the ``v2-window`` protocol; ``window``: :func:`window_dice`'s result, None if skipped."""

    case: str
    modality: str
    status: str
    window: dict[str, Any] | None
    note: str = ""
    reference: str = ""
    prediction: str = ""

    @property
    def dice(self) -> float | None:
        return None if self.window is None else self.window["dice"]


def score_semantic(
    ref: np.ndarray,
    pred: np.ndarray | None,
    prompts: Mapping[int, str],
    spacing: Sequence[float],
    tolerance_mm: float,
) -> list[LabelScore]:
    """DSC and NSD of every prompted id on uint8 label maps ``(Z, Y, X)`` (``pred`` None: empty)."""
    out = []
    for label, text in prompts.items():
        r = ref == label
        p = np.zeros_like(r) if pred is None else pred == label
        score = LabelScore(label, text, int(np.count_nonzero(r)), int(np.count_nonzero(p)))
        score.dsc = dice_or_nan(r, p)
        score.nsd = normalized_surface_dice(r, p, spacing, tolerance_mm)
        out.append(score)
    return out


def _instance_label_score(prompts: Mapping[int, str], ref: np.ndarray, pred: np.ndarray | None) -> LabelScore:
    label, text = next(iter(prompts.items()))
    pred_voxels = 0 if pred is None else int(np.count_nonzero(pred))
    return LabelScore(label, text, int(np.count_nonzero(ref)), pred_voxels)


def score_cvpr25_case(
    reference: Reference, segs: np.ndarray | None, status: str, tolerance_mm: float = CVPR25_TOLERANCE_MM
) -> tuple[ChallengeCase, list[str]]:
    """Score one case (``segs`` None for a missing / failed prediction, scored as a failure)."""
    name = reference.path.name
    notes = list(reference.warnings)
    ref, wrapped = as_uint8(reference.labels)
    pred = None
    if segs is not None:
        pred, wrapped_pred = as_uint8(segs)
        wrapped = wrapped or wrapped_pred
    if wrapped:
        notes.append(f"{name}: labels outside 0..255 wrapped by the uint8 cast (value mod 256)")
    big = [k for k in reference.prompts if k > 255]
    if big:
        notes.append(f"{name}: prompted ids {big} exceed 255 and can never match after the uint8 cast")
    case = ChallengeCase(
        case=name,
        modality=modality_of(name),
        task="instance" if reference.instance else "semantic",
        status=status,
        labels=[],
        reference=str(reference.path),
    )
    if reference.instance:
        case.labels = [_instance_label_score(reference.prompts, ref, pred)]
        ref_inst, n_ref = relabel_sequential(ref)
        if pred is None:
            case.instances = InstanceScores(n_ref, 0, 0, 0, n_ref, 0.0, 0.0, 0.0, math.nan)
        else:
            pred_inst, n_pred, how = prediction_instances(pred)
            case.instances = match_instances(ref_inst, n_ref, pred_inst, n_pred)
            case.note = f"prediction instances from {how}"
            if n_ref == 0 and n_pred == 0:
                case.note = "no reference and no predicted instance: F1 0 (official rule)"
    else:
        case.labels = score_semantic(ref, pred, reference.prompts, reference.spacing, tolerance_mm)
        if pred is None:
            case.dsc = case.nsd = 0.0
        else:
            case.dsc = nanmean([s.dsc for s in case.labels if s.dsc is not None])
            case.nsd = nanmean([s.nsd for s in case.labels if s.nsd is not None])
            if math.isnan(case.dsc):
                case.note = "no prompted id in the reference or the prediction: left out of the means"
    return case, notes


def score_window_case(reference: Reference, segs: np.ndarray | None, status: str) -> WindowCase:
    """V2's window Dice of one case (``segs`` None: a missing / failed prediction, scored as empty)."""
    name = reference.path.name
    ref = reference.labels == 1
    pred = np.zeros_like(ref) if segs is None else segs == 1
    window = window_dice(ref, pred)
    case = WindowCase(name, modality_of(name), status, window, reference=str(reference.path))
    if window is None:
        case.status = "skipped" if status == "ok" else status
        case.note = "fewer than 2 slices" if ref.any() else "no label 1 in the reference"
    elif status != "ok":
        window["dice"] = 0.0
    return case


# -- folders ------------------------------------------------------------------------------------------------
@dataclass
class ChallengeOptions:
    """Options of a challenge-protocol evaluation (see the module docstring)."""

    protocol: str = "cvpr25"
    nsd_tolerance: float = CVPR25_TOLERANCE_MM
    spacing_order: str = "zyx"
    model: str = "prediction"

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(None, f"protocol {self.protocol!r} must be one of {PROTOCOLS}")
        if self.spacing_order not in SPACING_ORDERS:
            raise InputError(None, f"spacing order {self.spacing_order!r} must be one of {SPACING_ORDERS}")
        if not (math.isfinite(self.nsd_tolerance) and self.nsd_tolerance > 0):
            raise InputError(None, f"NSD tolerance {self.nsd_tolerance!r} mm must be positive")


@dataclass
class ChallengeResult:
    """Scored cases (:class:`ChallengeCase` or :class:`WindowCase`) and the bookkeeping of one run."""

    protocol: str
    cases: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


def _npz_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, f"{what} folder not found")
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and p.suffix.lower() == ".npz"
        and not p.name.startswith(".")
        and ".part." not in p.name
    }


def _load_prediction(path: Path | None, shape: tuple[int, ...], result: ChallengeResult, name: str):
    """``(segs or None, status, note)`` for one case, recording missing and failed cases."""
    if path is None:
        result.missing.append(name)
        return None, "missing", "no prediction file"
    try:
        return read_prediction(path, shape), "ok", ""
    except InputError as exc:
        result.failed.append(name)
        result.warnings.append(f"prediction unusable: {exc}")
        return None, "failed", str(exc)


def score_challenge(pred_dir: str | Path, ref_dir: str | Path, options: ChallengeOptions) -> ChallengeResult:
    """Score every ``REF_DIR/*.npz`` against ``PRED_DIR/<same name>`` with ``options.protocol``."""
    options.check()
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs, preds = _npz_files(ref_dir, "reference"), _npz_files(pred_dir, "prediction")
    if not refs:
        raise InputError(ref_dir, "holds no reference .npz file")
    result = ChallengeResult(options.protocol)
    result.orphans = [str(preds[k]) for k in sorted(set(preds) - set(refs))]
    result.warnings += [f"{p}: prediction without a reference (not scored)" for p in result.orphans]
    cvpr = options.protocol == "cvpr25"
    for name, ref_path in refs.items():
        reference = read_reference(ref_path, options.spacing_order, need_prompts=cvpr)
        pred_path = preds.get(name)
        segs, status, note = _load_prediction(pred_path, reference.labels.shape, result, name)
        case: ChallengeCase | WindowCase
        if cvpr:
            case, notes = score_cvpr25_case(reference, segs, status, options.nsd_tolerance)
            result.warnings += notes
        else:
            case = score_window_case(reference, segs, status)
        case.prediction = str(pred_path or "")
        case.note = "; ".join(n for n in (note, case.note) if n)
        result.cases.append(case)
        log.debug("%s: %s", name, case.status)
    return result


# -- report -------------------------------------------------------------------------------------------------
CVPR25_CASE_COLUMNS = (
    "level",
    "case",
    "modality",
    "task",
    "model",
    "status",
    "label",
    "prompt",
    "dsc",
    "nsd",
    "f1",
    "precision",
    "recall",
    "tp",
    "fp",
    "fn",
    "ref_instances",
    "pred_instances",
    "dsc_tp",
    "ref_voxels",
    "pred_voxels",
    "absent_in_reference",
    "false_positive",
    "absent_prompts",
    "absent_with_fp",
    "note",
    "reference",
    "prediction",
)
WINDOW_CASE_COLUMNS = (
    "case",
    "modality",
    "model",
    "status",
    "init_slice",
    "window_start",
    "window_stop",
    "slices_scored",
    "dice",
    "note",
    "reference",
    "prediction",
)
DEFINITIONS = {
    "cvpr25": "CVPR 2025 text-guided 3D challenge: labels cast to uint8; semantic cases: per prompted id DSC "
    "and NSD (DeepMind surfels) at the tolerance, NaN when both are empty, nanmean per case; instance cases: "
    "F1 at IoU 0.5 after Hungarian matching; absent-prompt false positives counted beside them "
    "(medsam3.evaluate.challenge)",
    "v2-window": "NOT the challenge metric: Medical SAM3 V2's 3D evaluation, label 1, one 8-slice window "
    "b = clamp(largest slice - 3, 0, D - 8), per-slice Dice without both-empty slices, mean per volume "
    "(medsam3.evaluate.challenge)",
}
_MEAN_METRICS = {"cvpr25": ("dsc", "nsd", "f1", "precision", "recall", "dsc_tp"), "v2-window": ("dice",)}


def _case_row(case: ChallengeCase, model: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "level": "case",
        "case": case.case,
        "modality": case.modality,
        "task": case.task,
        "model": model,
        "status": case.status,
        "dsc": case.dsc,
        "nsd": case.nsd,
        "absent_prompts": case.absent_prompts,
        "absent_with_fp": case.absent_with_fp,
        "note": case.note,
        "reference": case.reference,
        "prediction": case.prediction,
    }
    inst = case.instances
    if inst is not None:
        row.update(
            f1=inst.f1,
            precision=inst.precision,
            recall=inst.recall,
            tp=inst.tp,
            fp=inst.fp,
            fn=inst.fn,
            ref_instances=inst.ref_instances,
            pred_instances=inst.pred_instances,
            dsc_tp=inst.dsc_tp,
        )
    return row


def _label_row(case: ChallengeCase, score: LabelScore, model: str) -> dict[str, Any]:
    return {
        "level": "label",
        "case": case.case,
        "modality": case.modality,
        "task": case.task,
        "model": model,
        "status": case.status,
        "label": score.label,
        "prompt": score.prompt,
        "dsc": score.dsc,
        "nsd": score.nsd,
        "ref_voxels": score.ref_voxels,
        "pred_voxels": score.pred_voxels,
        "absent_in_reference": score.absent,
        "false_positive": score.false_positive if case.status == "ok" else "",
        "reference": case.reference,
        "prediction": case.prediction,
    }


def _window_row(case: WindowCase, model: str) -> dict[str, Any]:
    w = case.window or {}
    return {
        "case": case.case,
        "modality": case.modality,
        "model": model,
        "status": case.status,
        "init_slice": w.get("init"),
        "window_start": w.get("start"),
        "window_stop": w.get("stop"),
        "slices_scored": w.get("slices_scored"),
        "dice": w.get("dice"),
        "note": case.note,
        "reference": case.reference,
        "prediction": case.prediction,
    }


def case_rows(result: ChallengeResult, model: str) -> list[dict[str, Any]]:
    """Rows of ``cases.csv``: per case (and, for ``cvpr25``, per prompted id after its case)."""
    rows = []
    for case in result.cases:
        if isinstance(case, WindowCase):
            rows.append(_window_row(case, model))
            continue
        rows.append(_case_row(case, model))
        rows += [_label_row(case, s, model) for s in case.labels]
    return rows


def _metric(case: Any, metric: str) -> float:
    if metric in ("dsc", "nsd") and isinstance(case, ChallengeCase):
        value = getattr(case, metric)
    elif isinstance(case, ChallengeCase):
        value = None if case.instances is None else getattr(case.instances, metric)
    else:
        value = case.dice
    return math.nan if value is None else float(value)


def _group_summary(level: str, name: str, cases: Sequence[Any], protocol: str, n_boot: int, seed: int):
    from medsam3.evaluate.metrics import bootstrap_ci

    entry: dict[str, Any] = {
        "level": level,
        "name": name,
        "n_cases": len(cases),
        "n_ok": sum(c.status == "ok" for c in cases),
        "n_missing": sum(c.status == "missing" for c in cases),
        "n_failed": sum(c.status == "failed" for c in cases),
    }
    if protocol == "cvpr25":
        entry["n_semantic"] = sum(c.task == "semantic" for c in cases)
        entry["n_instance"] = sum(c.task == "instance" for c in cases)
        absent = sum(c.absent_prompts for c in cases)
        with_fp = sum(c.absent_with_fp for c in cases)
        entry.update(
            absent_prompts=absent,
            absent_with_fp=with_fp,
            absent_fp_rate=with_fp / absent if absent else math.nan,
            cases_with_absent_fp=sum(c.absent_with_fp > 0 for c in cases),
        )
    else:
        entry["n_skipped"] = sum(c.status == "skipped" for c in cases)
    for metric in _MEAN_METRICS[protocol]:
        values = [_metric(c, metric) for c in cases]
        entry[f"{metric}_n"] = sum(not math.isnan(v) for v in values)
        mean, low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        entry[f"{metric}_mean"], entry[f"{metric}_low"], entry[f"{metric}_high"] = mean, low, high
    return entry


def summarize(result: ChallengeResult, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Summary rows per modality (sorted) and over all cases (``level`` = ``modality`` / ``all``)."""
    by_modality: dict[str, list[Any]] = {}
    for case in result.cases:
        by_modality.setdefault(case.modality, []).append(case)
    rows = [
        _group_summary("modality", m, cases, result.protocol, n_boot, seed)
        for m, cases in sorted(by_modality.items())
    ]
    rows.append(_group_summary("all", "all", result.cases, result.protocol, n_boot, seed))
    return rows


def summary_columns(protocol: str) -> tuple[str, ...]:
    head: tuple[str, ...] = ("level", "name", "n_cases", "n_ok", "n_missing", "n_failed")
    head += ("n_semantic", "n_instance") if protocol == "cvpr25" else ("n_skipped",)
    metrics = tuple(f"{m}_{s}" for m in _MEAN_METRICS[protocol] for s in ("n", "mean", "low", "high"))
    tail = ("absent_prompts", "absent_with_fp", "absent_fp_rate", "cases_with_absent_fp")
    return head + metrics + (tail if protocol == "cvpr25" else ())


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}" if pct else f"{value:.4f}"


def _cvpr25_markdown(summary: Sequence[Mapping[str, Any]], model: str) -> str:
    lines = [
        f"# CVPR 2025 text-guided 3D challenge metrics: {model}",
        "",
        "| Modality | cases | semantic | DSC | NSD | instance | F1 | DSC_TP | absent prompts | "
        "with a false positive | rate % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        name = "**All**" if s["level"] == "all" else s["name"]
        lines.append(
            f"| {name} | {s['n_cases']} | {s['n_semantic']} | {_fmt(s['dsc_mean'])} | "
            f"{_fmt(s['nsd_mean'])} | "
            f"{s['n_instance']} | {_fmt(s['f1_mean'])} | {_fmt(s['dsc_tp_mean'])} | {s['absent_prompts']} | "
            f"{s['absent_with_fp']} | {_fmt(s['absent_fp_rate'], pct=True)} |"
        )
    lines += [
        "",
        "DSC / NSD (2 mm, surfels): nanmean over the prompted ids per semantic case, then mean over cases.",
        "F1 at IoU 0.5 over instance cases. Missing and failed predictions count as 0 (cases.csv, status).",
        "Absent prompts: prompted ids the reference lacks; a false positive when the prediction marks them.",
    ]
    return "\n".join(lines) + "\n"


def _window_markdown(summary: Sequence[Mapping[str, Any]], model: str) -> str:
    lines = [
        f"# V2 window Dice (label 1, one 8-slice window): {model}",
        "",
        "**Not the challenge metric**: Medical SAM3 V2's own 3D evaluation, for comparison with its 0.411.",
        "",
        "| Modality | cases | scored | skipped | Dice | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        name = "**All**" if s["level"] == "all" else s["name"]
        lines.append(
            f"| {name} | {s['n_cases']} | {s['dice_n']} | {s['n_skipped']} | {_fmt(s['dice_mean'])} | "
            f"{_fmt(s['dice_low'])}–{_fmt(s['dice_high'])} |"
        )
    lines += [
        "",
        "Window b..b+7, b = clamp(largest reference slice - 3, 0, D - 8); per-slice Dice, both-empty slices",
        "skipped; mean per volume, then over volumes. Volumes without label 1 are skipped, as in V2.",
        "Missing and failed predictions count as 0 (cases.csv, status).",
    ]
    return "\n".join(lines) + "\n"


def report_files(
    result: ChallengeResult, config: Mapping[str, Any], model: str, n_boot: int = 2000, seed: int = 0
) -> dict[str, str | bytes]:
    """``cases.csv``, ``summary.csv``, ``table.md`` and ``config.json`` as ``{name: text}``."""
    import json

    from medsam3.evaluate.report import dict_csv, versions

    if not result.cases:
        raise InputError(None, "nothing was scored")
    summary = summarize(result, n_boot=n_boot, seed=seed)
    columns = CVPR25_CASE_COLUMNS if result.protocol == "cvpr25" else WINDOW_CASE_COLUMNS
    markdown = _cvpr25_markdown if result.protocol == "cvpr25" else _window_markdown
    cfg = dict(config)
    cfg.setdefault("versions", versions())
    cfg.update(
        protocol=result.protocol,
        definition=DEFINITIONS[result.protocol],
        challenge_metric=result.protocol == "cvpr25",
        missing=result.missing,
        failed=result.failed,
        predictions_without_reference=result.orphans,
        warnings=result.warnings,
        counts={"cases": len(result.cases), "missing": len(result.missing), "failed": len(result.failed)},
    )
    return {
        "cases.csv": dict_csv(columns, case_rows(result, model)),
        "summary.csv": dict_csv(summary_columns(result.protocol), summary),
        "table.md": markdown(summary, model),
        "config.json": json.dumps(_json_safe(cfg), indent=2, default=str) + "\n",
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_challenge_report(
    out_dir: str | Path,
    result: ChallengeResult,
    config: Mapping[str, Any],
    model: str = "prediction",
    n_boot: int = 2000,
    seed: int = 0,
) -> Path:
    """Write the report folder, every file at once (:func:`medsam3.evaluate.report.write_files`)."""
    from medsam3.evaluate.report import write_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        files = report_files(result, config, model, n_boot=n_boot, seed=seed)
    write_files(out_dir, files)
    return Path(out_dir)


__all__ = [
    "PROTOCOLS",
    "SPACING_ORDERS",
    "ChallengeCase",
    "ChallengeOptions",
    "ChallengeResult",
    "InstanceScores",
    "LabelScore",
    "Reference",
    "WindowCase",
    "dice_or_nan",
    "match_instances",
    "neighbour_codes",
    "normalized_surface_dice",
    "prediction_instances",
    "read_reference",
    "score_challenge",
    "score_cvpr25_case",
    "score_window_case",
    "surfel_area_table",
    "surfel_distances",
    "v2_window",
    "window_dice",
    "write_challenge_report",
]
