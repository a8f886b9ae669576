"""Per-dataset train/validation splits: 85/15 with seed 42, deterministic, stable when data is added.

Rule for a dataset seen for the first time: sort its case ids, shuffle them with
``numpy.random.default_rng(seed)``, and put the first ``n_val = ceil(n * val_fraction)`` in ``val``
(the convention of scikit-learn's ``train_test_split``; a dataset of a single case keeps it in ``train``).
The result depends only on the set of case ids, never on the order in which files were found.

When a splits file already assigns some cases, those keep their split. New cases are sorted, shuffled with
the same seed, and the first ``k`` go to ``val`` where ``k`` brings the dataset's validation count to
``ceil(n_total * val_fraction)`` (never negative, never more than the new cases). Cases no longer present
stay in the file, so they get their old split back if they return.

Datasets used for external evaluation only put every case in ``test``.

Splits file (JSON)::

    {
        "seed": 42,
        "val_fraction": 0.15,
        "datasets": {"Kvasir-SEG": {"train": ["a", "c", ...], "val": ["b", ...]}, "HC18": {"test": [...]}},
    }
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from medsam3.errors import InputError
from medsam3.io.atomic import write_text_atomic

SEED = 42
VAL_FRACTION = 0.15


def n_val_for(n: int, val_fraction: float = VAL_FRACTION) -> int:
    """Validation count for ``n`` cases: ``ceil(n * val_fraction)``, 0 when ``n < 2``."""
    if n < 2:
        return 0
    return min(n - 1, math.ceil(n * val_fraction - 1e-9))


def _shuffled(case_ids: Iterable[str], seed: int) -> list[str]:
    ids = sorted(set(case_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in order]


def split_dataset(
    case_ids: Iterable[str],
    existing: Mapping[str, str] | None = None,
    seed: int = SEED,
    val_fraction: float = VAL_FRACTION,
    role: str = "train",
) -> dict[str, str]:
    """Case id -> ``train``/``val``/``test`` for one dataset (see the module docstring).

    Args:
        case_ids: the dataset's cases now on disk (any order, duplicates ignored).
        existing: assignments from an earlier run, respected as they are.
        role: ``external`` puts every case in ``test``.
    """
    ids = sorted(set(case_ids))
    if role == "external":
        return {c: "test" for c in ids}
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(None, f"validation fraction {val_fraction} is not in [0, 1)")
    existing = dict(existing or {})
    kept = {c: existing[c] for c in ids if c in existing}
    new = [c for c in ids if c not in existing]
    all_ids = set(ids) | set(existing)
    target_val = n_val_for(len(all_ids), val_fraction)
    have_val = sum(1 for s in existing.values() if s == "val")
    k = max(0, min(len(new), target_val - have_val))
    shuffled = _shuffled(new, seed)
    out = dict(kept)
    out.update({c: ("val" if i < k else "train") for i, c in enumerate(shuffled)})
    return out


def read_splits(path: str | Path) -> dict[str, dict[str, str]]:
    """Dataset -> case id -> split, from a splits file (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        out: dict[str, dict[str, str]] = {}
        for dataset, parts in doc["datasets"].items():
            out[dataset] = {}
            for split, cases in parts.items():
                if split not in ("train", "val", "test"):
                    raise ValueError(f"unknown split {split!r} in dataset {dataset!r}")
                for c in cases:
                    if c in out[dataset] and out[dataset][c] != split:
                        raise ValueError(f"case {c!r} of {dataset!r} is in two splits")
                    out[dataset][c] = split
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(path, f"not a valid splits file ({exc})") from None


def splits_text(
    splits: Mapping[str, Mapping[str, str]], seed: int = SEED, val_fraction: float = VAL_FRACTION
) -> str:
    datasets = {}
    for dataset in sorted(splits):
        parts: dict[str, list[str]] = {}
        for case, split in sorted(splits[dataset].items()):
            parts.setdefault(split, []).append(case)
        datasets[dataset] = {s: parts[s] for s in ("train", "val", "test") if s in parts}
    doc = {"seed": seed, "val_fraction": val_fraction, "datasets": datasets}
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def write_splits(
    path: str | Path,
    splits: Mapping[str, Mapping[str, str]],
    seed: int = SEED,
    val_fraction: float = VAL_FRACTION,
) -> Path:
    """Write the splits file atomically."""
    return write_text_atomic(path, splits_text(splits, seed, val_fraction))
