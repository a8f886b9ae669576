"""Files of a volume segmentation, with the input's format and geometry.

For a case ``<stem>`` (the input file name without its extension, or a DICOM series folder's name):

=================  ===============================================================================
input              label map
=================  ===============================================================================
NIfTI              ``<stem>_seg.nii.gz``
NRRD               ``<stem>_seg.nrrd`` (label names as Slicer segment fields)
MetaImage          ``<stem>_seg.mha``
DICOM series/file  ``<stem>_seg.nii.gz`` and ``<stem>_seg.dcm``, a DICOM SEG referencing the series
                   (when the series has its UIDs: see :func:`dicom_seg_problem`); with ``--output-type
                   rtstruct`` also ``<stem>_rtstruct.dcm``, an RT Structure Set
BiomedSegFM npz    ``<stem>_seg.npz`` (``segs`` in the input's layout, ``spacing``, ``origin``,
                   ``direction``, ``label_names``)
TIFF stack         ``<stem>_seg.tif`` (no geometry, as the input)
=================  ===============================================================================

``--output-type challenge-npz`` writes ``<stem>.npz`` holding ``segs`` only: the prediction file of the
CVPR 2025 text-guided 3D challenge, named like its input (``CT_x.npz`` -> ``CT_x.npz``), the label map in the
input's array layout (``(D, H, W)`` for a challenge case), ``uint8`` (``uint16`` past 255). Its name is
the input's own when the output folder is the input's folder: that write is refused
(:func:`medsam3.io.atomic.check_not_input`). Given alone, it is the case's only label map (no
``<stem>_seg.*``); with other types it is written beside them.

NIfTI label maps carry their label names and colours in a header extension and in a JSON sidecar
``<stem>_seg.json`` (:mod:`medsam3.io.label_names`; colours as in the overlays), read back by
``medsam3 info --labels``. The output then also has ``<stem>_overlay.png`` (axial, coronal and sagittal
planes through the labels' centre), ``<stem>_montage.png`` (the slices along the slicing axis with the most
foreground) and ``<stem>.json`` (label value -> concept, score, presence, voxels, ml, slice range;
settings; the output file names).

Every label map has the input's shape, spacing, origin and direction. All files go through
:func:`medsam3.io.atomic.atomic_path` and are renamed into place together once all were produced, the
JSON last: a case whose JSON exists is complete (:mod:`medsam3.predict.batch_cases` relies on it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsam3.errors import OutputError
from medsam3.image import Image
from medsam3.io.atomic import atomic_path
from medsam3.io.label_names import sidecar_path, write_label_sidecar

#: Label-map suffix for each input format (:func:`medsam3.io.sniff.detect_format`).
log = logging.getLogger(__name__)

SEG_SUFFIX = {
    "nifti": ".nii.gz",
    "nrrd": ".nrrd",
    "metaimage": ".mha",
    "dicom": ".nii.gz",
    "npz": ".npz",
    "tiff": ".tif",
}


def dicom_seg_problem(reference: Image) -> str | None:
    """Why no DICOM SEG can reference ``reference``'s source files, or ``None`` when one can.

    ``None`` only for DICOM input whose series carries the UIDs a SEG must reference (Study, Series and
    SOP Instance UIDs); anonymised series without them get the label map alone, and the JSON says why.
    """
    meta = reference.meta
    if meta.get("format") != "dicom" or not meta.get("files"):
        return "the input is not DICOM"
    missing = [
        name
        for name, ok in (
            ("StudyInstanceUID", meta.get("study_uid")),
            ("SeriesInstanceUID", meta.get("series_uid")),
            ("SOPInstanceUID", all(meta.get("sop_instance_uids") or [""])),
        )
        if not ok
    ]
    if missing:
        return f"the source series lacks {', '.join(missing)} (anonymised?), which a DICOM SEG must reference"
    return None


def is_dicom_source(reference: Image) -> bool:
    """True when ``reference`` was read from DICOM files a DICOM SEG can reference."""
    return dicom_seg_problem(reference) is None


#: ``--output-type`` choices and their label-map suffixes (``dicom-seg``: a DICOM SEG, ``rtstruct``: a DICOM
#: RT Structure Set, both referencing the source series).
OUTPUT_TYPES = {
    "nifti": ".nii.gz",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "npz": ".npz",
    "dicom-seg": ".dcm",
    "rtstruct": ".dcm",
    "challenge-npz": ".npz",
}
#: Output types that are DICOM objects referencing the source (not label-map files).
DICOM_TYPES = ("dicom-seg", "rtstruct")
#: The challenge's prediction file (module docstring): ``<stem>.npz`` with ``segs`` only.
CHALLENGE_TYPE = "challenge-npz"


def check_output_types(
    reference: Image, output_types: Sequence[str] | None, dicom_source: Image | None = None
) -> None:
    """Refuse output types the input cannot have (before any work); ``dicom_source``: the DICOM series
    that SEG / RTSTRUCT reference instead of the input (``--reference-series``).

    Raises:
        OutputError: an unknown type, or ``dicom-seg`` for an input without the DICOM references.
    """
    source = dicom_source if dicom_source is not None else reference
    for kind in output_types or ():
        if kind not in OUTPUT_TYPES:
            raise OutputError(f"unknown output type {kind!r}; choose from {', '.join(OUTPUT_TYPES)}")
        if kind == "dicom-seg" and not is_dicom_source(source):
            raise OutputError(f"a DICOM SEG cannot be written: {dicom_seg_problem(source)}")
        if kind == "rtstruct":
            from medsam3.io.rtstruct import rtstruct_problem

            problem = rtstruct_problem(source)
            if problem is not None:
                raise OutputError(f"an RTSTRUCT cannot be written: {problem}")


def dicom_labels(result: Any, dicom_source: Image | None) -> tuple[Any, Image]:
    """The label map ``(Z, Y, X)`` and the image a SEG / RTSTRUCT of ``result`` reference: the input, or
    ``dicom_source`` (a DICOM series on the same grid up to axis order and flips, or a larger one holding
    it voxel for voxel), the labels placed onto its grid without resampling.

    Raises:
        InputError: the grids do not match voxel for voxel.
    """
    if dicom_source is None:
        return result.label_map, result.reference
    from medsam3.io.geometry import place_on_grid

    path = dicom_source.meta.get("path")
    return place_on_grid(result.to_image(), dicom_source, path=path), dicom_source


def derived_uids(result: Any, kind: str, source: Image | None = None) -> tuple[str, str]:
    """Series and SOP Instance UIDs for a DICOM result object of ``kind`` (``"dicom_seg"``, ``"rtstruct"``).

    Derived (``2.25.<hash>``) from the source series UID, the label map's bytes, the label names and the
    settings: the same result written twice gets the same UIDs, so storing it again in a PACS leaves one
    object (a server keeps the first copy of a SOP Instance), while any different result gets new ones.
    """
    import hashlib

    import numpy as np

    digest = hashlib.sha256(np.ascontiguousarray(result.label_map).tobytes()).hexdigest()
    basis = json.dumps(
        {
            "source": (source if source is not None else result.reference).meta.get("series_uid"),
            "labels": digest,
            "shape": list(np.shape(result.label_map)),
            "names": {str(k): v for k, v in result.label_names().items()},
            "settings": result.settings,
            "kind": kind,
        },
        sort_keys=True,
        default=str,
    )
    return _uuid_uid(basis + "/series"), _uuid_uid(basis + "/instance")


def _uuid_uid(name: str) -> str:
    """``2.25.<integer>`` of a name-based (version 5) UUID of ``name`` (DICOM PS3.5 B.2)."""
    import uuid

    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'medsam3:' + name).int}"


#: File-name parts of a case's own outputs, never used for a per-prompt file.
_RESERVED = {"seg", "overlay", "montage", "rtstruct"}


def _slug(name: str) -> str:
    text = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    return "_".join(part for part in text.split("_") if part)[:60] or "label"


def volume_output_paths(
    reference: Image,
    out_dir: str | Path,
    stem: str,
    *,
    overlay: bool = True,
    output_types: Sequence[str] | None = None,
    per_prompt: Mapping[int, str] | None = None,
    dicom_source: Image | None = None,
) -> dict[str, Path]:
    """The output files for a volume read as ``reference``, by kind; the JSON is listed last.

    ``output_types`` (:data:`OUTPUT_TYPES`; ``None``: the input's own format, plus a DICOM SEG for DICOM
    input) chooses the files: the first label-map type (not ``dicom-seg``, ``rtstruct`` or
    ``challenge-npz``) is ``labels``, the others ``labels_<type>``; ``dicom_seg`` and ``rtstruct`` are the
    DICOM objects; ``challenge_npz`` is ``<stem>.npz`` (module docstring; with ``challenge-npz`` alone there
    is no ``labels``). ``per_prompt`` (label value -> name) adds one binary file per label,
    ``<stem>_<name>`` in the format of ``labels`` (``.npz`` without one; kind ``prompt_<value>``).
    ``dicom_source``: the DICOM series SEG / RTSTRUCT reference when the input is not one (then a SEG is
    written by default too).
    """
    out = Path(out_dir)
    if output_types is None:
        suffix = SEG_SUFFIX.get(str(reference.meta.get("format")), ".nii.gz")
        paths = {"labels": out / f"{stem}_seg{suffix}"}
        if is_dicom_source(dicom_source if dicom_source is not None else reference):
            paths["dicom_seg"] = out / f"{stem}_seg.dcm"
    else:
        challenge = CHALLENGE_TYPE in output_types
        maps = [k for k in dict.fromkeys(output_types) if k not in (*DICOM_TYPES, CHALLENGE_TYPE)]
        if not maps and not challenge:
            maps = ["nifti"]
        suffix = OUTPUT_TYPES[maps[0]] if maps else OUTPUT_TYPES["npz"]
        paths = {"labels": out / f"{stem}_seg{suffix}"} if maps else {}
        for kind in maps[1:]:
            paths[f"labels_{kind}"] = out / f"{stem}_seg{OUTPUT_TYPES[kind]}"
        if challenge:
            paths["challenge_npz"] = out / f"{stem}.npz"
        if "dicom-seg" in output_types:
            paths["dicom_seg"] = out / f"{stem}_seg.dcm"
        if "rtstruct" in output_types:
            paths["rtstruct"] = out / f"{stem}_rtstruct.dcm"
    used: set[str] = set()
    for value, name in (per_prompt or {}).items():
        slug = _slug(name)
        slug = slug if slug not in used | _RESERVED else f"{slug}_{value}"
        used.add(slug)
        paths[f"prompt_{value}"] = out / f"{stem}_{slug}{suffix}"
    if overlay:
        paths["overlay"] = out / f"{stem}_overlay.png"
        paths["montage"] = out / f"{stem}_montage.png"
    for kind in [k for k in paths if k == "labels" or k.startswith("labels_")]:
        if paths[kind].name.endswith(".nii.gz"):
            paths["label_names"] = sidecar_path(paths[kind])
            break
    paths["json"] = out / f"{stem}.json"
    return paths


def write_volume_result(
    result: Any,
    out_dir: str | Path,
    stem: str,
    *,
    overlay: bool = True,
    output_types: Sequence[str] | None = None,
    per_prompt: bool = False,
    dicom_source: Image | None = None,
) -> dict[str, Path]:
    """Write a 3D :class:`~medsam3.predict.summary.SegmentationResult` (module docstring;
    ``output_types``, ``per_prompt`` and ``dicom_source`` as in :func:`volume_output_paths`).

    Nothing appears at the final names unless every file was written; the JSON is renamed last.
    Returns the paths by kind (``labels``, ``labels_<type>``, ``challenge_npz``, ``dicom_seg``, ``rtstruct``,
    ``prompt_<value>``, ``overlay``, ``montage``, ``json``).
    """
    import numpy as np

    from medsam3.io.writers import write_dicom_seg, write_label_map
    from medsam3.overlay import overlay_volume, ranked_colors

    names = result.label_names()
    check_output_types(result.reference, output_types, dicom_source)
    paths = volume_output_paths(
        result.reference,
        out_dir,
        stem,
        overlay=overlay,
        output_types=output_types,
        per_prompt=names if per_prompt else None,
        dicom_source=dicom_source,
    )
    if "dicom_seg" in paths or "rtstruct" in paths:
        dicom_map, dicom_ref = dicom_labels(result, dicom_source)
    with contextlib.ExitStack() as stack:
        # Entered first, so renamed into place last: the JSON marks a complete case.
        json_tmp = stack.enter_context(atomic_path(paths["json"]))
        tmp = {kind: stack.enter_context(atomic_path(p)) for kind, p in paths.items() if kind != "json"}
        grid = result.to_image()
        colors = ranked_colors(np.unique(result.label_map), names)
        for kind in [k for k in tmp if k == "labels" or k.startswith("labels_")]:
            write_label_map(result.label_map, tmp[kind], grid, label_names=names, colors=colors)
        if "challenge_npz" in tmp:
            from medsam3.io.npz import write_challenge_npz

            write_challenge_npz(result.label_map, tmp["challenge_npz"])
        if "label_names" in tmp:
            write_label_sidecar(tmp["label_names"], names, colors, atomic=False)
        for kind in [k for k in tmp if k.startswith("prompt_")]:
            value = int(kind.split("_", 1)[1])
            binary = (np.asarray(result.label_map) == value).astype(np.uint8)
            write_label_map(binary, tmp[kind], grid, label_names={1: names[value]}, colors={1: colors[value]})
        if "dicom_seg" in tmp:
            series_uid, sop_uid = derived_uids(result, "dicom_seg", dicom_ref)
            write_dicom_seg(
                dicom_map,
                dicom_ref,
                tmp["dicom_seg"],
                names,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
            )
        if "rtstruct" in tmp:
            from medsam3.io.rtstruct import write_rtstruct

            series_uid, sop_uid = derived_uids(result, "rtstruct", dicom_ref)
            write_rtstruct(
                dicom_map,
                dicom_ref,
                tmp["rtstruct"],
                names,
                colors=colors,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
            )
        if overlay:
            reo = result.reorientation
            labels = reo.apply(result.label_map) if reo is not None else result.label_map
            spacing = (
                tuple(reversed(reo.canonical_spacing))
                if reo is not None
                else result.reference.spacing_array_order
            )
            background = result.display if result.display is not None else _grey(result.reference)
            title = ", ".join(e.name for e in result.labels if not e.absent) or "nothing found"
            overlay_volume(background, labels, names, tmp["overlay"], spacing, "planes", title=title)
            overlay_volume(
                background,
                labels,
                names,
                tmp["montage"],
                spacing,
                "montage",
                title=title,
                axis=result.slice_axis or 0,
            )
        summary = result.to_dict()
        summary["outputs"] = {kind: p.name for kind, p in paths.items() if kind != "json"}
        if dicom_source is not None:
            summary["dicom_reference"] = {
                "path": dicom_source.meta.get("path"),
                "series_uid": dicom_source.meta.get("series_uid"),
            }
        if result.reference.meta.get("format") == "dicom" and "dicom_seg" not in paths:
            summary["dicom_seg_not_written"] = dicom_seg_problem(result.reference)
            log.warning(
                "%s: no DICOM SEG written: %s",
                result.reference.meta.get("path"),
                summary["dicom_seg_not_written"],
            )
        json_tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths


def _grey(image: Image):
    from medsam3.preprocess.intensity import normalize_intensity

    return normalize_intensity(image.array, image.modality)
