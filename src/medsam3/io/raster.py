"""2D pictures (PNG, JPEG, BMP) through Pillow and TIFF (2D, colour, multi-page stacks) through tifffile.

Reading rules (images):

* grey 8/16/32-bit and float pictures keep their dtype, ``(Y, X)``;
* palette pictures become RGB(A); 1-bit pictures become ``uint8`` 0/255;
* colour pictures whose channels are all equal (R = G = B) and whose alpha, if any, is fully opaque are
  returned as grey ``(Y, X)``: many datasets save grey scans as RGB(A) PNG and nothing is lost
  (``meta['collapsed_channels']`` records it); real colour stays ``(Y, X, 3|4)``;
* a multi-page TIFF (axes Z, Q or I besides Y, X) is a volume ``(Z, Y, X)``; time series, channel stacks
  and colour volumes are refused.

Pixel spacing: pictures rarely carry a physical pixel size. Spacing is 1.0 (pixel units,
``meta['spacing_known'] = False``) unless a TIFF states it in physical units: ImageJ metadata with a unit
of µm / nm / mm / cm, or a resolution in pixels per centimetre. Resolutions per inch and PNG ``pHYs`` are
ignored: they are almost always screen DPI, not a pixel size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputError

_UNIT_MM = {
    "micron": 1e-3,
    "microns": 1e-3,
    "um": 1e-3,
    "\u00b5m": 1e-3,
    "\\u00B5m": 1e-3,
    "nm": 1e-6,
    "mm": 1.0,
    "cm": 10.0,
    "m": 1000.0,
}


def picture_bomb_message(exc: Exception) -> str:
    """The refusal of a picture whose header declares more pixels than Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, twice that is an error); Pillow's message names the declared size."""
    return f"the picture is refused as a decompression bomb: {exc}"


