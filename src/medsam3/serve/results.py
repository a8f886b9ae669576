"""Run one segmentation job and write its files: the label map in the upload's format, a JSON summary, and
the viewer's copy of the labels.

Scopes:

* **whole image**: 2D images, and volumes without a ``slice``: the image goes unchanged to
  ``Segmenter.segment(image, prompts)`` (volumes through the same call as pictures). On a volume the
  prompts are texts and 3D boxes (``box3d``, input voxels, as ``medsam3 segment --box3d``).
* **one slice of a volume** (``slice = {plane, index}``): the slice is cut from the canonical volume in the
  display frame (:mod:`medsam3.serve.store`), segmented as a 2D image with the plane's spacing, and put
  back into an empty label volume on the original grid (exactly: reorientation is a permutation and flips).
* **a volume from boxes on one slice** (``slice`` and ``propagate``): each box drawn on the displayed slice
  is mapped exactly to the input voxels it covers (:func:`display_box_to_input`) and becomes a box on a
  **key slice** (:class:`~medsam3.predict.volume.prompts.VolumePrompt` ``boxes`` + ``box_slice``, as
  ``medsam3 segment --box --box-slice``); the whole volume goes to the segmenter. The volume segmenter
  slices along the acquisition's through-plane axis and takes key slices along it only, so the boxes must
  be drawn on that plane (:func:`propagation_prompts` names it otherwise). The scope is reported as
  ``{"kind": "volume", "key_slice": {"plane", "index", "input_slice"}}``.

:func:`request_prompts` turns a request into the segmenter's prompts and checks them against the image
(the server calls it when a request arrives, so bad prompts are refused before a job is queued).

Files in the job folder (each written atomically): ``mask.<ext>`` (:data:`medsam3.serve.uploads.MASK_OUTPUTS`;
the upload's geometry), ``mask.seg.dcm`` for DICOM uploads (DICOM SEG referencing the uploaded series),
``summary.json``, and ``labels_display.npy`` (the labels in the display frame, for the viewer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import OutputError, PromptError
from medsam3.image import Image
from medsam3.io.atomic import write_text_atomic
from medsam3.io.writers import write_dicom_seg, write_label_map
from medsam3.overlay import label_colors
from medsam3.predict.options import check_request
from medsam3.predict.prompts import Prompt, validate_prompt
from medsam3.predict.segmenter import Segmenter
from medsam3.predict.summary import SegmentationResult
from medsam3.predict.volume.prompts import Box3D, VolumePrompt, validate_volume_prompt
from medsam3.preprocess.orientation import Reorientation, plan_reorientation
from medsam3.preprocess.slices import take_slice
from medsam3.serve.schemas import SegmentIn
from medsam3.serve.store import PLANE_AXIS, ImageRecord, acquired_plane
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
            raise PromptError(
                'boxes and points on a volume need a slice: give "slice": {"plane": '
                '"axial", "index": k} (coordinates are pixels of that slice; add '
                '"propagate": true to segment the whole volume from its boxes), or a 3D box '
                '"box3d": [x1, y1, z1, x2, y2, z2] in input voxels'
            )
        for p in prompts:  # text-only prompts here: the grid size plays no part in their checks
            validate_prompt(p, (1, 1))
        return
    geo = info["display"]["planes"][plane or "image"]
    for p in prompts:
        validate_prompt(p, (geo["rows"], geo["cols"]))


# --------------------------------------------------------------------------------------------------
# Boxes drawn on a displayed slice -> the volume segmenter's key-slice boxes


def reorientation_of(info: dict) -> Reorientation:
    """The reorientation plan of an uploaded volume from its description (``rec.info``; no pixels read).

    The same plan :func:`~medsam3.preprocess.orientation.plan_reorientation` makes from the image: it
    depends on the shape and direction only (a zero-size broadcast array stands in for the pixels).
    """
    shape = tuple(int(v) for v in info["shape"])
    geometry = Image(
        np.broadcast_to(np.zeros((), np.uint8), shape),
        info["spacing"],
        info["origin"],
        np.asarray(info["direction"], dtype=np.float64),
    )
    return plan_reorientation(geometry)


def display_box_to_input(reo: Reorientation, plane: str, index: int, box: Sequence[float]) -> Box3D:
    """A box ``(x1, y1, x2, y2)`` on display slice ``index`` of ``plane`` as a 3D box of the input volume.

    Display slices (:mod:`medsam3.serve.store`) are slices of the canonical array ``(Z, Y, X)``: axial
    ``(Y, X)``, coronal ``(Z, X)`` and sagittal ``(Z, Y)``, the last two mirrored vertically (superior at
    the top), so a display row ``y`` is canonical coordinate ``n - y`` along the row axis. The slice is one
    voxel thick, ``[index, index + 1]`` along the plane's canonical axis. The canonical box is taken back
    through the reorientation's mirroring and permutation (the inverse of
    :func:`~medsam3.predict.volume.prompts.canonical_box`), which is exact.

    Returns:
        ``(x1, y1, z1, x2, y2, z2)``: continuous voxel coordinates of the **input** array, ``x`` along
        array axis 2, ``y`` along axis 1, ``z`` along axis 0, ends exclusive (the frame of
        :attr:`~medsam3.predict.volume.prompts.VolumePrompt.box3d`). Exactly one of the three extents is
        ``[k, k + 1]``: the input axis the display plane cuts.
    """
    axis = PLANE_AXIS[plane]
    shape = reo.canonical_shape
    rows, cols = {0: (1, 2), 1: (0, 2), 2: (0, 1)}[axis]
    x1, y1, x2, y2 = (float(v) for v in box)
    if axis != 0:
        y1, y2 = shape[rows] - y2, shape[rows] - y1
    lo = np.zeros(3)
    hi = np.zeros(3)
    lo[axis], hi[axis] = float(index), float(index + 1)
    lo[rows], hi[rows] = y1, y2
    lo[cols], hi[cols] = x1, x2
    for c in reo.flipped:
        n = float(shape[c])
        lo[c], hi[c] = n - hi[c], n - lo[c]
    lo_in = np.zeros(3)
    hi_in = np.zeros(3)
    for a, source in enumerate(reo.source_axes):  # canonical axis a came from input axis source
        lo_in[source], hi_in[source] = lo[a], hi[a]
    return (
        float(lo_in[2]),
        float(lo_in[1]),
        float(lo_in[0]),
        float(hi_in[2]),
        float(hi_in[1]),
        float(hi_in[0]),
    )


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def propagation_prompts(
    prompts: list[Prompt], reo: Reorientation, plane: str, index: int
) -> list[Prompt | VolumePrompt]:
    """The prompts of a ``propagate`` request for the volume segmenter.

    A prompt with boxes becomes a :class:`VolumePrompt` with the boxes on its key slice (input voxels,
    :func:`display_box_to_input`); a text-only prompt stays as it is (the whole volume is searched).

    Raises:
        PromptError: no prompt has a box; a prompt has points; the display plane is not the plane the
            volume segmenter slices along (the acquisition's through-plane axis, where key slices lie).
    """
    for p in prompts:
        if p.points:
            raise PromptError(
                f"prompt {p.display_name!r}: points cannot be propagated through a volume; "
                "draw a box instead, or leave out 'propagate' to segment only this slice"
            )
    if not any(p.boxes for p in prompts):
        raise PromptError(
            "'propagate' spreads the boxes drawn on the slice through the volume, but no "
            "prompt has a box: draw a box, or leave out 'slice' and 'propagate' to search the "
            "whole volume for the text"
        )
    acquired = acquired_plane(reo)
    assert acquired is not None  # reo is a volume's (propagate applies to volumes only)
    out: list[Prompt | VolumePrompt] = []
    for p in prompts:
        if not p.boxes:
            out.append(p)
            continue
        if plane != acquired:
            raise PromptError(
                f"boxes drawn on a {plane} slice cannot be propagated through this volume: it was acquired "
                f"in {acquired} slices and is segmented slice by slice along them, so a box to propagate "
                f"must be drawn on {_article(acquired)} slice (or leave out 'propagate' to segment only this "
                f"{plane} slice)"
            )
        boxes: list[tuple[float, ...]] = []
        keys: set[int] = set()
        for box in p.boxes:
            x1, y1, z1, x2, y2, z2 = display_box_to_input(reo, plane, index, box)
            boxes.append((x1, y1, x2, y2))
            keys.add(int(z1))
        (key,) = keys  # the acquired plane cuts input axis 0: every box lies on input slice z1
        assert p.box_labels is not None  # set with the boxes in Prompt.__post_init__
        vp = VolumePrompt(p.text, boxes, list(p.box_labels), key)
        out.append(validate_volume_prompt(vp, reo.original_shape))
    return out


def _whole_volume_prompts(
    body: SegmentIn, prompts: list[Prompt], rec: ImageRecord
) -> list[Prompt | VolumePrompt]:
    out: list[Prompt | VolumePrompt] = []
    for given, p in zip(body.prompts, prompts, strict=True):
        if given.box3d is None:
            validate_prompts([p], rec, None)  # text only: boxes and points need a slice
            out.append(p)
            continue
        if p.boxes or p.points:
            raise PromptError(
                f"prompt {p.display_name!r}: 'box3d' cannot be combined with 'boxes' or "
                "'points' in one prompt"
            )
        vp = VolumePrompt(p.text, box3d=tuple(given.box3d))
        out.append(validate_volume_prompt(vp, rec.info["shape"]))
    return out


def request_prompts(
    body: SegmentIn, rec: ImageRecord, reo: Reorientation | None = None
) -> Sequence[Prompt | VolumePrompt]:
    """The prompts the segmenter gets for ``body`` on ``rec``, checked against the image.

    2D images and single slices: ``Prompt`` in pixels of the image / slice. ``propagate``:
    :func:`propagation_prompts`. A whole volume: text-only ``Prompt`` and ``VolumePrompt`` for ``box3d``.
    ``reo`` is the volume's reorientation (from ``rec.info`` when omitted).

    Raises:
        PromptError: the message for the client (the server answers 422).
    """
    info = rec.info
    is_volume = info["ndim"] == 3
    plane = body.slice.plane if body.slice is not None else None
    options = body.options()
    check_request(options, points=any(p.points for p in body.prompts))
    if any(p.box3d is not None for p in body.prompts):
        if not is_volume:
            raise PromptError("'box3d' applies to volumes only; this image is 2D (give its box in 'boxes')")
        if plane is not None:
            raise PromptError(
                "'box3d' is given in voxels of the whole uploaded volume and cannot be "
                "combined with 'slice'; a box drawn on a displayed slice goes in 'boxes' (add "
                '"propagate": true to segment the whole volume from it)'
            )
    if body.propagate:
        if not is_volume:
            raise PromptError("'propagate' applies to volumes only; this image is 2D")
        if plane is None:
            raise PromptError(
                "'propagate' needs the slice the boxes are drawn on: give \"slice\": "
                '{"plane": "axial", "index": k} with it'
            )
    prompts = [p.to_prompt() for p in body.prompts]
    if not is_volume or (plane is not None and not body.propagate):
        validate_prompts(prompts, rec, plane)
        return prompts
    single = int(info["shape"][0]) == 1
    if single and (body.propagate or any(p.box3d is not None for p in body.prompts)):
        raise PromptError(
            "this volume has a single slice and is segmented as a 2D image: give its boxes "
            "with \"slice\" (without 'propagate' or 'box3d')"
        )
    if not single:
        check_request(options, volume=True)
    if body.propagate:
        assert body.slice is not None and plane is not None  # 'propagate' without a slice was refused above
        validate_prompts(prompts, rec, plane)  # the boxes lie inside the displayed slice
        return propagation_prompts(prompts, reo or reorientation_of(info), plane, body.slice.index)
    return _whole_volume_prompts(body, prompts, rec)


def _to_display(labels: np.ndarray, image: Image) -> np.ndarray:
    if image.ndim == 2:
        return labels[None]
    return plan_reorientation(image).apply(labels)


def _entries(result: SegmentationResult, colours: dict[int, tuple[int, int, int]]) -> list[dict[str, Any]]:
    out = []
    for entry in result.labels:
        d = entry.to_dict()
        d["color"] = list(colours[entry.value]) if entry.value is not None else None
        out.append(d)
    return out


def segment_job(
    segmenter: Segmenter,
    image: Image,
    rec: ImageRecord,
    prompts: Sequence[Prompt | VolumePrompt],
    request: dict,
    folder: Path,
    model_name: str,
) -> dict[str, Any]:
    """Segment, write the job's files into ``folder`` and return the job's public result.

    ``prompts`` come from :func:`request_prompts`; ``request`` is the validated request as a dict
    (``SegmentIn.model_dump()``).
    """
    scope = request.get("slice")
    if scope is not None and image.ndim == 3 and not request.get("propagate"):
        plane, index = scope["plane"], int(scope["index"])
        result = segmenter.segment(slice_image(image, rec, plane, index), prompts)
        reo = plan_reorientation(image)
        canonical = np.zeros(reo.canonical_shape, dtype=result.label_map.dtype)
        take_slice(canonical, PLANE_AXIS[plane], index, display=True)[...] = result.label_map
        labels = reo.invert(canonical)
        display_labels = canonical
        scope_out = {"kind": "slice", "plane": plane, "index": index}
    else:
        result = segmenter.segment(image, prompts)
        labels = np.asarray(result.label_map)
        display_labels = _to_display(labels, image)
        scope_out = {"kind": "volume" if image.ndim == 3 else "image"}
        keys = [
            p.box_slice
            for p in prompts
            if isinstance(p, VolumePrompt) and p.boxes and p.box_slice is not None
        ]
        if scope is not None and keys:
            scope_out["key_slice"] = {
                "plane": scope["plane"],
                "index": int(scope["index"]),
                "input_slice": int(keys[0]),
            }

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
    summary["image"] = {
        k: rec.info[k] for k in ("image_id", "name", "format", "shape", "spacing", "modality", "ndim")
    }
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
