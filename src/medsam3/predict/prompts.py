"""Prompts: a concept text, boxes and points, in pixel units of the input image.

Coordinates are continuous pixel coordinates of the 2D image ``(Y, X)``: ``x`` in ``[0, W]`` from the
left edge, ``y`` in ``[0, H]`` from the top edge (the pixel ``(row j, column i)`` covers
``[i, i+1] x [j, j+1]``). Boxes are ``(x1, y1, x2, y2)`` with ``x1 < x2`` and ``y1 < y2``; points are
``(x, y)``. Labels: 1 positive, 0 negative.

What a prompt means (see :class:`~medsam3.predict.segmenter.Segmenter` for the details):

* ``text`` alone: the concept detector (SAM3's promptable concept segmentation).
* ``text`` + boxes: the detector with the boxes as exemplars of the concept (SAM3's geometry prompts).
* boxes alone: the detector with the text ``"visual"``, as SAM3 does for exemplar-only prompts.
* points (with or without boxes, no text): the interactive tracker (SAM2-style), which needs the tracker
  weights.
* ``text`` + points: the detector runs on the text (and boxes); the points then *select* among its
  detections: an instance is kept when it contains a positive point and no negative point.

On the command line (``medsam3 segment``), ``--box`` and ``--point`` attach to the ``-p`` given just before
them; those given before any ``-p`` form one geometry-only prompt (see :func:`prompts_from_cli`).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from medsam3.errors import PromptError

Box = tuple[float, float, float, float]
Point = tuple[float, float]

#: Text SAM3 uses for a prompt made of boxes only.
VISUAL_PROMPT_TEXT = "visual"

_NEGATIVE = {"neg", "negative", "0", "-", "bg"}
_POSITIVE = {"pos", "positive", "1", "+", "fg"}


def brief(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message: at most ``limit`` characters, the length said when cut."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass
class Prompt:
    """One prompt: what to segment, as text and / or geometry on the input image.

    Attributes:
        text: concept text ("liver", "polyp"); ``None`` for a geometry-only prompt.
        boxes: ``[(x1, y1, x2, y2), ...]`` in pixels of the input image.
        box_labels: one per box, 1 positive (default) / 0 negative.
        points: ``[(x, y), ...]`` in pixels of the input image.
        point_labels: one per point, 1 positive (default) / 0 negative.
        concept: the model's concept that ``text`` names, when it differs from ``text`` (set by the
            vocabulary guard of a model that records its concepts: "foetal head" -> "fetal head",
            :mod:`medsam3.predict.vocabulary_guard`); the model is given the concept, reports keep ``text``.
    """

    text: str | None = None
    boxes: list[tuple[float, ...]] | None = None
    box_labels: list[int] | None = None
    points: list[tuple[float, ...]] | None = None
    point_labels: list[int] | None = None
    concept: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None:  # control characters never belong to a concept: dropped, not printed
            text = "".join(ch for ch in str(self.text) if unicodedata.category(ch) != "Cc" or ch.isspace())
            self.text = " ".join(text.split())
        self.boxes = [tuple(float(v) for v in b) for b in self.boxes] if self.boxes else None
        self.points = [tuple(float(v) for v in p) for p in self.points] if self.points else None
        if self.boxes and self.box_labels is None:
            self.box_labels = [1] * len(self.boxes)
        if self.points and self.point_labels is None:
            self.point_labels = [1] * len(self.points)
        self.box_labels = (
            [int(v) for v in self.box_labels] if self.boxes and self.box_labels is not None else None
        )
        self.point_labels = (
            [int(v) for v in self.point_labels] if self.points and self.point_labels is not None else None
        )

    @property
    def kind(self) -> str:
        """``"text"``, ``"box"``, ``"point"``, or a ``+`` combination such as ``"text+box"``."""
        parts = [
            name
            for name, present in (
                ("text", self.text is not None),
                ("box", self.boxes),
                ("point", self.points),
            )
            if present
        ]
        return "+".join(parts) or "empty"

    @property
    def uses_tracker(self) -> bool:
        """True when the prompt is answered by the interactive tracker (points without text)."""
        return bool(self.points) and self.text is None

    @property
    def display_name(self) -> str:
        """The concept text, or a short description of a geometry-only prompt."""
        if self.text:
            return self.text
        n_box, n_pt = len(self.boxes or ()), len(self.points or ())
        parts = [
            f"{n} {what}{'es' if what == 'box' and n > 1 else 's' if n > 1 else ''}"
            for n, what in ((n_box, "box"), (n_pt, "point"))
            if n
        ]
        return " + ".join(parts) or "empty prompt"

    @property
    def model_text(self) -> str:
        """Text given to the concept detector: the concept, else the text (``"visual"`` for box-only
        prompts)."""
        return self.concept or self.text or VISUAL_PROMPT_TEXT

    def to_dict(self) -> dict:
        """JSON-ready description (as given: the concept a text matched is in the result's
        ``settings["vocabulary"]``)."""
        out: dict = {"text": self.text, "kind": self.kind}
        if self.boxes:
            assert self.box_labels is not None  # set with the boxes in __post_init__
            out["boxes"] = [list(b) for b in self.boxes]
            out["box_labels"] = list(self.box_labels)
        if self.points:
            assert self.point_labels is not None  # set with the points in __post_init__
            out["points"] = [list(p) for p in self.points]
            out["point_labels"] = list(self.point_labels)
        return out


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def validate_prompt(prompt: Prompt, image_hw: Sequence[int]) -> Prompt:
    """Check ``prompt`` against an image of ``(H, W)`` pixels; return it unchanged.

    Raises:
        PromptError: empty text; nothing to segment; a box or point that is not finite, degenerate
            (``x1 >= x2`` or ``y1 >= y2``) or outside ``[0, W] x [0, H]``; labels other than 0 / 1 or not one
            per box / point. The message names the value and the image size.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    size = f"image of {w} x {h} pixels (W x H)"
    if prompt.text is not None and not prompt.text:
        raise PromptError("empty text prompt: give a concept such as 'liver', or leave the text out")
    if prompt.text is None and not prompt.boxes and not prompt.points:
        raise PromptError("a prompt needs a text, a box or a point")
    for box in prompt.boxes or ():
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise PromptError(f"box {_fmt(box)}: expected 4 finite numbers x1,y1,x2,y2")
        x1, y1, x2, y2 = box
        if x1 >= x2 or y1 >= y2:
            raise PromptError(f"box {_fmt(box)} is degenerate: need x1 < x2 and y1 < y2 (pixels, xyxy)")
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise PromptError(f"box {_fmt(box)} lies outside the {size}: need 0 <= x <= {w}, 0 <= y <= {h}")
    for point in prompt.points or ():
        if len(point) != 2 or not all(math.isfinite(v) for v in point):
            raise PromptError(f"point {_fmt(point)}: expected 2 finite numbers x,y")
        x, y = point
        if not (0 <= x <= w and 0 <= y <= h):
            raise PromptError(
                f"point {_fmt(point)} lies outside the {size}: need 0 <= x <= {w}, 0 <= y <= {h}"
            )
    for what, items, labels in (
        ("box", prompt.boxes, prompt.box_labels),
        ("point", prompt.points, prompt.point_labels),
    ):
        if not items:
            continue
        assert labels is not None  # set with the boxes / points in __post_init__
        if len(labels) != len(items):
            raise PromptError(f"{len(labels)} {what} labels for {len(items)} {what}es/points")
        bad = [v for v in labels if v not in (0, 1)]
        if bad:
            raise PromptError(f"{what} label {bad[0]} is not 1 (positive) or 0 (negative)")
    if (
        prompt.boxes
        and not prompt.points
        and prompt.text is None
        and prompt.box_labels is not None
        and 1 not in prompt.box_labels
    ):
        raise PromptError("a box-only prompt needs at least one positive box")
    if prompt.points and prompt.point_labels is not None and 1 not in prompt.point_labels:
        raise PromptError("point prompts need at least one positive point (label 1)")
    return prompt


