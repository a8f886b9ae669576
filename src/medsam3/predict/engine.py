"""The inference engine: one loaded SAM3 model and the operations every segmentation path shares.

2D segmentation (:mod:`medsam3.predict.segment_2d`), the volume modes (:mod:`medsam3.predict.volume`), the
server and ``medsam3 evaluate`` all work through an :class:`Engine` and its public methods; none reaches
into another's state. The engine holds:

* the image model (``transformers.Sam3Model``, eval mode) and its processor, loaded once;
* resized copies of it for per-call input sizes (:meth:`Engine.at_size`, at most :data:`MAX_SIZES` kept);
* SAM3's interactive tracker (``Sam3TrackerModel``, point prompts) and video model (``Sam3VideoModel``,
  ``mode="track"``), loaded on first use from the same source, on the same device and dtype (int8 too:
  :mod:`medsam3.model.quantize`).

It is safe to share between threads (the server's workers): lazy loads and resizes happen under a lock;
the models are only read.

Frames: ``uint8 (S, S, 3)`` RGB on the model's square input grid in, ``(B, 3, S, S)`` normalised pixels
on the model's device and dtype; tokens ``(N, 32)``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from medsam3.errors import ModelError, PromptError
from medsam3.model.forward import encode_image, encode_text, model_device, model_dtype, predict_prompts
from medsam3.model.input_size import input_size, resize_sam3_input
from medsam3.model.quantize import INT8, dequantized_copy, dtype_label, is_int8, quantize_int8
from medsam3.predict.prompts import brief

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, Sam3Model, Sam3TrackerModel
    from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

    from medsam3.model.loading import LoadedSam3
    from medsam3.model.video import LoadedSam3Video

#: Tokens per prompt of SAM3's text encoder.
TEXT_TOKENS = 32
#: Resized copies of the image model kept per engine (the least recently used goes first).
MAX_SIZES = 2


@dataclass(frozen=True)
class Tokens:
    """Tokenised prompt texts: ``input_ids`` and ``attention_mask``, ``(N, 32)`` long tensors (CPU)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def rows(self, rows: list[int]) -> Tokens:
        return Tokens(self.input_ids[rows], self.attention_mask[rows])


#: This thread's list of descriptors being recorded (:func:`recording_descriptors`).
_recording = threading.local()


@contextlib.contextmanager
def recording_descriptors() -> Iterator[list[np.ndarray]]:
    """Within the block, every image encoder pass of this thread (any :class:`Engine`) adds its ``(B, 2C)``
    domain descriptors (:func:`medsam3.model.domain.image_descriptors`) to the list yielded."""
    previous = getattr(_recording, "sink", None)
    sink: list[np.ndarray] = []
    _recording.sink = sink
    try:
        yield sink
    finally:
        _recording.sink = previous


