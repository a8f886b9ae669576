"""Training clips drawn from a manifest: N consecutive slices of a volume and one concept, resumable.

A clip is the 3D counterpart of :class:`medsam3.data.sampler.SliceSample`: ``length`` slices
``start, start + stride, ...`` along array axis 0 (the acquired, through-plane axis of ``(Z, Y, X)``) of one
volume, and one concept prompt for all of them. A 2D image is a clip of one slice, so 2D and 3D records
share one stream.

How clip ``i`` is drawn (only from the manifest; no volume is read), following the slice sampler's steps 1-2
(a dataset by temperature, then an image of it) and then:

3. with probability ``negative_fraction`` a **negative**: a concept annotated for the volume whose mask is
   empty on every slice of the clip (a window drawn uniformly among the windows where it is absent), so the
   presence head keeps learning absence; with ``cross_group_negatives``, a concept of another modality
   group, as the slice sampler does. When no such window or concept exists, the clip is a positive;
4. otherwise a **positive**: a concept present in the volume, and a start drawn uniformly among the slices
   where the concept is present (Medical SAM3 V2's "random start among annotated slices"), moved back when
   the clip would run past the last slice (``start = min(s, Z - extent)``). Frame 0 is then annotated unless
   the clip had to move; later frames may leave the structure (their targets are empty).

A volume with fewer slices than the clip needs gives a shorter clip (``(Z - 1) // stride + 1`` frames).
Each clip uses its own generator ``numpy.random.default_rng([seed, i])``: the stream is a pure function of
``(records, settings, seed)`` and resumes exactly from any position
(:class:`~medsam3.data.sampler.SliceSampleDataset` shards it over ranks and workers unchanged).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsam3.data.manifest import Record
from medsam3.data.sampler import SliceSampler, _View
from medsam3.errors import InputError


@dataclass(frozen=True)
class ClipSample:
    """One training clip.

    Attributes:
        index: position of the clip in the stream.
        record: index into the sampler's ``records`` (the record whose label map holds ``concept``).
        start: first slice (axis 0 of the file; 0 for 2D images).
        length: number of frames.
        stride: slices between consecutive frames.
        concept: the text prompt.
        negative: True when ``concept`` is absent from every frame.
        dataset: the record's dataset name.
    """

    index: int
    record: int
    start: int
    length: int
    stride: int
    concept: str
    negative: bool
    dataset: str

    @property
    def slices(self) -> tuple[int, ...]:
        """The frames' slice indices along axis 0."""
        return tuple(self.start + j * self.stride for j in range(self.length))


