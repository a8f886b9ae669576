"""Prompts on volumes: a concept text, optionally refined by a box on a key slice or by a 3D box.

Coordinates are **voxel coordinates of the input array** ``(Z, Y, X)``, continuous as for 2D boxes: voxel
``array[k, j, i]`` covers ``[i, i+1] x [j, j+1] x [k, k+1]``. ``x`` runs along array axis 2 (ITK ``i``),
``y`` along axis 1 (ITK ``j``), ``z`` along axis 0 (ITK ``k``, the stored slice index; a DICOM series is
stacked in order along its slice normal): the voxel coordinates viewers such as 3D Slicer or ITK-SNAP
display for the file. Boxes keep these coordinates whatever the
canonical reorientation does; the segmenter maps them to its slices.

* ``--box x1,y1,x2,y2 --box-slice K``: the box lies on input slice ``K`` (array index along axis 0). The
  concept is detected with the box as an exemplar on that **key slice**; the same box is given on every
  other slice, and a slice's mask is kept only while it overlaps the kept mask of the slice next to it on
  the way from the key slice (the structure is followed outwards from the key slice through overlap and
  stops at the first slice where it is lost).
* ``--box3d x1,y1,z1,x2,y2,z2``: the box applies on every slice it covers (slice ``k`` is covered when
  ``z1 < k + 1`` and ``k < z2``; ends exclusive like ``x2``, so ``z1=10, z2=21`` covers slices 10 to 20);
  the concept is not searched on the other slices.

Box-only prompts (no ``-p``) use SAM3's ``"visual"`` text, as on 2D images. Points are for 2D images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medsam3.errors import PromptError
from medsam3.predict.prompts import VISUAL_PROMPT_TEXT, Box, parse_box

Box3D = tuple[float, float, float, float, float, float]


@dataclass
class VolumePrompt:
    """One prompt on a volume (see the module docstring for the coordinates).

    Attributes:
        text: concept text, or ``None`` for a box-only prompt.
        boxes: ``[(x1, y1, x2, y2), ...]`` on the key slice ``box_slice`` (input voxels).
        box_labels: 1 positive (default) / 0 negative, one per box.
        box_slice: the key slice (input array axis 0) the ``boxes`` lie on.
        box3d: ``(x1, y1, z1, x2, y2, z2)`` in input voxels; exclusive with ``boxes``.
        concept: the model's concept that ``text`` names, when it differs from ``text`` (as
            :attr:`medsam3.predict.prompts.Prompt.concept`): the model is given the concept.
    """

    text: str | None = None
    boxes: list[tuple[float, ...]] | None = None
    box_labels: list[int] | None = None
    box_slice: int | None = None
    box3d: tuple[float, ...] | None = None
    concept: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None:
            self.text = " ".join(str(self.text).split())
        self.boxes = [tuple(float(v) for v in b) for b in self.boxes] if self.boxes else None
        if self.boxes and self.box_labels is None:
            self.box_labels = [1] * len(self.boxes)
        self.box_labels = (
            [int(v) for v in self.box_labels] if self.boxes and self.box_labels is not None else None
        )
        self.box3d = tuple(float(v) for v in self.box3d) if self.box3d is not None else None

    @property
    def kind(self) -> str:
        """``"text"``, ``"text+box"`` (key slice), ``"text+box3d"``, ``"box"``, ``"box3d"``."""
        parts = [
            name
            for name, on in (
                ("text", self.text is not None),
                ("box", self.boxes),
                ("box3d", self.box3d is not None),
            )
            if on
        ]
        return "+".join(parts) or "empty"

    @property
    def display_name(self) -> str:
        if self.text:
            return self.text
        if self.box3d is not None:
            return "3D box"
        n = len(self.boxes or ())
        return f"{n} box{'es' if n > 1 else ''} on slice {self.box_slice}" if n else "empty prompt"

    @property
    def model_text(self) -> str:
        """Text given to the model: the concept, else the text (``"visual"`` for box-only prompts)."""
        return self.concept or self.text or VISUAL_PROMPT_TEXT

    def to_dict(self) -> dict:
        out: dict = {"text": self.text, "kind": self.kind}
        if self.boxes:
            assert self.box_labels is not None  # set with the boxes in __post_init__
            out.update(
                boxes=[list(b) for b in self.boxes],
                box_labels=list(self.box_labels),
                box_slice=self.box_slice,
            )
        if self.box3d is not None:
            out["box3d"] = list(self.box3d)
        return out


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def validate_volume_prompt(prompt: VolumePrompt, shape_zyx: Sequence[int]) -> VolumePrompt:
    """Check ``prompt`` against a volume of array shape ``(Z, Y, X)``; return it unchanged.

    Raises:
        PromptError: empty text; nothing to segment; a key-slice box without ``box_slice`` (or a slice
            outside the volume); a box that is degenerate or outside the slice / volume; both kinds of box.
    """
    z, h, w = (int(v) for v in shape_zyx)
    size = f"volume of {w} x {h} x {z} voxels (X x Y x Z)"
    if prompt.text is not None and not prompt.text:
        raise PromptError("empty text prompt: give a concept such as 'liver', or leave the text out")
    if prompt.text is None and not prompt.boxes and prompt.box3d is None:
        raise PromptError("a volume prompt needs a text, a box on a key slice or a 3D box")
    if prompt.boxes and prompt.box3d is not None:
        raise PromptError(
            f"prompt {prompt.display_name!r}: give either --box with --box-slice or --box3d, not both"
        )
    if prompt.boxes:
        if prompt.box_slice is None:
            raise PromptError(
                f"box {_fmt(prompt.boxes[0])} on a volume needs --box-slice K (the input slice "
                "index it is drawn on), or use --box3d x1,y1,z1,x2,y2,z2"
            )
        if not 0 <= prompt.box_slice < z:
            raise PromptError(
                f"--box-slice {prompt.box_slice} is outside the {z} slices (0..{z - 1}) of the {size}"
            )
        for box in prompt.boxes:
            if len(box) != 4 or not all(math.isfinite(v) for v in box):
                raise PromptError(f"box {_fmt(box)}: expected 4 finite numbers x1,y1,x2,y2")
            x1, y1, x2, y2 = box
            if x1 >= x2 or y1 >= y2:
                raise PromptError(f"box {_fmt(box)} is degenerate: need x1 < x2 and y1 < y2 (voxels)")
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                raise PromptError(
                    f"box {_fmt(box)} lies outside the slices of the {size}: need "
                    f"0 <= x <= {w}, 0 <= y <= {h}"
                )
        assert prompt.box_labels is not None  # set with the boxes in __post_init__
        bad = [v for v in prompt.box_labels if v not in (0, 1)]
        if bad:
            raise PromptError(f"box label {bad[0]} is not 1 (positive) or 0 (negative)")
        if prompt.text is None and 1 not in prompt.box_labels:
            raise PromptError("a box-only prompt needs at least one positive box")
    elif prompt.box_slice is not None:
        raise PromptError(
            f"--box-slice {prompt.box_slice} given without a --box for prompt {prompt.display_name!r}"
        )
    if prompt.box3d is not None:
        b = prompt.box3d
        if len(b) != 6 or not all(math.isfinite(v) for v in b):
            raise PromptError(f"3D box {_fmt(b)}: expected 6 finite numbers x1,y1,z1,x2,y2,z2")
        x1, y1, z1, x2, y2, z2 = b
        if x1 >= x2 or y1 >= y2 or z1 >= z2:
            raise PromptError(f"3D box {_fmt(b)} is degenerate: need x1 < x2, y1 < y2 and z1 < z2 (voxels)")
        if min(x1, y1, z1) < 0 or x2 > w or y2 > h or z2 > z:
            raise PromptError(
                f"3D box {_fmt(b)} lies outside the {size}: need 0 <= x <= {w}, 0 <= y <= {h}, 0 <= z <= {z}"
            )
    return prompt


def parse_box3d(text: str) -> Box3D:
    """Parse ``"x1,y1,z1,x2,y2,z2"`` (input voxels, continuous, exclusive ends)."""
    usage = "x1,y1,z1,x2,y2,z2 (voxels of the input array)"
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise PromptError(f"3D box {text!r}: expected {usage}") from None
    if len(values) != 6:
        raise PromptError(f"3D box {text!r}: expected {usage}")
    return (values[0], values[1], values[2], values[3], values[4], values[5])


def parse_slice_index(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise PromptError(f"--box-slice {text!r}: expected a slice index (integer)") from None
    return value


@dataclass
class _Draft:
    text: str | None = None
    boxes: list[tuple[float, ...]] = field(default_factory=list)
    box_labels: list[int] = field(default_factory=list)
    box_slice: int | None = None
    box3d: Box3D | None = None

    def build(self) -> VolumePrompt:
        return VolumePrompt(
            self.text, self.boxes or None, self.box_labels or None, self.box_slice, self.box3d
        )


def volume_prompts_from_cli(items: Sequence[tuple[str, str]]) -> list[VolumePrompt]:
    """Build volume prompts from command-line items in order (rules of
    :func:`medsam3.predict.prompts.prompts_from_cli`): ``--box``, ``--box-slice`` and ``--box3d`` attach
    to the ``-p`` given just before them; those before any ``-p`` form one box-only prompt.

    Raises:
        PromptError: points (2D images only), two ``--box-slice`` or ``--box3d`` for one prompt, a
            malformed value, or no prompt at all.
    """
    drafts: list[_Draft] = []
    leading = _Draft()
    for kind, raw in items:
        if kind == "text":
            drafts.append(_Draft(text=raw))
            continue
        target = drafts[-1] if drafts else leading
        name = target.text or "the box-only prompt"
        if kind == "box":
            box, label = parse_box(raw)
            target.boxes.append(box)
            target.box_labels.append(label)
        elif kind == "box_slice":
            if target.box_slice is not None:
                raise PromptError(f"two --box-slice values for {name!r}; all its boxes lie on one key slice")
            target.box_slice = parse_slice_index(raw)
        elif kind == "box3d":
            if target.box3d is not None:
                raise PromptError(f"two --box3d for {name!r}; give one 3D box per prompt")
            target.box3d = parse_box3d(raw)
        elif kind == "point":
            raise PromptError(
                f"point {raw!r}: points are for 2D images; on a volume use --box with --box-slice, or --box3d"
            )
        else:
            raise ValueError(f"unknown prompt item kind {kind!r}")
    if leading.boxes or leading.box3d is not None or leading.box_slice is not None:
        drafts.insert(0, leading)
    if not drafts:
        raise PromptError("no prompt given: use -p TEXT, --box with --box-slice, or --box3d")
    return [d.build() for d in drafts]


# --------------------------------------------------------------------------------------------------
# From input voxels to the slices the segmenter sees


def canonical_box(
    lo_zyx: Sequence[float],
    hi_zyx: Sequence[float],
    source_axes: Sequence[int],
    flipped: Sequence[int],
    canonical_shape: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """A box ``[lo, hi]`` in input array coordinates ``(z, y, x)`` mapped to the canonical array.

    ``source_axes`` / ``flipped`` / ``canonical_shape`` are those of a
    :class:`~medsam3.preprocess.orientation.Reorientation`. Exact (permutation and mirroring only).
    Returns ``(lo, hi)`` in canonical array order.
    """
    lo = np.array([float(lo_zyx[a]) for a in source_axes])
    hi = np.array([float(hi_zyx[a]) for a in source_axes])
    for c in flipped:
        n = float(canonical_shape[c])
        lo[c], hi[c] = n - hi[c], n - lo[c]
    return lo, hi


def slice_plane_box(lo: np.ndarray, hi: np.ndarray, axis: int, shape_zyx: Sequence[int]) -> Box:
    """The in-plane part of a canonical box as ``(x1, y1, x2, y2)`` on a slice along ``axis``.

    Slices are taken as :func:`medsam3.preprocess.slices.take_slice` does with ``display=True``: axial
    ``(Y, X)``; coronal ``(Z, X)`` and sagittal ``(Z, Y)`` mirrored vertically (superior at the top).
    """
    rows, cols = {0: (1, 2), 1: (0, 2), 2: (0, 1)}[axis]
    y1, y2 = float(lo[rows]), float(hi[rows])
    if axis != 0:
        n = float(shape_zyx[rows])
        y1, y2 = n - y2, n - y1
    return (float(lo[cols]), y1, float(hi[cols]), y2)


def covered_slices(lo: np.ndarray, hi: np.ndarray, axis: int, n: int) -> range:
    """Slice indices along ``axis`` whose extent ``[k, k+1]`` overlaps the open interval ``(lo, hi)``."""
    first = max(0, int(math.floor(float(lo[axis]))))
    stop = min(n, int(math.ceil(float(hi[axis]))))
    return range(first, max(first, stop))
