"""Matching prediction files to reference files, their labels to each other, and their grids.

Cases are paired by **key**: the file name without its extension (``.nii.gz`` and ``.seg.nrrd`` count as
one) and without one trailing role suffix, compared case-insensitively. The role suffixes are
:data:`ROLE_SUFFIXES` (``_mask``, ``_pred``, ``_prediction``, ``_seg``, ``_segmentation``, ``_label``,
``_labels``, ``_gt``, ``_annotation``), so ``case7_mask.png``, ``case7_pred.nii.gz`` and ``case7.nii.gz``
all have the key ``case7``. Only one suffix is removed (``a_seg_mask`` -> ``a_seg``). Two files of one folder
with the same key are an error naming both. Folders are read flat (no sub-folders); files with an extension
no reader knows, JSON files, overlays written by ``medsam3 segment`` (``*_overlay.png``) and hidden files
are not cases.

Labels are matched **by name**. Names come from, in order:

* predictions: the ``--label-map`` file (prediction value -> name, for every prediction); else the JSON
  summary written beside the prediction by ``medsam3 segment`` (``<key>.json`` or ``<stem>.json``: every
  label's value and prompt); else names stored in the file (DICOM SEG segment labels, Slicer ``.seg.nrrd``
  segment names, npz ``label_names``);
* references: the ``--ref-labels`` file; else ``dataset.json`` in the reference folder (MSD / nnU-Net
  ``labels``); else names stored in the file.

Names are compared as canonical concepts (:class:`~medsam3.data.vocabulary.Vocabulary`: ``"Kidney_L"``
matches ``"left kidney"``, ``"Polyps"`` matches ``"polyp"``). A prediction without names is read in the
reference's label values (the nnU-Net convention), and a binary reference without names (values 0/1) is
matched to the prediction's single label, whatever its name. Labels of the prediction that no reference
label names are listed in the warnings and not scored (the reference says nothing about them).

Grids: a prediction must lie on its reference's grid. Pictures without a pixel size (PNG, JPEG) only need
the same shape. Grids related exactly by axis flips / permutations or an integer voxel offset are
rearranged without interpolation (:func:`medsam3.io.geometry.place_on_grid`). Anything else is an error
naming both files and both geometries, unless ``resample=True``: the prediction is then resampled onto the
reference grid by nearest neighbour (SimpleITK, in physical space; pictures without a pixel size are
stretched to the reference shape).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam3.data.labels import read_label_map_json
from medsam3.data.vocabulary import Vocabulary
from medsam3.errors import InputError
from medsam3.image import Image
from medsam3.io.geometry import describe_geometry, place_on_grid
from medsam3.io.sniff import extension_format

#: Trailing name parts that mark a file's role rather than its case (removed once, case-insensitively).
ROLE_SUFFIXES = (
    "_mask",
    "_pred",
    "_prediction",
    "_seg",
    "_segmentation",
    "_label",
    "_labels",
    "_gt",
    "_annotation",
)
_COMPOUND = (".seg.nrrd", ".nii.gz")
_SUFFIX_RE = re.compile("(" + "|".join(re.escape(s) for s in ROLE_SUFFIXES) + ")$", re.IGNORECASE)


# -- keys and folders ------------------------------------------------------------------------------------
def file_stem(path: str | Path) -> str:
    """Name without its extension; ``.nii.gz`` and ``.seg.nrrd`` count as one extension."""
    name = Path(path).name
    for ext in _COMPOUND:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name[1:] else name


def case_name(path: str | Path) -> str:
    """A file's case name: its stem without one role suffix, case kept (``A_Mask.png`` -> ``A``)."""
    stem = file_stem(path)
    return _SUFFIX_RE.sub("", stem) or stem


def case_key(path: str | Path) -> str:
    """The pairing key of a file: :func:`case_name` in lower case (``A_Mask.png`` -> ``a``)."""
    return case_name(path).casefold()