def clip_frames(num_slices: int, length: int, stride: int) -> int:
    """Frames of a clip in a volume of ``num_slices`` slices:
    ``min(length, (num_slices - 1) // stride + 1)``."""
    return max(1, min(int(length), (int(num_slices) - 1) // int(stride) + 1))


def window_starts_without(present: np.ndarray, num_slices: int, length: int, stride: int) -> np.ndarray:
    """Starts ``s`` of the clips ``s, s + stride, ...`` (``length`` frames) that contain none of ``present``.

    Args:
        present: sorted slice indices (int) where the concept is present.
        num_slices: slices of the volume; length, stride: the clip (``length`` already fitted to the volume).

    Returns:
        int64 starts in ``[0, num_slices - (length - 1) * stride)``, ascending.
    """
    extent = (length - 1) * stride + 1
    starts = np.arange(max(0, num_slices - extent + 1), dtype=np.int64)
    if starts.size == 0:
        return starts
    on = np.zeros(num_slices, bool)
    on[np.asarray(present, dtype=np.int64)] = True
    frames = starts[:, None] + np.arange(length, dtype=np.int64)[None, :] * stride
    return starts[~on[frames].any(axis=1)]


class ClipSampler(SliceSampler):
    """Deterministic, resumable stream of :class:`ClipSample` items over a manifest split.

    Args:
        records, split, seed, negative_fraction, temperature, group_temperature, cross_group_negatives,
            cross_group_share: as :class:`~medsam3.data.sampler.SliceSampler`.
        length: frames per clip (default 8, Medical SAM3 V2's clip).
        stride: slices between frames (1: consecutive slices).
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
        *,
        length: int = 8,
        stride: int = 1,
    ):
        if length < 1 or stride < 1:
            raise InputError(None, f"clip length {length} and stride {stride} must be >= 1")
        self.length, self.stride = int(length), int(stride)
        super().__init__(
            records,
            split,
            seed,
            negative_fraction,
            temperature,
            group_temperature,
            cross_group_negatives,
            cross_group_share,
        )
        self._absent_windows: dict[tuple[int, str], np.ndarray] = {}

    def frames_of(self, view: _View) -> int:
        """Frames of a clip of ``view``."""
        return clip_frames(view.num_slices, self.length, self.stride)

    def _windows_without(self, vi: int, concept: str) -> np.ndarray:
        key = (vi, concept)
        if key not in self._absent_windows:
            v = self._views[vi]
            present = v.present.get(concept, np.zeros(0, np.int64))
            self._absent_windows[key] = window_starts_without(
                present, v.num_slices, self.frames_of(v), self.stride
            )
        return self._absent_windows[key]

    # -- drawing -------------------------------------------------------------------------------------
    def sample(self, index: int) -> ClipSample:  # type: ignore[override]
        """Clip ``index`` of the stream (independent of any other clip)."""
        rng = np.random.default_rng([self.seed, int(index)])
        dataset = self.datasets[int(rng.choice(len(self.datasets), p=self._p))]
        members = self._by_dataset[dataset]
        vi = members[int(rng.integers(len(members)))]
        view = self._views[vi]
        n = self.frames_of(view)
        if rng.random() < self.negative_fraction:
            item = self._negative_clip(rng, vi, view, index, n)
            if item is not None:
                return item
        positives = sorted(c for c, s in view.present.items() if s.size)
        if not positives:
            item = self._negative_clip(rng, vi, view, index, n)
            if item is None:
                raise InputError(None, f"{dataset}: an image has no usable concept")
            return item
        concept = positives[int(rng.integers(len(positives)))]
        slices = view.present[concept]
        first = int(slices[int(rng.integers(slices.size))])
        start = min(first, view.num_slices - ((n - 1) * self.stride + 1))
        return ClipSample(index, view.owner[concept], start, n, self.stride, concept, False, dataset)

    def _negative_clip(
        self, rng: np.random.Generator, vi: int, view: _View, index: int, n: int
    ) -> ClipSample | None:
        candidates = sorted(c for c in view.owner if self._windows_without(vi, c).size)
        others = self._group_concepts.get(view.group, []) if self.cross_group_negatives else []
        if candidates and others and self.cross_group_share and rng.random() < self.cross_group_share:
            candidates = []
        if candidates:
            concept = candidates[int(rng.integers(len(candidates)))]
            starts = self._windows_without(vi, concept)
            start = int(starts[int(rng.integers(starts.size))])
            return ClipSample(index, view.owner[concept], start, n, self.stride, concept, True, view.dataset)
        if others:
            concept = others[int(rng.integers(len(others)))]
            start = int(rng.integers(view.num_slices - (n - 1) * self.stride))
            record = next(iter(view.owner.values()))
            return ClipSample(index, record, start, n, self.stride, concept, True, view.dataset)
        return None

    # -- resuming ------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """The slice sampler's fingerprint extended by the clip shape."""
        base = super().fingerprint()
        doc = {"base": base, "length": self.length, "stride": self.stride}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def clips_per_epoch(self) -> int:
        """Clips that cover the split once: per volume, its foreground slices over the clip length (rounded
        up), plus one per 2D image."""
        units = 0
        for v in self._views:
            if v.num_slices == 1:
                units += 1
                continue
            fg = set()
            for s in v.present.values():
                fg.update(s.tolist())
            units += -(-len(fg) // self.frames_of(v))
        return max(1, units)