class Engine:
    """One loaded SAM3 model (module docstring).

    Args:
        loaded: the image model and processor (:func:`medsam3.model.loading.load_sam3`, or any object
            with ``model``, ``processor`` and optionally ``source``).
        tracker: the interactive tracker for point prompts (a ``load_sam3_tracker`` result or a bare
            ``Sam3TrackerModel``); loaded from the same source on first use when omitted.
        video: SAM3's video model for track mode (a ``load_sam3_video`` result or a bare
            ``Sam3VideoModel``); loaded from the same source on first use when omitted.
    """

    def __init__(self, loaded: LoadedSam3 | Any, *, tracker: Any = None, video: Any = None):
        self.loaded = loaded
        self.model: Sam3Model = loaded.model.eval()
        self.processor: Any = loaded.processor
        self._tracker = tracker
        self._video = video
        self._sizes: OrderedDict[int, Engine] = OrderedDict()
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(
        cls, source: str | None = None, *, device: str = "auto", dtype: str = "auto"
    ) -> Engine:
        """Load the model ``source`` (folder or Hub id; ``None``: the configured or bundled default)."""
        from medsam3.model.loading import load_sam3

        return cls(load_sam3(source, device=device, dtype=dtype))

    # -- what it is ---------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the model came from (path or id), for reports."""
        return str(getattr(self.loaded, "source", "in-memory model"))

    @property
    def image_size(self) -> int:
        """Square input side of the image model, in pixels."""
        return input_size(self.model)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    def _load_dtype(self) -> torch.dtype | str:
        """The ``dtype`` the tracker and video model are loaded with: the image model's (``"int8"`` when
        its linear layers are quantized)."""
        return INT8 if is_int8(self.model) else self.dtype

    def describe(self) -> dict[str, Any]:
        """Model, input size, device and dtype, for the settings of a result and the server's
        ``/api/info``; ``dtype`` is :func:`~medsam3.model.quantize.dtype_label`: the float dtype
        (``"float32"``), or for ``--dtype int8`` which linear layers are int8 (the vision encoder's), since
        the model's parameters alone would say float32."""
        return {
            "model": self.source,
            "model_input_size": self.image_size,
            "device": str(self.device),
            "dtype": dtype_label(self.model),
        }

    def at_size(self, image_size: int | None) -> Engine:
        """This engine with the image model at ``image_size`` (``None`` or its own size: ``self``).

        The resized model is a copy (:func:`medsam3.model.input_size.resize_sam3_input`; this engine's model
        is not changed), made once and kept; it shares this engine's tracker and video model.
        """
        if image_size is None or int(image_size) == self.image_size:
            return self
        size = int(image_size)
        with self._lock:
            if size in self._sizes:
                self._sizes.move_to_end(size)
                return self._sizes[size]
            if is_int8(self.model):  # resized from the dequantized weights, then quantized again
                resized = quantize_int8(resize_sam3_input(dequantized_copy(self.model), size)).eval()
            else:
                resized = resize_sam3_input(self.model, size).eval()
            sibling = Engine(_Resized(resized, self.processor, self.loaded), tracker=self, video=self)
            self._sizes[size] = sibling
            while len(self._sizes) > MAX_SIZES:
                self._sizes.popitem(last=False)
            return sibling

    # -- text and pixels ----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tokens:
        """Tokenise ``texts`` padded to :data:`TEXT_TOKENS`.

        Raises:
            PromptError: a text is longer than SAM3 reads.
        """
        if not texts:
            empty = torch.zeros((0, TEXT_TOKENS), dtype=torch.long)
            return Tokens(empty, empty.clone())
        enc = self.processor.tokenizer(
            texts, padding="max_length", max_length=TEXT_TOKENS, return_tensors="pt"
        )
        if enc["input_ids"].shape[1] > TEXT_TOKENS:
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            bad = next(t for t, n in zip(texts, lengths, strict=True) if n > TEXT_TOKENS)
            n = int(max(lengths))
            raise PromptError(
                f"prompt {brief(bad)} is too long: {n} tokens, SAM3 reads at most {TEXT_TOKENS}"
            )
        return Tokens(enc["input_ids"], enc["attention_mask"])

    def pixel_values(self, rgb_model: np.ndarray, model: torch.nn.Module | None = None) -> torch.Tensor:
        """``uint8 (S, S, 3)`` -> ``(1, 3, S, S)`` normalised as the processor does (rescale, mean, std), on
        the device and in the dtype of ``model`` (default the image model)."""
        ip = self.processor.image_processor
        scale = float(getattr(ip, "rescale_factor", 1 / 255))
        mean = np.asarray(getattr(ip, "image_mean", (0.5, 0.5, 0.5)), dtype=np.float32)
        std = np.asarray(getattr(ip, "image_std", (0.5, 0.5, 0.5)), dtype=np.float32)
        x = (rgb_model.astype(np.float32) * np.float32(scale) - mean) / std
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        model = model if model is not None else self.model
        return t.to(device=model_device(model), dtype=model_dtype(model))

    # -- the image model ----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> Sam3VisionEncoderOutput:
        """Image features of ``(B, 3, S, S)`` pixels (:func:`medsam3.model.forward.encode_image`); inside
        :func:`recording_descriptors`, their ``(B, 2C)`` domain descriptors are kept as well."""
        out = encode_image(self.model, pixel_values)
        sink = getattr(_recording, "sink", None)
        if sink is not None:
            from medsam3.model.domain import image_descriptors

            sink.append(image_descriptors(out.last_hidden_state))
        return out

    def encode_texts(self, tokens: Tokens) -> torch.Tensor:
        """``(N, T, D)`` text features of ``tokens`` on the model's device."""
        device = self.device
        return encode_text(
            self.model, tokens.input_ids.to(device), tokens.attention_mask.to(device)
        ).pooler_output

    def detect(
        self,
        vision: Sam3VisionEncoderOutput,
        *,
        tokens: Tokens | None = None,
        text_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        meta_text_cls: bool = True,
    ) -> Sam3ImageSegmentationOutput:
        """The detector's output for ``N`` prompts on cached features
        (:func:`medsam3.model.forward.predict_prompts`): ``tokens``, or ``text_embeds`` with their
        ``attention_mask``; ``boxes (N, K, 4)`` normalised ``cxcywh`` with ``box_labels (N, K)``."""
        if tokens is not None:
            return predict_prompts(
                self.model,
                vision,
                input_ids=tokens.input_ids,
                attention_mask=tokens.attention_mask,
                boxes=boxes,
                box_labels=box_labels,
                meta_text_cls=meta_text_cls,
            )
        return predict_prompts(
            self.model,
            vision,
            text_embeds=text_embeds,
            attention_mask=attention_mask,
            boxes=boxes,
            box_labels=box_labels,
            meta_text_cls=meta_text_cls,
        )

    # -- the tracker and the video model --------------------------------------------------------------
    def tracker(self) -> Sam3TrackerModel:
        """SAM3's interactive tracker (point prompts), loaded on first use.

        Raises:
            ModelError: the model source holds no tracker weights.
        """
        if isinstance(self._tracker, Engine):
            return self._tracker.tracker()
        with self._lock:
            if self._tracker is None:
                from medsam3.model.loading import load_sam3_tracker

                source = getattr(self.loaded, "source", None)
                try:
                    self._tracker = load_sam3_tracker(source, device=self.device, dtype=self._load_dtype())
                except ModelError as exc:
                    raise ModelError(
                        f"point prompts without text need SAM3's interactive tracker, which could not be "
                        f"loaded from {source}: {exc}. Give a text with the points, or use a box prompt."
                    ) from exc
            net = self._tracker.model if hasattr(self._tracker, "model") else self._tracker
            return net.eval()

    @property
    def tracker_source(self) -> str:
        if isinstance(self._tracker, Engine):
            return self._tracker.tracker_source
        return str(getattr(self._tracker, "source", "loaded with the model"))

    def tracker_size(self) -> int:
        """Square input side of the tracker, in pixels."""
        vision = cast("PreTrainedConfig", self.tracker().config.vision_config)  # built: a config, not a dict
        return int(vision.backbone_config.image_size)

    def video(self) -> LoadedSam3Video | Any:
        """SAM3's video model with its processor and source (``model``, ``processor``, ``source``), loaded
        on first use; a bare ``Sam3VideoModel`` given to the engine gets its processor here.

        Raises:
            ModelError: the source holds no video model (an image-only SAM3 cannot track).
        """
        if isinstance(self._video, Engine):
            return self._video.video()
        with self._lock:
            if self._video is None or not hasattr(self._video, "processor"):
                self._video = self._load_video(self._video)
            return self._video

    def _load_video(self, bare: Any) -> Any:
        if bare is not None:
            from types import SimpleNamespace

            from medsam3.model.loading import build_processor

            net = bare.eval()
            return SimpleNamespace(
                model=net, processor=build_processor(net.config, video=True), source="in-memory video model"
            )
        from medsam3.model.video import load_sam3_video

        source = getattr(self.loaded, "source", None)
        try:
            return load_sam3_video(source, device=self.device, dtype=self._load_dtype())
        except ModelError as exc:
            raise ModelError(
                f"track mode needs SAM3's video model, which could not be loaded from {source}: "
                f"{exc}. Use --mode slices, or a video model folder."
            ) from exc


