"""``medsam3 preview FILE -o OUT_DIR``: show what the model will see, and optionally a label overlay.

The image is read, reoriented to the canonical frame, normalised for its modality and written as PNGs:

* 2D: ``model_input.png`` (the ``size x size`` RGB model input);
* 3D: ``model_input.png`` (the middle slice of the acquisition plane, ``size x size``), ``planes.png``
  (axial / coronal / sagittal through the centre) and ``montage.png`` (slices of the acquisition plane);
* with ``--labels``: ``overlay.png`` (2D) or ``overlay_planes.png`` and ``overlay_montage.png`` (3D);
* ``preview.json``: shape, spacing, orientation, intensity mapping and the files written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from medsam3.errors import InputError
from medsam3.image import MODALITIES, Image
from medsam3.io.atomic import atomic_path, protect_inputs, write_text_atomic
from medsam3.overlay import overlay_2d, overlay_volume
from medsam3.preprocess.intensity import (
    CT_WINDOWS,
    apply_intensity,
    intensity_parameters,
    parse_window,
)
from medsam3.preprocess.orientation import PLANE_OF_AXIS, Reorientation, to_canonical
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb, take_slice


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preview",
        help="write PNG previews of the model input (and of a label map over it)",
        description=(
            "Read an image or volume, reorient it to the canonical frame (LPS, axial slices, radiological "
            "view), normalise its intensities for its modality and write PNG previews of the model input."
        ),
    )
    p.add_argument(
        "file", type=Path, help="image or volume (NIfTI, DICOM folder, NRRD/MHA, PNG/JPEG/TIFF, npz)"
    )
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument(
        "--modality",
        type=str.upper,
        choices=MODALITIES,
        help="override the modality guessed from the file",
    )
    p.add_argument(
        "--window",
        help=f"CT window: one of {', '.join(CT_WINDOWS)} or WIDTH,LEVEL in HU (default: from --concept, "
        "else abdomen)",
    )
    p.add_argument(
        "--concept", help="the target's text prompt, used to choose a CT window (e.g. 'lung nodule')"
    )
    p.add_argument("--size", type=int, default=1008, help="model input side in pixels (default 1008)")
    p.add_argument("--labels", type=Path, metavar="LABELMAP", help="label map on the same grid, to overlay")
    p.add_argument(
        "--label-names",
        metavar="JSON[#KEY]",
        help='label names: {"1": "liver", ...}, {"liver": 1, ...}, an nnU-Net dataset.json, or the object '
        "under KEY of a JSON file (e.g. labels.json#total)",
    )
    p.set_defaults(func=run)


def split_names_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``"labels.json#total"`` -> ``(Path("labels.json"), "total")``; no ``#``: key ``None``."""
    path, sep, key = str(spec).partition("#")
    return Path(path), (key if sep else None)


