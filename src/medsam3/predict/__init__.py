"""Prediction: an image and prompts in, a label map on the input grid out.

Modules, in the order of the flow:

* :mod:`~medsam3.predict.prompts`: :class:`Prompt` (concept text, boxes, points in input pixels), parsing
  of command-line prompt strings, validation against the image size;
* :mod:`~medsam3.predict.segmenter`: :class:`Segmenter` (preprocessing per prompt, image features
  computed once and reused by every prompt, the concept model and the point tracker);
* :mod:`~medsam3.predict.postprocess`: scores, presence gating, threshold, pixel-wise resolution;
* :mod:`~medsam3.predict.summary`: :class:`SegmentationResult` (label map, one entry per label, PNG / JSON
  outputs).

``Segmenter`` and ``SegmentationResult`` are imported lazily (they pull in torch).
"""

from __future__ import annotations

from medsam3.predict.prompts import Prompt

__all__ = ["Prompt", "SegmentationResult", "Segmenter"]


def __getattr__(name: str):
    if name == "Segmenter":
        from medsam3.predict.segmenter import Segmenter

        return Segmenter
    if name == "SegmentationResult":
        from medsam3.predict.summary import SegmentationResult

        return SegmentationResult
    raise AttributeError(f"module 'medsam3.predict' has no attribute {name!r}")