def _pillow_read(path: Path, fmt: str) -> tuple[np.ndarray, str]:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                return np.asarray(im), "P"
            if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
                mode = "RGB"
            if mode == "PA":
                im = im.convert("RGBA")
                mode = "RGBA"
            if mode.startswith("I;16"):
                return np.asarray(im).astype(np.uint16, copy=False), "I;16"
            return np.asarray(im), mode
    except PILImage.DecompressionBombError as exc:
        raise InputError(path, picture_bomb_message(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot be read as {fmt.upper()} ({exc})") from exc


def _palette_to_rgb(path: Path) -> np.ndarray:
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            rgba = "transparency" in im.info
            return np.asarray(im.convert("RGBA" if rgba else "RGB"))
    except PILImage.DecompressionBombError as exc:
        raise InputError(path, picture_bomb_message(exc)) from None


def _tiff_read(path: Path) -> tuple[np.ndarray, str, tuple[float, ...] | None]:
    """TIFF pixel data with its axes string (tifffile's letters) and physical spacing in mm if stated."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            array = series.asarray()
            axes = series.axes
            spacing = _tiff_spacing(tf, series)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise InputError(path, f"cannot be read as TIFF ({exc})") from exc
    return array, axes, spacing


def _tiff_spacing(tf: Any, series: Any) -> tuple[float, ...] | None:
    """``(sx, sy[, sz])`` in mm when the TIFF states a physical pixel size, else ``None``."""
    page = series.pages[0] if series.pages else tf.pages[0]
    tags = page.tags
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    ij = tf.imagej_metadata or {}
    unit_mm = None
    if ij.get("unit") is not None:
        unit_mm = _UNIT_MM.get(str(ij["unit"]).strip().lower())
    elif tags.get("ResolutionUnit") is not None and int(tags["ResolutionUnit"].value) == 3:
        unit_mm = 10.0  # pixels per centimetre
    if unit_mm is None or xres is None or yres is None:
        return None
    try:
        px = xres.value[0] / xres.value[1]
        py = yres.value[0] / yres.value[1]
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    if px <= 0 or py <= 0:
        return None
    out = [unit_mm / px, unit_mm / py]
    if "spacing" in ij:
        out.append(float(ij["spacing"]) * unit_mm)
    return tuple(out)


def _equal_channels(array: np.ndarray) -> bool:
    """True when R = G = B everywhere and the alpha channel, if any, is fully opaque."""
    if array.shape[-1] == 4:
        opaque = np.iinfo(array.dtype).max if array.dtype.kind in "ui" else 1.0
        if not np.all(array[..., 3] == opaque):
            return False
    return bool(np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]))


def read_raster(path: Path, fmt: str, *, as_labels: bool = False) -> dict[str, Any]:
    """Read a PNG / JPEG / BMP / TIFF file.

    Returns ``array`` (``(Y, X)``, ``(Y, X, C)`` or a TIFF stack ``(Z, Y, X)``), ``is_color``, ``spacing``
    (ITK order, mm; ones when unknown), ``spacing_known``, ``mode`` (Pillow mode or TIFF axes) and
    ``collapsed_channels``. With ``as_labels`` palette pictures keep their indices (the labels) instead of
    being expanded to colour.
    """
    spacing_mm = None
    if fmt == "tiff":
        array, axes, spacing_mm = _tiff_read(path)
        array, mode = _tiff_layout(path, array, axes)
    else:
        array, mode = _pillow_read(path, fmt)
        if mode == "P" and not as_labels:
            array, mode = _palette_to_rgb(path), "P->RGB"
        elif mode == "1":
            array = array.astype(np.uint8) * (1 if as_labels else 255)
        elif mode == "LA":
            array = (
                array[..., 0]
                if np.all(array[..., 1] == 255)
                else np.dstack([array[..., :1]] * 3 + [array[..., 1:]])
            )
    collapsed = None
    is_color = array.ndim == 3 and mode not in ("ZYX",) and array.shape[-1] in (3, 4)
    if is_color and _equal_channels(array):
        collapsed = f"{array.shape[-1]} equal channels -> grey"
        array = np.ascontiguousarray(array[..., 0])
        is_color = False
    nd = array.ndim - (1 if is_color else 0)
    known = spacing_mm is not None and len(spacing_mm) >= nd
    spacing = tuple(spacing_mm[:nd]) if spacing_mm is not None and known else (1.0,) * nd
    if nd == 3 and spacing_mm is not None and len(spacing_mm) == 2:
        spacing = (*spacing_mm, 1.0)
    return {
        "array": array,
        "is_color": is_color,
        "spacing": spacing,
        "spacing_known": known,
        "mode": mode,
        "collapsed_channels": collapsed,
    }


def _tiff_layout(path: Path, array: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Reduce a TIFF array to ``(Y, X)``, ``(Y, X, C)`` or ``(Z, Y, X)``; refuse other layouts."""
    keep = [i for i, a in enumerate(axes) if array.shape[i] != 1 or a in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "YX":
        return array, "YX"
    if axes == "YXS" and array.shape[-1] in (3, 4):
        return array, "YXS"
    if len(axes) == 3 and axes.endswith("YX") and axes[0] in "ZQI":
        return array, "ZYX"
    raise InputError(
        path,
        f"is a TIFF with axes {axes} and shape {array.shape}; expected a 2D image (YX), a colour image "
        "(YXS) or a z-stack (ZYX); time series and multi-channel stacks are not supported",
    )


def write_raster(array: np.ndarray, path: Path) -> None:
    """Write a 2D grey ``(Y, X)`` (uint8/uint16) or colour ``(Y, X, 3|4)`` (uint8) array as PNG or BMP,
    or any 2D/3D integer array as TIFF (``.tif``/``.tiff``). The caller checks dtypes."""
    name = path.name.lower()
    if name.endswith((".tif", ".tiff")):
        import tifffile

        tifffile.imwrite(
            path,
            array,
            photometric="minisblack" if array.ndim == 2 or array.shape[-1] not in (3, 4) else "rgb",
        )
        return
    from PIL import Image as PILImage

    PILImage.fromarray(np.ascontiguousarray(array)).save(path)
