"""One scored (case, label, model) row of an evaluation, and how a pair of masks becomes one.

Both forms of ``medsam3 evaluate`` (prediction files against reference files, and a model run on a manifest)
produce :class:`CaseRow` objects; :mod:`medsam3.evaluate.report` aggregates and writes them.

Units
-----
Distances (HD95, Hausdorff, ASSD) and the NSD tolerance are in millimetres when the pixel size is known
(NIfTI, DICOM, NRRD, ...) and in **pixels** when it is not (PNG, JPEG, BMP: the readers then report a
spacing of 1 and ``meta['spacing_known'] = False``); ``distance_unit`` says which. Volumes are ml for 3D
grids with known spacing, mm² for 2D grids with known spacing, and a voxel / pixel count otherwise
(``volume_unit``).

Failures
--------
A distance is ``inf`` when exactly one mask is empty (see :mod:`medsam3.evaluate.metrics`). Rows carry the
grid's worst-case distance (its physical diagonal) in its place, with ``distances_worst_case = True``, so
every row can be averaged and a failure scores worse than any real prediction. A reference without a
prediction (``status = "missing"``) and a case whose prediction could not be made or read
(``status = "failed"``) are scored exactly like an empty prediction: Dice 0, IoU 0, NSD 0, recall 0,
distances worst-case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsam3.evaluate.metrics import DEFAULT_NSD_TOLERANCE_MM, compute_all

STATUSES = ("ok", "missing", "failed")

#: Metrics averaged in summaries (means with bootstrap intervals).
SUMMARY_METRICS = ("dice", "iou", "nsd", "hd95", "assd", "precision", "recall")
#: Distance metrics that are worst-case substituted when one mask is empty.
DISTANCE_METRICS = ("hd95", "hausdorff", "assd")

#: Columns of ``cases.csv``, in order.
CASE_COLUMNS = (
    "dataset",
    "role",
    "group",
    "case",
    "concept",
    "label",
    "model",
    "prompt_mode",
    "status",
    "dice",
    "iou",
    "nsd",
    "hd95",
    "assd",
    "hausdorff",
    "precision",
    "recall",
    "pred_voxels",
    "ref_voxels",
    "pred_volume",
    "ref_volume",
    "volume_unit",
    "distance_unit",
    "worst_case_distance",
    "distances_worst_case",
    "nsd_tolerance",
    "score",
    "presence",
    "empty_slices",
    "fp_slices",
    "fp_pixel_rate",
    "note",
    "reference",
    "prediction",
    "image",
)


@dataclass
class CaseRow:
    """One reference label of one case, scored for one model.

    Attributes:
        dataset, role, group: dataset name, ``internal`` / ``external`` / ``""`` (table section) and
            modality group.
        case: case identifier (file key or manifest case id).
        concept: the reference label's name (canonical concept where known).
        label: the reference label value, or ``None``.
        model, prompt_mode: which model produced the prediction and how it was prompted (``files`` when
            the predictions were read from disk).
        status: ``ok``, ``missing`` (no prediction) or ``failed`` (prediction unreadable / not made).
        metrics: :func:`score_masks` output (dice, iou, nsd, hd95, assd, hausdorff, precision, recall,
            voxel counts, volumes, units, worst-case distance).
        score, presence: the model's confidence and presence probability for this prompt, if known.
        slices: 3D only: ``empty_slices`` (slices whose reference is empty), ``fp_slices`` (of those, with a
            prediction) and ``fp_pixel_rate`` (predicted pixels / pixels on those slices).
        note: free text (why a case failed, how labels were matched).
        reference, prediction, image: source files, for tracing a row back.
    """

    dataset: str
    case: str
    concept: str
    model: str
    prompt_mode: str
    status: str
    metrics: dict[str, Any]
    role: str = ""
    group: str = ""
    label: int | None = None
    score: float | None = None
    presence: float | None = None
    slices: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    reference: str = ""
    prediction: str = ""
    image: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    def value(self, metric: str) -> float:
        """A metric as a float (worst-case already substituted for distances)."""
        return float(self.metrics[metric])

    def to_csv(self) -> dict[str, Any]:
        """The row as ``cases.csv`` cells (numbers rounded to 6 significant digits)."""
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "role": self.role,
            "group": self.group,
            "case": self.case,
            "concept": self.concept,
            "label": "" if self.label is None else self.label,
            "model": self.model,
            "prompt_mode": self.prompt_mode,
            "status": self.status,
            "note": self.note,
            "reference": self.reference,
            "prediction": self.prediction,
            "image": self.image,
            "score": _fmt(self.score),
            "presence": _fmt(self.presence),
        }
        m = self.metrics
        for key in (
            "dice",
            "iou",
            "nsd",
            "hd95",
            "assd",
            "hausdorff",
            "precision",
            "recall",
            "pred_volume",
            "ref_volume",
            "worst_case_distance",
            "nsd_tolerance",
        ):
            out[key] = _fmt(m[key])
        for key in ("pred_voxels", "ref_voxels", "volume_unit", "distance_unit"):
            out[key] = m[key]
        out["distances_worst_case"] = "true" if m["distances_worst_case"] else "false"
        for key in ("empty_slices", "fp_slices"):
            out[key] = self.slices.get(key, "")
        out["fp_pixel_rate"] = _fmt(self.slices.get("fp_pixel_rate"))
        return out


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return int(value)
    v = float(value)
    if math.isnan(v):
        return "nan"
    return float(f"{v:.6g}")


def score_masks(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float],
    *,
    spacing_known: bool = True,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, Any]:
    """Every metric of one binary prediction / reference pair, ready for a :class:`CaseRow`.

    Args:
        pred, ref: bool (or 0/1) masks of one shape, ``(Y, X)`` or ``(Z, Y, X)``.
        spacing: voxel size in array order (mm; 1 when unknown).
        spacing_known: False for pictures without a physical pixel size: distances and the NSD tolerance
            are then in pixels, volumes are pixel counts.
        nsd_tolerance: NSD tolerance in the distance unit.

    Returns:
        :func:`~medsam3.evaluate.metrics.compute_all` values with ``inf`` distances replaced by
        ``worst_case_distance`` (``distances_worst_case`` True), plus ``pred_volume`` / ``ref_volume`` and
        ``volume_unit``, ``distance_unit``, ``nsd_tolerance``.
    """
    raw = compute_all(pred, ref, spacing, nsd_tolerance_mm=nsd_tolerance)
    worst = float(raw["worst_case_mm"])
    capped = any(math.isinf(float(raw[k])) for k in DISTANCE_METRICS)
    out: dict[str, Any] = {k: float(raw[k]) for k in ("dice", "iou", "nsd", "precision", "recall")}
    for k in DISTANCE_METRICS:
        out[k] = worst if math.isinf(float(raw[k])) else float(raw[k])
    ndim = np.asarray(ref).ndim
    voxel = float(np.prod(np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))))
    if not spacing_known:
        unit, factor = "px", 1.0
    elif ndim == 3:
        unit, factor = "ml", voxel / 1000.0
    else:
        unit, factor = "mm2", voxel
    out.update(
        pred_voxels=int(raw["pred_voxels"]),
        ref_voxels=int(raw["ref_voxels"]),
        pred_volume=int(raw["pred_voxels"]) * factor,
        ref_volume=int(raw["ref_voxels"]) * factor,
        volume_unit=unit,
        distance_unit="mm" if spacing_known else "px",
        worst_case_distance=worst,
        distances_worst_case=capped,
        nsd_tolerance=float(raw["nsd_tolerance_mm"]),
    )
    return out


def failure_metrics(
    ref: np.ndarray,
    spacing: float | Sequence[float],
    *,
    spacing_known: bool = True,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, Any]:
    """Metrics of a missing or failed prediction: those of an empty prediction against ``ref``.

    When ``ref`` is empty too, an empty prediction would score as a correct "absent"; a prediction that
    does not exist has not said so, so the case is still scored as a failure (overlap scores and NSD 0,
    precision 0, distances worst-case).
    """
    ref = np.asarray(ref, dtype=bool)
    out = score_masks(
        np.zeros_like(ref), ref, spacing, spacing_known=spacing_known, nsd_tolerance=nsd_tolerance
    )
    if not ref.any():
        out.update(
            dice=0.0,
            iou=0.0,
            nsd=0.0,
            precision=0.0,
            recall=0.0,
            distances_worst_case=True,
            **{k: out["worst_case_distance"] for k in DISTANCE_METRICS},
        )
    return out


def empty_slice_stats(pred: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """False positives on the slices (axis 0) of a 3D pair where the reference is empty.

    Returns ``empty_slices``, ``fp_slices`` (empty-reference slices with any predicted voxel) and
    ``fp_pixel_rate`` (predicted voxels on those slices / their voxels; ``None`` without such slices).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if ref.ndim != 3:
        return {}
    empty = ~ref.reshape(ref.shape[0], -1).any(axis=1)
    n = int(empty.sum())
    if n == 0:
        return {"empty_slices": 0, "fp_slices": 0, "fp_pixel_rate": None}
    fp = pred[empty].reshape(n, -1)
    return {
        "empty_slices": n,
        "fp_slices": int(fp.any(axis=1).sum()),
        "fp_pixel_rate": float(fp.sum()) / float(fp.size),
    }


#: Columns of ``absent.csv`` (the absent-concept test), in order.
ABSENT_COLUMNS = (
    "dataset",
    "role",
    "group",
    "case",
    "model",
    "concept",
    "predicted",
    "predicted_pixels",
    "predicted_fraction",
    "score",
    "presence",
    "note",
)


@dataclass
class AbsentRow:
    """One prompt of the absent-concept test: a concept known NOT to be in the image.

    ``predicted_pixels`` counts the pixels (voxels) the model gave the concept; any is a false positive.
    """

    dataset: str
    case: str
    model: str
    concept: str
    predicted_pixels: int
    image_pixels: int
    role: str = ""
    group: str = ""
    score: float | None = None
    presence: float | None = None
    note: str = ""

    @property
    def predicted(self) -> bool:
        return self.predicted_pixels > 0

    def to_csv(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "role": self.role,
            "group": self.group,
            "case": self.case,
            "model": self.model,
            "concept": self.concept,
            "predicted": "true" if self.predicted else "false",
            "predicted_pixels": int(self.predicted_pixels),
            "predicted_fraction": _fmt(self.predicted_pixels / max(1, self.image_pixels)),
            "score": _fmt(self.score),
            "presence": _fmt(self.presence),
            "note": self.note,
        }
