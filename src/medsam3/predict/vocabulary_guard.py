"""The vocabulary guard: a model that records its concepts is never asked about anything else.

For a model whose folder holds a closed ``concepts.json`` (:mod:`medsam3.model.concepts`; the bundled
``medsam3-nano``), :meth:`Segmenter.segment <medsam3.predict.segmenter.Segmenter.segment>` runs
:func:`segment_guarded` instead of the plain 2D / volume segmentation:

1. **Match.** Every prompt with a text is matched to the model's concepts
   (:meth:`~medsam3.model.concepts.ModelConcepts.match`). A known prompt whose text differs from its concept
   ("foetal head", "hippocampi", "Visualization of the polyp") gets the concept as
   :attr:`~medsam3.predict.prompts.Prompt.concept`: the model is given the concept, the reports keep the
   text. Prompts without a text (boxes, points) are geometry and always run.
2. **Check.** All prompts are validated against the image as usual (a bad box is an error even on an unknown
   concept).
3. **Segment** the known prompts (and, with ``allow_unknown_concepts``, the unknown ones as written); when
   no prompt is left to run, no model work is done.
4. **Merge.** Each unknown prompt gets an absent label entry (:class:`UnknownConceptEntry`: reason
   ``"unknown concept"``, source ``"vocabulary"``, the model's concepts in ``known_concepts``) at its place in
   the prompt order; the other entries, the label map and the per-prompt settings are renumbered to the
   full prompt list, so that label values are exactly what they would be had every prompt run and the
   unknown ones found nothing (semantic mode: prompt ``i`` has value ``i + 1``; instances: the kept
   instances numbered in prompt order).

**The domain guard.** A model folder that also holds ``domain.safetensors`` (:mod:`medsam3.model.domain`)
records how its training images of each concept look to its image model. The known text-only prompts are
then judged on the image: the segmentation runs while the descriptors of its encoder passes are recorded
(:func:`medsam3.predict.engine.recording_descriptors`), each prompt's concept measures its distance to the
image, and a prompt farther than its concept's threshold gets an absent entry (reason ``"outside the
training domain"``, source ``"training domain"``, with ``domain_distance`` and ``domain_threshold``), merged
as in step 4. When other prompts were run beside it, the image is segmented again with those only, so that
their masks and label values are exactly those of a call without it. Box and point prompts are never
judged; ``allow_out_of_domain`` segments every prompt and still reports the distances. The result's
settings carry ``"domain"``: the checks made.

Every guarded result's settings carry ``"vocabulary"``: the model's concepts, what happens to unknown
prompts, and what each text prompt matched. Models without recorded concepts (or with an open vocabulary)
never come here: their results are as they always were.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam3.image import Image
from medsam3.model.concepts import CONCEPTS_FILE, ConceptMatch, ModelConcepts
from medsam3.model.domain import DOMAIN_FILE, OUTSIDE_DOMAIN, ModelDomain
from medsam3.predict.engine import Engine, recording_descriptors
from medsam3.predict.options import SegmentOptions, VolumeOptions
from medsam3.predict.postprocess import label_dtype
from medsam3.predict.prompts import Prompt
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.volume.prompts import VolumePrompt

#: The ``reason`` of an absent entry whose prompt the model does not know.
UNKNOWN_CONCEPT = "unknown concept"
#: The ``source`` of such an entry: decided by the vocabulary, not by the model.
SOURCE = "vocabulary"
#: The ``source`` of an entry outside the concept's training domain (:mod:`medsam3.model.domain`).
DOMAIN_SOURCE = "training domain"

AnyPrompt = Prompt | VolumePrompt


@dataclass
class UnknownConceptEntry(LabelEntry):
    """An absent label entry for a prompt the model is not asked about: outside its concepts (``reason``
    ``"unknown concept"``; ``known_concepts`` lists them), or a known concept on an image outside the
    concept's training domain (``reason`` ``"outside the training domain"``, with the image's
    ``domain_distance`` and the concept's ``domain_threshold``)."""

    known_concepts: tuple[str, ...] = ()
    domain_distance: float | None = None
    domain_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["known_concepts"] = list(self.known_concepts)
        if self.domain_distance is not None:
            out["domain_distance"] = round(self.domain_distance, 6)
            out["domain_threshold"] = round(float(self.domain_threshold or 0.0), 6)
        return out


