"""Reorient volumes to one canonical frame by axis permutation and flips only, and back, exactly.

Canonical frame
---------------
After :func:`to_canonical` the ITK axes ``(x, y, z)`` point (as closely as the acquisition allows) towards
patient **L**\\ eft, **P**\\ osterior and **S**\\ uperior: the direction matrix is the identity for an
axis-aligned scan. In array order ``(Z, Y, X)`` this means:

* axis 0 runs inferior -> superior, so ``array[k]`` is an axial slice;
* axis 1 runs anterior -> posterior, so an axial slice shows anterior at the **top**;
* axis 2 runs right -> left, so the patient's right is on the image's **left** (radiological convention).

Nothing is resampled: voxels are only transposed and mirrored, so the operation is exactly invertible on
arrays and geometry. For an oblique scan each ITK axis is matched to the physical axis it is closest to (the
assignment that maximises the total alignment) and the remaining rotation stays in the direction matrix.

Orientation codes (:func:`orientation_code`) name, for each ITK axis ``x, y, z``, the anatomical direction
the axis points **towards** (as nibabel's ``aff2axcodes`` does in its RAS world): ``"LPS"`` is the canonical
frame, a typical NIfTI stored in RAS order reads ``"RAS"``.

2D images are returned unchanged (an identity :class:`Reorientation`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from medsam3.image import Image

#: Letters for the positive / negative direction of the LPS physical axes x, y, z.
_POSITIVE = ("L", "P", "S")
_NEGATIVE = ("R", "A", "I")

#: Names of the canonical array axes ``(Z, Y, X)`` as anatomical planes of the slices they index.
PLANE_OF_AXIS = ("axial", "coronal", "sagittal")


def orientation_code(direction: np.ndarray) -> str:
    """Three letters naming where ITK axes x, y, z point (nearest anatomical direction), e.g. ``"RAS"``.

    ``direction`` is a ``(3, 3)`` (or ``(2, 2)``) ITK direction matrix in LPS, columns are the axes. Each
    column takes the letter of its largest component (ties: first physical axis).
    """
    d = np.asarray(direction, dtype=np.float64)
    letters = []
    for col in d.T:
        p = int(np.argmax(np.abs(col)))
        letters.append(_POSITIVE[p] if col[p] > 0 else _NEGATIVE[p])
    return "".join(letters)


def _closest_assignment(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For each ITK axis ``i``: the physical axis ``phys[i]`` it is closest to and the sign of that match.

    The assignment maximises ``sum_i |direction[phys[i], i]|`` over all permutations, so every physical
    axis is used exactly once even for strongly oblique scans.
    """
    n = direction.shape[0]
    best = max(
        itertools.permutations(range(n)),
        key=lambda phys: sum(abs(direction[phys[i], i]) for i in range(n)),
    )
    signs = tuple(1 if direction[best[i], i] >= 0 else -1 for i in range(n))
    return tuple(best), signs


