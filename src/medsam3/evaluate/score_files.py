"""Form (a) of ``medsam3 evaluate``: prediction files against reference files, folder against folder.

For every reference file (pairing, label names and grids: :mod:`medsam3.evaluate.pairing`):

* with a prediction: each reference label that is present in the reference, or that the prediction
  marks, is scored (:func:`medsam3.evaluate.rows.score_masks`); a label absent from both is not a row. An
  unnamed binary reference always has its label 1 (so a prediction on an empty reference is a false
  positive);
* without a prediction: one row per reference label present (one row for an empty reference) with
  ``status = "missing"``, scored as a failure: never skipped;
* with a prediction that cannot be read: the same rows with ``status = "failed"`` and the reason.

A prediction whose grid differs from its reference stops the evaluation with an error naming both files
(unless ``resample``). Predictions without a reference are listed in the warnings, not scored.

Spacing (``spacing_from``): ``ref`` (default) uses the reference's voxel size, ``pred`` the prediction's
(only when it lies on the reference grid as stored), ``none`` scores in voxel units. A reference without a
physical pixel size (PNG, JPEG) gives distances in pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data.vocabulary import Vocabulary
from medsam3.errors import InputError
from medsam3.evaluate.figures import GalleryCollector
from medsam3.evaluate.pairing import (
    LabelMatch,
    align_labels,
    case_name,
    file_stem,
    index_folder,
    label_values,
    load_names_file,
    match_labels,
    pred_names_for,
    read_prediction,
    reference_names,
)
from medsam3.evaluate.rows import CaseRow, empty_slice_stats, failure_metrics, score_masks
from medsam3.image import Image
from medsam3.io.sniff import extension_format

log = logging.getLogger(__name__)

SPACING_SOURCES = ("ref", "pred", "none")


@dataclass
class FolderOptions:
    """Options of a folder-against-folder evaluation (see the module docstring)."""

    label_map: Path | None = None
    ref_labels: Path | None = None
    spacing_from: str = "ref"
    nsd_tolerance: float = 2.0
    resample: bool = False
    dataset: str = ""
    role: str = ""
    group: str = ""
    model: str = "prediction"
    images: Path | None = None


@dataclass
class FolderResult:
    """Rows, warnings and bookkeeping of one evaluation."""

    rows: list[CaseRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    alignment: dict[str, int] = field(default_factory=dict)
    name_sources: dict[str, str] = field(default_factory=dict)


def _spacing(ref: Image, pred: Image | None, how: str, source: str, pred_path: Path | None):
    if source == "none":
        return (1.0,) * ref.ndim, False
    if source == "pred" and pred is not None:
        if how not in ("same grid", "same shape"):
            raise InputError(
                pred_path,
                f"--spacing-from pred needs the prediction on the reference grid as stored; it was {how}",
            )
        return pred.spacing_array_order, pred.meta.get("spacing_known", True) is not False
    return ref.spacing_array_order, ref.meta.get("spacing_known", True) is not False


def _candidates(ref_arr: np.ndarray, ref_names: Mapping[int, str]) -> list[int]:
    present = label_values(ref_arr)
    if ref_names:
        return sorted(ref_names)
    if set(present) <= {1}:
        return [1]
    return present


def _case_images(options: FolderOptions) -> dict[str, Path]:
    """Images by lower-case stem (nnU-Net's ``_0000`` channel suffix removed); role suffixes are kept,
    so masks stored beside the images (HC18's ``_Annotation``) never take an image's place."""
    if options.images is None:
        return {}
    folder = Path(options.images)
    if not folder.is_dir():
        raise InputError(folder, "image folder not found")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or extension_format(path) is None:
            continue
        stem = file_stem(path).casefold()
        stem = stem[:-5] if stem.endswith("_0000") else stem
        if stem in out:
            raise InputError(path, f"has the same name as {out[stem].name}: one image per case")
        out[stem] = path
    return out


def score_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    options: FolderOptions,
    gallery: GalleryCollector | None = None,
    vocabulary: Vocabulary | None = None,
) -> FolderResult:
    """Score every reference file of ``ref_dir`` against its prediction in ``pred_dir``."""
    from medsam3.io.readers import read_label_map

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    vocab = vocabulary or Vocabulary.bundled()
    refs = index_folder(ref_dir, "reference")
    preds = index_folder(pred_dir, "prediction")
    if not refs:
        raise InputError(ref_dir, "holds no reference label files")
    images = _case_images(options)
    shared_names, names_from = reference_names(ref_dir, options.ref_labels)
    user_map = load_names_file(options.label_map) if options.label_map else None
    result = FolderResult()
    result.name_sources = {
        "reference": names_from or "label files / unnamed",
        "prediction": str(options.label_map)
        if options.label_map
        else "JSON summaries / label files / unnamed",
    }
    result.orphans = [str(preds[k]) for k in sorted(set(preds) - set(refs))]
    for path in result.orphans:
        result.warnings.append(f"{path}: prediction without a reference (not scored)")
    dataset = options.dataset or ref_dir.name
    common: dict[str, Any] = dict(
        dataset=dataset, role=options.role, group=options.group, model=options.model, prompt_mode="files"
    )
    for key, ref_path in sorted(refs.items()):
        ref = read_label_map(ref_path)
        name = case_name(ref_path)
        ref_names = dict(shared_names) or {int(k): str(v) for k, v in ref.meta.get("label_names", {}).items()}
        ref_arr = ref.array
        pred_path = preds.get(key)
        image = _image_loader(images.get(key), ref, result)
        pred = segments = None
        if pred_path is not None:
            try:
                pred, segments, file_names = read_prediction(pred_path)
            except InputError as exc:
                result.warnings.append(f"prediction unreadable: {exc}")
        if pred is None or pred_path is None:  # no prediction file, or an unreadable one
            status = "missing" if pred_path is None else "failed"
            (result.missing if status == "missing" else result.failed).append(name)
            note = "no prediction" if status == "missing" else result.warnings[-1]
            spacing, known = _spacing(ref, None, "", options.spacing_from, None)
            candidates = _candidates(ref_arr, ref_names)
            values = [v for v in candidates if (ref_arr == v).any()] or candidates[:1] or [1]
            for v in values:
                ref_mask = ref_arr == v
                row = CaseRow(
                    case=name,
                    concept=_ref_name(v, ref_names, ref_arr, vocab, dataset),
                    status=status,
                    label=v,
                    note=note,
                    metrics=failure_metrics(
                        ref_mask, spacing, spacing_known=known, nsd_tolerance=options.nsd_tolerance
                    ),
                    reference=str(ref_path),
                    prediction=str(pred_path or ""),
                    image=str(images.get(key, "")),
                    **common,
                )
                result.rows.append(row)
                if gallery is not None:
                    gallery.offer(row, image, ref_mask, None)
            continue
        labels, how = align_labels(pred, segments, ref, pred_path, ref_path, resample=options.resample)
        result.alignment[how] = result.alignment.get(how, 0) + 1
        spacing, known = _spacing(ref, pred, how, options.spacing_from, pred_path)
        pred_names, summary = pred_names_for(pred_path, file_names, user_map)
        matches, warns = match_labels(
            _candidates(ref_arr, ref_names),
            ref_names,
            labels.values(),
            pred_names,
            vocab,
            dataset,
            where=name,
        )
        result.warnings.extend(warns)
        for m in matches:
            pred_mask = labels.mask(m.pred_values)
            ref_mask = ref_arr == m.ref_value
            if not pred_mask.any() and not ref_mask.any():
                continue
            row = CaseRow(
                case=name,
                concept=m.name,
                status="ok",
                label=m.ref_value,
                metrics=score_masks(
                    pred_mask, ref_mask, spacing, spacing_known=known, nsd_tolerance=options.nsd_tolerance
                ),
                note=_note(m, how),
                reference=str(ref_path),
                prediction=str(pred_path),
                image=str(images.get(key, "")),
                **common,
            )
            if summary is not None:
                row.score = max(
                    (summary.scores[v] for v in m.pred_values if v in summary.scores), default=None
                )
                row.presence = max(
                    (summary.presence[v] for v in m.pred_values if v in summary.presence), default=None
                )
            row.slices = empty_slice_stats(pred_mask, ref_mask)
            result.rows.append(row)
            if gallery is not None:
                gallery.offer(row, image, ref_mask, pred_mask)
    return result


def _note(m: LabelMatch, how: str) -> str:
    parts = []
    if m.how != "name":
        parts.append(f"labels matched by {m.how}")
    if not m.pred_values:
        parts.append("label not in the prediction")
    if how not in ("same grid", "same shape"):
        parts.append(f"prediction {how}")
    return "; ".join(parts)


def _image_loader(path: Path | None, ref: Image, result: FolderResult):
    """A function reading the case's image for the gallery (only called for the cases it keeps)."""
    if path is None:
        return None

    def load():
        from medsam3.io.readers import read_image

        try:
            img = read_image(path)
        except InputError as exc:
            result.warnings.append(f"{path}: image not shown in the gallery ({exc})")
            return None
        if img.spatial_shape != ref.spatial_shape:
            result.warnings.append(
                f"{path}: image shape {img.spatial_shape} differs from its reference "
                f"{ref.spatial_shape}; not shown in the gallery"
            )
            return None
        return img.array

    return load


def _ref_name(
    value: int, ref_names: Mapping[int, str], ref_arr: np.ndarray, vocab: Vocabulary, dataset: str
) -> str:
    if value in ref_names:
        return vocab.concept(ref_names[value], dataset)
    return "foreground" if set(label_values(ref_arr)) <= {1} else f"label {value}"


__all__ = ["SPACING_SOURCES", "FolderOptions", "FolderResult", "score_folders"]
