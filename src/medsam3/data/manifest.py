"""The training manifest: one JSON line per image/label pair, the single input of training and evaluation.

A record says where the image and label files are, what each label value means (a canonical concept of
:mod:`medsam3.data.vocabulary`), which split the case belongs to, and on which slices each concept is
present, so that sampling never has to read a volume.

Example line (a 3D volume)::

    {"dataset": "Task04_Hippocampus", "case_id": "hippocampus_001", "split": "train",
     "image": ["/data/Task04/imagesTr/hippocampus_001.nii.gz"], "label": ["/data/Task04/labelsTr/..."],
     "labels": {"1": "anterior hippocampus", "2": "posterior hippocampus"},
     "label_names": {"1": "Anterior", "2": "Posterior"}, "modality": "MR", "group": "MR", "dims": 3,
     "shape": [35, 51, 35], "foreground": {"anterior hippocampus": [[12, 27]], ...}, "layout": "nnunet",
     "mask": {"mode": "values"}, "instances": false, "regions": {}, "prompts": {}, "source": {}}

``foreground`` lists half-open slice ranges ``[start, stop)`` along array axis 0 (the through-plane axis of
``(Z, Y, X)``); a 2D record has ``[[0, 1]]`` for each concept present and no entry for absent ones.
Paths are absolute. ``split`` is ``train``, ``val`` or ``test`` (datasets kept for external evaluation).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputError
from medsam3.io.atomic import write_text_atomic

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One image/label pair of a dataset (see the module docstring for the JSON form).

    Attributes:
        dataset: dataset name (registry name or ``--name``).
        case_id: identifier unique within the dataset; the unit of the train/val split.
        image: image file(s), one per channel (nnU-Net ``_0000``, ``_0001``, ...) or one file.
        label: label file(s); several are merged by maximum.
        labels: label value -> canonical concept.
        label_names: label value -> the name the dataset uses.
        modality: image modality code (:data:`medsam3.image.MODALITIES`).
        dims: 2 or 3 spatial dimensions.
        split: ``train`` / ``val`` / ``test``.
        layout: reader that found the record (``nnunet``, ``folder2d``, ``npz``, ``coco``).
        group: modality group used to balance sampling (the paper's groups, else the modality).
        shape: spatial array shape ``(Z, Y, X)`` or ``(Y, X)``.
        foreground: concept -> slice ranges ``[[start, stop), ...]`` along axis 0 where it is present.
        mask: how label pixels become label values (:mod:`medsam3.data.labels`).
        instances: True when label maps hold instance ids of one concept (nuclei, glands).
        regions: concept -> label values whose union is that concept (nnU-Net region labels).
        prompts: label value -> extra text prompts shipped with the data (BiomedSegFM).
        source: layout-specific keys (COCO ``image_id``; npz ``subset``, ``image_key``, ``label_key``).
    """

    dataset: str
    case_id: str
    image: list[str]
    label: list[str]
    labels: dict[int, str]
    label_names: dict[int, str] = field(default_factory=dict)
    modality: str = "OTHER"
    dims: int = 2
    split: str = "train"
    layout: str = ""
    group: str = ""
    shape: list[int] = field(default_factory=list)
    foreground: dict[str, list[list[int]]] = field(default_factory=dict)
    mask: dict[str, Any] = field(default_factory=lambda: {"mode": "values"})
    instances: bool = False
    regions: dict[str, list[int]] = field(default_factory=dict)
    prompts: dict[int, list[str]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    # -- derived -------------------------------------------------------------------------------------
    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """Identity of the record inside a manifest."""
        return (self.dataset, self.case_id, tuple(self.label))

    @property
    def num_slices(self) -> int:
        """Number of slices along axis 0 (1 for 2D)."""
        return int(self.shape[0]) if self.dims == 3 and self.shape else 1

    @property
    def concepts(self) -> list[str]:
        """Concepts this record's labels can contain (sorted, unique)."""
        return sorted(set(self.labels.values()) | set(self.regions))

    def concept_values(self) -> dict[str, list[int]]:
        """Concept -> label values whose union is the concept's mask."""
        out: dict[str, list[int]] = {}
        for value, concept in sorted(self.labels.items()):
            out.setdefault(concept, []).append(value)
        for concept, values in self.regions.items():
            out[concept] = sorted(set(out.get(concept, [])) | set(values))
        return out

    def foreground_slices(self, concept: str) -> np.ndarray:
        """Sorted slice indices (int64) where ``concept`` is present."""
        ranges = self.foreground.get(concept, [])
        if not ranges:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])

    # -- JSON ----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("labels", "label_names", "prompts"):
            doc[key] = {str(k): v for k, v in sorted(doc[key].items())}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str | Path | None = None) -> Record:
        try:
            doc = dict(doc)
            for key in ("labels", "label_names", "prompts"):
                doc[key] = {int(k): v for k, v in doc.get(key, {}).items()}
            for key in ("image", "label"):
                if isinstance(doc.get(key), str):
                    doc[key] = [doc[key]]
            record = cls(**doc)
        except (TypeError, ValueError) as exc:
            raise InputError(source, f"not a manifest record ({exc})") from None
        if record.split not in SPLITS:
            raise InputError(
                source, f"record {record.case_id!r} has split {record.split!r}; expected {SPLITS}"
            )
        return record


