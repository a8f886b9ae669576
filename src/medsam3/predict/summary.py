"""The result of a segmentation: a label map on the input grid, one entry per label, and its outputs.

Files written by :meth:`SegmentationResult.write` for a 2D image (all through
:func:`medsam3.io.atomic.atomic_path`, and renamed into place only once every file has been produced, so a
failure leaves none of them):

* ``<stem>_mask.png``: the label map, ``uint8`` (``uint16`` above 255 labels), values explained in the JSON;
* ``<stem>_overlay.png``: the image with each label's contour and a legend;
* ``<stem>.json``: label value -> prompt, score, presence, area, box, absent flag; the model source,
  thresholds, preprocessing and package versions.

For a volume the label map keeps the input's format and geometry (see
:mod:`medsam3.predict.volume.outputs`): ``<stem>_seg.nii.gz`` / ``.nrrd`` / ``.mha`` / ``.npz`` (and a DICOM
SEG ``<stem>_seg.dcm`` for DICOM input), overlays, and the JSON, renamed into place last.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam3.image import Image
from medsam3.io.atomic import atomic_path
from medsam3.predict.prompts import Prompt

if TYPE_CHECKING:
    from medsam3.preprocess.orientation import Reorientation


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
        source: ``"detector"`` (concept model), ``"tracker"`` (interactive point model) or
            ``"video tracker"`` (volumes in track mode).
        preprocessing: how the image was mapped to the model input for this prompt.

    Volumes only (``voxels`` is ``None`` for 2D entries):
        voxels: voxels carrying ``value`` in the final label map.
        volume_ml: ``voxels`` times the voxel volume (``None`` without a physical voxel size).
        slice_range: ``(first, last)`` input slice indices (array axis 0, inclusive) holding the label.
        box3d: ``(x1, y1, z1, x2, y2, z2)`` extent in input voxels (x axis 2, y axis 1, z axis 0),
            exclusive ends.
        slices_detected: slices (along the slicing axis) on which the per-slice rule kept a mask.
        post: what the 3D connected-component filter did, when it ran.
        reason (volumes): also ``"slices"`` (found on fewer slices than required), ``"size"`` (removed by
            the size filter), ``"key slice"`` (nothing found on the key slice of a box prompt) or
            ``"overlap"`` (every voxel went to other prompts).
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
    voxels: int | None = None
    volume_ml: float | None = None
    slice_range: tuple[int, int] | None = None
    box3d: tuple[int, ...] | None = None
    slices_detected: int | None = None
    post: dict | None = None

    @property
    def is_volume(self) -> bool:
        return self.voxels is not None

    @property
    def concept(self) -> str | None:
        """The prompt's concept text (``None`` for a box or point prompt without text)."""
        return self.prompt.text

    @property
    def name(self) -> str:
        """Display name: the prompt's concept (``#k`` appended for instances)."""
        base = self.prompt.display_name
        return f"{base} #{self.instance}" if self.instance is not None else base

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "value": self.value,
            "name": self.name,
            "prompt_index": self.prompt_index,
            "prompt": self.prompt.to_dict(),
            "score": _round(self.score),
            "presence": _round(self.presence),
        }
        if self.voxels is not None:  # is_volume
            out.update(
                voxels=int(self.voxels),
                volume_ml=None if self.volume_ml is None else round(float(self.volume_ml), 6),
                slice_range=list(self.slice_range) if self.slice_range is not None else None,
                box3d=list(self.box3d) if self.box3d is not None else None,
                slices_detected=self.slices_detected,
                absent=bool(self.absent),
                reason=self.reason,
            )
        else:
            out.update(
                area_px=int(self.area_px),
                area_mm2=None if self.area_mm2 is None else round(float(self.area_mm2), 4),
                box=list(self.box) if self.box is not None else None,
                absent=bool(self.absent),
                reason=self.reason,
                instance=self.instance,
            )
        out.update(source=self.source, preprocessing=self.preprocessing)
        if self.is_volume:
            out["post"] = self.post
        return out


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
            overlay; ``None`` draws the input array. Volumes: the canonical ``(Z, Y, X)`` ``uint8`` volume.
        reorientation: volumes: the :class:`~medsam3.preprocess.orientation.Reorientation` from the input to
            the canonical frame (overlays are drawn in the canonical frame).
        slice_axis: volumes: the canonical axis the volume was sliced along.
        case: what the command line knows of the case (where its prompts came from, label ids, instance
            task, seconds), written as the JSON's ``case`` record; ``None`` leaves it out.
    """

    label_map: np.ndarray
    labels: list[LabelEntry]
    reference: Image
    settings: dict[str, Any] = field(default_factory=dict)
    display: np.ndarray | None = None
    reorientation: Reorientation | None = None
    slice_axis: int | None = None
    case: dict[str, Any] | None = None

    @property
    def is_volume(self) -> bool:
        """True for a 3D label map (see :mod:`medsam3.predict.volume.outputs` for its files)."""
        return self.label_map.ndim == 3

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
        """Bool mask of one label value, on the input grid."""
        return self.label_map == value

    def to_nibabel(self) -> Any:
        """The label map as a ``nibabel.Nifti1Image`` on the input's grid (RAS affine; a 2D map is one
        slice)."""
        from medsam3.io.memory import to_nibabel

        return to_nibabel(self.to_image())

    def to_sitk(self) -> Any:
        """The label map as a ``SimpleITK.Image`` with the input's geometry."""
        from medsam3.io.memory import to_sitk

        return to_sitk(self.to_image())

    def to_image(self) -> Image:
        """The label map as an :class:`Image` with the input's geometry."""
        return self.reference.with_array(self.label_map)

    # -- reports -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``<stem>.json`` holds)."""
        ref = self.reference
        image: dict[str, Any] = {
            "path": str(ref.meta.get("path")) if ref.meta.get("path") is not None else None,
            "shape": list(ref.spatial_shape),
            "spacing": list(ref.spacing),
            "modality": ref.modality,
        }
        if self.is_volume:
            image.update(
                format=ref.meta.get("format"),
                origin=list(ref.origin),
                direction=np.asarray(ref.direction).round(8).ravel().tolist(),
                voxel_volume_ml=ref.voxel_volume_ml if ref.meta.get("spacing_known", True) else None,
            )
        out = {
            "image": image,
            "label_map": {
                "dtype": str(self.label_map.dtype),
                "shape": list(self.label_map.shape),
                "background": 0,
                "values": "see labels[].value; 0 is background",
            },
            "labels": [self._entry_dict(e) for e in self.labels],
            "settings": self.settings,
            "versions": package_versions(),
        }
        if self.case is not None:
            out["case"] = self.case
        return out

    def _entry_dict(self, entry: LabelEntry) -> dict[str, Any]:
        out = entry.to_dict()
        if entry.value is not None and not entry.absent:
            from medsam3.predict.statistics import label_statistics

            out["statistics"] = label_statistics(self.label_map, entry.value, self.reference)
        return out

    def table(self) -> str:
        """A short plain-text table: value, name, score, presence, area (voxels, ml, slices), status."""
        head: tuple[str, ...]
        area: Callable[[LabelEntry], tuple[str, ...]]
        if self.is_volume:
            head, area = ("voxels", "ml", "slices"), _volume_columns
        else:
            head, area = ("area px", "area mm2"), _area_columns
        rows: list[tuple[str, ...]] = [("value", "prompt", "score", "presence", *head, "status")]
        for e in self.labels:
            rows.append(
                (
                    "-" if e.value is None else str(e.value),
                    e.name,
                    "-" if e.score is None else f"{e.score:.3f}",
                    "-" if e.presence is None else f"{e.presence:.3f}",
                    *area(e),
                    f"absent ({e.reason})" if e.absent else "found",
                )
            )
        return _columns(rows)

    # -- files ---------------------------------------------------------------------------------------
    def output_paths(self, out_dir: str | Path, stem: str, *, overlay: bool = True) -> dict[str, Path]:
        """The files :meth:`write` produces, by kind (the JSON last)."""
        if self.is_volume:
            from medsam3.predict.volume.outputs import volume_output_paths

            return volume_output_paths(self.reference, out_dir, stem, overlay=overlay)
        out = Path(out_dir)
        return {
            "mask": out / f"{stem}_mask.png",
            "overlay": out / f"{stem}_overlay.png",
            "json": out / f"{stem}.json",
        }

    def write(
        self,
        out_dir: str | Path,
        stem: str | None = None,
        *,
        overlay: bool = True,
        output_types: Sequence[str] | None = None,
        per_prompt: bool = False,
        dicom_source: Image | None = None,
    ) -> dict[str, Path]:
        """Write the mask PNG, the overlay PNG and the JSON summary into ``out_dir`` (volumes:
        :func:`medsam3.predict.volume.outputs.write_volume_result`, which also takes ``output_types``,
        ``per_prompt`` and ``dicom_source``).

        ``stem`` defaults to the input file's name without its extension. Nothing is left at the final
        names unless every file was written. Returns the paths by kind (``mask``, ``overlay``, ``json``).

        Raises:
            OutputError: ``output_types`` or ``per_prompt`` for a 2D result (its mask is a PNG).
        """
        from medsam3.io.writers import write_label_map
        from medsam3.overlay import overlay_2d

        if stem is None:
            src = self.reference.meta.get("path")
            stem = default_stem(src) if src else "image"
        if self.is_volume:
            from medsam3.predict.volume.outputs import write_volume_result

            return write_volume_result(
                self,
                out_dir,
                stem,
                overlay=overlay,
                output_types=output_types,
                per_prompt=per_prompt,
                dicom_source=dicom_source,
            )
        if output_types is not None or per_prompt or dicom_source is not None:
            from medsam3.errors import OutputError

            raise OutputError(
                "output types and per-prompt files are for volumes; a 2D mask is written as PNG"
            )
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
                overlay_2d(
                    background,
                    self.label_map,
                    names,
                    tmp["overlay"],
                    title=title,
                    spacing_yx=self.reference.spacing_array_order,
                )
            tmp["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return paths


def _volume_columns(e: LabelEntry) -> tuple[str, ...]:
    ml = "-" if e.volume_ml is None else f"{e.volume_ml:.3f}"
    slices = "-" if e.slice_range is None else f"{e.slice_range[0]}-{e.slice_range[1]}"
    return str(e.voxels), ml, slices


def _area_columns(e: LabelEntry) -> tuple[str, ...]:
    return str(e.area_px), "-" if e.area_mm2 is None else f"{e.area_mm2:.1f}"


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def default_stem(path: str | Path) -> str:
    """File name without its extension (``.nii.gz`` and ``.seg.nrrd`` count as one)."""
    name = Path(path).name
    for double in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return name.rsplit(".", 1)[0] if "." in name else name
