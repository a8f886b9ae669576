"""The one image type every reader returns and every writer takes.

Frames and conventions (used throughout the package)
----------------------------------------------------
* Geometry follows SimpleITK / ITK exactly, in the LPS physical frame (millimetres):

  - ``spacing``   : per-axis voxel size in **ITK axis order** ``(x, y[, z])``.
  - ``origin``    : physical position of the centre of voxel ``[0, 0(, 0)]``, ``(x, y[, z])``.
  - ``direction`` : ``(D, D)`` matrix whose **column** ``i`` is the unit vector of ITK axis ``i``.

* ``array`` axes are the **reverse** of the ITK order (as ``SimpleITK.GetArrayFromImage``):

  - 3D volume : ``(Z, Y, X)``; voxel ``array[k, j, i]`` is at ``origin + direction @ (spacing * (i, j, k))``.
  - 2D image  : ``(Y, X)`` grayscale, or ``(Y, X, C)`` with ``C`` in {3, 4} channels (RGB / RGBA).

* Boxes are ``(x1, y1, x2, y2)`` in pixel units of a 2D slice ``(Y, X)``; normalised ``cxcywh`` appears only
  at the model boundary.
* ``modality`` is one of :data:`MODALITIES`. It is guessed by the readers and can always be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: Modality codes. DICOM codes where one exists; ``RGB`` is any 8-bit colour photograph (endoscopy,
#: dermoscopy, fundus, pathology); ``MICROSCOPY`` is fluorescence / EM at 8 or 16 bit; ``OTHER`` unknown.
MODALITIES = ("CT", "MR", "PT", "US", "XR", "RGB", "MICROSCOPY", "OTHER")


@dataclass
class Image:
    """An image or volume with its geometry.

    Attributes:
        array: pixel data, ``(Z, Y, X)`` for volumes, ``(Y, X)`` or ``(Y, X, C)`` for 2D images; the
            dtype of the file (after DICOM rescale slope/intercept, which may make it float).
        spacing: voxel size in mm, ITK order ``(x, y[, z])``.
        origin: physical position of the first voxel's centre, ITK order, LPS mm.
        direction: ``(D, D)`` direction cosines, column ``i`` is ITK axis ``i``.
        modality: one of :data:`MODALITIES`.
        meta: source metadata: at least ``path`` and ``format``; DICOM readers add ``series_uid``,
            ``sop_instance_uids`` (in slice order) and ``files``; npz readers add ``text_prompts``.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    modality: str = "OTHER"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        d = len(self.spacing)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(d, d)
        colour = d == 2 and self.array.ndim == 3 and self.array.shape[-1] in (3, 4)
        if d not in (2, 3) or len(self.origin) != d or (self.array.ndim != d and not colour):
            raise ValueError(
                f"geometry has {d} spacing / {len(self.origin)} origin values "
                f"for an array of shape {self.array.shape}"
            )
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3), given by the geometry."""
        return len(self.spacing)

    @property
    def is_color(self) -> bool:
        """True for 2D images with a trailing channel axis (RGB / RGBA)."""
        return self.array.ndim == self.ndim + 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Array shape without the channel axis, ``(Z, Y, X)`` or ``(Y, X)``."""
        return tuple(self.array.shape[: self.ndim])

    @property
    def spacing_array_order(self) -> tuple[float, ...]:
        """Spacing in array axis order: ``(sz, sy, sx)`` or ``(sy, sx)``."""
        return tuple(reversed(self.spacing))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (3D); for 2D images the pixel area in mm² / 1000."""
        return float(np.prod(self.spacing)) / 1000.0

    # -- geometry ------------------------------------------------------------------------------------
    def affine(self) -> np.ndarray:
        """``(D+1, D+1)`` matrix mapping ITK-order voxel indices ``(i, j[, k], 1)`` to LPS millimetres."""
        d = self.ndim
        out = np.eye(d + 1)
        out[:d, :d] = self.direction @ np.diag(self.spacing)
        out[:d, d] = self.origin
        return out

    def same_geometry(self, other: Image, atol: float = 1e-4) -> bool:
        """True when both images share spatial shape, spacing, origin and direction (to ``atol``)."""
        return (
            self.spatial_shape == other.spatial_shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def with_array(self, array: np.ndarray, **changes: Any) -> Image:
        """A new image on the same grid with other pixel data (a label map, say)."""
        changes.setdefault("meta", dict(self.meta))
        return replace(self, array=array, **changes)

    @classmethod
    def from_array(
        cls, array: np.ndarray, spacing=None, modality: str = "OTHER", color: bool = False, **meta: Any
    ) -> Image:
        """An image with identity direction, zero origin and the given (default 1 mm) spacing.

        ``color=True`` marks a trailing channel axis on a 2D array ``(Y, X, C)``.
        """
        array = np.asarray(array)
        nd = array.ndim - 1 if color else array.ndim
        spacing = tuple(spacing) if spacing is not None else (1.0,) * nd
        return cls(array, spacing, (0.0,) * nd, np.eye(nd), modality, dict(meta))
