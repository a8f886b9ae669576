"""Prediction: an image and prompts in, a label map on the input grid out.

Modules, in the order of the flow:

* :mod:`~medsam3.predict.options`: every inference option declared once (:class:`SegmentOptions`,
  :class:`VolumeOptions`) with the rules between them; the CLI and the HTTP API are generated from it;
* :mod:`~medsam3.predict.prompts`: :class:`Prompt` (concept text, boxes, points in input pixels), parsing
  of command-line prompt strings, validation against the image size;
* :mod:`~medsam3.predict.engine`: :class:`Engine`, one loaded model and the operations every path shares
  (tokens, pixels, image features, detection, tracker and video model);
* :mod:`~medsam3.predict.segment_2d`: 2D images (preprocessing per prompt, image features computed once
  and reused by every prompt, the concept model and the point tracker);
* :mod:`~medsam3.predict.tta`: test-time mirroring (``tta``);
* :mod:`~medsam3.predict.postprocess`: scores, presence gating, threshold, pixel-wise resolution;
* :mod:`~medsam3.predict.volume`: volumes (slices and track modes, 3D post-processing, outputs);
* :mod:`~medsam3.predict.summary`: :class:`SegmentationResult` (label map, one entry per label, outputs);
* :mod:`~medsam3.predict.segmenter`: :class:`Segmenter`, the facade users hold (a model and default
  options; per-call options);
* :mod:`~medsam3.predict.batch_cases`: folders and list files of cases, resumable, with a per-case CSV.

Names other than ``Prompt`` are imported lazily (they pull in torch).
"""

from __future__ import annotations

from typing import Any

from medsam3.lazy import lazy_attribute
from medsam3.predict.prompts import Prompt

__all__ = [
    "Engine",
    "Prompt",
    "SegmentOptions",
    "SegmentationResult",
    "Segmenter",
    "VolumeOptions",
    "VolumePrompt",
]

_LAZY = {
    "Engine": "medsam3.predict.engine",
    "SegmentOptions": "medsam3.predict.options",
    "VolumeOptions": "medsam3.predict.options",
    "SegmentationResult": "medsam3.predict.summary",
    "Segmenter": "medsam3.predict.segmenter",
    "VolumePrompt": "medsam3.predict.volume.prompts",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)
