"""The BiomedSegFM / MedSAM ``.npz`` case layout.

Keys (as in the CVPR BiomedSegFM challenge data and MedSAM2's RECIST set):

* ``imgs``: image, 3D ``(D, H, W)`` = array order ``(Z, Y, X)``, or 2D ``(H, W)`` / ``(H, W, 3)``;
* ``gts``: reference labels on the same grid (optional); predictions use ``segs`` instead;
* ``spacing``: voxel size in **ITK order** ``(x, y, z)``, as ``SimpleITK.GetSpacing()`` gives it. This was
  checked on the real files: MedSAM2's DeepLesion crops store ``(0.31, 0.31, 5.0)`` for 16 slices of
  512 x 512, i.e. in-plane pixel size first and the 5 mm slice step last, and the challenge's own
  npz -> NIfTI converters pass ``spacing`` unchanged to ``SetSpacing`` of ``GetImageFromArray(imgs)``;
* ``direction``: 9 (or 4) values, the row-major flattening of the ITK direction matrix
  (``SimpleITK.GetDirection()``), LPS;
* ``origin``: ITK order, LPS mm;
* ``text_prompts`` (optional): label value -> text. Stored by the challenge as a pickled dict (0-d object
  array, keys are label values as strings, an ``instance_label`` flag may be present). It is unpickled with
  a restricted unpickler that admits only plain containers, strings and numbers, never arbitrary objects.
  A JSON string (0-d unicode array) and a 1-D string array (value ``i + 1`` for item ``i``) are also read;
* ``label_names`` (written by this package): JSON ``{"value": "name"}`` in a 0-d unicode array.

Files are opened with ``allow_pickle=False``; only ``text_prompts`` may go through the restricted
unpickler. Missing geometry defaults to 1 mm spacing, zero origin, identity direction
(``meta['spacing_known'] = False``).
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputError
from medsam3.image import Image

IMAGE_KEY, LABEL_KEYS = "imgs", ("gts", "segs")

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("collections", "OrderedDict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _load_object_array(path: Path, key: str) -> Any:
    """Read an object-dtype ``.npy`` member of an npz through the restricted unpickler."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        data = fh.read()
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        return _RestrictedUnpickler(buf).load()
    buf.seek(0)
    return np.lib.format.read_array(buf, allow_pickle=False)


