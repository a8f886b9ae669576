"""Training forward of SAM3's video model on clips: the detector on every frame, the tracker through the clip.

Built from transformers' ``Sam3VideoModel`` modules and the tracker's own per-frame steps; no modelling
code is copied. For a clip of ``n`` frames (``pixel_values (n, 3, S, S)``) and one text concept:

1. **Detector on every frame.** The shared ViT encodes the ``n`` frames in one batch
   (``detector_model.get_vision_features``), and the detector runs the concept on each frame through
   :func:`medsam3.model.forward.predict_prompts`, the call of 2D training: with ``meta_text_cls`` (the
   default, and the only setting the volume modes run) text-only prompts carry Meta's ``[text ; CLS]``
   sequence, exactly as ``--mode track`` / ``--mode clips`` run the video detector
   (:mod:`medsam3.model.video_meta`). With a box prompt (frame 0 only) that frame runs through the
   geometry path with the box; a batch without any box runs the same path with padding boxes (the
   same outputs), so that every process uses the same parameters. Outputs per frame as
   :class:`~medsam3.train.model.Sam3TrainModule` (``pred_logits``, ``pred_boxes``, ``pred_masks``,
   ``presence_logits``, ``semantic_seg``, per-layer
   ``aux_outputs``) for :class:`~medsam3.train.losses.Sam3Loss`.
2. **Tracker start (frame 0)**, as the volume modes start a new object. The tracker's features come from
   the same ViT output through the video model's tracker neck (``get_vision_features_for_tracker``). The
   start mask is the detector's top query on frame 0 (highest ``sigmoid(logit) * sigmoid(presence)``), its
   low-resolution logits turned into the tracker's input mask by
   :func:`medsam3.model.video_meta.conditioning_masks` (Meta's: resized bilinearly to ``4 x
   low_res_mask_size``, thresholded at 0), or, when the clip says ``init_from_gt``, the ground-truth mask
   resized (nearest) to that size; either way a constant (no gradient flows through it). It enters the
   tracker as a mask input (``Sam3TrackerVideoModel._use_mask_as_output``); its memory is encoded from
   that mask binarised at the memory encoder's input size, as the tracker encodes a mask input outside
   training (in training it would take the sigmoid); its object pointer is
   Meta's single-mask decoder pass (``video_meta._object_pointer``, the no-object pointer for an empty
   mask), as at inference.
3. **Tracking frames 1..n-1**, differentiably: the frame's features are conditioned on the memory bank
   (``_prepare_memory_conditioned_features``: memory of up to ``num_maskmem`` earlier frames and their object
   pointers), the SAM mask decoder predicts the mask (``_single_frame_forward``, multimask choice by the
   IoU head as at inference), and the prediction is encoded into memory for the next frames. Gradients flow
   through the memory into the earlier frames, the tracker and the shared ViT. Differences from inference,
   on purpose: the memory is encoded from the tracker's own soft mask (SAM2's training), not after the video
   model's hole filling and overlap heuristics; one object per clip.

Every trainable parameter gets a gradient on every step (:meth:`VideoTrainModule.touch_parameters`; zero
for the parameters a step does not use), as FSDP needs. With ``checkpoint_frames`` each tracked frame's
step is recomputed in the backward pass (``torch.utils.checkpoint``), so the tracker's activations do not
grow with the clip length; the ViT and text layers have their own checkpointing
(:func:`~medsam3.train.model.enable_activation_checkpointing`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from medsam3.model.forward import BOX_PAD_LABEL, encode_image, encode_text, predict_prompts
from medsam3.model.video_meta import _object_pointer, conditioning_masks
from medsam3.train.decoder_layers import record_decoder_layers

if TYPE_CHECKING:
    from transformers import Sam3VideoModel

_OUTPUT_FIELDS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")


class _FrameFeatures:
    """The tracker as :func:`medsam3.model.video_meta._object_pointer` reads it, with the features of one
    frame already computed (here: from the clip's ViT output) instead of taken from an inference session."""

    def __init__(self, tracker: nn.Module, feats: list[torch.Tensor]):
        self._tracker = tracker
        self._feats = feats

    def _prepare_vision_features(self, session: Any, frame_idx: int, batch_size: int) -> tuple[Any, None]:
        return self._feats, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)


