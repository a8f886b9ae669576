"""Geometry helpers shared by the readers: affines in array order, and placing a label map on a grid.

Frames follow :mod:`medsam3.image`: ITK axis order ``(x, y[, z])`` for ``spacing``/``origin``/``direction``,
LPS millimetres, array axes reversed ``(Z, Y, X)``.

:func:`place_on_grid` moves a label map onto a reference grid **without resampling**: it succeeds when
every label voxel centre coincides with a reference voxel centre, which covers identical grids, sub-grids
(a cropped label map, a DICOM SEG holding only some slices) and grids that differ by axis flips or
permutations (a NIfTI written in RAS order for a DICOM series stored in LPS order). Anything else (other
spacing, rotation, half-voxel shift) is refused with an :class:`~medsam3.errors.InputError` that lists both
geometries, because interpolating a reference label map would silently change the ground truth.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from medsam3.errors import InputError
from medsam3.image import Image


def array_affine(image: Image) -> np.ndarray:
    """``(D+1, D+1)`` matrix mapping **array-order** indices ``(k, j, i, 1)`` to LPS millimetres."""
    itk = image.affine()
    d = image.ndim
    out = itk.copy()
    out[:d, :d] = itk[:d, :d][:, ::-1]
    return out


def describe_geometry(image: Image) -> str:
    """One line with shape, spacing, origin and direction, for error messages."""
    return (
        f"shape {tuple(image.spatial_shape)}, spacing {tuple(round(s, 6) for s in image.spacing)}, "
        f"origin {tuple(round(o, 4) for o in image.origin)}, "
        f"direction {np.round(image.direction, 4).tolist()}"
    )


def _signed_permutation(m: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``(perm, sign)`` when ``m`` is a signed permutation matrix to ``tol``: ``m[r, perm[r]] = sign[r]``."""
    d = m.shape[0]
    perm = np.argmax(np.abs(m), axis=1)
    if len(set(perm.tolist())) != d:
        return None
    sign = np.sign(m[np.arange(d), perm])
    expected = np.zeros_like(m)
    expected[np.arange(d), perm] = sign
    if not np.allclose(m, expected, atol=tol):
        return None
    return perm, sign


def place_on_grid(
    labels: Image, reference: Image, *, path: str | Path | None = None, tol: float = 1e-3
) -> np.ndarray:
    """Return ``labels.array`` rearranged onto ``reference``'s grid (array order, zeros outside).

    Raises :class:`InputError` (naming ``path``) when the grids are not related by an exact axis
    permutation / flip and an integer voxel offset (``tol`` in voxels), or when labelled voxels would
    fall outside the reference.
    """
    if labels.ndim != reference.ndim:
        raise InputError(
            path, f"is {labels.ndim}D but the reference image is {reference.ndim}D; cannot place it"
        )
    if labels.same_geometry(reference):
        return labels.array
    d = labels.ndim
    # index (array order) in labels -> index (array order) in reference
    m = np.linalg.solve(array_affine(reference), array_affine(labels))
    found = _signed_permutation(m[:d, :d], tol)
    offset = m[:d, d]
    if found is None or not np.allclose(offset, np.round(offset), atol=tol):
        raise InputError(
            path,
            "its grid does not match the reference image voxel for voxel (no resampling is done):\n"
            f"  labels:    {describe_geometry(labels)}\n  reference: {describe_geometry(reference)}",
        )
    perm, sign = found
    offset = np.round(offset).astype(int)
    src = labels.array
    # reference axis r takes labels axis perm[r], flipped when sign[r] < 0
    moved = np.transpose(src, axes=tuple(int(p) for p in perm))
    flips = tuple(r for r in range(d) if sign[r] < 0)
    if flips:
        moved = np.flip(moved, axis=flips)
    # start of the moved block in reference indices
    starts = []
    for r in range(d):
        n = src.shape[perm[r]]
        starts.append(int(offset[r]) if sign[r] > 0 else int(offset[r]) - (n - 1))
    out = np.zeros(reference.spatial_shape, dtype=src.dtype)
    dst_sl, src_sl = [], []
    for r in range(d):
        lo, hi = starts[r], starts[r] + moved.shape[r]
        clo, chi = max(lo, 0), min(hi, reference.spatial_shape[r])
        if chi <= clo:
            dst_sl.append(slice(0, 0))
            src_sl.append(slice(0, 0))
        else:
            dst_sl.append(slice(clo, chi))
            src_sl.append(slice(clo - lo, chi - lo))
    kept = moved[tuple(src_sl)]
    lost = int(np.count_nonzero(moved)) - int(np.count_nonzero(kept))
    if lost:
        raise InputError(
            path,
            f"{lost} labelled voxels lie outside the reference image grid:\n"
            f"  labels:    {describe_geometry(labels)}\n  reference: {describe_geometry(reference)}",
        )
    out[tuple(dst_sl)] = kept
    return out


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to unit length (``v`` must not be zero)."""
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def slice_normal(row_cosine: np.ndarray, col_cosine: np.ndarray) -> np.ndarray:
    """Unit normal ``row x col`` of a DICOM image plane (the ITK z axis of a stack of such slices)."""
    return unit(np.cross(row_cosine, col_cosine))


def on_grid(image: Image, array: np.ndarray, meta: dict) -> Image:
    """A new image on ``image``'s grid (spacing, origin, direction, modality) with ``array`` and ``meta``."""
    return replace(image, array=array, meta=dict(meta))
