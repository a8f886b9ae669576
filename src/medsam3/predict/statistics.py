"""Statistics of each label of a result, in the input's units.

For a label value on the label map (the input's grid) and the input image:

* ``intensity``: ``mean``, ``median``, ``std``, ``min``, ``max`` of the input's values under the label, in
  the input's units (Hounsfield units for CT, after the DICOM rescale); ``None`` for colour pictures;
* ``extent``: the label's bounding-box size along x, y (and z), in mm when the spacing is known, else in
  pixels (``extent_unit`` says which);
* ``touches_border``: the label reaches the edge of the image (first or last row, column or slice): the
  structure may continue outside, and its area / volume is then a lower bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsam3.image import Image


def label_statistics(label_map: np.ndarray, value: int, image: Image) -> dict[str, Any] | None:
    """The statistics of ``value`` (module docstring); ``None`` when no pixel carries it.

    Args:
        label_map: ``(Z, Y, X)`` or ``(Y, X)`` labels on ``image``'s grid.
        value: the label value.
        image: the input (array in array order; spacing in ITK order).
    """
    mask = label_map == value
    if not mask.any():
        return None
    intensity = None
    if not image.is_color:
        values = np.asarray(image.array)[mask].astype(np.float64)
        intensity = {
            "mean": round(float(values.mean()), 4),
            "median": round(float(np.median(values)), 4),
            "std": round(float(values.std()), 4),
            "min": round(float(values.min()), 4),
            "max": round(float(values.max()), 4),
        }
    lo, hi, border = [], [], False
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
        border |= idx[0] == 0 or idx[-1] == mask.shape[axis] - 1
    known = image.meta.get("spacing_known", True) is not False
    spacing = image.spacing_array_order if known else (1.0,) * mask.ndim
    extent_array_order = [(h - low) * float(s) for low, h, s in zip(lo, hi, spacing, strict=True)]
    return {
        "intensity": intensity,
        "extent": [round(v, 4) for v in reversed(extent_array_order)],  # x, y(, z)
        "extent_unit": "mm" if known else "px",
        "touches_border": bool(border),
    }