def unknown_message(text: str, concepts: ModelConcepts) -> str:
    """One line for a report: what the model knows instead, and how to segment anyway."""
    return (
        f"{text!r}: {UNKNOWN_CONCEPT}: the model knows only {concepts.describe()}; not segmented "
        "(--allow-unknown-concepts / allow_unknown_concepts=True segments it anyway)"
    )


@dataclass(frozen=True)
class GuardedPrompts:
    """The prompts of one call after matching (module docstring, step 1).

    Attributes:
        prompts: every prompt in the given order; known ones carry their concept where it differs.
        matches: per prompt, what its text matched (``None`` for a prompt without text).
        unknown: indices of the prompts that are not segmented.
        concepts: the model's concepts.
        allow_unknown: unknown prompts are segmented as written (and not listed in ``unknown``).
    """

    prompts: tuple[AnyPrompt, ...]
    matches: tuple[ConceptMatch | None, ...]
    unknown: tuple[int, ...]
    concepts: ModelConcepts
    allow_unknown: bool = False
    domain: tuple[DomainCheck, ...] = ()
    allow_outside: bool = False

    @property
    def outside(self) -> tuple[int, ...]:
        """Indices of the known prompts whose concept the image lies outside of (not segmented unless
        ``allow_outside``)."""
        if self.allow_outside:
            return ()
        return tuple(c.prompt_index for c in self.domain if c.outside)

    @property
    def skipped(self) -> tuple[int, ...]:
        """Indices of every prompt not segmented (unknown, or outside the training domain), in order."""
        return tuple(sorted({*self.unknown, *self.outside}))

    @property
    def run_index(self) -> list[int]:
        """Indices (in the given order) of the prompts the model runs."""
        skip = set(self.skipped)
        return [i for i in range(len(self.prompts)) if i not in skip]

    @property
    def run(self) -> list[AnyPrompt]:
        return [self.prompts[i] for i in self.run_index]

    def settings(self) -> dict[str, Any]:
        """The ``"vocabulary"`` settings of the result."""
        return {
            "concepts": self.concepts.names,
            "file": CONCEPTS_FILE,
            "unknown_prompts": "segmented as written (allow_unknown_concepts)"
            if self.allow_unknown
            else f"reported absent ({UNKNOWN_CONCEPT})",
            "prompts": [
                {"prompt_index": i, **m.to_dict()} for i, m in enumerate(self.matches) if m is not None
            ],
        }


@dataclass(frozen=True)
class DomainCheck:
    """How far the image lies from one known prompt's concept's training images
    (:mod:`medsam3.model.domain`)."""

    prompt_index: int
    concept: str
    distance: float
    threshold: float

    @property
    def outside(self) -> bool:
        return self.distance > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "concept": self.concept,
            "distance": round(self.distance, 6),
            "threshold": round(self.threshold, 6),
            "outside": self.outside,
        }


def domain_settings(guarded: GuardedPrompts, domain: ModelDomain) -> dict[str, Any]:
    """The ``"domain"`` settings of a result of a model that records its training domain."""
    return {
        "file": DOMAIN_FILE,
        "concepts": sorted(domain.concepts),
        "images_outside": "segmented anyway (allow_out_of_domain)"
        if guarded.allow_outside
        else f"reported absent ({OUTSIDE_DOMAIN})",
        "prompts": [c.to_dict() for c in guarded.domain],
    }


def guard_prompts(
    prompts: Sequence[AnyPrompt],
    concepts: ModelConcepts,
    *,
    allow_unknown: bool = False,
    volume: bool = False,
) -> GuardedPrompts:
    """Match ``prompts`` to ``concepts`` (module docstring, step 1); ``volume``: text-only 2D prompts that
    get a concept become :class:`VolumePrompt` objects (which carry it through the volume modes)."""
    out: list[AnyPrompt] = []
    matches: list[ConceptMatch | None] = []
    unknown: list[int] = []
    for i, p in enumerate(prompts):
        if p.text is None:
            out.append(p)
            matches.append(None)
            continue
        m = concepts.match(p.text)
        matches.append(m)
        if m.concept is None:
            if not allow_unknown:
                unknown.append(i)
            out.append(p)
            continue
        if m.concept != p.text:
            if volume and isinstance(p, Prompt) and not p.boxes and not p.points:
                p = VolumePrompt(p.text, concept=m.concept)
            else:
                p = dataclasses.replace(p, concept=m.concept)
        out.append(p)
    return GuardedPrompts(tuple(out), tuple(matches), tuple(unknown), concepts, allow_unknown)


