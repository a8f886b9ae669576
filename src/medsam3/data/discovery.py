"""What a dataset layout reader returns: image/label pairs found on disk (:class:`Candidate`) and the
:class:`Discovery` that collects them.

The readers themselves are in :mod:`medsam3.data.layouts` (nnU-Net/MSD, folder pairs),
:mod:`medsam3.data.npz_layout` and :mod:`medsam3.data.coco`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Candidate:
    """An image/label pair found on disk, before its label file is read.

    Attributes:
        case_id: unique within the dataset; the split unit.
        image: image file(s) (channels in order).
        label: label file(s), merged by maximum.
        label_names: label value -> name as the dataset writes it.
        mask: mask spec (:mod:`medsam3.data.labels`); mode ``auto`` is settled when the label is read.
        modality: image modality code.
        regions: region name -> label values (nnU-Net region labels).
        instances: label maps hold instance ids of one concept.
        prompts: label value -> text prompts shipped with the data.
        source: layout-specific keys stored in the record.
    """

    case_id: str
    image: list[Path]
    label: list[Path]
    label_names: dict[int, str]
    mask: dict[str, Any] = field(default_factory=lambda: {"mode": "values"})
    modality: str = "OTHER"
    regions: dict[str, list[int]] = field(default_factory=dict)
    instances: bool = False
    prompts: dict[int, list[str]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class Discovery:
    """What a layout reader found: candidates, skipped files (with reasons), names for scoped vocabulary."""

    layout: str
    candidates: list[Candidate]
    skipped: list[str] = field(default_factory=list)
    scope_names: list[str] = field(default_factory=list)
