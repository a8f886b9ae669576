"""medsam3: prompt-driven medical image segmentation with SAM3.

The flow, one module per step::

    io         file on disk  -> Image (array + geometry + modality)
    preprocess Image         -> canonical slices, intensity windows, model-size RGB (and the exact inverse)
    model      checkpoints   -> transformers SAM3 (load, resolve, convert)
    predict    Image + prompts -> label map on the input grid
    io         label map     -> NIfTI / NRRD / DICOM SEG / PNG, overlays, JSON summary
"""

from medsam3.errors import MedSam3Error
from medsam3.image import Image

__all__ = ["Image", "MedSam3Error", "__version__"]
__version__ = "0.1.0"
