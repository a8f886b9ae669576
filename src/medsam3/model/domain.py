"""A model's training domain: how far an image lies from the images each concept was learnt on.

A compact model trained on a few datasets (the bundled ``medsam3-nano``: fetal ultrasound, hippocampus MRI,
colonoscopy) answers "fetal head" with full confidence on a CT slice it has never seen anything like. Its
folder can therefore record, next to its ``concepts.json``, what its image model saw in training:
``domain.safetensors``, with per concept

* ``features (N, D)``: the image descriptors (:func:`image_descriptors`) of the training images of that
  concept, L2-normalised (one row per 2D image, one per slice of a volume), stored in float16 in one
  table that concepts learnt on the same images share;
* ``cases (N,)``: which training case each row comes from;
* a threshold (in the file's metadata), from the largest leave-one-case-out distance of a training case
  to the other training cases of the concept and the distance of the nearest training image of another
  kind (:func:`fit_concept`).

The **distance** of an image to a concept (:meth:`ConceptDomain.distance`) is the median, over the image's
rows (its slices for a volume), of ``1 - cosine similarity`` to the nearest training row. An image farther
than the threshold is outside the concept's training domain: the domain guard
(:mod:`medsam3.predict.vocabulary_guard`) then reports the concept absent with the reason
``outside the training domain`` instead of answering.

The descriptor of an image is the mean and standard deviation over the image model's output tokens
(``last_hidden_state`` of the vision encoder, ``(B, ..., C)`` -> ``(B, 2C)``): what the model itself
"sees", at no extra cost (it is taken from the encoder pass that segments the image).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import ModelError
from medsam3.model.folder_files import model_file

#: The file in a model folder.
DOMAIN_FILE = "domain.safetensors"
#: The reason of an absent entry whose concept the image lies outside of.
OUTSIDE_DOMAIN = "outside the training domain"
#: Format version of the file.
VERSION = 1
#: How descriptors are computed (recorded in the file, checked on load).
DESCRIPTOR = "vision last_hidden_state: token mean and std, L2-normalised"


def image_descriptors(last_hidden_state: Any) -> np.ndarray:
    """``(B, ..., C)`` encoder tokens -> ``(B, 2C)`` float32 descriptors (token mean, std), unit length."""
    import torch

    tokens = last_hidden_state.detach().float()
    tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    desc = torch.cat([tokens.mean(1), tokens.std(1, unbiased=False)], dim=1).cpu().numpy()
    return normalise(desc)


def normalise(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    rows = np.asarray(rows, dtype=np.float32)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norm, 1e-12)


def nearest_distances(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(M,)``: for each of ``rows (M, D)``, ``1 - cosine similarity`` to its nearest row of ``reference
    (N, D)`` (both L2-normalised)."""
    if len(reference) == 0:
        return np.full(len(rows), np.inf, dtype=np.float32)
    return (1.0 - (rows @ reference.T).max(axis=1)).astype(np.float32)


@dataclass(frozen=True)
class ConceptDomain:
    """The training images of one concept, as descriptors, and the distance beyond which an image is
    outside them.

    Attributes:
        features: ``(N, D)`` L2-normalised descriptors of the training rows.
        cases: ``(N,)`` the training case of each row.
        threshold: the distance beyond which an image is outside (:func:`fit_concept`).
        spread: the largest leave-one-case-out distance among the training cases.
        nearest_negative: the distance of the nearest training image of another kind, if any were given.
    """

    features: np.ndarray
    cases: np.ndarray
    threshold: float
    spread: float | None = None
    nearest_negative: float | None = None

    def distance(self, rows: np.ndarray, *, exclude_case: int | None = None) -> float:
        """Median over ``rows (M, D)`` (normalised descriptors of one image) of the distance to the nearest
        training row (of another case than ``exclude_case``)."""
        reference = self.features if exclude_case is None else self.features[self.cases != exclude_case]
        return float(np.median(nearest_distances(normalise(rows), reference)))

    def outside(self, rows: np.ndarray) -> bool:
        return self.distance(rows) > self.threshold


