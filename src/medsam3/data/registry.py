"""The datasets of the Medical SAM3 paper: where to get them, what they label, how their folders are read.

``registry.json`` (next to this module) lists the 33 training datasets of the paper's Table 1 and its 7
external evaluation datasets. Each entry gives the modality group, 2D/3D, canonical concepts, the label
value -> concept table, the layout reader and its options (:mod:`medsam3.data.layouts`), the official page,
the license as best known, and the split role:

``train``          training data, split 85/15 train/val;
``internal-eval``  training data whose validation split is one of the paper's 10 internal evaluation tasks;
``external``       never trained on; every case goes to ``test``.

``layout: null`` marks releases whose annotation format no reader handles (numpy arrays, XML, HDF5, contour
text files); the entry's notes say what to convert them to. ``verified`` says which fields were checked
against a real copy of the data; the rest is best knowledge, and licenses must be read at the source.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from medsam3.errors import InputError

REGISTRY_FILE = Path(__file__).with_name("registry.json")
ROLES = ("train", "internal-eval", "external")


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry (see the module docstring)."""

    name: str
    group: str
    modality: str
    dims: int
    role: str
    images: int | None
    concepts: tuple[str, ...]
    labels: dict[int, str] | None
    layout: str | None
    options: dict[str, Any]
    url: str | None
    license: str
    verified: dict[str, bool] = field(default_factory=dict)
    notes: str = ""

    @property
    def split_role(self) -> str:
        """``external`` for evaluation-only datasets, else ``train`` (split 85/15)."""
        return "external" if self.role == "external" else "train"

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DatasetEntry:
        labels = doc.get("labels")
        return cls(
            name=doc["name"],
            group=doc["group"],
            modality=doc["modality"],
            dims=int(doc["dims"]),
            role=doc["role"],
            images=doc.get("images"),
            concepts=tuple(doc["concepts"]),
            labels=None if labels is None else {int(k): v for k, v in labels.items()},
            layout=doc.get("layout"),
            options=dict(doc.get("options") or {}),
            url=doc.get("url"),
            license=doc.get("license", "see source"),
            verified=dict(doc.get("verified") or {}),
            notes=doc.get("notes", ""),
        )


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.casefold())


@lru_cache(maxsize=1)
def _load() -> tuple[DatasetEntry, ...]:
    doc = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    return tuple(DatasetEntry.from_json(d) for d in doc["datasets"])


def entries(role: str | None = None) -> list[DatasetEntry]:
    """All registry entries in file order, or those of one role."""
    if role is not None and role not in ROLES:
        raise InputError(None, f"unknown role {role!r}; expected one of {ROLES}")
    return [e for e in _load() if role is None or e.role == role]


def get(name: str) -> DatasetEntry:
    """The entry named ``name`` (case, spaces, ``-`` and ``_`` ignored: ``kvasir_seg`` finds Kvasir-SEG)."""
    wanted = _key(name)
    for e in _load():
        if _key(e.name) == wanted:
            return e
    close = [e.name for e in _load() if wanted and (wanted in _key(e.name) or _key(e.name) in wanted)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see medsam3 prepare --list"
    raise InputError(None, f"no dataset {name!r} in the registry{hint}")


def format_table(selected: list[DatasetEntry] | None = None) -> str:
    """Plain-text table of the registry (``medsam3 prepare --list``); ``?`` marks unverified fields."""
    rows = [("name", "role", "group", "dims", "images", "concepts", "layout", "license", "url")]
    for e in selected if selected is not None else entries():
        mark = lambda ok: "" if ok else "?"  # noqa: E731
        rows.append(
            (
                e.name,
                e.role,
                e.group,
                f"{e.dims}D",
                str(e.images or "-"),
                ", ".join(e.concepts),
                (e.layout or "convert first") + mark(e.verified.get("layout")),
                e.license + mark(e.verified.get("license")),
                (e.url or "not identified") + mark(e.verified.get("url")),
            )
        )
    widths = [min(max(len(r[i]) for r in rows), 40) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + r[-1])
    counts = {role: len(entries(role)) for role in ROLES}
    n_train = counts["train"] + counts["internal-eval"]
    lines.append(
        f"\n{n_train} training datasets ({counts['internal-eval']} with an internal evaluation task), "
        f"{counts['external']} external. '?' = not verified; read each license at its source."
    )
    return "\n".join(lines)
