"""Modality-aware intensity normalisation to float32 ``[0, 1]``.

Rules (the parameters actually used are returned by :func:`intensity_parameters`, so reports can say them):

* **CT** (Hounsfield units): a named window (:data:`CT_WINDOWS`), ``[level - width/2, level + width/2]``
  mapped linearly to ``[0, 1]`` and clipped. The window is, in order: the one asked for; the one implied by
  the prompt's concept (:func:`window_for_concept`); ``abdomen``. CT stored as ``uint8`` (already windowed,
  e.g. exported PNG slices) is only divided by 255.
* **MR**: percentiles 0.5 / 99.5 over the **whole volume** (so every slice gets the same mapping), also for
  8-bit MR (an arbitrary rescaling of the scanner's values).
* **PT**: percentiles 0 / 99.5 over the whole volume (background stays 0, the hottest voxels saturate).
* **MICROSCOPY**: ``uint8`` / 255; deeper data by percentiles 1 / 99.8.
* **RGB, US, XR, OTHER**: ``uint8`` / 255 (unchanged 8-bit data); deeper data by percentiles 0.5 / 99.5.

Colour arrays ``(..., C)`` are scaled with one mapping for all channels. Non-finite values become 0.
Percentiles of very large volumes are taken on a deterministic strided subsample of at most
:data:`PERCENTILE_SAMPLE` voxels.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from medsam3.errors import InputError
from medsam3.image import MODALITIES

#: CT windows by name: ``(width, level)`` in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "soft_tissue": (400.0, 40.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}

#: Window used for CT when neither a window nor an informative concept is given.
DEFAULT_CT_WINDOW = "abdomen"

#: Default ``(low, high)`` percentiles for modalities normalised by percentiles.
DEFAULT_PERCENTILES: dict[str, tuple[float, float]] = {
    "MR": (0.5, 99.5),
    "PT": (0.0, 99.5),
    "MICROSCOPY": (1.0, 99.8),
    "US": (0.5, 99.5),
    "XR": (0.5, 99.5),
    "RGB": (0.5, 99.5),
    "OTHER": (0.5, 99.5),
}

#: Modalities normalised by percentiles even when stored as 8 bits (their 8-bit range is arbitrary).
_ALWAYS_PERCENTILES = ("MR", "PT")

#: Largest number of voxels percentiles are computed on (larger arrays are subsampled with a fixed stride).
PERCENTILE_SAMPLE = 4_000_000

# Concept -> window rules, first match wins (see window_for_concept). Patterns match at word starts.
_CONCEPT_RULES: tuple[tuple[str, str], ...] = (
    # Vessels of the lung are soft tissue filled with contrast: mediastinal window, not lung window.
    ("mediastinum", r"\bpulmonary (arter|vein|trunk|embol|vess)"),
    # Focal liver findings need the narrow liver window; the whole organ is fine in the abdomen window.
    ("liver", r"\b(liver|hepatic)\b.*\b(tumou?r|lesion|metasta|cyst|nodul|mass|cancer|carcinoma|vessel)"),
    ("liver", r"\b(tumou?r|lesion|metasta|cyst|nodul|mass|cancer|carcinoma)s?\b.*\b(liver|hepatic)\b"),
    ("liver", r"\b(hcc|hepatocellular|hepatoma)"),
    (
        "lung",
        r"\b(lung|pulmonary|nodul|airway|trache|bronch|emphysem|covid|pneumo|ground.glass|"
        r"consolidation|pleura)",
    ),
    (
        "bone",
        r"\b(bone|skelet|vertebr|spine\b|rib|femur|femor|tibia|fibula|patella|humer|radius\b|ulna|"
        r"clavicl|scapula|sternum|sacrum|sacral|coccyx|skull|cranium|mandibl|pelvic bone|hip\b|hips\b|"
        r"ilium|iliac bone|iliac crest|ischi|pubi|fractur|osteo|carpal|tarsal)",
    ),
    (
        "brain",
        r"\b(brain|cerebr|cerebell|intracranial|hemorrhag|haemorrhag|hematom|haematom|stroke|infarct|"
        r"lateral ventricle|thalam|brainstem|midbrain|pons\b|gyrus|hippocamp)",
    ),
    (
        "mediastinum",
        r"\b(heart|cardiac|myocard|atri(um|al|a)\b|ventric|aort|coronar|pericard|mediastin|"
        r"esophag|oesophag|thymus|superior vena cava)",
    ),
)


def known_windows() -> str:
    """The window names, for messages."""
    return ", ".join(CT_WINDOWS)


def window_for_concept(text: str | None) -> str | None:
    """The CT window a prompt's concept implies, or ``None`` when it implies none (use the default).

    Rules, first match wins (case-insensitive, at word starts):

    * pulmonary arteries / veins / embolism -> ``mediastinum`` (contrast-filled vessels, not air);
    * a focal liver finding ("liver tumor", "hepatic lesion", "HCC") -> ``liver``; the whole "liver" ->
      ``None`` (abdomen window shows the organ against its neighbours);
    * lung, pulmonary, nodule, airway, trachea, bronchi, emphysema, COVID, pneumonia/-thorax, ground-glass,
      pleura -> ``lung``;
    * bones (bone, vertebra, spine, rib, femur, skull, pelvic bone, hip, sacrum, fracture, ...) -> ``bone``;
    * brain, cerebral, cerebellum, intracranial, haemorrhage, haematoma, stroke, infarct, ... -> ``brain``;
    * heart, cardiac, myocardium, atrium, ventricle, aorta, coronary, pericardium, mediastinum, oesophagus,
      thymus, superior vena cava -> ``mediastinum``.
    """
    if not text:
        return None
    t = " ".join(text.lower().replace("_", " ").replace("-", " ").split())
    for window, pattern in _CONCEPT_RULES:
        if re.search(pattern, t):
            return window
    return None


@dataclass(frozen=True)
class IntensityParams:
    """How an array was mapped to ``[0, 1]``: ``out = clip((x - low) / (high - low), 0, 1)``.

    Attributes:
        modality: modality the rule was chosen for.
        method: ``"window"``, ``"percentiles"`` or ``"uint8"`` (stored values divided by ``high``: 255, or
            1 for boolean data).
        low, high: input values mapped to 0 and 1.
        window: window name (``"custom"`` for a ``(width, level)`` pair), CT only.
        width, level: window width and level in HU (CT windows only).
        percentiles: ``(low, high)`` percentiles used (percentile method only).
        source: why this rule: ``"requested"``, ``"concept"``, ``"default"``, ``"8-bit data"`` or
            ``"binary data"``.
    """

    modality: str
    method: str
    low: float
    high: float
    window: str | None = None
    width: float | None = None
    level: float | None = None
    percentiles: tuple[float, float] | None = None
    source: str = "default"

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"CT window abdomen (W400 L40, default)"``."""
        if self.method == "window":
            return (
                f"{self.modality} window {self.window} (W{self.width:g} L{self.level:g}, {self.source}): "
                f"[{self.low:g}, {self.high:g}] HU -> [0, 1]"
            )
        if self.method == "percentiles":
            assert self.percentiles is not None  # set with this method
            lo, hi = self.percentiles
            return (
                f"{self.modality} percentiles {lo:g}-{hi:g} of the whole image ({self.source}): "
                f"[{self.low:.6g}, {self.high:.6g}] -> [0, 1]"
            )
        return f"{self.modality} {self.source} used as stored, divided by {self.high:g}"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        if out["percentiles"] is not None:
            out["percentiles"] = list(out["percentiles"])
        return out


