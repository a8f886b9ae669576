"""Training samples drawn from a manifest: (record, slice, concept, negative) items, balanced and resumable.

Every item is a 2D training example: one slice of one image (a 2D image is its own slice 0; a 3D volume is
sliced along array axis 0, the through-plane axis of ``(Z, Y, X)``) and one concept prompt.

How item ``i`` is drawn (only from the manifest; no volume is read):

1. a dataset ``d`` with probability ``p_d ∝ n_d^(1/T)`` where ``n_d`` is its number of images in the split
   (``T = 1`` follows dataset sizes, large ``T`` tends to uniform). With ``group_temperature`` set, a
   modality group ``g`` is drawn first (``p_g ∝ n_g^(1/T_g)``) and then a dataset inside it;
2. an image of ``d`` uniformly (records that share an image file, e.g. one mask file per concept, form one
   image whose annotated concepts are the union of theirs);
3. with probability ``negative_fraction`` a negative: a concept annotated for the image and absent from the
   chosen slice (empty slices of a volume, absent classes of a multi-class image), so the presence head
   learns absence. With ``cross_group_negatives`` a concept of another modality group is used when the
   image has no absent concept (off by default: a concept of another group may still be visible, e.g.
   lungs on an abdominal CT), and, with ``cross_group_share`` > 0, also for that share of the negatives of
   images that do have one (otherwise a volume whose own absent concepts are always available never sees
   another group's concept as a negative). When no negative exists, the item is a positive;
4. otherwise a positive: a concept present on the image, and a slice where it is present.

Each item uses its own generator ``numpy.random.default_rng([seed, i])``, so the stream is a pure function
of ``(records, settings, seed)``: resuming at position ``i`` gives exactly the continuation, and workers or
ranks can each draw their share without talking to each other (:class:`SliceSampleDataset`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from medsam3.data.manifest import Record
from medsam3.errors import InputError


@dataclass(frozen=True)
class SliceSample:
    """One training item.

    Attributes:
        index: position of the item in the sample stream.
        record: index into the sampler's ``records`` (the record whose label map holds ``concept``).
        slice: slice index along axis 0 (0 for 2D images).
        concept: the text prompt (canonical concept).
        negative: True when ``concept`` is absent from the slice (the target mask is empty).
        dataset: the record's dataset name.
    """

    index: int
    record: int
    slice: int
    concept: str
    negative: bool
    dataset: str


@dataclass
class _View:
    """One image (or volume) and the concepts annotated on it, over all its records."""

    dataset: str
    group: str
    num_slices: int
    owner: dict[str, int]  # concept -> record index whose label map annotates it
    present: dict[str, np.ndarray]  # concept -> sorted slice indices where present


class SliceSampler:
    """Deterministic, resumable stream of :class:`SliceSample` items over a manifest split.

    Args:
        records: manifest records (all splits; only ``split`` is used).
        split: which split to sample (``train``, ``val``).
        seed: stream seed.
        negative_fraction: probability of drawing a negative item (0 <= f < 1).
        temperature: dataset balancing temperature ``T`` (``p_d ∝ n_d^(1/T)``), > 0.
        group_temperature: when set, balance modality groups first with this temperature.
        cross_group_negatives: allow concepts of other modality groups as negatives (see module docstring).
        cross_group_share: share of the negatives of images with an absent concept of their own that use
            another group's concept instead (needs ``cross_group_negatives``; 0 keeps the stream unchanged).
    """

    def __init__(
        self,
        records: Sequence[Record],
        split: str = "train",
        seed: int = 0,
        negative_fraction: float = 0.2,
        temperature: float = 1.0,
        group_temperature: float | None = None,
        cross_group_negatives: bool = False,
        cross_group_share: float = 0.0,
    ):
        if not 0.0 <= negative_fraction < 1.0:
            raise InputError(None, f"negative fraction {negative_fraction} is not in [0, 1)")
        if temperature <= 0 or (group_temperature is not None and group_temperature <= 0):
            raise InputError(None, "sampling temperatures must be > 0")
        self.records = list(records)
        self.split = split
        self.seed = int(seed)
        self.negative_fraction = float(negative_fraction)
        self.temperature = float(temperature)
        self.group_temperature = group_temperature
        self.cross_group_negatives = cross_group_negatives
        if not 0.0 <= cross_group_share <= 1.0:
            raise InputError(None, f"cross-group share {cross_group_share} is not in [0, 1]")
        self.cross_group_share = float(cross_group_share)
        self.position = 0
        self._views = self._build_views()
        if not self._views:
            raise InputError(None, f"the manifest has no records in split {split!r}")
        self.datasets = sorted({v.dataset for v in self._views})
        self._by_dataset = {
            d: [i for i, v in enumerate(self._views) if v.dataset == d] for d in self.datasets
        }
        self.probabilities = self._dataset_probabilities()
        self._p = np.array([self.probabilities[d] for d in self.datasets])
        self._absent: dict[tuple[int, str], np.ndarray] = {}
        groups = {v.group for v in self._views}
        self._group_concepts = {
            g: sorted(
                {c for v in self._views if v.group != g for c in v.owner}
                - {c for v in self._views if v.group == g for c in v.owner}
            )
            for g in groups
        }

    # -- setup ---------------------------------------------------------------------------------------
    def _build_views(self) -> list[_View]:
        views: dict[tuple, _View] = {}
        for i, r in enumerate(self.records):
            if r.split != self.split:
                continue
            key = (r.dataset, tuple(r.image), r.source.get("image_id"))
            view = views.get(key)
            if view is None:
                view = views[key] = _View(r.dataset, r.group or r.modality, r.num_slices, {}, {})
            for concept in r.concepts:
                view.owner.setdefault(concept, i)
                slices = r.foreground_slices(concept)
                old = view.present.get(concept, np.zeros(0, np.int64))
                view.present[concept] = np.union1d(old, slices)
        return [v for v in views.values() if v.owner]

    def _dataset_probabilities(self) -> dict[str, float]:
        sizes = {d: len(ix) for d, ix in self._by_dataset.items()}
        if self.group_temperature is None:
            w = {d: n ** (1.0 / self.temperature) for d, n in sizes.items()}
            total = sum(w.values())
            return {d: w[d] / total for d in self.datasets}
        group_of = {v.dataset: v.group for v in self._views}
        groups = sorted(set(group_of.values()))
        g_size = {g: sum(n for d, n in sizes.items() if group_of[d] == g) for g in groups}
        g_w = {g: g_size[g] ** (1.0 / self.group_temperature) for g in groups}
        g_total = sum(g_w.values())
        out = {}
        for g in groups:
            members = [d for d in self.datasets if group_of[d] == g]
            w = {d: sizes[d] ** (1.0 / self.temperature) for d in members}
            for d in members:
                out[d] = g_w[g] / g_total * w[d] / sum(w.values())
        return out

    def _absent_slices(self, view_index: int, concept: str) -> np.ndarray:
        key = (view_index, concept)
        if key not in self._absent:
            v = self._views[view_index]
            self._absent[key] = np.setdiff1d(np.arange(v.num_slices), v.present.get(concept, []))
        return self._absent[key]

    # -- drawing -------------------------------------------------------------------------------------
    def sample(self, index: int) -> SliceSample:
        """Item ``index`` of the stream (independent of any other item)."""
        rng = np.random.default_rng([self.seed, int(index)])
        dataset = self.datasets[int(rng.choice(len(self.datasets), p=self._p))]
        members = self._by_dataset[dataset]
        vi = members[int(rng.integers(len(members)))]
        view = self._views[vi]
        if rng.random() < self.negative_fraction:
            item = self._negative(rng, vi, view, index)
            if item is not None:
                return item
        positives = sorted(c for c, s in view.present.items() if s.size)
        if not positives:
            item = self._negative(rng, vi, view, index)
            if item is None:  # an image whose every concept covers every slice cannot be negative
                raise InputError(None, f"{dataset}: an image has no usable concept")
            return item
        concept = positives[int(rng.integers(len(positives)))]
        slices = view.present[concept]
        sl = int(slices[int(rng.integers(slices.size))])
        return SliceSample(index, view.owner[concept], sl, concept, False, dataset)

    def _negative(self, rng: np.random.Generator, vi: int, view: _View, index: int) -> SliceSample | None:
        candidates = sorted(c for c in view.owner if self._absent_slices(vi, c).size)
        others = self._group_concepts.get(view.group, []) if self.cross_group_negatives else []
        if candidates and others and self.cross_group_share and rng.random() < self.cross_group_share:
            candidates = []
        if candidates:
            concept = candidates[int(rng.integers(len(candidates)))]
            absent = self._absent_slices(vi, concept)
            sl = int(absent[int(rng.integers(absent.size))])
            return SliceSample(index, view.owner[concept], sl, concept, True, view.dataset)
        if others:
            concept = others[int(rng.integers(len(others)))]
            sl = int(rng.integers(view.num_slices))
            return SliceSample(index, next(iter(view.owner.values())), sl, concept, True, view.dataset)
        return None

    def __iter__(self) -> Iterator[SliceSample]:
        """Items from the current position on; the position advances as items are taken."""
        while True:
            item = self.sample(self.position)
            self.position += 1
            yield item

    # -- resuming ------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of the settings and the sampled records; a saved state only resumes the same stream."""
        doc = {
            "split": self.split,
            "seed": self.seed,
            "neg": self.negative_fraction,
            "T": self.temperature,
            "Tg": self.group_temperature,
            "cross": self.cross_group_negatives,
            **({"cross_share": self.cross_group_share} if self.cross_group_share else {}),
            "records": [
                (r.dataset, r.case_id, r.label, sorted(r.foreground))
                for r in self.records
                if r.split == self.split
            ],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint() or state.get("seed") != self.seed:
            raise InputError(None, "the sampler state was saved for other records or settings; cannot resume")
        self.position = int(state["position"])


class SliceSampleDataset(IterableDataset):
    """A torch ``IterableDataset`` over a :class:`SliceSampler`, sharded by batch across ranks and workers.

    Global batch ``g`` holds items ``g * batch_size ... g * batch_size + batch_size - 1``. Rank ``r`` of
    ``world_size`` (``W``) takes global batches ``r, r + W, r + 2W, ...``; DataLoader worker ``w`` of ``K``
    takes every ``K``-th of the rank's batches, which the DataLoader returns in order. After ``n`` steps on
    every rank, exactly the first ``n * batch_size * world_size`` items of the stream have been used:
    resume with ``load_state_dict({"position": n * batch_size * world_size, ...})`` (or :meth:`state_at`).

    Args:
        sampler: the item stream (its ``position`` is the start).
        batch_size: per-rank batch size of the DataLoader that will batch these items.
        load: maps a :class:`SliceSample` to a training example (image slice, target, prompt);
            items are yielded as they are when None.
        rank, world_size: data-parallel position; read from ``torch.distributed`` when initialised.
        num_items: per-rank number of items to yield (``None``: endless).
    """

    def __init__(
        self,
        sampler: SliceSampler,
        batch_size: int = 1,
        load: Callable[[SliceSample], Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_items: int | None = None,
    ):
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.load = load
        self.rank, self.world_size = rank, world_size
        self.num_items = num_items

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def indices(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """Stream positions this rank's ``worker`` draws, in order."""
        rank, world = self._rank_world()
        b = self.batch_size
        start = self.sampler.position // (b * world)
        n_batches = None if self.num_items is None else -(-self.num_items // b)
        j = worker
        while n_batches is None or j < n_batches:
            g = (start + j) * world + rank
            last = n_batches is not None and j == n_batches - 1
            for k in range(self.num_items - j * b if last and self.num_items is not None else b):
                yield g * b + k
            j += num_workers

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.indices(worker, workers):
            item = self.sampler.sample(i)
            yield self.load(item) if self.load is not None else item

    def state_at(self, steps: int) -> dict[str, Any]:
        """Sampler state after ``steps`` DataLoader batches on every rank."""
        _, world = self._rank_world()
        state = self.sampler.state_dict()
        state["position"] = self.sampler.position + steps * self.batch_size * world
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
