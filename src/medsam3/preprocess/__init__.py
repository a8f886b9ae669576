"""From a read :class:`~medsam3.image.Image` to model inputs, and every step back.

The flow, each step invertible where geometry matters:

1. :mod:`~medsam3.preprocess.orientation`: reorient a volume to the canonical LPS frame by permutation and
   flips only (:func:`to_canonical`), returning a :class:`Reorientation` that maps masks back exactly.
2. :mod:`~medsam3.preprocess.intensity`: modality-aware mapping to float32 ``[0, 1]`` (CT windows, MR / PET
   / microscopy percentiles over the whole volume, 8-bit data unchanged) with the parameters reported.
3. :mod:`~medsam3.preprocess.slices`: 2D slices along an axis, stacked back exactly; 3-channel ``uint8``.
4. :mod:`~medsam3.preprocess.resize`: square resize to the model size (:class:`ResizeTransform`) and the
   inverse for masks, logits, boxes and points.
"""

from medsam3.preprocess.intensity import (
    CT_WINDOWS,
    IntensityParams,
    apply_intensity,
    intensity_parameters,
    normalize_intensity,
    window_for_concept,
)
from medsam3.preprocess.orientation import Reorientation, orientation_code, to_canonical
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import iter_slices, slice_to_rgb, stack_slices, take_slice

__all__ = [
    "CT_WINDOWS",
    "IntensityParams",
    "Reorientation",
    "ResizeTransform",
    "apply_intensity",
    "intensity_parameters",
    "iter_slices",
    "normalize_intensity",
    "orientation_code",
    "slice_to_rgb",
    "stack_slices",
    "take_slice",
    "to_canonical",
    "window_for_concept",
]
