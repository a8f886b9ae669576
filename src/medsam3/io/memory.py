"""Images that are already in memory: numpy arrays, nibabel and SimpleITK images, to and from :class:`Image`.

Frames (see :mod:`medsam3.image`): an :class:`Image` keeps ITK geometry in LPS millimetres with the array
in ``(Z, Y, X)`` order, exactly as ``SimpleITK.GetArrayFromImage``; so SimpleITK images convert as they
are. A nibabel image's array is indexed ``(i, j, k)`` with an affine to **RAS**: the array is transposed
to ``(k, j, i)`` and the affine turned to LPS (x and y negated); spacing is the length of each affine
column, direction the normalised columns, origin the translation.

:func:`to_image` is what ``medsam3.segment`` and :meth:`Segmenter.segment
<medsam3.predict.segmenter.Segmenter.segment>` call on whatever they are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputError
from medsam3.image import Image

#: RAS <-> LPS: x and y change sign.
_FLIP_XY = np.diag([-1.0, -1.0, 1.0])


def from_numpy(array: np.ndarray, spacing: Any = None, modality: str | None = None) -> Image:
    """An :class:`Image` from a numpy array in array order, identity direction and zero origin.

    ``(Y, X)`` is a 2D image, ``(Y, X, 3|4)`` of ``uint8`` a colour picture, any other 3D array a volume
    ``(Z, Y, X)``. ``spacing`` is in ITK order ``(x, y[, z])`` mm (default 1 mm, unknown for 2D).
    """
    array = np.asarray(array)
    color = array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8
    if array.ndim not in (2, 3):
        raise InputError(
            None,
            f"an array image must be 2D (Y, X), a colour picture (Y, X, 3) or a volume "
            f"(Z, Y, X); got shape {array.shape}",
        )
    if array.dtype.kind not in "biuf":
        raise InputError(None, f"an array image must hold numbers, not {array.dtype}")
    meta: dict[str, Any] = {"path": "array", "format": "numpy"}
    if spacing is None and (array.ndim == 2 or color):
        meta["spacing_known"] = False
    try:
        image = Image.from_array(array, spacing, color=color, **meta)
    except ValueError as exc:
        raise InputError(None, f"array of shape {array.shape} with spacing {spacing}: {exc}") from None
    return _with_modality(image, modality)


def from_sitk(image: Any, modality: str | None = None) -> Image:
    """An :class:`Image` from a ``SimpleITK.Image`` (2D, 3D, or 2D with RGB / RGBA pixels)."""
    import SimpleITK as sitk

    d = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    color = image.GetNumberOfComponentsPerPixel() > 1
    if d not in (2, 3) or (color and d != 2):
        raise InputError(
            None,
            f"a SimpleITK image must be 2D, 3D or a 2D colour picture; got {d}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components",
        )
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)
    out = Image(
        array,
        image.GetSpacing(),
        image.GetOrigin(),
        direction,
        "OTHER",
        {"path": "SimpleITK image", "format": "sitk"},
    )
    return _with_modality(out, modality)


def to_sitk(image: Image) -> Any:
    """A ``SimpleITK.Image`` with ``image``'s array and geometry."""
    from medsam3.io.volumes import sitk_image

    return sitk_image(image.array, image.spacing, image.origin, image.direction, is_color=image.is_color)


def from_nibabel(image: Any, modality: str | None = None) -> Image:
    """An :class:`Image` from a 3D nibabel image (NIfTI, MGH, ...; module docstring for the frames)."""
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(None, f"a nibabel image must be 3D; got shape {data.shape}")
    from medsam3.io.volumes import nibabel_geometry

    spacing, origin, direction = nibabel_geometry(image.affine, 3)
    if 0.0 in spacing:
        raise InputError(None, f"the nibabel image's affine is singular: {image.affine.tolist()}")
    out = Image(
        np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing,
        origin,
        direction,
        "OTHER",
        {"path": "nibabel image", "format": "nibabel"},
    )
    return _with_modality(out, modality)


def to_nibabel(image: Image) -> Any:
    """A ``nibabel.Nifti1Image`` of a 3D ``image`` (a 2D image becomes one slice), affine in RAS."""
    import nibabel as nib

    if image.is_color:
        raise InputError(None, "a colour picture has no NIfTI form here; use to_sitk or write a PNG")
    if image.ndim == 2:
        array = image.array[None]
        spacing = (*image.spacing, 1.0)
        origin = (*image.origin, 0.0)
        direction = np.eye(3)
        direction[:2, :2] = image.direction
    else:
        array, spacing, origin, direction = image.array, image.spacing, image.origin, image.direction
    affine = np.eye(4)
    affine[:3, :3] = _FLIP_XY @ direction @ np.diag(spacing)
    affine[:3, 3] = _FLIP_XY @ np.asarray(origin)
    out = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _with_modality(image: Image, modality: str | None) -> Image:
    from medsam3.io.modality import guess_modality, normalise_modality

    if modality is not None:
        try:
            image.modality = normalise_modality(modality)
        except ValueError as exc:
            raise InputError(None, str(exc)) from exc
        return image
    image.modality = guess_modality(
        image.array,
        dicom_modality=None,
        is_color=image.is_color,
        ndim=image.ndim,
        name=str(image.meta.get("path", "")),
        file_format=image.meta.get("format"),
    )
    return image


def to_image(value: Any, *, spacing: Any = None, modality: str | None = None) -> Image:
    """Whatever a user holds as an :class:`Image`: an ``Image`` (as it is), a path (read with
    :func:`medsam3.io.readers.read_image`), a nibabel image, a SimpleITK image, or a numpy array with an
    optional ``spacing`` (:func:`from_numpy`). ``modality`` overrides the guessed one.

    Raises:
        InputError: a value of another type, or one that cannot be read.
    """
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, Path)):
        from medsam3.io.readers import read_image

        return read_image(value, modality=modality)
    if isinstance(value, np.ndarray):
        return from_numpy(value, spacing, modality)
    module = type(value).__module__.split(".")[0]
    if module == "SimpleITK":
        return from_sitk(value, modality)
    if module == "nibabel":
        return from_nibabel(value, modality)
    raise InputError(
        None,
        f"cannot segment a {type(value).__name__}: give a path, a numpy array, a "
        "medsam3 Image, a nibabel image or a SimpleITK image",
    )
