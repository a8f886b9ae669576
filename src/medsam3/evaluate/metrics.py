"""Segmentation metrics on binary masks and label maps, with voxel spacing in millimetres.

Inputs
------
``pred`` and ``ref`` are numpy masks of the same shape in ARRAY order, ``(Y, X)`` or ``(Z, Y, X)``: bool,
or numbers holding only 0 and 1. ``spacing`` is the voxel size in mm in the same array order,
``(sy, sx)`` / ``(sz, sy, sx)`` (``Image.spacing_array_order``), or one number for isotropic voxels.
Distances are in mm; surfaces and distances follow :mod:`medsam3.evaluate.surface`, which reproduces
MONAI (``compute_hausdorff_distance``, ``compute_average_surface_distance(symmetric=True)``,
``compute_surface_dice(use_subvoxels=False)``, euclidean) on non-empty masks.

Empty masks
-----------
MONAI leaves these cases undefined (both empty: NaN everywhere; one empty: NaN HD95, ``inf`` ASSD,
NSD 0). A report needs every case scored, so each case is defined here:

=====================  ======  =====  =========  ======  ===  =================  ===========
case                   Dice    IoU    precision  recall  NSD  HD95 / HD / ASSD   rationale
=====================  ======  =====  =========  ======  ===  =================  ===========
both empty             1       1      1          1       1    0                  (a)
reference empty only   0       0      0          1       0    ``inf``            (b)
prediction empty only  0       0      1          0       0    ``inf``            (c)
=====================  ======  =====  =========  ======  ===  =================  ===========

(a) The structure is absent and the model says so: a correct answer, scored as a perfect segmentation.
    Scoring it NaN would drop these correct answers from per-dataset means while the false detections
    of (b) still count as 0, so a correct "absent" would earn nothing.
(b) A false detection: every predicted voxel is false, so the overlap scores and NSD are 0 and the
    distance to a non-existent surface is unbounded (``inf``).
(c) A missed structure: nothing of the reference is found, overlap scores and NSD are 0, distances
    ``inf``.

Precision and recall each count one kind of error: precision the false positives, recall the false
negatives. When their denominator is empty (no predicted voxel for precision, no reference voxel for
recall) that error cannot have happened, so the value is 1; the other error is measured by the other
metric and by Dice. This keeps the rule the same in (a), (b) and (c). Recall over a cohort is best read
on the cases where the reference is present (``ref_voxels > 0`` in :func:`compute_all`).

``inf`` is kept rather than a number so that no arbitrary value hides in a per-case table. Before
averaging, replace it with :func:`worst_case_distance` (the image diagonal in mm, larger than any real
distance on that grid; :func:`compute_all` reports it as ``worst_case_mm``) or report the failures
separately; :func:`bootstrap_ci` refuses infinite values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medsam3.errors import InputError
from medsam3.evaluate.surface import (
    assd_from,
    check_pair,
    check_spacing,
    check_tolerance,
    nsd_from,
    percentile_hausdorff_from,
    surface_distances,
    worst_case_distance,
)

#: Default NSD tolerance in mm. Nikolov et al. use per-structure tolerances from inter-rater variation;
#: pass those when known.
DEFAULT_NSD_TOLERANCE_MM = 2.0


def _confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` voxel counts of two bool masks."""
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def _ratio(num: int, den: int) -> float:
    """``num / den``, with an empty denominator (nothing to get wrong) scored as 1."""
    return 1.0 if den == 0 else num / den


