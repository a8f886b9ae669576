"""SAM3's video model (detector + tracker) with bounded memory: processor, loading, streamed sessions.

``transformers.Sam3VideoModel`` carries text concepts through a frame sequence: on every frame its detector
(a ``Sam3Model``) finds the concept, its tracker (SAM2-style memory attention) propagates the objects found
so far, and unmatched detections become new object ids. A ``Sam3VideoInferenceSession`` holds the state.
By default that state grows without bound: every frame is stored as a float tensor, and every processed
frame keeps, per object, its low- and high-resolution masks and its memory features (about 12 MB per frame
plus 6.4 MB per object per frame at 1008 px). This module bounds it without changing any result:

* :class:`StreamedFrames` hands frames to the session one at a time, converting the caller's ``uint8``
  slices to normalised tensors on access; nothing is stored.
* :func:`prune_session` runs after each processed frame and deletes what the model can no longer read:
  per-frame outputs further behind than the tracker's reach (``num_maskmem`` memory frames and
  ``max_object_pointers_in_encoder`` object pointers), masks of past frames (only the current frame's
  masks are ever read back), used mask inputs, per-frame bookkeeping, and the memory features of
  conditioning frames that the tracker's "closest conditioning frames" rule can no longer select (their
  object pointers, a few hundred numbers each, are kept because every past conditioning frame
  contributes one).

With a window at least the tracker's reach (:func:`tracker_reach`, 16 frames for SAM3) this is lossless;
a smaller window trades some temporal context for memory.

Configurations of small video models are built with :func:`medsam3.model.configs.sam3_video_config` /
:func:`~medsam3.model.configs.tiny_sam3_video_config`, processors with
:func:`medsam3.model.loading.build_processor` (``video=True``); :func:`load_sam3_video` loads a model
folder the way :mod:`medsam3.model.loading` loads the image model and the point tracker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from medsam3.model.loading import VIDEO_MODEL_TYPE as VIDEO_MODEL_TYPE  # re-exported: defined with the loader
from medsam3.model.loading import LoadedSam3Video, load_pretrained
from medsam3.preprocess.resize import resize_rgb

#: Keys of a tracker output entry that hold masks; only the current frame's are ever read.
_MASK_KEYS = ("pred_masks", "high_res_masks")
#: Keys holding a frame's memory features (read by the memory attention of later frames).
_MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc")


# --------------------------------------------------------------------------------------------------
# Loading (:func:`medsam3.model.loading.load_pretrained`, kind ``"video"``)


def video_input_size(model) -> int:
    """Square input side (pixels) of a ``Sam3VideoModel``'s detector."""
    return int(model.config.detector_config.vision_config.backbone_config.image_size)


