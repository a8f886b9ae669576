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

Every guarded result's settings carry ``"vocabulary"``: the model's concepts, what happens to unknown
prompts, and what each text prompt matched. Models without recorded concepts (or with an open vocabulary)
never come here: their results are as they always were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam3.image import Image
from medsam3.model.concepts import CONCEPTS_FILE, ConceptMatch, ModelConcepts
from medsam3.predict.engine import Engine
from medsam3.predict.options import SegmentOptions, VolumeOptions
from medsam3.predict.postprocess import label_dtype
from medsam3.predict.prompts import Prompt
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.volume.prompts import VolumePrompt

#: The ``reason`` of an absent entry whose prompt the model does not know.
UNKNOWN_CONCEPT = "unknown concept"
#: The ``source`` of such an entry: decided by the vocabulary, not by the model.
SOURCE = "vocabulary"

AnyPrompt = Prompt | VolumePrompt


@dataclass
class UnknownConceptEntry(LabelEntry):
    """An absent label entry for a prompt outside the model's concepts; ``known_concepts`` lists them."""

    known_concepts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["known_concepts"] = list(self.known_concepts)
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

    @property
    def run_index(self) -> list[int]:
        """Indices (in the given order) of the prompts the model runs."""
        skip = set(self.unknown)
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


def _unknown_entry(
    i: int, prompt: AnyPrompt, image: Image, names: Sequence[str], *, volume: bool, instances: bool
) -> UnknownConceptEntry:
    known = image.meta.get("spacing_known", True) is not False
    common: dict[str, Any] = dict(
        value=None if instances else i + 1,
        prompt_index=i,
        prompt=prompt,
        score=None,
        presence=None,
        absent=True,
        reason=UNKNOWN_CONCEPT,
        source=SOURCE,
        preprocessing="none (not segmented)",
        known_concepts=tuple(names),
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
    result: SegmentationResult, guarded: GuardedPrompts, image: Image, *, volume: bool, instances: bool
) -> SegmentationResult:
    """``result`` of the run prompts renumbered to the full prompt list, with an absent entry for each
    unknown prompt (module docstring, step 4); ``image`` is the result's reference."""
    if not guarded.unknown:  # every prompt ran: only the settings are added
        return dataclasses.replace(result, settings={**result.settings, "vocabulary": guarded.settings()})
    index = guarded.run_index
    n = len(guarded.prompts)
    names = guarded.concepts.names
    entries: list[LabelEntry] = []
    for e in result.labels:
        i = index[e.prompt_index]
        value = e.value if instances or e.value is None else i + 1
        entries.append(dataclasses.replace(e, prompt_index=i, value=value))
    for i in guarded.unknown:
        p = guarded.prompts[i]
        entries.append(_unknown_entry(i, p, image, names, volume=volume, instances=instances))
    entries.sort(key=lambda e: e.prompt_index)  # stable: instances keep their order
    labels = np.asarray(result.label_map)
    if not instances:
        lut = np.zeros(max(int(labels.max()) if labels.size else 0, len(index)) + 1, dtype=np.int64)
        lut[1 : len(index) + 1] = [i + 1 for i in index]
        labels = lut[labels].astype(label_dtype(n), copy=False)
    settings = _renumber_settings(result.settings, index)
    settings["vocabulary"] = guarded.settings()
    return dataclasses.replace(result, label_map=labels, labels=entries, settings=settings)


def _nothing_to_run(
    engine: Engine, image: Image, guarded: GuardedPrompts, options: SegmentOptions, *, volume: bool
) -> SegmentationResult:
    """The result when every prompt is unknown: an empty label map and one absent entry per prompt."""
    from medsam3.predict.segment_2d import run_settings

    instances = options.instances and not volume
    n = len(guarded.prompts)
    names = guarded.concepts.names
    entries: list[LabelEntry] = [
        _unknown_entry(i, p, image, names, volume=volume, instances=instances)
        for i, p in enumerate(guarded.prompts)
    ]
    label_map = np.zeros(image.spatial_shape, dtype=label_dtype(0 if instances else n))
    settings = run_settings(engine, options, image, {}, 0, ((),))
    if volume:
        from medsam3.predict.volume.segment import volume_settings

        assert isinstance(options, VolumeOptions)
        settings.update(mode=f"volume ({options.mode})", volume=volume_settings(options))
    else:
        settings["mode"] = "instances" if instances else "semantic"
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
) -> SegmentationResult:
    """Segment ``image`` (a 2D image or a volume) with ``segment`` (``segment_image`` /
    ``segment_volume``), asking the model only about the concepts it knows (module docstring).

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
    run = guarded.run
    if not run:
        return _nothing_to_run(engine, image, guarded, options, volume=volume)
    result = segment(engine, image, run, options)
    return merge_unknown(result, guarded, image, volume=volume, instances=options.instances and not volume)