def _overlap(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P & R| / (|P| + |R|)``; 1 when both masks are empty."""
    p, r, _ = check_pair(pred, ref, 1.0)
    return _overlap(*_confusion(p, r))["dice"]


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P & R| / |P | R|``; 1 when both masks are empty."""
    p, r, _ = check_pair(pred, ref, 1.0)
    return _overlap(*_confusion(p, r))["iou"]


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """Positive predictive value ``|P & R| / |P|``; 1 when the prediction is empty (no false positive)."""
    p, r, _ = check_pair(pred, ref, 1.0)
    return _overlap(*_confusion(p, r))["precision"]


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """Sensitivity ``|P & R| / |R|``; 1 when the reference is empty (no false negative)."""
    p, r, _ = check_pair(pred, ref, 1.0)
    return _overlap(*_confusion(p, r))["recall"]


def compute_all(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, float | int]:
    """Every metric of one prediction/reference pair, computing the surface distances once.

    Returns a dict with ``dice``, ``iou``, ``precision``, ``recall``, ``nsd`` (at ``nsd_tolerance_mm``),
    ``hd95``, ``hausdorff``, ``assd`` (mm, ``inf`` when exactly one mask is empty), ``nsd_tolerance_mm``,
    ``pred_voxels``, ``ref_voxels``, ``pred_volume_ml``, ``ref_volume_ml`` and ``worst_case_mm`` (see
    :func:`worst_case_distance`).
    """
    p, r, sp = check_pair(pred, ref, spacing)
    tol = check_tolerance(nsd_tolerance_mm)
    tp, fp, fn = _confusion(p, r)
    d_pr, d_rp = surface_distances(p, r, sp)
    voxel_ml = math.prod(sp) / 1000.0
    out: dict[str, float | int] = dict(_overlap(tp, fp, fn))
    out.update(
        nsd=nsd_from(d_pr, d_rp, tol),
        hd95=percentile_hausdorff_from(d_pr, d_rp, 95.0),
        hausdorff=percentile_hausdorff_from(d_pr, d_rp, None),
        assd=assd_from(d_pr, d_rp),
        nsd_tolerance_mm=tol,
        pred_voxels=tp + fp,
        ref_voxels=tp + fn,
        pred_volume_ml=(tp + fp) * voxel_ml,
        ref_volume_ml=(tp + fn) * voxel_ml,
        worst_case_mm=worst_case_distance(p.shape, sp),
    )
    return out


def _as_label_map(labels: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise InputError(
        None, f"{name} label map must hold integer labels; got dtype {arr.dtype} and other values"
    )


def per_label_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: float | Sequence[float],
    labels: Sequence[int] | None = None,
    label_names: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float | Mapping[int, float] = DEFAULT_NSD_TOLERANCE_MM,
) -> list[dict[str, Any]]:
    """:func:`compute_all` for each label of two label maps (0 is background).

    Args:
        pred_labels, ref_labels: integer label maps of one shape, ``(Y, X)`` or ``(Z, Y, X)``.
        spacing: voxel size in mm, array order.
        labels: the labels to score, in this order; default: every non-zero label found in either map,
            ascending. A requested label absent from both maps is scored as "both empty".
        label_names: optional ``{label: name}``; the ``name`` entry is ``None`` for unnamed labels.
        nsd_tolerance_mm: one tolerance for every label, or ``{label: tolerance}`` covering each label.

    Returns:
        One dict per label: ``label``, ``name`` and the entries of :func:`compute_all`.
    """
    pred_map = _as_label_map(pred_labels, "prediction")
    ref_map = _as_label_map(ref_labels, "reference")
    if pred_map.shape != ref_map.shape:
        raise InputError(
            None, f"prediction shape {pred_map.shape} differs from reference shape {ref_map.shape}"
        )
    sp = check_spacing(spacing, pred_map.ndim)
    if labels is None:
        found = np.union1d(np.unique(pred_map), np.unique(ref_map))
        wanted = [int(v) for v in found if v != 0]
    else:
        wanted = [int(v) for v in labels]
        if len(set(wanted)) != len(wanted) or 0 in wanted:
            raise InputError(None, f"labels {list(labels)} must be distinct and non-zero (0 is background)")
    names = dict(label_names or {})
    rows: list[dict[str, Any]] = []
    for label in wanted:
        if isinstance(nsd_tolerance_mm, Mapping):
            if label not in nsd_tolerance_mm:
                raise InputError(None, f"no NSD tolerance given for label {label}")
            tol = nsd_tolerance_mm[label]
        else:
            tol = nsd_tolerance_mm
        row: dict[str, Any] = {"label": label, "name": names.get(label)}
        row.update(compute_all(pred_map == label, ref_map == label, sp, nsd_tolerance_mm=tol))
        rows.append(row)
    return rows


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap ``(1 - alpha)`` confidence interval of per-case values.

    NaN values (undefined cases) are left out. Returns ``(mean, low, high)``; all NaN when no value is
    left, and ``(v, v, v)`` for a single value. Infinite values are refused: replace them first (for
    distances, with :func:`worst_case_distance`). The resampling is seeded, so results are reproducible.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if int(n_boot) < 1:
        raise InputError(None, f"n_boot {n_boot!r} must be at least 1")
    if not 0.0 < float(alpha) < 1.0:
        raise InputError(None, f"alpha {alpha!r} must be between 0 and 1")
    arr = arr[~np.isnan(arr)]
    if np.isinf(arr).any():
        raise InputError(
            None, "values contain inf (an empty mask's distance); replace it, e.g. with worst_case_distance()"
        )
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    rng = np.random.default_rng(seed)
    n_boot = int(n_boot)
    chunk = max(1, 2_000_000 // arr.size)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))
        means[start:stop] = arr[idx].mean(axis=1)
    low, high = np.percentile(means, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return mean, float(low), float(high)
