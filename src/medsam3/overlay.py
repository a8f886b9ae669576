"""PNG overlays of label maps on images and volumes: coloured contours, a legend, plane views and montages.

Each label value present gets its own colour from :data:`PALETTE` (by rank of the values present, so up to
``len(PALETTE)`` labels are always distinct), drawn as an inner contour (exactly the palette colour) over a
light tint of the same colour. A legend names the labels (``value: name``).

Volumes are canonical ``(Z, Y, X)`` arrays (:mod:`medsam3.preprocess.orientation`): axial panels show
anterior at the top and the patient's right on the left; coronal and sagittal panels show superior at the
top; orientation letters are written beside each panel. Panels are drawn with square physical pixels
(aspect from the spacing). All files are written through :func:`medsam3.io.atomic.atomic_path`.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from scipy import ndimage

from medsam3.io.atomic import atomic_path
from medsam3.preprocess.resize import resize_nearest, resize_rgb
from medsam3.preprocess.slices import slice_to_rgb, take_slice

#: Distinct, saturated contour colours (none is grey), used in this order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 140, 170),
    (0, 128, 128),
    (170, 110, 255),
    (170, 110, 40),
    (128, 0, 0),
    (100, 255, 160),
    (128, 128, 0),
    (255, 180, 120),
    (0, 0, 160),
    (255, 90, 0),
    (0, 200, 120),
)

BACKGROUND = (22, 22, 24)
TEXT = (236, 236, 236)
MUTED = (160, 160, 168)

_PLANE_AXES = {0: "axial", 1: "coronal", 2: "sagittal"}
#: Smallest side of a volume panel in pixels; thinner views are stretched (and say so).
_MIN_PANEL = 48
# Letters beside a display-oriented canonical slice: (top, bottom, left, right).
_MARKS = {0: ("A", "P", "R", "L"), 1: ("S", "I", "R", "L"), 2: ("S", "I", "A", "P")}


def label_colors(values: Iterable[Any]) -> dict[int, tuple[int, int, int]]:
    """Colour of each label value: the palette in rank order, then evenly spread extra hues."""
    out: dict[int, tuple[int, int, int]] = {}
    for rank, v in enumerate(sorted(int(x) for x in values)):
        if rank < len(PALETTE):
            out[v] = PALETTE[rank]
        else:
            hue = (rank - len(PALETTE)) * 0.618033988749895 % 1.0
            red, green, blue = (int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))
            out[v] = (red, green, blue)
    return out


def ranked_colors(present: Iterable[Any], named: Iterable[Any] = ()) -> dict[int, tuple[int, int, int]]:
    """Colours of a result's labels as its overlays draw them: the values ``present`` in the label map by
    rank (:func:`label_colors`), then the ``named`` values without voxels, after them in value order."""
    shown = sorted({int(v) for v in present} - {0})
    ranked = shown + sorted({int(v) for v in named} - set(shown) - {0})
    by_rank = label_colors(range(len(ranked)))
    return {v: by_rank[i] for i, v in enumerate(ranked)}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Panel:
    """Where one view sits in the written PNG.

    Attributes:
        caption: text above the panel, e.g. ``"axial z=12"``.
        box: ``(x0, y0, x1, y1)`` pixel box of the view in the PNG (``x1``, ``y1`` exclusive).
        source_hw: shape of the 2D slice that was drawn.
    """

    caption: str
    box: tuple[int, int, int, int]
    source_hw: tuple[int, int]


@dataclass
class OverlayResult:
    """A written overlay: its path, pixel size ``(width, height)``, panels and the note shown (if any)."""

    path: Path
    size: tuple[int, int]
    panels: list[Panel] = field(default_factory=list)
    note: str | None = None


# -- pixels ------------------------------------------------------------------------------------------
def _as_labels(labels: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != tuple(shape):
        raise ValueError(f"labels of shape {lab.shape} do not match the image shape {tuple(shape)}")
    if lab.dtype.kind == "f":
        lab = np.rint(lab)
    return lab.astype(np.int64, copy=False)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def contour_mask(labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Foreground pixels within ``thickness`` pixels of a different value (or of the array border)."""
    lab = np.asarray(labels)
    fp = _disk(max(1, int(thickness)))
    hi = ndimage.maximum_filter(lab, footprint=fp, mode="constant", cval=0)
    lo = ndimage.minimum_filter(lab, footprint=fp, mode="constant", cval=0)
    return (lab > 0) & ((hi != lab) | (lo != lab))