def fit_concept(per_case: list[np.ndarray], negatives: Sequence[np.ndarray] = ()) -> ConceptDomain:
    """A concept's domain from the descriptors of its training cases (each ``(M_i, D)``: one row per image,
    or per slice of a volume) and, optionally, of training images of other kinds (negatives for it).

    The threshold: ``spread``, the largest distance of a training case to all the others (leave one case
    out); with negatives farther than that, the geometric mean of ``spread`` and the nearest negative's
    distance (halfway between them on a log scale), so that a concept learnt on very alike images (a
    few crops of one MRI protocol) still takes the same anatomy in another orientation or at another size,
    while images of another kind stay out.

    Raises:
        ModelError: fewer than 2 cases (no leave-one-out distance).
    """
    if len(per_case) < 2:
        raise ModelError(f"a training domain needs at least 2 cases per concept, got {len(per_case)}")
    features = normalise(np.concatenate(per_case))
    cases = np.concatenate([np.full(len(rows), i, dtype=np.int32) for i, rows in enumerate(per_case)])
    partial = ConceptDomain(features, cases, 0.0)
    spread = max(partial.distance(rows, exclude_case=i) for i, rows in enumerate(per_case))
    nearest = min((partial.distance(rows) for rows in negatives), default=None)
    threshold = spread if nearest is None or nearest <= spread else float(np.sqrt(spread * nearest))
    return ConceptDomain(features, cases, float(threshold), float(spread), nearest)


@dataclass(frozen=True)
class ModelDomain:
    """The training domain of a model's concepts (module docstring); ``path``: the file it was read from."""

    concepts: dict[str, ConceptDomain]
    path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: str | Path) -> Path:
        """Write ``domain.safetensors`` into ``folder`` (descriptors in float16)."""
        import torch
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        thresholds: dict[str, float] = {}
        fitted: dict[str, dict[str, float | None]] = {}
        items = sorted(self.concepts.items())
        # concepts learnt on the same images (a region and its parts) share their rows: one table
        stacked = np.concatenate([dom.features.astype(np.float16) for _, dom in items])
        table, inverse = np.unique(stacked, axis=0, return_inverse=True)
        tensors["features"] = torch.from_numpy(np.ascontiguousarray(table))
        start = 0
        for i, (name, dom) in enumerate(items):
            rows = inverse.reshape(-1)[start : start + len(dom.features)]
            start += len(dom.features)
            tensors[f"c{i}.rows"] = torch.from_numpy(rows.astype(np.int32))
            tensors[f"c{i}.cases"] = torch.from_numpy(dom.cases.astype(np.int32))
            thresholds[name] = dom.threshold
            fitted[name] = {"spread": dom.spread, "nearest_negative": dom.nearest_negative}
        meta = {
            "format": "medsam3 domain",
            "version": str(VERSION),
            "descriptor": DESCRIPTOR,
            "concepts": json.dumps(sorted(self.concepts)),
            "thresholds": json.dumps(thresholds),
            "fitted": json.dumps(fitted),
            "info": json.dumps(self.info),
        }
        path = Path(folder) / DOMAIN_FILE
        from medsam3.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelDomain:
        """Read a ``domain.safetensors``.

        Raises:
            ModelError: not such a file, another version or descriptor, or inconsistent contents.
        """
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
                arrays = {k: fh.get_tensor(k) for k in fh.keys()}
            if meta.get("format") != "medsam3 domain":
                raise ValueError("not a medsam3 domain file")
            if meta.get("version") != str(VERSION) or meta.get("descriptor") != DESCRIPTOR:
                raise ValueError(
                    f"version {meta.get('version')!r} / descriptor {meta.get('descriptor')!r}; this medsam3 "
                    f"reads version {VERSION} ({DESCRIPTOR})"
                )
            names = json.loads(meta["concepts"])
            thresholds = json.loads(meta["thresholds"])
            fitted = json.loads(meta.get("fitted", "{}"))
            concepts = {}
            table = np.asarray(arrays["features"], dtype=np.float32)
            if table.ndim != 2:
                raise ValueError(f"features of shape {table.shape}, expected (rows, dimensions)")
            for i, name in enumerate(names):
                rows = np.asarray(arrays[f"c{i}.rows"])
                cases = np.asarray(arrays[f"c{i}.cases"])
                if rows.ndim != 1 or cases.shape != rows.shape or (rows.size and rows.max() >= len(table)):
                    raise ValueError(f"concept {name!r}: rows {rows.shape}, cases {cases.shape}")
                features = table[rows]
                how = fitted.get(name, {})
                concepts[name] = ConceptDomain(
                    normalise(features),
                    cases,
                    float(thresholds[name]),
                    how.get("spread"),
                    how.get("nearest_negative"),
                )
        except Exception as exc:
            raise ModelError(f"{path}: cannot read the model's training domain: {exc}") from None
        return cls(concepts, str(path), json.loads(meta.get("info", "{}")))

    @classmethod
    def of_model(cls, folder: str | Path | None) -> ModelDomain | None:
        """The domain recorded in a model folder, or ``None`` (no folder, no file); read once per file
        version."""
        return model_file(folder, DOMAIN_FILE, cls.load)
