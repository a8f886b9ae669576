"""Training forward of SAM3's video model on clips: the detector on every frame, the tracker through the clip.

Built from transformers' ``Sam3VideoModel`` modules and the tracker's own per-frame steps; no modelling
code is copied. For a clip of ``n`` frames (``pixel_values (n, 3, S, S)``) and one text concept:

1. **Detector on every frame.** The shared ViT encodes the ``n`` frames in one batch
   (``detector_model.get_vision_features``), and the detector runs the concept on each frame with the
   text-only sequence of transformers' ``Sam3VideoModel`` (no geometry CLS token: that is how
   ``--mode track`` / ``--mode clips`` run the detector). With a box prompt (frame 0 only) that frame runs
   through the geometry path with the box. Outputs per frame as :class:`~medsam3.train.model.Sam3TrainModule`
   (``pred_logits``, ``pred_boxes``, ``pred_masks``, ``presence_logits``, ``semantic_seg``, per-layer
   ``aux_outputs``) for :class:`~medsam3.train.losses.Sam3Loss`.
2. **Tracker start (frame 0).** The tracker's features come from the same ViT output through the video
   model's tracker neck (``get_vision_features_for_tracker``, as at inference). The start mask is the
   detector's top query on frame 0 (highest ``sigmoid(logit) * sigmoid(presence)``), thresholded as
   ``Sam3VideoModel`` thresholds new objects (``mask logits >= 0.5``), or the ground truth when the clip says
   ``init_from_gt``; either way a constant (no gradient flows through it). It enters the tracker as a mask
   input (``Sam3TrackerVideoModel._use_mask_as_output``) and is encoded into the memory bank
   (``_encode_new_memory``), as a new object is at inference.
3. **Tracking frames 1..n-1**, differentiably: the frame's features are conditioned on the memory bank
   (``_prepare_memory_conditioned_features``: memory of up to ``num_maskmem`` earlier frames and their object
   pointers), the SAM mask decoder predicts the mask (``_single_frame_forward``, multimask choice by the
   IoU head as at inference), and the prediction is encoded into memory for the next frames. Gradients flow
   through the memory into the earlier frames, the tracker and the shared ViT. Differences from inference,
   on purpose: the memory is encoded from the tracker's own soft mask (SAM2's training), not after the video
   model's hole filling and overlap heuristics; one object per clip.

With ``checkpoint_frames`` each tracked frame's step is recomputed in the backward pass
(``torch.utils.checkpoint``), so the tracker's activations do not grow with the clip length; the ViT and
text layers have their own checkpointing (:func:`~medsam3.train.model.enable_activation_checkpointing`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.model.forward import BOX_PAD_LABEL, encode_image, encode_text
from medsam3.train.decoder_layers import record_decoder_layers

if TYPE_CHECKING:
    from transformers import Sam3VideoModel

_OUTPUT_FIELDS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")
#: Threshold ``Sam3VideoModel`` applies to a detection's mask logits when it starts a new object.
NEW_OBJECT_MASK_THRESHOLD = 0.5


def _rows(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)]
    if isinstance(value, (tuple, list)):
        return tuple(_rows(v, rows) for v in value)
    return value


def _vision_rows(vision: Sam3VisionEncoderOutput, rows: torch.Tensor) -> Sam3VisionEncoderOutput:
    return Sam3VisionEncoderOutput(**{k: _rows(v, rows) for k, v in vision.items()})


def _merge(parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], n: int) -> dict[str, torch.Tensor]:
    """Dicts of row-batched tensors computed on disjoint row subsets -> one dict of ``n`` rows."""
    out = {}
    for key in parts[0][1]:
        first = parts[0][1][key]
        full = first.new_zeros((n, *first.shape[1:]))
        for rows, values in parts:
            full = full.index_copy(0, rows.to(full.device), values[key])
        out[key] = full
    return out


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
    """

    def __init__(self, video: Sam3VideoModel, aux: bool = True, checkpoint_frames: bool = False):
        super().__init__()
        self.sam3 = video
        self.aux = aux
        self.checkpoint_frames = checkpoint_frames

    # -- detector ------------------------------------------------------------------------------------
    def _detect(self, vision, text, attention_mask, boxes, box_labels) -> dict[str, Any]:
        det = self.sam3.detector_model
        recorder = record_decoder_layers(det) if self.aux else contextlib.nullcontext()
        with recorder as layers:
            if boxes is None:
                out = det(vision_embeds=vision, text_embeds=text, attention_mask=attention_mask)
            else:
                out = det(
                    vision_embeds=vision,
                    text_embeds=text,
                    attention_mask=attention_mask,
                    input_boxes=boxes,
                    input_boxes_labels=box_labels,
                )
        result = {k: getattr(out, k) for k in _OUTPUT_FIELDS if getattr(out, k, None) is not None}
        aux = layers.aux_outputs() if layers is not None else None
        return {"out": result, "aux": aux}

    def detect_frames(self, vision, text_rows, mask_rows, boxes, box_labels) -> dict[str, Any]:
        """The detector on ``F`` frames: text-only rows in one call, rows with a box prompt in another."""
        n = mask_rows.shape[0]
        device = mask_rows.device
        has_box = torch.zeros(n, dtype=torch.bool, device=device)
        if boxes is not None:
            has_box = (box_labels != BOX_PAD_LABEL).any(dim=1)
        calls = []
        for rows, with_box in (
            (torch.nonzero(~has_box).flatten(), False),
            (torch.nonzero(has_box).flatten(), True),
        ):
            if rows.numel() == 0:
                continue
            sub_text = text_rows[rows]
            text = BaseModelOutputWithPooling(last_hidden_state=sub_text, pooler_output=sub_text)
            calls.append(
                (
                    rows,
                    self._detect(
                        _vision_rows(vision, rows),
                        text,
                        mask_rows[rows],
                        boxes[rows] if with_box and boxes is not None else None,
                        box_labels[rows] if with_box and box_labels is not None else None,
                    ),
                )
            )
        result: dict[str, Any] = _merge([(rows, c["out"]) for rows, c in calls], n)
        if self.aux:
            layers = len(calls[0][1]["aux"])
            result["aux_outputs"] = [
                _merge([(rows, c["aux"][i]) for rows, c in calls], n) for i in range(layers)
            ]
        return result

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

    def track_clip(self, feats, pos, init_mask: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """Start the tracker on frame 0 from ``init_mask (h, w)`` bool and track frames ``1..n-1``.

        ``feats`` / ``pos``: the tracker's feature levels of the clip's frames, ``(HW, n, C)`` each.
        """
        tracker = self.sam3.tracker_model
        f0 = [x[:, 0:1] for x in feats]
        high_res = [
            x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
            for x, s in zip(f0[:-1], tracker.backbone_feature_sizes[:-1], strict=True)
        ]
        pix = f0[-1].permute(1, 2, 0).view(-1, tracker.hidden_dim, *tracker.backbone_feature_sizes[-1])
        start = tracker._use_mask_as_output(pix, high_res, init_mask[None, None].to(pix.dtype))
        mem, mem_pos = tracker._encode_new_memory(
            current_vision_feats=f0[-1],
            pred_masks_high_res=start.high_res_masks,
            object_score_logits=start.object_score_logits,
            is_mask_from_pts=True,
        )
        memory: dict[int, dict[str, Any]] = {
            0: {"object_pointer": start.object_pointer, "maskmem_features": mem, "maskmem_pos_enc": mem_pos}
        }
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
                        start = init_masks[b].to(device).bool()
                    else:
                        top = int(scores[offset].argmax())
                        start = detector["pred_masks"][offset, top].detach() >= NEW_OBJECT_MASK_THRESHOLD
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
        return {"detector": detector, "tracker": track}
