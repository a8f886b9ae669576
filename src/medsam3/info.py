"""What ``medsam3 info`` reports about an image, volume, DICOM series or label map.

:func:`describe` returns a JSON-ready dict; :func:`format_table` renders it for people. Fields:

* ``shape`` (array order), ``channels``, ``dtype``;
* ``spacing`` / ``origin`` in ITK order ``(x, y[, z])``, LPS mm, and ``direction`` (columns are the ITK
  axes), exactly as SimpleITK reports them for the same file;
* ``orientation``: for 3D, three letters naming the patient direction each ITK axis ``x, y, z`` points
  towards (``LPS`` for an identity direction): the DICOM / ``SimpleITK.DICOMOrient`` convention, and the
  same letters nibabel's ``aff2axcodes`` gives for the NIfTI affine. 2D pictures have no patient frame.
* ``modality`` and where it came from (given, DICOM tag, or the guess rules of :mod:`medsam3.io.modality`);
* ``intensity``: min, max, mean and the 0.5 / 99.5 percentiles (numpy's linear interpolation, all voxels);
* ``labels`` for label maps: value, name (when the file names it), voxel count and volume in ml (3D) or
  area in mm² (2D; in pixels when the pixel size is unknown), and ``color`` ``[r, g, b]`` (0..255) when
  the file states one. Named values absent from the map are listed with 0 voxels. A file is treated as a
  label map when it is one by format (DICOM SEG, Slicer ``.seg.nrrd``, npz ``gts``), when it carries a
  label table (NIfTI header extension or JSON sidecar), when ``--labels`` is given, or when it *looks*
  like one: non-negative integers that are either binary (two values) or piecewise constant (at least
  70% of neighbouring non-background voxel pairs equal; scans stay below 60% on the samples);
* ``label_names_source``: where the names came from (:func:`medsam3.io.label_names.read_label_table`:
  ``nifti extension``, ``sidecar``, ``nrrd segment fields``, ``npz label_names``, ``dicom seg``, ...),
  with ``label_names_file`` (the file holding them) and ``label_names_warnings`` (a sidecar that
  disagrees with the file's own names); absent when the file names nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsam3.image import Image
from medsam3.io import dicom, dicom_seg
from medsam3.io.label_names import LabelTable, read_label_table
from medsam3.io.readers import read_image, read_label_map, read_segments
from medsam3.io.sniff import detect_format
from medsam3.io.volumes import read_metadata, segment_table
from medsam3.preprocess.orientation import orientation_code

ORIENTATION_CONVENTION = "where ITK axes x, y, z point: patient L/R, P/A, S/I (LPS frame, DICOM convention)"

#: Equal-neighbour fraction above which an integer image is taken for a label map.
LABEL_SMOOTHNESS = 0.7


def looks_like_labels(array: np.ndarray) -> bool:
    """Heuristic of the module docstring: non-negative integers, binary or piecewise constant."""
    if array.dtype.kind == "f":
        if array.size > 0 and not np.array_equal(array, np.round(array)):
            return False
    elif array.dtype.kind not in "biu":
        return False
    if array.size == 0 or array.min() < 0:
        return False
    values = np.unique(array)
    if values.size <= 2:
        return True
    if values.size > 1000:
        return False
    a, b = array[..., :-1], array[..., 1:]
    busy = (a != 0) | (b != 0)
    return bool(busy.any() and np.mean(a[busy] == b[busy]) >= LABEL_SMOOTHNESS)


def _geometry(image: Image) -> dict[str, Any]:
    out: dict[str, Any] = {
        "shape": list(image.array.shape),
        "channels": int(image.array.shape[-1]) if image.is_color else 1,
        "dtype": str(image.array.dtype),
        "spacing": [float(s) for s in image.spacing],
        "spacing_known": bool(image.meta.get("spacing_known", True)),
        "origin": [float(o) for o in image.origin],
        "direction": (np.asarray(image.direction, dtype=np.float64) + 0.0).tolist(),  # no -0.0
    }
    if image.ndim == 3 and out["spacing_known"]:
        out["orientation"] = orientation_code(image.direction)
        out["orientation_convention"] = ORIENTATION_CONVENTION
    else:
        out["orientation"] = None
    return out


def _intensity(array: np.ndarray) -> dict[str, float]:
    flat = np.asarray(array).reshape(-1)
    p_lo, p_hi = np.percentile(flat, [0.5, 99.5])
    return {
        "min": float(flat.min()),
        "max": float(flat.max()),
        "mean": float(flat.mean(dtype=np.float64)),
        "p0_5": float(p_lo),
        "p99_5": float(p_hi),
    }


def _measure(image: Image, count: int) -> dict[str, float]:
    known = image.meta.get("spacing_known", True)
    if image.ndim == 3:
        return {"volume_ml": count * float(np.prod(image.spacing)) / 1000.0} if known else {}
    if known:
        return {"area_mm2": count * float(np.prod(image.spacing))}
    return {"area_px": float(count)}


def _label_rows(image: Image, names: dict[int, str]) -> list[dict[str, Any]]:
    values, counts = np.unique(image.array, return_counts=True)
    rows = []
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        if v == 0:
            continue
        rows.append({"value": int(v), "name": names.get(int(v)), "voxels": int(c), **_measure(image, int(c))})
    for v in sorted(set(names) - set(int(x) for x in values.tolist()) - {0}):
        rows.append({"value": int(v), "name": names[v], "voxels": 0, **_measure(image, 0)})
    return rows


def _with_colors(rows: list[dict[str, Any]], table: LabelTable) -> list[dict[str, Any]]:
    """``rows`` with ``color`` ``[r, g, b]`` added where the label table knows the value's colour."""
    for row in rows:
        color = table.colors.get(int(row["value"]))
        if color is not None:
            row["color"] = list(color)
    return rows


