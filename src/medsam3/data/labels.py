"""Label files of training datasets: header reads (no pixels) and label maps in the record's label values.

Arrays follow the package frame (:mod:`medsam3.image`): a 3D label map is ``(Z, Y, X)`` in the file's voxel
order (as ``SimpleITK.GetArrayFromImage``), a 2D one ``(Y, X)``. Slices are indexed along axis 0.

A record's ``mask`` spec says how the pixels of its label file(s) become label values:

``values``     pixel value = label value (a grey RGB mask is reduced to one channel).
``binary``     pixel > ``threshold`` (the brightest channel of a colour mask) = ``value`` (default 1);
               0/255 masks and lossy JPEG masks (threshold 127) are read this way.
``instances``  pixel value = instance id of one concept: label value ``value`` wherever the id is > 0.
``palette``    RGB colour -> label value through ``palette`` (``{"r,g,b": value}``).

Optional keys: ``ignore_values`` (pixel values set to background), ``fill_holes`` (fill closed outlines,
slice by slice), ``other_values: "background"`` (values not named by the record become background instead
of being an error at preparation time). Several label files of one record are merged by maximum.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data.manifest import Record
from medsam3.errors import InputError
from medsam3.io.jsonfile import read_json

RASTER_2D = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".webp")
TIFF = (".tif", ".tiff")
ITK = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
NPZ = (".npz",)
READABLE = RASTER_2D + TIFF + ITK + NPZ


def file_suffix(path: str | Path) -> str:
    """Lower-case extension, double for ``.nii.gz``: ``"a/b.nii.gz"`` -> ``".nii.gz"``."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def file_stem(path: str | Path) -> str:
    """File name without its (double) extension."""
    name = Path(path).name
    return name[: len(name) - len(file_suffix(path))] if file_suffix(path) else name


@dataclass(frozen=True)
class Header:
    """What a file's header says about its grid (no pixel data read).

    Attributes:
        shape: spatial array shape, ``(Z, Y, X)`` or ``(Y, X)``.
        channels: samples per pixel (3 for RGB, the 4th axis of a multi-channel NIfTI).
        spacing, origin, direction: ITK-order geometry, ``None`` for formats without geometry (PNG, ...).
    """

    shape: tuple[int, ...]
    channels: int = 1
    spacing: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None

    @property
    def dims(self) -> int:
        return len(self.shape)


def _itk_header(path: Path) -> Header:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            path, f"cannot read the image header ({str(exc).strip().splitlines()[-1]})"
        ) from None
    size = list(reader.GetSize())
    spacing, origin = list(reader.GetSpacing()), list(reader.GetOrigin())
    direction = list(reader.GetDirection())
    channels = reader.GetNumberOfComponents()
    dim = reader.GetDimension()
    if dim == 4:  # MSD multi-modal volumes: the 4th ITK axis holds the channels
        channels *= size[3]
        size, spacing, origin = size[:3], spacing[:3], origin[:3]
        direction = [direction[r * 4 + c] for r in range(3) for c in range(3)]
    if len(size) == 3 and size[2] == 1:  # a 2D image stored as a one-slice volume
        size, spacing, origin = size[:2], spacing[:2], origin[:2]
        direction = [direction[0], direction[1], direction[3], direction[4]]
    return Header(tuple(reversed(size)), channels, tuple(spacing), tuple(origin), tuple(direction))


