"""Square resize to the model's input size and its exact inverse for masks, boxes and points.

SAM3 takes a ``size x size`` image (1008 for the released model) made by resizing the whole image without
padding, so each axis has its own scale: ``sx = size / W``, ``sy = size / H``.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)`` and its centre is at
``i + 0.5``. A box or point maps by pure scaling (``x' = x * sx``), which is exact to float precision both
ways. Resampling of pixel grids uses the same pixel-centre alignment: output pixel ``d`` samples the input
at ``(d + 0.5) * n_in / n_out - 0.5`` (bilinear), or takes input pixel ``floor((d + 0.5) * n_in / n_out)``
(nearest, computed in integers). With nearest resampling, enlarging a label map and shrinking it back
returns it unchanged whenever ``n_in <= n_out`` on both axes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Input index sampled by each of ``n_out`` output pixels, pixel-centre aligned, exact integers."""
    d = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * d + 1) * n_in) // (2 * n_out), n_in - 1)


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resize_nearest(array: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes ``(H, W, ...)`` to ``out_hw``; dtype kept."""
    a = np.asarray(array)
    rows = nearest_indices(a.shape[0], int(out_hw[0]))
    cols = nearest_indices(a.shape[1], int(out_hw[1]))
    return np.ascontiguousarray(a[rows][:, cols])


def resize_bilinear(array: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (no antialiasing) of the first two axes ``(H, W, ...)`` to ``out_hw``; float32."""
    a = np.asarray(array, dtype=np.float32)
    r0, r1, wr = _bilinear_weights(a.shape[0], int(out_hw[0]))
    c0, c1, wc = _bilinear_weights(a.shape[1], int(out_hw[1]))
    extra = (1,) * (a.ndim - 2)
    wr = wr.reshape((-1, 1) + extra)
    wc = wc.reshape((1, -1) + extra)
    top = a[r0] * (1 - wr) + a[r1] * wr
    return np.ascontiguousarray(top[:, c0] * (1 - wc) + top[:, c1] * wc, dtype=np.float32)


def resize_rgb(rgb: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize a ``uint8`` image ``(H, W[, C])`` bilinearly (antialiased when shrinking, as Pillow does)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {rgb.dtype}")
    h, w = int(out_hw[0]), int(out_hw[1])
    if rgb.shape[:2] == (h, w):
        return rgb.copy()
    return np.asarray(PILImage.fromarray(rgb).resize((w, h), PILImage.Resampling.BILINEAR))


class ResizeTransform:
    """The square resize between an original 2D grid ``(H, W)`` and the model grid ``(size, size)``.

    Args:
        orig_hw: original height and width in pixels.
        size: model input side in pixels (1008 for the released SAM3).
    """

    def __init__(self, orig_hw: tuple[int, int], size: int):
        h, w = (int(v) for v in orig_hw)
        if h < 1 or w < 1 or int(size) < 1:
            raise ValueError(f"sizes must be positive, got orig_hw={orig_hw}, size={size}")
        self.orig_hw = (h, w)
        self.size = int(size)
        #: model pixels per original pixel along x and y.
        self.scale_xy = (self.size / w, self.size / h)

    def __repr__(self) -> str:
        return f"ResizeTransform(orig_hw={self.orig_hw}, size={self.size})"

    # -- pixels --------------------------------------------------------------------------------------
    def image(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8`` ``(H, W, 3)`` on the original grid -> ``uint8`` ``(size, size, 3)``."""
        rgb = np.asarray(rgb)
        if rgb.shape[:2] != self.orig_hw or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape {self.orig_hw + (3,)}, got {rgb.shape}")
        return resize_rgb(rgb, (self.size, self.size))

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """A label map or binary mask ``(H, W)`` on the original grid -> ``(size, size)``, nearest."""
        mask = np.asarray(mask)
        if mask.shape[:2] != self.orig_hw:
            raise ValueError(f"expected a mask of shape {self.orig_hw}, got {mask.shape}")
        return resize_nearest(mask, (self.size, self.size))

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """A mask or logits ``(h, w)`` or ``(N, h, w)`` at any resolution of the model grid -> ``(…, H, W)``.

        Float input (logits, probabilities) is resized bilinearly and returned as float32 for the caller to
        threshold; bool / integer input (binary or label masks) by nearest neighbour, dtype kept.
        """
        m = np.asarray(mask)
        if m.ndim not in (2, 3):
            raise ValueError(f"expected a mask (h, w) or (N, h, w), got shape {m.shape}")
        batched = m.ndim == 3
        if batched:
            m = np.moveaxis(m, 0, -1)
        if m.dtype.kind == "f":
            out = resize_bilinear(m, self.orig_hw)
        else:
            out = resize_nearest(m, self.orig_hw)
        return np.ascontiguousarray(np.moveaxis(out, -1, 0)) if batched else out

    # -- coordinates ---------------------------------------------------------------------------------
    def _scale(self, coords: np.ndarray, n: int, inverse: bool) -> np.ndarray:
        c = np.asarray(coords, dtype=np.float64)
        if c.shape[-1] != n:
            raise ValueError(f"expected coordinates with last axis {n}, got shape {c.shape}")
        sx, sy = self.scale_xy
        factors = np.array([sx, sy] * (n // 2))
        return c / factors if inverse else c * factors

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes ``(..., 4)`` ``x1, y1, x2, y2`` in original pixels -> model pixels (float64)."""
        return self._scale(boxes, 4, inverse=False)

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes ``(..., 4)`` in model pixels -> original pixels; inverse of :meth:`boxes_to_model`."""
        return self._scale(boxes, 4, inverse=True)

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """Points ``(..., 2)`` ``x, y`` in original pixels -> model pixels (float64)."""
        return self._scale(points, 2, inverse=False)

    def points_to_original(self, points: np.ndarray) -> np.ndarray:
        """Points ``(..., 2)`` in model pixels -> original pixels; inverse of :meth:`points_to_model`."""
        return self._scale(points, 2, inverse=True)
