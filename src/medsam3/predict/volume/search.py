"""Where each prompt is searched in slices mode: every slice (``search="full"``), or coarse to fine.

In slices mode the vision encoder is most of the work, and a prompted structure usually spans a small
part of a volume. The coarse-to-fine search (``search="coarse"``) runs the encoder only where a prompt's
presence (the presence head's probability, gated at ``presence_threshold``) says the concept may be.

Frames: slice indices ``k`` along the slicing axis of the canonical volume (``0 <= k < n``), as in
:class:`~medsam3.predict.volume.plan.SlicePlan`; a prompt's plan ``slices`` is ``range(lo, hi)`` (the whole
volume, or the slices a 3D box covers).

The coarse search, per prompt (:class:`SliceSearch`):

1. **Probes** (:func:`probe_slices`): slices ``lo, lo + k, lo + 2k, ...`` and the last slice ``hi - 1``
   of the plan, plus the key slice of a key-slice box prompt; the step ``k`` in slices is
   ``floor(search_step_mm / slice spacing)``, at least 1 (:func:`probe_step`). Consecutive probes are at
   most ``k`` slices apart, and both ends of the plan are probed.
2. **Ranges**: between two consecutive probes where presence passes, every slice is searched.
3. **Growth**: from every searched slice where presence passes, its neighbours (inside the plan) are
   searched, slice by slice on both sides, until presence fails; so a structure that starts between two
   probes is still found whole.

Presence *passes* on a slice when the prompt is not gated there (outcome other than
:data:`~medsam3.predict.volume.plan.NO_PRESENCE`: presence >= ``presence_threshold``, or a model without a
presence head). Steps 2-3 repeat in rounds (:func:`run_rounds`) until no prompt wants another slice.
Image features are shared as in the full pass: a slice is encoded at most once per intensity mapping, and
every prompt of the mapping whose plan covers it is decided on it then (so one prompt's probe can start
another prompt's growth).

**Guarantee.** With the same model, volume and options (only ``search`` differing), the coarse search
gives the same label map as the full pass (and the same kept slices, scores and masks per prompt) whenever
every *connected z-extent* of every prompt (a maximal run of consecutive slices of its plan on which its
presence passes) contains at least one of its probes (or a slice encoded for another prompt of the same
intensity mapping). Reason: a slice is kept only where presence passes; a searched slice in an extent
starts steps 2-3, which reach every slice of that extent; the label map depends only on the kept slices.
Since probes are at most ``k`` slices apart, every extent of at least ``k`` slices, hence every extent at
least ``search_step_mm`` thick, satisfies the condition, as does every extent touching either end of the
plan or holding the key slice.

**Where it cannot hold.** An extent shorter than ``k`` slices that falls between two probes (a structure
thinner than the probe step, e.g. a 5 mm nodule with the 10 mm step) is never searched: the coarse search
misses it and the full pass finds it. Lower ``search_step_mm`` for small structures (a step no larger
than the slice spacing probes every slice: the full pass). Absent prompts report the best presence and
score seen on the slices searched (at most the full pass's). With ``presence_threshold=0`` every slice
passes and the coarse search searches every slice.

The equality is of computations: a slice's features are computed in a batch of other slices than in the
full pass, and backends whose kernels depend on the batch composition may differ in the last bits (as the
full pass itself does when ``slice_batch`` changes); the label maps in ``tests/test_slice_search.py`` (tiny
random SAM3 and the bundled model, CPU, fp32) are byte-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsam3.predict.volume.plan import SlicePlan


def probe_step(spacing_mm: float, step_mm: float) -> int:
    """Slices between probes: ``floor(step_mm / spacing_mm)``, at least 1 (probes at most ``step_mm`` apart).

    Args:
        spacing_mm: slice spacing along the slicing axis, mm (> 0).
        step_mm: the wanted distance between probes, mm (> 0).
    """
    if not spacing_mm > 0 or not step_mm > 0:
        raise ValueError(f"spacing and step must be positive, got {spacing_mm!r} and {step_mm!r}")
    return max(1, int(math.floor(step_mm / spacing_mm + 1e-9)))


def probe_slices(slices: range, step: int, key: int | None = None) -> tuple[int, ...]:
    """The probed slices of a plan ``range(lo, hi)``: ``lo, lo + step, ...``, ``hi - 1``, and ``key``.

    Returns sorted, distinct slice indices (empty for an empty plan).
    """
    if len(slices) == 0:
        return ()
    probes = set(range(slices.start, slices.stop, max(1, int(step))))
    probes.add(slices.stop - 1)
    if key is not None and key in slices:
        probes.add(int(key))
    return tuple(sorted(probes))


@dataclass
class SliceSearch:
    """Where one prompt is searched, and what was learnt so far (module docstring).

    Attributes:
        n: slices along the slicing axis.
        slices: the prompt's plan, ``range(lo, hi)`` within ``range(n)``.
        probes: the probed slices (coarse search), or ``None``: every slice of the plan (full pass).
        searched: ``(n,)`` bool, slices on which the prompt was decided.
        passed: ``(n,)`` bool, searched slices where presence passed.
    """

    n: int
    slices: range
    probes: tuple[int, ...] | None = None
    searched: np.ndarray = field(init=False)
    passed: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.searched = np.zeros(self.n, dtype=bool)
        self.passed = np.zeros(self.n, dtype=bool)

    @classmethod
    def full(cls, n: int, slices: range) -> SliceSearch:
        return cls(n, slices)

    @classmethod
    def coarse(cls, n: int, slices: range, step: int, key: int | None = None) -> SliceSearch:
        return cls(n, slices, probe_slices(slices, step, key))

    @property
    def is_coarse(self) -> bool:
        return self.probes is not None

    def covers(self, k: int) -> bool:
        return k in self.slices

    def record(self, k: int, passed: bool) -> None:
        """The prompt was decided on slice ``k``; presence ``passed`` there."""
        self.searched[k] = True
        self.passed[k] = bool(passed)

    def wanted(self) -> list[int]:
        """The unsearched slices of the plan this prompt needs next, increasing (empty: done)."""
        lo, hi = self.slices.start, self.slices.stop
        if self.probes is None:
            return [k for k in self.slices if not self.searched[k]]
        probes = [p for p in self.probes if not self.searched[p]]
        if probes:
            return probes
        want = np.zeros(self.n, dtype=bool)
        for p, q in zip(self.probes, self.probes[1:], strict=False):  # step 2: between passing probes
            if self.passed[p] and self.passed[q]:
                want[p + 1 : q] = True
        grow = self.searched & self.passed  # step 3: neighbours of passing slices
        want[:-1] |= grow[1:]
        want[1:] |= grow[:-1]
        want[:lo] = False
        want[hi:] = False
        want &= ~self.searched
        return [int(k) for k in np.flatnonzero(want)]

    @property
    def searched_slices(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(self.searched)]


def run_rounds(
    searches: Mapping[int, SliceSearch],
    batch: int,
    evaluate: Callable[[list[int], list[tuple[int, int]]], Sequence[bool]],
) -> int:
    """Search slices in rounds until no search wants another; each slice is given to ``evaluate`` once.

    Args:
        searches: prompt index -> its search, in prompt order (the prompts of one intensity mapping).
        batch: slices per call of ``evaluate``.
        evaluate: ``(ks, rows) -> passed``: ``ks`` the slices of one batch (increasing within a round),
            ``rows`` the ``(position in ks, prompt index)`` pairs to decide, slice by slice, prompts in
            order (every prompt whose plan covers the slice and that has not been decided on it);
            returns per row whether presence passed.

    Returns:
        The number of slices evaluated (each encoded once). A full search (``probes=None``) takes one round
        with the plans' union, in ``batch``-sized slices: the order of the plain full pass.
    """
    n = max((s.n for s in searches.values()), default=0)
    done = np.zeros(n, dtype=bool)
    count = 0
    while True:
        want = sorted({k for s in searches.values() for k in s.wanted() if not done[k]})
        if not want:
            return count
        for start in range(0, len(want), batch):
            ks = want[start : start + batch]
            rows = [
                (b, i)
                for b, k in enumerate(ks)
                for i, s in searches.items()
                if s.covers(k) and not s.searched[k]
            ]
            passed = evaluate(ks, rows)
            for (b, i), ok in zip(rows, passed, strict=True):
                searches[i].record(ks[b], ok)
            done[ks] = True
            count += len(ks)


def search_profile(
    profile: Sequence[bool], step: int, slices: range | None = None, key: int | None = None
) -> list[int]:
    """The slices a coarse search visits for one prompt whose presence passes on slice ``k`` exactly when
    ``profile[k]`` (``n = len(profile)`` slices; plan ``slices``, default all)."""
    n = len(profile)
    search = SliceSearch.coarse(n, range(n) if slices is None else slices, step, key)
    run_rounds({0: search}, max(1, n), lambda ks, rows: [bool(profile[ks[b]]) for b, _ in rows])
    return search.searched_slices


def plan_searches(plans: Sequence[SlicePlan], n: int, search: str, step: int) -> list[SliceSearch]:
    """Per prompt its :class:`SliceSearch`: every slice of its plan (``"full"``), or coarse to fine with
    probes every ``step`` slices (``"coarse"``; the key slice of a key-slice box prompt is probed)."""
    if search == "coarse":
        return [SliceSearch.coarse(n, plan.slices, step, plan.key) for plan in plans]
    return [SliceSearch.full(n, plan.slices) for plan in plans]


def runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices as inclusive runs of consecutive values: ``[0, 1, 2, 5]`` -> ``[(0, 2), (5, 5)]``."""
    out: list[tuple[int, int]] = []
    for k in sorted(int(i) for i in indices):
        if out and k == out[-1][1] + 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