def _skipped_entry(
    i: int, guarded: GuardedPrompts, image: Image, *, volume: bool, instances: bool
) -> UnknownConceptEntry:
    """The absent entry of prompt ``i``, which the model was not asked about (unknown, or outside)."""
    known = image.meta.get("spacing_known", True) is not False
    check = next((c for c in guarded.domain if c.prompt_index == i and c.outside), None)
    common: dict[str, Any] = dict(
        value=None if instances else i + 1,
        prompt_index=i,
        prompt=guarded.prompts[i],
        score=None,
        presence=None,
        absent=True,
        reason=UNKNOWN_CONCEPT if check is None else OUTSIDE_DOMAIN,
        source=SOURCE if check is None else DOMAIN_SOURCE,
        preprocessing="none (not segmented)",
        known_concepts=tuple(guarded.concepts.names),
        domain_distance=None if check is None else check.distance,
        domain_threshold=None if check is None else check.threshold,
    )
    if volume:
        return UnknownConceptEntry(voxels=0, volume_ml=0.0 if known else None, area_mm2=None, **common)
    return UnknownConceptEntry(area_mm2=0.0 if known else None, **common)


def _renumber_settings(settings: dict[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """Settings with the run's prompt indices (``preprocessing[].prompts``, ``slice_search.prompts[]``)
    mapped to the indices of the full prompt list."""
    out = dict(settings)
    if isinstance(out.get("preprocessing"), list):
        out["preprocessing"] = [
            {**g, "prompts": [index[j] for j in g.get("prompts", [])]} for g in out["preprocessing"]
        ]
    search = out.get("slice_search")
    if isinstance(search, dict) and isinstance(search.get("prompts"), list):
        out["slice_search"] = {
            **search,
            "prompts": [{**p, "prompt_index": index[p["prompt_index"]]} for p in search["prompts"]],
        }
    return out


def merge_unknown(
    result: SegmentationResult,
    guarded: GuardedPrompts,
    image: Image,
    *,
    volume: bool,
    instances: bool,
    extra: dict[str, Any] | None = None,
) -> SegmentationResult:
    """``result`` of the run prompts renumbered to the full prompt list, with an absent entry for each
    prompt not run (module docstring, step 4); ``image`` is the result's reference; ``extra``: settings
    added (the ``"domain"`` settings)."""
    extra = extra or {}
    if not guarded.skipped:  # every prompt ran: only the settings are added
        return dataclasses.replace(
            result, settings={**result.settings, **extra, "vocabulary": guarded.settings()}
        )
    index = guarded.run_index
    n = len(guarded.prompts)
    entries: list[LabelEntry] = []
    for e in result.labels:
        i = index[e.prompt_index]
        value = e.value if instances or e.value is None else i + 1
        entries.append(dataclasses.replace(e, prompt_index=i, value=value))
    for i in guarded.skipped:
        entries.append(_skipped_entry(i, guarded, image, volume=volume, instances=instances))
    entries.sort(key=lambda e: e.prompt_index)  # stable: instances keep their order
    labels = np.asarray(result.label_map)
    if not instances:
        lut = np.zeros(max(int(labels.max()) if labels.size else 0, len(index)) + 1, dtype=np.int64)
        lut[1 : len(index) + 1] = [i + 1 for i in index]
        labels = lut[labels].astype(label_dtype(n), copy=False)
    settings = _renumber_settings(result.settings, index)
    settings.update(extra)
    settings["vocabulary"] = guarded.settings()
    return dataclasses.replace(result, label_map=labels, labels=entries, settings=settings)


def _nothing_to_run(
    engine: Engine,
    image: Image,
    guarded: GuardedPrompts,
    options: SegmentOptions,
    *,
    volume: bool,
    extra: dict[str, Any] | None = None,
) -> SegmentationResult:
    """The result when no prompt is run: an empty label map and one absent entry per prompt."""
    from medsam3.predict.segment_2d import run_settings

    instances = options.instances and not volume
    n = len(guarded.prompts)
    entries: list[LabelEntry] = [
        _skipped_entry(i, guarded, image, volume=volume, instances=instances) for i in range(n)
    ]
    label_map = np.zeros(image.spatial_shape, dtype=label_dtype(0 if instances else n))
    settings = run_settings(engine, options, image, {}, 0, ((),))
    if volume:
        from medsam3.predict.volume.segment import volume_settings

        assert isinstance(options, VolumeOptions)
        settings.update(mode=f"volume ({options.mode})", volume=volume_settings(options))
    else:
        settings["mode"] = "instances" if instances else "semantic"
    settings.update(extra or {})
    settings["vocabulary"] = guarded.settings()
    return SegmentationResult(label_map, entries, image, settings)


def segment_guarded(
    engine: Engine,
    image: Image,
    prompts: Sequence[AnyPrompt],
    options: SegmentOptions,
    concepts: ModelConcepts,
    segment: Callable[[Engine, Image, list[Any], Any], SegmentationResult],
    *,
    volume: bool,
    domain: ModelDomain | None = None,
) -> SegmentationResult:
    """Segment ``image`` (a 2D image or a volume) with ``segment`` (``segment_image`` /
    ``segment_volume``), asking the model only about the concepts it knows (module docstring), and, with
    a ``domain``, only about images inside their training domain.

    Raises:
        PromptError: an invalid prompt (known or not), as the plain segmentation would.
    """
    allow = bool(getattr(options, "allow_unknown_concepts", False))
    guarded = guard_prompts(prompts, concepts, allow_unknown=allow, volume=volume)
    if volume:
        from medsam3.predict.volume.plan import check_volume_request

        assert isinstance(options, VolumeOptions)
        check_volume_request(image, list(guarded.prompts), options)
    else:
        from medsam3.predict.segment_2d import check_image_prompts

        h, w = image.spatial_shape
        check_image_prompts([p for p in guarded.prompts if isinstance(p, Prompt)], (h, w))
    texts = [p.text for p in guarded.prompts if p.text]
    if texts:
        engine.tokenize(texts)  # a prompt the model could not read is an error, known concept or not
    instances = options.instances and not volume
    guarded = dataclasses.replace(guarded, allow_outside=bool(getattr(options, "allow_out_of_domain", False)))
    checked = [] if domain is None else _domain_concepts(guarded, domain)
    result = None
    if guarded.run:
        recording: contextlib.AbstractContextManager[list[np.ndarray]] = (
            recording_descriptors() if checked else contextlib.nullcontext([])
        )
        with recording as rows:
            result = segment(engine, image, guarded.run, options)
        if rows:  # image encoder passes were made (not in the video model's track mode)
            assert domain is not None
            descriptors = np.concatenate(rows)
            checks = tuple(
                DomainCheck(i, c, domain.concepts[c].distance(descriptors), domain.concepts[c].threshold)
                for i, c in checked
            )
            guarded = dataclasses.replace(guarded, domain=checks)
            if guarded.outside:  # segmented again without them: label values as if they found nothing
                result = segment(engine, image, guarded.run, options) if guarded.run else None
    extra = {} if domain is None else {"domain": domain_settings(guarded, domain)}
    if result is None:
        return _nothing_to_run(engine, image, guarded, options, volume=volume, extra=extra)
    return merge_unknown(result, guarded, image, volume=volume, instances=instances, extra=extra)


def _domain_concepts(guarded: GuardedPrompts, domain: ModelDomain) -> list[tuple[int, str]]:
    """``(prompt index, concept)`` of the run prompts that name a concept with a recorded training domain
    and carry no geometry (a box or point places the object: the user has looked at the image)."""
    out = []
    for i in guarded.run_index:
        p = guarded.prompts[i]
        if p.text is None or any(getattr(p, g, None) for g in ("boxes", "points", "box3d")):
            continue
        concept = p.concept or p.text
        if concept in domain.concepts:
            out.append((i, concept))
    return out
