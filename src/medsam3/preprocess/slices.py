"""2D slices of canonical volumes, 3-channel ``uint8`` model inputs, and stacking 2D masks back.

Volumes are canonical ``(Z, Y, X)`` arrays (see :mod:`medsam3.preprocess.orientation`): axis 0 indexes
axial slices ``(Y, X)``, axis 1 coronal slices ``(Z, X)``, axis 2 sagittal slices ``(Z, Y)``.

With ``display=True`` coronal and sagittal slices are mirrored vertically so that superior is at the top
(axial slices are already displayed anterior-up, patient's right on the left). :func:`stack_slices` with the
same ``axis`` and ``display`` is the exact inverse of :func:`iter_slices`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def _check_axis(volume: np.ndarray, axis: int) -> int:
    if volume.ndim < 3:
        raise ValueError(f"expected a volume (Z, Y, X[, C]), got an array of shape {volume.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    return axis


def take_slice(volume: np.ndarray, axis: int, index: int, *, display: bool = False) -> np.ndarray:
    """Slice ``index`` of ``volume`` along ``axis`` (a view): ``(Y, X)``, ``(Z, X)`` or ``(Z, Y)``.

    Trailing axes after the three spatial ones are kept. ``display=True`` puts superior at the top of
    coronal / sagittal slices.
    """
    volume = np.asarray(volume)
    axis = _check_axis(volume, axis)
    if not 0 <= index < volume.shape[axis]:
        raise IndexError(f"slice {index} out of range for axis {axis} of length {volume.shape[axis]}")
    sl = volume[(slice(None),) * axis + (index,)]
    if display and axis != 0:
        sl = sl[::-1]
    return sl


def iter_slices(volume: np.ndarray, axis: int = 0, *, display: bool = False) -> Iterator[np.ndarray]:
    """Yield every slice of ``volume`` along ``axis`` in index order (views, see :func:`take_slice`)."""
    volume = np.asarray(volume)
    for index in range(volume.shape[_check_axis(volume, axis)]):
        yield take_slice(volume, axis, index, display=display)


def stack_slices(slices: Iterable[np.ndarray], axis: int = 0, *, display: bool = False) -> np.ndarray:
    """Stack 2D slices (masks, say) back into a volume: the exact inverse of :func:`iter_slices`.

    ``slices`` are in index order and share one shape; ``axis`` and ``display`` must be the values the
    slices were taken with. Returns a new contiguous array.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    items = [np.asarray(s) for s in slices]
    if not items:
        raise ValueError("no slices to stack")
    if display and axis != 0:
        items = [s[::-1] for s in items]
    return np.ascontiguousarray(np.stack(items, axis=axis))


def slice_to_rgb(image: np.ndarray) -> np.ndarray:
    """A 2D slice as a 3-channel ``uint8`` image ``(H, W, 3)`` for the model.

    Accepts ``(H, W)`` float in ``[0, 1]`` (values outside are clipped; scaled by 255 and rounded) or
    ``uint8`` (used as is), repeated to three channels; or ``(H, W, 1/3/4)`` ``uint8`` or float ``[0, 1]``
    (a single channel is repeated, alpha is dropped).
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
    elif a.ndim != 2:
        raise ValueError(f"expected a 2D slice (H, W) or (H, W, 1/3/4), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "fb":
            raise ValueError(f"expected float values in [0, 1] or uint8, got dtype {a.dtype}")
        a = np.rint(np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a)