def _numbers(text: str, what: str, count: int, usage: str) -> tuple[list[float], list[str]]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < count:
        raise PromptError(f"{what} {text!r}: expected {usage}")
    try:
        values = [float(p) for p in parts[:count]]
    except ValueError:
        raise PromptError(f"{what} {text!r}: expected {usage}") from None
    return values, parts[count:]


def _label(word: str, what: str, text: str, usage: str) -> int:
    w = word.lower()
    if w in _NEGATIVE:
        return 0
    if w in _POSITIVE:
        return 1
    raise PromptError(f"{what} {text!r}: unknown label {word!r}; expected {usage}")


def parse_box(text: str) -> tuple[Box, int]:
    """Parse ``"x1,y1,x2,y2[,neg]"`` into ``((x1, y1, x2, y2), label)`` (label 0 for ``neg``, else 1)."""
    usage = "x1,y1,x2,y2 or x1,y1,x2,y2,neg (pixels)"
    values, rest = _numbers(text, "box", 4, usage)
    if len(rest) > 1:
        raise PromptError(f"box {text!r}: expected {usage}")
    label = _label(rest[0], "box", text, usage) if rest else 1
    return (values[0], values[1], values[2], values[3]), label


def parse_point(text: str) -> tuple[Point, int]:
    """Parse ``"x,y[,label]"`` into ``((x, y), label)``; label ``1``/``pos`` (default) or ``0``/``neg``."""
    usage = "x,y or x,y,1 / x,y,0 (pixels; 1 positive, 0 negative)"
    values, rest = _numbers(text, "point", 2, usage)
    if len(rest) > 1:
        raise PromptError(f"point {text!r}: expected {usage}")
    label = _label(rest[0], "point", text, usage) if rest else 1
    return (values[0], values[1]), label


@dataclass
class _Draft:
    text: str | None = None
    boxes: list[tuple[float, ...]] = field(default_factory=list)
    box_labels: list[int] = field(default_factory=list)
    points: list[tuple[float, ...]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)

    def build(self) -> Prompt:
        return Prompt(
            self.text,
            self.boxes or None,
            self.box_labels or None,
            self.points or None,
            self.point_labels or None,
        )


def prompts_from_cli(items: Sequence[tuple[str, str]]) -> list[Prompt]:
    """Build prompts from command-line items in the order given.

    Args:
        items: ``("text" | "box" | "point", raw string)`` pairs in argument order.

    Rules: each ``text`` item starts a new prompt; a ``box`` / ``point`` attaches to the latest text
    prompt; boxes and points given before the first text form one geometry-only prompt (listed first).

    Raises:
        PromptError: a malformed box / point string; no prompt at all.
    """
    drafts: list[_Draft] = []
    leading = _Draft()
    for kind, raw in items:
        if kind == "text":
            drafts.append(_Draft(text=raw))
            continue
        target = drafts[-1] if drafts else leading
        if kind == "box":
            box, label = parse_box(raw)
            target.boxes.append(box)
            target.box_labels.append(label)
        elif kind == "point":
            point, label = parse_point(raw)
            target.points.append(point)
            target.point_labels.append(label)
        else:
            raise ValueError(f"unknown prompt item kind {kind!r}")
    if leading.boxes or leading.points:
        drafts.insert(0, leading)
    if not drafts:
        raise PromptError("no prompt given: use -p TEXT, --box or --point")
    return [d.build() for d in drafts]
