"""Figures of an evaluation report: Dice by dataset and by modality group, and a gallery of cases.

* :func:`dice_by_dataset`: bars of the mean Dice per dataset, one bar per model, whiskers = the 95%
  bootstrap interval of the mean;
* :func:`dice_by_modality`: box plots of per-case Dice per modality group, one box per model;
* :class:`GalleryCollector`: keeps, while cases are scored, the best and worst cases of each model by Dice
  (a bounded number, with small copies of their image and masks, so memory does not grow with the run);
  :func:`render_case` draws one of them as two panels (reference | prediction contours on the image) and
  :func:`gallery_html` writes a self-contained page that shows them with their scores (relative links).

Every function returns PNG bytes or text; :mod:`medsam3.evaluate.report` writes them atomically.
"""

from __future__ import annotations

import heapq
import html
import io
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsam3.evaluate.rows import CaseRow

REF_COLOUR = (60, 200, 75)
PRED_COLOUR = (235, 40, 80)


# -- charts ------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def dice_by_dataset(stats: Sequence[dict], models: Sequence[str], datasets: Sequence[str]) -> bytes:
    """Grouped bar chart: mean Dice (%) per dataset and model with 95% bootstrap whiskers.

    Args:
        stats: summary rows with ``name`` (dataset), ``model``, ``dice_mean``, ``dice_low``, ``dice_high``
            (fractions) and ``n``.
        models, datasets: bar order.
    """
    plt = _pyplot()
    by = {(s["name"], s["model"]): s for s in stats}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(datasets) * max(1, len(models)) ** 0.5 + 2), 4.2))
    x = np.arange(len(datasets))
    for i, model in enumerate(models):
        means, lo, hi = [], [], []
        for d in datasets:
            s = by.get((d, model))
            m = s["dice_mean"] if s else math.nan
            means.append(100 * m)
            lo.append(100 * (m - s["dice_low"]) if s else 0.0)
            hi.append(100 * (s["dice_high"] - m) if s else 0.0)
        ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=3, label=model)
    ax.set_xticks(
        x,
        [f"{d}" for d in datasets],
        rotation=30 if len(datasets) > 4 else 0,
        ha="right" if len(datasets) > 4 else "center",
    )
    ax.set_ylabel("Dice (%)  mean with 95% bootstrap CI")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Dice by dataset")
    return _png(fig)


def dice_by_modality(rows: Sequence[CaseRow], models: Sequence[str]) -> bytes:
    """Box plot of per-case Dice (%) per modality group, one box per model."""
    plt = _pyplot()
    groups = sorted({r.group or "unknown" for r in rows})
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(models)) ** 0.5 + 2), 4.2))
    handles = []
    for i, model in enumerate(models):
        data = [
            [100 * r.value("dice") for r in rows if r.model == model and (r.group or "unknown") == g]
            for g in groups
        ]
        pos = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
        keep = [k for k, d in enumerate(data) if d]
        if not keep:
            continue
        colour = plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10]
        box = ax.boxplot(
            [data[k] for k in keep],
            positions=pos[keep],
            widths=width * 0.9,
            patch_artist=True,
            manage_ticks=False,
        )
        for patch in box["boxes"]:
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        handles.append((box["boxes"][0], model))
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_ylabel("Dice per case (%)")
    ax.set_ylim(-3, 103)
    ax.grid(axis="y", alpha=0.3)
    if handles:
        ax.legend([h for h, _ in handles], [n for _, n in handles], fontsize=8)
    ax.set_title("Dice by modality group")
    return _png(fig)


