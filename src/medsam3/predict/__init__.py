"""Prediction: an image and prompts in, a label map on the input grid out.

Modules, in the order of the flow:

* :mod:`~medsam3.predict.prompts`: :class:`Prompt` (concept text, boxes, points in input pixels), parsing
  of command-line prompt strings, validation against the image size;
* :mod:`~medsam3.predict.segmenter`: :class:`Segmenter` (preprocessing per prompt, image features
  computed once and reused by every prompt, the concept model and the point tracker);
* :mod:`~medsam3.predict.postprocess`: scores, presence gating, threshold, pixel-wise resolution;
* :mod:`~medsam3.predict.summary`: :class:`SegmentationResult` (label map, one entry per label, PNG / JSON
  outputs).

Volumes (``(Z, Y, X)``, reoriented to LPS and sliced along the acquisition axis):

* :mod:`~medsam3.predict.volume_prompts`: :class:`VolumePrompt` (text, key-slice box, 3D box);
* :mod:`~medsam3.predict.volume`: ``slices`` mode, vision features in batches of slices shared by every
  prompt, the per-slice rule;
* :mod:`~medsam3.predict.track`: ``track`` mode, the video model carrying a concept through the slices with
  bounded memory;
* :mod:`~medsam3.predict.volume_post`: presence over slices, 3D components, hole filling;
* :mod:`~medsam3.predict.volume_segment`: orchestration and the exact inverse to the input grid;
* :mod:`~medsam3.predict.volume_outputs`: NIfTI / NRRD / MHA / npz / DICOM SEG in the input's geometry;
* :mod:`~medsam3.predict.batch_cases`: folders and list files of cases, resumable, with a per-case CSV.

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