def render_overlay(
    image2d: np.ndarray,
    labels2d: np.ndarray | None,
    colors: dict[int, tuple[int, int, int]],
    out_hw: tuple[int, int],
    *,
    thickness: int = 1,
    fill_alpha: float = 0.2,
) -> np.ndarray:
    """One view as ``uint8`` ``(h, w, 3)`` at ``out_hw``: image resized bilinearly, labels by nearest.

    Contour pixels (:func:`contour_mask` at display resolution) get exactly their label's colour; the rest
    of each label is tinted with ``fill_alpha``.
    """
    base = resize_rgb(slice_to_rgb(image2d), out_hw)
    if labels2d is None:
        return base
    lab = resize_nearest(labels2d, out_hw)
    fg = lab > 0
    if not fg.any():
        return base
    values = np.array(sorted(colors), dtype=np.int64)
    lut = np.array([colors[v] for v in values], dtype=np.float32)
    idx = np.searchsorted(values, lab[fg])
    idx = np.clip(idx, 0, len(values) - 1)
    out = base.astype(np.float32)
    out[fg] = out[fg] * (1.0 - fill_alpha) + lut[idx] * fill_alpha
    edge = contour_mask(lab, thickness)
    out[edge] = lut[np.clip(np.searchsorted(values, lab[edge]), 0, len(values) - 1)]
    return np.rint(out).astype(np.uint8)


def _display_hw(hw: tuple[int, int], spacing_yx, target: int, max_side: int) -> tuple[int, int]:
    """Display size with square physical pixels: the longer side near ``target``, integer zoom if small."""
    h, w = hw
    sy, sx = (float(s) for s in spacing_yx) if spacing_yx is not None else (1.0, 1.0)
    fine = min(sy, sx)
    dh, dw = h * sy / fine, w * sx / fine
    longest = max(dh, dw)
    if longest < target:
        zoom = math.ceil(target / longest) if sy == sx else target / longest
    elif longest > max_side:
        zoom = max_side / longest
    else:
        zoom = 1.0
    return max(1, int(round(dh * zoom))), max(1, int(round(dw * zoom)))


