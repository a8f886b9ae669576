"""Record a model's training domain (:mod:`medsam3.model.domain`) from its training images.

Each training image is segmented with its concept exactly as ``medsam3 segment`` would (the model's
defaults, the vocabulary and domain guards off), and the descriptors of every image-encoder pass of that
call are kept: one row for a 2D image, one per encoded slice of a volume. The rows of each case are then
fitted per concept (:func:`medsam3.model.domain.fit_concept`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam3.model.domain import ModelDomain, fit_concept
from medsam3.predict.engine import recording_descriptors


@dataclass(frozen=True)
class DomainCase:
    """One training case: its id, the concepts learnt on it, and the image (anything ``segment`` reads)."""

    case: str
    concepts: tuple[str, ...]
    image: Any


def case_descriptors(segmenter: Any, image: Any, concept: str) -> np.ndarray:
    """``(M, D)`` descriptors of the encoder passes made to segment ``image`` with ``concept``."""
    with recording_descriptors() as rows:
        segmenter.segment(image, [concept], allow_unknown_concepts=True, allow_out_of_domain=True)
    if not rows:
        raise ValueError(f"no image encoder pass was made for {concept!r}")
    return np.concatenate(rows)


def fit_domain(
    segmenter: Any,
    cases: Iterable[DomainCase],
    *,
    negatives: Iterable[DomainCase] = (),
    info: dict | None = None,
) -> ModelDomain:
    """The training domain of every concept of ``cases`` (each concept needs at least 2 cases).

    Args:
        segmenter: a :class:`~medsam3.predict.segmenter.Segmenter` of the model (without guards).
        cases: the training cases; a case with several concepts is encoded once, with its first concept
            (the image passes do not depend on the prompt's text, save a CT window named by a concept).
        negatives: training images of other kinds; ``concepts``: those it is a negative for.
        info: recorded with the domain (where the cases came from).
    """
    per_concept: dict[str, list[np.ndarray]] = {}
    for case in cases:
        rows = case_descriptors(segmenter, case.image, case.concepts[0])
        for concept in case.concepts:
            per_concept.setdefault(concept, []).append(rows)
    against: dict[str, list[np.ndarray]] = {}
    for case in negatives:
        concepts = [c for c in case.concepts if c in per_concept]
        if concepts:
            rows = case_descriptors(segmenter, case.image, concepts[0])
            for concept in concepts:
                against.setdefault(concept, []).append(rows)
    domains = {name: fit_concept(rows, against.get(name, ())) for name, rows in sorted(per_concept.items())}
    counts = {k: {"cases": len(v), "negatives": len(against.get(k, ()))} for k, v in per_concept.items()}
    return ModelDomain(domains, None, {**(info or {}), "fitted_on": counts})