def _check_modality(modality: str) -> str:
    m = (modality or "").upper()
    if m not in MODALITIES:
        raise InputError(None, f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return m


def parse_window(window: str | tuple[float, float]) -> tuple[str, float, float]:
    """``(name, width, level)`` for a window name, a ``"width,level"`` string or a ``(width, level)`` pair.

    Raises :class:`~medsam3.errors.InputError` for an unknown name or a non-positive width.
    """
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key in CT_WINDOWS:
            width, level = CT_WINDOWS[key]
            return key, width, level
        parts = window.replace("/", ",").split(",")
        try:
            width, level = (float(p) for p in parts)
        except ValueError:
            raise InputError(
                None, f"unknown window {window!r}; use one of {known_windows()} or 'WIDTH,LEVEL' in HU"
            ) from None
        name = "custom"
    else:
        width, level = (float(v) for v in window)
        name = "custom"
    if not width > 0:
        raise InputError(None, f"window width must be positive, got {width:g}")
    return name, width, level


def _finite_sample(array: np.ndarray) -> np.ndarray:
    flat = np.asarray(array).reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: int(np.ceil(flat.size / PERCENTILE_SAMPLE))]
    flat = flat.astype(np.float64, copy=False)
    return flat[np.isfinite(flat)]


def intensity_parameters(
    array: np.ndarray,
    modality: str,
    *,
    window: str | tuple[float, float] | None = None,
    concept: str | None = None,
    percentiles: tuple[float, float] | None = None,
) -> IntensityParams:
    """Choose the mapping of ``array`` to ``[0, 1]`` for ``modality`` (see the module docstring).

    ``window`` applies to CT only (a name, ``"width,level"`` or ``(width, level)``); ``concept`` may pick a
    CT window; ``percentiles`` ``(low, high)`` in ``[0, 100]`` overrides the percentile rule (and, for CT,
    replaces windowing). Raises :class:`~medsam3.errors.InputError` for an unknown modality or window.
    """
    m = _check_modality(modality)
    array = np.asarray(array)
    if window is not None and m != "CT":
        raise InputError(
            None, f"a CT window ({window!r}) was given for a {m} image; windows apply to CT only"
        )
    if percentiles is not None:
        lo, hi = (float(p) for p in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise InputError(None, f"percentiles must satisfy 0 <= low < high <= 100, got ({lo:g}, {hi:g})")
    if m == "CT" and percentiles is None:
        if window is not None:
            name, width, level = parse_window(window)
            source = "requested"
        elif array.dtype == np.uint8:
            return IntensityParams(m, "uint8", 0.0, 255.0, source="8-bit data")
        else:
            implied = window_for_concept(concept)
            source = "concept" if implied else "default"
            name = implied or DEFAULT_CT_WINDOW
            width, level = CT_WINDOWS[name]
        return IntensityParams(
            m, "window", level - width / 2, level + width / 2, name, width, level, source=source
        )
    if percentiles is None and array.dtype in (np.uint8, np.bool_) and m not in _ALWAYS_PERCENTILES:
        if array.dtype == np.uint8:
            return IntensityParams(m, "uint8", 0.0, 255.0, source="8-bit data")
        return IntensityParams(m, "uint8", 0.0, 1.0, source="binary data")
    source = "requested" if percentiles is not None else "default"
    lo_p, hi_p = percentiles if percentiles is not None else DEFAULT_PERCENTILES[m]
    sample = _finite_sample(array)
    if sample.size == 0:
        low = high = 0.0
    else:
        low, high = (float(v) for v in np.percentile(sample, [lo_p, hi_p]))
    return IntensityParams(m, "percentiles", low, high, percentiles=(float(lo_p), float(hi_p)), source=source)


def apply_intensity(array: np.ndarray, params: IntensityParams) -> np.ndarray:
    """Map ``array`` with ``params``: float32, same shape, values in ``[0, 1]``; constant input gives 0."""
    x = np.asarray(array, dtype=np.float32)
    span = params.high - params.low
    if span <= 0:
        return np.zeros(x.shape, dtype=np.float32)
    out = (x - np.float32(params.low)) / np.float32(span)
    np.clip(out, 0.0, 1.0, out=out)
    if x.dtype.kind == "f":
        out[~np.isfinite(x)] = 0.0
    return out


def minmax_slice(image: np.ndarray) -> np.ndarray:
    """Medical SAM3 V2's intensity rule for one 2D slice: ``uint8`` as stored; any other type NaN / inf ->
    0, ``float32``, min-max over the slice to 0-255 (a constant slice becomes 0), truncated to ``uint8``."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    x = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return ((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def normalize_intensity(
    array: np.ndarray,
    modality: str,
    *,
    window: str | tuple[float, float] | None = None,
    concept: str | None = None,
    percentiles: tuple[float, float] | None = None,
) -> np.ndarray:
    """``array`` mapped to float32 ``[0, 1]`` by :func:`intensity_parameters` (same arguments)."""
    params = intensity_parameters(array, modality, window=window, concept=concept, percentiles=percentiles)
    return apply_intensity(array, params)