def _prompts(value: Any) -> dict[int, str]:
    """Label value -> text from any of the stored ``text_prompts`` forms."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "UO" and value.ndim == 0:
        value = value.item()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {1: value}
    if isinstance(value, np.ndarray):
        return {i + 1: str(v) for i, v in enumerate(value.ravel().tolist())}
    if isinstance(value, (list, tuple)):
        return {i + 1: str(v) for i, v in enumerate(value)}
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            try:
                out[int(k)] = str(v)
            except (TypeError, ValueError):
                continue  # flags such as 'instance_label'
    return out


def _check_declared_sizes(path: Path) -> None:
    """Refuse members whose ``.npy`` headers declare more voxels than the limit (a few compressed bytes can
    declare gigabytes), before any array is allocated."""
    from medsam3.io.volumes import MAX_VOXELS_ENV, max_voxels

    limit = max_voxels()
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                        version, np.lib.format.read_array_header_2_0
                    )
                    shape = read(fh)[0]
                count = int(np.prod(shape, dtype=np.float64))  # float: no overflow on forged shapes
                if count > limit:
                    raise InputError(
                        path,
                        f"array {info.filename[:-4]!r} declares shape {tuple(shape)} = {count:,} values, "
                        f"more than the limit of {limit:,} (set {MAX_VOXELS_ENV} to read larger volumes)",
                    )
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return  # np.load below says what is wrong with the file


def _open(path: Path) -> dict[str, Any]:
    _check_declared_sizes(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(path, f"cannot be read as a NumPy .npz archive ({exc})") from exc
    out: dict[str, Any] = {}
    with z:
        for key in z.files:
            try:
                out[key] = z[key]
            except ValueError:  # object array: only prompts are allowed through the restricted unpickler
                if key == "text_prompts":
                    try:
                        out[key] = _load_object_array(path, key)
                    except (pickle.UnpicklingError, ValueError, EOFError, KeyError) as exc:
                        raise InputError(path, f"text_prompts cannot be read safely ({exc})") from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise InputError(path, f"array '{key}' is truncated or corrupt ({exc})") from exc
    return out


def _geometry(path: Path, data: dict[str, Any], shape: tuple[int, ...], nd: int) -> tuple:
    spacing = data.get("spacing")
    known = spacing is not None
    spacing = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=np.float64).ravel()
    if spacing.size != nd or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            path,
            f"has spacing {spacing.tolist()} for a {nd}D image of shape {shape}; "
            f"expected {nd} positive values (x, y[, z])",
        )
    origin = np.asarray(data.get("origin", np.zeros(nd)), dtype=np.float64).ravel()
    direction = np.asarray(data.get("direction", np.eye(nd)), dtype=np.float64).ravel()
    if origin.size != nd or direction.size != nd * nd:
        raise InputError(
            path,
            f"has origin {origin.tolist()} / direction {direction.tolist()} that do not fit a {nd}D image",
        )
    return tuple(spacing), tuple(origin), direction.reshape(nd, nd), known


def _layout(path: Path, array: np.ndarray, spacing: Any) -> tuple[int, bool]:
    """Spatial dimensions and colour flag of ``imgs``."""
    n_sp = None if spacing is None else int(np.asarray(spacing).size)
    if array.ndim == 2:
        return 2, False
    if array.ndim == 3 and array.shape[-1] in (3, 4) and n_sp != 3 and array.shape[0] > 4:
        return 2, True
    if array.ndim == 3:
        return 3, False
    raise InputError(path, f"'imgs' has shape {array.shape}; expected (D, H, W), (H, W) or (H, W, 3)")


def read_npz(path: Path) -> tuple[Image, Image | None, dict[int, str]]:
    """``(image, labels or None, text prompts)`` of a BiomedSegFM npz (see module docstring).

    The label image comes from ``gts`` (or ``segs`` when there is no ``gts``); it carries
    ``meta['label_names']`` from ``label_names`` or the text prompts.
    """
    data = _open(path)
    label_key = next((k for k in LABEL_KEYS if k in data), None)
    base_key = IMAGE_KEY if IMAGE_KEY in data else label_key
    if base_key is None:
        raise InputError(path, f"has keys {sorted(data)}; a BiomedSegFM npz holds 'imgs' (and 'gts'/'segs')")
    prompts = _prompts(data["text_prompts"]) if "text_prompts" in data else {}
    names = dict(prompts)
    if "label_names" in data:
        try:
            names.update({int(k): str(v) for k, v in json.loads(str(data["label_names"])).items()})
        except (json.JSONDecodeError, ValueError, AttributeError) as exc:
            raise InputError(path, f"'label_names' is not a JSON object ({exc})") from exc
    base = data[base_key]
    nd, colour = _layout(path, base, data.get("spacing"))
    shape = base.shape[:nd]
    spacing, origin, direction, known = _geometry(path, data, shape, nd)
    meta = {
        "path": str(path),
        "format": "npz",
        "spacing_known": known,
        "text_prompts": prompts,
        "npz_keys": sorted(data),
    }
    image = None
    if IMAGE_KEY in data:
        image = Image(data[IMAGE_KEY], spacing, origin, direction, "OTHER", dict(meta))
    labels = None
    if label_key is not None:
        lab = data[label_key]
        if lab.shape != shape:
            raise InputError(path, f"'{label_key}' has shape {lab.shape} but 'imgs' {base.shape}")
        if lab.dtype.kind not in "biu":
            if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
                lab = lab.astype(np.int64)
            else:
                raise InputError(path, f"'{label_key}' holds {lab.dtype} values; expected integer labels")
        labels = Image(
            lab,
            spacing,
            origin,
            direction,
            "OTHER",
            dict(meta, is_label=True, label_key=label_key, label_names=names),
        )
    if image is None:  # no 'imgs': the label map stands in for the image
        assert labels is not None
        image = labels
    return image, labels, prompts


def write_npz(labels: np.ndarray, path: Path, reference: Image, label_names: dict[int, str] | None) -> None:
    """Write ``segs`` with the reference geometry (BiomedSegFM keys) and ``label_names`` as JSON."""
    payload: dict[str, Any] = {
        "segs": labels,
        "spacing": np.asarray(reference.spacing, dtype=np.float64),
        "origin": np.asarray(reference.origin, dtype=np.float64),
        "direction": np.asarray(reference.direction, dtype=np.float64).ravel(),
    }
    if label_names:
        payload["label_names"] = np.array(json.dumps({str(k): v for k, v in sorted(label_names.items())}))
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **payload)