def _name_source(out: dict[str, Any], table: LabelTable) -> None:
    if table.source is None:
        return
    out["label_names_source"] = table.source
    out["label_names_file"] = None if table.file is None else str(table.file)
    if table.warnings:
        out["label_names_warnings"] = list(table.warnings)


def _segment_rows(masks: dict[int, Image]) -> list[dict[str, Any]]:
    rows = []
    for v, m in sorted(masks.items()):
        c = int(np.count_nonzero(m.array))
        rows.append({"value": v, "name": m.meta.get("label_names", {}).get(v), "voxels": c, **_measure(m, c)})
    return rows


def _overlaps(masks: dict[int, Image]) -> list[dict[str, Any]]:
    out = []
    keys = sorted(masks)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            n = int(np.count_nonzero(masks[a].array & masks[b].array))
            if n:
                out.append({"values": [a, b], "voxels": n})
    return out


def _modality_source(image: Image, given: str | None) -> str:
    if given:
        return "given"
    return "DICOM tag" if image.meta.get("dicom_modality") else "guessed"


def _is_segmentation(path: Path, fmt: str) -> bool:
    if fmt == "dicom":
        return dicom_seg.is_seg(dicom.read_header(path))
    if fmt == "nrrd":
        return bool(segment_table(read_metadata(path)))
    return False


def describe(
    path: str | Path, *, labels: bool = False, series_uid: str | None = None, modality: str | None = None
) -> dict[str, Any]:
    """Everything ``medsam3 info`` reports about ``path`` (module docstring), as a JSON-ready dict."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    out: dict[str, Any] = {"path": str(path), "format": fmt}
    if _is_segmentation(path, fmt):
        masks = read_segments(path)
        table = read_label_table(path)
        first = next(iter(masks.values()), None)
        grid = first if first is not None else read_label_map(path, overlap="last")
        out.update(kind="segmentation", **_geometry(grid))
        out["labels"] = _with_colors(_segment_rows(masks), table)
        _name_source(out, table)
        out["overlaps"] = _overlaps(masks)
        out["grid_source"] = grid.meta.get("grid_source")
        out["dtype"] = "uint8 (one mask per segment)"
        return out
    image = read_image(path, series_uid=series_uid, modality=modality)
    table = read_label_table(path)
    is_label = (
        bool(image.meta.get("is_label"))
        or labels
        or table.source in ("nifti extension", "sidecar")
        or looks_like_labels(image.array)
    )
    out.update(kind="label map" if is_label else "image", **_geometry(image))
    out["modality"] = None if is_label and not modality else image.modality
    if out["modality"] is not None:
        out["modality_source"] = _modality_source(image, modality)
    out["intensity"] = _intensity(image.array)
    if image.meta.get("collapsed_channels"):
        out["note"] = f"colour channels are identical: read as grey ({image.meta['collapsed_channels']})"
    if image.meta.get("format") == "dicom":
        out["dicom"] = {
            "series_uid": image.meta.get("series_uid"),
            "study_uid": image.meta.get("study_uid"),
            "frame_of_reference_uid": image.meta.get("frame_of_reference_uid"),
            "modality": image.meta.get("dicom_modality"),
            "series_description": image.meta.get("series_description"),
            "files": len(image.meta.get("files", [])),
        }
    if fmt == "npz":
        out["text_prompts"] = {str(k): v for k, v in image.meta.get("text_prompts", {}).items()}
        lab = (
            read_label_map(path)
            if "gts" in image.meta.get("npz_keys", []) or "segs" in image.meta.get("npz_keys", [])
            else None
        )
        if lab is not None and lab is not image:
            out["label_key"] = lab.meta.get("label_key")
            out["labels"] = _with_colors(_label_rows(lab, _names(lab, table)), table)
            _name_source(out, table)
            return out
    if is_label:
        lab = read_label_map(path, series_uid=series_uid) if not image.meta.get("is_label") else image
        out["labels"] = _with_colors(_label_rows(lab, _names(lab, table)), table)
        _name_source(out, table)
    return out


def _names(lab: Image, table: LabelTable) -> dict[int, str]:
    """The label names: the label table's where it found any, else those the reader attached."""
    return dict(table.names) if table.source is not None else dict(lab.meta.get("label_names", {}))


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x, digits) for x in v) + ")"
    return str(v)


