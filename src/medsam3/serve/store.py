"""Uploaded images on the server: one folder per server-generated id, display volumes, expiry.

Each image lives in ``<work>/images/<id>/``: the upload under a readable name (``source.nii.gz``,
``series/`` for a DICOM zip, ...) and ``display.npy``, the viewer's copy. Ids come from
:func:`medsam3.serve.jobs.new_id` and are checked with :func:`~medsam3.serve.jobs.is_valid_id` before they
are joined to any path.

Display frame (what the viewer and the slice endpoints show): volumes are reoriented to the canonical LPS
frame of :mod:`medsam3.preprocess.orientation` (axis 0 axial slices shown anterior up, patient's right on
the left) and mapped to ``uint8`` by :func:`medsam3.preprocess.intensity.intensity_parameters` over the whole
volume (the CT abdomen window, MR percentiles, ...). The display array is always 3D, ``(Z, Y, X)`` or
``(Z, Y, X, 3)``; a 2D image is one slice, ``(1, Y, X[, 3])``. Planes: ``axial`` = axis 0 ``(Y, X)``,
``coronal`` = axis 1 ``(Z, X)``, ``sagittal`` = axis 2 ``(Z, Y)``, the last two shown superior up
(:func:`medsam3.preprocess.slices.take_slice` with ``display=True``); a 2D image has one plane, ``image``.

Image description (``ImageRecord.info``, returned by ``GET /api/images/{id}``): its ``display`` entry holds
the display array's ``shape`` and ``channels``, ``spacing_zyx`` (mm per display axis), ``planes`` (per
plane: slice ``count``, ``rows``, ``cols`` and their spacing, :func:`plane_geometry`), ``intensity`` (how
values were mapped to ``uint8``), ``frame`` and ``acquired_plane``: for a volume, the plane its stored slices
lie in (``"axial"``, ``"coronal"`` or ``"sagittal"``: the display plane of the reorientation's through-plane
axis, :attr:`~medsam3.preprocess.orientation.Reorientation.through_plane_axis`, so a display slice of that
plane is one stored slice); ``None`` for a 2D image. Boxes drawn on that plane can be propagated through
the volume (``"propagate"``, :mod:`medsam3.serve.results`).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.image import Image
from medsam3.preprocess.intensity import apply_intensity, intensity_parameters
from medsam3.preprocess.orientation import PLANE_OF_AXIS, Reorientation, plan_reorientation
from medsam3.preprocess.slices import take_slice
from medsam3.serve.errors import ApiError
from medsam3.serve.jobs import is_valid_id
from medsam3.serve.uploads import MASK_OUTPUTS, Stored

#: Plane name -> display array axis.
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2, "image": 0}
_SLAB = 16  # slices mapped to uint8 at a time (bounds the float32 working memory)


def plane_names(ndim: int) -> tuple[str, ...]:
    return ("axial", "coronal", "sagittal") if ndim == 3 else ("image",)


def display_uint8(image: Image) -> tuple[np.ndarray, str]:
    """The image in the display frame as ``uint8`` (module docstring) and how intensities were mapped."""
    reo = plan_reorientation(image)
    array = reo.apply(image.array) if image.ndim == 3 else image.array[None]
    if image.is_color:
        array = array[..., :3]
    if array.dtype == np.uint8 and image.is_color:
        return np.ascontiguousarray(array), "colour image shown as stored"
    params = intensity_parameters(array, image.modality)
    out = np.empty(array.shape, dtype=np.uint8)
    for start in range(0, array.shape[0], _SLAB):
        part = apply_intensity(array[start : start + _SLAB], params)
        out[start : start + _SLAB] = np.rint(part * 255.0).astype(np.uint8)
    return out, params.describe()


def acquired_plane(reo: Reorientation) -> str | None:
    """The display plane whose slices are the stored slices of a volume (``None`` for a 2D image)."""
    axis = reo.through_plane_axis
    return None if axis is None else PLANE_OF_AXIS[axis]


def plane_geometry(display_shape: tuple[int, ...], spacing_zyx: Sequence[float], ndim: int) -> dict:
    """Per plane: slice count, rows, columns and their spacing (mm, or pixel units for pictures)."""
    z, y, x = display_shape[:3]
    sz, sy, sx = spacing_zyx
    planes = {
        "axial": dict(count=z, rows=y, cols=x, row_spacing=sy, col_spacing=sx),
        "coronal": dict(count=y, rows=z, cols=x, row_spacing=sz, col_spacing=sx),
        "sagittal": dict(count=x, rows=z, cols=y, row_spacing=sz, col_spacing=sy),
    }
    if ndim == 2:
        return {"image": planes["axial"]}
    return planes


@dataclass
class ImageRecord:
    """An uploaded image: where its files are and what the client may know about it."""

    id: str
    name: str
    folder: Path
    stored: Stored
    info: dict[str, Any]
    series_uid: str | None = None
    modality: str | None = None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    @property
    def display_path(self) -> Path:
        return self.folder / "display.npy"

    def touch(self) -> None:
        self.last_used = time.time()


class ImageStore:
    """The uploaded images, their in-memory copies (LRU bounded by bytes) and their expiry."""

    def __init__(self, root: Path, *, memory_bytes: int = 1024**3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = int(memory_bytes)
        self._records: dict[str, ImageRecord] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()
        self._loaded: OrderedDict[str, Image] = OrderedDict()
        self._lock = threading.Lock()
        #: Where added and removed records are also written (``put_image`` / ``drop_image``), if anywhere.
        self.state: Any = None

    # -- ids and folders -----------------------------------------------------------------------------
    def new_folder(self, image_id: str) -> Path:
        if not is_valid_id(image_id):
            raise ValueError("invalid image id")
        folder = self.root / image_id
        folder.mkdir(parents=False, exist_ok=False)
        return folder

    def get(self, image_id: str) -> ImageRecord:
        """The record of ``image_id`` (404 unknown or malformed, 410 expired); marks it used."""
        with self._lock:
            rec = self._records.get(image_id) if is_valid_id(image_id) else None
            if rec is None:
                if image_id in self._expired:
                    raise ApiError(410, f"image {image_id} has expired and was removed; upload it again")
                raise ApiError(404, f"unknown image id {image_id[:40]!r}")
            rec.touch()
            return rec

    def find(self, image_id: str) -> ImageRecord | None:
        """The record of ``image_id`` or ``None`` (does not mark it used)."""
        with self._lock:
            return self._records.get(image_id)

    def records(self) -> list[ImageRecord]:
        with self._lock:
            return list(self._records.values())

    # -- adding --------------------------------------------------------------------------------------
    def add(
        self,
        image_id: str,
        folder: Path,
        name: str,
        stored: Stored,
        image: Image,
        series_uid: str | None,
        modality: str | None,
    ) -> ImageRecord:
        """Register a read image: write its display copy and describe it."""
        display, how = display_uint8(image)
        np.save(folder / "display.npy", display, allow_pickle=False)
        reo = plan_reorientation(image)
        spacing_zyx = (
            tuple(reversed(reo.canonical_spacing)) if image.ndim == 3 else (1.0, *image.spacing_array_order)
        )
        mask_file, _ = MASK_OUTPUTS[stored.kind]
        info = {
            "image_id": image_id,
            "name": name,
            "format": stored.format_name,
            "kind": stored.kind,
            "ndim": image.ndim,
            "is_3d": image.ndim == 3,
            "shape": list(image.spatial_shape),
            "spacing": list(image.spacing),
            "spacing_known": image.meta.get("spacing_known", True) is not False,
            "origin": list(image.origin),
            "direction": image.direction.tolist(),
            "modality": image.modality,
            "dtype": str(image.array.dtype),
            "is_color": bool(image.is_color),
            "orientation": reo.original_code if image.ndim == 3 else None,
            "display": {
                "shape": list(display.shape),
                "channels": int(display.shape[3]) if display.ndim == 4 else 1,
                "spacing_zyx": [float(s) for s in spacing_zyx],
                "planes": plane_geometry(display.shape, spacing_zyx, image.ndim),
                "intensity": how,
                "frame": "canonical LPS (axial anterior up, patient right on the left)"
                if image.ndim == 3
                else "as stored",
                "acquired_plane": acquired_plane(reo),
            },
            "mask_format": mask_file.split(".", 1)[1],
            "dicom_seg": stored.kind in ("dicom", "dicom-zip"),
        }
        rec = ImageRecord(image_id, name, folder, stored, info, series_uid, modality)
        with self._lock:
            self._records[image_id] = rec
            self._remember(image_id, image)
        if self.state is not None:
            self.state.put_image(rec)
        return rec

    # -- pixel access --------------------------------------------------------------------------------
    def _remember(self, image_id: str, image: Image) -> None:
        self._loaded[image_id] = image
        self._loaded.move_to_end(image_id)
        total = sum(im.array.nbytes for im in self._loaded.values())
        while len(self._loaded) > 1 and total > self.memory_bytes:
            _, old = self._loaded.popitem(last=False)
            total -= old.array.nbytes

    def load_image(self, rec: ImageRecord) -> Image:
        """The :class:`Image` of ``rec`` (kept in memory while it fits, else read again from its file)."""
        from medsam3.io.readers import read_image

        with self._lock:
            image = self._loaded.get(rec.id)
            if image is not None:
                self._loaded.move_to_end(rec.id)
                return image
        image = read_image(rec.stored.source, series_uid=rec.series_uid, modality=rec.modality)
        image.meta["display_name"] = rec.name
        with self._lock:
            self._remember(rec.id, image)
        return image

    def display(self, rec: ImageRecord) -> np.ndarray:
        """The display array (memory-mapped, read-only)."""
        return np.load(rec.display_path, mmap_mode="r", allow_pickle=False)

    def display_slice(self, rec: ImageRecord, plane: str, index: int) -> np.ndarray:
        """One display slice ``(rows, cols[, 3])`` as shown (superior up for coronal / sagittal)."""
        axis = check_plane(rec.info, plane, index)
        return np.ascontiguousarray(take_slice(self.display(rec), axis, index, display=True))

    # -- removal and expiry --------------------------------------------------------------------------
    def restore(self, rec: ImageRecord) -> None:
        """Know ``rec`` again (a record kept by a server that ran on the same folder before)."""
        with self._lock:
            self._records[rec.id] = rec

    def remove(self, image_id: str, *, expired: bool = False) -> None:
        if self.state is not None:
            self.state.drop_image(image_id)
        with self._lock:
            rec = self._records.pop(image_id, None)
            self._loaded.pop(image_id, None)
            if expired:
                self._expired[image_id] = time.time()
                while len(self._expired) > 10000:
                    self._expired.popitem(last=False)
        if rec is not None:
            shutil.rmtree(rec.folder, ignore_errors=True)


def check_plane(info: dict, plane: str, index: int) -> int:
    """The display axis of ``plane``; 400 for a plane the image lacks or an index out of range."""
    planes = info["display"]["planes"]
    if plane not in planes:
        raise ApiError(400, f"plane {plane[:20]!r} is not one of this image's planes: {', '.join(planes)}")
    count = planes[plane]["count"]
    if not 0 <= index < count:
        raise ApiError(400, f"slice index {index} is out of range for the {plane} plane (0..{count - 1})")
    return PLANE_AXIS[plane]
