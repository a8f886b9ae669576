"""Form (b) of ``medsam3 evaluate``: run one or more models on the records of a manifest and score them.

For every model, record and concept of the record (by default the concepts present in its label map;
``include_empty`` adds the concepts the dataset names but this image lacks):

* **Prompt** (``prompt_mode``), built from the concept and, for the geometric controls, from the reference:

  - ``text``: the concept's text (``prompt_text`` may replace it, e.g. the paper's "Polyp");
  - ``box``: the reference's bounding box alone, SAM3's visual prompt: the paper's vanilla-SAM3 control
    (its public scripts draw one box around the whole mask);
  - ``text+box``: the text with that box as an exemplar;
  - ``point``: one positive point at the reference's most interior pixel (the maximum of the Euclidean
    distance transform; among ties the one nearest their mean), at the pixel centre; answered by SAM3's
    interactive tracker, which the model folder must hold.

  ``geometry="whole"`` (default) uses one box / point for the whole mask; ``"objects"`` one per connected
  component (8-connected, the ``MAX_OBJECTS`` largest) and keeps every detection above the threshold
  (as ``instances=True`` does for any prompt: the union of the kept masks is scored).
  Boxes are pixel-extent boxes ``(x1, y1, x2, y2)`` with exclusive ends.
* **Rule** (paper section 3; Meta's processor): the confidence of a mask is ``sigmoid(logit) x presence``;
  the single best mask above ``threshold`` (0.1) is kept, else the prediction is empty (Dice 0). The
  default ``presence_threshold`` is 0: no extra presence gate beyond the confidence, as in the paper's
  scripts (``medsam3 segment`` gates at 0.5; pass 0.5 to evaluate what it would output). The concepts of an
  image whose label values are disjoint are prompted in one call, so the image is encoded once and
  overlapping masks go pixel-wise to the most confident concept; concepts that share label values (a
  region and its parts: ``hippocampus`` = anterior + posterior) go to separate calls
  (:func:`disjoint_groups`), so each is scored on its own mask.
* **Score**: :func:`medsam3.evaluate.rows.score_masks` on the image grid with the image's spacing.

Absent-concept test (``absent=N``): every image is also prompted (text only, in a separate call) with
``N`` concepts it does not contain: concepts of records of the same modality group in the manifest and of
the registry's datasets of that group, minus every concept the record's dataset names. The choice is
seeded per case and the same for every model. Any pixel given to such a concept is a false positive.
Volumes go through the same ``volume_mode`` as the scored prompts.
Caveat: a concept another dataset annotates may truly be visible yet unlabelled here (a laparoscopic image
shows fat), so the rate is an upper bound.

3D records (``volume_mode``): ``"slices"`` (default) reorients the volume to the canonical frame
(:func:`medsam3.preprocess.orientation.to_canonical`), segments every axial slice as a 2D image and stacks
the slices; scores are 3D (mm spacing), with the false-positive share on slices where the reference is
empty. Intensity normalisation is then per slice. Geometric prompts are made per slice, on slices where the
reference is present. ``"volume"`` hands the whole volume to :meth:`Segmenter.segment` (text prompts; for
the slice-tracking path of the segmenter).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from medsam3.data.manifest import Record
from medsam3.errors import InputError, MedSam3Error, ModelError
from medsam3.evaluate.figures import GalleryCollector
from medsam3.evaluate.rows import AbsentRow, CaseRow, empty_slice_stats, failure_metrics, score_masks
from medsam3.image import Image
from medsam3.predict.options import FRONT_DEFAULTS, VolumeOptions, build_options, check_request
from medsam3.predict.prompts import Prompt
from medsam3.predict.tta import MIRRORS, mirroring_settings

if TYPE_CHECKING:
    from medsam3.predict.segmenter import Segmenter

log = logging.getLogger(__name__)

PROMPT_MODES = ("text", "box", "text+box", "point")
GEOMETRIES = ("whole", "objects")
SPLIT_CHOICES = ("val", "test", "eval", "all")
VOLUME_MODES = ("slices", "volume")
#: At most this many objects (largest first) get a box / point with ``geometry="objects"``.
MAX_OBJECTS = 50


@dataclass
class ModelSpec:
    """A model to evaluate: its report name and a path / id for ``load_sam3``, or a ready ``Segmenter``."""

    name: str
    source: Any = None


def evaluation_options(**changes: Any) -> VolumeOptions:
    """The inference options of an evaluation: the segmenter's, with ``medsam3 evaluate``'s own defaults
    (:data:`medsam3.predict.options.FRONT_DEFAULTS`: no presence gate beyond the confidence), and
    ``changes``."""
    return build_options(VolumeOptions, None, **{**FRONT_DEFAULTS["evaluate"], **changes})


@dataclass
class RunOptions:
    """How models are prompted and scored (see the module docstring); ``inference`` holds the segmenter's
    options (threshold, presence threshold, instances, input size, tta)."""

    prompt_mode: str = "text"
    geometry: str = "whole"
    nsd_tolerance: float = 2.0
    absent: int = 0
    seed: int = 0
    include_empty: bool = False
    prompt_text: dict[str, str] = field(default_factory=dict)  # "concept" or "dataset:concept" -> text
    volume_mode: str = "slices"
    device: str = "auto"
    dtype: str = "auto"
    inference: VolumeOptions = field(default_factory=evaluation_options)

    def check(self) -> None:
        """Refuse unknown modes and combinations (the option rules of :mod:`medsam3.predict.options`)."""
        if self.prompt_mode not in PROMPT_MODES:
            raise InputError(None, f"prompt mode {self.prompt_mode!r} is not one of {PROMPT_MODES}")
        if self.geometry not in GEOMETRIES:
            raise InputError(None, f"geometry {self.geometry!r} is not one of {GEOMETRIES}")
        if self.volume_mode not in VOLUME_MODES:
            raise InputError(None, f"volume mode {self.volume_mode!r} is not one of {VOLUME_MODES}")
        if self.volume_mode == "volume" and self.prompt_mode != "text":
            raise InputError(None, "volume mode takes text prompts only; use --volume-mode slices")
        if self.absent < 0:
            raise InputError(None, f"--absent {self.absent} must be 0 or more")
        check_request(self.inference, points=self.prompt_mode == "point")


@dataclass
class RunResult:
    """Scored rows, absent-concept prompts, warnings, and what each model was (for ``config.json``)."""

    rows: list[CaseRow] = field(default_factory=list)
    absent: list[AbsentRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)


# -- records -----------------------------------------------------------------------------------------------
def select_records(
    records: Sequence[Record],
    split: str = "eval",
    datasets: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records of ``split`` (``eval`` = val + test, ``all`` includes train), of ``datasets`` if given, at
    most ``limit`` per dataset (by case id)."""
    if split not in SPLIT_CHOICES:
        raise InputError(None, f"split {split!r} is not one of {SPLIT_CHOICES}")
    wanted = {"val": {"val"}, "test": {"test"}, "eval": {"val", "test"}, "all": {"train", "val", "test"}}[
        split
    ]
    names = {d.casefold() for d in datasets} if datasets else None
    if names is not None:
        known = {r.dataset.casefold() for r in records}
        unknown = sorted(names - known)
        if unknown:
            raise InputError(
                None,
                f"datasets {unknown} are not in the manifest (it has {sorted({r.dataset for r in records})})",
            )
    out = [r for r in records if r.split in wanted and (names is None or r.dataset.casefold() in names)]
    out.sort(key=lambda r: (r.dataset, r.case_id, tuple(r.label)))
    if limit:
        counts: dict[str, int] = {}
        kept = []
        for r in out:
            counts[r.dataset] = counts.get(r.dataset, 0) + 1
            if counts[r.dataset] <= limit:
                kept.append(r)
        out = kept
    return out


