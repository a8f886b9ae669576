"""Surface distances between two binary masks, in millimetres.

Masks are numpy arrays in ARRAY order, ``(Y, X)`` for 2D or ``(Z, Y, X)`` for 3D, and ``spacing`` is the
voxel size in mm in the same array order, ``(sy, sx)`` / ``(sz, sy, sx)`` (for an
:class:`medsam3.image.Image` that is ``image.spacing_array_order``, the reverse of the ITK order).

Surface definition (identical to MONAI's ``get_mask_edges`` without sub-voxels):
the surface of a mask is the set of its voxels that binary erosion with the face-connected structuring
element removes, where everything outside the array counts as background. A mask voxel that touches the
array border is therefore a surface voxel. Distances are exact Euclidean distances between voxel centres,
scaled by ``spacing`` (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``), from each
surface voxel of one mask to the nearest surface voxel of the other.

Summaries follow MONAI: HD95 is the larger of the two DIRECTED 95th percentiles (not the percentile of
the pooled distances), ASSD the mean of the pooled distances of both surfaces, and NSD counts surface
voxels (each voxel is one surface element; the area-weighted surfels of DeepMind's ``surface-distance``
package give slightly different values).

All functions return plain floats; the policies for empty masks are those of
:mod:`medsam3.evaluate.metrics` (``inf`` when exactly one mask is empty, a perfect value when both are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medsam3.errors import InputError

#: Relative slack for "distance <= tolerance" so that a surface lying exactly at the tolerance (for
#: example one voxel away with tolerance = one voxel spacing) counts as within it despite rounding.
_TIE_RTOL = 1e-9


def as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """``mask`` as a bool array; accepts bool arrays and numeric arrays holding only 0 and 1."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.number)) or not np.all((arr == 0) | (arr == 1)):
        raise InputError(
            None,
            f"{name} must be a binary mask (bool, or numbers 0/1); got dtype {arr.dtype} and other values",
        )
    return arr.astype(bool)