def _is_case_file(path: Path) -> bool:
    name = path.name.lower()
    if not path.is_file() or name.startswith(".") or ".part." in name:
        return False
    if name.endswith(".json") or name.endswith("_overlay.png"):
        return False
    return extension_format(path) is not None


def index_folder(folder: str | Path, what: str) -> dict[str, Path]:
    """``{key: file}`` for the case files directly inside ``folder`` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, f"{what} folder not found")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not _is_case_file(path):
            continue
        key = case_key(path)
        if key in out:
            raise InputError(path, f"has the same case key {key!r} as {out[key].name}: one {what} per case")
        out[key] = path
    return out


# -- label names -----------------------------------------------------------------------------------------
def load_names_file(path: str | Path) -> dict[int, str]:
    """Value -> name from a JSON map (``{"1": "liver"}``, ``{"liver": 1}``, or either under ``labels``)."""
    names, regions = read_label_map_json(path)
    if regions:
        raise InputError(path, f"region labels {sorted(regions)} cannot be matched to prediction values")
    return names


@dataclass
class SummaryLabels:
    """What a ``medsam3 segment`` JSON summary says about a prediction's labels."""

    names: dict[int, str] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    presence: dict[int, float] = field(default_factory=dict)
    source: str = ""


def read_summary(path: Path) -> SummaryLabels:
    """Label value -> prompt text (and score, presence) from a JSON summary written by ``medsam3 segment``."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the prediction summary JSON ({exc})") from None
    entries = doc.get("labels") if isinstance(doc, Mapping) else None
    if not isinstance(entries, list):
        raise InputError(path, "is not a prediction summary (no 'labels' list)")
    out = SummaryLabels(source=str(path))
    for e in entries:
        if not isinstance(e, Mapping) or e.get("value") is None:
            continue
        value = int(e["value"])
        raw_prompt = e.get("prompt")
        prompt = raw_prompt if isinstance(raw_prompt, Mapping) else {}
        out.names[value] = str(prompt.get("text") or e.get("name") or f"label {value}")
        if e.get("score") is not None:
            out.scores[value] = float(e["score"])
        if e.get("presence") is not None:
            out.presence[value] = float(e["presence"])
    return out


def summary_for(pred_path: Path) -> Path | None:
    """The JSON summary beside a prediction file (``<key>.json`` or ``<stem>.json``), if any."""
    stem = file_stem(pred_path)
    for name in (stem + ".json", _SUFFIX_RE.sub("", stem) + ".json"):
        candidate = pred_path.with_name(name)
        if candidate.is_file():
            return candidate
    return None


def reference_names(ref_dir: Path, ref_labels: str | Path | None) -> tuple[dict[int, str], str]:
    """Names every reference shares: ``(value -> name, where they came from)`` (empty when none)."""
    if ref_labels is not None:
        return load_names_file(ref_labels), str(ref_labels)
    dataset_json = ref_dir / "dataset.json"
    if dataset_json.is_file():
        return load_names_file(dataset_json), str(dataset_json)
    return {}, ""


@dataclass
class LabelMatch:
    """One reference label and the prediction values that mean it."""

    ref_value: int
    name: str
    pred_values: list[int]
    score: float | None = None
    presence: float | None = None
    how: str = "name"


def match_labels(
    ref_values: list[int],
    ref_names: Mapping[int, str],
    pred_values: list[int],
    pred_names: Mapping[int, str],
    vocabulary: Vocabulary,
    dataset: str = "",
    where: str = "",
) -> tuple[list[LabelMatch], list[str]]:
    """Pair reference label values with prediction label values (module docstring for the rules).

    Args:
        ref_values: reference label values to score (non-zero).
        ref_names, pred_names: value -> name on each side (empty when unknown).
        pred_values: non-zero values present in the prediction.
        where: the case, for messages.

    Returns:
        ``(matches, warnings)``: one :class:`LabelMatch` per reference value, and notes on unmatched
        prediction labels.
    """
    concept = lambda n: vocabulary.concept(n, dataset)  # noqa: E731
    warnings: list[str] = []
    if not pred_names:
        if not ref_names and set(ref_values) <= {1} and len(pred_values) > 1:
            raise InputError(
                None,
                f"{where}: the reference is one unnamed label but the prediction holds values "
                f"{pred_values} without names; give --label-map for the prediction",
            )
        binary = set(ref_values) <= {1} and len(pred_values) <= 1
        out = []
        for v in ref_values:
            values = list(pred_values) if binary else [v]
            name = concept(ref_names[v]) if v in ref_names else ("foreground" if binary else f"label {v}")
            out.append(LabelMatch(v, name, values, how="single label" if binary else "value"))
        extra = sorted(set(pred_values) - set(ref_values)) if not binary else []
        if extra:
            warnings.append(f"{where}: prediction values {extra} are not reference labels (not scored)")
        return out, warnings
    pred_concepts: dict[str, list[int]] = {}
    for v, n in sorted(pred_names.items()):
        pred_concepts.setdefault(concept(n), []).append(v)
    if not ref_names:
        if not set(ref_values) <= {1}:
            raise InputError(
                None,
                f"{where}: reference labels {ref_values} have no names while the prediction's labels "
                f"are named ({', '.join(sorted(pred_concepts))}); give --ref-labels",
            )
        if len(pred_concepts) > 1:
            raise InputError(
                None,
                f"{where}: the reference is one unnamed label but the prediction names several "
                f"({', '.join(sorted(pred_concepts))}); give --ref-labels to say which one it is",
            )
        name, values = next(iter(pred_concepts.items()))
        return [LabelMatch(v, name, values, how="single label") for v in ref_values], warnings
    out = []
    for v in ref_values:
        c = concept(ref_names.get(v, f"label {v}"))
        out.append(LabelMatch(v, c, list(pred_concepts.get(c, [])), how="name"))
    unnamed = sorted(c for c in pred_concepts if c not in {concept(n) for n in ref_names.values()})
    if unnamed:
        warnings.append(f"{where}: predicted labels {unnamed} are not named by the reference (not scored)")
    return out, warnings


# -- grids -----------------------------------------------------------------------------------------------
def _spacing_known(image: Image) -> bool:
    return image.meta.get("spacing_known", True) is not False


def _to_sitk(image: Image, array: np.ndarray):
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(tuple(float(s) for s in image.spacing))
    out.SetOrigin(tuple(float(o) for o in image.origin))
    out.SetDirection(tuple(float(d) for d in np.asarray(image.direction).ravel()))
    return out


def resample_nearest(pred: Image, ref: Image) -> np.ndarray:
    """``pred``'s labels on ``ref``'s grid by nearest neighbour in physical space (0 outside)."""
    import SimpleITK as sitk

    if not _spacing_known(pred) or not _spacing_known(ref):
        from medsam3.preprocess.resize import resize_nearest

        if pred.ndim != 2:
            raise InputError(pred.meta.get("path"), "cannot stretch a 3D prediction without geometry")
        return resize_nearest(pred.array, (ref.spatial_shape[0], ref.spatial_shape[1]))
    moving = _to_sitk(pred, pred.array)
    fixed = _to_sitk(ref, np.zeros(ref.spatial_shape, dtype=np.uint8))
    out = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out)


def align_prediction(
    pred: Image, ref: Image, pred_path: Path, ref_path: Path, resample: bool = False
) -> tuple[np.ndarray, str]:
    """The prediction's label array on the reference grid, and how it got there.

    Returns ``(array, how)`` with ``how`` one of ``same grid``, ``same shape`` (a picture without pixel
    size), ``rearranged`` (exact flips / permutation / offset) or ``resampled``.

    Raises:
        InputError: the grids differ (and ``resample`` is False): the message names both files and
            both geometries.
    """
    if pred.ndim != ref.ndim:
        raise InputError(pred_path, f"is {pred.ndim}D but its reference {ref_path} is {ref.ndim}D")
    same_shape = pred.spatial_shape == ref.spatial_shape
    if same_shape and (not _spacing_known(pred) or not _spacing_known(ref)):
        return pred.array, "same shape"
    if same_shape and pred.same_geometry(ref):
        return pred.array, "same grid"
    if _spacing_known(pred) and _spacing_known(ref):
        try:
            return place_on_grid(pred, ref, path=pred_path), "rearranged"
        except InputError:
            pass
    if resample:
        return resample_nearest(pred, ref), "resampled"
    raise InputError(
        pred_path,
        f"its grid differs from the reference {ref_path} (use --resample to resample the prediction "
        f"onto the reference grid by nearest neighbour):\n"
        f"  prediction: {describe_geometry(pred)}\n  reference:  {describe_geometry(ref)}",
    )


def label_values(array: np.ndarray) -> list[int]:
    """Sorted non-zero values of a label array."""
    return [int(v) for v in np.unique(array) if v != 0]


def pred_names_for(
    pred_path: Path, file_names: Mapping[int, str], user_map: Mapping[int, str] | None
) -> tuple[dict[int, str], SummaryLabels | None]:
    """``(value -> name, SummaryLabels or None)`` for one prediction file (module docstring order);
    ``file_names`` are the names stored in the file itself."""
    if user_map:
        return dict(user_map), None
    summary_path = summary_for(pred_path)
    if summary_path is not None:
        summary = read_summary(summary_path)
        return dict(summary.names), summary
    return {int(k): str(v) for k, v in file_names.items()}, None


@dataclass
class PredictionLabels:
    """A prediction on the reference grid: one label array, or one bool mask per (possibly overlapping)
    segment (DICOM SEG / multi-layer ``.seg.nrrd`` whose segments overlap)."""

    array: np.ndarray | None = None
    segments: dict[int, np.ndarray] | None = None

    def _segment_masks(self) -> dict[int, np.ndarray]:
        assert self.segments is not None  # without an array the prediction is held per segment
        return self.segments

    @property
    def shape(self) -> tuple[int, ...]:
        if self.array is not None:
            return self.array.shape
        return next(iter(self._segment_masks().values())).shape

    def values(self) -> list[int]:
        """Label values with at least one voxel."""
        if self.array is not None:
            return label_values(self.array)
        return sorted(v for v, m in self._segment_masks().items() if m.any())

    def mask(self, values: list[int]) -> np.ndarray:
        """Union of the given label values, bool."""
        if not values:
            return np.zeros(self.shape, bool)
        if self.array is not None:
            return np.isin(self.array, values)
        out = np.zeros(self.shape, bool)
        segments = self._segment_masks()
        for v in values:
            if v in segments:
                out |= segments[v]
        return out


def read_prediction(pred_path: Path) -> tuple[Image, dict[int, Image] | None, dict[int, str]]:
    """``(label map or first segment, segments or None, names stored in the file)``.

    Overlapping segments cannot share one label map; they are then read one mask per segment.
    """
    from medsam3.io.readers import read_label_map, read_segments

    try:
        image = read_label_map(pred_path)
        return image, None, dict(image.meta.get("label_names") or {})
    except InputError as exc:
        if "overlapping segments" not in str(exc):
            raise
    segments = read_segments(pred_path)
    names: dict[int, str] = {}
    for seg in segments.values():
        names.update(seg.meta.get("label_names") or {})
    return next(iter(segments.values())), segments, names


def align_labels(
    pred: Image,
    segments: dict[int, Image] | None,
    ref: Image,
    pred_path: Path,
    ref_path: Path,
    resample: bool = False,
) -> tuple[PredictionLabels, str]:
    """:func:`align_prediction` for a label map or for each segment of an overlapping segmentation."""
    if segments is None:
        arr, how = align_prediction(pred, ref, pred_path, ref_path, resample)
        return PredictionLabels(array=arr), how
    out, how = {}, ""
    for value, seg in segments.items():
        arr, how = align_prediction(seg, ref, pred_path, ref_path, resample)
        out[value] = np.asarray(arr) > 0
    return PredictionLabels(segments=out), how