@dataclass
class _Resized:
    """A resized image model standing in for a loaded one (same processor and source)."""

    model: Any
    processor: Any
    original: Any

    @property
    def source(self) -> str:
        return str(getattr(self.original, "source", "in-memory model"))


def box_tensors(
    boxes: Sequence[Sequence[Sequence[float]]],
    labels: Sequence[Sequence[int]],
    to_model: Callable[[np.ndarray], np.ndarray],
    size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Box prompts of ``N`` rows as the detector takes them.

    Args:
        boxes: per row, boxes ``(x1, y1, x2, y2)`` in pixels of the image (or slice) given to the model.
        labels: per row, 1 positive / 0 negative per box.
        to_model: maps ``(K, 4)`` pixel boxes to model-grid pixels
            (:meth:`medsam3.preprocess.resize.ResizeTransform.boxes_to_model`).
        size: the model's square input side.

    Returns:
        ``(N, K, 4)`` float32 normalised ``cxcywh`` boxes padded per row, and ``(N, K)`` long labels with
        :data:`~medsam3.model.forward.BOX_PAD_LABEL` for padding; ``(None, None)`` when no row has a box.
    """
    from torchvision.ops import box_convert

    from medsam3.model.forward import BOX_PAD_LABEL

    n_box = max((len(b) for b in boxes), default=0)
    if not n_box:
        return None, None
    out = torch.zeros(len(boxes), n_box, 4, dtype=torch.float32)
    out_labels = torch.full((len(boxes), n_box), BOX_PAD_LABEL, dtype=torch.long)
    for r, (row, row_labels) in enumerate(zip(boxes, labels, strict=True)):
        if not row:
            continue
        xyxy = torch.from_numpy(to_model(np.asarray(row, dtype=np.float64)) / size)
        out[r, : len(row)] = box_convert(xyxy, "xyxy", "cxcywh").float()
        out_labels[r, : len(row)] = torch.tensor(row_labels)
    return out, out_labels
