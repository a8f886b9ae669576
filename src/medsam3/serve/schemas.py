"""Request bodies of the HTTP API (pydantic models: validated on arrival, described in ``/openapi.json``).

Coordinates follow :mod:`medsam3.predict.prompts`: continuous pixel coordinates of the 2D image that is
segmented, ``x`` to the right, ``y`` down, boxes ``[x1, y1, x2, y2]``, points ``[x, y]``. For a volume
segmented on one slice (``slice`` given) they are pixels of that slice **as the slice endpoints return it**
(display frame, superior up for coronal and sagittal slices).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medsam3.predict.prompts import Prompt


class PromptIn(BaseModel):
    """One prompt: a concept text and / or boxes and points (see :class:`medsam3.predict.prompts.Prompt`)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=200, examples=["liver"],
                             description="concept to segment, e.g. 'liver' or 'polyp'")
    boxes: list[list[float]] | None = Field(None, max_length=16, examples=[[[100, 80, 300, 260]]],
                                            description="boxes [x1, y1, x2, y2] in pixels")
    box_labels: list[int] | None = Field(None, max_length=16, description="1 positive (default), 0 negative")
    points: list[list[float]] | None = Field(None, max_length=32, description="points [x, y] in pixels")
    point_labels: list[int] | None = Field(None, max_length=32,
                                           description="1 positive (default), 0 negative")

    @field_validator("boxes")
    @classmethod
    def _four(cls, v):
        if v is not None and any(len(b) != 4 for b in v):
            raise ValueError("each box needs 4 numbers [x1, y1, x2, y2]")
        return v

    @field_validator("points")
    @classmethod
    def _two(cls, v):
        if v is not None and any(len(p) != 2 for p in v):
            raise ValueError("each point needs 2 numbers [x, y]")
        return v

    def to_prompt(self) -> Prompt:
        return Prompt(self.text, self.boxes, self.box_labels, self.points, self.point_labels)


class SliceIn(BaseModel):
    """A slice of a volume, in the display frame (see ``GET /api/images/{id}``, ``display.planes``)."""

    model_config = ConfigDict(extra="forbid")

    plane: Literal["axial", "coronal", "sagittal"] = "axial"
    index: int = Field(..., ge=0)


class SegmentIn(BaseModel):
    """A segmentation request on an uploaded image."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[PromptIn] = Field(..., min_length=1, max_length=16)
    slice: SliceIn | None = Field(
        None, description="volumes only: segment this one slice (boxes / points are pixels of it); "
        "without it the whole volume goes to the segmenter")
    instances: bool = Field(False, description="every instance above the threshold instead of one mask "
                            "per prompt")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="score threshold (server default)")
    presence_threshold: float | None = Field(None, ge=0.0, le=1.0,
                                             description="presence threshold (server default)")
    window: str | None = Field(None, max_length=40, description="CT window name or 'WIDTH,LEVEL' (CT only)")


class LoginIn(BaseModel):
    """The access token, exchanged for a session cookie by ``POST /api/login``."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(..., max_length=512)
