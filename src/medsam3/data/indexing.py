"""From a dataset folder to manifest records: discover, check, read labels once, split.

For every image/label pair found by a layout reader (:mod:`medsam3.data.layouts`):

1. label names -> canonical concepts (:class:`~medsam3.data.vocabulary.Vocabulary`); unknown names are kept
   as normalised text and listed in the report;
2. headers of image and label files are compared (shape; spacing, origin and direction where the format
   has geometry); a mismatch is an :class:`~medsam3.errors.InputError` naming both files;
3. the label map is read once: a value that the dataset's label names do not list is an error naming the
   file and the value; the slices where each concept is present are stored in the record, so sampling never
   reads a volume again;
4. cases get their train/val split (:mod:`medsam3.data.splits`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data.coco import rasterize_record
from medsam3.data.discovery import Candidate, Discovery
from medsam3.data.labels import Header, apply_mask_spec, file_suffix, npz_member_header, read_header, read_raw
from medsam3.data.layouts import discover
from medsam3.data.manifest import Record, ranges_from_indices
from medsam3.data.splits import SEED, VAL_FRACTION, split_dataset
from medsam3.data.vocabulary import Vocabulary
from medsam3.errors import InputError

log = logging.getLogger(__name__)

_LOSSY = (".jpg", ".jpeg", ".webp")


@dataclass
class DatasetReport:
    """What preparing one dataset produced (printed by ``medsam3 prepare``)."""

    dataset: str
    layout: str
    cases: int = 0
    records: int = 0
    label_names: dict[int, str] = field(default_factory=dict)
    concepts: dict[str, int] = field(default_factory=dict)  # concept -> records where present
    splits: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unknown_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- geometry -----------------------------------------------------------------------------------------
def _headers(c: Candidate, layout: str) -> tuple[list[Header], Header]:
    if layout == "npz":
        img = npz_member_header(c.image[0], c.source.get("image_key", "imgs"))
        lab = npz_member_header(c.label[0], c.source.get("label_key", "gts"))
        return [img], lab
    images = [read_header(p) for p in c.image]
    if layout == "coco":
        return images, Header((int(c.source["height"]), int(c.source["width"])))
    labels = [read_header(p) for p in c.label]
    for other, path in zip(labels[1:], c.label[1:], strict=True):
        if other.shape != labels[0].shape:
            raise InputError(path, f"mask shape {other.shape} differs from {c.label[0]} {labels[0].shape}")
    return images, labels[0]


def check_geometry(image: Header, label: Header, image_path: str | Path, label_path: str | Path) -> None:
    """Raise :class:`InputError` naming both files when their grids differ."""
    problem = None
    if image.shape != label.shape:
        problem = f"shape {label.shape} vs image {image.shape}"
    elif image.spacing is not None and label.spacing is not None:
        # headers with geometry (ITK formats) carry spacing, origin and direction together
        assert image.origin is not None and label.origin is not None
        assert image.direction is not None and label.direction is not None
        if not np.allclose(image.spacing, label.spacing, rtol=1e-4, atol=1e-4):
            problem = f"spacing {label.spacing} vs image {image.spacing}"
        elif not np.allclose(image.origin, label.origin, rtol=1e-5, atol=1e-3):
            problem = f"origin {label.origin} vs image {image.origin}"
        elif not np.allclose(image.direction, label.direction, atol=1e-4):
            problem = f"direction {label.direction} vs image {image.direction}"
    if problem:
        raise InputError(label_path, f"label grid differs from its image {image_path}: {problem}")


# -- label maps ---------------------------------------------------------------------------------------
def settle_auto(raw: np.ndarray, names: Mapping[int, str], path: Path, ndim: int, spec: Mapping) -> dict:
    """Pick a concrete mask mode for ``mode: auto`` from the label pixels.

    One label name: a mask of {0, value} is read as values; 0/255 masks, colour masks and lossy JPEG masks
    are binary (threshold 127). Several names: values.
    """
    out = {k: v for k, v in spec.items() if k != "mode"}
    if len(names) != 1:
        return {**out, "mode": "values"}
    value = next(iter(names))
    colour = raw.ndim == ndim + 1 and raw.shape[-1] in (3, 4)
    grey = raw[..., :3].max(axis=-1) if colour else raw
    present = set(np.unique(grey).tolist())
    if file_suffix(path) in _LOSSY:
        return {**out, "mode": "binary", "threshold": out.get("threshold", 127), "value": value}
    if present <= {0, value} and not colour:
        return {**out, "mode": "values"}
    if present <= {0, 255} or colour:
        return {**out, "mode": "binary", "threshold": out.get("threshold", 127), "value": value}
    shown = sorted(present)[:8]
    raise InputError(
        path,
        f"mask values {shown} do not fit the single label {value} ({names[value]!r}): "
        "name every value in --labels, or use --mask-mode binary",
    )


def _read_semantic(c: Candidate, dims: int) -> tuple[np.ndarray, dict]:
    spec = dict(c.mask)
    key = c.source.get("label_key", "gts")
    semantic: np.ndarray | None = None
    for path in c.label:
        raw = read_raw(path, npz_key=key)
        if spec.get("mode") == "auto":
            spec = settle_auto(raw, c.label_names, Path(path), dims, spec)
        if spec.get("mode") in ("binary", "instances") and "value" not in spec:
            if len(c.label_names) != 1:
                raise InputError(
                    path, f"mask mode {spec['mode']!r} needs exactly one label name, got {c.label_names}"
                )
            spec["value"] = next(iter(c.label_names))
        sem, _ = apply_mask_spec(raw, spec, path, dims)
        semantic = sem if semantic is None else np.maximum(semantic, sem)
    assert semantic is not None  # a candidate has at least one label file
    return semantic, spec


def index_candidate(
    dataset: str, c: Candidate, layout: str, concepts: Mapping[int, str], group: str
) -> Record:
    """Check one pair and read its label map into a :class:`Record` (split still ``train``)."""
    images, label = _headers(c, layout)
    for img_header, img_path in zip(images, c.image, strict=True):
        check_geometry(img_header, label, img_path, c.label[0])
    dims = label.dims
    if dims not in (2, 3):
        raise InputError(c.label[0], f"label map has {dims} dimensions; expected 2 or 3")
    if layout == "coco":
        probe = Record(
            dataset,
            c.case_id,
            [str(p) for p in c.image],
            [str(p) for p in c.label],
            dict(concepts),
            layout="coco",
            source=dict(c.source),
            shape=list(label.shape),
            dims=2,
        )
        semantic, spec = rasterize_record(probe).semantic, dict(c.mask)
    else:
        semantic, spec = _read_semantic(c, dims)
    if tuple(semantic.shape) != label.shape:
        raise InputError(c.label[0], f"label pixels have shape {semantic.shape}, header says {label.shape}")
    allowed = set(c.label_names) | {v for vs in c.regions.values() for v in vs}
    present = set(np.unique(semantic).tolist()) - {0}
    unknown = sorted(present - allowed)
    if unknown and spec.get("other_values") != "background":
        names = ", ".join(f"{k}={v!r}" for k, v in sorted(c.label_names.items()))
        raise InputError(
            c.label[0],
            f"label value {unknown[0]} is not among the dataset's labels ({names})"
            + (f"; other unlisted values: {unknown[1:6]}" if len(unknown) > 1 else ""),
        )
    record = Record(
        dataset=dataset,
        case_id=c.case_id,
        image=[str(p) for p in c.image],
        label=[str(p) for p in c.label],
        labels=dict(concepts),
        label_names=dict(c.label_names),
        modality=c.modality,
        dims=dims,
        layout=layout,
        group=group or c.modality,
        shape=list(label.shape),
        mask=spec,
        instances=c.instances,
        regions={},
        prompts={k: list(v) for k, v in c.prompts.items()},
        source=dict(c.source),
    )
    for concept, values in _concept_values(concepts, c.regions).items():
        hit = np.isin(semantic, values)
        if dims == 3:
            slices = np.flatnonzero(hit.reshape(hit.shape[0], -1).any(axis=1))
            if slices.size:
                record.foreground[concept] = ranges_from_indices(slices.tolist())
        elif hit.any():
            record.foreground[concept] = [[0, 1]]
    return record


def _names(label_names: Mapping[int, str]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(label_names.items())) or "none"


def _concept_values(concepts: Mapping[int, str], regions: Mapping[str, list[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for value, concept in sorted(concepts.items()):
        out.setdefault(concept, []).append(value)
    for concept, values in regions.items():
        out[concept] = sorted(set(out.get(concept, [])) | set(values))
    return out


# -- a whole dataset ----------------------------------------------------------------------------------
def prepare_dataset(
    name: str,
    layout: str,
    root: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    labels: Mapping[int, str] | None = None,
    modality: str | None = None,
    group: str = "",
    role: str = "train",
    vocabulary: Vocabulary | None = None,
    existing_splits: Mapping[str, str] | None = None,
    seed: int = SEED,
    val_fraction: float = VAL_FRACTION,
    drop_empty: bool = False,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[Record], DatasetReport, dict[str, str]]:
    """Discover, check and index one dataset folder.

    ``regions`` (concept -> label values, e.g. ``{"hippocampus": [1, 2]}``) adds concepts whose mask is the
    union of several labels to every case (nnU-Net region labels; they join those a ``dataset.json``
    declares); each value must be one of the case's named labels.

    Returns ``(records, report, splits)`` where ``splits`` maps every case id (old and new) to its split.
    """
    vocab = vocabulary or Vocabulary.bundled()
    drop_empty = drop_empty or bool((options or {}).get("drop_empty"))
    found: Discovery = discover(layout, root, options, labels=labels, modality=modality)
    report = DatasetReport(name, found.layout, skipped=list(found.skipped))
    scope = [name, *found.scope_names]
    records: list[Record] = []
    for c in found.candidates:
        if regions:
            for region, values in regions.items():
                unnamed = sorted(set(int(v) for v in values) - set(c.label_names))
                if unnamed or not values:
                    raise InputError(
                        c.label[0],
                        f"region {region!r} uses label value(s) {unnamed or values} "
                        f"that the labels do not name ({_names(c.label_names)})",
                    )
            c.regions = {**c.regions, **{str(k): sorted(int(v) for v in vs) for k, vs in regions.items()}}
        concepts = {}
        for value, label_name in sorted(c.label_names.items()):
            resolved = vocab.resolve(label_name, scope)
            concepts[value] = resolved.concept
            if not resolved.known and label_name not in report.unknown_names:
                report.unknown_names.append(label_name)
            report.label_names.setdefault(value, label_name)
        concept_regions: dict[str, list[int]] = {}
        for region, values in c.regions.items():
            resolved = vocab.resolve(region, scope)
            concept_regions[resolved.concept] = values
            if not resolved.known and region not in report.unknown_names:
                report.unknown_names.append(region)
        c.regions = concept_regions
        record = index_candidate(name, c, found.layout, concepts, group)
        record.regions = concept_regions
        if drop_empty and not record.foreground:
            report.skipped.append(f"{c.case_id}: empty label map (dropped)")
            continue
        records.append(record)
    if not records:
        raise InputError(root, "every label map is empty; nothing to prepare")
    splits = split_dataset({r.case_id for r in records}, existing_splits, seed, val_fraction, role)
    for r in records:
        r.split = splits[r.case_id]
    if {r.modality for r in records} == {"OTHER"}:
        report.notes.append("modality unknown (give --modality)")
    report.cases = len({r.case_id for r in records})
    report.records = len(records)
    for r in records:
        for concept in r.foreground:
            report.concepts[concept] = report.concepts.get(concept, 0) + 1
        for concept in r.concepts:
            report.concepts.setdefault(concept, 0)
    present = {r.case_id for r in records}
    for split in ("train", "val", "test"):
        n = sum(1 for c, s in splits.items() if s == split and c in present)
        if n:
            report.splits[split] = n
    return records, report, splits
