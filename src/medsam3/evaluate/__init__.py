"""Evaluation of predicted masks against reference masks.

:mod:`medsam3.evaluate.metrics` holds the overlap metrics, the per-case summary, per-label scoring of
label maps and the bootstrap confidence interval; :mod:`medsam3.evaluate.surface` the spacing-aware
surface distances (HD95, Hausdorff, ASSD, NSD). Masks are in array order ``(Y, X)`` / ``(Z, Y, X)`` with
spacing in mm in the same order. The empty-mask policy is documented in :mod:`medsam3.evaluate.metrics`.
"""

from medsam3.evaluate.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    bootstrap_ci,
    compute_all,
    dice,
    iou,
    per_label_metrics,
    precision,
    recall,
)
from medsam3.evaluate.surface import (
    assd,
    hausdorff,
    hd95,
    mask_edges,
    normalized_surface_dice,
    percentile_hausdorff,
    surface_distances,
    worst_case_distance,
)

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "assd",
    "bootstrap_ci",
    "compute_all",
    "dice",
    "hausdorff",
    "hd95",
    "iou",
    "mask_edges",
    "normalized_surface_dice",
    "per_label_metrics",
    "percentile_hausdorff",
    "precision",
    "recall",
    "surface_distances",
    "worst_case_distance",
]