@dataclass(frozen=True)
class Reorientation:
    """How an image was reoriented to the canonical frame, and the geometry it had before.

    Attributes:
        source_axes: for each canonical **array** axis ``a``, the original array axis it came from
            (``canonical = original.transpose(source_axes)``, then flipped).
        flipped: canonical array axes that were mirrored after the transpose.
        original_shape: spatial array shape before reorientation, ``(Z, Y, X)`` or ``(Y, X)``.
        original_spacing, original_origin, original_direction: the original ITK geometry, restored
            verbatim by :meth:`invert_image`.
        canonical_spacing, canonical_origin, canonical_direction: the geometry after reorientation.
    """

    source_axes: tuple[int, ...]
    flipped: tuple[int, ...]
    original_shape: tuple[int, ...]
    original_spacing: tuple[float, ...]
    original_origin: tuple[float, ...]
    original_direction: np.ndarray
    canonical_spacing: tuple[float, ...]
    canonical_origin: tuple[float, ...]
    canonical_direction: np.ndarray

    # -- description ---------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.original_shape)

    @property
    def is_identity(self) -> bool:
        """True when nothing was permuted or flipped."""
        return self.source_axes == tuple(range(self.ndim)) and not self.flipped

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """Spatial array shape after reorientation."""
        return tuple(self.original_shape[a] for a in self.source_axes)

    @property
    def through_plane_axis(self) -> int | None:
        """Canonical array axis that was the acquisition's slice axis (original array axis 0, ITK ``k``).

        ``None`` for 2D images.
        """
        if self.ndim != 3:
            return None
        return self.source_axes.index(0)

    @property
    def original_code(self) -> str:
        """Orientation code of the original image, e.g. ``"RAS"``."""
        return orientation_code(self.original_direction)

    @property
    def canonical_code(self) -> str:
        """Orientation code after reorientation (``"LPS"`` for 3D volumes)."""
        return orientation_code(self.canonical_direction)

    def describe(self) -> str:
        """One line for logs, e.g. ``"RAS -> LPS (flipped y, x; acquired slices along axis 0, axial)"``."""
        if self.ndim != 3:
            return "2D image (orientation unchanged)"
        names = "ZYX"
        parts = []
        if self.source_axes != (0, 1, 2):
            order = "".join(names[a] for a in self.source_axes)
            parts.append(f"array axes (Z, Y, X) <- original ({', '.join(order)})")
        if self.flipped:
            parts.append("flipped " + ", ".join(names[a].lower() for a in self.flipped))
        if not parts:
            parts.append("no change")
        tp = self.source_axes.index(0)  # the through-plane axis of this 3D plan
        parts.append(f"acquired slices along axis {tp}, {PLANE_OF_AXIS[tp]}")
        return f"{self.original_code} -> {self.canonical_code} ({'; '.join(parts)})"

    # -- arrays --------------------------------------------------------------------------------------
    def _check(self, array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        array = np.asarray(array)
        if tuple(array.shape[: self.ndim]) != tuple(shape):
            raise ValueError(f"array of shape {array.shape} does not start with the {what} shape {shape}")
        return array

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Reorient an array on the original grid (a label map, say) to the canonical grid.

        ``array`` has the original spatial shape, optionally followed by trailing axes (channels), which
        are kept. Returns a contiguous copy; the dtype is unchanged.
        """
        array = self._check(array, self.original_shape, "original")
        extra = tuple(range(self.ndim, array.ndim))
        out = np.transpose(array, self.source_axes + extra)
        if self.flipped:
            out = np.flip(out, axis=self.flipped)
        return np.ascontiguousarray(out)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Map an array on the canonical grid (a predicted mask, say) back to the original grid, exactly.

        ``array`` has the canonical spatial shape, optionally followed by trailing axes, which are kept.
        """
        array = self._check(array, self.canonical_shape, "canonical")
        if self.flipped:
            array = np.flip(array, axis=self.flipped)
        inverse = tuple(int(i) for i in np.argsort(self.source_axes))
        extra = tuple(range(self.ndim, array.ndim))
        return np.ascontiguousarray(np.transpose(array, inverse + extra))

    # -- images --------------------------------------------------------------------------------------
    def apply_image(self, image: Image) -> Image:
        """An image on the original grid (same geometry as the reoriented one) moved to the canonical grid."""
        return image.with_array(
            self.apply(image.array),
            spacing=self.canonical_spacing,
            origin=self.canonical_origin,
            direction=self.canonical_direction.copy(),
        )

    def invert_image(self, image: Image) -> Image:
        """An image on the canonical grid returned to the original grid and geometry (bit-exact)."""
        return image.with_array(
            self.invert(image.array),
            spacing=self.original_spacing,
            origin=self.original_origin,
            direction=self.original_direction.copy(),
        )


def _identity(image: Image) -> Reorientation:
    shape = image.spatial_shape
    return Reorientation(
        source_axes=tuple(range(len(shape))),
        flipped=(),
        original_shape=shape,
        original_spacing=image.spacing,
        original_origin=image.origin,
        original_direction=image.direction.copy(),
        canonical_spacing=image.spacing,
        canonical_origin=image.origin,
        canonical_direction=image.direction.copy(),
    )


def plan_reorientation(image: Image) -> Reorientation:
    """Work out the permutation and flips that bring ``image`` to the canonical frame, without moving data."""
    if image.ndim != 3:
        return _identity(image)
    direction = image.direction
    phys, signs = _closest_assignment(direction)
    # ITK axis i becomes canonical ITK axis phys[i]; array axis of ITK axis i is 2 - i.
    new_direction = np.zeros_like(direction)
    new_spacing = [0.0, 0.0, 0.0]
    origin = np.asarray(image.origin, dtype=np.float64)
    size_itk = tuple(reversed(image.spatial_shape))
    for i in range(3):
        p = phys[i]
        new_direction[:, p] = signs[i] * direction[:, i]
        new_spacing[p] = image.spacing[i]
        if signs[i] < 0:  # the last voxel along this axis becomes the first
            origin = origin + direction[:, i] * image.spacing[i] * (size_itk[i] - 1)
    source_axes = tuple(2 - phys.index(2 - a) for a in range(3))
    flipped = tuple(sorted(2 - phys[i] for i in range(3) if signs[i] < 0))
    return Reorientation(
        source_axes=source_axes,
        flipped=flipped,
        original_shape=image.spatial_shape,
        original_spacing=image.spacing,
        original_origin=image.origin,
        original_direction=image.direction.copy(),
        canonical_spacing=tuple(new_spacing),
        canonical_origin=tuple(float(o) for o in origin),
        canonical_direction=new_direction,
    )


def to_canonical(image: Image) -> tuple[Image, Reorientation]:
    """Reorient a 3D image to the canonical LPS frame (module docstring); 2D images pass unchanged.

    Returns the reoriented image (a new array; ``meta`` copied, ``modality`` kept) and the
    :class:`Reorientation` that undoes it (:meth:`Reorientation.invert_image`, :meth:`Reorientation.invert`).
    """
    reo = plan_reorientation(image)
    return reo.apply_image(image), reo