def search_report(
    searches: Sequence[SliceSearch],
    *,
    search: str,
    step_mm: float,
    step: int,
    spacing_mm: float | None,
    to_input: Callable[[int], int],
    input_axis: int,
    encoder_runs_full: int,
) -> dict[str, Any]:
    """The ``"slice_search"`` settings of a slices-mode result.

    Slices are reported as input array indices along ``input_axis`` (``to_input`` maps a canonical slice
    index to it), as inclusive ``[first, last]`` runs. ``spacing_mm`` is ``None`` when the image does not
    state its spacing (the step was then computed with the image's nominal 1 mm).
    """
    prompts = []
    for i, s in enumerate(searches):
        searched = sorted(to_input(k) for k in s.searched_slices)
        prompts.append(
            {
                "prompt_index": i,
                "slices_searched": len(searched),
                "searched": [list(r) for r in runs(searched)],
                "probes": None if s.probes is None else sorted(to_input(k) for k in s.probes),
            }
        )
    out: dict[str, Any] = {"search": search, "input_axis": input_axis}
    if search == "coarse":
        out.update({"step_mm": step_mm, "step_slices": step, "slice_spacing_mm": spacing_mm})
    out.update({"encoder_runs_full": encoder_runs_full, "prompts": prompts})
    return out