def read_header(path: str | Path) -> Header:
    """Shape (array order), channels and geometry of an image or label file, from its header only."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = file_suffix(path)
    if suffix in RASTER_2D:
        from PIL import Image as PILImage

        try:
            with PILImage.open(path) as im:
                bands = len(im.getbands())
                return Header((im.size[1], im.size[0]), 1 if im.mode == "P" else bands)
        except OSError as exc:
            raise InputError(path, f"cannot read the image ({exc})") from None
    if suffix in TIFF:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = tuple(series.shape), series.axes
        except (OSError, ValueError, IndexError) as exc:
            raise InputError(path, f"cannot read the TIFF header ({exc})") from None
        channels = 1
        if axes and axes[-1] in "CS" and len(shape) >= 3:
            channels, shape = shape[-1], shape[:-1]
        return Header(tuple(int(s) for s in shape), int(channels))
    if suffix in ITK:
        return _itk_header(path)
    if suffix in NPZ:
        return npz_member_header(path, "imgs")
    raise InputError(path, f"unsupported file type {suffix!r}; expected one of {', '.join(READABLE)}")


def npz_member_header(path: str | Path, key: str) -> Header:
    """Shape of array ``key`` inside an ``.npz`` file, read from the member's ``.npy`` header only.

    BiomedSegFM conventions: 3D ``imgs`` are ``(D, H, W)``, 2D ``imgs`` are ``(H, W, 3)``.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(fh)  # header only, no pixel data
    except KeyError:
        raise InputError(path, f"the npz file has no array {key!r}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"cannot read the npz file ({exc})") from None
    shape = tuple(int(s) for s in shape)
    if key == "imgs" and len(shape) == 3 and shape[-1] in (3, 4):
        return Header(shape[:2], shape[-1])
    return Header(shape)


def read_raw(path: str | Path, npz_key: str = "gts") -> np.ndarray:
    """Pixel data of a label file as stored: ``(Z, Y, X)``, ``(Y, X)`` or ``(Y, X, C)`` for colour masks."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label file not found")
    suffix = file_suffix(path)
    try:
        if suffix in RASTER_2D:
            from PIL import Image as PILImage

            with PILImage.open(path) as im:
                if im.mode == "1":
                    im = im.convert("L")
                return np.asarray(im)
        if suffix in TIFF:
            import tifffile

            return np.asarray(tifffile.imread(path))
        if suffix in ITK:
            import SimpleITK as sitk

            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            return array[0] if array.ndim == 3 and array.shape[0] == 1 else array
        if suffix in NPZ:
            with np.load(path, allow_pickle=False) as z:
                if npz_key not in z.files:
                    raise InputError(path, f"the npz file has no array {npz_key!r} (it has {z.files})")
                return np.asarray(z[npz_key])
    except InputError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"cannot read the label file ({exc})") from None
    raise InputError(path, f"unsupported label file type {suffix!r}")


def _single_channel(raw: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    if raw.ndim == ndim + 1 and raw.shape[-1] in (3, 4):
        rgb = raw[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise InputError(path, "colour mask whose channels differ: use mask mode 'binary' or 'palette'")
        return raw[..., 0]
    return raw


def apply_mask_spec(
    raw: np.ndarray, spec: Mapping[str, Any], path: str | Path, ndim: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn raw label pixels into ``(semantic, instances)``: integer label values, int32 instance ids or None.

    ``ndim`` is the spatial dimensionality (2 or 3); a trailing axis of 3/4 beyond it is a colour axis.
    """
    path = Path(path)
    mode = spec.get("mode", "values")
    colour = raw.ndim == ndim + 1 and raw.shape[-1] in (3, 4)
    instances = None
    if mode == "binary":
        grey = raw[..., :3].max(axis=-1) if colour else raw
        threshold = spec.get("threshold", 0)
        semantic = np.where(grey > threshold, int(spec.get("value", 1)), 0).astype(np.int32)
    elif mode == "palette":
        if not colour:
            raise InputError(path, "mask mode 'palette' needs an RGB mask")
        rgb = raw[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        semantic = np.zeros(code.shape, np.int32)
        known = np.zeros(code.shape, bool)
        for colour_key, value in spec.get("palette", {}).items():
            r, g, b = (int(c) for c in str(colour_key).split(","))
            hit = code == ((r << 16) | (g << 8) | b)
            semantic[hit] = int(value)
            known |= hit
        if not known.all() and spec.get("other_values") != "background":
            bad = np.unique(rgb[~known].reshape(-1, 3), axis=0)[:3]
            raise InputError(
                path, f"colours {[tuple(int(v) for v in c) for c in bad]} are not in the palette"
            )
    elif mode in ("values", "instances"):
        values = _single_channel(raw, path, ndim)
        if values.dtype == np.bool_:
            values = values.astype(np.uint8)
        elif not np.issubdtype(values.dtype, np.integer):
            rounded = np.rint(values)
            if not np.array_equal(rounded, values):
                raise InputError(path, "label map has non-integer values")
            values = rounded.astype(np.int32)
        if mode == "instances":
            instances = np.where(values > 0, values, 0).astype(np.int32)
            semantic = np.where(values > 0, int(spec.get("value", 1)), 0).astype(np.int32)
        else:
            semantic = values  # integer dtype of the file (no copy of large volumes)
    else:
        raise InputError(path, f"unknown mask mode {mode!r}")
    if spec.get("ignore_values"):
        semantic = np.where(np.isin(semantic, [int(v) for v in spec["ignore_values"]]), 0, semantic)
    if spec.get("fill_holes"):
        semantic = _fill_holes(semantic)
    return semantic, instances


def _fill_holes(semantic: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

    out = semantic.copy()
    planes = [out] if out.ndim == 2 else list(out)
    for plane in planes:
        for v in np.unique(plane):
            if v != 0:
                filled = binary_fill_holes(plane == v)
                plane[filled & (plane == 0)] = v
    return out


@dataclass
class LabelArrays:
    """A record's label map in its label values.

    Attributes:
        semantic: ``(Z, Y, X)`` or ``(Y, X)`` integer array (the file's integer dtype, else int32);
            0 background, else a key of ``record.labels`` (or a value of ``record.regions``).
        instances: same shape int32 instance ids (0 none) for instance-labelled records, else None.
        instance_values: instance id -> label value (for COCO and instance maps).
    """

    semantic: np.ndarray
    instances: np.ndarray | None = None
    instance_values: dict[int, int] | None = None


def load_label_arrays(record: Record) -> LabelArrays:
    """Read a manifest record's label file(s) and return its label map (see :class:`LabelArrays`)."""
    if record.layout == "coco":
        from medsam3.data.coco import rasterize_record

        return rasterize_record(record)
    spec = dict(record.mask)
    npz_key = record.source.get("label_key", "gts")
    semantic: np.ndarray | None = None
    instances: np.ndarray | None = None
    for path in record.label:
        raw = read_raw(path, npz_key=npz_key)
        sem, inst = apply_mask_spec(raw, spec, path, record.dims)
        if sem.shape != tuple(record.shape):
            raise InputError(
                path, f"label shape {sem.shape} differs from the manifest's {tuple(record.shape)}"
            )
        semantic = sem if semantic is None else np.maximum(semantic, sem)
        if inst is not None:
            instances = inst if instances is None else np.where(inst > 0, inst, instances)
    assert semantic is not None  # a record has at least one label file (see check_records)
    if spec.get("other_values") == "background":
        known = np.array(sorted(record.labels) + sorted(v for vs in record.regions.values() for v in vs))
        semantic = np.where(np.isin(semantic, known), semantic, 0)
    inst_values = None
    if instances is not None:
        ids = np.unique(instances[instances > 0])
        inst_values = {int(i): int(spec.get("value", 1)) for i in ids}
    return LabelArrays(semantic, instances, inst_values)


def read_label_map_json(path: str | Path) -> tuple[dict[int, str], dict[str, list[int]]]:
    """``(names, regions)`` from a label-map JSON file (see :func:`parse_label_map`)."""
    doc = read_json(path, "label map JSON")
    if isinstance(doc, Mapping) and isinstance(doc.get("labels"), Mapping):
        doc = doc["labels"]
    return parse_label_map(doc, Path(path))


def parse_label_map(doc: Any, source: str | Path | None) -> tuple[dict[int, str], dict[str, list[int]]]:
    """Label names from either dataset.json form, without background.

    MSD form ``{"0": "background", "1": "Anterior"}``; nnU-Net v2 form ``{"background": 0, "liver": 1}``
    where a list value is a region (``{"whole tumor": [1, 2, 3]}``). Returns ``(value -> name, region
    name -> values)``.
    """
    if not isinstance(doc, Mapping) or not doc:
        raise InputError(source, "the label map must be a non-empty JSON object")
    names: dict[int, str] = {}
    regions: dict[str, list[int]] = {}
    keys_numeric = all(str(k).strip().lstrip("-").isdigit() for k in doc)
    for key, val in doc.items():
        try:
            if keys_numeric:
                value, name = int(key), str(val)
            elif isinstance(val, (list, tuple)):
                regions[str(key)] = [int(v) for v in val]
                continue
            else:
                value, name = int(val), str(key)
        except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 is read as infinity
            raise InputError(source, f"label entry {key!r}: {val!r} is not a value/name pair") from None
        if value == 0:
            continue
        if value in names:
            raise InputError(source, f"label value {value} is named twice ({names[value]!r}, {name!r})")
        names[value] = name
    if not names and not regions:
        raise InputError(source, "the label map names no foreground label")
    return names, regions


def concept_target(
    arrays: LabelArrays, record: Record, concept: str, slice_index: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Masks of ``concept`` on one slice: ``(union, objects)``.

    ``union`` is a ``(Y, X)`` bool mask of every label value of the concept (empty for a negative item);
    ``objects`` lists one ``(Y, X)`` bool mask per object: per instance for instance-labelled records, else
    the union itself when it is not empty (a semantic label is one object).
    """
    values = record.concept_values().get(concept)
    if values is None:
        raise InputError(None, f"{record.dataset}/{record.case_id} does not annotate {concept!r}")
    sem = arrays.semantic[slice_index] if arrays.semantic.ndim == 3 else arrays.semantic
    union = np.isin(sem, values)
    if arrays.instances is None:
        return union, ([union] if union.any() else [])
    inst = arrays.instances[slice_index] if arrays.instances.ndim == 3 else arrays.instances
    instance_values = arrays.instance_values or {}
    ids = [i for i in np.unique(inst[union]).tolist() if i and instance_values.get(i) in values]
    return union, [(inst == i) & union for i in ids]