def load_sam3_video(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3Video:
    """Resolve (see :mod:`medsam3.model.resolve`), load and place a ``Sam3VideoModel`` and its processor.

    The folder must hold a video model (``model_type`` ``"sam3_video"``: ``facebook/sam3``, a converted
    ``sam3.pt`` / Medical SAM3 3D checkpoint, or a folder written by
    :func:`~medsam3.model.loading.save_sam3`); an image-only SAM3 has no tracker and cannot track.
    Loading is strict, and a folder without processor files gets SAM3's standard preprocessing and the
    offline CLIP tokenizer, as in :func:`~medsam3.model.loading.load_sam3`. Same as
    :func:`~medsam3.model.loading.load_pretrained` with ``kind="video"``.

    Raises:
        ModelError: no model found, not a video model, or weights missing / unexpected / mis-shaped.
    """
    return load_pretrained(model, "video", device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Frames fed on demand


class StreamedFrames(Mapping):
    """Frames of a session, produced on access from ``uint8`` slices and never stored.

    Stands in for the session's ``processed_frames`` (a dict of preloaded float tensors): the model reads
    each frame once per visit (``session.get_frame``) and caches its features itself. ``len()`` is the
    number of frames, which the tracker uses as the video length.

    Args:
        frames: ``(N, H, W, 3)`` ``uint8`` slices (any array-like indexable along axis 0; not copied).
        size: the model's square input side; slices are resized to it (bilinear, antialiased).
        rescale, mean, std: normalisation ``(x * rescale - mean) / std`` per channel.
        device, dtype: where and how the tensors are produced.
    """

    def __init__(
        self,
        frames,
        size: int,
        *,
        rescale: float = 1 / 255,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.frames = frames
        self.size = int(size)
        self.rescale = np.float32(rescale)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
        self.device = device
        self.dtype = dtype
        #: how many frames have been produced (each access produces one).
        self.produced = 0

    @classmethod
    def for_processor(cls, frames, processor, size: int, device, dtype) -> StreamedFrames:
        """Normalisation constants taken from a ``Sam3VideoProcessor``'s image processor."""
        ip = processor.image_processor
        return cls(
            frames,
            size,
            rescale=float(getattr(ip, "rescale_factor", 1 / 255)),
            mean=getattr(ip, "image_mean", (0.5,) * 3),
            std=getattr(ip, "image_std", (0.5,) * 3),
            device=device,
            dtype=dtype,
        )

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(range(len(self)))

    def __getitem__(self, index: int) -> torch.Tensor:
        """Frame ``index`` as a ``(3, size, size)`` tensor."""
        if not 0 <= int(index) < len(self):
            raise KeyError(index)
        self.produced += 1
        return pixel_tensor(
            np.asarray(self.frames[int(index)]), self.size, self.rescale, self.mean, self.std
        ).to(device=self.device, dtype=self.dtype)


def pixel_tensor(rgb: np.ndarray, size: int, rescale, mean, std) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> normalised ``float32 (3, size, size)``."""
    x = resize_rgb(rgb, (size, size)).astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, np.float32).reshape(1, 1, -1)) / np.asarray(std, np.float32).reshape(1, 1, -1)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def open_session(model, processor, frames, prompts: Iterable[str]):
    """A ``Sam3VideoInferenceSession`` over streamed ``frames`` with the text ``prompts`` added.

    Args:
        model: a ``Sam3VideoModel``; the session lives on its device, in its dtype.
        processor: the matching ``Sam3VideoProcessor`` (tokenizer and normalisation).
        frames: ``(N, H, W, 3)`` ``uint8`` slices, read on demand (see :class:`StreamedFrames`).
    """
    param = next(model.parameters())
    session = processor.init_video_session(video=None, inference_device=param.device, dtype=param.dtype)
    session.processed_frames = StreamedFrames.for_processor(
        frames, processor, video_input_size(model), param.device, param.dtype
    )
    session.video_height, session.video_width = int(frames.shape[1]), int(frames.shape[2])
    for prompt in prompts:
        processor.add_text_prompt(session, prompt)
    return session


# --------------------------------------------------------------------------------------------------
# Bounded memory


def tracker_reach(model) -> int:
    """How many frames back the tracker reads: memory frames and object pointers (16 for SAM3)."""
    cfg = model.tracker_model.config
    return max(int(cfg.num_maskmem), int(cfg.max_object_pointers_in_encoder))


def _behind(frame: int, current: int, reverse: bool) -> int:
    return frame - current if reverse else current - frame


def prune_session(
    session,
    current: int,
    *,
    reverse: bool,
    window: int,
    keep: Iterable[int] = (),
    max_cond_frames: int = 4,
    memory_frames: int = 7,
) -> None:
    """Delete what the model can no longer read after processing frame ``current`` of a one-way pass.

    Args:
        session: a ``Sam3VideoInferenceSession``.
        current: the frame just processed.
        reverse: direction of the pass (frames processed in decreasing order).
        window: per-frame outputs of frames at most ``window - 1`` frames behind ``current`` are kept
            (:func:`tracker_reach` keeps everything the tracker reads).
        keep: frames whose outputs are kept regardless (those a later pass in the other direction reads).
        max_cond_frames: the tracker's ``max_cond_frame_num``: conditioning frames keep their memory
            features while they are among the this-many lowest or highest conditioning frames (the only
            ones the tracker's closest-frame selection can pick in a one-way pass) or inside the window.
        memory_frames: the tracker's ``num_maskmem``: conditioning frames this close to ``current`` keep
            their memory features whatever the window (the tracker may read them as memory frames).
    """
    keep = set(keep)

    def near(frame: int) -> bool:
        return frame in keep or abs(_behind(frame, current, reverse)) < window

    for obj_idx, outputs in session.output_dict_per_obj.items():
        non_cond = outputs["non_cond_frame_outputs"]
        for frame in [f for f in non_cond if not near(f)]:
            del non_cond[frame]
        cond = outputs["cond_frame_outputs"]
        order = sorted(cond)
        selectable = set(order[:max_cond_frames]) | set(order[-max_cond_frames:])
        for frame, entry in cond.items():
            recent = abs(_behind(frame, current, reverse)) < memory_frames
            if frame not in selectable and not recent and not near(frame):
                for key in _MEMORY_KEYS:
                    entry.pop(key, None)
        for frame, entry in [*non_cond.items(), *cond.items()]:
            if frame != current:
                for key in _MASK_KEYS:
                    entry.pop(key, None)
        inputs = session.mask_inputs_per_obj.get(obj_idx, {})
        for frame in [f for f in inputs if f != current]:
            del inputs[frame]
        tracked = session.frames_tracked_per_obj.get(obj_idx, {})
        for frame in [f for f in tracked if not near(f)]:
            del tracked[frame]
    for per_frame in (session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids):
        for frame in [f for f in per_frame if f != current]:
            del per_frame[frame]


def _entries(session):
    for obj_idx, outputs in session.output_dict_per_obj.items():
        for storage in ("cond_frame_outputs", "non_cond_frame_outputs"):
            for frame, entry in outputs[storage].items():
                yield obj_idx, frame, entry


def frames_held(session) -> set[int]:
    """Frames for which the session holds bulk per-frame tensors (memory features, masks, image features).

    Conditioning frames stripped down to their object pointer do not count (a few hundred numbers each).
    """
    bulk = _MEMORY_KEYS + _MASK_KEYS
    held = {frame for _, frame, entry in _entries(session) if any(k in entry for k in bulk)}
    held.update(f for inputs in session.mask_inputs_per_obj.values() for f in inputs)
    held.update(session.cache._vision_features)
    frames = session.processed_frames
    if isinstance(frames, dict):
        held.update(frames)
    return held


def _tensor_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def session_tensor_bytes(session) -> int:
    """Bytes of tensor storage held by a session's per-frame state (outputs, inputs, caches, frames).

    Shared storages are counted once. Text embeddings and other per-prompt constants are not counted.
    """
    seen: set[int] = set()
    total = _tensor_bytes(session.output_dict_per_obj, seen)
    total += _tensor_bytes(session.mask_inputs_per_obj, seen)
    total += _tensor_bytes(session.cache._vision_features, seen)
    if isinstance(session.processed_frames, dict):
        total += _tensor_bytes(session.processed_frames, seen)
    return total