# -- gallery -----------------------------------------------------------------------------------------------
def display_uint8(image: np.ndarray) -> np.ndarray:
    """A 2D image ``(H, W)`` / ``(H, W, C)`` as ``uint8`` for display (grey: 1st-99th percentile window)."""
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[..., :3]
        if a.dtype == np.uint8:
            return a
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max()) if a.max() > a.min() else float(a.min()) + 1.0
    return np.rint(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def pick_slice(ref: np.ndarray, pred: np.ndarray | None) -> int:
    """Slice (axis 0) with the most reference voxels; else the most predicted ones; else the middle."""
    for m in (ref, pred):
        if m is not None and m.any():
            return int(np.argmax(m.reshape(m.shape[0], -1).sum(axis=1)))
    return ref.shape[0] // 2


@dataclass
class GalleryItem:
    """A case kept for the gallery: small copies (longest side <= ``max_side``) of what is drawn."""

    row: CaseRow
    image: np.ndarray | None  # (h, w) or (h, w, 3) uint8
    ref: np.ndarray  # (h, w) bool
    pred: np.ndarray | None  # (h, w) bool; None when there is no prediction
    slice_index: int | None
    kind: str = ""
    rank: int = 0

    @property
    def file_name(self) -> str:
        r = self.row
        parts = [r.model, self.kind, str(self.rank), r.dataset, r.case, r.concept]
        return re.sub(r"[^0-9A-Za-z._-]+", "_", "-".join(parts))[:150] + ".png"


def _shrink(arr: np.ndarray, max_side: int, nearest: bool) -> np.ndarray:
    from medsam3.preprocess.resize import resize_nearest, resize_rgb

    h, w = arr.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return arr
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize_nearest(arr, hw) if nearest else resize_rgb(arr, hw)


class GalleryCollector:
    """The ``per_side`` best and worst cases of each model by Dice, kept while rows stream in.

    Ties are broken by arrival order (earlier first), so the selection is deterministic.
    """

    def __init__(self, per_side: int = 3, max_side: int = 384):
        self.per_side = max(0, int(per_side))
        self.max_side = int(max_side)
        self._best: dict[str, list] = {}
        self._worst: dict[str, list] = {}
        self._seq = itertools.count()

    def wants(self, row: CaseRow) -> bool:
        """Would ``row`` enter its model's best or worst list now (cheap check before copying images)?"""
        if self.per_side == 0:
            return False
        d = row.value("dice")
        best, worst = self._best.get(row.model, []), self._worst.get(row.model, [])
        enters_best = len(best) < self.per_side or d > best[0][0]
        return enters_best or len(worst) < self.per_side or -d > worst[0][0]

    def offer(self, row: CaseRow, image: np.ndarray | None, ref: np.ndarray, pred: np.ndarray | None) -> None:
        """Consider a scored case; ``image`` / ``ref`` / ``pred``: 2D ``(Y, X[, C])`` or 3D ``(Z, Y, X)``.

        ``image`` may be ``None`` (a dark background is drawn) or a function returning the image (or
        ``None``), called only when the case is kept.
        """
        if not self.wants(row):
            return
        if callable(image):
            image = image()
        ref = np.asarray(ref, dtype=bool)
        slice_index = None
        if ref.ndim == 3:
            slice_index = pick_slice(ref, None if pred is None else np.asarray(pred, dtype=bool))
            ref = ref[slice_index]
            pred = None if pred is None else np.asarray(pred)[slice_index]
            image = None if image is None else np.asarray(image)[slice_index]
        small_img = None if image is None else _shrink(display_uint8(image), self.max_side, nearest=False)
        small_pred = None if pred is None else _shrink(np.asarray(pred, dtype=bool), self.max_side, True)
        item = GalleryItem(row, small_img, _shrink(ref, self.max_side, True), small_pred, slice_index)
        seq = next(self._seq)
        d = row.value("dice")
        for store, key in ((self._best, (d, -seq)), (self._worst, (-d, -seq))):
            heap = store.setdefault(row.model, [])
            entry = (key[0], key[1], item)
            if len(heap) < self.per_side:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)

    def items(self) -> list[GalleryItem]:
        """Kept cases: per model (in first-seen order) the best (highest Dice first), then the worst
        (lowest first) that are not already among the best."""
        out: list[GalleryItem] = []
        for model in self._best:
            best = [e[2] for e in sorted(self._best[model], key=lambda e: (-e[0], -e[1]))]
            worst = [e[2] for e in sorted(self._worst.get(model, []), key=lambda e: (-e[0], -e[1]))]
            seen = {id(i) for i in best}
            for kind, chosen in (("best", best), ("worst", [i for i in worst if id(i) not in seen])):
                for rank, item in enumerate(chosen, 1):
                    out.append(
                        GalleryItem(item.row, item.image, item.ref, item.pred, item.slice_index, kind, rank)
                    )
        return out