def ranges_from_indices(indices: Iterable[int]) -> list[list[int]]:
    """Sorted unique indices -> half-open ranges: ``[2, 3, 4, 7]`` -> ``[[2, 5], [7, 8]]``."""
    out: list[list[int]] = []
    for i in sorted(set(int(i) for i in indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def read_manifest(path: str | Path) -> list[Record]:
    """Records of a JSONL manifest (blank lines skipped); errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(path, "manifest not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the manifest ({exc})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise InputError(path, f"line {n} is not JSON ({exc})") from None
        records.append(Record.from_json(doc, f"{path}:{n}"))
    return records


def manifest_text(records: Sequence[Record]) -> str:
    """JSONL text, records sorted by dataset then case id (stable, diff-friendly)."""
    ordered = sorted(records, key=lambda r: (r.dataset, r.case_id, r.label))
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in ordered)


def write_manifest(path: str | Path, records: Sequence[Record]) -> Path:
    """Write the manifest atomically (a failure leaves any previous file untouched)."""
    if not records:
        raise InputError(path, "no records to write")
    return write_text_atomic(path, manifest_text(records))


def merge_records(existing: Sequence[Record], new: Sequence[Record]) -> list[Record]:
    """Existing records of other datasets, plus ``new`` (which replaces every record of its datasets)."""
    replaced = {r.dataset for r in new}
    return [r for r in existing if r.dataset not in replaced] + list(new)


def check_records(records: Sequence[Record], check_files: bool = True) -> None:
    """Validate a loaded manifest before training.

    Raises :class:`InputError` for a duplicate record, a label value without a concept, foreground of a
    concept the record does not name, a slice range outside the volume, or (``check_files``) a listed
    image or label file that does not exist.
    """
    seen: set = set()
    for r in records:
        where = f"{r.dataset}/{r.case_id}"
        if r.key in seen:
            raise InputError(None, f"manifest lists {where} twice with the same label file")
        seen.add(r.key)
        if not r.image or not r.label:
            raise InputError(None, f"{where}: record without image or label file")
        if r.dims not in (2, 3) or len(r.shape) != r.dims:
            raise InputError(None, f"{where}: dims {r.dims} does not match shape {r.shape}")
        for concept, ranges in r.foreground.items():
            if concept not in r.concepts:
                raise InputError(None, f"{where}: foreground of {concept!r}, which no label value names")
            if any(a < 0 or b > r.num_slices or a >= b for a, b in ranges):
                raise InputError(None, f"{where}: slice ranges {ranges} outside 0..{r.num_slices}")
        if check_files:
            for p in list(r.image) + list(r.label):
                if not Path(p).is_file():
                    raise InputError(p, f"file listed in the manifest for {where} does not exist")