def load_label_names(spec: str | Path) -> dict[int, str]:
    """Label value -> name from a JSON file: ``{"1": "liver"}``, ``{"liver": 1}`` or ``{"labels": {...}}``.

    ``"FILE.json#KEY"`` reads the object under ``KEY`` (e.g. one class map of a file holding several).
    """
    path, key = split_names_spec(spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read label names: {exc}") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else "none"
            raise InputError(path, f"no key {key!r} in the label names file (keys: {keys})")
        data = data[key]
    elif isinstance(data, dict) and isinstance(data.get("labels"), dict):
        data = data["labels"]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        raise InputError(path, f"several label sets ({', '.join(data)}); pick one with {path}#KEY")
    if not isinstance(data, dict):
        raise InputError(path, "label names must be a JSON object")
    names: dict[int, str] = {}
    for key, value in data.items():
        try:
            if isinstance(value, int) and not isinstance(value, bool):
                names[int(value)] = str(key)
            else:
                names[int(key)] = str(value)
        except (TypeError, ValueError):
            raise InputError(path, f"entry {key!r}: {value!r} is not a label value and a name") from None
    names.pop(0, None)
    return names


def _fmt(values, digits: int = 4) -> str:
    return " x ".join(f"{float(v):.{digits}g}" for v in values)


def _save_png(rgb: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp:
        PILImage.fromarray(rgb).save(tmp, format="PNG")
    return path


def _read(args) -> tuple[Image, Image | None, dict[int, str]]:
    from medsam3.io.readers import read_image, read_label_map

    if not args.file.exists():
        raise InputError(args.file, "no such file or folder")
    image = read_image(args.file, modality=args.modality)
    labels = None
    names: dict[int, str] = {}
    if args.labels is not None:
        if not args.labels.exists():
            raise InputError(args.labels, "no such file or folder")
        labels = read_label_map(args.labels, reference=image)
        if labels.spatial_shape != image.spatial_shape:
            raise InputError(
                args.labels,
                f"label map shape {labels.spatial_shape} does not match the image shape "
                f"{image.spatial_shape}",
            )
        names.update({int(k): str(v) for k, v in (labels.meta.get("label_names") or {}).items()})
    if args.label_names is not None:
        names.update(load_label_names(args.label_names))
    if labels is not None and not names:
        present = [int(v) for v in np.unique(labels.array) if v > 0]
        if len(present) == 1:  # a single unnamed mask: call it by its file name
            names[present[0]] = Path(str(args.labels).rstrip("/")).name.split(".")[0]
    return image, labels, names


def run(args: argparse.Namespace) -> int:
    if args.size < 8:
        raise InputError(None, f"--size must be at least 8 pixels, got {args.size}")
    if args.window is not None:
        parse_window(args.window)  # fail before reading anything
    names_file = None if args.label_names is None else split_names_spec(args.label_names)[0]
    protect_inputs([p for p in (args.file, args.labels, names_file) if p is not None])
    image, labels, names = _read(args)
    canon, reo = to_canonical(image)
    pixels = canon.array[..., :3] if canon.is_color else canon.array
    params = intensity_parameters(pixels, canon.modality, window=args.window, concept=args.concept)
    norm = apply_intensity(pixels, params)
    lab = None if labels is None else reo.apply(np.asarray(labels.array))
    out: Path = args.out
    name = Path(str(args.file).rstrip("/")).name
    title = f"{name}  ·  {params.describe().split(':')[0]}"
    written: list[Path] = []

    print(f"medsam3 preview: {args.file}")
    fmt = image.meta.get("format", "?")
    print(f"  image        {fmt}, {canon.modality}, {image.ndim}D, array shape {tuple(image.array.shape)}")
    axes = "z, y, x" if canon.ndim == 3 else "y, x"
    if image.meta.get("spacing_known", True):
        print(f"  spacing      {_fmt(canon.spacing_array_order)} mm ({axes})")
    else:
        print("  spacing      not stated in the file (pixel units)")
    print(f"  orientation  {reo.describe()}")
    print(f"  intensity    {params.describe()}")

    if canon.ndim == 2:
        height, width = canon.spatial_shape
        hw = (height, width)
        rgb = slice_to_rgb(norm)
        model_rgb = ResizeTransform(hw, args.size).image(rgb)
        written.append(_save_png(model_rgb, out / "model_input.png"))
        print(f"  model input  {hw[1]} x {hw[0]} px -> {args.size} x {args.size} RGB uint8")
        if lab is not None:
            res = overlay_2d(
                norm, lab, names, out / "overlay.png", title=title, spacing_yx=canon.spacing_array_order
            )
            written.append(res.path)
        axis = None
    else:
        through = reo.through_plane_axis
        assert through is not None  # a volume's plan has one
        axis = through
        n = canon.spatial_shape[through]
        mid = n // 2
        sl = take_slice(norm, through, mid, display=True)
        model_rgb = ResizeTransform((sl.shape[0], sl.shape[1]), args.size).image(slice_to_rgb(sl))
        written.append(_save_png(model_rgb, out / "model_input.png"))
        print(
            f"  model input  {n} {PLANE_OF_AXIS[through]} slices (axis {through}) of {sl.shape[1]} x "
            f"{sl.shape[0]} px -> {args.size} x {args.size} RGB uint8; model_input.png is slice {mid}"
        )
        spacing = canon.spacing_array_order
        for mode in ("planes", "montage"):
            res = overlay_volume(
                norm, None, None, out / f"{mode}.png", spacing, mode, title=title, axis=through
            )
            written.append(res.path)
        if lab is not None:
            for mode in ("planes", "montage"):
                res = overlay_volume(
                    norm, lab, names, out / f"overlay_{mode}.png", spacing, mode, title=title, axis=through
                )
                written.append(res.path)
    if lab is not None:
        present = [int(v) for v in np.unique(lab) if v > 0]
        shown = ", ".join(f"{v}: {names.get(v, f'label {v}')}" for v in present[:8])
        more = f" and {len(present) - 8} more" if len(present) > 8 else ""
        listing = f": {shown}{more}" if present else " (no foreground)"
        print(f"  labels       {len(present)} present{listing}")

    summary = _summary(args, image, canon, reo, params, axis, lab, names, written)
    written.append(write_text_atomic(out / "preview.json", json.dumps(summary, indent=2) + "\n"))
    print("  wrote        " + "\n               ".join(str(p) for p in written))
    return 0


def _summary(args, image: Image, canon: Image, reo: Reorientation, params, axis, lab, names, written) -> dict:
    present = [] if lab is None else [int(v) for v in np.unique(lab) if v > 0]
    return {
        "input": str(args.file),
        "format": image.meta.get("format"),
        "modality": canon.modality,
        "original_shape": list(image.array.shape),
        "canonical_shape": list(canon.array.shape),
        "spacing_array_order_mm": list(canon.spacing_array_order),
        "orientation": {
            "original": reo.original_code,
            "canonical": reo.canonical_code,
            "source_axes": list(reo.source_axes),
            "flipped_axes": list(reo.flipped),
            "through_plane_axis": axis,
        },
        "intensity": params.to_dict(),
        "model_input_size": args.size,
        "labels": None
        if lab is None
        else {"file": str(args.labels), "present": {str(v): names.get(v, f"label {v}") for v in present}},
        "files": [p.name for p in written],
    }