def render_case(item: GalleryItem) -> bytes:
    """Two panels on the image, with a caption; PNG. Left: the reference (green); right: the prediction
    (red) with the reference's outline (green, thin)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    from medsam3.overlay import contour_mask, render_overlay
    from medsam3.preprocess.resize import resize_nearest

    h, w = item.ref.shape
    scale = max(1, math.ceil(256 / max(h, w)))
    out_hw = (h * scale, w * scale)
    base = item.image if item.image is not None else np.full((h, w), 40, dtype=np.uint8)
    ref_panel = render_overlay(base, item.ref.astype(np.uint8), {1: REF_COLOUR}, out_hw, thickness=2)
    pred_lab = None if item.pred is None else item.pred.astype(np.uint8)
    # a writable copy: the overlay may share memory with a read-only image array
    pred_panel = np.array(render_overlay(base, pred_lab, {1: PRED_COLOUR}, out_hw, thickness=2))
    pred_panel[contour_mask(resize_nearest(item.ref.astype(np.uint8), out_hw), 1)] = REF_COLOUR
    pad, cap = 8, 40
    sheet = PILImage.new("RGB", (2 * out_hw[1] + 3 * pad, out_hw[0] + cap + 2 * pad), (22, 22, 24))
    draw = ImageDraw.Draw(sheet)
    r = item.row
    where = f" slice {item.slice_index}" if item.slice_index is not None else ""
    draw.text((pad, 4), f"{r.dataset} / {r.case}{where} / {r.concept}  [{r.model}]", fill=(236, 236, 236))
    status = "" if r.status == "ok" else f"  ({r.status})"
    scores = f"Dice {r.value('dice'):.3f}  IoU {r.value('iou'):.3f}{status}"
    draw.text((pad, 20), scores, fill=(236, 236, 236))
    sheet.paste(PILImage.fromarray(ref_panel), (pad, cap + pad))
    sheet.paste(PILImage.fromarray(pred_panel), (2 * pad + out_hw[1], cap + pad))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _cell(v: float, unit: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}{unit}"


def gallery_html(items: Sequence[GalleryItem], folder: str = "gallery") -> str:
    """A self-contained HTML page showing every gallery PNG (``folder/<file_name>``) with its scores."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>medsam3 evaluation gallery</title>",
        "<style>body{font-family:sans-serif;background:#161618;color:#ececec;margin:20px}"
        "table{border-collapse:collapse;margin-bottom:28px}td,th{border:1px solid #444;padding:6px;"
        "vertical-align:top;text-align:left}img{max-width:640px}h2{margin-top:30px}"
        ".ref{color:#3cc84b}.pred{color:#eb2850}</style></head><body>",
        "<h1>Best and worst cases by Dice</h1>",
        '<p>Left panel: <span class="ref">reference</span>; right panel: <span class="pred">'
        'prediction</span> with the <span class="ref">reference</span> outline. 3D cases show the slice '
        "with the most reference voxels.</p>",
    ]
    models = list(dict.fromkeys(i.row.model for i in items))
    for model in models:
        parts.append(f"<h2>{esc(model)}</h2>")
        for kind in ("best", "worst"):
            chosen = [i for i in items if i.row.model == model and i.kind == kind]
            if not chosen:
                continue
            parts.append(
                f"<h3>{kind}</h3><table><tr><th>#</th><th>case</th><th>scores</th><th>overlay</th></tr>"
            )
            for i in chosen:
                r = i.row
                unit = r.metrics.get("distance_unit", "")
                scores = (
                    f"Dice {_cell(r.value('dice'))}<br>IoU {_cell(r.value('iou'))}<br>"
                    f"NSD {_cell(r.value('nsd'))}<br>HD95 {_cell(r.value('hd95'))} {esc(unit)}<br>"
                    f"status {esc(r.status)}"
                )
                where = f"<br>slice {i.slice_index}" if i.slice_index is not None else ""
                src = f"{folder}/{i.file_name}"
                parts.append(
                    f"<tr><td>{i.rank}</td><td>{esc(r.dataset)}<br>{esc(r.case)}<br>{esc(r.concept)}{where}"
                    f"<br><small>{esc(r.note)}</small></td><td>{scores}</td>"
                    f'<td><a href="{esc(src)}"><img src="{esc(src)}" alt="{esc(r.case)}"></a></td></tr>'
                )
            parts.append("</table>")
    if not items:
        parts.append("<p>No case to show.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
