"""The :class:`Segmenter`: the user's handle on one loaded model, with default options for its calls.

A ``Segmenter`` is a small facade over an :class:`~medsam3.predict.engine.Engine` (the model, loaded
once) and a :class:`~medsam3.predict.options.VolumeOptions` (the defaults of its calls). Each call may
change any option; the model is not reloaded::

    seg = Segmenter.from_pretrained("models/medical-sam3", device="cuda")
    result = seg.segment("ct.nii.gz", ["liver", "spleen"], window="abdomen")
    result = seg.segment(picture, "polyp", tta=True)

:meth:`Segmenter.segment` dispatches on the image: a 2D image, or a one-slice volume such as a single
DICOM slice, goes to :func:`medsam3.predict.segment_2d.segment_image`; a volume to
:func:`medsam3.predict.volume.segment.segment_volume` (``mode="slices"``, ``"track"`` or ``"clips"``).
For a model that records the concepts it knows (``concepts.json``: the bundled ``medsam3-nano``), prompts
outside them are reported absent with the reason ``unknown concept`` instead of being segmented
(:mod:`medsam3.predict.vocabulary_guard`; ``allow_unknown_concepts=True`` segments them anyway).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from medsam3.errors import PromptError
from medsam3.model.concepts import ModelConcepts
from medsam3.model.domain import ModelDomain
from medsam3.predict.engine import Engine
from medsam3.predict.options import VolumeOptions, build_options, check_request
from medsam3.predict.prompts import Prompt
from medsam3.predict.segment_2d import as_2d, segment_image
from medsam3.predict.summary import SegmentationResult
from medsam3.predict.vocabulary_guard import segment_guarded
from medsam3.predict.volume.prompts import VolumePrompt

#: What :meth:`Segmenter.segment` takes as prompts: one concept text, or a list of texts and prompts.
PromptsLike = str | Prompt | VolumePrompt | Sequence[str | Prompt | VolumePrompt]

__all__ = ["Segmenter", "as_2d", "as_prompts"]


def as_prompts(prompts: PromptsLike) -> list[Prompt | VolumePrompt]:
    """``"liver"``, ``["liver", "spleen"]``, ``Prompt`` / ``VolumePrompt`` objects or a mix -> a list.

    Raises:
        PromptError: no prompt, or an item that is neither a string nor a prompt.
    """
    if isinstance(prompts, (str, Prompt, VolumePrompt)):
        prompts = [prompts]
    out: list[Prompt | VolumePrompt] = []
    for p in prompts:
        if isinstance(p, str):
            out.append(Prompt(p))
        elif isinstance(p, (Prompt, VolumePrompt)):
            out.append(p)
        else:
            raise PromptError(f"a prompt is a concept text or a Prompt, not {type(p).__name__}: {p!r}")
    if not out:
        raise PromptError("no prompt given")
    return out


class Segmenter:
    """Prompt-driven segmentation of medical images with one loaded SAM3 model.

    Args:
        model: a model folder or Hub id (``None``: ``$MEDSAM3_MODEL``, the configured model, else the
            bundled ``medsam3-nano``), a loaded model (``load_sam3`` result, or any object with ``model``
            and ``processor``), or an :class:`~medsam3.predict.engine.Engine`.
        device, dtype: where and how a model is loaded here (``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``; ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``, or ``"int8"``: CPU
            only, the vision encoder's linear layers dynamically quantized, :mod:`medsam3.model.quantize`).
        tracker, video: SAM3's interactive tracker (point prompts) and video model (``mode="track"``),
            when not loaded from the same source on first use (see :class:`~medsam3.predict.engine.Engine`).
        options: default options of every call (:class:`~medsam3.predict.options.VolumeOptions`);
        concepts: the concepts the model knows: ``"auto"`` reads ``concepts.json`` from the model's folder
            (:mod:`medsam3.model.concepts`; none there: any prompt is segmented), or a
            :class:`~medsam3.model.concepts.ModelConcepts`, a path to such a file, or ``None`` (any prompt);
        **overrides: options by name on top of ``options`` (``threshold=0.2``, ``tta=True``, ...).

    Raises:
        OptionError: an unknown option or an invalid value; ModelError: the model cannot be loaded.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        tracker: Any = None,
        video: Any = None,
        options: VolumeOptions | None = None,
        concepts: ModelConcepts | str | os.PathLike[str] | None = "auto",
        **overrides: Any,
    ):
        if isinstance(model, Engine):
            self.engine = model
        elif hasattr(model, "model") and hasattr(model, "processor"):
            self.engine = Engine(model, tracker=tracker, video=video)
        else:
            from medsam3.model.loading import load_sam3

            self.engine = Engine(load_sam3(model, device=device, dtype=dtype), tracker=tracker, video=video)
        self.options = build_options(VolumeOptions, options, **overrides)
        self.domain: ModelDomain | None = None
        if isinstance(concepts, str) and concepts == "auto":
            self.concepts = ModelConcepts.of_model(self.engine.source)
            self.domain = ModelDomain.of_model(self.engine.source) if self.concepts is not None else None
        elif concepts is None or isinstance(concepts, ModelConcepts):
            self.concepts = concepts
        else:
            self.concepts = ModelConcepts.load(os.fspath(concepts))

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | None = None, *, device: str = "auto", dtype: str = "auto", **options: Any
    ) -> Segmenter:
        """Load a model (folder or Hub id; ``None``: the configured or bundled default) with default
        ``options`` for its calls."""
        return cls(path_or_hub_id, device=device, dtype=dtype, **options)

    @property
    def source(self) -> str:
        """Where the model came from (path or id), for reports."""
        return self.engine.source

    @property
    def guards(self) -> bool:
        """True when the model records a closed set of concepts: prompts outside it are reported as
        ``unknown concept`` unless ``allow_unknown_concepts`` (:mod:`medsam3.predict.vocabulary_guard`)."""
        return self.concepts is not None and self.concepts.restricts

    def segment(
        self, image: Any, prompts: PromptsLike, *, spacing: Any = None, **options: Any
    ) -> SegmentationResult:
        """Segment ``image`` with ``prompts``; ``options`` change this call's options only.

        Args:
            image: an :class:`~medsam3.image.Image` (a 2D image, a one-slice volume segmented as its slice,
                or a 3D volume), a file path, a nibabel or SimpleITK image, or a numpy array
                (:func:`medsam3.io.memory.to_image`).
            spacing: for a numpy array, the voxel size in mm in ITK order ``(x, y[, z])``.
            prompts: a concept text, or a list of texts and :class:`~medsam3.predict.prompts.Prompt`
                objects (coordinates in pixels of ``image``); for volumes also
                :class:`~medsam3.predict.volume.prompts.VolumePrompt` (boxes on a key slice or 3D boxes,
                in input voxels; plain prompts must then be text only).
            **options: any :class:`~medsam3.predict.options.VolumeOptions` field.

        Returns:
            A :class:`~medsam3.predict.summary.SegmentationResult` on ``image``'s grid.

        Raises:
            OptionError: invalid options or combinations; PromptError: invalid prompts; InputError: an
            unreadable image, a window for a non-CT image; ModelError: point prompts without tracker
            weights, track mode without a video model.
        """
        from medsam3.io.memory import to_image
        from medsam3.io.readers import check_segmentable

        call = self.options.replace(**options) if options else self.options
        given = as_prompts(prompts)
        image = check_segmentable(to_image(image, spacing=spacing, modality=call.modality))
        points = any(getattr(p, "points", None) for p in given)
        flat = as_2d(image)
        if flat is not None:
            check_request(call, points=points)
            if any(isinstance(p, VolumePrompt) for p in given):
                raise PromptError("volume prompts (key-slice or 3D boxes) need a 3D volume; this image is 2D")
            plain = [p for p in given if isinstance(p, Prompt)]
            if self.concepts is not None and self.guards:
                return segment_guarded(
                    self.engine,
                    flat,
                    plain,
                    call,
                    self.concepts,
                    segment_image,
                    volume=False,
                    domain=self.domain,
                )
            return segment_image(self.engine, flat, plain, call)
        from medsam3.predict.volume.segment import segment_volume

        check_request(call, points=points, volume=True)
        if self.concepts is not None and self.guards:
            return segment_guarded(
                self.engine,
                image,
                given,
                call,
                self.concepts,
                segment_volume,
                volume=True,
                domain=self.domain,
            )
        return segment_volume(self.engine, image, given, call)