class VideoTrainModule(nn.Module):
    """``Sam3VideoModel`` forward for clip training (module docstring).

    ``forward(pixel_values (B, n, 3, S, S), num_frames (B,), input_ids (B, 32), attention_mask (B, 32),
    boxes (B, 1, 4) | None, box_labels (B, 1) | None, init_masks (B, S, S), init_from_gt (B,))`` returns:

    * ``detector``: the detector's outputs for the ``F = sum(num_frames)`` frames, clip by clip:
      ``pred_logits (F, Q)``, ``pred_boxes (F, Q, 4)`` xyxy, ``pred_masks (F, Q, h, w)``,
      ``presence_logits (F, 1)``, ``semantic_seg (F, 1, h, w)`` and, with ``aux``, ``aux_outputs``;
    * ``tracker``: for the ``T = sum(num_frames - 1)`` tracked frames, clip by clip: ``pred_masks (T, h,
      w)`` low-resolution mask logits, ``iou (T,)`` the IoU estimate of that mask, ``object_score_logits
      (T,)``.

    ``meta_text_cls``: text-only prompts get Meta's ``[text ; CLS]`` sequence (as the volume modes run the
    video detector); ``False`` runs plain ``Sam3Model.forward`` (kept for comparisons; the training
    configuration refuses it for video models).
    """

    def __init__(
        self,
        video: Sam3VideoModel,
        aux: bool = True,
        checkpoint_frames: bool = False,
        meta_text_cls: bool = True,
    ):
        super().__init__()
        self.sam3 = video
        self.aux = aux
        self.checkpoint_frames = checkpoint_frames
        self.meta_text_cls = meta_text_cls

    # -- detector ------------------------------------------------------------------------------------
    def detect_frames(self, vision, text_rows, mask_rows, boxes, box_labels) -> dict[str, Any]:
        """The detector on ``F`` frames (one prompt row per frame) through
        :func:`~medsam3.model.forward.predict_prompts`, as 2D training and inference call it."""
        det = self.sam3.detector_model
        recorder = record_decoder_layers(det) if self.aux else contextlib.nullcontext()
        no_box = boxes is None or box_labels is None or not bool((box_labels != BOX_PAD_LABEL).any())
        with recorder as layers:
            if self.meta_text_cls and no_box:
                # Meta's sequence through the geometry path with padding boxes: rows of padding only get
                # the CLS token alone, the same outputs as without boxes, and every process runs the same
                # parameters whether or not its clips carry a box (FSDP reduces the same gradients on all)
                n = text_rows.shape[0]
                pad = text_rows.new_tensor([[[0.5, 0.5, 1.0, 1.0]]]).expand(n, 1, 4)
                labels = torch.full((n, 1), BOX_PAD_LABEL, dtype=torch.long, device=text_rows.device)
                text = BaseModelOutputWithPooling(last_hidden_state=text_rows, pooler_output=text_rows)
                out = det(
                    vision_embeds=vision,
                    text_embeds=text,
                    attention_mask=mask_rows,
                    input_boxes=pad,
                    input_boxes_labels=labels,
                )
            else:
                out = predict_prompts(
                    det,
                    vision,
                    text_embeds=text_rows,
                    attention_mask=mask_rows,
                    boxes=boxes,
                    box_labels=box_labels,
                    meta_text_cls=self.meta_text_cls,
                )
        result: dict[str, Any] = {
            k: getattr(out, k) for k in _OUTPUT_FIELDS if getattr(out, k, None) is not None
        }
        if layers is not None:  # recorded when self.aux
            result["aux_outputs"] = layers.aux_outputs()
        return result

    def start_mask(self, det_logits: torch.Tensor | None, gt: torch.Tensor | None) -> torch.Tensor:
        """The tracker's input mask ``(1, 1, 4 low, 4 low)`` (0 / 1, no gradient) from the detection's
        low-resolution logits ``(low, low)`` (Meta's :func:`~medsam3.model.video_meta.conditioning_masks`)
        or, when given, from the ground truth ``(S, S)`` resized (nearest) to that size."""
        low = int(self.sam3.low_res_mask_size)
        if gt is not None:
            size = 4 * low
            return F.interpolate(gt[None, None].float(), size=(size, size), mode="nearest")
        assert det_logits is not None
        # the video size only shapes the stored low-resolution output, which training does not use
        inputs, _, _ = conditioning_masks(det_logits.detach()[None], (4 * low, 4 * low), low)
        return inputs.float()

    # -- tracker -------------------------------------------------------------------------------------
    def _track_frame(self, memory: dict[int, dict[str, Any]], t: int, n: int, feats, pos):
        """Tracker step on frame ``t`` of ``n`` given the memory of earlier frames: ``(low-res mask logits
        (1, 1, h, w), iou (1,), object score logit (1,), object pointer, memory features, memory pos)``."""
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
            Sam3TrackerVideoInferenceSession,
        )

        tracker = self.sam3.tracker_model
        session = Sam3TrackerVideoInferenceSession(inference_device=feats[-1].device, dtype=feats[-1].dtype)
        session.output_dict_per_obj[0] = {
            "cond_frame_outputs": {0: memory[0]},
            "non_cond_frame_outputs": {k: v for k, v in memory.items() if k != 0},
        }
        high_res = [
            x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
            for x, s in zip(feats[:-1], tracker.backbone_feature_sizes[:-1], strict=True)
        ]
        pix = tracker._prepare_memory_conditioned_features(
            inference_session=session,
            frame_idx=t,
            obj_idx=0,
            is_initial_conditioning_frame=False,
            current_vision_features=feats[-1],
            current_vision_positional_embeddings=pos[-1],
            num_total_frames=n,
        )
        out = tracker._single_frame_forward(
            image_embeddings=high_res + [pix], multimask_output=tracker._use_multimask(False, None)
        )
        mem, mem_pos = tracker._encode_new_memory(
            current_vision_feats=feats[-1],
            pred_masks_high_res=out.high_res_masks,
            object_score_logits=out.object_score_logits,
            is_mask_from_pts=False,
        )
        iou = out.iou_scores.flatten(1).max(dim=1).values if out.iou_scores.shape[-1] > 1 else out.iou_scores
        return (
            out.pred_masks,
            iou.reshape(-1),
            out.object_score_logits.reshape(-1),
            out.object_pointer,
            mem,
            mem_pos,
        )

    def start_memory(self, f0: list[torch.Tensor], start_mask: torch.Tensor) -> dict[str, Any]:
        """The memory entry of the start frame, as a new object's at inference (module docstring, 2).

        Args:
            f0: the tracker's feature levels of the start frame, ``(HW, 1, C)`` each.
            start_mask: ``(1, 1, 4 low, 4 low)`` 0 / 1 input mask (:meth:`start_mask`).

        Returns:
            ``{"object_pointer": (1, C), "maskmem_features", "maskmem_pos_enc"}`` as the tracker stores
            them for a conditioning frame.
        """
        tracker = self.sam3.tracker_model
        high_res = [
            x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
            for x, s in zip(f0[:-1], tracker.backbone_feature_sizes[:-1], strict=True)
        ]
        pix = f0[-1].permute(1, 2, 0).view(-1, tracker.hidden_dim, *tracker.backbone_feature_sizes[-1])
        mask = start_mask.to(pix.dtype)
        start = tracker._use_mask_as_output(pix, high_res, mask)
        # the tracker binarises a mask input for its memory only outside training (``is_mask_from_pts and
        # not self.training``); its own flag (not its submodules') is cleared for this call, as inference
        was = tracker.training
        tracker.training = False
        try:
            mem, mem_pos = tracker._encode_new_memory(
                current_vision_feats=f0[-1],
                pred_masks_high_res=start.high_res_masks,
                object_score_logits=start.object_score_logits,
                is_mask_from_pts=True,
            )
        finally:
            tracker.training = was
        pointer = _object_pointer(_FrameFeatures(tracker, f0), None, 0, mask)
        return {"object_pointer": pointer, "maskmem_features": mem, "maskmem_pos_enc": mem_pos}

    def track_clip(self, feats, pos, start_mask: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """Start the tracker on frame 0 from ``start_mask (1, 1, 4 low, 4 low)`` (0 / 1, :meth:`start_mask`)
        and track frames ``1..n-1``.

        ``feats`` / ``pos``: the tracker's feature levels of the clip's frames, ``(HW, n, C)`` each.
        """
        memory: dict[int, dict[str, Any]] = {0: self.start_memory([x[:, 0:1] for x in feats], start_mask)}
        masks, ious, scores = [], [], []
        for t in range(1, n):
            ft = [x[:, t : t + 1] for x in feats]
            pt = [x[:, t : t + 1] for x in pos]
            args = (dict(memory), t, n, ft, pt)
            if self.checkpoint_frames and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                step = checkpoint(self._track_frame, *args, use_reentrant=False)
            else:
                step = self._track_frame(*args)
            low, iou, score, pointer, mem, mem_pos = step
            memory[t] = {"object_pointer": pointer, "maskmem_features": mem, "maskmem_pos_enc": mem_pos}
            masks.append(low.reshape(low.shape[-2:]))
            ious.append(iou)
            scores.append(score)
        if not masks:
            empty = feats[-1].new_zeros(0)
            return {"pred_masks": empty.reshape(0, 0, 0), "iou": empty, "object_score_logits": empty}
        return {
            "pred_masks": torch.stack(masks),
            "iou": torch.cat(ious),
            "object_score_logits": torch.cat(scores),
        }

    def touch_parameters(self) -> torch.Tensor | None:
        """``0 x`` one element of every trainable parameter held as a plain tensor at the start of the
        forward: every parameter gets a gradient (zero where the step did not use it) on every process.

        Which parameters a step uses depends on its clips (an empty start mask takes the tracker's
        no-object pointer, a box prompt the geometry encoder's box projections); FSDP2 reduce-scatters
        each unit's gradients as one buffer and fails when processes hold gradients of different
        parameters. Under FSDP the sharded units' parameters (``DTensor`` outside their own forward) are
        skipped: they are the transformer layers, which every step runs. Called in every setting, so one
        process, DDP and FSDP take the same optimizer steps.
        """
        from torch.distributed.tensor import DTensor

        parts = [
            p.reshape(-1)[:1] for p in self.parameters() if p.requires_grad and not isinstance(p, DTensor)
        ]
        return torch.cat(parts).sum() * 0.0 if parts else None

    # -- the whole forward ---------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        num_frames: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        init_masks: torch.Tensor | None = None,
        init_from_gt: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        video = self.sam3
        det = video.detector_model
        touch = self.touch_parameters() if torch.is_grad_enabled() else None
        counts = [int(c) for c in num_frames.tolist()]
        frames = torch.cat([pixel_values[b, :n] for b, n in enumerate(counts)])
        clip_of = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)])
        vision = encode_image(det, frames)
        text = encode_text(det, input_ids, attention_mask).pooler_output
        device = text.device
        clip_of = clip_of.to(device)
        first = torch.zeros(len(clip_of), dtype=torch.bool, device=device)
        first[torch.tensor([sum(counts[:b]) for b in range(len(counts))], device=device)] = True
        frame_boxes = frame_labels = None
        if boxes is not None and box_labels is not None:
            frame_boxes = boxes.to(device)[clip_of]
            frame_labels = box_labels.to(device)[clip_of].clone()
            frame_labels[~first] = BOX_PAD_LABEL
        detector = self.detect_frames(
            vision, text[clip_of], attention_mask.to(device)[clip_of], frame_boxes, frame_labels
        )

        tracked: list[dict[str, torch.Tensor]] = []
        if max(counts) > 1:
            feats, pos = video.get_vision_features_for_tracker(vision)  # type: ignore[arg-type]
            scores = detector["pred_logits"].detach().sigmoid()
            if detector.get("presence_logits") is not None:
                scores = scores * detector["presence_logits"].detach().sigmoid()
            offset = 0
            for b, n in enumerate(counts):
                if n > 1:
                    rows = slice(offset, offset + n)
                    if init_from_gt is not None and init_masks is not None and bool(init_from_gt[b]):
                        start = self.start_mask(None, init_masks[b].to(device))
                    else:
                        top = int(scores[offset].argmax())
                        start = self.start_mask(detector["pred_masks"][offset, top], None)
                    tracked.append(
                        self.track_clip([x[:, rows] for x in feats], [x[:, rows] for x in pos], start, n)
                    )
                offset += n
        if tracked:
            track = {k: torch.cat([t[k] for t in tracked]) for k in tracked[0]}
        else:
            h = int(detector["pred_masks"].shape[-1])
            zero = detector["pred_logits"].new_zeros(0)
            track = {"pred_masks": zero.reshape(0, h, h), "iou": zero, "object_score_logits": zero}
        if touch is not None:
            detector["pred_logits"] = detector["pred_logits"] + touch.to(detector["pred_logits"].dtype)
        return {"detector": detector, "tracker": track}
