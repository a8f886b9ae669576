"""The result of a segmentation: a label map on the input grid, one entry per label, and its outputs.

Files written by :meth:`SegmentationResult.write` (all through :func:`medsam3.io.atomic.atomic_path`, and
renamed into place only once every file has been produced, so a failure leaves none of them):

* ``<stem>_mask.png``: the label map, ``uint8`` (``uint16`` above 255 labels), values explained in the JSON;
* ``<stem>_overlay.png``: the image with each label's contour and a legend;
* ``<stem>.json``: label value -> prompt, score, presence, area, box, absent flag; the model source,
  thresholds, preprocessing and package versions.
"""

from __future__ import annotations

import contextlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.image import Image
from medsam3.io.atomic import atomic_path
from medsam3.predict.prompts import Prompt


@dataclass
class LabelEntry:
    """One label of a :class:`SegmentationResult`.

    Attributes:
        value: value of this label in the label map; ``None`` for an absent prompt in instance mode (in
            semantic mode every prompt keeps its value ``index + 1``, absent ones simply mark no pixel).
        prompt_index: index of the prompt in the list given to the segmenter.
        prompt: the prompt.
        score: confidence of the kept mask; for an absent prompt the best confidence seen (or ``None``).
        presence: presence probability of the prompt's concept (``None`` when the model has none).
        area_px: pixels carrying ``value`` in the final label map (after pixel-wise resolution).
        area_mm2: ``area_px`` times the pixel area from the image spacing; ``None`` when the image has no
            physical pixel size (``meta['spacing_known']`` is False, e.g. PNG / JPEG).
        box: ``(x1, y1, x2, y2)`` pixel extent of the label in the final map (exclusive ends), or ``None``.
        absent: no mask kept for this prompt (see ``reason``).
        reason: why absent: ``"presence"`` (presence below its threshold), ``"score"`` (no query above
            the threshold) or ``"points"`` (no detection contains the positive points); else ``None``.
        instance: instance number within the prompt (1 = best) in instance mode, else ``None``.
        source: ``"detector"`` (concept model) or ``"tracker"`` (interactive point model).
        preprocessing: how the image was mapped to the model input for this prompt.
    """

    value: int | None
    prompt_index: int
    prompt: Prompt
    score: float | None
    presence: float | None
    area_px: int = 0
    area_mm2: float | None = 0.0
    box: tuple[int, int, int, int] | None = None
    absent: bool = False
    reason: str | None = None
    instance: int | None = None
    source: str = "detector"
    preprocessing: str = ""

    @property
    def name(self) -> str:
        """Display name: the prompt's concept (``#k`` appended for instances)."""
        base = self.prompt.display_name
        return f"{base} #{self.instance}" if self.instance is not None else base

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "name": self.name,
            "prompt_index": self.prompt_index,
            "prompt": self.prompt.to_dict(),
            "score": _round(self.score),
            "presence": _round(self.presence),
            "area_px": int(self.area_px),
            "area_mm2": None if self.area_mm2 is None else round(float(self.area_mm2), 4),
            "box": list(self.box) if self.box is not None else None,
            "absent": bool(self.absent),
            "reason": self.reason,
            "instance": self.instance,
            "source": self.source,
            "preprocessing": self.preprocessing,
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a prediction."""
    import torch
    import transformers

    from medsam3 import __version__

    return {
        "medsam3": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


@dataclass
class SegmentationResult:
    """A label map on the input image's grid with one :class:`LabelEntry` per label.

    Attributes:
        label_map: ``(H, W)`` ``uint8`` / ``uint16``, 0 = background, on the input grid.
        labels: entries in label-value order (absent prompts included).
        reference: the input image (its geometry is the label map's).
        settings: how the result was produced (model source, thresholds, mode, device, dtype).
        display: ``(H, W, 3)`` ``uint8`` image as given to the model (before resizing), drawn under the
            overlay; ``None`` draws the input array.
    """

    label_map: np.ndarray
    labels: list[LabelEntry]
    reference: Image
    settings: dict[str, Any] = field(default_factory=dict)
    display: np.ndarray | None = None

    # -- access --------------------------------------------------------------------------------------
    def label_names(self) -> dict[int, str]:
        """Label value -> display name, for labels that have a value."""
        return {e.value: e.name for e in self.labels if e.value is not None}

    def entry(self, value: int) -> LabelEntry:
        for e in self.labels:
            if e.value == value:
                return e
        raise KeyError(f"no label with value {value}")

    def mask(self, value: int) -> np.ndarray:
        """``(H, W)`` bool mask of one label value."""
        return self.label_map == value

    def to_image(self) -> Image:
        """The label map as an :class:`Image` with the input's geometry."""
        return self.reference.with_array(self.label_map)

    # -- reports -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``<stem>.json`` holds)."""
        ref = self.reference
        return {
            "image": {
                "path": str(ref.meta.get("path")) if ref.meta.get("path") is not None else None,
                "shape": list(ref.spatial_shape),
                "spacing": list(ref.spacing),
                "modality": ref.modality,
            },
            "label_map": {
                "dtype": str(self.label_map.dtype),
                "shape": list(self.label_map.shape),
                "background": 0,
                "values": "see labels[].value; 0 is background",
            },
            "labels": [e.to_dict() for e in self.labels],
            "settings": self.settings,
            "versions": package_versions(),
        }

    def table(self) -> str:
        """A short plain-text table: value, name, score, presence, area, status."""
        rows = [("value", "prompt", "score", "presence", "area px", "area mm2", "status")]
        for e in self.labels:
            status = f"absent ({e.reason})" if e.absent else "found"
            rows.append((
                "-" if e.value is None else str(e.value),
                e.name,
                "-" if e.score is None else f"{e.score:.3f}",
                "-" if e.presence is None else f"{e.presence:.3f}",
                str(e.area_px),
                "-" if e.area_mm2 is None else f"{e.area_mm2:.1f}",
                status,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    # -- files ---------------------------------------------------------------------------------------
    def output_paths(self, out_dir: str | Path, stem: str) -> dict[str, Path]:
        out = Path(out_dir)
        return {"mask": out / f"{stem}_mask.png", "overlay": out / f"{stem}_overlay.png",
                "json": out / f"{stem}.json"}

    def write(self, out_dir: str | Path, stem: str | None = None, *, overlay: bool = True) -> dict[str, Path]:
        """Write the mask PNG, the overlay PNG and the JSON summary into ``out_dir``.

        ``stem`` defaults to the input file's name without its extension. Nothing is left at the final
        names unless every file was written. Returns the paths by kind (``mask``, ``overlay``, ``json``).
        """
        from medsam3.io.writers import write_label_map
        from medsam3.overlay import overlay_2d

        if stem is None:
            src = self.reference.meta.get("path")
            stem = default_stem(src) if src else "image"
        paths = self.output_paths(out_dir, stem)
        if not overlay:
            paths.pop("overlay")
        names = self.label_names()
        with contextlib.ExitStack() as stack:
            tmp = {kind: stack.enter_context(atomic_path(p)) for kind, p in paths.items()}
            write_label_map(self.label_map, tmp["mask"], self.to_image(), label_names=names)
            if overlay:
                title = ", ".join(f"{e.name}" for e in self.labels if not e.absent) or "nothing found"
                background = self.display if self.display is not None else self.reference.array
                overlay_2d(background, self.label_map, names, tmp["overlay"], title=title,
                           spacing_yx=self.reference.spacing_array_order)
            tmp["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return paths


def default_stem(path: str | Path) -> str:
    """File name without its extension (``.nii.gz`` and ``.seg.nrrd`` count as one)."""
    name = Path(path).name
    for double in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return name.rsplit(".", 1)[0] if "." in name else name
