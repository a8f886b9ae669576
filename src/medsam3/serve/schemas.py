"""Request bodies of the HTTP API (pydantic models: validated on arrival, described in ``/openapi.json``).

Coordinates follow :mod:`medsam3.predict.prompts`: continuous pixel coordinates of the 2D image that is
segmented, ``x`` to the right, ``y`` down, boxes ``[x1, y1, x2, y2]``, points ``[x, y]``. For a volume
with a ``slice`` they are pixels of that slice **as the slice endpoints return it** (display frame,
superior up for coronal and sagittal slices): only that slice is segmented, or, with ``propagate``, the
boxes become boxes on a key slice and the whole volume is segmented (:mod:`medsam3.serve.results`).

``box3d`` ``[x1, y1, z1, x2, y2, z2]`` is the exception: voxel coordinates of the **uploaded** array, as
``medsam3 segment --box3d`` takes them (:mod:`medsam3.predict.volume.prompts`: ``x`` along array axis 2,
``y`` along axis 1, ``z`` the stored slice index, continuous, ends exclusive), for volumes without a
``slice``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.config import JsonDict

from medsam3.predict.options import VolumeOptions, default_of
from medsam3.predict.options import option_fields as option_fields_of
from medsam3.predict.prompts import Prompt


class PromptIn(BaseModel):
    """One prompt: a concept text and / or boxes and points (see :class:`medsam3.predict.prompts.Prompt`),
    or, on a whole volume, a text and / or a 3D box (:class:`medsam3.predict.volume.prompts.VolumePrompt`)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(
        None, max_length=200, examples=["liver"], description="concept to segment, e.g. 'liver' or 'polyp'"
    )
    boxes: list[list[float]] | None = Field(
        None, max_length=16, examples=[[[100, 80, 300, 260]]], description="boxes [x1, y1, x2, y2] in pixels"
    )
    box_labels: list[int] | None = Field(None, max_length=16, description="1 positive (default), 0 negative")
    points: list[list[float]] | None = Field(None, max_length=32, description="points [x, y] in pixels")
    point_labels: list[int] | None = Field(
        None, max_length=32, description="1 positive (default), 0 negative"
    )
    box3d: list[float] | None = Field(
        None,
        examples=[[10, 12, 5, 30, 40, 20]],
        description="volumes only, without 'slice': a 3D box [x1, y1, z1, x2, y2, z2] in voxel indices of "
        "the uploaded array (x along array axis 2, y along axis 1, z the stored slice index along axis 0; "
        "continuous, ends exclusive: z1=5, z2=20 covers slices 5 to 19). The prompt is searched only on "
        "the slices the box covers, with the box on each (as 'medsam3 segment --box3d'); it cannot be "
        "combined with 'boxes' or 'points' in the same prompt",
    )

    @field_validator("boxes")
    @classmethod
    def _four(cls, v):
        if v is not None and any(len(b) != 4 for b in v):
            raise ValueError("each box needs 4 numbers [x1, y1, x2, y2]")
        return v

    @field_validator("box3d")
    @classmethod
    def _six(cls, v):
        if v is not None and len(v) != 6:
            raise ValueError("box3d needs 6 numbers [x1, y1, z1, x2, y2, z2] (input voxel indices)")
        return v

    @field_validator("points")
    @classmethod
    def _two(cls, v):
        if v is not None and any(len(p) != 2 for p in v):
            raise ValueError("each point needs 2 numbers [x, y]")
        return v

    def to_prompt(self) -> Prompt:
        """The 2D prompt (text, boxes, points; ``box3d`` is handled by :mod:`medsam3.serve.results`)."""
        boxes = [tuple(b) for b in self.boxes] if self.boxes is not None else None
        points = [tuple(p) for p in self.points] if self.points is not None else None
        return Prompt(self.text, boxes, self.box_labels, points, self.point_labels)


class SliceIn(BaseModel):
    """A slice of a volume, in the display frame (see ``GET /api/images/{id}``, ``display.planes``)."""

    model_config = ConfigDict(extra="forbid")

    plane: Literal["axial", "coronal", "sagittal"] = "axial"
    index: int = Field(..., ge=0)


class SegmentRequest(BaseModel):
    """A segmentation request on an uploaded image: what to segment, where. Its options are the fields
    :func:`option_fields` adds (:class:`SegmentIn`)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[PromptIn] = Field(..., min_length=1, max_length=16)
    slice: SliceIn | None = Field(
        None,
        description="volumes only: segment this one slice (boxes / points are pixels of it), or "
        "with 'propagate' the whole volume from the boxes drawn on it; without it the whole volume goes to "
        "the segmenter (text and 'box3d' prompts)",
    )
    propagate: bool = Field(
        False,
        description="volumes only, with 'slice': segment the whole volume from the boxes drawn on "
        "that slice. Each prompt's boxes (pixels of the displayed slice) become boxes on a key slice in "
        "the uploaded volume's voxels; the structure is detected with the box on every slice and followed "
        "outwards from the key slice while it overlaps from slice to slice (as 'medsam3 segment --box "
        "--box-slice'). Only slices of the plane the volume was acquired in can be used (the plane the "
        "volume segmenter slices along; others are refused with a message naming it). Points cannot be "
        "propagated; text-only prompts of the request search the whole volume. The result is a label map "
        "of the whole volume",
    )

    def given_options(self) -> dict[str, Any]:
        """The inference options the request sets (fields left out or ``null`` take the server's
        defaults)."""
        return {name: value for name in API_OPTIONS if (value := getattr(self, name, None)) is not None}

    def options(self, defaults: Mapping[str, Any] | None = None) -> VolumeOptions:
        """The request's :class:`~medsam3.predict.options.VolumeOptions` over ``defaults`` (the server's).

        Raises:
            OptionError: a value or combination the options refuse.
        """
        return VolumeOptions(**{**(defaults or {}), **self.given_options()})


def option_fields() -> dict[str, Any]:
    """The pydantic fields of the inference options the API offers (:mod:`medsam3.predict.options`): each
    optional (``null``: the server's default), with its range, choices and help."""
    types = {"bool": bool, "int": int, "float": float, "str": str}
    fields: dict[str, Any] = {}
    for f, info in option_fields_of(VolumeOptions, "api"):
        kind: Any = types[str(f.type).split(" ")[0]]
        if info.choices is not None:
            kind = Literal[info.choices]
        extra: dict[str, Any] = {"max_length": 64} if kind is str else {}
        # Ranges are checked by the options themselves, so the message is the one Python and the CLI give;
        # the schema still shows them.
        bounds: JsonDict = {k: v for k, v in (("minimum", info.low), ("maximum", info.high)) if v is not None}
        fields[f.name] = (
            kind | None,
            Field(
                None,
                description=f"{info.help} (default: the server's, "
                f"{default_of(f.name)!r} unless set at its start)",
                json_schema_extra=bounds or None,
                **extra,
            ),
        )
    return fields


#: The inference options a request may set.
API_OPTIONS = tuple(f.name for f, _ in option_fields_of(VolumeOptions, "api"))

if TYPE_CHECKING:
    SegmentIn = SegmentRequest
else:
    SegmentIn = create_model(
        "SegmentIn",
        __base__=SegmentRequest,
        __doc__="A segmentation request on an uploaded image: prompts, where, and inference options.",
        **option_fields(),
    )


class LoginIn(BaseModel):
    """The access token, exchanged for a session cookie by ``POST /api/login``."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(..., max_length=512)