def load_record(record: Record) -> tuple[Image, np.ndarray]:
    """The record's image and semantic label map on one grid; 3D volumes in the canonical frame."""
    from medsam3.data.labels import load_label_arrays
    from medsam3.io.readers import read_image
    from medsam3.preprocess.orientation import to_canonical

    modality = record.modality if record.modality not in ("", "OTHER") else None
    image = read_image(record.image[0], modality=modality)
    semantic = load_label_arrays(record).semantic
    if image.spatial_shape != semantic.shape:
        raise InputError(
            record.image[0],
            f"image shape {image.spatial_shape} differs from its label map "
            f"{semantic.shape} ({record.label[0]})",
        )
    if image.ndim == 3:
        image, reo = to_canonical(image)
        semantic = reo.apply(semantic)
    return image, semantic


def record_role(record: Record) -> str:
    """Table section of a record: ``external`` for the test split (datasets never trained on), else
    ``internal``."""
    return "external" if record.split == "test" else "internal"


# -- prompts from the reference ----------------------------------------------------------------------------
def _objects(mask: np.ndarray) -> list[np.ndarray]:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:MAX_OBJECTS]
    return [lab == (i + 1) for i in order]


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel extent ``(x1, y1, x2, y2)`` (exclusive ends) of a non-empty ``(Y, X)`` mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` pixel centre of the mask pixel farthest from the background (the image border counts as
    background). Among equally far pixels, the one nearest to their mean position (then the first in
    raster order), so a symmetric shape gets its centre."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(dist == dist.max())
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def reference_prompt(mode: str, text: str, mask: np.ndarray, geometry: str = "whole") -> Prompt | None:
    """The prompt of ``mode`` for one concept on one 2D slice; ``None`` when a geometric prompt is needed
    and the reference is empty there."""
    if mode == "text":
        return Prompt(text)
    parts = _objects(mask) if geometry == "objects" else ([mask] if mask.any() else [])
    if not parts:
        return None
    if mode == "point":
        return Prompt(points=[interior_point(p) for p in parts])
    boxes: list[tuple[float, ...]] = [box_of(p) for p in parts]
    return Prompt(text if mode == "text+box" else None, boxes=boxes)


def prompt_text(overrides: Mapping[str, str], dataset: str, concept: str) -> str:
    """Text for ``concept``: ``overrides["<dataset>:<concept>"]``, else ``overrides[concept]``, else the
    concept itself."""
    return overrides.get(f"{dataset}:{concept}", overrides.get(concept, concept))


# -- absent-concept candidates -----------------------------------------------------------------------------
def absent_pools(records: Sequence[Record]) -> dict[str, list[str]]:
    """Modality group (case-folded) -> concepts known in that group (manifest and registry), sorted."""
    from medsam3.data import registry

    pools: dict[str, set[str]] = {}
    for r in records:
        pools.setdefault((r.group or r.modality).casefold(), set()).update(r.concepts)
    for e in registry.entries():
        key = e.group.casefold()
        if key in pools:
            pools[key].update(e.concepts)
    return {k: sorted(v) for k, v in pools.items()}


def dataset_concepts(records: Sequence[Record]) -> dict[str, set[str]]:
    """Dataset -> every concept any of its records names."""
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(r.dataset, set()).update(r.concepts)
    return out


def absent_concepts(
    record: Record, pools: Mapping[str, list[str]], named: set[str], n: int, seed: int = 0
) -> list[str]:
    """Up to ``n`` concepts of the record's group that its dataset never names; seeded per case."""
    pool = [c for c in pools.get((record.group or record.modality).casefold(), []) if c not in named]
    if not pool or n <= 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(f"{record.dataset}/{record.case_id}".encode())])
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]


# -- running -----------------------------------------------------------------------------------------------
def run_options(segmenter: Segmenter) -> Any:
    """The segmenter's options as a 2D record runs them (with a preset such as ``fast`` expanded)."""
    from medsam3.predict.fast import apply_presets

    return apply_presets(segmenter.engine, segmenter.options, volume=False)[0]


def build_segmenter(spec: ModelSpec, options: RunOptions) -> Segmenter:
    """A ``Segmenter`` for ``spec`` with the evaluation's options (a given one is used as it is)."""
    from medsam3.predict.segmenter import Segmenter

    if isinstance(spec.source, Segmenter):
        return spec.source
    return Segmenter(spec.source, device=options.device, dtype=options.dtype, options=options.inference)


def _prompt_masks(result, n_prompts: int) -> tuple[list[np.ndarray], list[float | None], list[float | None]]:
    """Per prompt index: the union of its kept labels, its best score and its presence."""
    masks, scores, presence = [], [], []
    for i in range(n_prompts):
        entries = [e for e in result.labels if e.prompt_index == i]
        values = [e.value for e in entries if not e.absent and e.value is not None]
        masks.append(np.isin(result.label_map, values) if values else np.zeros(result.label_map.shape, bool))
        found = [e.score for e in entries if e.score is not None]
        scores.append(max(found) if found else None)
        pres = [e.presence for e in entries if e.presence is not None]
        presence.append(max(pres) if pres else None)
    return masks, scores, presence


def _segment_2d(segmenter, image: Image, texts: list[str], refs: list[np.ndarray], options: RunOptions):
    """Prompt every concept once on a 2D image; returns masks, scores, presence and the display image."""
    prompts = [
        reference_prompt(options.prompt_mode, t, m, options.geometry)
        for t, m in zip(texts, refs, strict=True)
    ]
    live = [i for i, p in enumerate(prompts) if p is not None]
    shape = image.spatial_shape
    masks = [np.zeros(shape, bool) for _ in texts]
    scores: list[float | None] = [None] * len(texts)
    presence: list[float | None] = [None] * len(texts)
    display = None
    if live:
        instances = options.inference.instances or (
            options.geometry == "objects" and options.prompt_mode != "text"
        )
        result = segmenter.segment(image, [prompts[i] for i in live], instances=instances)
        got = _prompt_masks(result, len(live))
        for k, i in enumerate(live):
            masks[i], scores[i], presence[i] = got[0][k], got[1][k], got[2][k]
        display = result.display
    return masks, scores, presence, display


def _slice_image(volume: Image, z: int) -> Image:
    meta = {k: v for k, v in volume.meta.items() if k in ("path", "format", "spacing_known")}
    meta["slice"] = z
    return Image(volume.array[z], volume.spacing[:2], volume.origin[:2], np.eye(2), volume.modality, meta)


def _segment(segmenter, image: Image, texts: list[str], refs: list[np.ndarray], options: RunOptions):
    if image.ndim == 2:
        return _segment_2d(segmenter, image, texts, refs, options)
    if options.volume_mode == "volume":
        result = segmenter.segment(image, [Prompt(t) for t in texts])
        masks, scores, presence = _prompt_masks(result, len(texts))
        return masks, scores, presence, None
    masks = [np.zeros(image.spatial_shape, bool) for _ in texts]
    best: list[float | None] = [None] * len(texts)
    pres: list[float | None] = [None] * len(texts)
    for z in range(image.spatial_shape[0]):
        got, sc, pr, _ = _segment_2d(segmenter, _slice_image(image, z), texts, [r[z] for r in refs], options)
        for i in range(len(texts)):
            masks[i][z] = got[i]
            if sc[i] is not None and (best[i] is None or sc[i] > best[i]):
                best[i] = sc[i]
            if pr[i] is not None and (pres[i] is None or pr[i] > pres[i]):
                pres[i] = pr[i]
    return masks, best, pres, None


def disjoint_groups(values: Mapping[str, Sequence[int]], concepts: Sequence[str]) -> list[list[int]]:
    """Indices of ``concepts`` in groups whose label values do not overlap (first fit, in order).

    A region (``hippocampus = anterior + posterior``) shares voxels with its parts; prompted together, the
    segmenter's one label map would give each voxel to one prompt only. Each group is segmented in its own
    call, so every concept's mask is its own.
    """
    groups: list[tuple[set[int], list[int]]] = []
    for i, concept in enumerate(concepts):
        mine = set(values.get(concept, []))
        for used, members in groups:
            if not used & mine:
                used.update(mine)
                members.append(i)
                break
        else:
            groups.append((set(mine), [i]))
    return [members for _, members in groups]


def _segment_groups(
    segmenter,
    image: Image,
    texts: list[str],
    refs: list[np.ndarray],
    options: RunOptions,
    groups: list[list[int]],
):
    """:func:`_segment` once per group of non-overlapping concepts; outputs in the order of ``texts``."""
    if len(groups) == 1:
        return _segment(segmenter, image, texts, refs, options)
    masks: list = [None] * len(texts)
    scores: list = [None] * len(texts)
    presence: list = [None] * len(texts)
    display = None
    for members in groups:
        got = _segment(segmenter, image, [texts[i] for i in members], [refs[i] for i in members], options)
        for k, i in enumerate(members):
            masks[i], scores[i], presence[i] = got[0][k], got[1][k], got[2][k]
        display = got[3] if display is None else display
    return masks, scores, presence, display


def _absent_test(segmenter, image: Image, texts: list[str], volume_mode: str) -> tuple[list[int], list, list]:
    """Pixels each absent-concept text got (text prompts, one call per image, or per slice / per volume of
    a 3D image as ``volume_mode`` says: the path the scored prompts took)."""
    opts = RunOptions(
        prompt_mode="text", volume_mode=volume_mode, inference=segmenter.options.replace(instances=False)
    )
    dummy = [np.zeros(image.spatial_shape, bool) for _ in texts]
    masks, scores, presence, _ = _segment(segmenter, image, texts, dummy, opts)
    return [int(m.sum()) for m in masks], scores, presence


def run_models(
    records: Sequence[Record],
    models: Sequence[ModelSpec],
    options: RunOptions,
    gallery: GalleryCollector | None = None,
    all_records: Sequence[Record] | None = None,
) -> RunResult:
    """Evaluate every model on ``records`` (see the module docstring).

    ``all_records`` (default ``records``) supplies the vocabulary of the absent-concept test.
    """
    options.check()
    out = RunResult()
    pools = absent_pools(all_records or records) if options.absent else {}
    named = dataset_concepts(all_records or records)
    for spec in models:
        segmenter = build_segmenter(spec, options)
        out.models.append(
            {
                "name": spec.name,
                "requested": str(spec.source) if isinstance(spec.source, (str, os.PathLike)) else None,
                "loaded_from": segmenter.source,
                "input_size": segmenter.engine.at_size(run_options(segmenter).image_size).image_size,
                "test_time_mirroring": mirroring_settings(MIRRORS if segmenter.options.tta else ((),)),
                "threshold": segmenter.options.threshold,
                "presence_threshold": segmenter.options.presence_threshold,
            }
        )
        log.info("evaluating %s on %d records (%s prompts)", spec.name, len(records), options.prompt_mode)
        for n, record in enumerate(records, 1):
            _run_record(segmenter, spec.name, record, options, out, gallery, pools, named)
            if n % 25 == 0:
                log.info("%s: %d / %d records", spec.name, n, len(records))
        del segmenter
    return out


def _run_record(
    segmenter,
    model: str,
    record: Record,
    options: RunOptions,
    out: RunResult,
    gallery: GalleryCollector | None,
    pools,
    named,
) -> None:
    common: dict[str, Any] = dict(
        dataset=record.dataset,
        role=record_role(record),
        group=record.group,
        case=record.case_id,
        model=model,
        prompt_mode=options.prompt_mode,
        image=record.image[0],
        reference=record.label[0],
    )
    concepts = sorted(record.concepts if options.include_empty else record.foreground)
    try:
        image, semantic = load_record(record)
    except MedSam3Error as exc:
        out.warnings.append(f"{record.dataset}/{record.case_id}: cannot be read ({exc})")
        shape = tuple(record.shape) if len(record.shape) in (2, 3) else (1, 1)
        for c in concepts:  # grid known only from the manifest: scored in voxel units
            metrics = failure_metrics(np.zeros(shape, bool), 1.0, spacing_known=False)
            out.rows.append(CaseRow(concept=c, status="failed", metrics=metrics, note=str(exc), **common))
        return
    values = record.concept_values()
    refs = [np.isin(semantic, values[c]) for c in concepts]
    texts = [prompt_text(options.prompt_text, record.dataset, c) for c in concepts]
    spacing = image.spacing_array_order
    known = image.meta.get("spacing_known", True) is not False
    if concepts:
        try:
            masks, scores, presence, display = _segment_groups(
                segmenter, image, texts, refs, options, disjoint_groups(values, concepts)
            )
            status, note = "ok", ""
        except ModelError:
            raise
        except MedSam3Error as exc:
            out.warnings.append(f"{record.dataset}/{record.case_id}: prediction failed ({exc})")
            masks = scores = presence = display = None
            status, note = "failed", str(exc)
        for i, c in enumerate(concepts):
            text_note = "; ".join(x for x in (note, f"prompt {texts[i]!r}" if texts[i] != c else "") if x)
            if status == "ok":
                metrics = score_masks(
                    masks[i], refs[i], spacing, spacing_known=known, nsd_tolerance=options.nsd_tolerance
                )
            else:
                metrics = failure_metrics(
                    refs[i], spacing, spacing_known=known, nsd_tolerance=options.nsd_tolerance
                )
            row = CaseRow(
                concept=c,
                status=status,
                label=values[c][0] if len(values[c]) == 1 else None,
                metrics=metrics,
                note=text_note,
                **common,
            )
            if status == "ok":
                row.score, row.presence = scores[i], presence[i]
                row.slices = empty_slice_stats(masks[i], refs[i])
            out.rows.append(row)
            if gallery is not None:
                shown = display if display is not None else image.array
                gallery.offer(row, shown, refs[i], None if masks is None else masks[i])
    if options.absent:
        _run_absent(segmenter, model, record, image, options, out, pools, named)


def _run_absent(segmenter, model, record, image, options, out, pools, named) -> None:
    texts = absent_concepts(
        record, pools, named.get(record.dataset, set(record.concepts)), options.absent, options.seed
    )
    if not texts:
        out.warnings.append(
            f"{record.dataset}/{record.case_id}: no absent concept for group "
            f"{record.group!r} (absent-concept test skipped)"
        )
        return
    try:
        pixels, scores, presence = _absent_test(segmenter, image, texts, options.volume_mode)
    except ModelError:
        raise
    except MedSam3Error as exc:
        out.warnings.append(f"{record.dataset}/{record.case_id}: absent-concept test failed ({exc})")
        return
    total = int(np.prod(image.spatial_shape))
    for t, px, sc, pr in zip(texts, pixels, scores, presence, strict=True):
        out.absent.append(
            AbsentRow(
                dataset=record.dataset,
                case=record.case_id,
                model=model,
                concept=t,
                predicted_pixels=px,
                image_pixels=total,
                role=record_role(record),
                group=record.group,
                score=sc,
                presence=pr,
            )
        )
