"""medsam3: prompt-driven medical image segmentation with SAM3.

One call::

    import medsam3

    result = medsam3.segment("scan.nii.gz", "liver")
    result.write("out/")

or a model loaded once for many calls::

    seg = medsam3.Segmenter.from_pretrained("models/medical-sam3", device="cuda")
    result = seg.segment(image, ["liver", "spleen"], threshold=0.2)

The flow, one module per step::

    io         file on disk  -> Image (array + geometry + modality)
    preprocess Image         -> canonical slices, intensity windows, model-size RGB (and the exact inverse)
    model      checkpoints   -> transformers SAM3 (load, resolve, convert)
    predict    Image + prompts -> label map on the input grid
    io         label map     -> NIfTI / NRRD / DICOM SEG / PNG, overlays, JSON summary

Importing ``medsam3`` is light: the names that need torch (``Segmenter``, ``segment``, ...) are imported on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medsam3.errors import MedSam3Error
from medsam3.image import Image
from medsam3.lazy import lazy_attribute

if TYPE_CHECKING:
    from medsam3.api import segment
    from medsam3.io.readers import read_image
    from medsam3.predict.options import SegmentOptions, VolumeOptions
    from medsam3.predict.prompts import Prompt
    from medsam3.predict.segmenter import Segmenter
    from medsam3.predict.summary import LabelEntry, SegmentationResult
    from medsam3.predict.volume.prompts import VolumePrompt

__all__ = [
    "Image",
    "LabelEntry",
    "MedSam3Error",
    "Prompt",
    "SegmentOptions",
    "SegmentationResult",
    "Segmenter",
    "VolumeOptions",
    "VolumePrompt",
    "__version__",
    "read_image",
    "segment",
]
__version__ = "0.1.0"

_LAZY = {
    "segment": "medsam3.api",
    "read_image": "medsam3.io.readers",
    "Segmenter": "medsam3.predict.segmenter",
    "SegmentationResult": "medsam3.predict.summary",
    "LabelEntry": "medsam3.predict.summary",
    "Prompt": "medsam3.predict.prompts",
    "VolumePrompt": "medsam3.predict.volume.prompts",
    "SegmentOptions": "medsam3.predict.options",
    "VolumeOptions": "medsam3.predict.options",
}


def __getattr__(name: str) -> Any:
    value = lazy_attribute(__name__, _LAZY, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