# -- sheet layout ------------------------------------------------------------------------------------
class _Sheet:
    """Panels in a grid, a title and a legend, composed with Pillow."""

    def __init__(self, title: str | None, note: str | None, legend: list[tuple[tuple[int, int, int], str]]):
        self.title, self.note, self.legend = title, note, legend
        self.cells: list[tuple[np.ndarray, str, tuple[str, str, str, str] | None, tuple[int, int]]] = []
        self.font = _font(15)
        self.small = _font(13)
        self.big = _font(18)

    def add(self, pixels: np.ndarray, caption: str, marks, source_hw) -> None:
        self.cells.append((pixels, caption, marks, tuple(source_hw)))

    def render(self, columns: int) -> tuple[PILImage.Image, list[Panel]]:
        pad, cap_h, mark = 12, 22, 16
        columns = max(1, min(columns, len(self.cells)))
        rows = math.ceil(len(self.cells) / columns)
        col_w = [0] * columns
        row_h = [0] * rows
        for n, (pixels, *_) in enumerate(self.cells):
            r, c = divmod(n, columns)
            col_w[c] = max(col_w[c], pixels.shape[1] + 2 * mark)
            row_h[r] = max(row_h[r], pixels.shape[0] + 2 * mark + cap_h)
        col_x = [pad + sum(col_w[:c]) + c * pad for c in range(columns)]
        row_y = [pad + sum(row_h[:r]) + r * pad for r in range(rows)]
        title_h = (30 if self.title else 0) + (22 if self.note else 0)
        grid_w, grid_h = sum(col_w) + (columns + 1) * pad, sum(row_h) + (rows + 1) * pad
        swatch, line_h = 14, 20
        legend_rows = max(1, (grid_h - 2 * pad) // line_h)
        n_cols = math.ceil(len(self.legend) / legend_rows) if self.legend else 0
        text_w = max((int(self.font.getlength(t)) for _, t in self.legend), default=0)
        legend_col_w = swatch + 8 + text_w + pad
        legend_w = n_cols * legend_col_w + (pad if n_cols else 0)
        width = grid_w + legend_w
        height = (
            title_h + grid_h
            if not n_cols
            else title_h + max(grid_h, pad + min(len(self.legend), legend_rows) * line_h + pad)
        )
        sheet = PILImage.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        y = 6
        if self.title:
            draw.text((pad, y), self.title, fill=TEXT, font=self.big)
            y += 30
        if self.note:
            draw.text((pad, y), self.note, fill=(255, 200, 90), font=self.font)
        panels = []
        for n, (pixels, caption, marks, source_hw) in enumerate(self.cells):
            r, c = divmod(n, columns)
            x0 = col_x[c]
            y0 = title_h + row_y[r]
            draw.text((x0 + mark, y0 + 2), caption, fill=TEXT, font=self.font)
            ph, pw = pixels.shape[:2]
            px, py = x0 + mark, y0 + cap_h + mark
            sheet.paste(PILImage.fromarray(pixels), (px, py))
            panels.append(Panel(caption, (px, py, px + pw, py + ph), source_hw))
            if marks:
                top, bottom, left, right = marks
                cx, cy = px + pw // 2, py + ph // 2
                draw.text((cx, py - 2), top, fill=MUTED, font=self.small, anchor="md")
                draw.text((cx, py + ph + 2), bottom, fill=MUTED, font=self.small, anchor="ma")
                draw.text((px - 3, cy), left, fill=MUTED, font=self.small, anchor="rm")
                draw.text((px + pw + 3, cy), right, fill=MUTED, font=self.small, anchor="lm")
        for n, (colour, text) in enumerate(self.legend):
            c, r = divmod(n, legend_rows)
            x = grid_w + c * legend_col_w
            y = title_h + pad + r * line_h
            draw.rectangle((x, y + 3, x + swatch, y + 3 + swatch), fill=colour)
            draw.text((x + swatch + 8, y + 2), text, fill=TEXT, font=self.font)
        return sheet, panels


def _write(sheet: _Sheet, columns: int, path: str | Path) -> OverlayResult:
    image, panels = sheet.render(columns)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return OverlayResult(path, image.size, panels, sheet.note)


def _legend(values: Iterable[Any], names: dict[int, str] | None) -> tuple[dict, list]:
    colors = label_colors(values)
    known: Mapping[Any, str] = names or {}  # label-map JSON may leave the values as strings
    legend = [(colors[v], f"{v}: {known.get(v, known.get(str(v), f'label {v}'))}") for v in sorted(colors)]
    return colors, legend


def _present(labels: np.ndarray | None) -> list[int]:
    if labels is None:
        return []
    return [int(v) for v in np.unique(labels) if v > 0]


# -- public API --------------------------------------------------------------------------------------
def overlay_2d(
    image2d: np.ndarray,
    labels: np.ndarray | None,
    names: dict[int, str] | None,
    path: str | Path,
    title: str | None = None,
    *,
    spacing_yx: Sequence[float] | None = None,
    target: int = 512,
    max_side: int = 1024,
) -> OverlayResult:
    """Write a PNG of a 2D image with each label's contour in its own colour and a legend.

    Args:
        image2d: ``(H, W)`` float in ``[0, 1]`` or ``uint8``, or ``(H, W, 3/4)`` ``uint8`` / float ``[0, 1]``.
        labels: ``(H, W)`` integer label map (0 = background), or ``None`` for the image alone.
        names: label value -> name for the legend (missing values are called ``label N``).
        path: output ``.png``.
        title: text above the image.
        spacing_yx: pixel size ``(row, column)`` in mm, for the aspect ratio (default square pixels).
        target, max_side: small images are enlarged (integer zoom for square pixels) so the longer side
            reaches ``target``; larger ones are shrunk to ``max_side``.
    """
    image2d = np.asarray(image2d)
    hw = image2d.shape[:2]
    lab = _as_labels(labels, hw)
    present = _present(lab)
    colors, legend = _legend(present, names)
    out_hw = _display_hw(hw, spacing_yx, target, max_side)
    thickness = max(1, round(max(out_hw) / 300))
    note = "no foreground" if lab is not None and not present else None
    sheet = _Sheet(title, note, legend)
    pixels = render_overlay(image2d, lab, colors, out_hw, thickness=thickness)
    sheet.add(pixels, f"{hw[1]} x {hw[0]} px", None, hw)
    return _write(sheet, 1, path)


def _centre_indices(labels: np.ndarray | None, shape: tuple[int, int, int]) -> tuple[list[int], bool]:
    """Slice index per axis through the labels' centre of mass (moved to the nearest non-empty slice)."""
    if labels is None or not (labels > 0).any():
        return [n // 2 for n in shape], False
    fg = labels > 0
    idx = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        counts = fg.sum(axis=other)
        centre = int(round(float(np.average(np.arange(shape[axis]), weights=counts))))
        nonempty = np.flatnonzero(counts)
        idx.append(int(nonempty[np.argmin(np.abs(nonempty - centre))]))
    return idx, True


def _plane_spacing(spacing_zyx, axis: int) -> tuple[float, float]:
    sz, sy, sx = spacing_zyx
    return {0: (sy, sx), 1: (sz, sx), 2: (sz, sy)}[axis]


def overlay_volume(
    volume: np.ndarray,
    labels: np.ndarray | None,
    names: dict[int, str] | None,
    path: str | Path,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    mode: str = "planes",
    *,
    title: str | None = None,
    n_slices: int = 12,
    axis: int = 0,
    target: int | None = None,
) -> OverlayResult:
    """Write a PNG of a canonical volume with label contours and a legend.

    Args:
        volume: ``(Z, Y, X)`` float in ``[0, 1]`` (or ``uint8``), canonical orientation.
        labels: ``(Z, Y, X)`` integer label map, or ``None`` for the volume alone.
        names: label value -> name for the legend.
        path: output ``.png``.
        spacing_zyx: voxel size in mm in array order, for the aspect ratio of each plane.
        mode: ``"planes"``: axial, coronal and sagittal slices through the labels' centre (the volume's
            centre without foreground); ``"montage"``: the ``n_slices`` slices along ``axis`` with the most
            foreground, in slice order (evenly spaced slices without foreground).
        title: text above the panels.
        target: longer side of each panel in pixels (default 400 for planes, 240 for a montage). Panels
            keep the physical aspect ratio unless a side would be under 48 pixels (few thick slices):
            that side is stretched and the caption says so.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a volume (Z, Y, X), got shape {volume.shape}")
    if mode not in ("planes", "montage"):
        raise ValueError(f"mode must be 'planes' or 'montage', got {mode!r}")
    lab = _as_labels(labels, volume.shape)
    present = _present(lab)
    colors, legend = _legend(present, names)
    note = "no foreground" if lab is not None and not present else None
    sheet = _Sheet(title, note, legend)
    z_mm, y_mm, x_mm = (float(s) for s in spacing_zyx)
    spacing = (z_mm, y_mm, x_mm)
    extent = max(n * s for n, s in zip(volume.shape, spacing, strict=True))

    def add(ax: int, index: int, caption: str, side: int) -> None:
        img = take_slice(volume, ax, index, display=True)
        sl = None if lab is None else take_slice(lab, ax, index, display=True)
        sy, sx = _plane_spacing(spacing, ax)
        zoom = side / extent
        out_hw = (round(img.shape[0] * sy * zoom), round(img.shape[1] * sx * zoom))
        if min(out_hw) < _MIN_PANEL:  # a few thick slices: stretch rather than draw a sliver
            out_hw = (max(_MIN_PANEL, out_hw[0]), max(_MIN_PANEL, out_hw[1]))
            caption += " (stretched)"
        thickness = max(1, round(side / 300))
        pixels = render_overlay(img, sl, colors, out_hw, thickness=thickness)
        sheet.add(pixels, caption, _MARKS[ax], img.shape)

    if mode == "planes":
        side = target or 400
        idx, _ = _centre_indices(lab, volume.shape)
        for ax in range(3):
            add(ax, idx[ax], f"{_PLANE_AXES[ax]} {'zyx'[ax]}={idx[ax]}", side)
        columns = 3
    else:
        side = target or 240
        n = volume.shape[axis]
        if present and lab is not None:  # labels present
            other = tuple(a for a in range(3) if a != axis)
            counts = (lab > 0).sum(axis=other)
            order = np.argsort(-counts, kind="stable")[: max(1, n_slices)]
            chosen = sorted(int(i) for i in order if counts[i] > 0)
        else:
            chosen = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n_slices, n) + 2)[1:-1]})
            chosen = chosen or [n // 2]
        for i in chosen:
            add(axis, i, f"{_PLANE_AXES[axis]} {'zyx'[axis]}={i}", side)
        columns = math.ceil(math.sqrt(len(chosen)))
    return _write(sheet, columns, path)
