"""Guess an image's modality (one of :data:`medsam3.image.MODALITIES`) from what the file tells.

Rules, first match wins (an explicit ``modality=`` given by the user always overrides the guess):

1. **DICOM Modality tag** (0008,0060): CT, MR, PT, US map to themselves; the projection radiography
   family (CR, DX, MG, RF, XA, IO, PX, RG, DF) to ``XR``; photographic modalities (ES endoscopy, XC
   external camera, OP ophthalmic photography, GM general microscopy) to ``RGB``; SM slide microscopy to
   ``RGB`` when in colour, else ``MICROSCOPY``; NM to ``PT`` (emission imaging, same intensity handling).
   Other tags (OT, SC, ...) fall through to the next rules.
2. **A modality word in the file name**, as datasets name their files: BiomedSegFM ``CT_...npz`` /
   ``MR_...``, BiomedParse ``..._MRI_brain.png``. Matched as whole ``_``/``-``/``.``/space separated
   tokens: ``CT``, ``MR``/``MRI``, ``PET``, ``US``/``ultrasound``, ``X-Ray``/``xray``/``CXR``,
   ``endoscopy``/``endoscope``/``colonoscopy``/``dermoscopy``/``fundus``/``pathology``/``histology``
   (``RGB``), ``microscopy``/``fluorescence`` (``MICROSCOPY``). Short codes (CT, MR, US) must be upper
   case so that ordinary words do not match.
3. **Colour** (three or four channels that differ) -> ``RGB``.
4. **Negative values below -200** -> ``CT``: only Hounsfield units put air at about -1000; MR, PET and
   photographs never go that low (interpolated MR may dip slightly below zero, hence the margin).
5. **2D grey picture** (PNG, JPEG, BMP, TIFF): a 16-bit or wider integer type, or values above 255 ->
   ``MICROSCOPY`` (fluorescence and EM export 16-bit TIFF/PNG; radiographs usually arrive as DICOM, rule
   1); 8-bit grey -> ``OTHER``: an 8-bit grey picture is equally likely an ultrasound frame, an exported
   CT/MR slice or a radiograph, and no pixel statistic tells them apart reliably, so the tool does not
   pretend to know (pass ``--modality``).
6. **3D grey** from TIFF -> ``MICROSCOPY`` (z-stacks); any other grey volume (or 2D slice stored in a
   medical volume format: NIfTI, NRRD, MetaImage, npz) without HU values -> ``MR`` (the common non-CT
   volume; PET arrives as DICOM or with a name, rules 1-2).
"""

from __future__ import annotations

import re

import numpy as np

from medsam3.image import MODALITIES

_DICOM_MAP = {
    "CT": "CT",
    "MR": "MR",
    "PT": "PT",
    "NM": "PT",
    "US": "US",
    "CR": "XR",
    "DX": "XR",
    "MG": "XR",
    "RF": "XR",
    "XA": "XR",
    "IO": "XR",
    "PX": "XR",
    "RG": "XR",
    "DF": "XR",
    "XR": "XR",
    "ES": "RGB",
    "XC": "RGB",
    "OP": "RGB",
    "GM": "RGB",
}

#: Case-sensitive short tokens and case-insensitive words found in file names.
_NAME_CODES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PET": "PT", "US": "US", "CXR": "XR", "DXA": "XR"}
_NAME_WORDS = {
    "mri": "MR",
    "pet": "PT",
    "ultrasound": "US",
    "sonography": "US",
    "xray": "XR",
    "x-ray": "XR",
    "radiograph": "XR",
    "endoscopy": "RGB",
    "endoscope": "RGB",
    "colonoscopy": "RGB",
    "dermoscopy": "RGB",
    "fundus": "RGB",
    "pathology": "RGB",
    "histology": "RGB",
    "histopathology": "RGB",
    "microscopy": "MICROSCOPY",
    "fluorescence": "MICROSCOPY",
}

#: Picture formats (as opposed to the medical volume formats NIfTI, NRRD, MetaImage, DICOM, npz).
_RASTER_FORMATS = ("png", "jpeg", "bmp", "tiff")

#: Values below this are taken as Hounsfield units (air is about -1000 HU).
HU_THRESHOLD = -200.0


def normalise_modality(value: str) -> str:
    """Map a user-given modality (any case, DICOM code or project code) to one of ``MODALITIES``.

    Raises ``ValueError`` for an unknown value.
    """
    v = value.strip().upper()
    if v in MODALITIES:
        return v
    if v in _DICOM_MAP:
        return _DICOM_MAP[v]
    if v in ("MRI", "PET", "XRAY", "X-RAY"):
        return {"MRI": "MR", "PET": "PT", "XRAY": "XR", "X-RAY": "XR"}[v]
    raise ValueError(f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)}")


def modality_from_name(name: str) -> str | None:
    """The modality a file name states (rule 2 of the module docstring), or ``None``."""
    lowered = name.lower()
    if "x-ray" in lowered:
        return "XR"
    for token in re.split(r"[_\-.\s+]+", name):
        if token in _NAME_CODES:
            return _NAME_CODES[token]
        if token.lower() in _NAME_WORDS:
            return _NAME_WORDS[token.lower()]
    return None


def guess_modality(
    array: np.ndarray,
    *,
    dicom_modality: str | None = None,
    is_color: bool = False,
    ndim: int | None = None,
    name: str | None = None,
    file_format: str | None = None,
    value_range: tuple[float, float] | None = None,
) -> str:
    """Guess the modality of ``array`` by the rules of this module's docstring.

    Args:
        array: pixel data, ``(Z, Y, X)``, ``(Y, X)`` or ``(Y, X, C)``.
        dicom_modality: the DICOM Modality tag, if the image came from DICOM.
        is_color: the trailing axis holds distinct colour channels.
        ndim: spatial dimensions (2 or 3); defaults to ``array.ndim`` less the channel axis.
        name: file name (or folder name) to look for a modality word in.
        file_format: the reader's format name (``"tiff"`` makes grey volumes microscopy stacks).
        value_range: ``(min, max)`` when already computed (saves a pass over large volumes).
    """
    if dicom_modality:
        mapped = _DICOM_MAP.get(dicom_modality.strip().upper())
        if dicom_modality.strip().upper() == "SM":
            mapped = "RGB" if is_color else "MICROSCOPY"
        if mapped:
            return mapped
    if name:
        from_name = modality_from_name(name)
        if from_name:
            return from_name
    if is_color:
        return "RGB"
    if ndim is None:
        ndim = array.ndim
    if array.size == 0:
        return "OTHER"
    lo, hi = value_range if value_range is not None else (float(np.min(array)), float(np.max(array)))
    if lo < HU_THRESHOLD:
        return "CT"
    raster = file_format in _RASTER_FORMATS
    if ndim == 2 and (raster or file_format is None):
        wide = array.dtype.kind in "iu" and array.dtype.itemsize >= 2
        return "MICROSCOPY" if wide or hi > 255 else "OTHER"
    if file_format == "tiff":
        return "MICROSCOPY"
    return "MR"