def check_spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    """Spacing as a tuple of ``ndim`` positive finite floats (a single number means isotropic)."""
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.ndim != 1:
        raise InputError(None, f"spacing must be a number or a sequence of numbers, got {spacing!r}")
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise InputError(
            None,
            f"spacing {tuple(values.tolist())} has {values.size} values for a {ndim}D mask (array order)",
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(None, f"spacing {tuple(values.tolist())} must be positive and finite (mm)")
    return tuple(float(v) for v in values)


def check_pair(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Validate a prediction/reference pair: bool masks of one 2D or 3D shape, and a matching spacing."""
    p = as_mask(pred, "prediction")
    r = as_mask(ref, "reference")
    if p.shape != r.shape:
        raise InputError(None, f"prediction shape {p.shape} differs from reference shape {r.shape}")
    if p.ndim not in (2, 3):
        raise InputError(None, f"masks must be 2D (Y, X) or 3D (Z, Y, X); got shape {p.shape}")
    return p, r, check_spacing(spacing, p.ndim)


def worst_case_distance(shape: Sequence[int], spacing: float | Sequence[float]) -> float:
    """Diagonal of the image's physical extent, ``sqrt(sum((n_i * s_i)^2))`` in mm.

    Every surface distance between two masks on this grid is strictly smaller, so reports can put it in
    place of the ``inf`` that a distance metric returns when exactly one mask is empty, and such a
    failure then scores worse than any real pair of masks.
    """
    dims = tuple(int(n) for n in shape)
    if len(dims) not in (2, 3) or any(n < 1 for n in dims):
        raise InputError(None, f"shape {tuple(shape)} must have 2 or 3 positive sizes")
    sp = check_spacing(spacing, len(dims))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(dims, sp, strict=True))))


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a bool mask: the voxels removed by face-connected erosion (outside = background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_box(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``pred | ref`` (non-empty).

    Cropping to it changes no surface voxel (a voxel on the box boundary borders background either way)
    and no distance (every surface voxel lies inside), and keeps the distance transforms small.
    """
    coords = np.argwhere(pred | ref)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _distances_to(edges_from: np.ndarray, edges_to: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each voxel of ``edges_from`` to the nearest voxel of ``edges_to`` (non-empty)."""
    if not edges_from.any():
        return np.zeros(0, dtype=np.float64)
    field = ndimage.distance_transform_edt(~edges_to, sampling=spacing)
    return np.asarray(field[edges_from], dtype=np.float64)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred -> ref, ref -> pred)`` in mm, float64 1D arrays.

    One value per surface voxel of the source mask, in C order of the voxels. When the target mask is
    empty and the source is not, the source's distances are all ``inf``; an empty source gives an empty
    array (so two empty masks give two empty arrays).
    """
    p, r, sp = check_pair(pred, ref, spacing)
    if not (p.any() or r.any()):
        return np.zeros(0), np.zeros(0)
    box = _union_box(p, r)
    edges_p = mask_edges(p[box])
    edges_r = mask_edges(r[box])
    if not r.any():
        return np.full(int(edges_p.sum()), np.inf), np.zeros(0)
    if not p.any():
        return np.zeros(0), np.full(int(edges_r.sum()), np.inf)
    return _distances_to(edges_p, edges_r, sp), _distances_to(edges_r, edges_p, sp)


# -- summaries of the directed distances (shared by the public metrics and compute_all) --------------


def percentile_hausdorff_from(d_pr: np.ndarray, d_rp: np.ndarray, percentile: float | None) -> float:
    """``max(q(d_pr), q(d_rp))`` with ``q`` the linear-interpolated percentile (``None``: the maximum)."""
    if d_pr.size == 0 and d_rp.size == 0:
        return 0.0
    if d_pr.size == 0 or d_rp.size == 0 or np.isinf(d_pr).any() or np.isinf(d_rp).any():
        return math.inf
    if percentile is None:
        return float(max(d_pr.max(), d_rp.max()))
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def assd_from(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    """Mean over all surface voxels of both masks of their distance to the other surface."""
    if d_pr.size == 0 and d_rp.size == 0:
        return 0.0
    if d_pr.size == 0 or d_rp.size == 0:
        return math.inf
    return float(np.concatenate([d_pr, d_rp]).mean())


def nsd_from(d_pr: np.ndarray, d_rp: np.ndarray, tolerance_mm: float) -> float:
    """Fraction of the surface voxels of both masks that lie within ``tolerance_mm`` of the other surface."""
    total = d_pr.size + d_rp.size
    if d_pr.size == 0 and d_rp.size == 0:
        return 1.0
    limit = tolerance_mm * (1.0 + _TIE_RTOL)
    return float((np.count_nonzero(d_pr <= limit) + np.count_nonzero(d_rp <= limit)) / total)


def check_tolerance(tolerance_mm: float) -> float:
    """The NSD tolerance as a finite, non-negative float (mm)."""
    tol = float(tolerance_mm)
    if not math.isfinite(tol) or tol < 0:
        raise InputError(None, f"NSD tolerance {tolerance_mm!r} mm must be finite and >= 0")
    return tol


def check_percentile(percentile: float) -> float:
    """A percentile in [0, 100]."""
    q = float(percentile)
    if not 0.0 <= q <= 100.0:
        raise InputError(None, f"percentile {percentile!r} must be between 0 and 100")
    return q


# -- public surface metrics ---------------------------------------------------------------------------


def percentile_hausdorff(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float], percentile: float = 95.0
) -> float:
    """Symmetric percentile Hausdorff distance (mm): the larger of the two directed percentiles."""
    q = check_percentile(percentile)
    return percentile_hausdorff_from(*surface_distances(pred, ref, spacing), q)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's ``percentile=95`` definition).

    ``max(P95(pred -> ref), P95(ref -> pred))`` over surface voxels, with linear interpolation between
    order statistics. Both masks empty: 0; exactly one empty: ``inf``.
    """
    return percentile_hausdorff_from(*surface_distances(pred, ref, spacing), 95.0)


def hausdorff(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]) -> float:
    """Symmetric (maximum) Hausdorff distance between the two surfaces in mm; empty cases as :func:`hd95`."""
    return percentile_hausdorff_from(*surface_distances(pred, ref, spacing), None)


def assd(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]) -> float:
    """Average symmetric surface distance in mm (MONAI's symmetric average surface distance).

    The mean over the surface voxels of BOTH masks of each one's distance to the other surface (a mean of
    the pooled distances, not the mean of the two directed means). Both empty: 0; exactly one empty: ``inf``.
    """
    return assd_from(*surface_distances(pred, ref, spacing))


def normalized_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice (Nikolov et al.) at ``tolerance_mm``, in [0, 1].

    ``(|{d in D_pr : d <= tau}| + |{d in D_rp : d <= tau}|) / (|D_pr| + |D_rp|)`` where ``D_pr`` holds the
    distances of the prediction's surface voxels to the reference surface and ``D_rp`` the reverse; each
    surface voxel is one surface element (MONAI ``compute_surface_dice`` with ``use_subvoxels=False``).
    Both empty: 1; exactly one empty: 0.
    """
    tol = check_tolerance(tolerance_mm)
    return nsd_from(*surface_distances(pred, ref, spacing), tol)