def format_table(info: dict[str, Any]) -> str:
    """A human-readable, aligned rendering of :func:`describe`'s dict."""
    rows: list[tuple[str, str]] = [("path", info["path"]), ("format", info["format"]), ("kind", info["kind"])]
    three = len(info["spacing"]) == 3
    axes = "(Z, Y, X)" if three else ("(Y, X, C)" if info.get("channels", 1) > 1 else "(Y, X)")
    itk_axes = "(x, y, z)" if three else "(x, y)"
    rows.append(("shape", f"{_fmt(info['shape'])}  {axes}"))
    if info.get("channels", 1) > 1:
        rows.append(("channels", str(info["channels"])))
    rows.append(("dtype", info["dtype"]))
    unit = "mm" if info.get("spacing_known", True) else "pixels (no physical size in the file)"
    rows.append(("spacing", f"{_fmt(info['spacing'], 6)} {unit}  {itk_axes}"))
    frame = " mm (LPS)" if info.get("spacing_known", True) else ""
    rows.append(("origin", _fmt(info["origin"], 6) + frame))
    rows.append(
        (
            "direction",
            "  ".join(_fmt(col, 4) for col in np.asarray(info["direction"]).T.tolist())
            + f"  (columns {itk_axes[1:-1]})",
        )
    )
    if info.get("orientation"):
        rows.append(("orientation", f"{info['orientation']}  ({info['orientation_convention']})"))
    if info.get("modality"):
        rows.append(("modality", f"{info['modality']} ({info['modality_source']})"))
    if info.get("dicom"):
        d = info["dicom"]
        rows.append(
            (
                "series",
                f"{d['series_uid'] or '(no UID)'}  '{d['series_description'] or ''}'  {d['files']} files",
            )
        )
    if info.get("intensity"):
        i = info["intensity"]
        name = "values" if info["kind"] != "image" else "intensity"
        rows.append(
            (
                name,
                f"min {_fmt(i['min'])}  max {_fmt(i['max'])}  mean {_fmt(i['mean'])}  "
                f"p0.5 {_fmt(i['p0_5'])}  p99.5 {_fmt(i['p99_5'])}",
            )
        )
    if info.get("text_prompts"):
        rows.append(("text prompts", ", ".join(f"{k}: {v}" for k, v in info["text_prompts"].items())))
    if info.get("note"):
        rows.append(("note", info["note"]))
    if info.get("grid_source"):
        rows.append(("grid", str(info["grid_source"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if info.get("labels") is not None:
        lines.append("")
        lines.append(_label_table(info["labels"]))
        if info.get("label_names_source"):
            where = info["label_names_source"]
            if where == "sidecar" and info.get("label_names_file"):
                where += f" {Path(info['label_names_file']).name}"
            lines.append(f"names from: {where}")
        for warning in info.get("label_names_warnings", []):
            lines.append(f"warning: {warning}")
    for o in info.get("overlaps", []):
        lines.append(f"overlap: segments {o['values'][0]} and {o['values'][1]} share {o['voxels']} voxels")
    return "\n".join(lines)


def _label_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "labels: none (all zero)"
    size_key = next((k for k in ("volume_ml", "area_mm2", "area_px") if k in rows[0]), None)
    colored = any(r.get("color") for r in rows)
    header = (
        ["value", "name", "voxels"]
        + ([size_key.replace("_", " ")] if size_key else [])
        + (["colour"] if colored else [])
    )
    table = [header] + [
        [str(r["value"]), r["name"] or "", str(r["voxels"])]
        + ([f"{r[size_key]:.4g}"] if size_key else [])
        + ([_hex(r.get("color"))] if colored else [])
        for r in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for r in table:
        cells = [c.ljust(w) if j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _hex(color: Any) -> str:
    """``#rrggbb`` of an ``[r, g, b]`` colour (0..255), empty when unknown."""
    return "#{:02x}{:02x}{:02x}".format(*color) if color else ""
