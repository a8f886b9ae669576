"""Test-time mirroring: predict on the image and its in-plane mirror images, and average.

With mirroring on (``tta=True``, ``medsam3 segment --tta``), every image (or volume slice)
goes through the model four times, as it is and mirrored along x, along y and along both (the four
in-plane mirrors that nnU-Net's test-time augmentation also uses for 2D). Each pass gives, per prompt,
the detections on the mirrored input; the passes are merged into **one candidate per prompt**:

* from each pass its best query (highest class logit; the query that the plain rule would keep), its mask
  logits mirrored back onto the unmirrored model grid;
* the mask: ``logit(mean of the passes' mask probabilities)`` per pixel (so thresholding it at 0 keeps the
  pixels whose mean probability is above 0.5);
* the class and presence logits: ``logit`` of the mean of the passes' probabilities.

The merged prediction has the layout of a model output with one query
(``pred_logits (N, 1)``, ``presence_logits (N, 1)``, ``pred_masks (N, 1, h, w)``), so the usual decision
(presence gate, confidence threshold) applies to it unchanged.

Prompts whose concept names a side or position (``"left kidney"``, ``"anterior hippocampus"``: see
:func:`medsam3.data.vocabulary.is_positional`) are not mirrored: a mirror image changes which structure the
name means. Their merged prediction is the best query of the unmirrored pass alone, which gives the same
mask and scores as segmenting without mirroring; when no prompt of an image (of an intensity group of a
volume) may be mirrored, the mirrored passes are not run at all (:func:`mirrors_for`). Mirroring keeps
one mask per prompt, so it does not combine with instance mode or with point prompts (whose points choose
among several detections).

Frames: pixel tensors ``(B, C, S, S)`` and mask logits ``(N, Q, h, w)`` are on the model's square input
grid (row = y, column = x); box prompts are normalised ``cxcywh`` on that grid, so a mirror along x maps
``cx`` to ``1 - cx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from medsam3.data.vocabulary import is_positional

#: The in-plane mirrors, as the tensor dims flipped on ``(..., y, x)`` grids: none, x, y, both.
MIRRORS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
#: Names of :data:`MIRRORS` for reports.
MIRROR_NAMES = ("none", "x", "y", "xy")
#: Probabilities are clamped to [EPS, 1 - EPS] before the logit.
EPS = 1e-6


def mirror_grid(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x (..., y, x)`` mirrored along ``dims`` (a tuple of :data:`MIRRORS`; ``()`` returns ``x``)."""
    return torch.flip(x, dims) if dims else x


def mirror_boxes(boxes: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor | None:
    """Normalised ``cxcywh`` boxes ``(N, K, 4)`` mirrored like the grid: x -> ``cx = 1 - cx``, y -> ``cy``.

    Padding rows (label -10) move too, harmlessly: the model ignores them by their label.
    """
    if boxes is None or not dims:
        return boxes
    out = boxes.clone()
    if -1 in dims:
        out[..., 0] = 1 - out[..., 0]
    if -2 in dims:
        out[..., 1] = 1 - out[..., 1]
    return out


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(EPS, 1 - EPS))


def merge_mirrored(
    outs: Sequence, mirrors: Sequence[tuple[int, ...]], mirrored_rows: Sequence[bool]
) -> SimpleNamespace:
    """Merge the predictions of one batch of ``N`` prompt rows on mirrored inputs (module docstring).

    Args:
        outs: one model output per pass (``pred_logits (N, Q)``, ``pred_masks (N, Q, h, w)``,
            ``presence_logits (N, 1)`` or ``None``), pass ``f`` predicted on the input mirrored along
            ``mirrors[f]``; ``mirrors[0]`` must be ``()`` (the input as it is).
        mirrors: the mirror of each pass (entries of :data:`MIRRORS`).
        mirrored_rows: ``(N,)`` whether row ``n`` takes the mirrored passes (``False``: the first pass only).

    Returns:
        A namespace with ``pred_logits (N, 1)``, ``pred_masks (N, 1, h, w)`` and ``presence_logits (N, 1)``
        (``None`` when the model gives none), float32 on the outputs' device.
    """
    if len(outs) != len(mirrors) or not outs or tuple(mirrors[0]) != ():
        raise ValueError("merge_mirrored needs one output per mirror, the first on the unmirrored input")
    first = outs[0].pred_logits
    n = first.shape[0]
    if len(mirrored_rows) != n:
        raise ValueError(f"mirrored_rows has {len(mirrored_rows)} entries for {n} prompt rows")
    rows = torch.arange(n, device=first.device)
    use = torch.tensor(
        [[True] * n] + [list(map(bool, mirrored_rows))] * (len(outs) - 1),
        dtype=torch.float32,
        device=first.device,
    )  # (F, N)
    weight = use / use.sum(dim=0, keepdim=True)
    score: torch.Tensor | int = 0
    mask: torch.Tensor | int = 0
    presence: torch.Tensor | int = 0
    has_presence = outs[0].presence_logits is not None
    for f, (out, dims) in enumerate(zip(outs, mirrors, strict=True)):
        logits = out.pred_logits.float()
        best = logits.argmax(dim=1)  # (N,)
        w = weight[f]
        score = score + w * torch.sigmoid(logits[rows, best])
        masks = mirror_grid(out.pred_masks[rows, best].float(), dims)  # (N, h, w)
        mask = mask + w[:, None, None] * torch.sigmoid(masks)
        if has_presence:
            presence = presence + w * torch.sigmoid(out.presence_logits.float().reshape(n))
    assert isinstance(score, torch.Tensor) and isinstance(mask, torch.Tensor)  # outs is not empty
    return SimpleNamespace(
        pred_logits=_logit(score)[:, None],
        pred_masks=_logit(mask)[:, None],
        presence_logits=_logit(presence)[:, None] if isinstance(presence, torch.Tensor) else None,
    )


def mirroring_settings(mirrors: Sequence[tuple[int, ...]]) -> list[str] | None:
    """The mirrors of a run by name for its JSON summary (``["none", "x", "y", "xy"]``); ``None`` when the
    run did not mirror."""
    if len(mirrors) <= 1:
        return None
    return [MIRROR_NAMES[MIRRORS.index(tuple(m))] for m in mirrors]


def mirrors_for(mirrors: Sequence[tuple[int, ...]], texts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The passes needed for prompts ``texts`` (their model texts): ``mirrors`` when any of them may be
    mirrored, else the unmirrored pass alone (concepts naming a side or position are never mirrored)."""
    if len(mirrors) > 1 and any(not is_positional(t) for t in texts):
        return tuple(mirrors)
    return ((),)
