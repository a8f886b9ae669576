"""Run one segmentation job and write its files: the label map in the upload's format, a JSON summary, and
the viewer's copy of the labels.

Scopes:

* **whole image**: 2D images, and volumes without a ``slice``: the image goes unchanged to
  ``Segmenter.segment(image, prompts)`` (volumes through the same call as pictures).
* **one slice of a volume** (``slice = {plane, index}``): the slice is cut from the canonical volume in the
  display frame (:mod:`medsam3.serve.store`), segmented as a 2D image with the plane's spacing, and put
  back into an empty label volume on the original grid (exactly: reorientation is a permutation and flips).

Files in the job folder (each written atomically): ``mask.<ext>`` (:data:`medsam3.serve.uploads.MASK_OUTPUTS`;
the upload's geometry), ``mask.seg.dcm`` for DICOM uploads (DICOM SEG referencing the uploaded series),
``summary.json``, and ``labels_display.npy`` (the labels in the display frame, for the viewer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import OutputError
from medsam3.image import Image
from medsam3.io.atomic import write_text_atomic
from medsam3.io.writers import write_dicom_seg, write_label_map
from medsam3.overlay import label_colors
from medsam3.predict.prompts import Prompt, validate_prompt
from medsam3.preprocess.orientation import plan_reorientation
from medsam3.preprocess.slices import take_slice
from medsam3.serve.store import PLANE_AXIS, ImageRecord
from medsam3.serve.uploads import MASK_OUTPUTS

SEG_FILE = "mask.seg.dcm"
SUMMARY_FILE = "summary.json"
DISPLAY_LABELS = "labels_display.npy"


def slice_image(image: Image, rec: ImageRecord, plane: str, index: int) -> Image:
    """Slice ``index`` of ``plane`` of a volume as a 2D :class:`Image` in the display frame."""
    reo = plan_reorientation(image)
    canonical = reo.apply(image.array)
    axis = PLANE_AXIS[plane]
    geo = rec.info["display"]["planes"][plane]
    pixels = np.ascontiguousarray(take_slice(canonical, axis, index, display=True))
    meta = {"path": f"{rec.name} ({plane} slice {index})", "format": rec.stored.kind, "spacing_known": True}
    spacing = (geo["col_spacing"], geo["row_spacing"])
    return Image(pixels, spacing, (0.0, 0.0), np.eye(2), image.modality, meta)


def validate_prompts(prompts: list[Prompt], rec: ImageRecord, plane: str | None) -> None:
    """Check every prompt against the 2D grid it will be applied to (PromptError otherwise)."""
    info = rec.info
    if plane is None and info["ndim"] == 3:
        if any(p.boxes or p.points for p in prompts):
            from medsam3.errors import PromptError

            raise PromptError("boxes and points on a volume need a slice: give \"slice\": {\"plane\": "
                              "\"axial\", \"index\": k} (coordinates are pixels of that slice)")
        for p in prompts:  # text-only prompts here: the grid size plays no part in their checks
            validate_prompt(p, (1, 1))
        return
    geo = info["display"]["planes"][plane or "image"]
    for p in prompts:
        validate_prompt(p, (geo["rows"], geo["cols"]))


def _to_display(labels: np.ndarray, image: Image) -> np.ndarray:
    if image.ndim == 2:
        return labels[None]
    return plan_reorientation(image).apply(labels)


def _entries(result, colours: dict[int, tuple[int, int, int]]) -> list[dict[str, Any]]:
    out = []
    for entry in result.labels:
        d = entry.to_dict()
        d["color"] = list(colours[entry.value]) if entry.value is not None else None
        out.append(d)
    return out


def segment_job(segmenter, image: Image, rec: ImageRecord, prompts: list[Prompt], request: dict,
                folder: Path, model_name: str) -> dict[str, Any]:
    """Segment, write the job's files into ``folder`` and return the job's public result."""
    scope = request.get("slice")
    if scope is not None and image.ndim == 3:
        plane, index = scope["plane"], int(scope["index"])
        result = segmenter.segment(slice_image(image, rec, plane, index), prompts,
                                   instances=request.get("instances", False))
        reo = plan_reorientation(image)
        canonical = np.zeros(reo.canonical_shape, dtype=result.label_map.dtype)
        take_slice(canonical, PLANE_AXIS[plane], index, display=True)[...] = result.label_map
        labels = reo.invert(canonical)
        display_labels = canonical
        scope_out = {"kind": "slice", "plane": plane, "index": index}
    else:
        result = segmenter.segment(image, prompts, instances=request.get("instances", False))
        labels = np.asarray(result.label_map)
        display_labels = _to_display(labels, image)
        scope_out = {"kind": "volume" if image.ndim == 3 else "image"}

    names = result.label_names()
    colours = label_colors(sorted(names) or [1])
    mask_file, _ = MASK_OUTPUTS[rec.stored.kind]
    write_label_map(labels, folder / mask_file, image, names)
    files = {"mask": mask_file, "summary": SUMMARY_FILE}
    seg_note = None
    if rec.stored.kind in ("dicom", "dicom-zip"):
        try:
            write_dicom_seg(labels, image, folder / SEG_FILE, names)
            files["dicom_seg"] = SEG_FILE
        except OutputError as exc:
            seg_note = f"no DICOM SEG written: {str(exc).split(': ', 1)[-1]}"
    np.save(folder / DISPLAY_LABELS, np.ascontiguousarray(display_labels), allow_pickle=False)

    summary = result.to_dict()
    summary["image"] = {k: rec.info[k] for k in ("image_id", "name", "format", "shape", "spacing",
                                                  "modality", "ndim")}
    summary["label_map"]["shape"] = list(labels.shape)
    summary["labels"] = _entries(result, colours)
    summary["scope"] = scope_out
    summary["settings"]["model"] = model_name
    summary["settings"].pop("tracker", None)
    if seg_note:
        summary["dicom_seg"] = seg_note
    write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return {
        "labels": summary["labels"],
        "label_dtype": str(labels.dtype),
        "shape": list(labels.shape),
        "display_shape": list(display_labels.shape),
        "scope": scope_out,
        "files": files,
        "dicom_seg_note": seg_note,
    }
